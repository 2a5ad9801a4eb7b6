"""The paper's comparison on styled digits, over the real protocol path.

    python -m benchmarks.federation [--quick | --smoke] [--out DIR]      (or: fedaigc bench federation)

Methods, same personas, seeds, rounds and local steps:

* ``local``      - every device trains alone (nothing crosses the broker);
* ``fedavg``     - one shared LoRA for everyone, factors averaged (FedIT-style);
* ``ifca``       - k adapters, each device trains the one with the lowest local loss
                   (Ghosh et al., 2020), k = the true number of styles;
* ``ours_intra`` - task clustering from sealed, noised task vectors + CFL refinement,
                   exact ΔW aggregation, no inter-cluster interaction;
* ``ours``       - the same plus inter-cluster knowledge interaction: gated mixing and the
                   global component by shrinkage (``global_shrinkage``; the product's default
                   leaves shrinkage off, and its gate lets no different style lend, so the
                   default equals ``ours_intra`` here);
* ``central``    - one adapter per style on the pooled data of its devices, with the same
                   number of optimizer steps per round as that style's devices together.

Federated methods run as real fleets (device worker processes, aggregator, broker);
bytes are MQTT payload bytes counted by the aggregator. Quality is judged per true style
on the devices' held-out prompts with the adapter each device would use. Sizes fit the
60-minute budget on 2 cores: 12 devices over 4 styles with groups of 4/3/3/2, 16x16
images, rank-2 LoRA. Writes benchmarks/results/federation.json and federation*.png (and, while it
runs, federation.partial.json with every finished method).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.global_model import GlobalModel, adapter_name  # noqa: E402
from aggregator.simulation.fleet import FleetConfig, run_federation, score_styles  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from models.digits.backend import DigitsBackend  # noqa: E402
from models.lora import add_adapter, get_adapter_state, lora_config, set_mix  # noqa: E402
from models.training import LORA_LR, TrainConfig, train_adapters  # noqa: E402

FEDERATED = {
    "fedavg": {"clustering": "single", "rule": "fedavg", "interaction": False, "clip": None},
    "ifca": {"clustering": "ifca", "rule": "fedavg", "interaction": False, "clip": None},
    "ours_intra": {"clustering": "tasks", "rule": "exact", "interaction": False},
    # the full method, global shrinkage included (off in the product's defaults: see README)
    "ours": {"clustering": "tasks", "rule": "exact", "interaction": True, "global_shrinkage": True},
}
METHODS = ("local", "fedavg", "ifca", "ours_intra", "ours", "central")
# a fleet is slow to start even at smoke size (its device processes load torch and the model): the smoke
# runs the baseline and the full method as fleets, and checks every method's settings (check_methods)
SMOKE_METHODS = ("local", "fedavg", "ours", "central")


def in_process(cfg: FleetConfig, pooled: bool) -> dict:
    """``local`` (one adapter per device) or ``central`` (one per style, pooled data), per round."""
    personas = cfg.personas()
    ids = [f"d{i}" for i in range(len(personas))]
    persona_of = dict(zip(ids, personas))
    groups = {d: (p.style if pooled else d) for d, p in persona_of.items()}
    backend = DigitsBackend.from_pretrained()
    unet = backend.denoiser
    unet.requires_grad_(False)
    data = {}
    for g in sorted(set(groups.values())):
        members = [persona_of[d] for d in ids if groups[d] == g]
        add_adapter(unet, f"g-{g}", lora_config(), seed=cfg.seed)
        samples = backend.encode_images(torch.cat([p.train_images for p in members]))
        enc = backend.encode_prompts([q for p in members for q in p.train_prompts])
        data[g] = (samples, enc, len(members))
    model = GlobalModel(lora_config())
    index = {g: i for i, g in enumerate(sorted(set(groups.values())))}

    def model_of(g):
        set_mix(model.unet, {adapter_name(index[g]): 1.0})
        return model.unet

    curves = {}
    for rnd in tqdm(range(0, cfg.rounds + 1), desc="central" if pooled else "local", leave=False):
        for g, (samples, enc, n) in data.items():
            name = f"g-{g}"
            if rnd > 0:
                set_mix(unet, {name: 1.0})
                train_adapters(backend, [name], samples, enc, TrainConfig(steps=cfg.local_steps * n, batch_size=16,
                                                                           lr=LORA_LR, seed=cfg.seed + rnd))
            model.set_cluster(index[g], get_adapter_state(unet, name), rnd)
        curves[rnd] = score_styles(model_of, groups, persona_of, cfg.eval_samples, cfg.seed, cfg.eval_steps)
    return {"curves": curves, "traffic": {}, "ari": None, "ari_text": None, "seconds": None}


def aggregator_overrides(method: str, cfg: FleetConfig) -> dict:
    overrides = dict(FEDERATED[method])
    if method == "ifca":
        overrides["k"] = cfg.styles
    return overrides


def check_aggregator_settings(overrides) -> None:
    """Build an ``AggregatorConfig`` from each overrides dict: a renamed or refused setting fails here, at
    start-up (also in a smoke run that skips its fleet), not hours into a run."""
    from aggregator.config import AggregatorConfig

    for o in overrides:
        AggregatorConfig(**o)


def check_methods(methods: list[str], cfg: FleetConfig) -> None:
    """Refuse unknown methods, and every method's settings the aggregator would refuse, before any fleet starts."""
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    check_aggregator_settings(aggregator_overrides(m, cfg) for m in FEDERATED)


