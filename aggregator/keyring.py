"""The aggregator's keys over time: the current identity, the one it just retired, and the hand-over chain.

``fedaigc rotate-key`` makes a new identity, has the current one sign the hand-over to it, keeps
the retired private key for a grace period and records all of it in the state store. A running
daemon sees the record change on its next tick (``refresh``) and re-announces; until the grace
period ends it still opens what devices sealed or boxed to the retired key before they followed.
Everything else is the current identity's: signing, encrypting, the public keys.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edge_sdk.protocol.errors import RefusedMessage
from edge_sdk.protocol.handover import MAX_CHAIN, sign_handover
from edge_sdk.protocol.identity import Identity, PublicIdentity

log = logging.getLogger("fedaigc.keys")

ROTATION_KEY = "key_rotation"  # the store's record: {"generation", "chain" (hex steps), "previous_until"}
DEFAULT_GRACE_S = 3600.0


def key_path(state_dir: Path, role: str = "all") -> Path:
    """Where a daemon of ``role`` keeps its private keys."""
    return Path(state_dir) / ("cloud.key" if role == "cloud" else "aggregator.key")


def _previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


class KeyRing:
    """Stands in for an ``Identity`` wherever the daemon signs, encrypts or opens."""

    def __init__(self, path: Path, store) -> None:
        self.path, self.store = Path(path), store
        self._generation: int | None = None
        self.current = Identity.load_or_generate(self.path)
        self.previous: Identity | None = None
        self.previous_until = 0.0
        self.handovers: list = []
        self.refresh()

    # ------------------------------------------------------------ what an Identity offers
    @property
    def public(self) -> PublicIdentity:
        return self.current.public

    def sign(self, message: bytes) -> bytes:
        return self.current.sign(message)

    def encrypt_to(self, peer_box_key: bytes, plaintext: bytes) -> bytes:
        return self.current.encrypt_to(peer_box_key, plaintext)

    def decrypt_from(self, peer_box_key: bytes, ciphertext: bytes) -> bytes:
        return self._open(lambda identity: identity.decrypt_from(peer_box_key, ciphertext))

    def open_sealed(self, ciphertext: bytes) -> bytes:
        return self._open(lambda identity: identity.open_sealed(ciphertext))

    def _open(self, attempt):
        try:
            return attempt(self.current)
        except RefusedMessage:
            if self.previous is not None and time.time() >= self.previous_until:
                self._retire_previous()
            if self.previous is None:
                raise
            return attempt(self.previous)  # sent before the device followed the hand-over

    def _retire_previous(self) -> None:
        """The grace period is over: forget the retired private key, in memory and on disk."""
        self.previous = None
        _previous_path(self.path).unlink(missing_ok=True)

    # ------------------------------------------------------------ rotation
    def refresh(self) -> bool:
        """Load what ``rotate_key`` recorded since the last call; True if the keys changed."""
        record = self.store.get(ROTATION_KEY) or {"generation": 0, "chain": [], "previous_until": 0.0}
        if record["generation"] == self._generation:
            return False
        changed = self._generation is not None  # the first call, from __init__, only loads
        self._generation = record["generation"]
        self.current = Identity.load(self.path)
        self.handovers = [[bytes.fromhex(x) for x in step] for step in record["chain"]]
        self.previous_until = float(record["previous_until"])
        previous = _previous_path(self.path)
        self.previous = Identity.load(previous) if previous.exists() else None
        if self.previous is not None and time.time() >= self.previous_until:
            self._retire_previous()
        if changed:
            log.info("aggregator key rotated to %s", self.public.fingerprint)
        return changed


def rotate_key(path: Path, store, grace_s: float = DEFAULT_GRACE_S) -> tuple[str, str]:
    """A new key for the aggregator whose key lives at ``path``, handed over from the current one.

    Returns the (old, new) fingerprints. The retired private key is kept (0600) beside the new
    one for ``grace_s`` seconds' worth of sealed messages; the chain keeps the last ``MAX_CHAIN``
    hand-overs, so a device that missed several rotations still follows.
    """
    path = Path(path)
    old = Identity.load_or_generate(path)
    new = Identity.generate()
    record = store.get(ROTATION_KEY) or {"generation": 0, "chain": []}
    step = [x.hex() for x in sign_handover(old, new.public)]
    old.save(_previous_path(path))
    new.save(path)  # before the record: a daemon that sees the record must find the new key
    store.put(ROTATION_KEY, {"generation": record["generation"] + 1, "chain": (record["chain"] + [step])[-MAX_CHAIN:],
                             "previous_until": time.time() + grace_s})
    return old.public.fingerprint, new.public.fingerprint
