"""Does federation beat a device training alone? The data-scarcity sweep, and the fleet comparison.

    python -m benchmarks.federation [--quick | --smoke] [--images 4,8,16] [--seeds N] [--workers 2] [--out DIR]
    python -m benchmarks.federation --fleet [--quick | --smoke] [--out DIR]      (or: fedaigc bench federation)

The default is the sweep of ``benchmarks/_scarcity.py``: images per device 4/8/16/32/80, 5 seeds
at <= 16 images and 3 above, every method in one process over the product's code, each device
judged on seen and unseen prompts by joint accuracy and Fréchet distance; the headline is the
scarcest setting. Writes benchmarks/results/federation.json and federation*.png.

``--fleet`` runs the methods as real fleets over the real protocol path instead (device worker
processes, aggregator, broker; bytes are MQTT payload bytes counted by the aggregator), scored on
the personas' held-out prompts per true style (benchmarks/results/federation_fleet.json):

* ``local``      - every device trains alone (nothing crosses the broker);
* ``fedavg``     - one shared LoRA for everyone, factors averaged (FedIT-style);
* ``ifca``       - k adapters, each device trains the one with the lowest local loss
                   (Ghosh et al., 2020), k = the true number of styles;
* ``ours_intra`` - task clustering from sealed, noised task vectors + CFL refinement,
                   exact ΔW aggregation, no inter-cluster interaction;
* ``ours``       - the same plus inter-cluster interaction as the product offers it
                   (``interaction = true``: ΔW-gated mixing, global shrinkage off);
* ``central``    - one adapter per style on the pooled data of its devices, with the same
                   number of optimizer steps per round as that style's devices together.

The full fleet run is 12 devices over 4 styles in groups of 4/3/3/2, 16x16 images, rank-2
LoRA, 3 seeds (about an hour on 2 cores); ``--quick`` is 8 devices, 3 rounds, 1 seed.
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

from aggregator.simulation.fleet import FleetConfig, run_federation  # noqa: E402
from benchmarks import _scarcity as scarcity  # noqa: E402
from benchmarks._inprocess import FEDERATED, run_alone  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402

METHODS = scarcity.METHODS
# a fleet is slow to start even at smoke size (its device processes load torch and the model): the smoke
# runs the baseline and the full method as fleets, and checks every method's settings (check_methods)
SMOKE_METHODS = ("local", "fedavg", "ours", "central")


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
        out = run_alone(cfg, pooled=method == "central")
        out |= {"traffic": {}, "ari": None, "ari_text": None, "seconds": time.monotonic() - started}
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
                       eval_samples=32, eval_steps=8, mqtt_url=args.mqtt_url,
                       task_noise=0.3), list(range(args.seeds or 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", action="store_true",
                        help="run the methods as real fleets over the broker instead of the in-process sweep")
    parser.add_argument("--quick", action="store_true",
                        help="sweep: 4 and 16 images, 1 seed, the interaction fleet once (about 10 min); "
                             "fleet: 1 seed, 8 devices, 3 rounds")
    parser.add_argument("--images", default=None,
                        help="sweep: comma-separated images per device (default 4,8,16,32,80)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="sweep: seeds per setting (default 5 at <= 16 images, 3 above); fleet: default 3")
    parser.add_argument("--workers", type=int, default=2, help="sweep: worker processes (default 2)")
    parser.add_argument("--resume", action="store_true",
                        help="sweep: reuse the runs of an earlier partial or finished result at --out that ran "
                             "under the same settings (a --quick result's runs are all part of the default's)")
    parser.add_argument("--report-only", action="store_true",
                        help="sweep: run nothing; write the result and plots from the runs recorded at --out (a "
                             "sweep stopped early: each setting with the seeds that every method finished)")
    parser.add_argument("--rounds", type=int, default=6, help="fleet: rounds (default 6)")
    parser.add_argument("--local-steps", type=int, default=12, help="fleet: local steps per round (default 12)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} "
                                                           f"(default all; fleet --smoke: {','.join(SMOKE_METHODS)})")
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="fleet: the broker")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.fleet:
        return run_fleets(args, Output.of(parser, args, "federation_fleet"))
    out = Output.of(parser, args, "federation")
    sweep = scarcity.sized(scarcity.SMOKE if args.smoke else scarcity.QUICK if args.quick else scarcity.Sweep(),
                           args.images, args.seeds, args.methods)
    earlier = None
    if args.report_only:
        args.resume = True
    if args.resume:
        earlier = (json.loads(out.partial_path.read_text()) if out.partial_path.exists() else out.previous())
    done = scarcity.reusable(earlier, sweep)
    if args.resume:
        print(f"reusing {len(done)} runs recorded under the same settings", flush=True)
    started = time.monotonic()
    if args.report_only:  # what the recorded runs cover, nothing run
        sweep = scarcity.covered(done, sweep)
        runs = {k: v for k, v in done.items() if k in {j[:4] for j in scarcity.jobs(sweep)}}
    else:
        runs = scarcity.run(sweep, args.workers, lambda runs: out.write(scarcity.recorded(runs, sweep), partial=True,
                                                                        kept_from=earlier if done else None), done)
    # the wall time of every invocation whose runs the result holds, not only this one (a report runs nothing)
    before = float(earlier.get("seconds") or 0.0) if earlier and done else 0.0
    result = scarcity.result(runs, sweep, before + time.monotonic() - started)
    out.write(result, kept_from=earlier if done else None)
    scarcity.plot(result, sweep, out)
    print(json.dumps(result["headline"], indent=2, default=str))


def run_fleets(args: argparse.Namespace, out: Output) -> None:
    """The comparison over the real protocol path (``--fleet``)."""
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
