"""The aggregator daemon: its parts, wired together, and the one worker thread that runs them.

Parts (``docs/architecture.md`` draws them):

* ``Inbox`` - the topic filter -> handler table; paho's network thread only enqueues;
* ``EnrolmentIntake``, ``TaskIntake``, ``UpdateIntake``, ``StatusIntake`` - what devices send;
* ``Membership`` + a ``ClusteringPolicy`` - who shares an adapter with whom;
* ``RoundController`` - the round state machine over the ``StateStore``, with the aggregation
  rule and the ``CloudStep`` (local interaction, or the cloud tier's);
* ``GenerationEndpoint`` - sampling for devices, batched; ``Outbox`` and ``Telemetry``.

Durable state lives in the store; everything in memory is a cache rebuilt from it on start,
which is what makes a restart (or a SIGKILL) lose nothing that was acknowledged. With
PostgreSQL, several workers of one aggregator share the uplink; one leads (forms clusters,
closes and opens rounds), the others accept updates and follow the leader through the store.
"""

from __future__ import annotations

import logging
import threading
import time

from aggregator.cloud_step import CloudStep
from aggregator.config import AggregatorConfig
from aggregator.downlink import DownlinkMirror
from aggregator.enrolled import EnrolledIds
from aggregator.enrolment import announce_keys, verify_key_of
from aggregator.global_model import GlobalModel
from aggregator.hierarchy import CloudLink
from aggregator.inbox import Inbox
from aggregator.intake import EnrolmentIntake, StatusIntake, TaskIntake, UpdateIntake
from aggregator.keyring import KeyRing, key_path
from aggregator.membership import Membership
from aggregator.outbox import Outbox
from aggregator.policies import make_policy
from aggregator.retained import RetainedGuard
from aggregator.rollout import read_report, record_report
from aggregator.rounds import RoundController
from aggregator.rules import make_rule
from aggregator.serve import GenerationEndpoint
from aggregator.state import StateStore, StateUnavailable, open_store, state_directory
from aggregator.telemetry import Telemetry
from edge_sdk.artifacts.manifest import model_digest, part_digests
from edge_sdk.protocol import topics
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter
from edge_sdk.protocol.errors import RefusalCounter
from edge_sdk.protocol.topics import Topics
from edge_sdk.transport import MqttTransport
from models.lora import lora_to_dict

log = logging.getLogger("fedaigc.aggregator")

TICK_S = 0.5  # time-driven work (deadlines, the enrolment window, a silent cloud) at most this often


