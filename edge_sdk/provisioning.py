"""What a device app builds from its provisioning bundle, in one call each.

::

    bundle = ProvisioningBundle.load("device.fedaigc.json")  # written by `fedaigc provision`
    client = EdgeClient(bundle.device_config("~/.fedaigc", profile="raspberry-pi-4"))
    session = FederatedSession(client, data, bundle.mqtt_config("~/.fedaigc")).start()

The file format is ``edge_sdk.protocol.provisioning`` (shared with the aggregator, which writes it).
"""

from __future__ import annotations

from pathlib import Path

from edge_sdk.config import DeviceConfig
from edge_sdk.protocol.files import atomic_write_bytes
from edge_sdk.protocol.provisioning import DeviceCredentials
from edge_sdk.transport import MqttConfig

CA_FILE = "broker-ca.pem"


class ProvisioningBundle(DeviceCredentials):
    """A device's credentials from its operator, and the configs a device app makes of them."""

    def device_config(self, data_dir: str | Path, **overrides) -> DeviceConfig:
        """The device's config: its id, token and pinned fingerprint from the bundle, the rest the app's."""
        return DeviceConfig(**({"data_dir": Path(data_dir).expanduser(), "device_id": self.device_id,
                                "enrolment_token": self.token, "aggregator_fingerprint": self.aggregator_fingerprint}
                               | overrides))

    def mqtt_config(self, data_dir: str | Path, **overrides) -> MqttConfig:
        """The broker connection; the CA certificate, if any, is written under ``data_dir`` for paho."""
        settings = {"url": self.broker_url, "topic_prefix": self.topic_prefix, "username": self.mqtt_username,
                    "password": self.mqtt_password}
        if self.ca_pem is not None:
            ca = Path(data_dir).expanduser() / CA_FILE
            atomic_write_bytes(ca, self.ca_pem.encode(), mode=0o600)
            settings["tls_ca"] = str(ca)
        return MqttConfig(**(settings | overrides))
