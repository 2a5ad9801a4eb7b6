"""Why a device training alone beats the federation: the federation's own code paths, one cause at a time.

    python -m benchmarks.diagnosis [--smoke] [--variants base,fp32,...] [--seeds 0,1] [--out DIR]

One process, no broker: each device is a real ``EdgeClient`` (the ``simulator`` profile of
``benchmarks/federation.py``'s fleet: int8 base, batch 16, its seed) that trains with
``train_round``; its delta goes through the uplink codec with error feedback (what
``seal_update`` sends), the aggregator's rule (``make_rule`` with the aggregator's defaults:
exact ΔW mean re-factorised by SVD, clipping, sample bounds) combines each cluster's updates
from ``ClientUpdate.from_delta`` like ``RoundController.aggregate_records``, and the next
adapter reaches every device through a ``DownlinkMirror`` decoded like ``FederatedSession``
does. Personas, seeds, rounds, local steps and the per-round evaluation (``score_styles`` on
the held-out prompts, 24 images and 8 sampling steps per style) are ``federation.py --quick``'s.
Devices are grouped by their true style: the real ``ours_intra`` fleet reaches that grouping
after its first-round refinement (ARI 1.0), and every cluster starts round 1 from the same
adapter, so round 1 regrouped equals round 1 trained in these groups.

A variant changes one thing against ``base`` (ours_intra as the product runs it):

* ``fp32``        devices train on the full-precision base (the evaluation's) instead of int8;
* ``rank<k>``     the fleet's LoRA rank is k (devices and aggregator; local at rank k too);
* ``exact_eval``  each round is also scored with the untruncated ΔW mean (no SVD truncation);
* ``no_downlink`` full fp32 adapters down, no deltas and no seeded start;
* ``keep_opt``    each device keeps its AdamW state across rounds (the product resets it);
* ``lr<x>``, ``steps<n>``  learning rate / local steps per round (local with the same);
* ``split_<s>``   how the SVD puts the singular values into A and B: ``balanced`` (sqrt(s) in
                  each: the product before issue 18), ``init`` (A's rows at the norm of a fresh
                  adapter's A, B takes the rest), ``b`` (A orthonormal rows, B = U·S); the product
                  now gives A's rows the devices' own A row norm;
* ``server<x>``   the cluster moves x times the mean ΔW change (FedOpt's server learning rate);
* ``fedavg``      one adapter for all, factors averaged (the FedAvg baseline).

``local`` (each device alone, ``federation.in_process``'s loop) runs once per (lr, steps, rank,
seed) with the same number of rounds. Writes benchmarks/results/diagnosis.json and diagnosis.png.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.downlink import DownlinkMirror  # noqa: E402
from aggregator.global_model import GlobalModel, adapter_name  # noqa: E402
from aggregator.rules import ClientUpdate, make_rule  # noqa: E402
from aggregator.rules.exact import ExactLoraAggregation, mean_delta  # noqa: E402
from aggregator.simulation.fleet import FleetConfig, score_styles  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from benchmarks.federation import FEDERATED, QUICK_FLEET, SMOKE_FLEET  # noqa: E402
from edge_sdk.protocol.codecs import ErrorFeedback, decode_payload, make_codec  # noqa: E402
from edge_sdk.protocol.messages import SEEDED_CODEC, SeededAdapter  # noqa: E402
from edge_sdk.protocol.tensors import shapes_of  # noqa: E402
from models.digits.backend import DigitsBackend  # noqa: E402
from models.lora import (  # noqa: E402
    add_adapter,
    factorize,
    get_adapter_state,
    lora_config,
    lora_modules,
    lora_scale,
    set_mix,
)
from models.training import LORA_LR, TrainConfig, train_adapters  # noqa: E402

METRICS = ("style_acc", "digit_acc", "frechet")


@dataclass(frozen=True)
class Variant:
    name: str
    method: str = "ours_intra"        # ours_intra | fedavg
    quantization: str = "int8"        # the devices' base
    rank: int = 2
    exact_eval: bool = False
    downlink_deltas: bool = True
    keep_optimizer: bool = False
    lr: float = LORA_LR
    local_steps: int | None = None    # None: the fleet's
    split: str | None = None          # None: the product's factorisation
    server_lr: float = 1.0            # the cluster moves server_lr x the mean ΔW change (FedOpt's server step)


def variant(name: str) -> Variant:
    """A variant by name (see the module docstring)."""
    fixed = {"base": Variant("base"), "fp32": Variant("fp32", quantization="none"),
             "exact_eval": Variant("exact_eval", exact_eval=True),
             "no_downlink": Variant("no_downlink", downlink_deltas=False),
             "keep_opt": Variant("keep_opt", keep_optimizer=True), "fedavg": Variant("fedavg", method="fedavg")}
    if name in fixed:
        return fixed[name]
    if name.startswith("rank"):
        return Variant(name, rank=int(name[4:]))
    if name.startswith("lr"):
        return Variant(name, lr=float(name[2:]))
    if name.startswith("steps"):
        return Variant(name, local_steps=int(name[5:]))
    if name.startswith("server"):
        return Variant(name, server_lr=float(name[6:]))
    if name.startswith("split_"):
        return Variant(name, split=name[6:])
    if "+" in name:  # combinations: "fp32+split_init"
        parts = [variant(p) for p in name.split("+")]
        merged = {}
        for p in parts:
            merged |= {k: v for k, v in asdict(p).items() if k != "name" and v != getattr(Variant("x"), k)}
        return Variant(name, **merged)
    raise SystemExit(f"unknown variant {name!r}")


# ------------------------------------------------------------------ the SVD split under test (f)
@contextlib.contextmanager
def split(kind: str | None):
    """Swap how the exact rule re-factorises ΔW into (A, B) for the duration (None: the product's own)."""
    if kind is None:
        yield
        return
    import aggregator.rules.exact as exact

    def factorize_as(delta, rank, a_shape, b_shape, scale, a_row_norm=None):
        u, s, vh = torch.linalg.svd(delta / scale, full_matrices=False)
        k = min(rank, s.shape[0])
        if kind == "balanced":
            left, right = s[:k].sqrt(), s[:k].sqrt()
        elif kind == "b":
            left, right = s[:k], torch.ones_like(s[:k])
        elif kind == "init":  # A's rows as long as a fresh Kaiming-uniform A's: 1/sqrt(3) (bound 1/sqrt(fan_in))
            norm = (1 / 3) ** 0.5
            left, right = s[:k] / norm, torch.full_like(s[:k], norm)
        else:
            raise SystemExit(f"unknown split {kind!r}")
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * left
        a[:k] = right[:, None] * vh[:k]
        return a.reshape(a_shape).float(), b.reshape(b_shape).float()

    original = exact.factorize
    exact.factorize = factorize_as
    try:
        yield
    finally:
        exact.factorize = original


# ------------------------------------------------------------------ optimizer state across rounds (d)
@contextlib.contextmanager
def kept_optimizer(memory: dict, key: str, enabled: bool):
    """While a device trains, its AdamW starts from the state it ended the last round with (if ``enabled``)."""
    if not enabled:
        yield
        return
    real = torch.optim.AdamW

    def make(params, **kw):
        opt = real(params, **kw)
        if key in memory:
            opt.load_state_dict(memory[key])
        made.append(opt)
        return opt

    made: list = []
    torch.optim.AdamW = make
    try:
        yield
    finally:
        torch.optim.AdamW = real
        if made:
            memory[key] = made[-1].state_dict()


# ------------------------------------------------------------------ the federation, in one process
def devices_of(cfg: FleetConfig, v: Variant, root: Path, lora):
    from edge_sdk import DeviceConfig, EdgeClient

    clients = []
    for i in range(cfg.devices):
        client = EdgeClient(DeviceConfig(
            data_dir=root / f"d{i}", device_id=f"d{i}", profile="simulator", local_steps=cfg.local_steps,
            task_noise=cfg.task_noise, personalization=cfg.personalization, seed=cfg.seed + i,
            quantization=v.quantization, lr=v.lr, max_lora_rank=max(8, v.rank)))
        client.adopt_lora(lora)  # what the first round start does
        clients.append(client)
    return clients


def run_federated(cfg: FleetConfig, v: Variant) -> dict:
    from edge_sdk import LocalData

    personas = cfg.personas()
    ids = [f"d{i}" for i in range(cfg.devices)]
    persona_of = dict(zip(ids, personas))
    styles = sorted({p.style for p in personas})
    groups = {d: (0 if v.method == "fedavg" else styles.index(persona_of[d].style)) for d in ids}
    overrides = dict(FEDERATED[v.method]) | {"seed": cfg.seed}
    overrides.pop("clustering"), overrides.pop("interaction")
    agg = AggregatorConfig(**overrides, lora=lora_config(v.rank))
    lora = agg.lora
    rule = make_rule(agg.rule, agg.clip, agg.sample_bound)
    model = GlobalModel(lora)
    initial = model.initial_adapter(seed=agg.seed)
    mirror = DownlinkMirror(agg.downlink_codec, deltas=v.downlink_deltas, seeded=(agg.seed, initial))
    steps = v.local_steps or cfg.local_steps
    clusters = {c: {k: t.clone() for k, t in initial.items()} for c in set(groups.values())}
    versions = {c: 0 for c in clusters}
    exact_model = GlobalModel(lora_config(v.rank * cfg.devices)) if v.exact_eval else None
    opt_memory: dict = {}
    curves, exact_curves, losses, truncation, agreement = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="fedaigc-diag-") as root:
        clients = devices_of(cfg, v, Path(root), lora)
        feedback = {d: ErrorFeedback(make_codec(cfg.codec, seed=c.config.seed)) for d, c in zip(ids, clients)}
        held: dict = {}
        curves[0] = score(model, clusters, groups, persona_of, cfg)
        if exact_model is not None:
            exact_curves[0] = curves[0]
        for rnd in range(1, cfg.rounds + 1):
            updates: dict[int, list] = {c: [] for c in clusters}
            reported = []
            for d, client in zip(ids, clients):
                cid = groups[d]
                start = received(mirror, held, client, d, cid, versions[cid], clusters[cid], lora)
                with kept_optimizer(opt_memory, d, v.keep_optimizer):
                    up = client.train_round(start, LocalData.from_persona(persona_of[d]), steps=steps,
                                            version=versions[cid])
                mirror.confirm(d, cid, versions[cid])
                data = feedback[d].encode(up.delta)  # what seal_update puts in the body
                delta = decode_payload(cfg.codec, data, shapes_of(clusters[cid]))
                updates[cid].append(ClientUpdate.from_delta(d, clusters[cid], delta, up.samples))
                reported.append((up.samples, up.loss_before, up.loss_after))
            exact_adapters = {}
            with split(v.split):
                for cid, ups in updates.items():
                    if exact_model is not None:
                        exact_adapters[cid] = untruncated(ups, lora, v.rank * cfg.devices)
                    result = rule.aggregate(clusters[cid], ups, lora)
                    truncation.setdefault(rnd, {})[cid] = truncation_error(ups, result.adapter, lora)
                    agreement.setdefault(rnd, {})[cid] = update_agreement(ups, clusters[cid], lora)
                    clusters[cid] = server_step(clusters[cid], result.adapter, v.server_lr, lora)
                    versions[cid] += 1
            n = sum(s for s, _, _ in reported)
            losses[rnd] = {"before": sum(s * b for s, b, _ in reported) / n, "after": sum(s * a for s, _, a in reported) / n}
            curves[rnd] = score(model, clusters, groups, persona_of, cfg)
            if exact_model is not None:
                exact_curves[rnd] = score(exact_model, exact_adapters, groups, persona_of, cfg)
    out = {"curves": curves, "losses": losses, "truncation": truncation, "agreement": agreement}
    if exact_model is not None:
        out["exact_curves"] = exact_curves
    return out


