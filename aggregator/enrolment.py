"""Who may talk to an aggregator: its key announcement, enrolment by token, and the verify key of an enrolled sender.

Devices enrol at an aggregator and edge aggregators at the cloud the same way, so both
tiers announce and admit through these functions, each over its own transport and state store.
"""

from __future__ import annotations

from aggregator.keyring import KeyRing
from aggregator.retained import RetainedGuard
from edge_sdk.protocol.envelope import Envelope, EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import AggregatorKeys, Enrol, KeyHandover, read_signed_keys
from edge_sdk.transport import MqttTransport


def announce_keys(transport: MqttTransport, writer: EnvelopeWriter, identity: Identity | KeyRing, aggregator_id: str,
                  topic: str, model: str, lora: dict, timeout: float = 30.0,
                  guard: RetainedGuard | None = None) -> None:
    """Publish the signed key announcement, with the fleet's model identity (``model`` digest, ``lora``
    config), retained, and return only once the broker holds it. A key ring that was rotated
    announces its hand-over chain with the keys (``KeyHandover``), so pinned devices can follow.

    A broker keeps the retained announcement of whichever aggregator last ran on this topic.
    Until ours is acknowledged, a device that subscribes gets that stale key, seals its
    enrolment to it, and is refused as tampered, so start-up waits for the acknowledgement.
    A ``guard`` keeps the announcement there: another announcement of the same keys is as good as ours.
    """
    pub = identity.public
    chain = identity.handovers if isinstance(identity, KeyRing) else []
    if chain:
        mtype = MessageType.KEY_HANDOVER
        body = KeyHandover(aggregator_id, pub.verify_key, pub.box_key, model, dict(lora), chain).encode()
    else:
        mtype, body = MessageType.AGGREGATOR_KEYS, AggregatorKeys(aggregator_id, pub.verify_key, pub.box_key, model,
                                                                  dict(lora)).encode()
    message = writer.build(mtype, body)
    infos = transport.publish(topic, message, retain=True) if guard is None else \
        guard.publish(topic, message, same=same_keys)
    if not transport.wait_published(infos, timeout):
        raise TimeoutError(f"the broker did not acknowledge the key announcement on {topic} in {timeout} s")


def same_keys(held: bytes, delivered: bytes) -> bool:
    """Whether ``delivered`` announces, self-signed, what ``held`` does (workers of one aggregator each
    sign their own announcement of the same keys)."""
    try:
        return read_signed_keys(delivered) == read_signed_keys(held)
    except (RefusedMessage, ValueError):
        return False


def verify_key_of(store, sender: str, kind: str = "device") -> bytes:
    """The key an enrolled, unrevoked sender signs with; a refusal otherwise. Read from the store for
    every message, so a revocation (``fedaigc revoke``, a token dropped from the config) holds at once."""
    rec = store.device(sender)
    if rec is None:
        raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{kind} {sender} is not enrolled")
    if rec.revoked:
        raise RefusedMessage(Refusal.REVOKED, f"{kind} {sender}'s enrolment was revoked")
    return rec.verify_key


def open_enrolment(identity: Identity, verifier: EnvelopeVerifier, env: Envelope) -> Enrol:
    """The sealed enrolment, checked to be signed by the key it enrols (proof of possession)."""
    body = Enrol.decode(identity.open_sealed(env.payload))
    verifier.authenticate(env, body.verify_key)
    return body


def admit(store, env: Envelope, body: Enrol, model: str, kind: str = "device", max_rank: int | None = None) -> None:
    """Admit an opened enrolment: the fleet's model and (``max_rank``) LoRA rank, then the token and keys
    (``StateStore.enrol``); a rank it cannot serve is refused before the token is spent.

    A provisioned token enrols its own id once; enrolling again with the same keys is
    idempotent (a lost acknowledgement); another id or other keys are refused ``bad_token``.
    """
    if body.model != model:
        raise RefusedMessage(Refusal.MODEL_MISMATCH, f"model mismatch: fleet runs {model[:16]}, "
                                                     f"{kind} {env.sender} has {body.model[:16]}")
    if max_rank is not None and body.lora_rank > max_rank:
        raise RefusedMessage(Refusal.RANK_ABOVE_FLEET,
                             f"{kind} {env.sender} would train LoRA rank {body.lora_rank}, above the fleet's maximum "
                             f"{max_rank}: lower its max_lora_rank, or raise r in [aggregator.lora]")
    store.enrol(env.sender, body.verify_key, body.box_key, body.profile, body.token)
