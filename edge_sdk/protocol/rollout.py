"""Rollout messages on the wire: retained manifests and artifact parts, signed by the aggregator.

Shared by the aggregator, which publishes a rollout (``aggregator/rollout.py``), and the
device agent, which installs it (``edge_sdk/rollout.py``). Retained messages may be days
old, so the envelope clock window does not apply: a retained message is checked for type,
sender and signature by the key the device trusts, and a manifest for well-formed paths.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from edge_sdk.protocol.chunking import split_payload
from edge_sdk.protocol.envelope import Envelope, EnvelopeWriter, MessageType, parse_envelope
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.identity import verify_signature
from edge_sdk.protocol.messages import RolloutManifest

STAGES = ("canary", "all")
PART_OVERHEAD = 512  # envelope fields around a part's chunk frame (sender id <= 128 characters, signature, ...)


def artifact_parts(blob: bytes, writer: EnvelopeWriter, max_frame: int) -> list[bytes]:
    """Signed envelopes, each holding one chunk frame of ``blob`` and each fitting one MQTT frame,
    so every part can be retained on its own topic."""
    frames = split_payload(blob, max_frame - PART_OVERHEAD)
    return [writer.build(MessageType.ROLLOUT_ARTIFACT, frame, round=i) for i, frame in enumerate(frames)]


def read_signed(data: bytes, expect: MessageType, aggregator_id: str, verify_key: bytes) -> Envelope:
    """A retained message from the aggregator: right type, right sender, valid signature (no clock window)."""
    env = parse_envelope(data)
    if env.type != expect:
        raise RefusedMessage(Refusal.WRONG_TYPE, f"{env.type.value} where a {expect.value} belongs")
    if env.sender != aggregator_id:
        raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{env.sender} is not this device's aggregator")
    verify_signature(verify_key, env.signed_part(), env.signature)
    return env


def read_manifest(data: bytes, aggregator_id: str, verify_key: bytes) -> RolloutManifest:
    """The manifest, signed by the aggregator and well-formed (safe relative paths, sha256 per file)."""
    m = RolloutManifest.decode(read_signed(data, MessageType.ROLLOUT_MANIFEST, aggregator_id, verify_key).payload)
    if m.stage not in STAGES:
        raise RefusedMessage(Refusal.MALFORMED, f"rollout stage {m.stage[:20]!r} is not one of {STAGES}")
    if m.version < 1 or not m.files or set(m.files) != set(m.sizes) or set(m.files) != set(m.parts):
        raise RefusedMessage(Refusal.MALFORMED, "rollout manifest needs a version >= 1 and sizes and parts per file")
    for name, sha in m.files.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts or str(path) != name:
            raise RefusedMessage(Refusal.MALFORMED, f"rollout file name {name[:60]!r} is not a plain relative path")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise RefusedMessage(Refusal.MALFORMED, f"rollout file {name} has no sha256")
        if m.sizes[name] < 0 or m.parts[name] < 1:
            raise RefusedMessage(Refusal.MALFORMED, f"rollout file {name} has a negative size or no parts")
    if not all(isinstance(c, int) for c in m.clusters) or not all(isinstance(d, str) for d in m.canary):
        raise RefusedMessage(Refusal.MALFORMED, "rollout clusters are ints and canary devices are ids")
    return m