class AggregatorService:
    def __init__(self, config: AggregatorConfig, store: StateStore | None = None) -> None:
        self.config = c = config
        try:
            state_directory(c.state_dir)
            self.store = store or open_store(c.store_url)
            self.identity = KeyRing(key_path(c.state_dir), self.store)
        except OSError as e:
            raise StateUnavailable(f"state directory {c.state_dir} is not usable: {e}") from e
        if revoked := self.store.sync_config_tokens(c.tokens):
            log.warning("revoked %d config token(s) no longer listed in tokens, and the devices enrolled with them",
                        revoked)
        self.refusals = RefusalCounter()
        self.topics = Topics(c.mqtt_topic_prefix)
        worker = c.aggregator_id + (f"-{c.worker_id}" if c.worker_id else "")
        enrolled = EnrolledIds(self.store)
        self.transport = MqttTransport(c.mqtt(f"fedaigc-{worker}"), self.refusals, accept_chunks_from=enrolled)
        self.retained = RetainedGuard(self.transport, self.refusals, c.announce_interval_s)  # our key announcement
        self.telemetry = Telemetry(self.store, self.refusals, worker)
        self.telemetry.wire_bytes = self.transport.wire_bytes
        self.verifier = EnvelopeVerifier(lambda sender: verify_key_of(self.store, sender), max_bytes=c.max_message_bytes)
        self.writer = EnvelopeWriter(self.identity, c.aggregator_id)
        self.outbox = Outbox(self.transport, self.writer, self.identity, self.store, self.topics, self.telemetry)
        self.global_model = GlobalModel(c.lora, c.base_model)
        self.model_digest = model_digest(part_digests(self.global_model.backend))
        self.initial = self.global_model.initial_adapter(seed=c.seed)
        self.downlink = DownlinkMirror(c.downlink_codec, deltas=c.downlink_deltas, seeded=(c.seed, self.initial))
        self.membership = Membership(self.store, make_policy(c.clustering, c.k, c.refine_after_round))
        self.inbox = Inbox(self.refusals)
        link = None if c.role != "edge" else CloudLink(
            c.aggregator_id, self.identity, c.cloud_url, c.cloud_token, c.cloud_fingerprint, c.cloud_codec,
            {k: tuple(v.shape) for k, v in self.initial.items()},
            lambda rnd, adapters: self.inbox.post(lambda: self.rounds.cloud_mix_arrived(rnd, adapters), "cloud mix"),
            self.refusals, self.model_digest, c.mqtt_topic_prefix, c.cloud_trust_on_first_use)
        self.rounds = RoundController(c, self.store, self.membership, make_rule(c.rule, c.clip, c.sample_bound), c.lora,
                                      self.global_model, self.initial, self.downlink, self.outbox,
                                      CloudStep(c, link), self.refusals, self.telemetry.persist, self.is_leader)
        self.tasks = TaskIntake(c, self.verifier, self.identity, self.store, self.membership, self.rounds,
                                self.telemetry, self.is_leader)
        self.updates = UpdateIntake(c, self.verifier, self.identity, self.store, self.membership, self.rounds,
                                    self.downlink, self.outbox, self.telemetry, self.refusals, self.follow)
        self.enrolment = EnrolmentIntake(self.verifier, self.identity, self.store, self.rounds, self.outbox,
                                         self.telemetry, enrolled, self.model_digest)
        self.status = StatusIntake(self.verifier, self.identity, self.store, self.rounds, self.downlink, self.outbox,
                                   self.telemetry, self.refusals, enrolled)
        self.generation = GenerationEndpoint(self.global_model, self.verifier, self.identity, self.outbox,
                                             self.telemetry, self.refusals, max_batch=c.serve_max_batch,
                                             max_wait_s=c.serve_max_wait_s, max_queue=c.serve_max_queue,
                                             device_rate=c.serve_device_rate, device_burst=c.serve_device_burst)
        self.metrics_server = None
        self._leader = False
        self._followed: tuple | None = None  # (current_round, done) a worker that does not lead last loaded
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # ---------------------------------------------------------------- what callers read
    @property
    def done(self) -> threading.Event:
        return self.rounds.done

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.rounds.shapes

    @property
    def cloud(self) -> CloudLink | None:
        return self.rounds.cloud.link

    def current_round(self) -> int:
        return self.rounds.current_round()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "AggregatorService":
        c = self.config
        self.telemetry.restore_refusals()
        self.transport.connect()
        self.recover()
        shared = (lambda f: topics.shared(c.shared_group, f)) if c.shared_group else (lambda f: f)
        routes = {
            shared(self.topics.enrol_all): self.enrolment.on_enrol,
            shared(self.topics.task_all): self.tasks.on_task,
            shared(self.topics.update_all): self.updates.on_update,
            shared(self.topics.generate_all): self.generation.on_request,
            shared(self.topics.device_status_all): self.status.on_status,
            self.topics.status_all: self.status.on_presence,
            self.topics.rollout_report_all: lambda topic, data: record_report(
                self.store, *read_report(self.verifier, self.identity, self.store, topic, data)),
        }
        chunked = {shared(self.topics.update_all), shared(self.topics.generate_all)}  # the uplinks larger than a frame
        for topic_filter, handler in routes.items():
            self.inbox.route(self.transport, topic_filter, handler, chunked=topic_filter in chunked)
        self.announce()
        if c.metrics_port is not None:
            from aggregator.metrics import serve_metrics

            self.metrics_server = serve_metrics(self, c.metrics_port, c.metrics_addr)
        if self.cloud is not None:
            self.cloud.start()
        self._worker = threading.Thread(target=self._run, name="aggregator", daemon=True)
        self._worker.start()
        self.generation.service.start()
        log.info("aggregator %s (%s) up at %s, key fingerprint %s", c.aggregator_id, c.role, c.mqtt_url,
                 self.identity.public.fingerprint)
        return self

    def announce(self) -> None:
        """The retained key announcement (with the hand-over chain after a rotation)."""
        announce_keys(self.transport, self.writer, self.identity, self.config.aggregator_id,
                      self.topics.aggregator_keys, self.model_digest, lora_to_dict(self.config.lora), guard=self.retained)

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
            self.generation.service.stop()
        self.telemetry.persist()
        if self.cloud is not None:
            self.cloud.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.transport.close()

    def _run(self) -> None:
        try:
            if self.is_leader():
                self.rounds.resume()
        except Exception:
            log.exception("could not resume open rounds")
        last_tick = 0.0
        while not self._stop.is_set():
            self.inbox.run_one(timeout=0.1)
            if time.monotonic() - last_tick > TICK_S:
                last_tick = time.monotonic()
                try:
                    self.tick()
                except StateUnavailable as e:
                    log.error("state store unavailable, retrying: %s", e)
                except Exception:
                    log.exception("tick failed")

    def recover(self) -> None:
        """Rebuild every cache from the store after a restart; a no-op before the first grouping."""
        if not self.store.clusters():
            return
        self.membership.restore()
        self.rounds.restore()
        self.telemetry.restore()
        log.info("recovered state: round %d, %d clusters, %d devices", self.current_round(),
                 len(self.membership.centroid), len(self.membership.assignment))

    # ---------------------------------------------------------------- leading and following
    def is_leader(self) -> bool:
        """Whether this worker forms clusters, closes rounds and opens the next. Alone on SQLite it
        always is; PostgreSQL workers of one aggregator_id elect one by an advisory lock, and the
        first to ask after the leader died takes over (see ``tick``)."""
        if not self._leader and self.store.try_lead(self.config.aggregator_id):
            self._leader = True
            log.info("worker %s leads aggregator %s", self.config.worker_id, self.config.aggregator_id)
        return self._leader

    def follow(self) -> None:
        """A worker that does not lead reloads the leader's rounds and clusters when they moved on."""
        if self._leader:
            return
        now = (self.current_round(), bool(self.store.get("done", False)))
        if now != self._followed:
            self._followed = now
            self.recover()

    def tick(self) -> None:
        """Time-driven work: a rotated key, the key announcement, a silent cloud, the enrolment window,
        late joiners, round deadlines."""
        if self.identity.refresh():
            self.announce()
        self.retained.refresh_if_due()
        led = self._leader
        if not self.is_leader():
            self.follow()
            self.telemetry.persist_if_due()
            return
        if not led:  # took over from a leader that died: its open round goes on from the store
            self.recover()
            self.rounds.resume()
        self.rounds.check_cloud()
        self.tasks.tick()
        self.rounds.check_deadlines()
        self.telemetry.persist_if_due()
