"""The provisioning bundle's file: what an operator hands a device, as JSON (mode 0600).

``fedaigc provision DEVICE_ID --out FILE`` writes it: the device id, the broker and topic
prefix, the aggregator's id and key fingerprint to pin, a one-time token bound to that id,
the broker's CA certificate when the broker speaks TLS, and broker credentials when the
fleet has per-device accounts. It holds secrets (the token, a broker password), so it is
written owner-only and handed over out of band, like an SSH key. This module is the format
both sides share; ``edge_sdk.provisioning.ProvisioningBundle`` builds a device's configs from it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from edge_sdk.protocol.files import atomic_write_bytes, private

FORMAT = "fedaigc-provisioning/1"
T = TypeVar("T", bound="DeviceCredentials")


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    broker_url: str
    topic_prefix: str
    aggregator_id: str
    aggregator_fingerprint: str
    token: str = field(repr=False)
    ca_pem: str | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, optional = getattr(self, f.name), f.default is None
            if not (isinstance(value, str) and (value or optional)) and not (optional and value is None):
                raise ValueError(f"provisioning bundle: {f.name} must be a {'' if optional else 'non-empty '}string"
                                 f"{' or null' if optional else ''}, got {type(value).__name__}")

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT} | asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls: type[T], data: bytes | str) -> T:
        """The bundle ``to_json`` wrote; anything else is a ``ValueError`` saying what is wrong."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"provisioning bundle is not JSON ({type(e).__name__})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a provisioning bundle (expected \"format\": \"{FORMAT}\")")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names - {"format"})
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in raw)
        if unknown or missing:
            raise ValueError(f"provisioning bundle: unknown fields {unknown}, missing fields {missing}")
        return cls(**{k: v for k, v in raw.items() if k != "format"})

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.to_json(), mode=0o600)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        path = Path(path).expanduser()
        private(path)
        return cls.from_json(path.read_bytes())
