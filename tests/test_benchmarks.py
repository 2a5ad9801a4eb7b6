"""Every benchmark still runs: its ``--smoke`` mode, end to end, as ``fedaigc bench NAME`` would run it.

A benchmark is a script that only runs when someone wants its numbers, so a refactoring
can break it unnoticed for months. Each test runs ``python -m benchmarks.NAME --smoke --out
DIR`` from the repository root (tiny sizes, the same code path as a full run) and checks it
exits 0, wrote its JSON with a ``measured_at`` record and its main result keys into DIR, drew
a plot, and left ``benchmarks/results/`` alone. The benchmarks come from the CLI's list, so
a new one is tested as soon as ``fedaigc bench`` can run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.cli.bench import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# benchmark -> keys its smoke JSON must hold (load's "4" is its smoke size, N = 4 devices)
MAIN_KEYS = {
    "protocol": ("throughput", "fuzz_cases", "fuzz_crashes", "refusals_by_reason", "envelope_mb_per_s"),
    "clustering": ("rows", "by_noise", "seconds"),
    "central": ("per_style", "base_style_acc", "central_style_acc", "pretrain_seconds"),
    "edge": ("small", "tiny_sd", "quality_after_one_round", "device_profiles"),
    "personalization": ("runs", "final"),
    "serve": ("modes", "requests_per_s", "p95_ms"),
    "federation": ("headline", "table", "methods", "interaction", "ari", "cpu_seconds"),
    "comm": ("per_setting", "baseline_bytes", "best_setting", "two_tier", "runs"),
    "privacy": ("settings", "attacks", "default", "dp"),
    "export": ("parity", "step_seconds", "sampling_seconds_20_steps_8_prompts", "quality", "coreml", "memory_mb",
               "device_profiles"),
    "export_training": ("loss_curves", "max_step_loss_abs_diff", "seconds_per_step", "step1_parity"),
    "load": ("4", "meta"),
    "interaction": ("summary", "gain_over_intra", "gate_calibration", "agreement_calibration"),
    "diagnosis": ("table", "variants", "runs", "local_runs", "seconds"),
    "ranks": ("mixed_low_rank_vs_uniform2", "mixed_rank8_vs_uniform8", "summary", "bytes_per_device_round",
              "training_memory_mb"),
}
FAST = {"protocol"}  # the rest take more than ~20 s even at smoke size (see the pytest marker)
TIMEOUT_S = {"export": 1200, "export_training": 900}  # ExecuTorch lowering dominates these two


def _params() -> list:
    """One case per benchmark: marked slow unless it is fast, with a pytest timeout above its own."""
    return [pytest.param(n, marks=[pytest.mark.timeout(_timeout(n) + 60)] + ([] if n in FAST else [pytest.mark.slow]))
            for n in BENCHMARKS]


def _timeout(name: str) -> int:
    return TIMEOUT_S.get(name, 300)


def _run(name: str, out: Path) -> subprocess.CompletedProcess:
    """The smoke run in a session of its own, so a timeout also ends the daemons and device processes it started."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=_timeout(name))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{name} --smoke did not finish in {_timeout(name)} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert not _leftovers(proc.pid), f"{name} --smoke left processes running (killed now)"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _leftovers(group: int, grace_s: float = 15.0) -> bool:
    """Whether the run's process group outlives it (an orphaned daemon or device process); kills what is left."""
    deadline = time.monotonic() + grace_s  # multiprocessing's helpers exit just after their parent
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
    return True


def _results_listing() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.iterdir()} if RESULTS.is_dir() else {}


def test_every_benchmark_module_is_listed_and_declares_its_keys():
    modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(BENCHMARKS), "benchmarks/*.py and aggregator.cli.bench.BENCHMARKS differ"
    assert set(MAIN_KEYS) == set(BENCHMARKS), "declare each benchmark's main result keys in MAIN_KEYS"


@pytest.mark.parametrize("name", _params())
def test_benchmark_smoke_run(name, tmp_path):
    before = _results_listing()
    started = time.monotonic()
    done = _run(name, tmp_path)
    seconds = time.monotonic() - started
    print(f"{name} --smoke: {seconds:.0f} s")
    assert done.returncode == 0, (f"exit {done.returncode} after {seconds:.0f} s\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["measured_at"]["commit"], result["measured_at"]
    assert result["measured_at"]["smoke"] is True
    assert [k for k in MAIN_KEYS[name] if k not in result] == []
    assert list(tmp_path.glob("*.png")), "no plot written"
    assert _results_listing() == before, "a smoke run touched benchmarks/results/"
