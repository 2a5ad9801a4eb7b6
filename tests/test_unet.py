import pytest
import torch

from models.digits.data import plain_prompts
from models.digits.evaluate import load_evaluator
from models.digits.unet import UNetConfig, build_unet, count_parameters, generate, load_base_unet, make_sampler
from models.text import PromptEncoder
from models.training import TrainConfig, evaluation_loss, train_denoiser


def test_factory_builds_a_16x16_single_channel_text_conditioned_unet():
    unet = build_unet(UNetConfig())
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1 == unet.config.out_channels
    assert unet.config.cross_attention_dim == 384
    assert count_parameters(unet) < 1_000_000


def test_generation_is_deterministic_per_seed():
    unet = load_base_unet()
    enc = torch.from_numpy(PromptEncoder().encode(["a 3", "a 5"]))
    a = generate(unet, enc, steps=4, seed=11)
    b = generate(unet, enc, steps=4, seed=11)
    c = generate(unet, enc, steps=4, seed=12)
    assert a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_batching_does_not_change_samples():
    unet = load_base_unet()
    enc = torch.from_numpy(PromptEncoder().encode(["a 1", "a 2", "a 3"]))
    whole = generate(unet, enc, steps=3, seed=0, batch_size=8)
    split = generate(unet, enc, steps=3, seed=0, batch_size=2)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_samplers_are_chosen_by_name(sampler):
    s = make_sampler(sampler)
    s.set_timesteps(5)
    assert len(s.timesteps) == 5


def test_unknown_sampler_and_bad_encodings_raise_value_error():
    with pytest.raises(ValueError):
        make_sampler("euler-magic")
    with pytest.raises(ValueError):
        generate(load_base_unet(), torch.zeros(2, 100), steps=2)


def test_shipped_base_model_draws_recognisable_digits():
    unet = load_base_unet()
    digits = torch.arange(10).repeat(4)
    enc = torch.from_numpy(PromptEncoder().encode(plain_prompts(digits.tolist(), seed=3)))
    images = generate(unet, enc, steps=20, seed=0)
    predicted, _ = load_evaluator().predict(images)
    assert (predicted == digits).float().mean() >= 0.7


def test_a_short_training_run_lowers_the_loss():
    unet = build_unet(UNetConfig(), seed=0)
    from models.digits.data import public_digits

    x, y = public_digits()
    x, y = x[:128], y[:128]
    enc = torch.from_numpy(PromptEncoder().encode(plain_prompts(y.tolist(), seed=0)))
    before = evaluation_loss(unet, x, enc)
    train_denoiser(unet, unet.parameters(), x, enc, TrainConfig(steps=60, batch_size=32, lr=2e-3))
    assert evaluation_loss(unet, x, enc) < 0.7 * before
