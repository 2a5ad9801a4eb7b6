"""Which part of the adapter stays on the device? Measured on styled digits.

    python -m benchmarks.personalization [--quick | --smoke] [--modes none,dual] [--out DIR]

Same personas, clusters (the true styles, to isolate the question), rounds, local steps
and seeds for every mode; the rounds run in-process with the production pieces
(``EdgeClient.train_round`` on an int8 base, ``ExactLoraAggregation``), only the broker is
left out. Modes:

* ``none``  - one shared adapter per cluster, nothing personal;
* ``dual``  - a shared adapter (aggregated) plus a rank-1 personal adapter (never leaves
  the device), trained jointly;
* ``residual`` - the shared adapter trains alone for the round's steps, then the personal
  adapter trains for half as many on top of it (shared frozen): it can only fit what the
  cluster adapter leaves unexplained.

Reports, per mode and round: the cluster adapters' quality (what the global model and
other members get) and each device's own quality (shared + personal, its test prompts).
Writes benchmarks/results/personalization.json and personalization.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.rules import ClientUpdate, ExactLoraAggregation  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk import PERSONAL, SHARED, DeviceConfig, EdgeClient, LocalData  # noqa: E402
from models.digits.data import make_personas  # noqa: E402
from models.digits.evaluate import evaluate_personas  # noqa: E402
from models.lora import adapter_names, get_adapter_state, lora_config, set_mix  # noqa: E402

MODES = ("none", "dual", "residual")


def run_mode(mode: str, devices: int, styles: int, rounds: int, steps: int, seed: int, samples: int) -> dict:
    personas = make_personas(devices, styles, seed=seed)
    rule = ExactLoraAggregation()
    spec = lora_config()
    with tempfile.TemporaryDirectory() as tmp:
        clients = [EdgeClient(DeviceConfig(data_dir=Path(tmp) / str(i), profile="simulator", personalization=mode,
                                           seed=seed + i)) for i in range(devices)]
        init = get_adapter_state(clients[0].unet, SHARED)
        cluster_adapter = {s: init for s in {p.style for p in personas}}
        curve = []
        for rnd in tqdm(range(1, rounds + 1), desc=f"{mode} seed {seed}", leave=False):
            updates: dict[str, list] = {}
            for i, (c, p) in enumerate(zip(clients, personas)):
                u = c.train_round(cluster_adapter[p.style], LocalData.from_persona(p), steps=steps, version=rnd)
                updates.setdefault(p.style, []).append(ClientUpdate.from_delta(str(i), cluster_adapter[p.style],
                                                                               u.delta, u.samples))
            cluster_adapter = {s: rule.aggregate(cluster_adapter[s], ups, spec).adapter for s, ups in updates.items()}
            curve.append(evaluate(clients, personas, cluster_adapter, seed, samples))
    return {"mode": mode, "seed": seed, "curve": curve}


def evaluate(clients, personas, cluster_adapter, seed: int, samples: int) -> dict:
    """Cluster adapters alone (on the first client's model) and each device's own mix."""
    probe = clients[0]  # its personal adapter is switched off while it scores the cluster adapters
    cluster_scores = []
    for style, adapter in cluster_adapter.items():
        probe.install_shared(adapter, 0)
        set_mix(probe.unet, {SHARED: 1.0})
        cluster_scores.append(evaluate_personas(probe.unet, [p for p in personas if p.style == style],
                                                samples=samples, seed=seed, steps=10))
    device_scores = []
    for c, p in zip(clients, personas):
        c.install_shared(cluster_adapter[p.style], 0)
        mix = {SHARED: 1.0} | ({PERSONAL: 1.0} if PERSONAL in adapter_names(c.unet) else {})
        set_mix(c.unet, mix)
        device_scores.append(evaluate_personas(c.unet, [p], samples=max(8, samples // 4), seed=seed, steps=10))
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {"cluster_style_acc": mean(cluster_scores, "style_acc"), "cluster_digit_acc": mean(cluster_scores, "digit_acc"),
            "cluster_frechet": mean(cluster_scores, "frechet"), "device_style_acc": mean(device_scores, "style_acc"),
            "device_digit_acc": mean(device_scores, "digit_acc"), "device_frechet": mean(device_scores, "frechet")}


def kept_runs(previous: dict | None, todo: list[str], settings: dict) -> tuple[list[dict], float]:
    """The earlier result's runs of the modes not run now, if it was measured with the same settings."""
    if previous is None or set(todo) == set(MODES) or any(previous.get(k) != v for k, v in settings.items()):
        return [], 0.0
    return [r for r in previous["runs"] if r["mode"] not in todo], previous.get("seconds", 0.0)


def plot(runs: list[dict], seeds: list[int], out: Output) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for mode, color in zip(MODES, ("tab:blue", "tab:orange", "tab:green")):
        for r in (r for r in runs if r["mode"] == mode):
            xs = range(1, len(r["curve"]) + 1)
            axes[0].plot(xs, [c["cluster_style_acc"] for c in r["curve"]], color=color, alpha=0.7,
                         label=mode if r["seed"] == seeds[0] else None)
            axes[1].plot(xs, [c["device_style_acc"] for c in r["curve"]], color=color, alpha=0.7,
                         label=mode if r["seed"] == seeds[0] else None)
    axes[0].set(xlabel="round", ylabel="style accuracy", title="cluster adapter (global model)", ylim=(0, 1))
    axes[1].set(xlabel="round", ylabel="style accuracy", title="device (shared + personal)", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--styles", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="modes to run; the others' runs are kept from the existing results if their "
                             "settings match (so a new mode can be added without rerunning the rest)")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "personalization")
    seeds = [0] if args.quick or args.smoke else [0, 1]
    devices, styles, rounds, steps, samples = (2, 1, 1, 1, 4) if args.smoke else (
        args.devices, args.styles, 3 if args.quick else args.rounds, args.steps, 32)
    todo = [m for m in args.modes.split(",") if m]
    if unknown := set(todo) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    settings = {"devices": devices, "styles": styles, "rounds": rounds, "local_steps": steps, "seeds": seeds}
    previous = out.previous()
    kept, seconds = kept_runs(previous, todo, settings)
    started = time.monotonic()
    runs = kept + [run_mode(mode, devices, styles, rounds, steps, seed, samples) for seed in seeds for mode in todo]
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    final = {m: {k: float(np.mean([r["curve"][-1][k] for r in runs if r["mode"] == m])) for k in runs[0]["curve"][-1]}
             for m in modes}
    result = settings | {"runs": runs, "final": final, "seconds": seconds + time.monotonic() - started}
    out.write(result, kept_from=previous if kept else None)
    plot(runs, seeds, out)
    print(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