def received(mirror: DownlinkMirror, held: dict, client, device: str, cid: int, version: int, adapter, lora):
    """The round start's adapter as the device decodes it (``FederatedSession._on_round``)."""
    from edge_sdk.client import SHARED

    payload = mirror.payload(device, cid, version, adapter)
    expected = shapes_of(get_adapter_state(client.unet, SHARED))
    if payload.codec == SEEDED_CODEC:
        seeded = SeededAdapter.decode(payload.data)
        start = client.seeded_adapter(seeded.seed, lora)
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


def _stacks(updates, module):
    ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    a = torch.stack([u.adapter[ka].reshape(u.adapter[ka].shape[0], -1) for u in updates]).double()
    b = torch.stack([u.adapter[kb].reshape(u.adapter[kb].shape[0], -1) for u in updates]).double()
    return ka, kb, a, b


def _weights(updates):
    return torch.tensor([float(u.samples) for u in updates], dtype=torch.float64)


def untruncated(updates, lora, rank: int) -> dict:
    """The exact sample-weighted ΔW mean as a rank-``rank`` adapter (rank >= the sum of the members' ranks: exact)."""
    out = {}
    scale = lora_scale(lora)
    big_scale = 1.0  # lora_config(rank) has alpha = rank
    for module in lora_modules(updates[0].adapter):
        ka, kb, a, b = _stacks(updates, module)
        mean = mean_delta(a, b, _weights(updates), scale)
        a_shape = (rank, *updates[0].adapter[ka].shape[1:])
        b_shape = (updates[0].adapter[kb].shape[0], rank, *updates[0].adapter[kb].shape[2:])
        out[ka], out[kb] = factorize(mean, rank, a_shape, b_shape, big_scale)
    return out


