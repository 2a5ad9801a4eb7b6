"""Who may talk to an aggregator: enrolment by token, and the verify key of an enrolled sender.

Devices enrol at an aggregator and edge aggregators at the cloud the same way, so both
tiers admit senders through these two functions, each over its own state store.
"""

from __future__ import annotations

from edge_sdk.envelope import Envelope, EnvelopeVerifier
from edge_sdk.errors import Refusal, RefusedMessage
from edge_sdk.identity import Identity
from edge_sdk.messages import Enrol


def verify_key_of(store, sender: str, kind: str = "device") -> bytes:
    """The key an enrolled, unrevoked sender signs with; a refusal otherwise."""
    rec = store.device(sender)
    if rec is None:
        raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{kind} {sender} is not enrolled")
    if rec.revoked or not store.token_valid(rec.token):
        raise RefusedMessage(Refusal.REVOKED, f"{kind} {sender}'s enrolment was revoked")
    return rec.verify_key


def admit(store, identity: Identity, verifier: EnvelopeVerifier, env: Envelope, kind: str = "device") -> Enrol:
    """Open a sealed enrolment, check it is self-signed and its token valid, and record the keys.

    Enrolling again with the same keys is idempotent; another sender claiming an enrolled id
    with different keys is refused.
    """
    body = Enrol.decode(identity.open_sealed(env.payload))
    verifier.authenticate(env, body.verify_key)  # self-signed: proves key possession
    if not store.token_valid(body.token):
        raise RefusedMessage(Refusal.BAD_TOKEN, f"{kind} {env.sender} presented an unknown or revoked token")
    if not store.enrol(env.sender, body.verify_key, body.box_key, body.profile, body.token):
        raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{kind} id {env.sender} is enrolled with other keys")
    return body
