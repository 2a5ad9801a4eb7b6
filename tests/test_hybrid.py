"""Hybrid inference: a sampling run split between the aggregator (first k steps) and the device (the rest)."""

import pytest
import torch

from models.backend import load_backend
from models.digits.unet import BASE_MODEL_DIR


@pytest.fixture(scope="module", params=["digits", "stable-diffusion"])
def backend(request, tiny_sd):
    return load_backend(BASE_MODEL_DIR if request.param == "digits" else tiny_sd)


def conditioning(backend, n=3):
    return torch.randn((n, *backend.conditioning_shape), generator=torch.Generator().manual_seed(1))


def test_running_steps_from_zero_to_the_end_is_sample_bit_for_bit(backend):
    cond = conditioning(backend)
    assert torch.equal(backend.sample(cond, steps=6, seed=3, start=0, stop=6), backend.sample(cond, steps=6, seed=3))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_run_split_at_k_with_the_same_weights_equals_the_unsplit_run(backend, k):
    cond = conditioning(backend)
    first = backend.sample(cond, steps=6, seed=3, stop=k)
    split = backend.sample(cond, steps=6, seed=3, start=k, noise=first)
    torch.testing.assert_close(split, backend.sample(cond, steps=6, seed=3), rtol=0, atol=1e-6)


def test_a_sampler_that_carries_state_between_steps_refuses_a_split(backend):
    with pytest.raises(ValueError, match="cannot run part of a schedule"):
        backend.sample(conditioning(backend), steps=6, sampler="dpm", stop=3)
