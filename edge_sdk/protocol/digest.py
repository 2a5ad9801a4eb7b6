"""Content digests: one canonical SHA-256 of tensors, of an adapter's layout, and of files.

Every party that must agree on "the same" content without sending it hashes it here: a
device and an aggregator that each drew the round-1 adapter from a seed, a codec payload
and the adapter layout it was encoded for, an adapter file and its stored checksum, an
export and the base weights it was made from, a rollout file and its signed manifest.

Tensors hash as sorted ``(name, shape)`` headers, each followed by the values: floating
point as float32 (exact for fp16/bf16/fp32 adapters, so a dtype change in transit does
not change the digest), anything else as its raw bytes. A layout digest is the same
headers without values. Digests are lowercase hex; the wire carries their first 8 bytes
(``short``), enough to catch a mismatch, never used as a secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

if TYPE_CHECKING:  # imported where tensors are hashed: the wire contract loads without torch
    import torch

WIRE_BYTES = 8
_FILE_BLOCK = 1 << 20


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Names, shapes and values of a set of named tensors."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(_header(name, t.shape))
        t = t.to(torch.float32) if t.is_floating_point() else t
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def layout_digest(shapes: Mapping[str, Iterable[int]]) -> str:
    """Names and shapes only: which adapter a payload of bare values belongs to."""
    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(_header(name, shapes[name]))
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """A file's bytes; for a directory (a Core ML ``.mlpackage``), its files' relative paths and digests."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            h.update(file_digest(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(_FILE_BLOCK):
            h.update(block)
    return h.hexdigest()


def parts_digest(parts: Mapping[str, str]) -> str:
    """One digest naming several named digests (a model of several parts, say)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(msgpack.packb([name, parts[name]]))
    return h.hexdigest()


def short(digest: str) -> bytes:
    """The bytes of a digest that travel on the wire."""
    return bytes.fromhex(digest)[:WIRE_BYTES]


def _header(name: str, shape: Iterable[int]) -> bytes:
    return msgpack.packb([name, [int(d) for d in shape]])
