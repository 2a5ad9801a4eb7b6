"""A device's side of the federation protocol, over an ``MqttTransport``.

``FederatedSession`` wires an ``EdgeClient`` to the broker: it learns the aggregator's
keys from the retained announcement (pinned by fingerprint, usually from a provisioning
bundle, or trusted on first use when the app opts in; then pinned on disk, and moved only
by a hand-over the pinned key signed), enrols, uploads the sealed task vector, and answers every
round start with a trained, compressed, encrypted update. Training runs on the
session's own worker thread, never on paho's network thread. An update the aggregator
has not acknowledged is sent again on a jittered exponential backoff
(``MqttConfig.update_retry``, ``edge_sdk.retry``) well before the round's deadline, and a
round start it has already answered (a re-invitation at the deadline) is answered again:
each time a fresh envelope around the same sealed update, which the aggregator stores once
and acknowledges as a duplicate.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_sdk.client import SHARED, EdgeClient, LocalData
from edge_sdk.downlink_budget import downlink_budget
from edge_sdk.protocol.codecs import ErrorFeedback, decode_payload, make_codec
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage, RequestRefused
from edge_sdk.protocol.files import atomic_write_bytes
from edge_sdk.protocol.handover import hands_over
from edge_sdk.protocol.identity import PublicIdentity, seal_to
from edge_sdk.protocol.messages import (
    SEEDED_CODEC,
    ClusterAssign,
    DeviceStatus,
    Enrol,
    EnrolAck,
    GenerateRequest,
    GenerateResult,
    KeyHandover,
    RoundStart,
    SeededAdapter,
    UpdateAck,
    read_signed_keys,
)
from edge_sdk.protocol.tensors import pack_tensors, shapes_of, unpack_tensors
from edge_sdk.protocol.topics import Topics
from edge_sdk.retry import Resender
from edge_sdk.rollout import Check, RolloutAgent, check_export
from edge_sdk.transport import MqttConfig, MqttTransport
from models.lora import get_adapter_state, lora_from_dict

log = logging.getLogger("fedaigc.session")


@dataclass
class RoundRecord:
    round: int
    cluster: int
    loss_before: float
    loss_after: float
    bytes_up: int
    accepted: bool | None = None


class FederatedSession:
    def __init__(self, client: EdgeClient, data: LocalData, mqtt: MqttConfig, *, codec: str = "fp32",
                 task_prompts: list[str] | None = None, rollout_health_check: Check | None = None) -> None:
        self.client = client
        self.data = data
        self.task_prompts = list(task_prompts or data.prompts)
        self.feedback = ErrorFeedback(make_codec(codec, seed=client.config.seed))
        self.refusals = RefusalCounter()
        self.topics = Topics(mqtt.topic_prefix)
        self.mqtt = MqttConfig(**{**mqtt.__dict__, "client_id": f"fedaigc-{client.device_id}",
                                  "will_topic": self.topics.status(client.device_id),
                                  "max_reassembly_bytes": mqtt.max_reassembly_bytes or downlink_budget(client)})
        self.transport = MqttTransport(self.mqtt, self.refusals)
        self.writer = EnvelopeWriter(client.identity, client.device_id)
        self.verifier: EnvelopeVerifier | None = None
        self.aggregator_id: str | None = None
        self.cluster: int | None = None
        self.enrolled = threading.Event()
        self.finished = threading.Event()
        self.rounds: list[RoundRecord] = []
        self._answers: dict[int, bytes] = {}  # round -> the sealed update we sent (each send a fresh envelope)
        self.resender = Resender(self.mqtt.update_retry)  # .retries: re-sends before any re-invitation
        self._jitter = random.Random(f"{client.device_id}/{client.config.seed}")  # decorrelates the fleet's re-sends
        self._work: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"session-{client.device_id}", daemon=True)
        self._state_path = Path(client.data_dir) / "session.json"
        self._results: dict[str, list] = {}
        self._candidates: dict[int, dict[int, tuple]] = {}  # round -> cluster -> (start, adapter) under IFCA
        self.held: tuple[int, int, dict[str, torch.Tensor]] | None = None  # (cluster, version, adapter) as received
        self._results_lock = threading.Lock()
        self.rollout = RolloutAgent(self.transport, client.identity, self.writer, client.data_dir,
                                    aggregator=self._trusted, cluster=lambda: self.cluster,
                                    load_check=self._check_export, health_check=rollout_health_check,
                                    on_installed=lambda version, path: client.use_export(path),
                                    refusals=self.refusals)
        if self.rollout.current_dir() is not None:  # what this device last installed and reported
            client.use_export(self.rollout.current_dir())
        self._restore()

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 15.0) -> "FederatedSession":
        config = self.client.config
        if config.aggregator_fingerprint is None and not config.trust_on_first_use and self.client.aggregator is None:
            raise ValueError(f"{self.client.device_id}: no aggregator to trust: load the operator's provisioning "
                             "bundle (ProvisioningBundle.load(path).device_config(...)) or set "
                             "DeviceConfig(aggregator_fingerprint=...), or opt into "
                             "DeviceConfig(trust_on_first_use=True)")
        self._worker.start()
        # handlers before the connection: what the broker kept for our session while we were away
        # (a round start, an ack) arrives right after CONNACK and would find no handler otherwise
        self.transport.subscribe(self.topics.down(self.client.device_id), self._on_down, chunked=True)
        self.transport.subscribe(self.topics.aggregator_keys, self._on_keys)
        self.rollout.start()
        self.transport.connect(timeout)
        self.transport.publish(self.topics.status(self.client.device_id), b"online", retain=True)
        self.client.hybrid_server = self
        return self

    def stop(self) -> None:
        self.client.hybrid_server = None
        self._stop.set()
        self._work.put(None)
        self.resender.close()
        self.rollout.stop()
        self.transport.close()
        self._worker.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except RefusedMessage as e:
                self.refusals.record(e, "session")
            except Exception:
                log.exception("%s: session job failed", self.client.device_id)

    def _persist(self) -> None:
        state = {"aggregator_id": self.aggregator_id, "cluster": self.cluster,
                 "aggregator": None if self.client.aggregator is None else
                 [self.client.aggregator.verify_key.hex(), self.client.aggregator.box_key.hex()],
                 "pinned_from": self.client.config.aggregator_fingerprint}
        atomic_write_bytes(self._state_path, json.dumps(state).encode(), mode=0o600)

    def _restore(self) -> None:
        if not self._state_path.exists():
            return
        state = json.loads(self._state_path.read_text())
        configured = self.client.config.aggregator_fingerprint
        if state.get("aggregator"):
            keys = PublicIdentity(*(bytes.fromhex(x) for x in state["aggregator"]))
            # the keys this device pinned, unless the app now pins others (re-provisioned): those it
            # reached by hand-over from the configured pin stay trusted across restarts
            if configured in (None, keys.fingerprint, state.get("pinned_from")):
                self._trust(state["aggregator_id"], keys, handed_over_from=state.get("pinned_from"))
            else:
                log.info("%s: the pinned fingerprint changed to %s; forgetting keys %s", self.client.device_id,
                         configured, keys.fingerprint)
        self.cluster = state.get("cluster")

    # ------------------------------------------------------------ aggregator keys & enrolment
    def _trust(self, aggregator_id: str, keys: PublicIdentity, handed_over_from: str | None = None) -> None:
        self.client.set_aggregator(keys, handed_over_from=handed_over_from)
        self.aggregator_id = aggregator_id

        def lookup(sender: str) -> bytes:
            if sender != self.aggregator_id:
                raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{sender} is not this device's aggregator")
            return keys.verify_key

        self.verifier = EnvelopeVerifier(lookup, max_bytes=self.mqtt.max_message_bytes)

    def _on_keys(self, topic: str, data: bytes) -> None:
        if not data:
            return
        body = read_signed_keys(data)
        keys = PublicIdentity(body.verify_key, body.box_key)
        if body.model != self.client.model_sha256():
            raise RefusedMessage(Refusal.MODEL_MISMATCH, f"model mismatch: fleet runs {body.model[:16]}, this device "
                                                         f"has {self.client.model_sha256()[:16]} "
                                                         f"({self.client.config.base_model}); not enrolling")
        known = self.client.aggregator
        if known == keys and self.enrolled.is_set():
            return  # the daemon's periodic re-announcement: nothing changed, no re-enrolment
        pin = known.fingerprint if known is not None else self.client.config.aggregator_fingerprint
        if pin is not None and keys.fingerprint != pin:
            chain = body.chain if isinstance(body, KeyHandover) else []
            if not hands_over(chain, keys, pin):
                raise RefusedMessage(Refusal.UNTRUSTED_KEY, f"aggregator keys {keys.fingerprint} are not the pinned "
                                                            f"{pin} and not handed over from them; not trusting them")
            log.info("%s: following the aggregator's hand-over from %s to %s", self.client.device_id, pin,
                     keys.fingerprint)
        try:
            rank = self.client.enrolment_rank(lora_from_dict(body.lora))
        except ValueError as e:
            raise RefusedMessage(Refusal.MALFORMED, f"the aggregator's LoRA config: {e}") from None
        self._trust(body.aggregator_id, keys, handed_over_from=self.client.config.aggregator_fingerprint)
        self._persist()
        self._work.put(lambda: self._enrol(rank))
        self.rollout.retry_pending()

    def _trusted(self) -> tuple[str, PublicIdentity] | None:
        """The aggregator rollouts must be signed by: the one this device enrolled with."""
        if self.client.aggregator is None or self.aggregator_id is None:
            return None
        return self.aggregator_id, self.client.aggregator

    def _check_export(self, export_dir: Path) -> None:
        """A rolled-out export must load and must have been made from this device's base model."""
        check_export(export_dir, self.client.base_sha256())

    def _enrol(self, rank: int) -> None:
        pub = self.client.identity.public
        body = Enrol(self.client.config.enrolment_token, pub.verify_key, pub.box_key, self.client.config.profile,
                     self.client.model_sha256(), rank)
        sealed = seal_to(self.client.aggregator.box_key, body.encode())
        self.transport.publish(self.topics.enrol(self.client.device_id), self.writer.build(MessageType.ENROL, sealed))

    # ------------------------------------------------------------ downlink
    def _on_down(self, topic: str, data: bytes) -> None:
        if self.verifier is None:
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, "message before the aggregator's keys are known")
        env = self.verifier.open(data)
        body = self.client.identity.decrypt_from(self.client.aggregator.box_key, env.payload)
        if env.type == MessageType.ENROL_ACK:
            ack = EnrolAck.decode(body)
            if not ack.accepted:
                log.error("%s: enrolment refused: %s", self.client.device_id, ack.reason)
                return
            self.enrolled.set()
            self._work.put(self._send_task)
        elif env.type == MessageType.CLUSTER_ASSIGN:
            self.cluster = ClusterAssign.decode(body).cluster
            self._work.put(self._persist)
        elif env.type == MessageType.ROUND_START:
            start = RoundStart.decode(body)
            self._work.put(lambda: self._on_round(start))
        elif env.type == MessageType.GENERATE_RESULT:
            result = GenerateResult.decode(body)
            with self._results_lock:  # no id: the aggregator could not read which request (see generate_remote)
                waiters = list(self._results.values()) if not result.request_id and not result.ok else \
                    [w for w in [self._results.get(result.request_id)] if w is not None]
            for waiter in waiters:
                waiter[1] = result
                waiter[0].set()
        elif env.type == MessageType.UPDATE_ACK:
            ack = UpdateAck.decode(body)
            self.resender.acknowledged(ack.round)  # accepted, duplicate or refused: re-sending changes nothing
            for rec in self.rounds:
                if rec.round == ack.round:
                    rec.accepted = ack.accepted
            if not ack.accepted:
                log.warning("%s: update for round %d refused: %s", self.client.device_id, ack.round, ack.reason)
        else:
            raise RefusedMessage(Refusal.WRONG_TYPE, f"{env.type.value} is not expected on a device's downlink")

    def generate_remote(self, prompt: str, mix: dict[int, float], n: int = 4, seed: int = 0,
                        timeout: float = 60.0) -> torch.Tensor:
        """Ask the aggregator's global model for images (for devices too weak to sample locally).

        Only the sealed conditioning (the model's own encoding of the prompt) leaves the device, never the text.
        A refused request raises ``RequestRefused`` as soon as the answer arrives: its ``reason`` is
        ``Refusal.BUSY`` when the aggregator's queue is full or this device is over its rate (ask again
        later), another reason when the request itself cannot be served. A refusal the aggregator
        could not address to one request (it could not read the body) fails every waiting call.
        """
        encoding = self.client.conditioning([prompt])[0]
        return self._ask(encoding, {str(c): float(w) for c, w in mix.items()}, n, seed, timeout, "images",
                         self.client.backend.image_shape)

    def sample_remote(self, encoding: torch.Tensor, n: int, seed: int, steps: int, server_steps: int,
                      timeout: float) -> torch.Tensor:
        """The first ``server_steps`` of a ``steps``-step run, sampled by the aggregator with this device's
        cluster adapter: ``(n, *sample_shape)`` undecoded samples the device finishes (``EdgeClient.generate``).

        Raises ``TimeoutError`` when no answer comes within ``timeout``, ``RequestRefused`` when the
        aggregator refuses or this device has no cluster yet, and ``RefusedMessage`` (counted) when the
        answer's samples are not shaped as asked.
        """
        if self.cluster is None:
            raise RequestRefused(Refusal.UNAVAILABLE, "this device has no cluster yet")
        try:
            return self._ask(encoding, {str(self.cluster): 1.0}, n, seed, timeout, "samples",
                             self.client.backend.sample_shape, steps=steps, server_steps=server_steps)
        except RequestRefused:
            raise
        except RefusedMessage as e:
            self.refusals.record(e, "hybrid samples")
            raise

    def _ask(self, encoding: torch.Tensor, mix: dict[str, float], n: int, seed: int, timeout: float,
             name: str, shape: tuple[int, ...], **hybrid: int) -> torch.Tensor:
        """Send one generation request and wait for its answer: ``(n, *shape)`` tensors called ``name``."""
        request_id = uuid.uuid4().hex
        body = GenerateRequest(request_id, pack_tensors({"encoding": encoding}), mix, n, seed, **hybrid)
        waiter = [threading.Event(), None]
        with self._results_lock:
            self._results[request_id] = waiter
        try:
            sealed = seal_to(self.client.aggregator.box_key, body.encode())
            self.transport.publish(self.topics.generate(self.client.device_id),
                                   self.writer.build(MessageType.GENERATE_REQUEST, sealed))
            if not waiter[0].wait(timeout):
                raise TimeoutError(f"no generation result within {timeout} s")
        finally:
            with self._results_lock:
                self._results.pop(request_id, None)
        result: GenerateResult = waiter[1]
        if not result.ok:
            raise RequestRefused.from_reply(result.reason)
        return unpack_tensors(result.images, {name: (n, *shape)})[name]

    def _send_task(self) -> None:
        payload = self.client.task_payload(self.task_prompts)
        self.transport.publish(self.topics.task(self.client.device_id), self.writer.build(MessageType.TASK, payload))

    def _on_round(self, start: RoundStart) -> None:
        try:
            lora = lora_from_dict(start.lora)
            self.client.adopt_lora(lora)
        except ValueError as e:  # a config this device cannot take: say why, do not train
            raise RefusedMessage(Refusal.MALFORMED, f"round {start.round}'s LoRA config: {e}") from None
        expected = shapes_of(get_adapter_state(self.client.unet, SHARED))
        adapter = None
        if start.codec == SEEDED_CODEC:
            seeded = SeededAdapter.decode(start.adapter)
            drawn = self.client.seeded_adapter(seeded.seed, lora)
            if seeded.matches(drawn):
                adapter = drawn
            else:
                log.info("%s: the adapter drawn from seed %d does not match the aggregator's", self.client.device_id,
                         seeded.seed)
        elif start.base_version < 0:
            adapter = decode_payload(start.codec, start.adapter, expected)
        elif self.held is not None and (self.held[0], self.held[1]) == (start.base_cluster, start.base_version):
            decoded = decode_payload(start.codec, start.adapter, expected)
            adapter = {k: self.held[2][k] + decoded[k] for k in decoded}
        else:  # a delta against an adapter we no longer hold (restarted, or a message was lost)
            log.info("%s: cannot apply a delta against %s", self.client.device_id,
                     (start.base_cluster, start.base_version))
        if adapter is None:
            sealed = self.client.identity.encrypt_to(self.client.aggregator.box_key,
                                                     DeviceStatus("need_full", start.round).encode())
            self.transport.publish(self.topics.device_status(self.client.device_id),
                                   self.writer.build(MessageType.STATUS, sealed, start.round))
            return
        if start.choices == 1:
            self.held = (start.cluster, start.version, adapter)
        self.cluster = start.cluster
        if start.local_steps == 0:  # the final adapter: install, no training
            self.client.install_shared(adapter, start.version)
            self.finished.set()
            return
        if start.round in self._answers:  # asked again: our update was lost or not yet counted
            self._send_update(start.round, start.deadline)
            return
        if start.choices > 1:  # IFCA: wait for every candidate, then train the one that fits our data best
            candidates = self._candidates.setdefault(start.round, {})
            candidates[start.cluster] = (start, adapter)
            if len(candidates) < start.choices:
                return
            losses = {c: self.client.local_loss(a, self.data) for c, (_, a) in candidates.items()}
            start, adapter = candidates[min(losses, key=losses.get)]
            self._candidates = {}
        update = self.client.train_round(adapter, self.data, steps=start.local_steps, version=start.version)
        self._answers = {start.round: self.client.seal_update(update, start.cluster, self.feedback)}
        size = self._send_update(start.round, start.deadline)
        self.rounds.append(RoundRecord(start.round, start.cluster, update.loss_before, update.loss_after, size))
        log.info("%s: round %d trained (loss %.4f -> %.4f), sent %d bytes", self.client.device_id, start.round,
                 update.loss_before, update.loss_after, size)

    def _send_update(self, rnd: int, deadline: float) -> int:
        """Publish round ``rnd``'s sealed update in a fresh envelope and (re)start its re-sends until the
        aggregator acknowledges it; returns the envelope's size."""
        envelope = self._publish_update(rnd)
        self.resender.track(rnd, lambda: self._publish_update(rnd), deadline, self._jitter)
        return len(envelope)

    def _publish_update(self, rnd: int) -> bytes:
        """A new nonce and timestamp each time: a copy crossing the original is a duplicate, not a replay."""
        sealed = self._answers.get(rnd)
        if sealed is None:  # a later round replaced it: that round's update is what counts now
            self.resender.acknowledged(rnd)
            return b""
        envelope = self.writer.build(MessageType.UPDATE, sealed, rnd)
        self.transport.publish(self.topics.update(self.client.device_id), envelope)
        return envelope
