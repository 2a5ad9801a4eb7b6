"""External weight files (``.ptd``) and the adapter slot they fill: the exporter–device contract.

An exported program carries one LoRA *adapter slot* of a fixed rank on the modules LoRA
targets. The slot's tensors live in their own ``adapter.ptd``, the base weights in
``base.ptd``; the program (``model.pte``) refers to both by key. Any adapter, or any
weighted mix of adapters, whose ranks add up to at most the slot's rank fits the slot
exactly (ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …]), so a device swaps in a
new adapter by writing a new ``adapter.ptd`` — no re-export.

XNNPACK stores the weights it owns under the SHA-256 of their bytes, in its own layout
(OHWI for convolutions, IHWO where a convolution has one input channel). The exporter
finds each key once, from a probe adapter with distinct values, and records the
``(key, tensor, layout)`` triples in the manifest; this module writes any adapter under
those keys. Nothing here imports the export toolchain, so a device needs only the
ExecuTorch runtime wheel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SLOT = "slot"
ALIGNMENT = 64
# How a weight's bytes are laid out in the data file: a permutation of the torch tensor.
LAYOUTS: dict[str, tuple[int, ...] | None] = {"raw": None, "ohwi": (0, 2, 3, 1), "ihwo": (1, 2, 3, 0)}


class DataFileError(ValueError):
    """A ``.ptd`` file or an adapter does not fit the exported program; the message says why."""


@dataclass(frozen=True)
class SlotTensor:
    """One tensor of the adapter slot: its peft name, the data key the program reads, its layout."""

    name: str  # e.g. "down_blocks.0.resnets.0.conv1.lora_A.weight"
    key: str
    shape: tuple[int, ...]
    layout: str = "raw"

    def to_bytes(self, value: torch.Tensor) -> bytes:
        if tuple(value.shape) != self.shape:
            raise DataFileError(f"adapter tensor {self.name} has shape {tuple(value.shape)}, slot expects {self.shape}")
        perm = LAYOUTS[self.layout]
        value = value.detach().to(torch.float32).cpu()
        if perm is not None:
            value = value.permute(*perm)
        return value.contiguous().numpy().tobytes()


@dataclass(frozen=True)
class AdapterSlot:
    rank: int
    tensors: tuple[SlotTensor, ...]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}

    @property
    def modules(self) -> list[str]:
        return sorted({t.name[: -len(".lora_A.weight")] for t in self.tensors if t.name.endswith(".lora_A.weight")})

    def to_json(self) -> dict:
        return {"rank": self.rank, "tensors": [
            {"name": t.name, "key": t.key, "shape": list(t.shape), "layout": t.layout} for t in self.tensors]}

    @classmethod
    def of_shapes(cls, shapes: Mapping[str, tuple[int, ...]], rank: int) -> "AdapterSlot":
        """A slot known only by its tensors' shapes (keys not located yet): enough to pack a mix."""
        return cls(rank, tuple(SlotTensor(name, name, tuple(shape)) for name, shape in sorted(shapes.items())))

    @classmethod
    def from_json(cls, data: Mapping) -> "AdapterSlot":
        return cls(int(data["rank"]), tuple(
            SlotTensor(t["name"], t["key"], tuple(t["shape"]), t["layout"]) for t in data["tensors"]))


def scale_of(state: Mapping[str, torch.Tensor], alpha: float | None = None) -> float:
    """peft's LoRA scale alpha / r (alpha defaults to r, the project's convention)."""
    rank = rank_of(state)
    return (alpha if alpha is not None else rank) / rank


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise DataFileError(f"an adapter has one rank; found {sorted(ranks) or 'no lora_A tensors'}")
    return ranks.pop()


