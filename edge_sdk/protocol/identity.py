"""Key material: an Ed25519 signing key and an X25519 box key per party.

Devices and aggregators each hold an ``Identity``; peers know each other only by the
``PublicIdentity`` (two 32-byte public keys). Identities persist as one file written
atomically with mode ``0600``; nothing else in fedaigc ever touches private keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import msgpack
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.files import atomic_write_bytes, private


class KeyFileError(ValueError):
    """A saved identity cannot be read back (truncated, overwritten, not a file): never replaced silently,
    since peers pinned the key it held."""


@dataclass(frozen=True)
class PublicIdentity:
    verify_key: bytes  # Ed25519, 32 bytes
    box_key: bytes     # X25519, 32 bytes

    def __post_init__(self) -> None:
        if len(self.verify_key) != 32 or len(self.box_key) != 32:
            raise ValueError("public keys must be 32 bytes each")

    @property
    def fingerprint(self) -> str:
        """Short, stable name for pinning keys out of band (sha256 of both keys)."""
        return hashlib.sha256(self.verify_key + self.box_key).hexdigest()[:32]


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey
    box_key: PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(SigningKey.generate(), PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(bytes(self.signing_key.verify_key), bytes(self.box_key.public_key))

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def encrypt_to(self, peer_box_key: bytes, plaintext: bytes) -> bytes:
        """Authenticated encryption to a peer (X25519 + XSalsa20-Poly1305, random nonce)."""
        return bytes(Box(self.box_key, PublicKey(peer_box_key)).encrypt(plaintext))

    def decrypt_from(self, peer_box_key: bytes, ciphertext: bytes) -> bytes:
        try:
            return Box(self.box_key, PublicKey(peer_box_key)).decrypt(ciphertext)
        except (CryptoError, ValueError, TypeError) as e:
            raise RefusedMessage(Refusal.TAMPERED, f"box ciphertext does not authenticate ({e})") from None

    def open_sealed(self, ciphertext: bytes) -> bytes:
        try:
            return SealedBox(self.box_key).decrypt(ciphertext)
        except (CryptoError, ValueError, TypeError) as e:
            raise RefusedMessage(Refusal.TAMPERED, f"sealed box does not open ({e})") from None

    def save(self, path: str | Path) -> None:
        data = msgpack.packb({"sign": bytes(self.signing_key), "box": bytes(self.box_key)})
        atomic_write_bytes(Path(path), data, mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read the key file {path}: {e.strerror or e}") from None
        try:
            raw = msgpack.unpackb(data)
            return cls(SigningKey(raw["sign"]), PrivateKey(raw["box"]))
        except (ValueError, TypeError, KeyError) as e:
            raise KeyFileError(f"{path} is not a fedaigc key file ({type(e).__name__}: {e})") from None

    @classmethod
    def load_or_generate(cls, path: str | Path) -> "Identity":
        """A long-lived service's identity: the saved one (tightened to 0600), or a new one saved 0600."""
        if Path(path).exists():
            private(Path(path))
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity


def seal_to(peer_box_key: bytes, plaintext: bytes) -> bytes:
    """Anonymous encryption only the holder of the peer's private key can open."""
    return bytes(SealedBox(PublicKey(peer_box_key)).encrypt(plaintext))


def verify_signature(verify_key: bytes, message: bytes, signature: bytes) -> None:
    try:
        VerifyKey(verify_key).verify(message, signature)
    except (CryptoError, ValueError, TypeError):
        raise RefusedMessage(Refusal.BAD_SIGNATURE, "Ed25519 signature does not verify") from None
