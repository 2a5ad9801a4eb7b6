"""A simulated fleet on one machine: real ``EdgeClient`` devices, a real aggregator, a real broker.

Devices live in worker processes (one torch thread each), each with its own keys, data
directory, MQTT session and provisioning bundle (``provision_device``: the path operators use);
the aggregator runs in this process. Everything crosses
the broker exactly as in production, so the bytes counted are bytes on the wire. The
aggregator's round listener feeds an evaluator thread that scores every committed
round (per cluster, on the members' held-out prompts) while the next round trains.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from aggregator.global_model import GlobalModel, adapter_name
from aggregator.provisioning import provision_device
from aggregator.service import AggregatorService
from edge_sdk.protocol.topics import DEFAULT_PREFIX
from models.digits.evaluate import evaluate, sample_for_personas
from models.lora import set_mix

log = logging.getLogger("fedaigc.simulation")

@dataclass(frozen=True)
class FleetConfig:
    devices: int = 12
    styles: int = 4
    rounds: int = 8
    local_steps: int = 20
    seed: int = 0
    sizes: tuple[int, ...] | None = None    # devices per style (uneven groups)
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = DEFAULT_PREFIX
    codec: str = "fp32"
    task_noise: float = 0.0
    personalization: str = "none"
    processes: int = 2
    eval_samples: int = 32                  # per cluster and round
    eval_steps: int = 10
    final_eval_samples: int = 64
    round_timeout_s: float = 300.0
    state_dir: Path | None = None

    def personas(self):
        """The fleet's simulated users, one per device, deterministic for ``seed``."""
        from models.digits.data import make_personas

        return make_personas(self.devices, self.styles, seed=self.seed, sizes=list(self.sizes) if self.sizes else None)


@dataclass
class FederationResult:
    config: dict
    seconds: float
    curves: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)  # round -> cluster -> metrics
    final: dict[int, dict[str, float]] = field(default_factory=dict)             # cluster -> metrics
    assignment: dict[str, int] = field(default_factory=dict)
    true_style: dict[str, str] = field(default_factory=dict)
    text_assignment: dict[str, int] = field(default_factory=dict)
    devices: dict[str, dict] = field(default_factory=dict)                       # per-device report
    traffic: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    adapters: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def ari(self, which: str = "final") -> float:
        from sklearn.metrics import adjusted_rand_score

        assignment = self.assignment if which == "final" else self.text_assignment
        devices = sorted(assignment)
        return float(adjusted_rand_score([self.true_style[d] for d in devices], [assignment[d] for d in devices]))

    def bytes_total(self, upto_round: int | None = None) -> int:
        return sum(v["up"] + v["down"] for r, per in self.traffic.items() if upto_round is None or r <= upto_round
                   for v in per.values())


PART_SEED_STRIDE = 7919  # between the sampler seeds of a style's parts (a prime: no overlap with nearby seeds)


def score_styles(model_of, assignment: dict, persona_of: dict, samples: int, seed: int, steps: int,
                 which: str = "seen") -> dict:
    """``{"styles": {style: metrics}, "clusters": {group: {style: devices}}}`` for any grouping.

    ``model_of(group)`` returns the network (adapters set) that the devices of ``group`` use;
    a style's ``samples`` images are split over its groups in proportion to its devices there
    and judged together, on the personas' ``which`` prompts (``sample_for_personas``). Each of a
    style's parts draws its own noise: parts sharing one seed would repeat their starting noise,
    and a style split over many groups (each device alone) would be judged on less varied images.
    """
    per_style: dict[str, int] = {}
    for d in assignment:
        per_style[persona_of[d].style] = per_style.get(persona_of[d].style, 0) + 1
    images: dict[str, list] = {}
    composition: dict = {}
    for group in sorted(set(assignment.values()), key=str):
        members = [persona_of[d] for d, g in assignment.items() if g == group]
        by_style: dict[str, list] = {}
        for p in members:
            by_style.setdefault(p.style, []).append(p)
        composition[str(group)] = {style: len(g) for style, g in by_style.items()}
        unet = model_of(group)
        for style, g in by_style.items():
            k = max(1, round(samples * len(g) / per_style[style]))
            part = len(images.setdefault(style, []))
            images[style].append(sample_for_personas(unet, g, k, seed + PART_SEED_STRIDE * part, steps, which=which))
    styles = {}
    for style, parts in images.items():
        styles[style] = evaluate(torch.cat([i for i, _ in parts]), torch.cat([d for _, d in parts]), style)
        styles[style]["devices"] = per_style[style]
    return {"styles": styles, "clusters": composition}


