"""Devices of different strength in one cluster: a mixed-rank fleet against uniform-rank fleets.

    python -m benchmarks.ranks [--smoke] [--out DIR]

Every cluster holds four devices of one style, at LoRA ranks 1, 2, 4 and 8 in the ``mixed``
fleet (the fleet's maximum 8: each device gets its cluster's adapter split to its rank, the
product's default SVD split, and its update comes back zero-padded, ``RankShares``), and all at
rank 2 (``uniform2``) or all at rank 8 (``uniform8``) in the others. Same personas (few images,
prompts for unseen digits), groups (the true styles, to isolate ranks from clustering), rounds
and seeds for every fleet, run in one process over the product's code
(``benchmarks._inprocess``: ``EdgeClient.train_round``, the exact rule, the downlink mirror).

Each device is judged on what it holds (its cluster's adapter at its rank) with the joint-accuracy
scorer, on its held-out prompts (seen) and prompts for digits it never had (unseen), per rank
class: ``low`` (the devices at ranks 1 and 2 in the mixed fleet) and ``rank8``. The uniform
fleets are scored on the same devices. Result keys: ``mixed_low_rank_vs_uniform2`` (unseen joint
accuracy of the low-rank devices, mixed over uniform rank 2) and ``mixed_rank8_vs_uniform8``;
also Fréchet, uplink bytes per device and round by rank, and the training-memory estimate per
profile and rank. Writes benchmarks/results/ranks.json and ranks.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.simulation.fleet import FleetConfig  # noqa: E402
from benchmarks._inprocess import (  # noqa: E402
    InProcessFederation,
    Scorer,
    Variant,
    seen_and_unseen_scorer,
    true_style_groups,
)
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk.config import PROFILES  # noqa: E402
from edge_sdk.memory import estimate_training_bytes  # noqa: E402
from edge_sdk.quantize import quantize_base  # noqa: E402
from models.digits.backend import DigitsBackend  # noqa: E402
from models.digits.data import make_personas  # noqa: E402
from models.lora import add_adapter, delete_adapter, lora_config  # noqa: E402
from models.lora_ranks import lora_at_rank  # noqa: E402

RANKS = (1, 2, 4, 8)           # the devices of each cluster, in the mixed fleet
FLEETS = {"mixed": RANKS, "uniform2": (2,) * len(RANKS), "uniform8": (8,) * len(RANKS)}
CLASSES = {"low": (1, 2), "rank8": (8,)}  # devices by the rank they have in the mixed fleet
KINDS = ("unseen", "seen")
METRICS = ("joint_acc", "frechet")


@dataclass(frozen=True)
class Setup:
    styles: int = 3
    images: int = 8
    classes_per_device: int = 3
    held_out: int = 6
    unseen: int = 12
    rounds: int = 3
    local_steps: int = 10
    seeds: int = 3
    eval_samples: int = 24     # images per style, rank class and kind
    eval_steps: int = 8

    def fleet(self, seed: int) -> FleetConfig:
        return FleetConfig(devices=len(RANKS) * self.styles, styles=self.styles, sizes=(len(RANKS),) * self.styles,
                           rounds=self.rounds, local_steps=self.local_steps, eval_samples=self.eval_samples,
                           eval_steps=self.eval_steps, seed=seed)

    def personas(self, seed: int) -> list:
        return make_personas(len(RANKS) * self.styles, self.styles, seed=seed, sizes=(len(RANKS),) * self.styles,
                             images_per_client=self.images, classes_per_client=self.classes_per_device,
                             held_out=self.held_out, unseen=self.unseen)


SMOKE = Setup(styles=1, images=4, held_out=2, unseen=2, rounds=1, local_steps=1, seeds=1, eval_samples=2, eval_steps=2)


def positions(personas: list) -> tuple[int, ...]:
    """Each device's rank in the mixed fleet: 1, 2, 4, 8 over each style's devices in turn."""
    seen: dict[str, int] = {}
    ranks = []
    for p in personas:
        ranks.append(RANKS[seen.get(p.style, 0) % len(RANKS)])
        seen[p.style] = seen.get(p.style, 0) + 1
    return tuple(ranks)


def rank_class_scorer(cfg: FleetConfig, position: dict[str, int]) -> Scorer:
    """The joint-accuracy scorer, once per rank class, on that class's devices only."""
    inner = seen_and_unseen_scorer(cfg)
    return lambda model_of, groups, persona_of: {
        cls: inner(model_of, {d: g for d, g in groups.items() if position[d] in ranks}, persona_of)
        for cls, ranks in CLASSES.items()}


