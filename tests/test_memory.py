"""The training-memory estimate a device refuses a model with, before the first step."""

from __future__ import annotations

import pytest

from edge_sdk.memory import (
    ATTENTION_MATRICES,
    WORKSPACE_BYTES,
    activation_bytes_per_sample,
    activation_parts,
    estimate_training_bytes,
)
from edge_sdk.quantize import quantize_base, weight_bytes
from models.lora import add_adapter, lora_config
from models.stable_diffusion import StableDiffusionBackend


@pytest.fixture
def backend(tiny_sd):
    return StableDiffusionBackend.from_pretrained(tiny_sd)


def _with_lora(backend):
    add_adapter(backend.denoiser, "a", lora_config(4, target_modules=backend.default_targets))
    return backend


def test_the_activations_include_the_attention_matrices_the_backward_rebuilds(backend):
    # tiny-sd: the first stage's self-attention over 8x8 latents, with attention_head_dim (8) heads, holds
    # the largest (heads x queries x keys) fp32 matrix; cross-attention has 16 keys, the next stage 16 queries
    heads = backend.denoiser.config.attention_head_dim
    tokens = backend.sample_shape[1] * backend.sample_shape[2]
    parts = activation_parts(_with_lora(backend))
    assert parts["attention"] == ATTENTION_MATRICES * heads * tokens * tokens * 4
    assert activation_bytes_per_sample(backend) == parts["saved"] + parts["attention"]


def test_the_estimate_grows_by_one_sample_of_activations_per_row_of_batch(backend):
    backend = _with_lora(backend)
    per_sample = activation_bytes_per_sample(backend)
    assert estimate_training_bytes(backend, 3) - estimate_training_bytes(backend, 2) == per_sample
    fixed = estimate_training_bytes(backend, 0)
    assert fixed >= sum(weight_bytes(m) for m in backend.modules().values()) + WORKSPACE_BYTES


def test_an_int8_base_is_estimated_below_its_fp32_base(tiny_sd):
    fp32 = _with_lora(StableDiffusionBackend.from_pretrained(tiny_sd))
    int8 = StableDiffusionBackend.from_pretrained(tiny_sd)
    quantize_base(int8.denoiser)
    int8 = _with_lora(int8)
    assert estimate_training_bytes(int8, 1) < estimate_training_bytes(fp32, 1)
