"""``fedaigc bench NAME``: run ``benchmarks/NAME.py`` (source checkout only), which writes ``benchmarks/results/``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("clustering", "protocol", "edge", "personalization", "central", "serve", "federation", "comm",
              "privacy", "export", "export_training", "load", "interaction", "diagnosis", "ranks")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (writes benchmarks/results/NAME.json and PNGs)",
                       description="Run benchmarks/NAME.py; arguments after NAME go to the benchmark "
                                   "(e.g. fedaigc bench federation --quick; fedaigc bench federation --help).")
    p.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark, or all of them in turn")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Each benchmark is a module run from the repo root, so it also works as ``python -m benchmarks.NAME``."""
    if not (ROOT / "benchmarks").is_dir():
        print("benchmarks/ ships with the source checkout, not the wheel", file=sys.stderr)
        return 2
    for name in BENCHMARKS if args.name == "all" else [args.name]:
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *args.args], cwd=ROOT)
        if code:
            return code
    return 0
