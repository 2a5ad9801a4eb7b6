"""Everything the aggregator addresses to one device: Box-encrypted to its enrolled key, signed, counted."""

from __future__ import annotations

from aggregator.state import StateStore
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import EnrolAck
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
        env = self._publish(device, rec.box_key, mtype, body, rnd)
        self.telemetry.count(rnd, device, "down", len(env))

    def refuse_enrolment(self, device: str, box_key: bytes, reason: str) -> None:
        """Tell a sender its enrolment was refused and why, to the key it enrolled (not counted: it is no device)."""
        self._publish(device, box_key, MessageType.ENROL_ACK, EnrolAck(False, reason[:500]).encode(), 0)

    def _publish(self, device: str, box_key: bytes, mtype: MessageType, body: bytes, rnd: int) -> bytes:
        env = self.writer.build(mtype, self.identity.encrypt_to(box_key, body), rnd)
        self.transport.publish(self.topics.down(device), env)
        return env