def run_method(method: str, cfg: FleetConfig) -> dict:
    started = time.monotonic()
    if method in ("local", "central"):
        out = in_process(cfg, pooled=method == "central")
        out["seconds"] = time.monotonic() - started
        return out
    result = run_federation(cfg, aggregator=aggregator_overrides(method, cfg), progress=False)
    # round 0 is the starting point; the final adapters are evaluated with the per-round budget too
    curves = {r: c for r, c in result.curves.items()}
    return {"curves": curves, "traffic": {str(r): v for r, v in result.traffic.items()},
            "ari": result.ari("final"), "ari_text": result.ari("text") if result.text_assignment else None,
            "seconds": time.monotonic() - started, "refusals": result.refusals}


def mean_over_styles(curve_round: dict, key: str) -> float:
    return float(np.mean([m[key] for m in curve_round["styles"].values()]))


def cumulative_bytes(run: dict, rounds: int) -> list[int]:
    per_round = [sum(v["up"] + v["down"] for v in run["traffic"].get(str(r), {}).values()) for r in range(rounds + 1)]
    return list(np.cumsum(per_round))


def rounds_to(run: dict, target: float) -> int | None:
    for r in sorted(run["curves"], key=int):
        if int(r) > 0 and mean_over_styles(run["curves"][r], "style_acc") >= target:
            return int(r)
    return None


def final_quality(runs: dict, cfg: FleetConfig, seeds: list[int], stat) -> dict:
    """``stat`` (mean or sd) over seeds of each method's last-round quality, averaged over styles."""
    return {m: {k: float(stat([mean_over_styles(runs[m][s]["curves"][cfg.rounds], k) for s in seeds]))
                for k in ("style_acc", "digit_acc", "frechet")} for m in runs}


def rounds_summary(runs: dict, cfg: FleetConfig, seeds: list[int], final: dict) -> dict:
    """Rounds each method needs to reach 90% of central's style accuracy; ours against FedAvg."""
    target = 0.9 * final["central"]["style_acc"]
    needed = {m: [rounds_to(runs[m][s], target) for s in seeds] for m in runs}

    def mean_rounds(m):
        return float(np.mean([r if r is not None else math.inf for r in needed[m]]))

    ours_r, fedavg_r = mean_rounds("ours"), mean_rounds("fedavg")
    return {"target_style_acc": target, "rounds_to_target": needed,
            "rounds_ratio_vs_fedavg": (ours_r / fedavg_r) if math.isfinite(fedavg_r) else None,
            "rounds_ratio_note": None if math.isfinite(fedavg_r) else
            f"fedavg did not reach the target within {cfg.rounds} rounds in every seed; ours needed {ours_r} rounds"}


