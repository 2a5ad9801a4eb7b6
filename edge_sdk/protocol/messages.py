"""Message bodies: the msgpack maps that ride (usually encrypted) inside envelopes.

Each body type declares its fields and their Python types once; ``decode`` refuses any
body with a missing, extra or mistyped field, or a value out of its range (``check``), so
handlers only ever see clean values.

A field added to a body after its first release has a default, which is how the message stays
compatible both ways: ``encode`` leaves it out while it holds the default (an older receiver
reads the body it knows), and ``decode`` takes its absence as the default (an older sender).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar, get_type_hints

import msgpack

from edge_sdk.protocol.digest import short, tensor_digest
from edge_sdk.protocol.errors import Refusal, RefusedMessage

T = TypeVar("T", bound="Body")
MAX_BODY_BYTES = 256 * 1024 * 1024
INT64_MAX = 2**63 - 1   # the widest integer a receiver keeps (a store's BIGINT, numpy's int64)
INT32_MAX = 2**31 - 1   # a store's INTEGER


@dataclass(frozen=True)
class Body:
    kind: ClassVar[str] = "body"

    def encode(self) -> bytes:
        later = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        return msgpack.packb({k: v for k, v in asdict(self).items() if k not in later or v != later[k]},
                             use_bin_type=True)

    @classmethod
    def decode(cls: type[T], data: bytes) -> T:
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_BODY_BYTES)
        except Exception as e:
            raise RefusedMessage(Refusal.MALFORMED, f"{cls.kind} body is not msgpack ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise RefusedMessage(Refusal.MALFORMED, f"{cls.kind} body is not a map")
        hints = get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not required <= set(raw) <= names:
            raise RefusedMessage(Refusal.MALFORMED, f"{cls.kind} body fields {sorted(map(str, raw))} != {sorted(names)}")
        for name in set(raw):
            if not _type_ok(raw[name], hints[name]):
                raise RefusedMessage(Refusal.MALFORMED, f"{cls.kind}.{name} has type {type(raw[name]).__name__}")
        body = cls(**raw)
        body.check()
        return body

    def check(self) -> None:
        """Refuse (``RefusedMessage``) values a receiver cannot take; a body type with ranges overrides it."""


def _check_range(kind: str, name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise RefusedMessage(Refusal.MALFORMED, f"{kind}.{name} = {value} is outside [{low}, {high}]")


def _type_ok(value: Any, hint) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is dict or getattr(hint, "__origin__", None) is dict:
        if not isinstance(value, dict):
            return False
        key_t, val_t = getattr(hint, "__args__", (object, object))
        return all(_type_ok(k, key_t) and _type_ok(v, val_t) for k, v in value.items())
    if hint is object:
        return True
    return isinstance(value, hint)


@dataclass(frozen=True)
class AggregatorKeys(Body):
    kind: ClassVar[str] = "aggregator_keys"
    aggregator_id: str
    verify_key: bytes
    box_key: bytes
    model: str                  # the fleet's base model: edge_sdk.artifacts.manifest.model_digest
    lora: dict[str, object]     # the fleet's LoRA config (models.lora.lora_to_dict)


@dataclass(frozen=True)
class KeyHandover(AggregatorKeys):
    """The announcement of a rotated aggregator: its keys plus the hand-over chain that leads to them
    (``edge_sdk.protocol.handover``). A type of its own, so a device without hand-over logic refuses
    it (``wrong_type``, counted) instead of reading it as an unexplained key change."""
    kind: ClassVar[str] = "key_handover"
    chain: list         # oldest first: [retired verify key, retired box key, its signature of the next keys]

    def check(self) -> None:
        from edge_sdk.protocol.handover import check_chain

        check_chain(self.chain)


@dataclass(frozen=True)
class Enrol(Body):
    kind: ClassVar[str] = "enrol"
    token: str
    verify_key: bytes
    box_key: bytes
    profile: str
    model: str          # the base model the sender runs (model_digest): a fleet runs one
    lora_rank: int = 0  # the shared adapter's rank it trains at; 0 (and older devices): the fleet's

    def check(self) -> None:
        _check_range(self.kind, "lora_rank", self.lora_rank, 0, INT32_MAX)


@dataclass(frozen=True)
class EnrolAck(Body):
    kind: ClassVar[str] = "enrol_ack"
    accepted: bool
    reason: str


@dataclass(frozen=True)
class ClusterAssign(Body):
    kind: ClassVar[str] = "cluster_assign"
    cluster: int


@dataclass(frozen=True)
class RoundStart(Body):
    kind: ClassVar[str] = "round_start"
    round: int
    cluster: int
    version: int
    lora: dict[str, object]  # the fleet's LoRA config (models.lora.lora_to_dict): the shared adapter's shape
    base_cluster: int   # the adapter payload is a delta against (base_cluster, base_version); -1: full
    base_version: int
    deadline: float
    local_steps: int
    choices: int        # > 1: one of several candidate adapters this round; train the best-fitting (IFCA)
    codec: str
    adapter: bytes


SEEDED_CODEC = "seed"  # RoundStart.codec when the adapter travels as the seed it was drawn from


@dataclass(frozen=True)
class SeededAdapter(Body):
    """A fresh adapter sent as its seed: the device draws it itself (``add_adapter(seed=...)``)
    and checks the digest, so round 1 of a fleet costs bytes per device, not an adapter each."""
    kind: ClassVar[str] = "seeded_adapter"
    seed: int
    digest: bytes       # short(tensor_digest) of the adapter the aggregator drew

    @classmethod
    def of(cls, seed: int, adapter) -> "SeededAdapter":
        return cls(seed, short(tensor_digest(adapter)))

    def matches(self, drawn) -> bool:
        """Whether the receiver's own draw from ``seed`` is, value for value, the sender's adapter."""
        return short(tensor_digest(drawn)) == self.digest


@dataclass(frozen=True)
class UpdateBody(Body):
    kind: ClassVar[str] = "update"
    cluster: int
    codec: str
    tensors: bytes
    samples: int
    steps: int
    loss_before: float
    loss_after: float
    base_version: int
    epsilon: float      # DP budget the device has spent once this update is out: -1 sent without DP, inf no bound
    dp_delta: float     # ... stated at this delta (0 with DP off)

    def check(self) -> None:
        """A claim the receiver can hold: samples in [1, 2**63 - 1] (the aggregator caps what it weights by
        further: ``AggregatorConfig.max_samples``), steps and the base version within a stored integer."""
        _check_range(self.kind, "samples", self.samples, 1, INT64_MAX)
        _check_range(self.kind, "steps", self.steps, 0, INT32_MAX)
        _check_range(self.kind, "base_version", self.base_version, -1, INT32_MAX)


@dataclass(frozen=True)
class DeviceStatus(Body):
    kind: ClassVar[str] = "device_status"
    state: str          # "need_full": the device cannot apply a delta and asks for a full adapter
    round: int


@dataclass(frozen=True)
class UpdateAck(Body):
    kind: ClassVar[str] = "update_ack"
    round: int
    accepted: bool
    reason: str


MAX_IMAGES_PER_REQUEST = 16  # GenerateRequest.n: also what sizes a device's largest downlink message
MAX_SAMPLING_STEPS = 200     # GenerateRequest.steps: a request's cost on the server is bounded


@dataclass(frozen=True)
class GenerateRequest(Body):
    kind: ClassVar[str] = "generate_request"
    request_id: str
    encoding: bytes           # safetensors {"encoding": the base model's conditioning of one prompt}
    mix: dict[str, float]     # cluster id (as text) -> weight
    n: int
    seed: int
    # hybrid inference: run the first ``server_steps`` of ``steps`` and answer the undecoded samples, which
    # the device finishes. steps 0 (and older devices): the service's own count; server_steps 0: every
    # step, answered as finished images
    steps: int = 0
    server_steps: int = 0

    def check(self) -> None:
        _check_range(self.kind, "steps", self.steps, 0, MAX_SAMPLING_STEPS)
        _check_range(self.kind, "server_steps", self.server_steps, 0, self.steps)


@dataclass(frozen=True)
class GenerateResult(Body):
    kind: ClassVar[str] = "generate_result"
    request_id: str
    ok: bool
    reason: str
    images: bytes             # safetensors {"images": (n, C, H, W) in [0, 1]}, or {"samples": (n, *sample_shape)}


@dataclass(frozen=True)
class EdgeReport(Body):
    """An edge aggregator's round, as the cloud sees it: cluster adapters, never device updates."""
    kind: ClassVar[str] = "edge_report"
    round: int
    clusters: list      # cluster ids (ints), in the order of the rows below
    devices: list       # devices per cluster (ints)
    centroids: bytes    # float32 (len(clusters), 384): task centroids, for similarity-weighted mixing
    spread: bytes       # float32 (len(clusters), LoRA modules in sorted order): per-device ΔW variance, NaN unknown
    codec: str
    adapters: bytes     # codec-encoded tensors named "{cluster}/{lora key}"


