"""Shared fixtures: a real MQTT broker, seeded torch, quiet third-party loggers."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

for noisy in ("amqtt", "transitions", "torchao", "httpx"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def mqtt_url():
    """The machine's Mosquitto at 127.0.0.1:1883 when it runs, else an embedded broker on a free port."""
    from aggregator.broker import EmbeddedBroker, broker_listening, free_port

    if broker_listening("127.0.0.1", 1883):
        yield "mqtt://127.0.0.1:1883"
        return
    broker = EmbeddedBroker("127.0.0.1", free_port()).start()
    try:
        yield broker.url
    finally:
        broker.close()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A Stable-Diffusion-family pipeline with random weights (16x16 images, 8x8 latents), saved with
    ``save_pretrained``: the real loading code, nothing downloaded."""
    from models.architectures import save_random_pipeline

    return save_random_pipeline("tiny-sd", tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0)