def _device_worker(cfg: FleetConfig, indices: list[int], bundles: list[str], root: str, events: mp.Queue) -> None:
    """One worker process hosting several devices, each from its provisioning bundle file, until the
    federation finishes."""
    logging.basicConfig(level=os.environ.get("FEDAIGC_DEVICE_LOG", "WARNING"),
                        format="%(asctime)s %(processName)s %(name)s: %(message)s")
    from edge_sdk import EdgeClient, LocalData, ProvisioningBundle
    from edge_sdk.session import FederatedSession
    from models.digits.evaluate import evaluate
    from models.text import PromptEncoder

    torch.set_num_threads(1)
    personas = cfg.personas()
    sessions = []
    ids = []
    for i, path in zip(indices, bundles):
        bundle = ProvisioningBundle.load(path)
        ids.append(bundle.device_id)
        data_dir = Path(root) / bundle.device_id
        client = EdgeClient(bundle.device_config(data_dir, profile="simulator", local_steps=cfg.local_steps,
                                                 task_noise=cfg.task_noise, personalization=cfg.personalization,
                                                 seed=cfg.seed + i))
        session = FederatedSession(client, LocalData.from_persona(personas[i]), bundle.mqtt_config(data_dir),
                                   codec=cfg.codec)
        sessions.append((i, session.start()))
    events.put(("ready", ids))
    parent = os.getppid()
    for _, s in sessions:
        while not s.finished.wait(1.0):
            if os.getppid() != parent:  # the fleet's owner died (e.g. SIGKILL): do not linger as an orphan
                os._exit(1)
    for i, s in sessions:
        p = personas[i]
        prompts = list(p.test_prompts)
        enc = torch.from_numpy(PromptEncoder().encode(prompts))
        from edge_sdk.client import PERSONAL, SHARED
        from models.lora import adapter_names, set_mix

        report = {"style": p.style, "rounds": [asdict(r) for r in s.rounds], "bytes": s.transport.byte_totals()}
        for label, mix in (("base", {}), ("shared", {SHARED: 1.0}),
                           ("personal", {SHARED: 1.0} | ({PERSONAL: 1.0} if PERSONAL in adapter_names(s.client.unet) else {}))):
            set_mix(s.client.unet, mix)
            images = s.client.backend.generate(enc, steps=cfg.eval_steps, seed=cfg.seed)
            report[label] = evaluate(images, p.test_digits, p.style)
        events.put(("report", s.client.device_id, report))
        s.stop()
    events.put(("exit", ids))


