"""Update codecs: how adapter tensors shrink before they cross the broker.

A codec turns ``{name: float tensor}`` into bytes and back. Both sides already know the
adapter's layout (names and shapes: the receiver passes it to ``decode``), so the bytes
carry the values and an 8-byte digest of the layout instead of a header per tensor; a
payload for any other layout is refused, so names and shapes stay exact without being
spelled out. Tensors are laid end to end in sorted-name order. The container is a
msgpack map whose fields are checked for type and size before any value is trusted.

* ``fp32``  - raw, the baseline.
* ``fp16``  - half precision; relative error <= 2^-11 per value.
* ``int8`` / ``int4`` - stochastic rounding to 255 / 15 levels with one fp16 scale per
  row of 64 consecutive values of a tensor (a tensor's last row may be shorter); unbiased,
  error per value <= row max / 127 (int8) or / 7 (int4). int4 packs two values per byte.
* ``topk:F`` - keeps the fraction F of largest-magnitude entries of the whole adapter
  (uint16/uint32 indices + fp16 values). Lossy and biased on its own; pair it with
  ``ErrorFeedback``.
* ``topk:F+int8`` / ``topk:F+int4`` - top-k whose kept values are then quantized.

``benchmarks/comm.py`` measures the bytes of each and what they cost in quality (docs/results.md).

``ErrorFeedback`` keeps, on the device, what the codec dropped and adds it to the next
update (Seide et al., 2014; Stich et al., "Sparsified SGD with Memory", 2018), so the
running sum of decoded updates tracks the running sum of true updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import msgpack
import numpy as np
import torch

from edge_sdk.protocol.digest import layout_digest, short
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.tensors import Shapes

Tensors = dict[str, torch.Tensor]
ROW = 64  # values per quantization scale
MAX_VALUES = 64 * 1024 * 1024


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().float().flatten() for k in sorted(tensors)]) if tensors else torch.zeros(0)


def unflatten(flat: torch.Tensor, shapes: Shapes) -> Tensors:
    out, at = {}, 0
    for k in sorted(shapes):
        n = _numel(shapes[k])
        out[k] = flat[at:at + n].reshape(tuple(shapes[k])).clone()
        at += n
    return out


def _rows(n: int) -> list[int]:
    """Lengths of the quantization rows of ``n`` consecutive values: ROW each, the last shorter."""
    return [ROW] * (n // ROW) + ([n % ROW] if n % ROW else [])


def _segments(shapes: Shapes) -> list[int]:
    """The quantization rows of an adapter: each tensor cut on its own, so no row spans two tensors."""
    return [r for k in sorted(shapes) for r in _rows(_numel(shapes[k]))]


class Codec(ABC):
    name: str

    @abstractmethod
    def encode_flat(self, flat: torch.Tensor, rows: list[int]) -> dict: ...

    @abstractmethod
    def decode_flat(self, fields: dict, n: int, rows: list[int]) -> torch.Tensor:
        """Values from checked fields; refuses with RefusedMessage."""

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> bytes:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        fields = self.encode_flat(flatten(tensors), _segments(shapes))
        return msgpack.packb({"codec": self.name, "layout": short(layout_digest(shapes))} | fields, use_bin_type=True)

    def decode(self, data: bytes, expected: Shapes) -> Tensors:
        """Decode and validate against ``expected`` names/shapes; refuses with RefusedMessage."""
        n = sum(_numel(s) for s in expected.values())
        if n > MAX_VALUES:
            raise RefusedMessage(Refusal.OVERSIZED, f"an adapter of {n} values is larger than accepted")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=8 * MAX_VALUES)
        except Exception as e:
            raise RefusedMessage(Refusal.MALFORMED, f"{self.name} payload is not msgpack ({type(e).__name__})") from None
        if not isinstance(raw, dict) or raw.get("codec") != self.name:
            raise RefusedMessage(Refusal.MALFORMED, f"not a {self.name} payload")
        if raw.get("layout") != short(layout_digest(expected)):
            raise RefusedMessage(Refusal.BAD_TENSORS, f"{self.name} payload is for another adapter layout "
                                                      "(tensor names or shapes differ)")
        fields = {k: v for k, v in raw.items() if k not in ("codec", "layout")}
        flat = self.decode_flat(fields, n, _segments(expected))
        if not bool(torch.isfinite(flat).all()):
            raise RefusedMessage(Refusal.NON_FINITE, f"{self.name} payload decodes to NaN or Inf")
        return unflatten(flat, expected)

    def roundtrip(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        return self.decode(self.encode(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


def _field(fields: dict, names: tuple[str, ...], codec: str) -> list:
    if set(fields) != set(names) or not all(isinstance(fields[k], bytes) for k in names):
        raise RefusedMessage(Refusal.MALFORMED, f"{codec} payload fields {sorted(map(str, fields))} != {list(names)}")
    return [fields[k] for k in names]


def _array(buf: bytes, dtype, count: int, what: str) -> np.ndarray:
    if len(buf) != count * np.dtype(dtype).itemsize:
        raise RefusedMessage(Refusal.BAD_TENSORS, f"{what}: {len(buf)} bytes, expected {count} x {np.dtype(dtype)}")
    return np.frombuffer(buf, dtype=dtype)


class FloatCodec(Codec):
    """Values as IEEE floats: ``fp32`` (lossless) or ``fp16``."""

    def __init__(self, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.name = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}[self.dtype]

    def encode_flat(self, flat, rows):
        return {"values": flat.numpy().astype(self.dtype).tobytes()}

    def decode_flat(self, fields, n, rows):
        (buf,) = _field(fields, ("values",), self.name)
        return torch.from_numpy(_array(buf, self.dtype, n, self.name).astype(np.float32))


class QuantCodec(Codec):
    """Stochastic ``bits``-bit quantization with an fp16 scale per row (bits in {8, 4})."""

    def __init__(self, bits: int, seed: int | None = None) -> None:
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.levels = 127 if bits == 8 else 7
        self.name = f"int{bits}"
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)

    def encode_flat(self, flat, rows):
        scales = torch.stack([r.abs().amax() if r.numel() else torch.tensor(0.0) for r in flat.split(rows)]) \
            if rows else torch.zeros(0)
        scales = (scales / self.levels).to(torch.float16)
        per_value = torch.repeat_interleave(scales.float(), torch.tensor(rows, dtype=torch.long)) if rows else flat
        safe = torch.where(per_value > 0, per_value, torch.ones_like(per_value))
        y = flat / safe
        low = y.floor()
        q = (low + (torch.rand(y.shape, generator=self.generator) < (y - low)).float()).clamp(-self.levels, self.levels)
        q = q.to(torch.int8).numpy()
        if self.bits == 4:
            nib = (q.astype(np.int16) + 8).astype(np.uint8)  # 1..15
            if nib.size % 2:
                nib = np.concatenate([nib, np.array([8], dtype=np.uint8)])
            q = nib[0::2] | (nib[1::2] << 4)
        return {"q": q.tobytes(), "scales": scales.numpy().tobytes()}

    def decode_flat(self, fields, n, rows):
        qbuf, sbuf = _field(fields, ("q", "scales"), self.name)
        scales = _array(sbuf, np.float16, len(rows), f"{self.name} scales").astype(np.float32)
        if self.bits == 8:
            q = _array(qbuf, np.int8, n, f"{self.name} values").astype(np.float32)
        else:
            packed = _array(qbuf, np.uint8, (n + 1) // 2, f"{self.name} values")
            nib = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:n].astype(np.int16) - 8
            if n and (nib < -self.levels).any():
                raise RefusedMessage(Refusal.MALFORMED, f"{self.name}: value out of range")
            q = nib.astype(np.float32)
        if n and np.abs(q).max() > self.levels:
            raise RefusedMessage(Refusal.MALFORMED, f"{self.name}: value out of range")
        return torch.from_numpy(q * np.repeat(scales, rows))


class TopKCodec(Codec):
    """Largest-magnitude ``fraction`` of the whole adapter, values stored by ``values`` (a codec)."""

    def __init__(self, fraction: float, values: Codec | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.values = values or FloatCodec(np.float16)
        self.name = f"topk:{fraction:g}" + ("" if values is None else f"+{self.values.name}")

    def count(self, n: int) -> int:
        return min(n, max(1, int(round(self.fraction * n)))) if n else 0

    @staticmethod
    def index_dtype(n: int):
        return np.uint16 if n <= 2**16 else np.uint32

    def encode_flat(self, flat, rows):
        k = self.count(flat.numel())
        idx = flat.abs().topk(k, sorted=False).indices.sort().values
        kept = flat[idx]
        inner = self.values.encode_flat(kept, _rows(k))
        return {"index": idx.numpy().astype(self.index_dtype(flat.numel())).tobytes()} | {f"v.{f}": b for f, b in inner.items()}

    def decode_flat(self, fields, n, rows):
        if "index" not in fields or not isinstance(fields["index"], bytes):
            raise RefusedMessage(Refusal.MALFORMED, f"{self.name} payload has no index")
        k = self.count(n)
        idx = _array(fields["index"], self.index_dtype(n), k, f"{self.name} index").astype(np.int64)
        if k and (idx.max() >= n or (np.diff(idx) <= 0).any()):
            raise RefusedMessage(Refusal.MALFORMED, f"{self.name}: indices out of range or not strictly increasing")
        inner = {f[2:]: b for f, b in fields.items() if f.startswith("v.")}
        if len(inner) != len(fields) - 1:
            raise RefusedMessage(Refusal.MALFORMED, f"{self.name} payload has unknown fields")
        kept = self.values.decode_flat(inner, k, _rows(k))
        dense = torch.zeros(n)
        dense[torch.from_numpy(idx)] = kept
        return dense


def make_codec(spec: str, seed: int | None = None) -> Codec:
    """``fp32``, ``fp16``, ``int8``, ``int4``, ``topk:0.1``, ``topk:0.1+int8`` ..."""
    spec = spec.strip()
    if spec == "fp32":
        return FloatCodec(np.float32)
    if spec == "fp16":
        return FloatCodec(np.float16)
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
