"""Tensors on the wire: safetensors bytes, checked against what the receiver expects.

safetensors is the format because it cannot execute code on load and its header is
bounded by the buffer; we add the checks a federated receiver needs on top: names and
shapes match the adapter template, dtypes are floating point, and every value is finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edge_sdk.protocol.errors import Refusal, RefusedMessage

Shapes = Mapping[str, tuple[int, ...]]


def pack_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata=dict(metadata) if metadata else None)


def unpack_tensors(data: bytes, expected: Shapes | None = None, *, max_bytes: int = 256 * 1024 * 1024,
                   allow_int: bool = False) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; refuse malformed, oversized, mismatched or non-finite content."""
    if len(data) > max_bytes:
        raise RefusedMessage(Refusal.OVERSIZED, f"tensor payload of {len(data)} bytes exceeds {max_bytes}")
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # SafetensorError, OverflowError, ... : all mean unreadable bytes
        raise RefusedMessage(Refusal.MALFORMED, f"not a safetensors buffer ({type(e).__name__})") from None
    if expected is not None:
        check_shapes(tensors, expected)
    for name, t in tensors.items():
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise RefusedMessage(Refusal.NON_FINITE, f"tensor {name} holds NaN or Inf")
        elif not allow_int:
            raise RefusedMessage(Refusal.BAD_TENSORS, f"tensor {name} has non-float dtype {t.dtype}")
    return tensors


def check_shapes(tensors: Mapping[str, torch.Tensor], expected: Shapes) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RefusedMessage(Refusal.BAD_TENSORS,
                             f"tensor names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise RefusedMessage(Refusal.BAD_TENSORS,
                                 f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}