class Fleet:
    """Start devices in worker processes against a running aggregator; collect their reports."""

    def __init__(self, cfg: FleetConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        tag = uuid.uuid4().hex[:6]
        self.ids = [f"dev{i:03d}-{tag}" for i in range(cfg.devices)]
        self.events: mp.Queue = mp.get_context("spawn").Queue()
        self.procs: list[mp.Process] = []
        self.reports: dict[str, dict] = {}

    def start(self, service: AggregatorService) -> None:
        """Provision every device at ``service`` (a one-time token each, the fingerprint pinned) as an
        operator would, a bundle file per device, then start them."""
        bundles = []
        for device_id in self.ids:
            path = self.root / "bundles" / f"{device_id}.json"
            provision_device(service.store, service.identity, service.config, device_id, label="simulation").save(path)
            bundles.append(str(path))
        ctx = mp.get_context("spawn")
        n = max(1, min(self.cfg.processes, self.cfg.devices))
        for w in range(n):
            idx = list(range(w, self.cfg.devices, n))
            p = ctx.Process(target=_device_worker, args=(self.cfg, idx, [bundles[i] for i in idx], str(self.root),
                                                         self.events), daemon=True)
            p.start()
            self.procs.append(p)

    def collect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        exited = 0
        while exited < len(self.procs) and time.monotonic() < deadline:
            try:
                kind, *rest = self.events.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    break
                continue
            if kind == "report":
                self.reports[rest[0]] = rest[1]
            elif kind == "exit":
                exited += 1

    def stop(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


class RoundEvaluator:
    """Scores each committed round's cluster adapters on the members' held-out prompts."""

    def __init__(self, service: AggregatorService, cfg: FleetConfig, persona_of: dict[str, object]) -> None:
        self.service = service
        self.cfg = cfg
        self.persona_of = persona_of
        self.curves: dict[int, dict[int, dict[str, float]]] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._model = None
        self._error: BaseException | None = None

    def start(self) -> "RoundEvaluator":
        membership = self.service.membership
        self.service.rounds.events.committed.append(
            lambda rnd, adapters: self._queue.put((rnd, adapters, dict(membership.assignment))))
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._model = GlobalModel(self.service.rounds.lora)
            while (item := self._queue.get()) is not None:
                rnd, adapters, assignment = item
                self.curves[rnd] = self.score(adapters, assignment, self.cfg.eval_samples, self.cfg.eval_steps)
        except BaseException as exc:  # surfaced by drain(): a dead evaluator must not look like a slow one
            log.exception("round evaluation failed")
            self._error = exc

    def score(self, adapters, assignment, samples: int, steps: int) -> dict:
        """Quality per true style of what each device gets (its cluster's adapter), on held-out prompts.

        Every style is judged on ``samples`` images however its devices are spread over
        clusters, so the Fréchet distance (which depends on sample count) compares fairly
        across methods that cluster differently.
        """
        def model_of(cid):
            self._model.set_cluster(cid, adapters[cid], 0)
            set_mix(self._model.unet, {adapter_name(cid): 1.0})
            return self._model.unet

        # the evaluator's own model: only its thread uses it (and the caller of the final score,
        # after drain() joined that thread), so no lock is needed around set + sample
        return score_styles(model_of, {d: c for d, c in assignment.items() if c in adapters}, self.persona_of,
                            samples, self.cfg.seed, steps)

    def drain(self, timeout: float = 600) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError("round evaluation failed") from self._error
        if self._thread.is_alive():
            raise TimeoutError(f"round evaluation still running after {timeout} s")


def run_federation(cfg: FleetConfig, aggregator: dict | None = None, progress: bool = True) -> FederationResult:
    """Run one federation end to end and return what happened, measured."""
    from aggregator.broker import ensure_broker

    started = time.monotonic()
    broker = ensure_broker(cfg.mqtt_url)
    root = Path(cfg.state_dir) if cfg.state_dir else Path(tempfile.mkdtemp(prefix="fedaigc-fleet-"))
    root.mkdir(parents=True, exist_ok=True)
    personas = cfg.personas()
    agg_cfg = AggregatorConfig(**({
        "aggregator_id": f"agg-{uuid.uuid4().hex[:6]}", "mqtt_url": cfg.mqtt_url,
        "mqtt_topic_prefix": cfg.topic_prefix, "state_dir": root / "aggregator",
        "expected_devices": cfg.devices, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
        "round_timeout_s": cfg.round_timeout_s, "seed": cfg.seed,
    } | (aggregator or {})))
    service = AggregatorService(agg_cfg)
    fleet = Fleet(cfg, root / "devices")
    persona_of = dict(zip(fleet.ids, personas))
    evaluator = RoundEvaluator(service, cfg, persona_of).start()
    text_assignment: dict[str, int] = {}
    service.rounds.events.formed.append(text_assignment.update)
    round_times: list[float] = []
    try:
        service.start()
        fleet.start(service)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.rounds, desc=f"federation ({cfg.devices} devices)", unit="round")
        last, last_t = 0, time.monotonic()
        while not service.done.wait(0.5):
            rnd = service.current_round() - 1 if not service.done.is_set() else cfg.rounds
            if rnd > last:
                round_times += [time.monotonic() - last_t] * (rnd - last)
                last_t = time.monotonic()
                if bar is not None:
                    bar.update(rnd - last)
                last = rnd
            if not any(p.is_alive() for p in fleet.procs) and fleet.procs:
                raise RuntimeError("all device processes died; see their logs")
        if cfg.rounds > last:
            round_times += [time.monotonic() - last_t] * (cfg.rounds - last)
            if bar is not None:
                bar.update(cfg.rounds - last)
        if bar is not None:
            bar.close()
        fleet.collect(timeout=600)
        evaluator.drain()
        final_adapters = {cid: service.rounds.cluster_adapter(cid)[0] for cid in service.store.clusters()}
        final = evaluator.score(final_adapters, dict(service.membership.assignment), cfg.final_eval_samples, 20)
        losses = {}
        for rnd, cid, summary in service.store.round_summaries():
            losses.setdefault(rnd, []).append((summary.get("samples", 0), summary.get("loss", 0.0)))
        result = FederationResult(
            config=asdict(cfg) | {"aggregator": {k: str(v) for k, v in (aggregator or {}).items()}},
            seconds=time.monotonic() - started,
            curves=evaluator.curves, final=final, assignment=dict(service.membership.assignment),
            true_style={d: p.style for d, p in persona_of.items()}, text_assignment=text_assignment,
            devices=fleet.reports, traffic=service.telemetry.traffic, refusals=service.refusals.counts(),
            round_seconds=round_times,
            losses={r: sum(n * lo for n, lo in v) / max(1, sum(n for n, _ in v)) for r, v in losses.items()},
            adapters=final_adapters,
        )
        return result
    finally:
        service.stop()
        fleet.stop()
        if broker is not None:
            broker.close()
        if cfg.state_dir is None:
            shutil.rmtree(root, ignore_errors=True)

