"""Update codecs: how adapter tensors shrink before they cross the broker.

A codec turns ``{name: float tensor}`` into bytes and back. The bytes are always a
safetensors buffer (names, shapes and dtypes stay lossless and self-describing), so a
receiver can validate them like any other tensor payload before trusting a value:

* ``fp32``  - raw, the baseline.
* ``fp16``  - half precision; relative error <= 2^-11 per value.
* ``int8`` / ``int4`` - stochastic rounding to 255 / 15 levels with one scale per row
  (first dimension); unbiased, error per value <= row max / 127 (int8) or / 7 (int4).
  int4 packs two values per byte.
* ``topk:F`` - keeps the fraction F of largest-magnitude entries of each tensor (index
  + value). Lossy and biased on its own; pair it with ``ErrorFeedback``.
* ``topk:F+int8`` / ``topk:F+int4`` - top-k whose kept values are then quantized.

``ErrorFeedback`` keeps, on the device, what the codec dropped and adds it to the next
update (Seide et al., 2014; Stich et al., "Sparsified SGD with Memory", 2018), so the
running sum of decoded updates tracks the running sum of true updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from edge_sdk.errors import Refusal, RefusedMessage
from edge_sdk.tensors import Shapes, pack_tensors, unpack_tensors

Tensors = dict[str, torch.Tensor]


class Codec(ABC):
    name: str

    @abstractmethod
    def encode(self, tensors: Mapping[str, torch.Tensor]) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes, expected: Shapes) -> Tensors:
        """Decode and validate against ``expected`` names/shapes; refuses with RefusedMessage."""

    def roundtrip(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        return self.decode(self.encode(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


class Float32Codec(Codec):
    name = "fp32"

    def encode(self, tensors):
        return pack_tensors({k: v.float() for k, v in tensors.items()})

    def decode(self, data, expected):
        out = unpack_tensors(data, expected)
        for k, v in out.items():
            if v.dtype != torch.float32:
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{k} is {v.dtype}, fp32 codec expects float32")
        return out


class Float16Codec(Codec):
    name = "fp16"

    def encode(self, tensors):
        return pack_tensors({k: v.to(torch.float16) for k, v in tensors.items()})

    def decode(self, data, expected):
        out = unpack_tensors(data, expected)
        for k, v in out.items():
            if v.dtype != torch.float16:
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{k} is {v.dtype}, fp16 codec expects float16")
        return {k: v.float() for k, v in out.items()}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


class QuantCodec(Codec):
    """Stochastic ``bits``-bit quantization with a per-row fp16 scale (bits in {8, 4})."""

    def __init__(self, bits: int, seed: int | None = None) -> None:
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.levels = 127 if bits == 8 else 7
        self.name = f"int{bits}"
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _rows(x.float())
        scale = (rows.abs().amax(dim=1) / self.levels).to(torch.float16).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = rows / safe[:, None]
        low = y.floor()
        q = low + (torch.rand(y.shape, generator=self.generator) < (y - low)).float()
        q = q.clamp(-self.levels, self.levels).to(torch.int8)
        return q, scale.to(torch.float16)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return (q.float() * scale.float()[:, None]).reshape(shape)

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q
        flat = (q.flatten().to(torch.int16) + 8).to(torch.uint8)  # 1..15
        if flat.numel() % 2:
            flat = torch.cat([flat, torch.full((1,), 8, dtype=torch.uint8)])
        return flat[0::2] | (flat[1::2] << 4)

    def unpack(self, packed: torch.Tensor, numel: int, rows: int, name: str) -> torch.Tensor:
        if self.bits == 8:
            if packed.dtype != torch.int8 or packed.numel() != numel:
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{name}: int8 payload has the wrong size or dtype")
            return packed.reshape(rows, -1)
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
            raise RefusedMessage(Refusal.BAD_TENSORS, f"{name}: int4 payload has the wrong size or dtype")
        lo, hi = (packed & 0x0F), (packed >> 4)
        flat = torch.stack([lo, hi], dim=1).flatten()[:numel].to(torch.int16) - 8
        if bool((flat.abs() > self.levels).any()):
            raise RefusedMessage(Refusal.MALFORMED, f"{name}: int4 value out of range")
        return flat.to(torch.int8).reshape(rows, -1)

    def encode(self, tensors):
        out = {}
        for k, v in tensors.items():
            q, scale = self.quantize(v)
            out[f"{k}::q"] = self.pack(q)
            out[f"{k}::scale"] = scale
        return pack_tensors(out)

    def decode(self, data, expected):
        raw = unpack_tensors(data, None, allow_int=True)
        _check_names(raw, expected, ("q", "scale"))
        out = {}
        for k, shape in expected.items():
            numel = _numel(shape)
            rows = shape[0] if len(shape) >= 2 else 1
            scale = raw[f"{k}::scale"]
            if scale.dtype != torch.float16 or tuple(scale.shape) != (rows,):
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{k}: scale must be float16 of shape ({rows},)")
            q = self.unpack(raw[f"{k}::q"], numel, rows, k)
            out[k] = self.dequantize(q, scale, tuple(shape))
        return out


class TopKCodec(Codec):
    """Largest-magnitude ``fraction`` of each tensor, values stored by ``values`` (a codec)."""

    def __init__(self, fraction: float, values: Codec | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.values = values or Float16Codec()
        self.name = f"topk:{fraction:g}" + ("" if values is None else f"+{self.values.name}")

    def select(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.flatten()
        k = max(1, int(round(self.fraction * flat.numel())))
        return flat.abs().topk(k, sorted=False).indices.sort().values

    def encode(self, tensors):
        picked, index = {}, {}
        for k, v in tensors.items():
            idx = self.select(v)
            index[f"{k}::idx"] = idx.to(torch.int32)
            index[f"{k}::shape"] = torch.tensor(tuple(v.shape), dtype=torch.int64)
            picked[k] = v.flatten()[idx].reshape(1, -1)
        inner = self.values.encode(picked)
        return pack_tensors(index | {"::values": torch.frombuffer(bytearray(inner), dtype=torch.uint8)})

    def decode(self, data, expected):
        raw = unpack_tensors(data, None, allow_int=True)
        names = set(raw) - {"::values"}
        if "::values" not in raw or names != {f"{k}::{p}" for k in expected for p in ("idx", "shape")}:
            raise RefusedMessage(Refusal.BAD_TENSORS, "top-k payload names do not match the adapter")
        value_shapes = {}
        for k, shape in expected.items():
            if raw[f"{k}::shape"].tolist() != list(shape):
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{k} has shape {raw[f'{k}::shape'].tolist()}, expected {list(shape)}")
            idx = raw[f"{k}::idx"]
            if idx.dtype != torch.int32 or idx.ndim != 1:
                raise RefusedMessage(Refusal.BAD_TENSORS, f"{k}: indices must be a 1-d int32 tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= _numel(shape)):
                raise RefusedMessage(Refusal.MALFORMED, f"{k}: index out of range")
            value_shapes[k] = (1, idx.numel())
        values = self.values.decode(bytes(raw["::values"].numpy().tobytes()), value_shapes)
        out = {}
        for k, shape in expected.items():
            dense = torch.zeros(_numel(shape))
            dense[raw[f"{k}::idx"].long()] = values[k].flatten()
            out[k] = dense.reshape(shape)
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _check_names(raw: Mapping[str, torch.Tensor], expected: Shapes, parts: tuple[str, ...]) -> None:
    want = {f"{k}::{p}" for k in expected for p in parts}
    if set(raw) != want:
        missing = sorted(want - set(raw))[:3]
        unexpected = sorted(set(raw) - want)[:3]
        raise RefusedMessage(Refusal.BAD_TENSORS, f"payload names differ: missing {missing}, unexpected {unexpected}")


def make_codec(spec: str, seed: int | None = None) -> Codec:
    """``fp32``, ``fp16``, ``int8``, ``int4``, ``topk:0.1``, ``topk:0.1+int8`` ..."""
    spec = spec.strip()
    if spec == "fp32":
        return Float32Codec()
    if spec == "fp16":
        return Float16Codec()
    if spec in ("int8", "int4"):
        return QuantCodec(int(spec[3:]), seed)
    if spec.startswith("topk:"):
        head, _, tail = spec[5:].partition("+")
        try:
            fraction = float(head)
        except ValueError:
            raise ValueError(f"bad top-k fraction in codec {spec!r}") from None
        return TopKCodec(fraction, make_codec(tail, seed) if tail else None)
    raise ValueError(f"unknown codec {spec!r}; use fp32, fp16, int8, int4, topk:F or topk:F+int8")


def decode_payload(codec_name: str, data: bytes, expected: Shapes, allowed: set[str] | None = None) -> Tensors:
    """Receiver side: refuse unknown or disallowed codecs with a reason, then decode."""
    if allowed is not None and codec_name not in allowed:
        raise RefusedMessage(Refusal.BAD_TENSORS, f"codec {codec_name!r} is not accepted here")
    try:
        codec = make_codec(codec_name)
    except ValueError as e:
        raise RefusedMessage(Refusal.MALFORMED, str(e)) from None
    return codec.decode(data, expected)


class ErrorFeedback:
    """Device-side memory of what compression dropped, added back into the next update."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: Tensors = {}

    def encode(self, update: Mapping[str, torch.Tensor]) -> bytes:
        corrected = {k: v.float() + self.residual.get(k, torch.zeros_like(v, dtype=torch.float32)) for k, v in update.items()}
        data = self.codec.encode(corrected)
        decoded = self.codec.decode(data, {k: tuple(v.shape) for k, v in corrected.items()})
        self.residual = {k: corrected[k] - decoded[k] for k in corrected}
        return data

    def state(self) -> Tensors:
        return dict(self.residual)

    def load_state(self, residual: Mapping[str, torch.Tensor]) -> None:
        self.residual = {k: v.float() for k, v in residual.items()}
