"""Privacy knobs: noise scales, the accountant, clipping as a hard bound, the fleet rotation."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.privacy import (
    DPConfig,
    PrivacyAccountant,
    PrivacyConfigError,
    check_rotation,
    clip_update,
    defend_task_vector,
    fleet_rotation,
    privatize_update,
    sample_prompts,
    task_vector_from_encodings,
    update_norm,
)

SECRET = bytes(range(32))


def unit(dim=384, seed=0):
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------ task vectors


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_task_noise_has_its_configured_scale(noise):
    """Noise of expected norm s on a unit vector leaves a cosine of ~1/sqrt(1+s^2) with it (d=384)."""
    v = unit()
    rng = np.random.default_rng(1)
    cos = np.array([float(defend_task_vector(v, noise, rng) @ v) for _ in range(2000)])
    assert abs(cos.mean() - 1 / math.sqrt(1 + noise**2)) < 0.01
    # the orthogonal part, rescaled by the kept signal, is the noise itself: per-coordinate std noise/sqrt(d)
    out = np.stack([defend_task_vector(v, noise, rng).astype(np.float64) for _ in range(500)])
    along = out @ v
    perp = (out - along[:, None] * v) / along[:, None]
    assert abs(perp.std() - noise / math.sqrt(384)) < 0.04 * noise / math.sqrt(384)


def test_zero_noise_only_normalises():
    v = unit() * 7.0
    out = defend_task_vector(v, 0.0, np.random.default_rng(0))
    assert out.dtype == np.float32 and np.allclose(out, v / 7.0, atol=1e-6)


def test_task_vector_from_encodings_is_the_defended_mean():
    enc = np.stack([unit(seed=s) for s in range(5)])
    a = task_vector_from_encodings(enc, 0.3, np.random.default_rng(3))
    b = defend_task_vector(enc.mean(axis=0), 0.3, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_sample_prompts():
    prompts = [f"p{i}" for i in range(10)]
    assert sample_prompts(prompts, None) == prompts
    assert sample_prompts(prompts, 50) == prompts
    picked = sample_prompts(prompts, 3, np.random.default_rng(0))
    assert len(picked) == 3 and len(set(picked)) == 3 and set(picked) <= set(prompts)
    assert picked == sample_prompts(prompts, 3, np.random.default_rng(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            sample_prompts(prompts, bad)
    with pytest.raises(ValueError):
        sample_prompts([], 1)
    with pytest.raises(ValueError):
        sample_prompts("a prompt", 1)


# ------------------------------------------------------------------ rotation


def test_rotation_preserves_pairwise_cosines_and_is_orthogonal():
    r = fleet_rotation(SECRET)
    assert r.shape == (384, 384)
    assert np.allclose(r @ r.T, np.eye(384), atol=1e-10)
    x = np.stack([unit(seed=s) for s in range(20)])
    y = np.stack([defend_task_vector(v, 0.0, None, r) for v in x]).astype(np.float64)
    assert np.allclose(x @ x.T, y @ y.T, atol=1e-5)
    assert np.abs(x @ y.T).max() < 0.5  # the rotated vectors point elsewhere than the public encoder's


def test_rotation_is_deterministic_per_secret():
    a = fleet_rotation(SECRET)
    assert np.array_equal(a, fleet_rotation(bytes(SECRET)))
    assert np.array_equal(a, fleet_rotation(bytearray(SECRET)))
    other = fleet_rotation(SECRET[:-1] + b"\xff")
    assert not np.allclose(a, other)
    assert np.abs(a - other).max() > 0.1
    assert fleet_rotation(SECRET, dim=16).shape == (16, 16)
    with pytest.raises(ValueError):  # cached arrays are shared: callers must not be able to change them
        a[0, 0] = 1.0


def test_noise_and_rotation_commute_in_distribution():
    """Rotating last keeps the cosine to the rotated clean vector what noise alone gives."""
    r = fleet_rotation(SECRET)
    v = unit()
    rng = np.random.default_rng(5)
    cos = [float(defend_task_vector(v, 1.0, rng, r) @ (r @ v)) for _ in range(400)]
    assert abs(np.mean(cos) - 1 / math.sqrt(2)) < 0.01


# ------------------------------------------------------------------ DP on updates


def make_delta(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(2, 300, generator=g) * scale,
            "a.lora_B.weight": torch.randn(400, 2, generator=g) * scale,
            "c.lora_A.weight": torch.randn(2, 8, 3, 3, generator=g) * scale}


@pytest.mark.parametrize("z,clip", [(0.5, 2.0), (1.0, 0.1), (2.0, 1.0)])
def test_dp_noise_std_matches_its_configuration(z, clip):
    zeros = {"w": torch.zeros(200_000)}  # norm 0: nothing clipped, the output is the noise alone
    out, before = privatize_update(zeros, DPConfig(clip, z), torch.Generator().manual_seed(0))
    assert before == 0.0
    assert abs(float(out["w"].std()) - z * clip) < 0.01 * z * clip
    assert abs(float(out["w"].mean())) < 5 * z * clip / math.sqrt(200_000)


def test_privatize_is_clip_then_noise():
    delta = make_delta(scale=3.0)
    cfg = DPConfig(clip_norm=1.5, noise_multiplier=0.7)
    noisy, before = privatize_update(delta, cfg, torch.Generator().manual_seed(9))
    clipped, before2 = clip_update(delta, cfg.clip_norm)
    assert before == pytest.approx(update_norm(delta)) and before2 == before
    noise = torch.cat([(noisy[k] - clipped[k]).flatten() for k in delta])
    assert abs(float(noise.std()) - cfg.noise_std) < 0.05 * cfg.noise_std
    assert update_norm(clipped) <= cfg.clip_norm
    # reproducible with the same generator seed, different without one
    again, _ = privatize_update(delta, cfg, torch.Generator().manual_seed(9))
    assert all(torch.equal(again[k], noisy[k]) for k in delta)
    fresh, _ = privatize_update(delta, cfg)
    assert not torch.equal(fresh["a.lora_A.weight"], noisy["a.lora_A.weight"])


def test_zero_noise_multiplier_only_clips():
    delta = make_delta(scale=5.0)
    out, before = privatize_update(delta, DPConfig(clip_norm=1.0, noise_multiplier=0.0))
    assert before > 1.0 and update_norm(out) <= 1.0
    ratio = out["a.lora_A.weight"] / delta["a.lora_A.weight"]
    assert torch.allclose(ratio, torch.full_like(ratio, 1.0 / before), rtol=1e-4)  # direction kept


shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 40)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes, log_scale=st.floats(-8, 8), clip=st.floats(1e-4, 1e4), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_no_update_leaves_unclipped(shapes, log_scale, clip, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    if dtype == torch.float16:
        scale = min(scale, 1e2)  # keep float16 inputs finite
    delta = {f"t{i}": (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
             for i, s in enumerate(shapes)}
    clipped, before = clip_update(delta, clip)
    assert before == pytest.approx(update_norm(delta), rel=1e-9)
    assert update_norm(clipped) <= clip
    if before <= clip:
        assert all(torch.equal(clipped[k], delta[k]) for k in delta)
    released, _ = privatize_update(delta, DPConfig(clip, 0.0))
    assert update_norm(released) <= clip
    assert all(released[k].dtype == dtype and released[k].shape == delta[k].shape for k in delta)


def test_updates_that_cannot_be_clipped_are_refused():
    for bad in ({}, {"w": torch.tensor([1.0, float("nan")])}, {"w": torch.tensor([float("inf")])},
                {"w": torch.tensor([1, 2])}):
        with pytest.raises(ValueError):
            privatize_update(bad, DPConfig(1.0, 1.0))


# ------------------------------------------------------------------ accountant


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    def run(z, rounds):
        acc = PrivacyAccountant(delta=1e-5)
        for _ in range(rounds):
            acc.step(DPConfig(1.0, z))
        return acc

    acc = run(1.0, 5)
    assert acc.rounds == 5 and all(b > a for a, b in zip(acc.epsilons, acc.epsilons[1:]))
    assert acc.epsilon() == acc.epsilons[-1]
    finals = [run(z, 4).epsilon() for z in (0.5, 1.0, 2.0, 4.0)]
    assert all(b < a for a, b in zip(finals, finals[1:]))
    assert PrivacyAccountant().epsilon() == 0.0
    assert run(0.0, 1).epsilon() == math.inf
    assert run(1.0, 3).epsilon(delta=1e-3) < run(1.0, 3).epsilon(delta=1e-7)


def test_replace_adjacency_costs_twice_the_sensitivity():
    """Against the aggregator (replace one dataset) a multiplier z buys what z/2 buys for add/remove."""
    local, released, half = PrivacyAccountant(), PrivacyAccountant(adjacency="add_remove"), \
        PrivacyAccountant(adjacency="add_remove")
    for _ in range(3):
        local.step(DPConfig(1.0, 2.0, sample_rate=0.5))
        released.step(DPConfig(1.0, 2.0))
        half.step(DPConfig(1.0, 1.0))
    assert local.epsilon() == pytest.approx(half.epsilon())
    assert released.epsilon() < local.epsilon()
    sampled = PrivacyAccountant(adjacency="add_remove")
    sampled.step(DPConfig(1.0, 2.0, sample_rate=0.1))
    assert sampled.epsilon() < released.epsilons[0]  # amplification by (secret) sampling


def test_accountant_roundtrips_through_json():
    acc = PrivacyAccountant(delta=1e-6, adjacency="add_remove")
    for z in (1.0, 1.0, 2.0):
        acc.step(DPConfig(0.5, z, delta=1e-6, sample_rate=0.2))
    back = PrivacyAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back.epsilons == acc.epsilons and back.rounds == 3
    assert back.adjacency == "add_remove" and back.delta == 1e-6
    back.step(DPConfig(0.5, 2.0, delta=1e-6, sample_rate=0.2))
    assert back.epsilon() > acc.epsilon()
    with pytest.raises(ValueError):
        PrivacyAccountant.from_dict({**acc.to_dict(), "version": 99})
    with pytest.raises(ValueError):
        PrivacyAccountant.from_dict({**acc.to_dict(), "history": [[1.0, 1.5, 1]]})


def test_dp_config_roundtrips():
    cfg = DPConfig(clip_norm=2.0, noise_multiplier=1.1, delta=1e-6, sample_rate=0.3)
    assert DPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.noise_std == pytest.approx(2.2)
    with pytest.raises(ValueError):
        DPConfig.from_dict({**cfg.to_dict(), "epsilon": 1.0})


# ------------------------------------------------------------------ invalid settings


@pytest.mark.parametrize("kwargs", [
    {"clip_norm": 0.0, "noise_multiplier": 1.0}, {"clip_norm": -1.0, "noise_multiplier": 1.0},
    {"clip_norm": float("inf"), "noise_multiplier": 1.0}, {"clip_norm": float("nan"), "noise_multiplier": 1.0},
    {"clip_norm": 1.0, "noise_multiplier": -0.1}, {"clip_norm": 1.0, "noise_multiplier": float("nan")},
    {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.0},
    {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0},
    {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.0},
    {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.5},
    {"clip_norm": True, "noise_multiplier": 1.0}, {"clip_norm": "1", "noise_multiplier": 1.0},
])
def test_invalid_dp_configs_raise(kwargs):
    with pytest.raises(ValueError):
        DPConfig(**kwargs)
    assert issubclass(PrivacyConfigError, ValueError)


def test_invalid_task_vector_settings_raise():
    v = unit()
    rot = fleet_rotation(SECRET)
    bad_calls = [
        lambda: defend_task_vector(v, -0.1),
        lambda: defend_task_vector(v, float("nan")),
        lambda: defend_task_vector(np.zeros(384), 0.1),
        lambda: defend_task_vector(np.full(384, np.nan), 0.1),
        lambda: defend_task_vector(np.ones((2, 384)), 0.1),
        lambda: defend_task_vector(v, 0.1, rng=0),
        lambda: defend_task_vector(v, 0.0, None, rot[:10, :10]),
        lambda: defend_task_vector(v, 0.0, None, rot * 2.0),
        lambda: task_vector_from_encodings(np.zeros((0, 384))),
        lambda: fleet_rotation(b"short"),
        lambda: fleet_rotation("a string secret is not bytes" * 2),
        lambda: fleet_rotation(SECRET, dim=0),
        lambda: check_rotation(np.eye(3) * np.array([1.0, 1.0, 1.1]), 3),
        lambda: PrivacyAccountant(delta=0.0),
        lambda: PrivacyAccountant(adjacency="swap"),
        lambda: clip_update(make_delta(), 0.0),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
