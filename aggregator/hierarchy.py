"""Two tiers: edge aggregators serve devices, a cloud aggregator lets their clusters meet.

Devices exchange only with their edge aggregator (usually at the same site, on its own
broker). After each round an edge sends the cloud its *cluster* adapters with their task
centroids and sizes, never a device's update or task vector; the cloud runs the same
inter-cluster interaction the single-tier aggregator runs locally, over the clusters of
every edge, and sends each edge its clusters back. So a task group split over sites learns
from all of them, and the wide-area link carries k adapters per edge per round instead of
one per device.

If the cloud does not answer within ``cloud_timeout_s`` the edge carries on with local
interaction only (logged); rounds never stall on the wide-area link.

The link is the device protocol one level up: the cloud publishes signed keys (retained),
an edge pinned to their fingerprint enrols with a token the cloud provisioned for it, reports
are Box-encrypted and signed envelopes, replays and unknown senders are refused the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from aggregator.enrolled import EnrolledIds
from aggregator.enrolment import admit, announce_keys, open_enrolment, verify_key_of
from aggregator.inbox import Inbox
from aggregator.interaction import Spread, interact
from aggregator.keyring import key_path
from aggregator.state import open_store
from edge_sdk.artifacts.manifest import model_digest, part_digests
from edge_sdk.protocol.codecs import decode_payload, make_codec
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.identity import Identity, PublicIdentity, seal_to
from edge_sdk.protocol.messages import CloudMix, EdgeReport, Enrol, EnrolAck, read_signed_keys
from edge_sdk.protocol.tensors import shapes_of
from edge_sdk.protocol.topics import DEFAULT_PREFIX, Topics, check_sender
from edge_sdk.transport import MqttConfig, MqttTransport
from models.backend import load_backend
from models.lora import draw_adapter, lora_modules, lora_to_dict
from models.text import EMBEDDING_DIM

log = logging.getLogger("fedaigc.hierarchy")

Adapter = dict[str, torch.Tensor]


def pack_clusters(adapters: Mapping[int, Adapter]) -> dict[str, torch.Tensor]:
    return {f"{cid}/{k}": v for cid, a in adapters.items() for k, v in a.items()}


def unpack_clusters(tensors: Mapping[str, torch.Tensor]) -> dict[int, Adapter]:
    out: dict[int, Adapter] = {}
    for name, v in tensors.items():
        cid, key = name.split("/", 1)
        out.setdefault(int(cid), {})[key] = v
    return out


def cluster_shapes(clusters: list[int], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{cid}/{k}": s for cid in clusters for k, s in shapes.items()}


class CloudLink:
    """An edge aggregator's connection to the cloud: enrol, report rounds, receive mixes.

    Mixes are handed to ``deliver(round, adapters)`` from paho's thread; the edge service
    queues them onto its own worker so all state changes stay single-threaded.
    """

    def __init__(self, edge_id: str, identity: Identity, url: str, token: str, fingerprint: str | None,
                 codec: str, shapes: Mapping[str, tuple[int, ...]], deliver: Callable[[int, dict[int, Adapter]], None],
                 refusals: RefusalCounter, model: str, topic_prefix: str = DEFAULT_PREFIX,
                 trust_on_first_use: bool = False) -> None:
        if fingerprint is None and not trust_on_first_use:
            raise ValueError(f"edge {edge_id} has no cloud_fingerprint to pin the cloud's keys by: set "
                             "cloud_fingerprint (from `fedaigc provision` at the cloud, or the fingerprint it prints), "
                             "or opt into "
                             "cloud_trust_on_first_use = true")
        self.edge_id, self.identity, self.token, self.fingerprint = edge_id, identity, token, fingerprint
        self.model = model  # the edge fleet's base model: the cloud must mix adapters of the same one
        self.codec, self.shapes, self.deliver, self.refusals = codec, dict(shapes), deliver, refusals
        self.writer = EnvelopeWriter(identity, edge_id)
        self.transport = MqttTransport(MqttConfig(url=url, client_id=f"fedaigc-{edge_id}-cloudlink",
                                                  topic_prefix=topic_prefix), refusals)
        self.topics = self.transport.topics
        self.cloud: PublicIdentity | None = None
        self.cloud_id: str | None = None
        self.verifier: EnvelopeVerifier | None = None
        self.enrolled = threading.Event()
        self._expected: dict[int, list[int]] = {}  # round -> cluster ids reported

    def start(self, timeout: float = 15.0) -> "CloudLink":
        self.transport.connect(timeout)
        self.transport.subscribe(self.topics.cloud_down(self.edge_id), self._on_down, chunked=True)
        self.transport.subscribe(self.topics.cloud_keys, self._on_keys)
        return self

    def close(self) -> None:
        self.transport.close()

    def _on_keys(self, topic: str, data: bytes) -> None:
        if not data:
            return
        body = read_signed_keys(data)
        keys = PublicIdentity(body.verify_key, body.box_key)
        if self.fingerprint is not None and keys.fingerprint != self.fingerprint:
            raise RefusedMessage(Refusal.UNTRUSTED_KEY, f"cloud keys {keys.fingerprint} are not the pinned ones")
        if self.cloud is not None and keys != self.cloud:
            raise RefusedMessage(Refusal.UNTRUSTED_KEY, "cloud keys changed; restart the edge to trust new ones")
        if body.model != self.model:
            raise RefusedMessage(Refusal.MODEL_MISMATCH, f"model mismatch: the cloud runs {body.model[:16]}, "
                                                         f"this edge's fleet {self.model[:16]}; not enrolling")
        self.cloud, self.cloud_id = keys, body.aggregator_id
        self.verifier = EnvelopeVerifier(self._cloud_key)
        pub = self.identity.public
        sealed = seal_to(keys.box_key, Enrol(self.token, pub.verify_key, pub.box_key, "edge-aggregator",
                                             self.model).encode())
        self.transport.publish(self.topics.cloud_enrol(self.edge_id), self.writer.build(MessageType.ENROL, sealed))

    def _cloud_key(self, sender: str) -> bytes:
        if sender != self.cloud_id:
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"{sender} is not this edge's cloud")
        return self.cloud.verify_key

    def report(self, rnd: int, adapters: Mapping[int, Adapter], centroids: Mapping[int, np.ndarray],
               devices: Mapping[int, int], spreads: Mapping[int, Spread | None]) -> bool:
        """Send a round's clusters; False when the cloud is not reachable yet (the edge goes on alone)."""
        if not self.enrolled.is_set():
            return False
        ids = sorted(adapters)
        modules = lora_modules(adapters[ids[0]])
        spread = np.array([[np.nan] * len(modules) if spreads.get(c) is None else [spreads[c][m] for m in modules]
                           for c in ids], dtype=np.float32)
        body = EdgeReport(rnd, ids, [int(devices[c]) for c in ids],
                          np.stack([centroids[c] for c in ids]).astype(np.float32).tobytes(), spread.tobytes(),
                          self.codec, make_codec(self.codec, seed=rnd).encode(pack_clusters({c: adapters[c] for c in ids})))
        self._expected[rnd] = ids
        sealed = self.identity.encrypt_to(self.cloud.box_key, body.encode())
        self.transport.publish(self.topics.cloud_up(self.edge_id), self.writer.build(MessageType.EDGE_REPORT, sealed, rnd))
        return True

    def _on_down(self, topic: str, data: bytes) -> None:
        if self.verifier is None:
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, "message before the cloud's keys are known")
        env = self.verifier.open(data, {MessageType.ENROL_ACK, MessageType.CLOUD_MIX})
        body = self.identity.decrypt_from(self.cloud.box_key, env.payload)
        if env.type == MessageType.ENROL_ACK:
            ack = EnrolAck.decode(body)
            if ack.accepted:
                self.enrolled.set()
                log.info("edge %s enrolled at cloud %s", self.edge_id, self.cloud_id)
            else:
                log.error("cloud refused edge %s: %s", self.edge_id, ack.reason)
            return
        mix = CloudMix.decode(body)
        ids = self._expected.pop(mix.round, None)
        if ids is None:
            raise RefusedMessage(Refusal.STALE_ROUND, f"cloud mix for round {mix.round}, which is not awaited")
        adapters = unpack_clusters(decode_payload(mix.codec, mix.adapters, cluster_shapes(ids, self.shapes)))
        self.deliver(mix.round, adapters)


