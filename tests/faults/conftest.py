"""Fixtures for the fault tests: each test owns its broker (a mosquitto child process on a free port)."""

from __future__ import annotations

import shutil
import uuid

import pytest

from aggregator.broker import EmbeddedBroker, free_port


@pytest.fixture
def own_broker(tmp_path):
    """A mosquitto process only this test talks to; the test may stop and restart it (same port, same
    persistence directory)."""
    if not shutil.which("mosquitto"):
        pytest.skip("the fault tests need the mosquitto binary (MQTT v5, persistence)")
    broker = EmbeddedBroker("127.0.0.1", free_port(), kind="mosquitto", state_dir=tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def aggregator_id():
    return f"faults-{uuid.uuid4().hex[:6]}"
