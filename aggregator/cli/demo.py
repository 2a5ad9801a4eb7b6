"""``fedaigc demo``: a real federation on this machine, written to ``demo-out/``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.broker import ensure_broker
    from aggregator.simulation.demo import run_demo
    from aggregator.simulation.fleet import FleetConfig

    cfg = FleetConfig(devices=args.devices, styles=args.styles, rounds=args.rounds, local_steps=args.local_steps,
                      seed=args.seed, mqtt_url=args.mqtt_url, codec=args.codec, processes=args.processes)
    broker = ensure_broker(args.mqtt_url)  # announces an embedded broker it had to start
    if broker is None:
        print(f"fedaigc demo: using the MQTT broker that answers at {args.mqtt_url}", file=sys.stderr)
    print(f"fedaigc demo: {cfg.devices} devices of {cfg.styles} styles in {cfg.processes} worker processes, "
          f"{cfg.rounds} rounds of {cfg.local_steps} local steps, then pictures and a report in {args.out}/",
          file=sys.stderr)
    try:
        summary = run_demo(cfg, Path(args.out))
    finally:
        if broker is not None:
            broker.close()
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/ in {summary['total_seconds']} s")
    return 0
