"""The edge SDK offline: keys, sealed payloads, quantized LoRA training, persistence."""

import os
import stat

import numpy as np
import pytest
import torch

from edge_sdk import PERSONAL, SHARED, DeviceConfig, EdgeClient, LocalData, MemoryBudgetExceeded
from edge_sdk.protocol.identity import Identity
from edge_sdk.store import AdapterStore, CorruptAdapter
from models.digits.data import make_personas
from models.digits.unet import denoise, load_base_unet
from models.lora import get_adapter_state, lora_config
from models.text import PromptEncoder

AGGREGATOR = Identity.generate()
PERSONA = make_personas(2, 2, seed=3)[0]


@pytest.fixture
def client(tmp_path):
    c = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", profile="simulator", local_steps=15, seed=1))
    c.set_aggregator(AGGREGATOR.public)
    return c


def test_sealed_task_payload_opens_only_with_the_aggregator_key_and_holds_no_text(client):
    prompts = list(PERSONA.train_prompts)
    sealed = client.task_payload(prompts)
    for p in set(prompts):
        assert p.encode() not in sealed
        for word in p.split():
            if len(word) > 4:
                assert word.encode() not in sealed
    with pytest.raises(Exception):
        Identity.generate().open_sealed(sealed)
    from edge_sdk.protocol.tensors import unpack_tensors

    vector = unpack_tensors(AGGREGATOR.open_sealed(sealed), {"task": (384,)})["task"]
    assert float(vector.norm()) == pytest.approx(1.0, abs=1e-5)


def test_noise_knob_moves_the_task_vector_by_the_configured_amount(tmp_path):
    prompts = list(PERSONA.train_prompts)
    clean = EdgeClient(DeviceConfig(data_dir=tmp_path / "a", profile="simulator", task_noise=0.0)).task_vector(prompts)
    for sigma in (0.1, 0.5):
        noisy = EdgeClient(DeviceConfig(data_dir=tmp_path / f"n{sigma}", profile="simulator", task_noise=sigma))
        moves = [np.linalg.norm(noisy.task_vector(prompts, seed=s) - clean) for s in range(50)]
        # noise of expected norm sigma on a unit vector, then renormalised: the chord is ~sigma for small sigma
        expected = np.sqrt(2 - 2 / np.sqrt(1 + sigma**2))
        assert np.mean(moves) == pytest.approx(expected, rel=0.15)


def plain(t: torch.Tensor) -> torch.Tensor:
    """int8 weights compare through their exact dequantised values."""
    t = t.detach()
    return t.dequantize() if type(t) is not torch.Tensor and hasattr(t, "dequantize") else t.clone()


def test_a_round_lowers_the_loss_and_changes_only_lora_tensors(client):
    base_before = {n: plain(p) for n, p in client.unet.named_parameters() if ".lora_" not in n}
    shared_before = get_adapter_state(client.unet, SHARED)
    update = client.train_round(None, LocalData.from_persona(PERSONA), steps=30)
    assert update.loss_after < update.loss_before
    assert update.samples == len(PERSONA.train_prompts)
    for n, p in client.unet.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(plain(p), base_before[n]), n
    shared_after = get_adapter_state(client.unet, SHARED)
    for k in update.delta:
        torch.testing.assert_close(shared_before[k] + update.delta[k], shared_after[k])
    assert any(float(v.abs().max()) > 0 for v in update.delta.values())


def test_int8_base_stays_close_to_fp32(tmp_path):
    fp32 = load_base_unet()
    q = EdgeClient(DeviceConfig(data_dir=tmp_path / "q", profile="simulator", quantization="int8")).unet
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([10, 200, 500, 900])
    enc = torch.from_numpy(PromptEncoder().encode(["a 1", "a 4", "a bold 7", "thin 0"]))
    with torch.no_grad():
        ref, out = denoise(fp32, x, t, enc), denoise(q, x, t, enc)
    assert (out - ref).abs().max() < 0.02  # the stated tolerance for the int8 base
    assert (out - ref).abs().mean() < 2e-3


