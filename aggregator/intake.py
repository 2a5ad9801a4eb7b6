"""What devices send: enrolments, sealed task vectors, adapter updates and status.

Each handler authenticates the envelope, checks the sender owns its topic, validates the
body, commits what it accepts to the state store and only then answers, so a crash never
acknowledges what was not kept. A task vector either joins its device to the federation
(grouping the fleet once enough are in, or placing a late device) or re-invites a known
one; an update is refused with a reason (stale round, bad values, a codec not accepted
here) or accepted once (duplicates are acknowledged as such) and may complete its cluster.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.downlink import DownlinkMirror
from aggregator.enrolled import EnrolledIds
from aggregator.enrolment import admit, open_enrolment
from aggregator.membership import Membership
from aggregator.outbox import Outbox
from aggregator.rounds import RoundController
from aggregator.state import StateStore, StateUnavailable, UpdateRecord
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.codecs import decode_payload
from edge_sdk.protocol.envelope import Envelope, EnvelopeVerifier, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import DeviceStatus, EnrolAck, UpdateAck, UpdateBody
from edge_sdk.protocol.tensors import pack_tensors, unpack_tensors
from edge_sdk.protocol.topics import check_sender, device_of
from models.text import EMBEDDING_DIM

log = logging.getLogger("fedaigc.aggregator")


class TaskIntake:
    def __init__(self, config: AggregatorConfig, verifier: EnvelopeVerifier, identity: Identity, store: StateStore,
                 membership: Membership, rounds: RoundController, telemetry: Telemetry,
                 is_leader: Callable[[], bool]) -> None:
        self.config, self.verifier, self.identity, self.store = config, verifier, identity, store
        self.membership, self.rounds, self.telemetry, self.is_leader = membership, rounds, telemetry, is_leader
        self.first_task_at: float | None = None

    def on_task(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.TASK}, topic)
        vector = unpack_tensors(self.identity.open_sealed(env.payload), {"task": (EMBEDDING_DIM,)})["task"]
        if float(vector.norm()) == 0.0:
            raise RefusedMessage(Refusal.MALFORMED, "task vector is all zeros")
        self.store.put_task(env.sender, vector.numpy().astype(np.float32).tobytes())
        self.telemetry.count(0, env.sender, "up", len(data))
        if self.first_task_at is None:
            self.first_task_at = time.monotonic()
        if self.membership.assignment:
            if env.sender in self.membership.assignment:
                self.rounds.resume_device(env.sender)
            elif self.is_leader():  # only the leader writes clusters; it finds joiners other workers stored
                self.rounds.join_late(env.sender, vector.numpy())
        elif self._enough(self.store.task_count()) and self.is_leader():
            self.rounds.start()

    def _enough(self, tasks: int) -> bool:
        return self.config.expected_devices is not None and tasks >= self.config.expected_devices

    def tick(self) -> None:
        """The leader's enrolment window, and late joiners whose task vectors other workers stored."""
        if not self.membership.assignment:
            tasks = self.store.task_count()  # other workers may have received them
            if tasks and self.first_task_at is None:
                self.first_task_at = time.monotonic()
            if self._enough(tasks) or (self.first_task_at is not None
                                       and time.monotonic() - self.first_task_at >= self.config.enrol_window_s):
                self.rounds.start()
        if self.config.shared_group and self.membership.assignment:
            for device, vector in self.store.unassigned_tasks().items():
                self.rounds.join_late(device, np.frombuffer(vector, dtype=np.float32).astype(np.float64))


