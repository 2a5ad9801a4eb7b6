import pytest
import torch

from aggregator.downlink import DownlinkMirror
from edge_sdk.protocol.codecs import make_codec


def adapter(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 8, generator=g) * scale, "m.lora_B.weight": torch.randn(6, 2, generator=g) * scale}


SHAPES = {k: tuple(v.shape) for k, v in adapter(0).items()}


def device_apply(held, payload):
    decoded = make_codec(payload.codec).decode(payload.data, SHAPES)
    return decoded if payload.base_version < 0 else {k: held[k] + decoded[k] for k in decoded}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk:0.25+int8"])
def test_device_reconstruction_matches_the_mirror_exactly(codec):
    m = DownlinkMirror(codec)
    first = m.payload("d", 0, 1, adapter(1))
    held = device_apply(None, first)
    assert first.base_version == -1
    assert m.confirm("d", 0, 1) is not None
    second = m.payload("d", 0, 2, {k: v + 0.01 for k, v in adapter(1).items()})
    assert (second.base_cluster, second.base_version) == (0, 1)
    new = device_apply(held, second)
    mirrored = m.confirm("d", 0, 2)
    assert all(torch.equal(new[k], mirrored[k]) for k in new)


def test_a_delta_is_much_smaller_than_the_adapter_under_sparsification():
    m = DownlinkMirror("topk:0.1+int8")
    full = m.payload("d", 0, 1, adapter(1))
    m.confirm("d", 0, 1)
    delta = m.payload("d", 0, 2, {k: v + 0.001 * torch.randn_like(v) for k, v in adapter(1).items()})
    assert delta.base_version == 1 and len(delta.data) <= len(full.data)


def test_resending_before_confirmation_gives_identical_bytes():
    m = DownlinkMirror("int8")
    m.payload("d", 0, 1, adapter(1))
    m.confirm("d", 0, 1)
    target = adapter(2)
    assert m.payload("d", 0, 2, target).data == m.payload("d", 0, 2, target).data


def test_unconfirmed_starts_are_not_trusted_and_forget_resets():
    m = DownlinkMirror("fp32")
    m.payload("d", 0, 1, adapter(1))
    assert m.confirm("d", 3, 9) is None  # the device says it trained from something we never sent
    m.confirm("d", 0, 1)
    m.forget("d")
    assert m.payload("d", 0, 2, adapter(2)).base_version == -1


def test_the_fleets_initial_adapter_travels_as_its_seed():
    from edge_sdk.protocol.digest import short, tensor_digest
    from edge_sdk.protocol.messages import SEEDED_CODEC, SeededAdapter

    initial = adapter(7)
    m = DownlinkMirror("int8", seeded=(7, initial))
    first = m.payload("d", 0, 1, {k: v.clone() for k, v in initial.items()})
    assert first.codec == SEEDED_CODEC and len(first.data) < 40
    assert SeededAdapter.decode(first.data) == SeededAdapter(7, short(tensor_digest(initial)))
    mirrored = m.confirm("d", 0, 1)
    assert all(torch.equal(mirrored[k], initial[k]) for k in initial)


def test_a_device_that_cannot_draw_the_seed_gets_the_adapter_itself():
    initial = adapter(7)
    m = DownlinkMirror("int8", seeded=(7, initial))
    m.forget("d")  # what the aggregator does on the device's need_full
    again = m.payload("d", 0, 1, initial)
    assert again.codec == "int8" and again.base_version == -1


def test_other_adapters_and_the_fedavg_baseline_are_never_seeded():
    initial = adapter(7)
    assert DownlinkMirror("int8", seeded=(7, initial)).payload("d", 0, 1, adapter(8)).codec == "int8"
    assert DownlinkMirror("fp32", deltas=False, seeded=(7, initial)).payload("d", 0, 1, initial).codec == "fp32"