def frechet_ratio_vs_central(runs: dict, cfg: FleetConfig, seeds: list[int]) -> float:
    last = lambda m, s: runs[m][s]["curves"][cfg.rounds]["styles"]  # noqa: E731
    return float(np.mean([np.mean([last("ours", s)[st]["frechet"] / last("central", s)[st]["frechet"]
                                   for st in last("ours", s)]) for s in seeds]))


def small_cluster_summary(runs: dict, cfg: FleetConfig, seeds: list[int], style: str) -> dict:
    """What inter-cluster interaction (ours against ours_intra) does for the smallest cluster's style."""
    def small(m, s, key):
        return runs[m][s]["curves"][cfg.rounds]["styles"][style][key]

    gain = {k: [small("ours", s, k) - small("ours_intra", s, k) for s in seeds] for k in ("style_acc", "digit_acc")}
    frechet = [small("ours", s, "frechet") / small("ours_intra", s, "frechet") for s in seeds]
    return {"small_cluster_style": style, "small_cluster_gain": float(np.mean(gain["style_acc"])),
            "small_cluster_gain_per_seed": gain["style_acc"],
            "small_cluster_digit_gain": float(np.mean(gain["digit_acc"])),
            "small_cluster_frechet_ratio": float(np.mean(frechet)), "small_cluster_frechet_ratio_per_seed": frechet}


def summarize(runs: dict, cfg: FleetConfig, smallest_style: str) -> dict:
    """The comparison's figures. Each needs certain methods and is left out when one of them did not run
    (``--methods`` chose a subset, or a smoke run)."""
    seeds = sorted({s for m in runs.values() for s in m})
    ran = set(runs)
    out: dict = {"final": final_quality(runs, cfg, seeds, np.mean), "final_sd": final_quality(runs, cfg, seeds, np.std)}
    if {"central", "ours", "fedavg"} <= ran:
        out |= rounds_summary(runs, cfg, seeds, out["final"])
    if {"central", "ours"} <= ran:
        out["frechet_ratio_vs_central"] = frechet_ratio_vs_central(runs, cfg, seeds)
    if "ours" in ran:
        out["ari"] = float(np.mean([runs["ours"][s]["ari"] for s in seeds]))
        out["ari_text_only"] = float(np.mean([runs["ours"][s]["ari_text"] for s in seeds]))
    if {"ours", "ours_intra"} <= ran:
        out |= small_cluster_summary(runs, cfg, seeds, smallest_style)
    out["bytes_total"] = {m: float(np.mean([cumulative_bytes(runs[m][s], cfg.rounds)[-1] for s in seeds]))
                          for m in runs}
    return out