class UpdateIntake:
    def __init__(self, config: AggregatorConfig, verifier: EnvelopeVerifier, identity: Identity, store: StateStore,
                 membership: Membership, rounds: RoundController, downlink: DownlinkMirror, outbox: Outbox,
                 telemetry: Telemetry, refusals: RefusalCounter, follow: Callable[[], None]) -> None:
        self.config, self.verifier, self.identity, self.store = config, verifier, identity, store
        self.membership, self.rounds, self.downlink, self.outbox = membership, rounds, downlink, outbox
        self.telemetry, self.refusals, self.follow = telemetry, refusals, follow
        self.policy = membership.policy
        self._stored: dict[tuple[int, int], set[str]] = {}  # open (round, cluster) -> devices this worker stored

    def on_update(self, topic: str, data: bytes) -> None:
        self.follow()  # a worker that does not lead catches up with the leader's rounds first
        env = self.verifier.open(data, {MessageType.UPDATE}, topic)  # on another device's topic: not answered
        try:
            self._take(env, len(data))
        except RefusedMessage as e:  # authenticated, so the device is told why
            self.refusals.record(e, env.sender)
            self.telemetry.count(0, env.sender, "up", len(data))  # its round is the sender's claim: round 0
            self.outbox.refuse_round(env.sender, env.round, e)

    def _take(self, env: Envelope, size: int) -> None:
        """Store and acknowledge an update, or refuse it (``RefusedMessage``); bytes count under its round
        only once the round is known to be open."""
        device = env.sender
        rec = self.store.device(device)
        body = UpdateBody.decode(self.identity.decrypt_from(rec.box_key, env.payload))
        cid = self.policy.cluster_of_update(body.cluster, self.membership.assignment.get(device))
        open_rounds = {(row.round, row.cluster_id) for row in self.store.rounds("open")}
        if cid is None or body.cluster != cid or (env.round, cid) not in open_rounds:
            raise RefusedMessage(Refusal.STALE_ROUND, f"{device}: round {env.round} of cluster {body.cluster} "
                                                      f"is not open")
        for closed in self._stored.keys() - open_rounds:
            del self._stored[closed]
        if device in self._stored.get((env.round, cid), ()):  # a re-send: acked without decoding or a transaction
            self._acknowledge(env, device, size, new=False)
            return
        delta = self._checked_delta(device, body)
        if self.policy.report_scope(cid) is None and \
                device in self.store.reported(env.round) - self.store.reported(env.round, cid):
            raise RefusedMessage(Refusal.STALE_ROUND, f"{device} already chose another cluster in round {env.round}")
        # against the device's (possibly lossy) copy of its start, at its rank: rebased onto ours, at the fleet's
        delta = self.rounds.rebase(device, cid, self.downlink.confirm(device, cid, body.base_version), delta)
        samples = min(body.samples, self.config.max_samples)  # a claim, stored capped (the rule caps it again)
        if samples < body.samples:
            log.warning("%s claims %d samples in round %d; weighted as at most %d", device, body.samples, env.round,
                        samples)
        try:
            new = self.store.accept_update(UpdateRecord(env.round, cid, device, pack_tensors(delta), samples,
                                                        body.loss_after, body.base_version))
        except StateUnavailable:
            self.verifier.replays.forget(device, env.nonce)  # not kept: the device's re-send must not be a "replay"
            raise
        except ValueError:  # another worker closed the round since we looked
            raise RefusedMessage(Refusal.STALE_ROUND,
                                 f"{device}: round {env.round} of cluster {cid} closed meanwhile") from None
        self._stored.setdefault((env.round, cid), set()).add(device)
        self.telemetry.record_privacy(env.round, device, body.epsilon, body.dp_delta)
        self.membership.assignment[device] = cid  # the cluster it answered (a choice, under IFCA)
        self._acknowledge(env, device, size, new)
        if new:
            self.rounds.maybe_close(env.round, cid)

    def _acknowledge(self, env: Envelope, device: str, size: int, new: bool) -> None:
        """Count the bytes and ack; a duplicate (a device's re-send, a QoS-1 redelivery) is acked as such."""
        self.telemetry.count(env.round, device, "up", size)
        if not new:
            self.telemetry.duplicate_updates += 1  # the handler thread alone writes it
        self.outbox.send(device, MessageType.UPDATE_ACK, UpdateAck(env.round, True, "" if new else "duplicate").encode(),
                         env.round)

    def _checked_delta(self, device: str, body: UpdateBody):
        # samples in [1, 2**63 - 1] and steps >= 0: UpdateBody.decode refused the rest
        if not (math.isfinite(body.loss_before) and math.isfinite(body.loss_after)):
            raise RefusedMessage(Refusal.NON_FINITE, f"{device} reports a non-finite loss")
        if not (body.epsilon == -1.0 or body.epsilon >= 0) or not (body.dp_delta == 0 or 0 < body.dp_delta < 1):
            raise RefusedMessage(Refusal.MALFORMED, f"{device} reports epsilon {body.epsilon} at delta {body.dp_delta}")
        return decode_payload(body.codec, body.tensors, self.rounds.shapes_of(device), set(self.config.uplink_codecs))


