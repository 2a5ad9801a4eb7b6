"""fedaigc edge SDK: what a device app imports.

    from edge_sdk import EdgeClient, LocalData, FederatedSession, ProvisioningBundle
    bundle = ProvisioningBundle.load("device.fedaigc.json")  # from `fedaigc provision`
    client = EdgeClient(bundle.device_config("~/.fedaigc", profile="raspberry-pi-4"))

Names load on first use (PEP 562), so the aggregator, which imports only the wire contract
(``edge_sdk.protocol``) and the transport, never loads the device runtime. The SDK never
imports the aggregator.
"""

from __future__ import annotations

import importlib

import models  # noqa: F401  (quiets torchao before anything imports it)

_EXPORTS = {
    "EdgeClient": "edge_sdk.client", "LocalData": "edge_sdk.client", "Update": "edge_sdk.client",
    "SHARED": "edge_sdk.client", "PERSONAL": "edge_sdk.client",
    "DeviceConfig": "edge_sdk.config", "DeviceProfile": "edge_sdk.config", "PROFILES": "edge_sdk.config",
    "FederatedSession": "edge_sdk.session", "MqttConfig": "edge_sdk.transport",
    "ProvisioningBundle": "edge_sdk.provisioning",
    "Refusal": "edge_sdk.protocol.errors", "RefusedMessage": "edge_sdk.protocol.errors",
    "RefusalCounter": "edge_sdk.protocol.errors", "RequestRefused": "edge_sdk.protocol.errors",
    "MemoryBudgetExceeded": "edge_sdk.memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
