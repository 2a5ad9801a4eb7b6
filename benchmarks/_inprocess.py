"""The federation in one process: the product's own device, codec, rule, policy, interaction and
downlink code, without a broker.

Each device is a real ``EdgeClient`` (the ``simulator`` profile: int8 base, batch 16, its own
seed, ``device_seed``) that trains with ``train_round``; its delta goes through the uplink codec with error
feedback (what ``seal_update`` sends) and reaches the rule as ``ClientUpdate.from_delta``, as in
``RoundController.aggregate_records``. The clustering policy (``aggregator.policies``) groups the
devices from their task vectors and may regroup them on their first updates, as in
``RoundController.regroup``; the interaction step is ``CloudStep.local``; the next adapter reaches
each device through a ``DownlinkMirror``, decoded as ``FederatedSession`` decodes it. Devices of a
rank below the fleet's (``Variant.device_ranks``) get their share of it and send back updates padded to
the fleet's rank through ``RankShares``, as ``RoundController`` does. What the
broker, the state store and the worker processes add is tested over the real protocol
(``tests/test_federation.py``, ``fedaigc bench federation --fleet``); here a federated run of a
12-device fleet costs seconds to minutes instead of tens of minutes, so sweeps over data sizes
and seeds fit a benchmark's budget.

``local`` (each device alone) and ``central`` (one adapter per style on the pooled data) are
``run_alone``, trained on the same int8 base as the devices. Every run is scored by a ``Scorer``
on the adapter each device would use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aggregator.clustering import ClusterState, centroids
from aggregator.config import AggregatorConfig
from aggregator.downlink import DownlinkMirror
from aggregator.global_model import GlobalModel, adapter_name
from aggregator.interaction import update_spread
from aggregator.policies import POLICIES
from aggregator.rank_split import RankShares, make_split
from aggregator.rules import ClientUpdate, make_rule
from aggregator.simulation.fleet import FleetConfig, score_styles
from edge_sdk.protocol.codecs import ErrorFeedback, decode_payload, make_codec
from edge_sdk.protocol.messages import SEEDED_CODEC, SeededAdapter
from edge_sdk.protocol.tensors import shapes_of
from edge_sdk.quantize import quantize_base
from models.digits.backend import DigitsBackend
from models.lora import add_adapter, get_adapter_state, lora_config, set_mix
from models.lora_ranks import lora_at_rank, pad_rank
from models.training import LORA_LR, TrainConfig, train_adapters

# each method's aggregator settings (over the product's defaults); ``ours_intra`` is what the product ships,
# ``ours`` the same with interaction on (``interaction = true``)
FEDERATED = {
    "fedavg": {"clustering": "single", "rule": "fedavg", "interaction": False, "clip": None},
    "ifca": {"clustering": "ifca", "rule": "fedavg", "interaction": False, "clip": None},
    "ours_intra": {"clustering": "tasks", "rule": "exact", "interaction": False},
    "ours": {"clustering": "tasks", "rule": "exact", "interaction": True},
}

Adapter = dict[str, torch.Tensor]
# (model_of(group) -> denoiser with that group's adapter active, device -> group, device -> persona) -> scores
Scorer = Callable[[Callable, dict, dict], dict]


@dataclass(frozen=True)
class Variant:
    """How one federated run differs from the product's defaults (a method, and the knobs a diagnosis turns)."""

    name: str
    method: str = "ours_intra"        # one of FEDERATED
    quantization: str = "int8"        # the devices' base
    rank: int = 2                     # the fleet's (its maximum, with device_ranks)
    device_ranks: tuple[int, ...] = ()  # each device's rank, by device index (empty: every device at ``rank``)
    downlink_deltas: bool = True
    lr: float = LORA_LR
    local_steps: int | None = None    # None: the fleet's


def seen_scorer(cfg: FleetConfig) -> Scorer:
    """``score_styles`` on the personas' held-out prompts: what ``RoundEvaluator`` scores in the fleet."""
    return lambda model_of, groups, persona_of: score_styles(model_of, groups, persona_of, cfg.eval_samples,
                                                             cfg.seed, cfg.eval_steps)