class EnrolmentIntake:
    """A device's sealed, self-signed enrolment: admitted by model and token, acknowledged, then told what
    is open. A device running another base model, or presenting a bad token, is told why it was refused."""

    def __init__(self, verifier: EnvelopeVerifier, identity: Identity, store: StateStore, rounds: RoundController,
                 outbox: Outbox, telemetry: Telemetry, enrolled: EnrolledIds, model: str) -> None:
        self.verifier, self.identity, self.store, self.rounds = verifier, identity, store, rounds
        self.outbox, self.telemetry, self.enrolled, self.model = outbox, telemetry, enrolled, model

    def on_enrol(self, topic: str, data: bytes) -> None:
        env = self.verifier.parse(data, {MessageType.ENROL})
        check_sender(topic, env.sender)
        body = open_enrolment(self.identity, self.verifier, env)
        try:
            admit(self.store, env, body, self.model, max_rank=self.rounds.lora.r)
        except RefusedMessage as e:
            if e.reason in (Refusal.MODEL_MISMATCH, Refusal.RANK_ABOVE_FLEET, Refusal.BAD_TOKEN, Refusal.REVOKED):
                self.outbox.refuse_enrolment(env.sender, body.box_key, str(e))
            raise
        self.rounds.set_rank(env.sender, body.lora_rank)
        self.telemetry.count(0, env.sender, "up", len(data))
        self.enrolled.add(env.sender)
        self.telemetry.set_online(env.sender, True)  # its retained "online" came before it was enrolled
        self.outbox.send(env.sender, MessageType.ENROL_ACK, EnrolAck(True, "").encode())
        log.info("enrolled %s (%s, LoRA rank %d)", env.sender, body.profile, self.rounds.rank_of(env.sender))
        self.rounds.resume_device(env.sender)


class StatusIntake:
    """Signed device status (a device that lost its adapter copy asks for full adapters) and last wills.

    A refused status is answered as a refused update of its round: without the adapter it asked
    for, the device takes no part in that round. Presence is unsigned, so it counts only for
    enrolled ids: the online map holds at most the enrolled fleet.
    """

    def __init__(self, verifier: EnvelopeVerifier, identity: Identity, store: StateStore, rounds: RoundController,
                 downlink: DownlinkMirror, outbox: Outbox, telemetry: Telemetry, refusals: RefusalCounter,
                 enrolled: EnrolledIds) -> None:
        self.verifier, self.identity, self.store, self.rounds = verifier, identity, store, rounds
        self.downlink, self.outbox, self.telemetry = downlink, outbox, telemetry
        self.refusals, self.enrolled = refusals, enrolled

    def on_status(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.STATUS}, topic)  # on another device's topic: not answered
        try:
            rec = self.store.device(env.sender)
            status = DeviceStatus.decode(self.identity.decrypt_from(rec.box_key, env.payload))
            if status.state != "need_full":
                raise RefusedMessage(Refusal.MALFORMED, f"unknown device status {status.state[:40]!r}")
        except RefusedMessage as e:
            self.refusals.record(e, env.sender)
            self.outbox.refuse_round(env.sender, env.round, e)
            return
        log.info("%s lost its adapter copy; sending full adapters from now on", env.sender)
        self.downlink.forget(env.sender)
        self.rounds.resume_device(env.sender)

    def on_presence(self, topic: str, data: bytes) -> None:
        """The retained ``online`` / ``offline`` (last will) a device's connection publishes."""
        device = device_of(topic)
        if device not in self.enrolled:
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"presence of {device[:64]!r}, which is not enrolled")
        if data not in (b"online", b"offline"):
            raise RefusedMessage(Refusal.MALFORMED, f"presence of {device} is {data[:16]!r}, not online/offline")
        self.telemetry.set_online(device, data == b"online")
