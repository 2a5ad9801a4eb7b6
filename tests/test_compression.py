import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol.codecs import ROW, ErrorFeedback, make_codec
from edge_sdk.protocol.errors import RefusedMessage


def sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 32, generator=g), "b.lora_B.weight": torch.randn(16, 4, generator=g) * 0.01,
            "c.lora_A.weight": torch.randn(2, 8, 3, 3, generator=g)}


def test_fp32_is_lossless():
    x = sample()
    out = make_codec("fp32").roundtrip(x)
    assert all(torch.equal(out[k], x[k]) for k in x)


def test_fp16_error_is_within_half_precision():
    x = sample()
    out = make_codec("fp16").roundtrip(x)
    for k in x:
        assert ((out[k] - x[k]).abs() <= x[k].abs() * 2**-10 + 1e-7).all()


@pytest.mark.parametrize("bits,levels", [(8, 127), (4, 7)])
def test_quantization_error_is_bounded_by_one_step_per_row(bits, levels):
    x = sample()
    out = make_codec(f"int{bits}", seed=0).roundtrip(x)
    for k, v in x.items():
        flat, err = v.flatten(), (out[k] - v).flatten().abs()
        for row in range(0, flat.numel(), ROW):  # a row: 64 consecutive values of one tensor
            step = flat[row:row + ROW].abs().max() / levels
            assert (err[row:row + ROW] <= step * 1.01 + 1e-6).all()


def test_stochastic_rounding_is_unbiased():
    x = {"w": torch.full((1, 1000), 0.3) * torch.linspace(0.1, 1.0, 1000)}
    codec = make_codec("int4", seed=1)
    mean = sum(codec.roundtrip(x)["w"] for _ in range(400)) / 400
    assert (mean - x["w"]).abs().max() < 0.02


def test_int4_packs_two_values_per_byte():
    x = {"w": torch.randn(64, 64)}
    assert len(make_codec("int4").encode(x)) < 0.6 * len(make_codec("int8").encode(x))


def test_topk_keeps_only_the_largest_entries():
    x = {"w": torch.tensor([[0.1, -5.0, 0.2, 3.0, 0.0, -0.05, 0.01, 0.3, 0.02, 0.4]])}
    out = make_codec("topk:0.2").roundtrip(x)
    nonzero = out["w"].nonzero()[:, 1].tolist()
    assert nonzero == [1, 3]


def test_error_feedback_running_sum_tracks_the_true_sum():
    codec = make_codec("topk:0.1+int8", seed=0)
    ef = ErrorFeedback(codec)
    true_sum = {k: torch.zeros_like(v) for k, v in sample().items()}
    sent_sum = {k: torch.zeros_like(v) for k, v in sample().items()}
    shapes = {k: tuple(v.shape) for k, v in true_sum.items()}
    for step in range(60):
        u = sample(step)
        data = ef.encode(u)
        decoded = codec.decode(data, shapes)
        for k in u:
            true_sum[k] += u[k]
            sent_sum[k] += decoded[k]
    for k in true_sum:
        # what is still missing is exactly the residual kept on the device, not an ever-growing drift
        torch.testing.assert_close(sent_sum[k] + ef.residual[k], true_sum[k], atol=1e-4, rtol=1e-4)
        assert ef.residual[k].norm() < 0.35 * true_sum[k].norm() + 1.0


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "int4", "topk:0.1", "topk:0.1+int8", "topk:0.05+int4"])
def test_names_and_shapes_survive_every_codec(spec):
    x = sample()
    out = make_codec(spec, seed=0).roundtrip(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in x.items()}


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "int4", "topk:0.1+int8"])
def test_decoding_against_the_wrong_template_is_refused(spec):
    codec = make_codec(spec, seed=0)
    data = codec.encode(sample())
    with pytest.raises(RefusedMessage):
        codec.decode(data, {"a.lora_A.weight": (4, 32)})
    with pytest.raises(RefusedMessage):
        codec.decode(data, {k: (1,) + tuple(v.shape) for k, v in sample().items()})


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["fp32", "fp16", "int8", "int4", "topk:0.1+int8"]), st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_payloads_are_refused_or_decode_to_finite_tensors(spec, pos, value):
    codec = make_codec(spec, seed=0)
    data = bytearray(codec.encode(sample()))
    data[pos % len(data)] = value
    shapes = {k: tuple(v.shape) for k, v in sample().items()}
    try:
        out = codec.decode(bytes(data), shapes)
    except RefusedMessage:
        return
    assert all(torch.isfinite(v).all() for v in out.values())


def test_unknown_codec_is_a_value_error():
    with pytest.raises(ValueError):
        make_codec("zip9")


def test_payloads_carry_values_not_per_tensor_headers():
    """A rank-2 adapter's update at 10% top-k + int8 costs ~3 bytes per kept value, whatever its tensor count."""
    many = {f"m{i}.lora_A.weight": torch.randn(2, 60) for i in range(50)}
    n = sum(v.numel() for v in many.values())
    assert len(make_codec("fp32").encode(many)) < 4 * n + 200
    assert len(make_codec("topk:0.1+int8", seed=0).encode(many)) < 3.2 * 0.1 * n + 200


def test_a_payload_for_another_codec_is_refused():
    data = make_codec("int8", seed=0).encode(sample())
    with pytest.raises(RefusedMessage):
        make_codec("int4", seed=0).decode(data, {k: tuple(v.shape) for k, v in sample().items()})
