"""``fedaigc``: one command line for operators, app developers and benchmarks.

Every subcommand imports what it needs lazily, so ``fedaigc --help`` is instant and the
aggregator daemon never imports the export toolchain.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from models.digits.pretrain import pretrain_base
    from models.training import TrainConfig
    from models.digits.unet import UNetConfig

    blocks = tuple(int(b) for b in args.blocks.split(","))
    result = pretrain_base(
        UNetConfig(block_out_channels=blocks),
        TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        progress=True,
    )
    out = Path(args.out)
    result.unet.save_pretrained(out, safe_serialization=True)
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "seconds": round(result.seconds, 1),
               "final_loss": sum(result.losses[-100:]) / max(1, len(result.losses[-100:]))}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _train_central(args: argparse.Namespace) -> int:
    from models.digits.pretrain import central_report

    print(json.dumps(central_report(args.clients, args.styles, args.seed, args.steps), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from aggregator.demo import run_demo
    from aggregator.simulation import FleetConfig

    cfg = FleetConfig(devices=args.devices, styles=args.styles, rounds=args.rounds, local_steps=args.local_steps,
                      seed=args.seed, mqtt_url=args.mqtt_url, codec=args.codec, processes=args.processes)
    summary = run_demo(cfg, Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/ in {summary['total_seconds']} s")
    return 0


def _broker(args: argparse.Namespace) -> int:
    from aggregator.broker import ensure_broker

    broker = ensure_broker(args.mqtt_url, kind=args.kind)
    if broker is None:
        print(f"a broker already answers at {args.mqtt_url}; nothing to start")
        return 0
    print(f"embedded {broker.kind} broker at {broker.url}; Ctrl-C stops it")
    _wait_for_signal()
    broker.close()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _aggregator(args: argparse.Namespace) -> int:
    from aggregator.broker import ensure_broker
    from aggregator.config import AggregatorConfig
    from aggregator.hierarchy import CloudAggregator
    from aggregator.service import AggregatorService
    from aggregator.state import StateUnavailable

    overrides = {"role": args.role, "mqtt_url": args.mqtt_url, "mqtt_topic_prefix": args.topic_prefix,
                 "state_url": args.state, "cloud_url": args.cloud_url}
    if args.config:
        config = AggregatorConfig.from_toml(args.config, **overrides)
    else:
        config = AggregatorConfig(**{k: v for k, v in overrides.items() if v is not None})
    broker = ensure_broker(config.mqtt_url) if args.start_broker else None
    # the MQTT network thread must take a burst of updates off the broker while the worker thread
    # computes: brokers drop what a slow subscriber has not taken beyond their queue limit (Mosquitto's
    # max_queued_messages, 1000 by default). A 0.5 ms GIL switch interval measured 1.7-2.8x faster intake.
    sys.setswitchinterval(0.0005)
    try:
        service = (CloudAggregator(config) if config.role == "cloud" else AggregatorService(config)).start()
    except StateUnavailable as e:  # unusable state directory, unwritable or full disk, database down
        print(f"fedaigc aggregator: {e}", file=sys.stderr)
        if broker is not None:
            broker.close()
        return 2
    print(f"aggregator {config.aggregator_id} ({config.role}) running; key fingerprint "
          f"{service.identity.public.fingerprint}; Ctrl-C stops it", file=sys.stderr)
    _wait_for_signal()
    service.stop()
    if broker is not None:
        broker.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from aggregator.status import read_status, render_status

    status = read_status(args.state)
    print(json.dumps(status, indent=2, default=str) if args.json else render_status(status))
    return 0


def _rollout(args: argparse.Namespace) -> int:
    import uuid

    from aggregator.config import AggregatorConfig
    from aggregator.rollout import Rollout, RolloutPlan, parse_fraction, parse_target
    from aggregator.state import open_store
    from edge_sdk.artifacts.manifest import ManifestError
    from edge_sdk.protocol.identity import Identity
    from edge_sdk.transport import MqttTransport

    overrides = {"mqtt_url": args.mqtt_url, "mqtt_topic_prefix": args.topic_prefix, "state_dir": args.state_dir,
                 "state_url": args.state, "aggregator_id": args.aggregator_id}
    if args.config:
        config = AggregatorConfig.from_toml(args.config, **overrides)
    else:
        config = AggregatorConfig(**{k: v for k, v in overrides.items() if v is not None})
    try:
        target, clusters = parse_target(args.to)
        canary = parse_fraction(args.canary)
    except ValueError as e:
        print(f"fedaigc rollout: {e}", file=sys.stderr)
        return 2
    key = Path(config.state_dir) / "aggregator.key"
    if not key.exists():  # devices trust the daemon's key; a new one would be refused by all of them
        print(f"fedaigc rollout: no aggregator key at {key}; run `fedaigc aggregator` with this state first",
              file=sys.stderr)
        return 2
    plan = RolloutPlan(Path(args.artifact), target, clusters, canary, args.canary_timeout, args.wait)
    store = open_store(config.store_url)
    transport = MqttTransport(config.mqtt(f"fedaigc-{config.aggregator_id}-rollout-{uuid.uuid4().hex[:8]}",
                                          session_expiry_s=0)).connect()
    try:
        summary = Rollout(transport, Identity.load(key), config.aggregator_id, store).run(plan)
    except (ManifestError, FileNotFoundError) as e:
        print(f"fedaigc rollout: {e}", file=sys.stderr)
        return 2
    finally:
        transport.close()
        store.close()
    print(json.dumps(summary, indent=2))
    return 3 if summary["stage"] == "halted" else 0


BENCHMARKS = ("clustering", "protocol", "edge", "personalization", "central", "serve", "federation", "comm",
              "privacy", "export", "load", "interaction")


def _bench(args: argparse.Namespace) -> int:
    """Each benchmark is a module run from the repo root, so it also works as ``python -m benchmarks.NAME``."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    names = [n for n in BENCHMARKS if (root / "benchmarks" / f"{n}.py").exists()]
    if not (root / "benchmarks").is_dir():
        print("benchmarks/ ships with the source checkout, not the wheel", file=sys.stderr)
        return 2
    todo = names if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in todo:
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *args.args], cwd=root)
        if code:
            return code
    return 0