def seen_and_unseen_scorer(cfg: FleetConfig) -> Scorer:
    """``{"seen": ..., "unseen": ...}``: the held-out prompts for owned digits, and the prompts for
    digits the devices never had, in phrasings they never used."""
    return lambda model_of, groups, persona_of: {
        which: score_styles(model_of, groups, persona_of, cfg.eval_samples, cfg.seed, cfg.eval_steps, which=which)
        for which in ("seen", "unseen")}


def device_seed(seed: int, i: int) -> int:
    """Device ``i``'s seed in the fleet of ``seed``: distinct across the fleets of a sweep's seeds (``seed + i``
    would give device 1 of fleet 0 the seed of device 0 of fleet 1), with room for a round count
    per device (its training seed is this plus the round's version)."""
    return 10_000 * seed + 100 * i


def true_style_groups(persona_of: dict) -> dict[str, int]:
    styles = sorted({p.style for p in persona_of.values()})
    return {d: styles.index(p.style) for d, p in persona_of.items()}


class InProcessFederation:
    """One federated run. ``groups`` fixes who shares an adapter (else the method's policy forms the
    groups from the devices' task vectors); ``eval_rounds`` are the rounds scored (the last always)."""

    def __init__(self, cfg: FleetConfig, v: Variant, personas: Sequence | None = None, *,
                 groups: dict[str, int] | None = None, scorer: Scorer | None = None,
                 eval_rounds: Sequence[int] | None = None) -> None:
        self.cfg, self.v = cfg, v
        personas = list(cfg.personas() if personas is None else personas)
        self.ids = [f"d{i}" for i in range(len(personas))]
        self.persona_of = dict(zip(self.ids, personas))
        self.fixed_groups = groups
        self.scorer = scorer or seen_scorer(cfg)
        self.eval_rounds = set(range(cfg.rounds + 1) if eval_rounds is None else eval_rounds) | {cfg.rounds}
        overrides = dict(FEDERATED[v.method]) | {"seed": cfg.seed}
        if overrides["clustering"] == "ifca":
            overrides["k"] = len({p.style for p in personas})
        self.agg = AggregatorConfig(**overrides, lora=lora_config(v.rank))
        self.lora = self.agg.lora
        self.rule = make_rule(self.agg.rule, self.agg.clip, self.agg.sample_bound)
        self.policy = POLICIES[self.agg.clustering](k=self.agg.k, refine_after_round=self.agg.refine_after_round)
        self.model = GlobalModel(self.lora)
        self.initial = self.model.initial_adapter(seed=self.agg.seed)
        self.steps = v.local_steps or cfg.local_steps
        if v.device_ranks and len(v.device_ranks) != len(self.ids):
            raise ValueError(f"device_ranks names {len(v.device_ranks)} ranks for {len(self.ids)} devices")
        self.rank_of = dict(zip(self.ids, v.device_ranks or [v.rank] * len(self.ids)))
        self.uplink_bytes = {d: 0 for d in self.ids}  # what each device's updates cost, all rounds
        self.shares: RankShares | None = None  # per run, over its downlink mirror

    # ---------------------------------------------------------------- what a diagnosis may change
    def train(self, device: str, client, start: Adapter, data, version: int):
        """The device's round (``EdgeClient.train_round``)."""
        return client.train_round(start, data, steps=self.steps, version=version)

    def aggregate(self, rnd: int, cid: int, current: Adapter, updates: list[ClientUpdate]) -> Adapter:
        """The cluster's next adapter (the method's rule)."""
        return self.rule.aggregate(current, updates, self.lora).adapter

    def after_round(self, rnd: int, updates: dict[int, list[ClientUpdate]], adapters: dict[int, Adapter]) -> None:
        """Called once a round's clusters are aggregated, before interaction (a diagnosis records statistics)."""

    # ---------------------------------------------------------------- the run
    def devices(self, root: Path) -> list:
        from edge_sdk import DeviceConfig, EdgeClient

        clients = []
        for i, d in enumerate(self.ids):
            client = EdgeClient(DeviceConfig(
                data_dir=root / d, device_id=d, profile="simulator", local_steps=self.steps,
                task_noise=self.cfg.task_noise, personalization=self.cfg.personalization,
                seed=device_seed(self.cfg.seed, i),
                quantization=self.v.quantization, lr=self.v.lr, max_lora_rank=max(8, self.v.rank)))
            client.adopt_lora(lora_at_rank(self.lora, self.rank_of[d]))  # what the first round start does
            clients.append(client)
        return clients

    def run(self) -> dict:
        from edge_sdk import LocalData

        cfg = self.cfg
        curves, losses = {}, {}
        with tempfile.TemporaryDirectory(prefix="fedaigc-inproc-") as root:
            clients = dict(zip(self.ids, self.devices(Path(root))))
            data = {d: LocalData.from_persona(self.persona_of[d]) for d in self.ids}
            # seeded per device (a device keys these draws by its own secret, new with each data directory)
            vectors = np.stack([clients[d].task_vector(list(self.persona_of[d].train_prompts),
                                                       seed=clients[d].config.seed) for d in self.ids])
            state = ClusterState()
            labels = (np.array([self.fixed_groups[d] for d in self.ids]) if self.fixed_groups is not None
                      else self.policy.form_clusters(vectors))
            assignment = state.recluster(self.ids, vectors, labels)
            text_assignment = dict(assignment)
            clusters = {cid: {k: t.clone() for k, t in a.items()} for cid, a in self.policy.starting_adapters(
                sorted(set(assignment.values())), self.initial,
                lambda cid: self.model.initial_adapter(self.agg.seed + cid, b_std=1e-2)).items()}
            versions = {cid: 0 for cid in clusters}
            mirror = DownlinkMirror(self.agg.downlink_codec, deltas=self.v.downlink_deltas,
                                    seeded=(self.agg.seed, self.initial))
            self.shares = RankShares(make_split(self.agg.rank_split), self.lora,
                                     lambda at: self.model.initial_adapter(self.agg.seed, lora=at), mirror)
            feedback = {d: ErrorFeedback(make_codec(cfg.codec, seed=clients[d].config.seed)) for d in self.ids}
            held: dict = {}
            if 0 in self.eval_rounds:
                curves[0] = self.score(clusters, assignment)
            for rnd in range(1, cfg.rounds + 1):
                updates: dict[int, list[ClientUpdate]] = {c: [] for c in clusters}
                deltas, reported = {}, []
                for d in self.ids:
                    cid, start = self.round_start(mirror, held, clients[d], d, assignment[d], clusters, versions,
                                                  data[d])
                    up = self.train(d, clients[d], start, data[d], versions[cid])
                    if cid == assignment[d]:
                        mirror.confirm(d, cid, versions[cid])
                    else:  # it chose another candidate (IFCA): that one is the adapter it uses
                        assignment = {**assignment, d: cid}
                    encoded = feedback[d].encode(up.delta)  # what seal_update puts in the body
                    self.uplink_bytes[d] += len(encoded)
                    deltas[d] = decode_payload(cfg.codec, encoded, shapes_of(start))
                    if self.rank_of[d] != self.lora.r:  # padded to the fleet's rank from where it started
                        deltas[d] = self.shares.to_fleet(start, deltas[d], clusters[cid])
                    updates[cid].append(ClientUpdate.from_delta(d, clusters[cid], deltas[d], up.samples))
                    reported.append((up.samples, up.loss_before, up.loss_after))
                adapters = {cid: self.aggregate(rnd, cid, clusters[cid], ups) if ups else clusters[cid]
                            for cid, ups in updates.items()}
                spreads = {cid: update_spread(ups, self.lora) if ups else None for cid, ups in updates.items()}
                for cid in adapters:
                    versions[cid] += 1
                self.after_round(rnd, updates, adapters)
                if self.fixed_groups is None and self.policy.regroups_after(rnd):
                    regrouped = self.regroup(rnd, state, vectors, deltas, updates, assignment, versions)
                    if regrouped is not None:
                        assignment, adapters, versions, spreads = regrouped
                clusters = self.interact(rnd, adapters, state, vectors, assignment, spreads)
                n = sum(s for s, _, _ in reported)
                losses[rnd] = {"before": sum(s * b for s, b, _ in reported) / n,
                               "after": sum(s * a for s, _, a in reported) / n}
                if rnd in self.eval_rounds:
                    curves[rnd] = self.score(clusters, assignment)
        return {"curves": curves, "losses": losses, "assignment": assignment, "text_assignment": text_assignment,
                "ari": self.ari(assignment), "ari_text": self.ari(text_assignment), "uplink_bytes": self.uplink_bytes}

    def round_start(self, mirror: DownlinkMirror, held: dict, client, device: str, cid: int, clusters: dict,
                    versions: dict, data) -> tuple[int, Adapter]:
        """(the cluster the device trains for, the adapter it starts from) as ``FederatedSession`` gets them:
        its cluster's adapter through the downlink, or with several candidates (IFCA) the one whose
        loss on its own data is lowest."""
        plan = self.policy.configure_round(cid, [], [], len(clusters))
        rank = self.rank_of[device]
        if plan.candidates > 1:  # full adapters go down: a held one would not match every candidate
            shares = {c: self.shares.at_rank(a, rank) for c, a in sorted(clusters.items())}
            losses = {c: client.local_loss(a, data) for c, a in shares.items()}
            best = min(losses, key=losses.get)
            return best, {k: t.clone() for k, t in shares[best].items()}
        return cid, received(mirror, held, client, device, cid, versions[cid], self.shares.at_rank(clusters[cid], rank))

    def regroup(self, rnd: int, state: ClusterState, vectors: np.ndarray, deltas: dict, updates: dict,
                assignment: dict, versions: dict):
        """``RoundController.regroup``: new groups from task and update similarity, their updates aggregated anew."""
        update_vectors = np.stack([torch.cat([t.flatten() for _, t in sorted(deltas[d].items())]).numpy()
                                   for d in self.ids])
        labels = self.policy.regroup(rnd, vectors, update_vectors, [assignment[d] for d in self.ids])
        if labels is None:
            return None
        assignment = state.recluster(self.ids, vectors, labels)
        samples = {u.device_id: u.samples for ups in updates.values() for u in ups}
        adapters, spreads = {}, {}
        for cid in sorted(set(assignment.values())):
            group = [ClientUpdate.from_delta(d, self.initial, deltas[d], samples[d])
                     for d in self.ids if assignment[d] == cid]
            adapters[cid] = self.aggregate(rnd, cid, self.initial, group)
            spreads[cid] = update_spread(group, self.lora)
        top = max(versions.values())
        return assignment, adapters, {cid: top for cid in adapters}, spreads

    def interact(self, rnd: int, adapters: dict, state: ClusterState, vectors: np.ndarray, assignment: dict,
                 spreads: dict) -> dict:
        """``CloudStep.local``: clusters borrow from each other (when the method interacts)."""
        from aggregator.cloud_step import CloudStep

        labels = np.array([assignment[d] for d in self.ids])
        cents = centroids(vectors, labels)
        sizes = {cid: int((labels == cid).sum()) for cid in adapters}
        return CloudStep(self.agg).local(rnd, adapters, cents, sizes, spreads)

    def score(self, adapters: dict, assignment: dict, model: GlobalModel | None = None) -> dict:
        """Each device judged on its cluster's adapter (``RoundEvaluator.score``), held by ``model``
        (default: the run's own, at the fleet's rank). With device ranks, on its cluster's adapter at
        its rank (zero-padded back to the fleet's: the same ΔW): groups are (cluster, rank) pairs."""
        model = model or self.model
        fleet = self.lora.r
        ranked = bool(self.v.device_ranks)
        groups = {d: cid * (fleet + 1) + self.rank_of[d] for d, cid in assignment.items()} if ranked else assignment

        def model_of(group):
            cid, rank = divmod(group, fleet + 1) if ranked else (group, fleet)
            model.set_cluster(group, pad_rank(self.shares.at_rank(adapters[cid], rank), fleet) if ranked
                              else adapters[cid], 0)
            set_mix(model.unet, {adapter_name(group): 1.0})
            return model.unet

        return self.scorer(model_of, groups, self.persona_of)

    def ari(self, assignment: dict) -> float:
        from sklearn.metrics import adjusted_rand_score

        return float(adjusted_rand_score([self.persona_of[d].style for d in self.ids],
                                         [assignment[d] for d in self.ids]))