def pack_mix(
    slot: AdapterSlot,
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
    scales: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The slot's tensors for ``Σ weights[n] · scales[n] · B_n A_n`` (exact; zero-padded to the slot rank).

    An empty ``weights`` gives the base model alone (all-zero slot).
    """
    scales = dict(scales or {})
    shapes = slot.shapes
    out = {name: torch.zeros(shape) for name, shape in shapes.items()}
    offset = 0
    for name, weight in weights.items():
        if name not in adapters:
            raise DataFileError(f"mix names adapter {name!r}, which was not given; adapters: {sorted(adapters)}")
        state = adapters[name]
        rank = rank_of(state)
        if offset + rank > slot.rank:
            raise DataFileError(f"the mix needs rank {sum(rank_of(adapters[n]) for n in weights)}, "
                                f"over the exported slot's rank {slot.rank}; re-export with a larger --slot-rank")
        factor = float(weight) * scales.get(name, scale_of(state))
        for key, value in state.items():
            if key.endswith("lora_A.weight"):
                _check_fits(name, key, value, shapes, rank, 0)
                out[key][offset:offset + rank] = value.to(torch.float32)
            elif key.endswith("lora_B.weight"):
                _check_fits(name, key, value, shapes, rank, 1)
                out[key][:, offset:offset + rank] = value.to(torch.float32) * factor
            else:
                raise DataFileError(f"adapter {name!r} holds {key!r}, which is not a LoRA A/B weight")
        offset += rank
    return out


def _check_fits(adapter: str, key: str, value: torch.Tensor, shapes, rank: int, rank_dim: int) -> None:
    if key not in shapes:
        raise DataFileError(f"adapter {adapter!r} targets {key[: key.rindex('.lora_')]}, which the exported slot "
                            f"does not cover; re-export with that module targeted")
    want = list(shapes[key])
    want[rank_dim] = rank
    if list(value.shape) != want:
        raise DataFileError(f"adapter {adapter!r} tensor {key} has shape {tuple(value.shape)}, expected {tuple(want)}")


# ---------------------------------------------------------------- FlatTensor files
def _serializer():
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return FlatTensorSerializer()


def read_ptd(blob: bytes):
    """The ``DataPayload`` (buffers + named entries) of a ``.ptd`` file's bytes."""
    from executorch.exir._serialize._cord import Cord

    try:
        return _serializer().deserialize(Cord(blob))
    except Exception as e:  # a truncated or foreign file: the serializer's own error is cryptic
        raise DataFileError(f"not a valid ExecuTorch data file (.ptd): {type(e).__name__}: {e}") from None


def write_payload(buffers: list[bytes], entries: Mapping[str, tuple[int, object]]) -> bytes:
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload

    named = {key: DataEntry(index, ALIGNMENT, layout) for key, (index, layout) in entries.items()}
    return bytes(_serializer().serialize(DataPayload(buffers=buffers, named_data=named)))


def adapter_ptd(slot: AdapterSlot, state: Mapping[str, torch.Tensor]) -> bytes:
    """An ``adapter.ptd`` holding ``state`` (slot tensors by peft name) under the program's keys."""
    missing = sorted(set(slot.shapes) - set(state))
    if missing:
        raise DataFileError(f"adapter slot tensors missing: {missing[:3]}")
    buffers, entries = [], {}
    for t in slot.tensors:
        entries[t.key] = (len(buffers), None)
        buffers.append(t.to_bytes(state[t.name]))
    return write_payload(buffers, entries)


def merge_ptd(blobs: list[bytes]) -> bytes:
    """One data file holding every key of ``blobs`` (the Python runtime loads a single ``.ptd``)."""
    buffers: list[bytes] = []
    entries: dict[str, tuple[int, object]] = {}
    for blob in blobs:
        payload = read_ptd(blob)
        offset = len(buffers)
        buffers.extend(bytes(b) for b in payload.buffers)
        for key, entry in payload.named_data.items():
            if key in entries:
                raise DataFileError(f"data key {key} appears in two data files")
            entries[key] = (entry.buffer_index + offset, entry.tensor_layout)
    return write_payload(buffers, entries)


def ptd_keys(blob: bytes) -> dict[str, int]:
    """``{key: byte size}`` of a data file."""
    payload = read_ptd(blob)
    return {k: len(payload.buffers[e.buffer_index]) for k, e in payload.named_data.items()}


def locate_slot(probe: Mapping[str, torch.Tensor], blob: bytes, rank: int, fqn_prefix: str = "") -> AdapterSlot:
    """Find where each probe tensor landed in the exporter's ``adapter.ptd``: by name, or by content hash.

    Every key must match exactly one tensor and every tensor one key, or the export is
    refused: a fused or re-laid-out adapter weight would silently break swapping.
    """
    payload = read_ptd(blob)
    by_hash = {}
    for key, entry in payload.named_data.items():
        by_hash.setdefault(hashlib.sha256(bytes(payload.buffers[entry.buffer_index])).hexdigest(), []).append(key)
    found: dict[str, SlotTensor] = {}
    used: set[str] = set()
    for name, value in probe.items():
        fqn = f"{fqn_prefix}{name[: -len('.weight')]}.{SLOT}.weight"
        if fqn in payload.named_data:
            found[name] = SlotTensor(name, fqn, tuple(value.shape), "raw")
            used.add(fqn)
            continue
        for layout, perm in LAYOUTS.items():
            if perm is not None and value.ndim != len(perm):
                continue
            v = value if perm is None else value.permute(*perm)
            keys = by_hash.get(hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest(), [])
            if len(keys) == 1:
                found[name] = SlotTensor(name, keys[0], tuple(value.shape), layout)
                used.add(keys[0])
                break
        else:
            raise DataFileError(f"adapter tensor {name} {tuple(value.shape)} is not stored verbatim in the exported "
                                f"adapter data (fused or re-laid-out by the backend); it cannot be swapped")
    extra = sorted(set(payload.named_data) - used)
    if extra:
        raise DataFileError(f"the exported adapter data holds {len(extra)} entries no adapter tensor explains: "
                            f"{extra[:3]}")
    return AdapterSlot(rank, tuple(found[n] for n in sorted(found)))