class CloudAggregator:
    """The cloud tier: enrols edge aggregators and mixes their clusters each round."""

    def __init__(self, config) -> None:
        self.config = config
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = open_store(config.store_url)
        self.identity = Identity.load_or_generate(key_path(config.state_dir, "cloud"))
        backend = load_backend(config.base_model)  # the edges' fleets must run it: the cloud mixes their adapters
        self.model = model_digest(part_digests(backend))
        self.shapes = shapes_of(draw_adapter(backend.denoiser, config.lora, seed=0))
        self.modules = lora_modules(self.shapes)
        self.refusals = RefusalCounter()
        self.verifier = EnvelopeVerifier(self._edge_key, max_bytes=config.max_message_bytes)
        self.writer = EnvelopeWriter(self.identity, config.aggregator_id)
        self.reports: dict[int, dict[str, tuple[EdgeReport, dict[int, Adapter]]]] = {}
        self.first_report_at: dict[int, float] = {}
        self.mixed_rounds: list[int] = []
        self.traffic: dict[int, dict[str, dict[str, int]]] = {}  # round -> edge -> {"up", "down"}
        self.topics = Topics(config.mqtt_topic_prefix)
        self.transport: MqttTransport | None = None
        self.inbox = Inbox(self.refusals)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.store.sync_config_tokens(config.tokens)

    def start(self) -> "CloudAggregator":
        c = self.config
        self.transport = MqttTransport(c.mqtt(f"fedaigc-{c.aggregator_id}"), self.refusals,
                                       accept_chunks_from=EnrolledIds(self.store)).connect()
        self.inbox.route(self.transport, self.topics.cloud_enrol_all, self.on_enrol)
        self.inbox.route(self.transport, self.topics.cloud_up_all, self.on_report, chunked=True)
        announce_keys(self.transport, self.writer, self.identity, c.aggregator_id, self.topics.cloud_keys, self.model,
                      lora_to_dict(c.lora))
        self._worker = threading.Thread(target=self._run, name="cloud", daemon=True)
        self._worker.start()
        log.info("cloud aggregator %s up at %s, key fingerprint %s", c.aggregator_id, c.mqtt_url,
                 self.identity.public.fingerprint)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
        if self.transport is not None:
            self.transport.close()
        self.store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.inbox.run_one(timeout=0.2)
            try:
                self._close_late_rounds()
            except Exception:
                log.exception("cloud: mixing a late round failed")

    def _edge_key(self, sender: str) -> bytes:
        return verify_key_of(self.store, sender, "edge")

    def _count(self, rnd: int, edge: str, direction: str, n: int) -> None:
        per = self.traffic.setdefault(rnd, {}).setdefault(edge, {"up": 0, "down": 0})
        per[direction] += self.transport.wire_bytes(n)

    def _send(self, edge: str, mtype: MessageType, body: bytes, rnd: int = 0) -> None:
        rec = self.store.device(edge)
        env = self.writer.build(mtype, self.identity.encrypt_to(rec.box_key, body), rnd)
        self.transport.publish(self.topics.cloud_down(edge), env)
        self._count(rnd, edge, "down", len(env))

    def on_enrol(self, topic: str, data: bytes) -> None:
        env = self.verifier.parse(data, {MessageType.ENROL})
        check_sender(topic, env.sender)
        admit(self.store, env, open_enrolment(self.identity, self.verifier, env), self.model, "edge")
        self._count(0, env.sender, "up", len(data))
        self._send(env.sender, MessageType.ENROL_ACK, EnrolAck(True, "").encode())
        log.info("enrolled edge aggregator %s", env.sender)

    def on_report(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.EDGE_REPORT}, topic)
        edge = env.sender
        report = EdgeReport.decode(self.identity.decrypt_from(self.store.device(edge).box_key, env.payload))
        self._count(report.round, edge, "up", len(data))
        ids = report.clusters
        if (not ids or len(ids) != len(report.devices) or len(set(ids)) != len(ids)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*ids, *report.devices])
                or len(report.centroids) != 4 * EMBEDDING_DIM * len(ids)
                or len(report.spread) != 4 * len(self.modules) * len(ids)):
            raise RefusedMessage(Refusal.MALFORMED, f"edge {edge}'s report for round {report.round} is inconsistent")
        if report.round in self.mixed_rounds:
            raise RefusedMessage(Refusal.STALE_ROUND, f"round {report.round} was already mixed")
        shapes = self.shapes
        adapters = unpack_clusters(decode_payload(report.codec, report.adapters, cluster_shapes(ids, shapes),
                                                  set(self.config.uplink_codecs)))
        self.reports.setdefault(report.round, {})[edge] = (report, adapters)
        self.first_report_at.setdefault(report.round, time.monotonic())
        if len(self.reports[report.round]) >= (self.config.expected_edges or 1):
            self.mix(report.round)

    def _close_late_rounds(self) -> None:
        for rnd, t0 in list(self.first_report_at.items()):
            if rnd not in self.mixed_rounds and time.monotonic() - t0 > self.config.round_timeout_s:
                log.warning("cloud round %d: mixing the %d edges that reported in time", rnd, len(self.reports[rnd]))
                self.mix(rnd)

    def mix(self, rnd: int) -> None:
        """Interaction over every edge's clusters; each edge gets its own clusters back."""
        reports = self.reports.pop(rnd)
        self.first_report_at.pop(rnd, None)
        self.mixed_rounds.append(rnd)
        adapters, centroids, sizes, spreads = {}, {}, {}, {}  # keyed by (edge, cluster id)
        for edge, (report, per_cluster) in reports.items():
            rows = np.frombuffer(report.centroids, dtype=np.float32).reshape(len(report.clusters), EMBEDDING_DIM)
            spread = np.frombuffer(report.spread, dtype=np.float32).reshape(len(report.clusters), len(self.modules))
            for cid, devices, centroid, var in zip(report.clusters, report.devices, rows, spread):
                key = (edge, cid)
                adapters[key], centroids[key], sizes[key] = per_cluster[cid], centroid.astype(np.float64), float(devices)
                known = bool(np.isfinite(var).all() and (var >= 0).all())
                spreads[key] = dict(zip(self.modules, map(float, var))) if known else None
        mixed = (interact(adapters, centroids, sizes, self.config.lora, self.config.borrow, self.config.temperature,
                          self.config.interaction_min_similarity,
                          spreads=spreads if self.config.global_shrinkage else None,
                          min_agreement=self.config.interaction_min_agreement, label=f"cloud round {rnd}")
                 if self.config.interaction else adapters)
        for edge, (report, _) in sorted(reports.items()):
            mine = {cid: mixed[(edge, cid)] for cid in report.clusters}
            data = make_codec(self.config.downlink_codec, seed=rnd).encode(pack_clusters(mine))
            self._send(edge, MessageType.CLOUD_MIX, CloudMix(rnd, self.config.downlink_codec, data).encode(), rnd)
        log.info("cloud round %d: mixed %d clusters from %d edges", rnd, len(adapters), len(reports))
