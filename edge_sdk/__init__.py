"""fedaigc edge SDK: what a device app imports.

    from edge_sdk import EdgeClient, DeviceConfig, LocalData
    client = EdgeClient(DeviceConfig(data_dir="~/.fedaigc", profile="raspberry-pi-4"))

The SDK never imports the aggregator.
"""

import models  # noqa: F401,E402  (quiet torchao before anything imports it)
from edge_sdk.client import PERSONAL, SHARED, EdgeClient, LocalData, Update  # noqa: E402
from edge_sdk.config import PROFILES, DeviceConfig, DeviceProfile  # noqa: E402
from edge_sdk.memory import MemoryBudgetExceeded  # noqa: E402
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage  # noqa: E402

__all__ = [
    "EdgeClient", "LocalData", "Update", "SHARED", "PERSONAL", "DeviceConfig", "DeviceProfile", "PROFILES",
    "Refusal", "RefusedMessage", "RefusalCounter", "MemoryBudgetExceeded",
]