def test_keys_are_private_and_state_round_trips(tmp_path):
    cfg = DeviceConfig(data_dir=tmp_path / "dev", device_id="dev-1", profile="simulator", seed=1,
                       personalization="residual")  # a personal adapter to persist too
    a = EdgeClient(cfg)
    a.train_round(get_adapter_state(a.unet, SHARED), LocalData.from_persona(PERSONA), steps=5, version=3)
    assert stat.S_IMODE(os.stat(tmp_path / "dev" / "identity.key").st_mode) == 0o600
    b = EdgeClient(cfg)
    assert b.identity.public == a.identity.public
    assert b.shared_version == 3
    for name in (SHARED, PERSONAL):
        sa, sb = get_adapter_state(a.unet, name), get_adapter_state(b.unet, name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_interrupted_save_leaves_the_previous_adapter_loadable(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    first = {"w": torch.ones(3)}
    store.save("shared", first, version=1)

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save("shared", {"w": torch.zeros(3)}, version=2)
    monkeypatch.undo()
    stored = store.load("shared")
    tensors, version = stored.tensors, stored.version
    assert version == 1 and torch.equal(tensors["w"], first["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]  # no temp file left behind


def test_a_corrupted_adapter_file_is_refused(tmp_path):
    store = AdapterStore(tmp_path)
    path = store.save("shared", {"w": torch.arange(8.0)})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptAdapter):
        store.load("shared")


def test_mixing_adapters_changes_generation(client):
    client.train_round(None, LocalData.from_persona(PERSONA), steps=20)
    a = client.generate("a 4", n=2, seed=0, steps=4)
    b = client.generate("a 4", n=2, seed=0, steps=4, mix={SHARED: 0.0})
    assert a.shape == (2, 1, 16, 16) and not torch.equal(a, b)


def test_a_model_the_profile_cannot_train_is_refused_before_training_naming_the_budget(tmp_path):
    with pytest.raises(MemoryBudgetExceeded, match="digits model .*memory budget of 1 MB"):
        EdgeClient(DeviceConfig(data_dir=tmp_path / "d", profile="simulator", memory_budget_mb=1))


@pytest.mark.parametrize("bad", [{"max_lora_rank": 0}, {"local_steps": -1}, {"profile": "toaster"},
                                 {"quantization": "int3"}, {"task_noise": -0.1}, {"batch_size": 0}])
def test_bad_config_raises_a_clear_value_error(tmp_path, bad):
    with pytest.raises(ValueError):
        DeviceConfig(data_dir=tmp_path, **bad)


def test_negative_steps_in_a_round_raise_value_error(client):
    with pytest.raises(ValueError):
        client.train_round(None, LocalData.from_persona(PERSONA), steps=-3)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_device_draws_the_aggregators_initial_adapter_from_its_seed(tmp_path, quantization):
    from aggregator.global_model import GlobalModel
    from edge_sdk.protocol.digest import short, tensor_digest

    device = EdgeClient(DeviceConfig(data_dir=tmp_path / "d", profile="simulator", seed=5, quantization=quantization))
    before = get_adapter_state(device.unet, SHARED)
    drawn = device.seeded_adapter(seed=0, lora=lora_config(2))
    assert short(tensor_digest(drawn)) == short(tensor_digest(GlobalModel(lora_config(2)).initial_adapter(seed=0)))
    assert all(torch.equal(before[k], v) for k, v in get_adapter_state(device.unet, SHARED).items())


def test_a_device_takes_the_fleets_lora_config_and_keeps_it_across_restarts(tmp_path):
    config = DeviceConfig(data_dir=tmp_path / "d", profile="simulator")
    device = EdgeClient(config)
    device.adopt_lora(lora_config(4, 8.0))
    assert device.unet.peft_config[SHARED].r == 4
    device.save()
    again = EdgeClient(config)
    assert (again.shared_lora.r, again.shared_lora.lora_alpha) == (4, 8.0)


def test_a_fleet_rank_above_the_devices_maximum_is_refused_by_name(tmp_path):
    device = EdgeClient(DeviceConfig(data_dir=tmp_path / "d", profile="simulator", max_lora_rank=2))
    with pytest.raises(ValueError, match="max_lora_rank 2"):
        device.adopt_lora(lora_config(4))


def test_the_aggregated_adapter_on_the_devices_base_gives_the_loss_the_device_reported(tmp_path):
    """Issue 18: what a device reports and what the cluster gets back agree. One device's update through
    the uplink codec and the exact rule (ΔW mean, re-factorised) comes back as the same adapter: on the
    int8 base it trained against it gives the device's reported loss, and a second round starts there."""
    from aggregator.global_model import GlobalModel
    from aggregator.rules import ClientUpdate, make_rule
    from edge_sdk.protocol.codecs import ErrorFeedback, make_codec
    from edge_sdk.protocol.tensors import shapes_of

    device = EdgeClient(DeviceConfig(data_dir=tmp_path / "d", profile="simulator", quantization="int8", seed=2))
    data = LocalData.from_persona(PERSONA)
    lora = device.shared_lora
    initial = GlobalModel(lora).initial_adapter(seed=0)
    update = device.train_round(initial, data, steps=6)
    codec = make_codec("fp32")
    delta = codec.decode(ErrorFeedback(codec).encode(update.delta), shapes_of(initial))
    rule = make_rule("exact", clip=3.0)
    aggregated = rule.aggregate(initial, [ClientUpdate.from_delta("d", initial, delta, update.samples)], lora).adapter
    assert device.local_loss(aggregated, data) == pytest.approx(update.loss_after, rel=1e-4)
    second = device.train_round(aggregated, data, steps=6, version=1)
    assert second.loss_before == pytest.approx(update.loss_after, rel=1e-4)
    assert second.loss_after < second.loss_before
