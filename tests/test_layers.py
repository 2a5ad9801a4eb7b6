"""The layers hold: the import contracts (``pyproject.toml``), and what each role really loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"psycopg", "amqtt", "prometheus_client", "matplotlib", "opacus", "sklearn", "pandas",
               "aggregator", "export_tools"}
DEVICE_RUNTIME = {f"edge_sdk.{m}" for m in ("client", "session", "rollout", "config", "store", "privacy", "memory",
                                             "quantize")}


def loaded_after(code: str) -> set[str]:
    """Every module a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_import_contracts_hold():
    result = subprocess.run([Path(sys.executable).parent / "lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_a_device_training_a_round_loads_no_server_module(tmp_path):
    loaded = loaded_after(f"""
import torch
from edge_sdk import DeviceConfig, EdgeClient, LocalData
client = EdgeClient(DeviceConfig(data_dir={str(tmp_path)!r}, profile="simulator"))
client.train_round(None, LocalData(torch.rand(4, 1, 16, 16), ("a bold 1", "a bold 2", "a thin 3", "a thin 4")), steps=1)
""")
    top = {m.split(".")[0] for m in loaded}
    assert not top & SERVER_ONLY, sorted(top & SERVER_ONLY)


def test_the_daemon_loads_no_device_runtime():
    loaded = loaded_after("import aggregator.service")
    assert not loaded & DEVICE_RUNTIME, sorted(loaded & DEVICE_RUNTIME)
    assert "export_tools" not in {m.split(".")[0] for m in loaded}
