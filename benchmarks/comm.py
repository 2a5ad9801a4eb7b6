"""Communication: quality vs bytes on the wire, FedAvg-LoRA fp32 against ours with each codec.

    python -m benchmarks.comm [--quick | --smoke] [--out DIR]          (or: fedaigc bench comm)

Every setting is a real fleet over the real protocol path (device processes, aggregator,
broker), same personas, seeds, rounds and local steps; bytes are MQTT payload bytes
(envelopes and chunk headers included) counted by the aggregator, both directions.

* ``fedavg_fp32``   the baseline: one shared LoRA, factors averaged, fp32 both ways,
                    the full adapter sent down every round;
* ``ours_fp32``     task clusters + exact aggregation + interaction, still fp32 and full
                    adapters (what clustering alone buys);
* ``ours_<codec>``  the same with an uplink codec (error feedback on the device) and the
                    downlink sent as a delta against what each device holds, through a dense
                    codec (fp16, int8 or int4: sparse downlinks starve devices of the change).

"Equal quality" is the first round at which a setting's mean style accuracy is within
0.02 of the baseline's final one and its Fréchet distance within 2% of the baseline's
final one; the bytes spent up to that round are compared with what the baseline spent to
reach its own final quality. The saving factor is split (in log terms) into what comes
from clustering (ours_fp32 vs baseline) and what from codecs (best codec vs ours_fp32).

A second, model-free measurement runs the two-tier path (two edge sites, each with its
own broker, and a cloud broker) for one round with real-sized updates, and reports what
crosses the wide-area link against what the devices send their edges.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aggregator.simulation.fleet import FleetConfig, run_federation  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from benchmarks.federation import (  # noqa: E402
    QUICK_FLEET,
    SMOKE_FLEET,
    check_aggregator_settings,
    cumulative_bytes,
    mean_over_styles,  # noqa: E402
)
from edge_sdk.protocol.codecs import make_codec  # noqa: E402

BASELINE = "fedavg_fp32"
OURS = {"clustering": "tasks", "rule": "exact", "interaction": True, "global_shrinkage": True}  # as federation's
# name -> (aggregator overrides, uplink codec)
SETTINGS: dict[str, tuple[dict, str]] = {
    "fedavg_fp32": ({"clustering": "single", "rule": "fedavg", "interaction": False, "clip": None,
                     "downlink_codec": "fp32", "downlink_deltas": False}, "fp32"),
    "ours_fp32": (OURS | {"downlink_codec": "fp32", "downlink_deltas": False}, "fp32"),
    "ours_fp16": (OURS | {"downlink_codec": "fp16"}, "fp16"),
    "ours_int8": (OURS | {"downlink_codec": "int8"}, "int8"),
    # sparse uplink (error feedback on the device); dense quantized downlink deltas: a device must
    # start each round from the whole new cluster adapter, not a tenth of the change
    "ours_topk0.1+int8": (OURS | {"downlink_codec": "int8"}, "topk:0.1+int8"),
    "ours_topk0.05+int4": (OURS | {"downlink_codec": "int4"}, "topk:0.05+int4"),
}
SMOKE_SETTINGS = (BASELINE, "ours_topk0.1+int8")  # a fleet is slow to start; check_settings covers the others


def check_settings(names: list[str]) -> None:
    """Refuse unknown settings, and aggregator settings or codecs that no longer exist, before any fleet starts."""
    if unknown := set(names) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    check_aggregator_settings(overrides for overrides, _ in SETTINGS.values())
    for _, codec in SETTINGS.values():
        make_codec(codec)


def run_setting(name: str, cfg: FleetConfig) -> dict:
    overrides, codec = SETTINGS[name]
    started = time.monotonic()
    result = run_federation(FleetConfig(**{**cfg.__dict__, "codec": codec}), aggregator=overrides, progress=False)
    return {"curves": result.curves, "traffic": {str(r): v for r, v in result.traffic.items()},
            "seconds": time.monotonic() - started, "refusals": result.refusals}


def equal_quality_round(run: dict, target_acc: float, target_frechet: float, rounds: int) -> int | None:
    for r in range(1, rounds + 1):
        c = run["curves"][r]
        if mean_over_styles(c, "style_acc") >= target_acc - 0.02 and mean_over_styles(c, "frechet") <= 1.02 * target_frechet:
            return r
    return None


def summarize(runs: dict, rounds: int) -> dict:
    seeds = sorted(runs[BASELINE])
    out: dict = {"per_setting": {}}
    for name in runs:
        per_seed = []
        for s in seeds:
            base = runs[BASELINE][s]
            acc = mean_over_styles(base["curves"][rounds], "style_acc")
            fr = mean_over_styles(base["curves"][rounds], "frechet")
            base_round = equal_quality_round(base, acc, fr, rounds)
            base_bytes = cumulative_bytes(base, rounds)[base_round]
            r = equal_quality_round(runs[name][s], acc, fr, rounds)
            spent = cumulative_bytes(runs[name][s], rounds)[r] if r is not None else None
            per_seed.append({"round": r, "bytes": spent, "baseline_round": base_round, "baseline_bytes": base_bytes,
                             "reduction": None if spent is None else 1.0 - spent / base_bytes})
        reached = [p for p in per_seed if p["bytes"] is not None]
        final = {k: float(np.mean([mean_over_styles(runs[name][s]["curves"][rounds], k) for s in seeds]))
                 for k in ("style_acc", "digit_acc", "frechet")}
        bytes_per_round = float(np.mean([cumulative_bytes(runs[name][s], rounds)[-1] for s in seeds])) / rounds
        out["per_setting"][name] = {
            "final": final, "bytes_per_round": bytes_per_round, "per_seed": per_seed,
            "reached_in_every_seed": len(reached) == len(per_seed),
            "bytes_at_equal_quality": float(np.mean([p["bytes"] for p in reached])) if reached else None,
            "reduction_at_equal_quality": float(np.mean([p["reduction"] for p in reached])) if reached else None,
        }
    ok = {n: v for n, v in out["per_setting"].items() if n.startswith("ours_") and v["reached_in_every_seed"]}
    baseline_bytes = float(np.mean([p["baseline_bytes"] for p in out["per_setting"][BASELINE]["per_seed"]]))
    out["baseline_bytes"] = baseline_bytes
    if ok:
        best = min(ok, key=lambda n: ok[n]["bytes_at_equal_quality"])
        ours_bytes = ok[best]["bytes_at_equal_quality"]
        out |= {"best_setting": best, "ours_bytes": ours_bytes, "reduction_at_equal_quality": 1.0 - ours_bytes / baseline_bytes}
        plain = out["per_setting"].get("ours_fp32", {}).get("bytes_at_equal_quality")
        total = math.log(baseline_bytes / ours_bytes)
        if plain is not None and total > 0:
            out["share_from_hierarchy"] = math.log(baseline_bytes / plain) / total
            out["share_from_codecs"] = math.log(plain / ours_bytes) / total
            out["share_note"] = ("shares of the log saving factor: clustering (ours_fp32 vs the baseline: fewer "
                                 "rounds to the same quality) and codecs (best codec vs ours_fp32); the two-tier "
                                 "hierarchy does not change device bytes, only what crosses the wide-area link: see "
                                 "two_tier")
    return out


def load_earlier(path: Path, cfg: FleetConfig, seeds: list[int]) -> dict:
    """The result ``--merge`` names, refused (before any fleet runs) if measured with another config or seeds."""
    earlier = json.loads(path.read_text())
    if earlier["config"] != {k: str(v) for k, v in cfg.__dict__.items()} or earlier["seeds"] != seeds:
        raise SystemExit(f"{path} was measured with another configuration or seeds; not merging")
    return earlier


def merge_runs(runs: dict, earlier: dict) -> list[str]:
    """Add the settings of an earlier result that this run did not repeat."""
    added = [n for n in earlier["runs"] if n not in runs]
    for n in added:
        runs[n] = {int(s): r | {"curves": {int(k): v for k, v in r["curves"].items()}}
                   for s, r in earlier["runs"][n].items()}
    return added


def two_tier_round(devices_per_edge: int, edges: int = 2) -> dict:
    """One round through cloud + edge sites with model-free devices: WAN bytes vs device bytes."""
    from aggregator.broker import EmbeddedBroker, free_port
    from aggregator.config import AggregatorConfig
    from aggregator.hierarchy import CloudAggregator
    from aggregator.provisioning import provision_device
    from aggregator.service import AggregatorService
    from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice

    root = Path(tempfile.mkdtemp(prefix="fedaigc-two-tier-"))
    brokers = [EmbeddedBroker(port=free_port()).start() for _ in range(edges + 1)]
    cloud = CloudAggregator(AggregatorConfig(aggregator_id="cloud", role="cloud", mqtt_url=brokers[0].url,
                                             state_dir=root / "cloud", expected_edges=edges)).start()
    bundles = [provision_device(cloud.store, cloud.identity, cloud.config, f"edge{i}") for i in range(edges)]
    services, fleet = [], []
    try:
        rng = np.random.default_rng(0)
        styles = [rng.normal(size=384) for _ in range(2)]
        for i, broker in enumerate(brokers[1:]):
            services.append(AggregatorService(AggregatorConfig(
                aggregator_id=f"edge{i}", role="edge", mqtt_url=broker.url, cloud_url=brokers[0].url,
                cloud_token=bundles[i].token, cloud_fingerprint=bundles[i].aggregator_fingerprint,
                tokens=(DEMO_TOKEN,), state_dir=root / f"edge{i}", expected_devices=devices_per_edge, rounds=1, k=2,
                refine_after_round=0, round_timeout_s=120)).start())
            for j in range(devices_per_edge):
                d = LiteDevice(broker.url).start()
                d.join(styles[j % 2] + rng.normal(size=384) * 0.05)
                fleet.append((i, d))
        deadline = time.monotonic() + 60
        while not all(s.cloud.enrolled.is_set() for s in services) and time.monotonic() < deadline:
            time.sleep(0.1)
        g = torch.Generator().manual_seed(0)
        for i, d in fleet:
            start = d.round_start(timeout=60)
            delta = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in services[i].shapes.items()}
            d.send(d.topics.update(d.id), d.update_envelope(start, delta))
        while not all(s.done.is_set() for s in services) and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        device_bytes = sum(v["up"] + v["down"] for s in services for v in s.telemetry.traffic.get(1, {}).values())
        wan_bytes = sum(v["up"] + v["down"] for v in cloud.traffic.get(1, {}).values())
        return {"edges": edges, "devices_per_edge": devices_per_edge, "clusters_per_edge": 2,
                "device_edge_bytes": device_bytes, "wan_bytes": wan_bytes,
                "flat_wan_bytes": device_bytes, "wan_saving": 1.0 - wan_bytes / device_bytes,
                "note": "flat_wan_bytes: in one tier every device byte crosses the wide-area link to the aggregator"}
    finally:
        for _, d in fleet:
            d.stop()
        for s in services:
            s.stop()
        cloud.stop()
        for b in brokers:
            b.close()
        shutil.rmtree(root, ignore_errors=True)


def plot(runs: dict, rounds: int, summary: dict, out: Output) -> None:
    seeds = sorted(runs[BASELINE])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in runs:
        xb = np.mean([cumulative_bytes(runs[name][s], rounds) for s in seeds], axis=0) / 1e6
        for ax, key in zip(axes, ("style_acc", "frechet")):
            yq = np.mean([[mean_over_styles(runs[name][s]["curves"][r], key) for r in range(rounds + 1)]
                          for s in seeds], axis=0)
            ax.plot(xb[1:], yq[1:], marker="o", ms=3, label=name, lw=2.2 if name == BASELINE else 1.2)
    axes[0].set(xscale="log", xlabel="uplink + downlink MB (cumulative, log)", ylabel="style accuracy", ylim=(0, 1))
    axes[1].set(xscale="log", yscale="log", xlabel="uplink + downlink MB (cumulative, log)", ylabel="Fréchet distance")
    red = summary.get("reduction_at_equal_quality")
    fig.suptitle("quality vs bytes on the wire" + (f" — {red:.1%} fewer bytes at equal quality "
                                                   f"({summary['best_setting']})" if red is not None else ""), fontsize=9)
    axes[0].legend(fontsize=7)
    out.save_figure(fig)


def run_settings(names: list[str], seeds: list[int], cfg: FleetConfig) -> dict:
    """Every setting for every seed, as real fleets: ``{setting: {seed: run}}``."""
    from tqdm.auto import tqdm

    runs: dict = {n: {} for n in names}
    with tqdm(total=len(names) * len(seeds), desc="comm settings") as bar:
        for seed in seeds:
            for n in names:
                runs[n][seed] = run_setting(n, FleetConfig(**{**cfg.__dict__, "seed": seed}))
                r = runs[n][seed]
                bar.write(f"seed {seed} {n}: style acc {mean_over_styles(r['curves'][cfg.rounds], 'style_acc'):.3f}, "
                          f"{cumulative_bytes(r, cfg.rounds)[-1] / 1e6:.2f} MB, {r['seconds']:.0f} s")
                bar.update()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, baseline + ours_fp32 + one codec")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:18831",
                        help="broker for the fleets (an embedded one is started if nothing answers)")
    parser.add_argument("--merge", default=None, metavar="COMM_JSON",
                        help="take the settings not run now from this earlier result (same seeds and config)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Output.of(parser, args, "comm")
    names = [n for n in args.settings.split(",") if n]
    if args.smoke or args.quick:
        cfg = FleetConfig(**(SMOKE_FLEET if args.smoke else QUICK_FLEET), mqtt_url=args.mqtt_url)
        seeds = [0]
        names = list(SMOKE_SETTINGS) if args.smoke else [BASELINE, "ours_fp32", "ours_topk0.1+int8"]
    else:
        cfg = FleetConfig(devices=8, styles=4, sizes=(3, 2, 2, 1), rounds=args.rounds, local_steps=args.local_steps,
                          eval_samples=32, eval_steps=8, mqtt_url=args.mqtt_url, task_noise=0.3)
        seeds = list(range(args.seeds))
    if BASELINE not in names:
        parser.error(f"the settings must include the baseline {BASELINE}")
    check_settings(names)
    earlier = load_earlier(Path(args.merge), cfg, seeds) if args.merge else None
    started = time.monotonic()
    runs = run_settings(names, seeds, cfg)
    merged = merge_runs(runs, earlier) if earlier else []
    summary = summarize(runs, cfg.rounds)
    summary["two_tier"] = two_tier_round(devices_per_edge=2 if args.smoke else 4 if args.quick else 8)
    result = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "seeds": seeds,
              "seconds": time.monotonic() - started, "settings": {n: {"aggregator": SETTINGS[n][0],
                                                                       "uplink": SETTINGS[n][1]} for n in runs},
              "merged": {n: args.merge for n in merged},
              **summary, "runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()}}
    out.write(result, kept_from=earlier if merged else None)
    plot(runs, cfg.rounds, summary, out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "config", "per_setting")}, indent=2,
                     default=str))


if __name__ == "__main__":
    main()
