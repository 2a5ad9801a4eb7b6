"""Downlink deltas: send each device the change against the adapter it already holds.

The aggregator mirrors, per device, the exact adapter that device holds (after lossy
decoding, if the downlink codec is lossy), so the next round's adapter can travel as
``target - held`` through any codec and the device reconstructs ``held + decoded``
bit-for-bit like the mirror does. A mirror entry becomes *confirmed* only when the device
proves it trained from that start (its update names the cluster and version); until then
re-sends are computed against the last confirmed state with a deterministic codec seed,
so they are identical bytes. A device that lost its copy asks for a full adapter.

Every device can draw the fleet's initial adapter from its seed, so a device that holds
nothing yet gets that adapter as the seed plus a digest (``SeededAdapter``): the first round
costs a few dozen bytes per device instead of an encoded adapter. A device whose draw does
not match the digest (another torch build, say) asks for a full adapter like any other.

A device of a rank below the fleet's holds its cluster's adapter at its own rank, so its mirror
entry is at that rank and its deltas are against its own previous adapter; its seeded start is
the draw from the same seed at its rank (``add_seeded``). A held copy of another shape (the
device enrolled again at another rank) is not a base for a delta: it gets the whole adapter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from edge_sdk.protocol.codecs import make_codec
from edge_sdk.protocol.messages import SEEDED_CODEC, SeededAdapter

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
    def __init__(self, codec: str = "fp32", deltas: bool = True, seeded: tuple[int, Adapter] | None = None) -> None:
        """``seeded``: the fleet's initial adapter and the seed it was drawn from (used with ``deltas``)."""
        make_codec(codec)  # validate early
        self.codec = codec
        self.deltas = deltas
        self.seeded = seeded if deltas else None
        # the seed's draws by layout (one per rank), each with its SeededAdapter body
        self._seeded: dict[tuple, tuple[Adapter, bytes]] = {}
        if self.seeded is not None:
            self.add_seeded(self.seeded[1])
        self._unseeded: set[str] = set()  # devices that asked for a full adapter: their draw may differ
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
        if base is not None and _layout(base.adapter) != _layout(adapter):
            base = None  # held at another rank: no delta applies
        seedable = base is None and device not in self._unseeded
        memo = (cluster, version, id(adapter), id(base.adapter) if base else None, seedable)
        if memo not in self._encoded:
            out, recon = self._encode(cluster, version, adapter, base, seedable)
            if len(self._encoded) >= 64:
                self._encoded.pop(next(iter(self._encoded)))
            self._encoded[memo] = (out, recon, adapter, base.adapter if base else None)
        out, recon, _, _ = self._encoded[memo]
        self.pending[device] = Held(cluster, version, recon)
        return out

    def _encode(self, cluster: int, version: int, adapter: Adapter, base: Held | None,
                seedable: bool) -> tuple[Payload, Adapter]:
        """What to send and what the device will hold after decoding it."""
        shapes = {k: tuple(v.shape) for k, v in adapter.items()}
        if seedable and self.is_seeded(adapter):
            data = self._seeded[_layout(adapter)][1]
            return Payload(-1, -1, SEEDED_CODEC, data), {k: v.clone() for k, v in adapter.items()}
        if base is None:
            out = self.full(cluster, version, adapter)
            return out, make_codec(out.codec).decode(out.data, shapes)
        codec = self._codec(cluster, version, base)
        delta = {k: adapter[k] - base.adapter[k] for k in adapter}
        out = Payload(base.cluster, base.version, codec.name, codec.encode(delta))
        decoded = codec.decode(out.data, shapes)
        return out, {k: base.adapter[k] + decoded[k] for k in adapter}

    def add_seeded(self, adapter: Adapter) -> None:
        """Another draw from the fleet's seed (at another rank) that devices can draw themselves
        (without seeded round starts: nothing to do)."""
        if self.seeded is not None:
            self._seeded[_layout(adapter)] = (adapter, SeededAdapter.of(self.seeded[0], adapter).encode())

    def is_seeded(self, adapter: Adapter) -> bool:
        """Whether ``adapter`` is, value for value, a draw from the fleet's seed (at its layout's rank)."""
        drawn = self._seeded.get(_layout(adapter))
        return drawn is not None and all(torch.equal(drawn[0][k], v) for k, v in adapter.items())

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
        self._unseeded.add(device)
        self.confirmed.pop(device, None)
        self.pending.pop(device, None)


def _layout(adapter: Adapter) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in adapter.items()))
