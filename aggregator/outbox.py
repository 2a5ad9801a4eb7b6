"""Everything the aggregator addresses to one device: Box-encrypted to its enrolled key, signed, counted."""

from __future__ import annotations

from aggregator.state import StateStore
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.topics import Topics
from edge_sdk.transport import MqttTransport


class Outbox:
    def __init__(self, transport: MqttTransport, writer: EnvelopeWriter, identity: Identity, store: StateStore,
                 topics: Topics, telemetry: Telemetry) -> None:
        self.transport, self.writer, self.identity = transport, writer, identity
        self.store, self.topics, self.telemetry = store, topics, telemetry

    def send(self, device: str, mtype: MessageType, body: bytes, rnd: int = 0) -> None:
        """Publish ``body`` on the device's downlink; a device that is not enrolled gets nothing."""
        rec = self.store.device(device)
        if rec is None:
            return
        env = self.writer.build(mtype, self.identity.encrypt_to(rec.box_key, body), rnd)
        self.transport.publish(self.topics.down(device), env)
        self.telemetry.count(rnd, device, "down", len(env))
