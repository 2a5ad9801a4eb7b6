"""Key hand-over: a retiring aggregator key signs its successor, so devices pinned to it can follow.

A rotation appends one step to the chain the aggregator announces with its keys: the retired
public keys and their Ed25519 signature over the next verify and box keys.
A device pinned to any key of the chain verifies every step from there to the announced keys
and pins those; a chain that does not contain its pin, or a step whose signature fails, hands
nothing over. The chain is bounded (``MAX_CHAIN``): a device offline across more rotations than
that is re-provisioned.
"""

from __future__ import annotations

import msgpack

from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.identity import Identity, PublicIdentity, verify_signature

DOMAIN = "fedaigc-key-handover/v1"
MAX_CHAIN = 16


def handover_message(successor: PublicIdentity) -> bytes:
    return msgpack.packb([DOMAIN, successor.verify_key, successor.box_key], use_bin_type=True)


def sign_handover(retiring: Identity, successor: PublicIdentity) -> list:
    """One chain step: the retiring keys, vouching for ``successor``."""
    pub = retiring.public
    return [pub.verify_key, pub.box_key, retiring.sign(handover_message(successor))]


def check_chain(chain: list) -> None:
    """Refuse (``malformed``) a chain that is not a short list of [32 B, 32 B, 64 B] steps."""
    if not isinstance(chain, list) or not 0 < len(chain) <= MAX_CHAIN:
        raise RefusedMessage(Refusal.MALFORMED, f"a hand-over chain is 1 to {MAX_CHAIN} steps")
    for step in chain:
        if not (isinstance(step, list) and len(step) == 3 and all(isinstance(x, bytes) for x in step)
                and (len(step[0]), len(step[1]), len(step[2])) == (32, 32, 64)):
            raise RefusedMessage(Refusal.MALFORMED, "a hand-over step is [verify key, box key, signature]")


def hands_over(chain: list, announced: PublicIdentity, pinned: str) -> bool:
    """Whether ``chain`` leads from the keys with fingerprint ``pinned`` to ``announced``.

    False when the pin is not in the chain; a step from the pin on whose signature fails is a
    forgery and refused ``bad_signature``.
    """
    keys = [PublicIdentity(step[0], step[1]) for step in chain]
    starts = [i for i, k in enumerate(keys) if k.fingerprint == pinned]
    if not starts:
        return False
    successors = keys[1:] + [announced]
    for i in range(starts[-1], len(chain)):
        try:
            verify_signature(chain[i][0], handover_message(successors[i]), chain[i][2])
        except RefusedMessage:
            raise RefusedMessage(Refusal.BAD_SIGNATURE, f"the hand-over from {keys[i].fingerprint} to "
                                                        f"{successors[i].fingerprint} is not signed by it") from None
    return True
