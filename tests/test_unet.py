import pytest
import torch

from models.digits.backend import DigitsBackend
from models.digits.data import plain_prompts
from models.digits.evaluate import load_evaluator
from models.digits.unet import UNetConfig, build_unet, count_parameters
from models.training import TrainConfig, evaluation_loss, train_denoiser


def test_factory_builds_a_16x16_single_channel_text_conditioned_unet():
    unet = build_unet(UNetConfig())
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 == unet.config.out_channels
    assert unet.config.cross_attention_dim == 384
    assert count_parameters(unet) < 1_000_000


def test_generation_is_deterministic_per_seed():
    backend = DigitsBackend.from_pretrained()
    enc = backend.encode_prompts(["a 3", "a 5"])
    a = backend.generate(enc, steps=4, seed=11)
    b = backend.generate(enc, steps=4, seed=11)
    c = backend.generate(enc, steps=4, seed=12)
    assert a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_batching_does_not_change_samples():
    backend = DigitsBackend.from_pretrained()
    enc = backend.encode_prompts(["a 1", "a 2", "a 3"])
    whole = backend.generate(enc, steps=3, seed=0, batch_size=8)
    split = backend.generate(enc, steps=3, seed=0, batch_size=2)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_samplers_are_chosen_by_name(sampler):
    s = DigitsBackend.from_pretrained().sampler(sampler)
    s.set_timesteps(5)
    assert len(s.timesteps) == 5


def test_unknown_sampler_and_bad_encodings_raise_value_error():
    backend = DigitsBackend.from_pretrained()
    with pytest.raises(ValueError, match="unknown sampler"):
        backend.sampler("euler-magic")
    with pytest.raises(ValueError, match=r"conditioning must have shape \(n, 384\)"):
        backend.generate(torch.zeros(2, 100), steps=2)


@pytest.mark.parametrize("images, problem", [(torch.rand(2, 3, 16, 16), "takes images shaped"),
                                              (torch.rand(2, 1, 8, 8), "takes images shaped"),
                                              (torch.rand(2, 1, 16, 16) * 255, "in \\[0, 1\\]"),
                                              (torch.full((2, 1, 16, 16), float("nan")), "finite")])
def test_images_the_model_cannot_take_are_refused_naming_what_it_takes(images, problem):
    with pytest.raises(ValueError, match=problem):
        DigitsBackend.from_pretrained().encode_images(images)


def test_shipped_base_model_draws_recognisable_digits():
    backend = DigitsBackend.from_pretrained()
    digits = torch.arange(10).repeat(4)
    enc = backend.encode_prompts(plain_prompts(digits.tolist(), seed=3))
    images = backend.generate(enc, steps=20, seed=0)
    predicted, _ = load_evaluator().predict(images)
    assert (predicted == digits).float().mean() >= 0.7


def test_a_short_training_run_lowers_the_loss():
    backend = DigitsBackend(build_unet(UNetConfig(), seed=0))
    from models.digits.data import public_digits

    x, y = public_digits()
    x, y = backend.encode_images(x[:128]), y[:128]
    enc = backend.encode_prompts(plain_prompts(y.tolist(), seed=0))
    before = evaluation_loss(backend, x, enc)
    train_denoiser(backend, backend.denoiser.parameters(), x, enc, TrainConfig(steps=60, batch_size=32, lr=2e-3))
    assert evaluation_loss(backend, x, enc) < 0.7 * before