def truncation_error(updates, adapter, lora) -> float:
    """||mean ΔW - ΔW of the aggregated adapter|| / ||mean ΔW||, summed over modules (0: exact)."""
    scale = lora_scale(lora)
    err = tot = 0.0
    for module in lora_modules(adapter):
        ka, kb, a, b = _stacks(updates, module)
        mean = mean_delta(a, b, _weights(updates), scale)
        got = scale * (adapter[kb].reshape(adapter[kb].shape[0], -1).double()
                       @ adapter[ka].reshape(adapter[ka].shape[0], -1).double())
        err += float((mean - got).norm() ** 2)
        tot += float(mean.norm() ** 2)
    return (err / max(tot, 1e-30)) ** 0.5


def server_step(current, aggregated, lr: float, lora):
    """ΔW_now + lr·(ΔW_aggregated - ΔW_now), re-factorised like the rule does (lr 1: the aggregate itself)."""
    if lr == 1.0:
        return aggregated
    from aggregator.rules.exact import refactorize
    from models.lora import row_norm

    scale = lora_scale(lora)
    out = {}
    for module in lora_modules(current):
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        dw = lambda ad: scale * (ad[kb].reshape(ad[kb].shape[0], -1).double()  # noqa: E731
                                 @ ad[ka].reshape(ad[ka].shape[0], -1).double())
        target = dw(current) + lr * (dw(aggregated) - dw(current))
        out[ka], out[kb] = refactorize(target, aggregated[ka], aggregated[kb], scale,
                                       a_row_norm=row_norm(aggregated[ka]))
    return out


