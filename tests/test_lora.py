import pytest
import torch

from models.digits.unet import denoise, load_base_unet
from models.lora import (
    add_adapter,
    delta_weight,
    factorize,
    get_adapter_state,
    lora_config,
    lora_from_dict,
    lora_to_dict,
    merge_adapters,
    set_adapter_state,
    set_mix,
    trainable_share,
)
from models.text import PromptEncoder


def _probe(unet):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([100, 700])
    enc = torch.from_numpy(PromptEncoder().encode(["a bold 2", "a thin 9"]))
    with torch.no_grad():
        return denoise(unet, x, t, enc)


def _randomize(unet, name, seed):
    g = torch.Generator().manual_seed(seed)
    state = get_adapter_state(unet, name)
    set_adapter_state(unet, name, {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in state.items()})


def test_adapter_is_under_five_percent_of_the_unet():
    unet = load_base_unet()
    add_adapter(unet, "a", lora_config())
    assert 0 < trainable_share(unet, "a") < 0.05


def test_fresh_adapter_changes_nothing_and_a_trained_one_changes_outputs():
    unet = load_base_unet()
    base = _probe(unet)
    add_adapter(unet, "a", lora_config())
    set_mix(unet, {"a": 1.0})
    torch.testing.assert_close(_probe(unet), base)
    _randomize(unet, "a", 0)
    assert (_probe(unet) - base).abs().max() > 1e-3


def test_adapter_state_round_trips_and_refuses_wrong_names():
    unet = load_base_unet()
    add_adapter(unet, "a", lora_config())
    _randomize(unet, "a", 0)
    state = get_adapter_state(unet, "a")
    add_adapter(unet, "b", lora_config())
    set_adapter_state(unet, "b", state)
    assert all(torch.equal(state[k], get_adapter_state(unet, "b")[k]) for k in state)
    with pytest.raises(ValueError):
        set_adapter_state(unet, "b", {"nope.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        set_adapter_state(unet, "b", {k: torch.zeros(3) for k in state})


def test_weighted_mix_is_linear_in_the_adapter_weights():
    unet = load_base_unet()
    base = _probe(unet)
    add_adapter(unet, "a", lora_config())
    _randomize(unet, "a", 0)
    set_mix(unet, {"a": 1.0})
    full = _probe(unet) - base
    set_mix(unet, {"a": 0.0})
    torch.testing.assert_close(_probe(unet), base, atol=1e-6, rtol=0)
    set_mix(unet, {"a": 0.5})
    half = _probe(unet) - base
    assert 0.2 < float(half.norm() / full.norm()) < 0.8


def test_merging_an_adapter_keeps_outputs():
    unet = load_base_unet()
    add_adapter(unet, "a", lora_config())
    _randomize(unet, "a", 3)
    set_mix(unet, {"a": 1.0})
    expected = _probe(unet)
    merge_adapters(unet, {"a": 1.0})
    torch.testing.assert_close(_probe(unet), expected, atol=1e-4, rtol=1e-4)


def test_factorize_recovers_a_low_rank_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 20, generator=g), torch.randn(12, 3, generator=g)
    delta = delta_weight(a, b, 0.5)
    a2, b2 = factorize(delta, 3, a.shape, b.shape, 0.5)
    torch.testing.assert_close(delta_weight(a2, b2, 0.5), delta, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"rank": 0}, {"rank": -1}, {"rank": 2.5}, {"rank": True}, {"alpha": 0.0},
                                 {"alpha": float("nan")}, {"target_modules": ()}, {"target_modules": "to_v"}])
def test_bad_lora_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        lora_config(**bad)


def test_a_lora_config_survives_its_plain_form():
    config = lora_config(4, 8.0, ("to_v", "conv1"))
    again = lora_from_dict(lora_to_dict(config))
    assert (again.r, again.lora_alpha, sorted(again.target_modules)) == (4, 8.0, ["conv1", "to_v"])


@pytest.mark.parametrize("raw", [{"lora_alpha": 2}, {"r": 2, "dropout": 0.1}, {"r": "2"},
                                 {"r": 2, "target_modules": "to_v"}, ["r", 2]])
def test_a_malformed_plain_lora_config_is_refused_naming_the_problem(raw):
    with pytest.raises(ValueError, match="LoRA"):
        lora_from_dict(raw)


def test_a_drawn_adapter_does_not_depend_on_other_threads_using_the_global_rng():
    import threading

    from models.lora import draw_adapter, lora_config

    unet = load_base_unet()
    reference = draw_adapter(unet, lora_config(), seed=3)
    stop = threading.Event()

    def noise():
        while not stop.is_set():
            torch.randn(4096)

    t = threading.Thread(target=noise)
    t.start()
    try:
        draws = [draw_adapter(unet, lora_config(), seed=3) for _ in range(3)]
    finally:
        stop.set()
        t.join()
    assert all(torch.equal(d[k], reference[k]) for d in draws for k in reference)
    assert any(".lora_A." in k and reference[k].abs().sum() > 0 for k in reference)


def test_train_adapters_moves_only_the_named_adapter_and_freezes_it_again():
    from models.digits.backend import DigitsBackend
    from models.training import TrainConfig, train_adapters

    unet = load_base_unet()
    unet.requires_grad_(False)
    for name in ("a", "b"):
        add_adapter(unet, name, lora_config(), seed=1)
    set_mix(unet, {"a": 1.0, "b": 1.0})
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    backend = DigitsBackend(unet)
    train_adapters(backend, ["a"], backend.encode_images(torch.rand(8, 1, 16, 16)), backend.encode_prompts(["a 3"] * 8),
                   TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=0))
    after = unet.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".a." in k for k in moved)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".a." in n)