def received(mirror: DownlinkMirror, held: dict, client, device: str, cid: int, version: int, adapter: Adapter):
    """The round start's adapter as the device decodes it (``FederatedSession._on_round``)."""
    from edge_sdk.client import SHARED

    payload = mirror.payload(device, cid, version, adapter)
    expected = shapes_of(get_adapter_state(client.unet, SHARED))
    if payload.codec == SEEDED_CODEC:
        seeded = SeededAdapter.decode(payload.data)
        start = client.seeded_adapter(seeded.seed, client.shared_lora)
        if not seeded.matches(start):
            raise RuntimeError("the seeded adapter does not match the aggregator's")
    elif payload.base_version < 0:
        start = decode_payload(payload.codec, payload.data, expected)
    else:
        base = held[device]
        if (base[0], base[1]) != (payload.base_cluster, payload.base_version):
            raise RuntimeError(f"{device} holds {base[:2]}, the delta is against "
                               f"{(payload.base_cluster, payload.base_version)}")
        decoded = decode_payload(payload.codec, payload.data, expected)
        start = {k: base[2][k] + decoded[k] for k in decoded}
    held[device] = (cid, version, start)
    return start


def run_alone(cfg: FleetConfig, pooled: bool, personas: Sequence | None = None, *, rank: int = 2,
              lr: float = LORA_LR, local_steps: int | None = None, scorer: Scorer | None = None,
              eval_rounds: Sequence[int] | None = None, quantization: str = "int8") -> dict:
    """``local`` (one adapter per device, its own data) or ``central`` (one per style on its devices' pooled
    data, with as many optimizer steps per round as that style's devices take together), trained on the
    base the devices train on (``quantization``: the ``simulator`` profile's int8, or ``"none"``) and,
    like every method, scored on the fp32 one."""
    personas = list(cfg.personas() if personas is None else personas)
    scorer = scorer or seen_scorer(cfg)
    rounds_scored = set(range(cfg.rounds + 1) if eval_rounds is None else eval_rounds) | {cfg.rounds}
    steps = local_steps or cfg.local_steps
    ids = [f"d{i}" for i in range(len(personas))]
    persona_of = dict(zip(ids, personas))
    groups = {d: (p.style if pooled else d) for d, p in persona_of.items()}
    if quantization not in ("int8", "none"):
        raise ValueError(f"quantization must be 'int8' or 'none', got {quantization!r}")
    backend = DigitsBackend.from_pretrained()
    unet = backend.denoiser
    unet.requires_grad_(False)
    if quantization == "int8":
        quantize_base(unet)
    index = {g: i for i, g in enumerate(sorted(set(groups.values())))}
    data = {}
    for g in index:
        members = [persona_of[d] for d in ids if groups[d] == g]
        add_adapter(unet, f"g-{g}", lora_config(rank), seed=cfg.seed)
        samples = backend.encode_images(torch.cat([p.train_images for p in members]))
        enc = backend.encode_prompts([q for p in members for q in p.train_prompts])
        data[g] = (samples, enc, len(members))
    model = GlobalModel(lora_config(rank))

    def model_of(i):
        set_mix(model.unet, {adapter_name(i): 1.0})
        return model.unet

    curves = {}
    for rnd in range(cfg.rounds + 1):
        for g, (samples, enc, n) in data.items():
            if rnd > 0:
                set_mix(unet, {f"g-{g}": 1.0})
                train_adapters(backend, [f"g-{g}"], samples, enc,
                               TrainConfig(steps=steps * n, batch_size=16, lr=lr,
                                           seed=device_seed(cfg.seed, index[g]) + rnd))
            if rnd in rounds_scored:
                model.set_cluster(index[g], get_adapter_state(unet, f"g-{g}"), rnd)
        if rnd in rounds_scored:
            curves[rnd] = scorer(model_of, {d: index[groups[d]] for d in ids}, persona_of)
    return {"curves": curves}
