"""The paper's comparison on styled digits, over the real protocol path.

    python -m benchmarks.federation [--quick]          (or: fedaigc bench federation)

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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.global_model import GlobalModel, adapter_name  # noqa: E402
from aggregator.simulation.fleet import FleetConfig, run_federation, score_styles  # noqa: E402
from models.digits.unet import load_base_unet  # noqa: E402
from models.lora import add_adapter, get_adapter_state, lora_config, set_mix  # noqa: E402
from models.training import LORA_LR, TrainConfig, train_adapters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FEDERATED = {
    "fedavg": {"clustering": "single", "rule": "fedavg", "interaction": False, "clip": None},
    "ifca": {"clustering": "ifca", "rule": "fedavg", "interaction": False, "clip": None},
    "ours_intra": {"clustering": "tasks", "rule": "exact", "interaction": False},
    # the full method, global shrinkage included (off in the product's defaults: see README)
    "ours": {"clustering": "tasks", "rule": "exact", "interaction": True, "global_shrinkage": True},
}
METHODS = ("local", "fedavg", "ifca", "ours_intra", "ours", "central")


def in_process(cfg: FleetConfig, pooled: bool) -> dict:
    """``local`` (one adapter per device) or ``central`` (one per style, pooled data), per round."""
    from models.text import PromptEncoder

    personas = cfg.personas()
    ids = [f"d{i}" for i in range(len(personas))]
    persona_of = dict(zip(ids, personas))
    groups = {d: (p.style if pooled else d) for d, p in persona_of.items()}
    unet = load_base_unet()
    unet.requires_grad_(False)
    encoder = PromptEncoder()
    data = {}
    for g in sorted(set(groups.values())):
        members = [persona_of[d] for d in ids if groups[d] == g]
        add_adapter(unet, f"g-{g}", lora_config(), seed=cfg.seed)
        images = torch.cat([p.train_images for p in members])
        enc = torch.from_numpy(encoder.encode([q for p in members for q in p.train_prompts]))
        data[g] = (images, enc, len(members))
    model = GlobalModel(lora_config())
    index = {g: i for i, g in enumerate(sorted(set(groups.values())))}

    def model_of(g):
        set_mix(model.unet, {adapter_name(index[g]): 1.0})
        return model.unet

    curves = {}
    for rnd in tqdm(range(0, cfg.rounds + 1), desc="central" if pooled else "local", leave=False):
        for g, (images, enc, n) in data.items():
            name = f"g-{g}"
            if rnd > 0:
                set_mix(unet, {name: 1.0})
                train_adapters(unet, [name], images, enc, TrainConfig(steps=cfg.local_steps * n, batch_size=16, lr=LORA_LR,
                                                                     seed=cfg.seed + rnd))
            model.set_cluster(index[g], get_adapter_state(unet, name), rnd)
        curves[rnd] = score_styles(model_of, groups, persona_of, cfg.eval_samples, cfg.seed, cfg.eval_steps)
    return {"curves": curves, "traffic": {}, "ari": None, "ari_text": None, "seconds": None}


def run_method(method: str, cfg: FleetConfig) -> dict:
    started = time.monotonic()
    if method in ("local", "central"):
        out = in_process(cfg, pooled=method == "central")
        out["seconds"] = time.monotonic() - started
        return out
    overrides = dict(FEDERATED[method])
    if method == "ifca":
        overrides["k"] = cfg.styles
    result = run_federation(cfg, aggregator=overrides, progress=False)
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


def summarize(runs: dict, cfg: FleetConfig, smallest_style: str) -> dict:
    seeds = sorted({s for m in runs.values() for s in m})
    final = {m: {k: float(np.mean([mean_over_styles(runs[m][s]["curves"][cfg.rounds], k) for s in seeds]))
                 for k in ("style_acc", "digit_acc", "frechet")} for m in runs}
    central_target = 0.9 * final["central"]["style_acc"]
    rounds_needed = {m: [rounds_to(runs[m][s], central_target) for s in seeds] for m in runs}

    def mean_rounds(m):
        v = [r if r is not None else math.inf for r in rounds_needed[m]]
        return float(np.mean(v))

    ours_r, fedavg_r = mean_rounds("ours"), mean_rounds("fedavg")
    frechet_ratio = float(np.mean([
        np.mean([runs["ours"][s]["curves"][cfg.rounds]["styles"][st]["frechet"]
                 / runs["central"][s]["curves"][cfg.rounds]["styles"][st]["frechet"]
                 for st in runs["ours"][s]["curves"][cfg.rounds]["styles"]]) for s in seeds]))
    def small(m, s, key):
        return runs[m][s]["curves"][cfg.rounds]["styles"][smallest_style][key]

    small_gain = {k: [small("ours", s, k) - small("ours_intra", s, k) for s in seeds] for k in ("style_acc", "digit_acc")}
    small_frechet = [small("ours", s, "frechet") / small("ours_intra", s, "frechet") for s in seeds]
    return {
        "final": final,
        "final_sd": {m: {k: float(np.std([mean_over_styles(runs[m][s]["curves"][cfg.rounds], k) for s in seeds]))
                         for k in ("style_acc", "digit_acc", "frechet")} for m in runs},
        "target_style_acc": central_target,
        "rounds_to_target": {m: rounds_needed[m] for m in runs},
        "rounds_ratio_vs_fedavg": (ours_r / fedavg_r) if math.isfinite(fedavg_r) else None,
        "rounds_ratio_note": None if math.isfinite(fedavg_r) else
        f"fedavg did not reach the target within {cfg.rounds} rounds in every seed; ours needed {ours_r} rounds",
        "frechet_ratio_vs_central": frechet_ratio,
        "ari": float(np.mean([runs["ours"][s]["ari"] for s in seeds])),
        "ari_text_only": float(np.mean([runs["ours"][s]["ari_text"] for s in seeds])),
        "small_cluster_style": smallest_style,
        "small_cluster_gain": float(np.mean(small_gain["style_acc"])),
        "small_cluster_gain_per_seed": small_gain["style_acc"],
        "small_cluster_digit_gain": float(np.mean(small_gain["digit_acc"])),
        "small_cluster_frechet_ratio": float(np.mean(small_frechet)),
        "small_cluster_frechet_ratio_per_seed": small_frechet,
        "bytes_total": {m: float(np.mean([cumulative_bytes(runs[m][s], cfg.rounds)[-1] for s in seeds])) for m in runs},
    }


def plot(runs: dict, cfg: FleetConfig, path_prefix: Path) -> None:
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
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_rounds.png", dpi=110)
    plt.close(fig)
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
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_bytes.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 devices, 3 rounds (<= 5 min)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--out", default=str(RESULTS / "federation.json"))
    args = parser.parse_args(argv)
    if args.quick:
        cfg = FleetConfig(devices=8, styles=4, sizes=(3, 2, 2, 1), rounds=3, local_steps=10, eval_samples=24,
                          eval_steps=8, mqtt_url=args.mqtt_url, task_noise=0.3)
        seeds = [0]
    else:
        cfg = FleetConfig(devices=12, styles=4, sizes=(4, 3, 3, 2), rounds=args.rounds, local_steps=args.local_steps,
                          eval_samples=32, eval_steps=8, mqtt_url=args.mqtt_url, task_noise=0.3)
        seeds = list(range(args.seeds))
    methods = [m for m in args.methods.split(",") if m]
    smallest = cfg.personas()[-1].style
    started = time.monotonic()
    runs: dict = {m: {} for m in methods}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")

    def recorded() -> dict:
        return {"config": {k: str(v) for k, v in cfg.__dict__.items()},
                "methods": {m: {str(s): r for s, r in per.items()} for m, per in runs.items()}}

    for seed in seeds:
        for m in methods:
            c = FleetConfig(**{**cfg.__dict__, "seed": seed})
            runs[m][seed] = run_method(m, c)
            # a run of this benchmark takes hours: keep every finished method as it lands
            partial.write_text(json.dumps(recorded(), default=str) + "\n")
            r = runs[m][seed]
            print(f"seed {seed} {m}: final style acc {mean_over_styles(r['curves'][cfg.rounds], 'style_acc'):.3f}, "
                  f"Fréchet {mean_over_styles(r['curves'][cfg.rounds], 'frechet'):.0f}, "
                  f"{(r['seconds'] or 0):.0f} s", flush=True)
    result = recorded() | {"seeds": seeds, "seconds": time.monotonic() - started}
    if set(METHODS) <= set(methods):
        result |= summarize(runs, cfg, smallest)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.unlink(missing_ok=True)
    plot(runs, cfg, out.with_suffix(""))
    print(json.dumps({k: v for k, v in result.items() if k not in ("methods", "config")}, indent=2, default=str))


if __name__ == "__main__":
    main()