def update_agreement(updates, current, lora) -> float:
    """||mean of the devices' ΔW changes|| / mean of their norms, over all modules: 1 when the devices
    moved alike, 1/sqrt(n) when their changes were orthogonal (the average then moves that much less)."""
    scale = lora_scale(lora)
    w = _weights(updates) / _weights(updates).sum()
    changes = []
    for module in lora_modules(current):
        ka, kb, a, b = _stacks(updates, module)
        now = scale * (current[kb].reshape(current[kb].shape[0], -1).double()
                       @ current[ka].reshape(current[ka].shape[0], -1).double())
        changes.append((scale * torch.bmm(b, a) - now).reshape(len(updates), -1))
    flat = torch.cat(changes, dim=1)
    mean = (w[:, None] * flat).sum(0)
    return float(mean.norm() / (w * flat.norm(dim=1)).sum())


def score(model: GlobalModel, adapters: dict, groups: dict, persona_of: dict, cfg: FleetConfig) -> dict:
    """``RoundEvaluator.score``: each style judged on the cluster adapter its devices get."""
    def model_of(cid):
        model.set_cluster(cid, adapters[cid], 0)
        set_mix(model.unet, {adapter_name(cid): 1.0})
        return model.unet

    return score_styles(model_of, groups, persona_of, cfg.eval_samples, cfg.seed, cfg.eval_steps)


