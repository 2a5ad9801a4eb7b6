"""How many bytes of partial chunked messages a device's downlink may hold, from its own model.

The largest message an honest aggregator sends a device is a round start with a full fp32
adapter at the device's ``max_lora_rank``, or a generation result of ``MAX_IMAGES_PER_REQUEST``
fp32 images. A message is allowed twice that plus a MiB (envelope, safetensors and msgpack
headers, a fleet whose LoRA targets more modules than the defaults), and the budget is twice a
message again, because one sender - the downlink has one - may hold at most half of it. Anything
on the downlink beyond that is an attacker's and is refused (``edge_sdk.protocol.chunking``).
"""

from __future__ import annotations

import math

from edge_sdk.client import SHARED, EdgeClient
from edge_sdk.protocol.messages import MAX_IMAGES_PER_REQUEST
from models.lora import get_adapter_state

FP32 = 4
HEADROOM = 2
FIXED_OVERHEAD = 1024 * 1024


def largest_downlink_message(client: EdgeClient) -> int:
    """Bytes of the largest legitimate message on ``client``'s downlink, before headroom."""
    state = get_adapter_state(client.unet, SHARED)
    per_rank = sum(t.numel() for t in state.values()) / client.shared_lora.r
    full_adapter = math.ceil(per_rank * client.config.effective("max_lora_rank")) * FP32
    images = MAX_IMAGES_PER_REQUEST * math.prod(client.backend.image_shape) * FP32
    return max(full_adapter, images)


def downlink_budget(client: EdgeClient) -> int:
    """The reassembly budget of ``client``'s transport (``MqttConfig.max_reassembly_bytes``)."""
    return 2 * (HEADROOM * largest_downlink_message(client) + FIXED_OVERHEAD)