def _export(args: argparse.Namespace) -> int:
    from export_tools.cli import run_export

    return run_export(args)


def build_parser() -> argparse.ArgumentParser:
    from models.digits.unet import BASE_MODEL_DIR

    parser = argparse.ArgumentParser(prog="fedaigc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run a real federation on this machine and write demo-out/",
                       description="Start (or find) a broker, an aggregator and simulated devices; run the "
                                   "rounds; write grids, a hybrid grid, a convergence plot and a report.")
    p.add_argument("--devices", type=int, default=12)
    p.add_argument("--styles", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--codec", default="fp32", help="uplink codec: fp32, fp16, int8, int4, topk:F[+int8]")
    p.add_argument("--processes", type=int, default=2, help="device worker processes (default: 2)")
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883",
                   help="broker to use; an embedded one is started there if nothing answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=_demo)

    p = sub.add_parser("broker", help="run the embedded MQTT broker unless one already answers",
                       description="Start mosquitto (if installed) or amqtt at --mqtt-url when nothing listens there.")
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--kind", choices=["auto", "mosquitto", "amqtt"], default="auto")
    p.set_defaults(func=_broker)

    p = sub.add_parser("aggregator", help="run the aggregator daemon",
                       description="Run the aggregator (roles: edge, cloud, all) until SIGINT/SIGTERM.")
    p.add_argument("--config", help="aggregator.toml (see examples/aggregator.toml)")
    p.add_argument("--role", choices=["all", "edge", "cloud"],
                   help="all: one tier (default); edge: serve devices and report clusters to the cloud at "
                        "--cloud-url; cloud: mix the clusters of every edge")
    p.add_argument("--cloud-url", help="the cloud aggregator's broker (role edge)")
    p.add_argument("--mqtt-url")
    add_topic_prefix_argument(p)
    p.add_argument("--state", help="state store: a SQLite path or postgresql://...")
    p.add_argument("--start-broker", action="store_true", help="start an embedded broker if none answers")
    p.set_defaults(func=_aggregator)

    p = sub.add_parser("status", help="show rounds, clusters, devices, refusals and bytes from the state store",
                       description="Read the aggregator's state store and print its status.")
    p.add_argument("--state", default="fedaigc-state/state.db", help="SQLite path or postgresql://...")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    p = sub.add_parser("pretrain", help="rebuild the shipped base denoiser on unstyled public digits",
                       description="Train the unstyled base UNet from scratch (deterministic) and save it.")
    p.add_argument("--out", default=str(BASE_MODEL_DIR), help="directory to write (default: the shipped model)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", default="16,32", help="UNet block widths, comma-separated (default: 16,32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("train-central", help="train one adapter per style on pooled persona data (upper bound)",
                       description="Centralized baseline: one LoRA per style on all personas' data; prints quality.")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--styles", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_central)

    p = sub.add_parser("bench", help="run a benchmark (writes benchmarks/results/NAME.json and PNGs)",
                       description="Run benchmarks/NAME.py; arguments after NAME go to the benchmark "
                                   "(e.g. fedaigc bench federation --quick; fedaigc bench federation --help).")
    p.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark, or all of them in turn")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(func=_bench)

    from export_tools.cli import add_export_arguments

    p = sub.add_parser("export", help="export the denoiser for devices: ExecuTorch .pte/.ptd or Core ML .mlpackage",
                       description="Export the base UNet with an adapter (or a mix) for on-device inference; "
                                   "writes the model files and a manifest with parity and latency.")
    add_export_arguments(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("rollout", help="roll an export out to the fleet over MQTT (signed, canary first)",
                       description="Publish an export directory as a new signed version, retained, to every device "
                                   "or one cluster; canary devices get it first and a failed canary halts it. "
                                   "Exits 3 when halted.")
    p.add_argument("--artifact", required=True, metavar="DIR", help="a `fedaigc export` output directory")
    p.add_argument("--to", required=True, metavar="cluster:ID|all", help="which devices run the new version")
    p.add_argument("--canary", default="0%", metavar="PERCENT",
                   help="share of the targeted devices (by hash of their id) that get it first, e.g. 10%% "
                        "(default: 0%%, no canary stage)")
    p.add_argument("--canary-timeout", type=float, default=600.0, metavar="S",
                   help="open to all after this long if no canary failed (default: 600)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="then wait up to S seconds for every targeted device's report (default: 0)")
    p.add_argument("--config", help="aggregator.toml: the aggregator's id, state and broker")
    p.add_argument("--state-dir", help="the aggregator's state directory, holding its key (default: fedaigc-state)")
    p.add_argument("--state", help="state store, if not the SQLite file in --state-dir: a path or postgresql://...")
    p.add_argument("--aggregator-id", help="the aggregator's id as devices know it (default: aggregator)")
    p.add_argument("--mqtt-url", help="broker (default: the config's, else mqtt://127.0.0.1:1883)")
    add_topic_prefix_argument(p)
    p.set_defaults(func=_rollout)
    return parser


def add_topic_prefix_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic-prefix", metavar="PREFIX",
                   help="the fleet's topics lie under PREFIX/v1 (default: the config's, else fedaigc); "
                        "fleets sharing a broker use different prefixes")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "torchao", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