def run_local(cfg: FleetConfig, v: Variant) -> dict:
    """``federation.in_process(cfg, pooled=False)``, with the variant's learning rate, steps and rank."""
    personas = cfg.personas()
    ids = [f"d{i}" for i in range(len(personas))]
    persona_of = dict(zip(ids, personas))
    backend = DigitsBackend.from_pretrained()
    unet = backend.denoiser
    unet.requires_grad_(False)
    data = {}
    for d in ids:
        add_adapter(unet, f"g-{d}", lora_config(v.rank), seed=cfg.seed)
        p = persona_of[d]
        data[d] = (backend.encode_images(p.train_images), backend.encode_prompts(list(p.train_prompts)))
    model = GlobalModel(lora_config(v.rank))
    index = {d: i for i, d in enumerate(ids)}
    groups = {d: d for d in ids}
    steps = v.local_steps or cfg.local_steps
    curves, adapters = {}, {}
    for rnd in range(cfg.rounds + 1):
        for d, (samples, enc) in data.items():
            if rnd > 0:
                set_mix(unet, {f"g-{d}": 1.0})
                train_adapters(backend, [f"g-{d}"], samples, enc,
                               TrainConfig(steps=steps, batch_size=16, lr=v.lr, seed=cfg.seed + rnd))
            adapters[index[d]] = get_adapter_state(unet, f"g-{d}")
        curves[rnd] = score(model, adapters, {d: index[d] for d in ids}, persona_of, cfg)
    del groups
    return {"curves": curves}


# ------------------------------------------------------------------ summaries
def mean_styles(curve: dict, key: str) -> float:
    return float(np.mean([m[key] for m in curve["styles"].values()]))


def last(run: dict, cfg: FleetConfig, curves: str = "curves") -> dict:
    return {k: mean_styles(run[curves][cfg.rounds], k) for k in METRICS}


def per_style_last(run: dict, cfg: FleetConfig) -> dict:
    return {s: {k: m[k] for k in METRICS} for s, m in run["curves"][cfg.rounds]["styles"].items()}


def local_key(v: Variant) -> tuple:
    return (v.lr, v.local_steps, v.rank)


def summarize(runs: dict, locals_: dict, variants: list[Variant], cfg: FleetConfig, seeds: list[int]) -> dict:
    table = {}
    for v in variants:
        fed = [last(runs[v.name][s], cfg) for s in seeds]
        loc = [last(locals_[local_key(v)][s], cfg) for s in seeds]
        row = {k: float(np.mean([f[k] for f in fed])) for k in METRICS}
        row |= {f"{k}_sd": float(np.std([f[k] for f in fed])) for k in METRICS}
        row |= {f"local_{k}": float(np.mean([x[k] for x in loc])) for k in METRICS}
        row["style_gap_vs_local"] = row["style_acc"] - row["local_style_acc"]
        row["digit_gap_vs_local"] = row["digit_acc"] - row["local_digit_acc"]
        row["frechet_ratio_vs_local"] = row["frechet"] / row["local_frechet"]
        row["per_style"] = {str(s): per_style_last(runs[v.name][s], cfg) for s in seeds}
        row["local_per_style"] = {str(s): per_style_last(locals_[local_key(v)][s], cfg) for s in seeds}
        if v.exact_eval:
            ex = [last(runs[v.name][s], cfg, "exact_curves") for s in seeds]
            row["untruncated"] = {k: float(np.mean([x[k] for x in ex])) for k in METRICS}
        row["truncation_error_last_round"] = float(np.mean(
            [np.mean(list(runs[v.name][s]["truncation"][cfg.rounds].values())) for s in seeds]))
        table[v.name] = row
    return table


