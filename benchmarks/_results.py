"""Where a benchmark writes its JSON and plots, and the record of which code produced them.

Every benchmark writes through ``Output``. The JSON gets a ``measured_at`` record (the git
commit, whether the tree had uncommitted changes, the date and the exact command line, all
taken when the run starts), so a number can be traced to the code it was measured on
without digging through ``git log``.

A full run writes ``benchmarks/results/NAME.json`` and its PNGs (or under ``--out``). A
``--smoke`` run (tiny sizes, seconds; what ``tests/test_benchmarks.py`` runs so a benchmark
cannot silently rot) writes to ``--out`` or a fresh temporary directory and refuses
``benchmarks/results/``, so checking that a benchmark still runs never overwrites a
measurement.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--smoke`` and ``--out``, spelled and documented the same in every benchmark."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes that run in seconds, through the same code end to end: checks the "
                             "benchmark still works (its numbers mean nothing); writes to --out or a temporary "
                             "directory, never to benchmarks/results")
    parser.add_argument("--out", default=None, metavar="DIR_OR_JSON",
                        help="where the JSON and PNGs go: a directory (NAME.json inside it) or a .json path "
                             "(PNGs beside it); default benchmarks/results, with --smoke a temporary directory")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def measured_at() -> dict:
    """The code and command of this run: what a reader needs to reproduce or distrust a number."""
    commit, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    return {"commit": commit.strip() if commit else None,
            "uncommitted_changes": None if status is None else bool(status.strip()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv)}


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@dataclass(frozen=True)
class Output:
    """One benchmark run's JSON path (PNGs go beside it) and its ``measured_at`` record."""

    json_path: Path
    smoke: bool
    record: dict = field(default_factory=measured_at)

    @classmethod
    def of(cls, parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Output:
        """Resolve ``--out``/``--smoke`` for benchmark ``name``; a smoke run aimed at benchmarks/results is an error."""
        if args.smoke and getattr(args, "quick", False):
            parser.error("--smoke and --quick are alternatives: choose one")
        if args.out is not None:
            target = Path(args.out)
        elif args.smoke:
            target = Path(tempfile.mkdtemp(prefix=f"fedaigc-smoke-{name}-"))
        else:
            target = RESULTS
        path = target if target.suffix == ".json" else target / f"{name}.json"
        if args.smoke and _inside(path, RESULTS):
            parser.error("a --smoke run must not write into benchmarks/results; give --out another directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, args.smoke)

    def png(self, tag: str = "") -> Path:
        """``NAME.png`` beside the JSON, or ``NAME_TAG.png`` for a benchmark with several figures."""
        return self.json_path.with_name(self.json_path.stem + (f"_{tag}" if tag else "") + ".png")

    @property
    def partial_path(self) -> Path:
        return self.json_path.with_suffix(".partial.json")

    def previous(self) -> dict | None:
        """The result already at this path, for benchmarks that keep the parts a run does not repeat."""
        return json.loads(self.json_path.read_text()) if self.json_path.exists() else None

    def write(self, result: dict, kept_from: dict | None = None, partial: bool = False) -> Path:
        """Write ``result`` with this run's ``measured_at``; the one way a benchmark's JSON is written.

        ``kept_from`` is the earlier result whose parts ``result`` carries over (another mode, part
        or size measured by an earlier command): its records move to ``earlier_measured_at``, so
        every part stays traceable. ``partial`` writes ``NAME.partial.json`` (a long run's finished
        parts as they land); the final write removes it.
        """
        earlier = [] if kept_from is None else [*kept_from.get("earlier_measured_at", []),
                                                *([kept_from["measured_at"]] if "measured_at" in kept_from else [])]
        body = {k: v for k, v in result.items() if k not in ("measured_at", "earlier_measured_at")}
        record = {"measured_at": self.record | {"smoke": self.smoke}} | (
            {"earlier_measured_at": earlier} if earlier else {})
        path = self.partial_path if partial else self.json_path
        path.write_text(json.dumps(body | record, indent=2, default=str) + "\n")
        if not partial:
            self.partial_path.unlink(missing_ok=True)
            print(f"wrote {path}", file=sys.stderr)
        return path

    def save_figure(self, fig, tag: str = "") -> Path:
        """Lay out, save beside the JSON and close ``fig`` (a long run draws many)."""
        import matplotlib.pyplot as plt

        path = self.png(tag)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
