"""Downlink deltas: send each device the change against the adapter it already holds.

The aggregator mirrors, per device, the exact adapter that device holds (after lossy
decoding, if the downlink codec is lossy), so the next round's adapter can travel as
``target - held`` through any codec and the device reconstructs ``held + decoded``
bit-for-bit like the mirror does. A mirror entry becomes *confirmed* only when the device
proves it trained from that start (its update names the cluster and version); until then
re-sends are computed against the last confirmed state with a deterministic codec seed,
so they are identical bytes. A device that lost its copy asks for a full adapter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from edge_sdk.compression import make_codec

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Held:
    cluster: int
    version: int
    adapter: Adapter


@dataclass(frozen=True)
class Payload:
    base_cluster: int  # -1: a full adapter, not a delta
    base_version: int
    codec: str
    data: bytes


class DownlinkMirror:
    def __init__(self, codec: str = "fp32", deltas: bool = True) -> None:
        make_codec(codec)  # validate early
        self.codec = codec
        self.deltas = deltas
        self.confirmed: dict[str, Held] = {}
        self.pending: dict[str, Held] = {}
        # the same adapter against the same held copy encodes to the same bytes: a round start to
        # thousands of devices encodes once per (target, base) pair (keyed by object identity,
        # kept alive here so identities cannot be reused while the entry exists)
        self._encoded: dict[tuple, tuple[Payload, Adapter, Adapter, Adapter | None]] = {}

    def _codec(self, cluster: int, version: int, base: Held | None):
        """Seeded by what is sent and against what, so a re-send is the same bytes."""
        key = f"{cluster}:{version}:{base.cluster if base else -1}:{base.version if base else -1}"
        return make_codec(self.codec, seed=zlib.crc32(key.encode()))

    def full(self, cluster: int, version: int, adapter: Adapter) -> Payload:
        """A whole adapter, not remembered as held (IFCA's candidates: the device keeps none of them)."""
        codec = self._codec(cluster, version, None)
        return Payload(-1, -1, codec.name, codec.encode(adapter))

    def payload(self, device: str, cluster: int, version: int, adapter: Adapter) -> Payload:
        base = self.confirmed.get(device) if self.deltas else None
        if base is not None and base.cluster == cluster and base.version == version:
            base = None  # it already holds exactly this: a full resend is the safe answer to a repeat request
        shapes = {k: tuple(v.shape) for k, v in adapter.items()}
        if base is None:
            out = self.full(cluster, version, adapter)
            recon = make_codec(out.codec).decode(out.data, shapes)
        else:
            codec = self._codec(cluster, version, base)
            delta = {k: adapter[k] - base.adapter[k] for k in adapter}
            out = Payload(base.cluster, base.version, codec.name, codec.encode(delta))
            decoded = codec.decode(out.data, shapes)
            recon = {k: base.adapter[k] + decoded[k] for k in adapter}
        self.pending[device] = Held(cluster, version, recon)
        return out

    def confirm(self, device: str, cluster: int, version: int) -> Adapter | None:
        """The adapter the device started from, if its update matches what we last sent it."""
        held = self.pending.get(device)
        if held is not None and held.cluster == cluster and held.version == version:
            self.confirmed[device] = held
            return held.adapter
        held = self.confirmed.get(device)
        if held is not None and held.cluster == cluster and held.version == version:
            return held.adapter
        return None

    def forget(self, device: str) -> None:
        self.confirmed.pop(device, None)
        self.pending.pop(device, None)