@dataclass(frozen=True)
class CloudMix(Body):
    kind: ClassVar[str] = "cloud_mix"
    round: int
    codec: str
    adapters: bytes     # the edge's clusters after cross-edge interaction, named like EdgeReport's


@dataclass(frozen=True)
class RolloutManifest(Body):
    """The version of an export the fleet (or part of it) should run; retained, signed by the aggregator."""
    kind: ClassVar[str] = "rollout_manifest"
    version: int                # increases with every rollout; a device never installs a version twice
    stage: str                  # "canary": only the devices in ``canary``; "all": every targeted device
    clusters: list              # cluster ids targeted (ints); empty: every device
    canary: list                # device ids that get the version first (stage "canary")
    files: dict[str, str]       # relative path in the export directory -> sha256
    sizes: dict[str, int]       # relative path -> bytes
    parts: dict[str, int]       # relative path -> retained parts it travels in
    created: float


@dataclass(frozen=True)
class RolloutReport(Body):
    """A device's answer to a rollout: which version it tried, which it runs now, and why if they differ."""
    kind: ClassVar[str] = "rollout_report"
    version: int        # the version this report is about
    installed: int      # the version the device runs after it (0: none)
    ok: bool
    reason: str


def read_signed_keys(data: bytes) -> AggregatorKeys:
    """A retained key announcement (a ``KeyHandover`` after a rotation), checked to be signed by the key
    it announces.

    Self-signature proves the publisher holds the private key; whether to *trust* that key
    (pinned fingerprint, a hand-over from the pinned key, or trust on first use) is the receiver's decision.
    """
    from edge_sdk.protocol.envelope import MessageType, parse_envelope
    from edge_sdk.protocol.identity import verify_signature

    env = parse_envelope(data)
    kinds = {MessageType.AGGREGATOR_KEYS: AggregatorKeys, MessageType.KEY_HANDOVER: KeyHandover}
    if env.type not in kinds:
        raise RefusedMessage(Refusal.WRONG_TYPE, f"{env.type.value} is not a key announcement")
    body = kinds[env.type].decode(env.payload)
    verify_signature(body.verify_key, env.signed_part(), env.signature)
    return body
