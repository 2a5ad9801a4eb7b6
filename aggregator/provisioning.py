"""Issuing a device's credentials: a one-time token bound to its id, and the bundle it is handed.

``fedaigc provision`` calls ``provision_device``, and so do the simulations: every device that
joins a fleet does so with a bundle, pinned to the aggregator's fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse, urlunparse

from edge_sdk.protocol.provisioning import DeviceCredentials
from edge_sdk.protocol.topics import check_device_id


def without_credentials(url: str) -> str:
    """The broker URL with any user:password@ removed: the aggregator's own account is not the device's."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunparse(parsed._replace(netloc=netloc + (f":{parsed.port}" if parsed.port else "")))


def provision_device(store, identity, config, device_id: str, *, broker_url: str | None = None,
                     mqtt_username: str | None = None, mqtt_password: str | None = None,
                     label: str = "provisioned") -> DeviceCredentials:
    """A new one-time token for ``device_id`` in ``store``, and the bundle that carries it (saved with
    ``save``, loaded on the device as ``edge_sdk.ProvisioningBundle``).

    ``identity`` is the aggregator's (its fingerprint is what the device pins); ``broker_url``
    is how devices reach the broker when that differs from the aggregator's ``mqtt_url``;
    broker credentials, when the fleet has per-device accounts, ride in the bundle too.
    """
    check_device_id(device_id)
    url = without_credentials(broker_url or config.mqtt_url)
    ca_pem = None
    if urlparse(url).scheme in ("mqtts", "ssl") and config.mqtt_tls_ca:
        ca_pem = Path(config.mqtt_tls_ca).read_text()
    token = store.issue_token(device_id, label)
    return DeviceCredentials(device_id=device_id, broker_url=url, topic_prefix=config.mqtt_topic_prefix,
                              aggregator_id=config.aggregator_id, aggregator_fingerprint=identity.public.fingerprint,
                              token=token, ca_pem=ca_pem, mqtt_username=mqtt_username, mqtt_password=mqtt_password)