def plot(runs: dict, cfg: FleetConfig, out: Output) -> None:
    seeds = sorted({s for m in runs.values() for s in m})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for m in METHODS:
        if m not in runs:
            continue
        for ax, key in zip(axes, ("style_acc", "digit_acc", "frechet")):
            rounds = list(range(cfg.rounds + 1))
            vals = np.array([[mean_over_styles(runs[m][s]["curves"][r], key) for r in rounds] for s in seeds])
            mu, sd = vals.mean(0), vals.std(0)
            ax.plot(rounds, mu, marker="o", ms=3, label=m)
            ax.fill_between(rounds, mu - sd, mu + sd, alpha=0.15)
    axes[0].set(xlabel="round", ylabel="style accuracy", ylim=(0, 1))
    axes[1].set(xlabel="round", ylabel="digit accuracy", ylim=(0, 1))
    axes[2].set(xlabel="round", ylabel="Fréchet distance", yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{cfg.devices} devices, {cfg.styles} styles, {len(seeds)} seeds (mean ± sd)", fontsize=9)
    out.save_figure(fig, "rounds")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in ("fedavg", "ifca", "ours_intra", "ours"):
        if m not in runs:
            continue
        rounds = list(range(cfg.rounds + 1))
        xb = np.mean([cumulative_bytes(runs[m][s], cfg.rounds) for s in seeds], axis=0) / 1e6
        yq = np.mean([[mean_over_styles(runs[m][s]["curves"][r], "style_acc") for r in rounds] for s in seeds], axis=0)
        ax.plot(xb, yq, marker="o", ms=3, label=m)
    ax.set(xlabel="uplink + downlink MB (cumulative)", ylabel="style accuracy", ylim=(0, 1),
           title="quality vs bytes on the wire")
    ax.legend(fontsize=7)
    out.save_figure(fig, "bytes")


# the short fleets, shared with benchmarks/comm.py (mqtt_url and rounds/steps of full runs come from the command line)
SMOKE_FLEET = {"devices": 2, "styles": 2, "sizes": (1, 1), "rounds": 1, "local_steps": 1, "eval_samples": 2,
               "eval_steps": 2, "final_eval_samples": 2, "processes": 1, "task_noise": 0.3}
QUICK_FLEET = {"devices": 8, "styles": 4, "sizes": (3, 2, 2, 1), "rounds": 3, "local_steps": 10, "eval_samples": 24,
               "eval_steps": 8, "task_noise": 0.3}


def fleet_config(args: argparse.Namespace) -> tuple[FleetConfig, list[int]]:
    """The fleet and seeds of a full, ``--quick`` or ``--smoke`` run."""
    if args.smoke or args.quick:
        return FleetConfig(**(SMOKE_FLEET if args.smoke else QUICK_FLEET), mqtt_url=args.mqtt_url), [0]
    return FleetConfig(devices=12, styles=4, sizes=(4, 3, 3, 2), rounds=args.rounds, local_steps=args.local_steps,
                       eval_samples=32, eval_steps=8, mqtt_url=args.mqtt_url, task_noise=0.3), list(range(args.seeds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 devices, 3 rounds (<= 5 min)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} "
                                                           f"(default all; --smoke: {','.join(SMOKE_METHODS)})")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Output.of(parser, args, "federation")
    cfg, seeds = fleet_config(args)
    methods = [m for m in (args.methods or ",".join(SMOKE_METHODS if args.smoke else METHODS)).split(",") if m]
    check_methods(methods, cfg)
    smallest = cfg.personas()[-1].style
    started = time.monotonic()
    runs: dict = {m: {} for m in methods}

    def recorded() -> dict:
        return {"config": {k: str(v) for k, v in cfg.__dict__.items()},
                "methods": {m: {str(s): r for s, r in per.items()} for m, per in runs.items()}}

    for seed in seeds:
        for m in methods:
            c = FleetConfig(**{**cfg.__dict__, "seed": seed})
            runs[m][seed] = run_method(m, c)
            out.write(recorded(), partial=True)  # a run of this benchmark takes hours: keep every finished method
            r = runs[m][seed]
            print(f"seed {seed} {m}: final style acc {mean_over_styles(r['curves'][cfg.rounds], 'style_acc'):.3f}, "
                  f"Fréchet {mean_over_styles(r['curves'][cfg.rounds], 'frechet'):.0f}, "
                  f"{(r['seconds'] or 0):.0f} s", flush=True)
    result = recorded() | {"seeds": seeds, "seconds": time.monotonic() - started} | summarize(runs, cfg, smallest)
    out.write(result)
    plot(runs, cfg, out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("methods", "config")}, indent=2, default=str))


if __name__ == "__main__":
    main()
