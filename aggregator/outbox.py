"""Everything the aggregator addresses to one device: Box-encrypted to its enrolled key, signed, counted."""

from __future__ import annotations

from aggregator.state import StateStore
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import EnrolAck, UpdateAck
from edge_sdk.protocol.topics import Topics
from edge_sdk.transport import MqttTransport


class Outbox:
    def __init__(self, transport: MqttTransport, writer: EnvelopeWriter, identity: Identity, store: StateStore,
                 topics: Topics, telemetry: Telemetry) -> None:
        self.transport, self.writer, self.identity = transport, writer, identity
        self.store, self.topics, self.telemetry = store, topics, telemetry

    def send(self, device: str, mtype: MessageType, body: bytes, rnd: int = 0,
             traffic_round: int | None = None) -> None:
        """Publish ``body`` on the device's downlink; a device that is not enrolled gets nothing. Its bytes
        count under ``rnd`` unless ``traffic_round`` says otherwise."""
        rec = self.store.device(device)
        if rec is None:
            return
        env = self._publish(device, rec.box_key, mtype, body, rnd)
        self.telemetry.count(rnd if traffic_round is None else traffic_round, device, "down", len(env))

    def refuse_round(self, device: str, rnd: int, error: RefusedMessage) -> None:
        """Tell a device its message for round ``rnd`` was refused and why, counted under round 0: a refused
        message's round is the sender's claim, and claims must not grow the traffic map."""
        self.send(device, MessageType.UPDATE_ACK, UpdateAck(rnd, False, error.reason.value).encode(), rnd,
                  traffic_round=0)

    def refuse_enrolment(self, device: str, box_key: bytes, reason: str) -> None:
        """Tell a sender its enrolment was refused and why, to the key it enrolled (not counted: it is no device)."""
        self._publish(device, box_key, MessageType.ENROL_ACK, EnrolAck(False, reason[:500]).encode(), 0)

    def _publish(self, device: str, box_key: bytes, mtype: MessageType, body: bytes, rnd: int) -> bytes:
        env = self.writer.build(mtype, self.identity.encrypt_to(box_key, body), rnd)
        self.transport.publish(self.topics.down(device), env)
        return env