def plot(runs: dict, locals_: dict, variants: list[Variant], cfg: FleetConfig, seeds: list[int], out: Output) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rounds = list(range(cfg.rounds + 1))
    drawn = set()
    for v in variants:
        for label, run in ((v.name, runs[v.name]), (f"local{local_key(v)}", locals_[local_key(v)])):
            if label in drawn:
                continue
            drawn.add(label)
            for ax, key in zip(axes, METRICS):
                vals = np.mean([[mean_styles(run[s]["curves"][r], key) for r in rounds] for s in seeds], axis=0)
                ax.plot(rounds, vals, marker="o", ms=3, label=label, ls="--" if label.startswith("local") else "-")
    axes[0].set(xlabel="round", ylabel="style accuracy", ylim=(0, 1))
    axes[1].set(xlabel="round", ylabel="digit accuracy", ylim=(0, 1))
    axes[2].set(xlabel="round", ylabel="Fréchet distance", yscale="log")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"diagnosis: {cfg.devices} devices, {cfg.rounds} rounds x {cfg.local_steps} steps, "
                 f"seeds {seeds}", fontsize=9)
    out.save_figure(fig, "variants")


DEFAULT_VARIANTS = ("base", "split_balanced", "fp32", "exact_eval", "rank4", "no_downlink", "keep_opt", "lr0.005",
                    "lr0.02", "steps20", "split_init", "split_b", "server2", "fedavg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None, help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seeds", default="0", help="comma-separated fleet seeds (default 0)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="images per style and round (default federation.py --quick's 24; more: less noise)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Output.of(parser, args, "diagnosis")
    torch.set_num_threads(1)
    base_cfg = FleetConfig(**(SMOKE_FLEET if args.smoke else QUICK_FLEET))
    if args.smoke:
        base_cfg = replace(base_cfg, eval_samples=4)
    if args.eval_samples:
        base_cfg = replace(base_cfg, eval_samples=args.eval_samples)
    names = (args.variants or ("base" if args.smoke else ",".join(DEFAULT_VARIANTS))).split(",")
    variants = [variant(n) for n in names if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.monotonic()
    runs: dict = {v.name: {} for v in variants}
    locals_: dict = {}
    jobs = [("local", v, s) for s in seeds for v in {local_key(v): v for v in variants}.values()] + \
           [("fed", v, s) for s in seeds for v in variants]
    seconds: dict = {}
    for kind, v, s in tqdm(jobs, desc="diagnosis", unit="run"):
        cfg = replace(base_cfg, seed=s)
        t = time.monotonic()
        if kind == "local":
            locals_.setdefault(local_key(v), {})[s] = run_local(cfg, v)
            seconds[f"local{local_key(v)}:{s}"] = time.monotonic() - t
        else:
            runs[v.name][s] = run_federated(cfg, v)
            seconds[f"{v.name}:{s}"] = time.monotonic() - t
        out.write({"runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()},
                   "local_runs": {str(k): {str(s): r for s, r in per.items()} for k, per in locals_.items()}},
                  partial=True)
    table = summarize(runs, locals_, variants, base_cfg, seeds)
    result = {"config": {k: str(x) for k, x in base_cfg.__dict__.items()}, "seeds": seeds,
              "variants": {v.name: asdict(v) for v in variants}, "table": table,
              "runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()},
              "local_runs": {str(k): {str(s): r for s, r in per.items()} for k, per in locals_.items()},
              "seconds": seconds, "total_seconds": time.monotonic() - started}
    plot(runs, locals_, variants, base_cfg, seeds, out)
    out.write(result)
    for name, row in table.items():
        print(f"{name:>14}: style {row['style_acc']:.3f} (local {row['local_style_acc']:.3f}) digit "
              f"{row['digit_acc']:.3f} ({row['local_digit_acc']:.3f}) frechet {row['frechet']:.0f} "
              f"({row['local_frechet']:.0f}) trunc {row['truncation_error_last_round']:.3f}"
              + (f" untruncated style {row['untruncated']['style_acc']:.3f}" if "untruncated" in row else ""))


if __name__ == "__main__":
    main()