def run_fleet(setup: Setup, fleet: str, seed: int) -> dict:
    cfg = setup.fleet(seed)
    personas = setup.personas(seed)
    ids = [f"d{i}" for i in range(len(personas))]
    position = dict(zip(ids, positions(personas)))
    ranks = tuple(FLEETS[fleet][RANKS.index(position[d])] for d in ids)
    variant = Variant(fleet, method="ours_intra", rank=max(ranks), device_ranks=ranks)
    out = InProcessFederation(cfg, variant, personas, groups=true_style_groups(dict(zip(ids, personas))),
                              scorer=rank_class_scorer(cfg, position), eval_rounds=[cfg.rounds]).run()
    scores = out["curves"][cfg.rounds]
    per_class = {cls: {kind: {m: float(np.mean([s[m] for s in scores[cls][kind]["styles"].values()]))
                              for m in METRICS} for kind in KINDS} for cls in CLASSES}
    up = {str(r): float(np.mean([out["uplink_bytes"][d] for d, dr in zip(ids, ranks) if dr == r])) / cfg.rounds
          for r in sorted(set(ranks))}
    return {"fleet": fleet, "seed": seed, "scores": per_class, "uplink_bytes_per_round": up}


def training_memory_mb(fleet_rank: int = max(RANKS)) -> dict[str, dict[str, float]]:
    """``estimate_training_bytes`` of the bundled model per profile (its batch size and base precision) and rank."""
    out: dict[str, dict[str, float]] = {}
    backends = {}
    for quantization in {p.quantization for p in PROFILES.values()}:
        backend = DigitsBackend.from_pretrained()
        backend.denoiser.requires_grad_(False)
        if quantization == "int8":
            quantize_base(backend.denoiser)
        backends[quantization] = backend
    fleet = lora_config(fleet_rank)
    for rank in RANKS:
        for quantization, backend in backends.items():
            add_adapter(backend.denoiser, "shared", lora_at_rank(fleet, rank))
            for name, profile in PROFILES.items():
                if profile.quantization == quantization:
                    out.setdefault(name, {})[str(rank)] = estimate_training_bytes(backend, profile.batch_size) / 2**20
            delete_adapter(backend.denoiser, "shared")
    return out


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(runs: list[dict]) -> dict:
    return {fleet: {cls: {kind: {m: float(np.mean([r["scores"][cls][kind][m] for r in runs if r["fleet"] == fleet]))
                                 for m in METRICS} for kind in KINDS} for cls in CLASSES} for fleet in FLEETS}


def plot(summary: dict, out: Output) -> None:
    """Joint accuracy per rank class and fleet, unseen and seen prompts."""
    fig, axes = plt.subplots(1, len(KINDS), figsize=(9, 3.3), sharey=True)
    width = 0.8 / len(FLEETS)
    for ax, kind in zip(axes, KINDS):
        for i, fleet in enumerate(FLEETS):
            ax.bar(np.arange(len(CLASSES)) + i * width, [summary[fleet][c][kind]["joint_acc"] for c in CLASSES],
                   width, label=fleet)
        ax.set_xticks(np.arange(len(CLASSES)) + width * (len(FLEETS) - 1) / 2,
                      [f"{c} ({'/'.join(map(str, r))} in mixed)" for c, r in CLASSES.items()])
        ax.set(title=f"{kind} prompts", ylabel="joint accuracy", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "ranks")
    setup = SMOKE if args.smoke else Setup()
    started = time.monotonic()
    jobs = [(fleet, seed) for seed in range(setup.seeds) for fleet in FLEETS]
    runs = [run_fleet(setup, fleet, seed) for fleet, seed in tqdm(jobs, desc="ranks")]
    summary = summarize(runs)
    joint = {f: {cls: summary[f][cls]["unseen"]["joint_acc"] for cls in CLASSES} for f in FLEETS}
    seen = {f: {cls: summary[f][cls]["seen"]["joint_acc"] for cls in CLASSES} for f in FLEETS}
    result = {
        "setup": asdict(setup), "ranks": list(RANKS), "runs": runs, "summary": summary,
        "mixed_low_rank_vs_uniform2": ratio(joint["mixed"]["low"], joint["uniform2"]["low"]),
        "mixed_rank8_vs_uniform8": ratio(joint["mixed"]["rank8"], joint["uniform8"]["rank8"]),
        "seen": {"mixed_low_rank_vs_uniform2": ratio(seen["mixed"]["low"], seen["uniform2"]["low"]),
                 "mixed_rank8_vs_uniform8": ratio(seen["mixed"]["rank8"], seen["uniform8"]["rank8"])},
        "bytes_per_device_round": {f: {str(r): float(np.mean([run["uplink_bytes_per_round"][str(r)] for run in runs
                                                              if run["fleet"] == f]))
                                       for r in sorted(set(FLEETS[f]))} for f in FLEETS},
        "training_memory_mb": training_memory_mb(),
        "seconds": time.monotonic() - started,
    }
    out.write(result)
    plot(summary, out)
    print(json.dumps({k: result[k] for k in ("mixed_low_rank_vs_uniform2", "mixed_rank8_vs_uniform8", "seen")},
                     indent=2))


if __name__ == "__main__":
    main()
