"""The aggregator daemon: enrolment, clustering, rounds, aggregation, interaction.

All protocol handling runs on one worker thread fed by a queue (paho's network thread
only enqueues), so state changes are serial and every handler can be idempotent by
construction. Durable state lives in the ``StateStore``; in-memory structures are
caches rebuilt from it on start, which is what makes a restart (or a SIGKILL) lose
nothing that was acknowledged.

Round lifecycle (per global round r):

1. ``_start_round``: open (r, cluster) rows and send each member its cluster adapter.
2. Updates arrive; each accepted one is committed, then acknowledged.
3. A cluster closes when every member reported, or at its deadline with quorum
   (deadlines are extended ``max_extensions`` times for stragglers, then it closes
   with whatever arrived). Updates for a closed round are refused as ``stale_round``.
4. When all clusters of r are closed: optional CFL-style refinement of the clusters
   (after ``refine_after_round``), inter-cluster interaction, and — in one transaction
   — the new adapters plus the opening of round r + 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from aggregator.clustering import ClusterState, cluster_tasks, refine_with_updates
from aggregator.config import AggregatorConfig
from aggregator.downlink import DownlinkMirror
from aggregator.enrolment import admit, announce_keys, verify_key_of
from aggregator.global_model import GlobalModel
from aggregator.hierarchy import CloudLink
from aggregator.interaction import Spread, interact, update_spread
from aggregator.metrics import serve_metrics
from aggregator.rollout import read_report, record_report
from aggregator.rules import ClientUpdate, make_rule
from aggregator.serve import GenerationService, Request
from aggregator.state import StateStore, StateUnavailable, UpdateRecord, open_store
from edge_sdk.protocol import topics
from edge_sdk.protocol.codecs import decode_payload
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import (
    ClusterAssign,
    DeviceStatus,
    EnrolAck,
    GenerateRequest,
    GenerateResult,
    RoundStart,
    UpdateAck,
    UpdateBody,
)
from edge_sdk.protocol.tensors import pack_tensors, shapes_of, unpack_tensors
from edge_sdk.protocol.topics import Topics
from edge_sdk.transport import MqttTransport
from models.lora import LoraSpec
from models.text import EMBEDDING_DIM

log = logging.getLogger("fedaigc.aggregator")


CLOUD_MIX_TOPIC = "internal/cloud-mix"  # how the cloud link hands a mix to the worker thread


class AggregatorService:
    def __init__(self, config: AggregatorConfig, store: StateStore | None = None) -> None:
        self.config = config
        try:
            Path(config.state_dir).mkdir(parents=True, exist_ok=True)
            self.identity = Identity.load_or_generate(Path(config.state_dir) / "aggregator.key")
        except OSError as e:
            raise StateUnavailable(f"state directory {config.state_dir} is not usable: {e}") from e
        self.store = store or open_store(config.store_url)
        self.refusals = RefusalCounter()
        self.spec = LoraSpec(rank=config.lora_rank)
        self.rule = make_rule(config.rule, config.clip)
        self.global_model = GlobalModel(self.spec)
        self.initial = self.global_model.initial_adapter(seed=config.seed)
        self.shapes = shapes_of(self.initial)
        self.verifier = EnvelopeVerifier(self._verify_key_of, max_bytes=config.max_message_bytes)
        self.writer = EnvelopeWriter(self.identity, config.aggregator_id)
        self.clusters = ClusterState()
        self.online: dict[str, bool] = {}
        self.traffic: dict[int, dict[str, dict[str, int]]] = {}  # round -> device -> {"up", "down"}
        self.privacy: dict[int, dict[str, dict]] = {}  # round -> device -> {"epsilon", "delta"} as reported
        self._traffic_lock = threading.Lock()
        self.downlink = DownlinkMirror(config.downlink_codec, deltas=config.downlink_deltas,
                                       seeded=(config.seed, self.initial))
        self.generation = GenerationService(self.global_model, self._reply_generation,
                                            max_batch=config.serve_max_batch, max_wait_s=config.serve_max_wait_s)
        self.done = threading.Event()
        # called as listener(completed_round, {cluster: adapter}) once a round's adapters are committed
        self.round_listeners: list[Callable[[int, dict[int, dict[str, torch.Tensor]]], None]] = []
        self.topics = Topics(config.mqtt_topic_prefix)
        self.transport: MqttTransport | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._first_task_at: float | None = None
        self._last_tick = 0.0
        self._leader = False
        self._synced: tuple | None = None  # (current_round, done) a non-leading worker last loaded
        self.cloud: CloudLink | None = None
        self.metrics_server = None
        # round, adapters, spreads, versions, since
        self._awaiting_cloud: tuple[int, dict, dict, dict, float] | None = None
        for token in config.tokens:
            self.store.add_token(token, "config")

    # ================================================================ lifecycle
    def start(self) -> "AggregatorService":
        c = self.config
        client_id = f"fedaigc-{c.aggregator_id}" + (f"-{c.worker_id}" if c.worker_id else "")
        self.transport = MqttTransport(c.mqtt(client_id), self.refusals).connect()
        self._recover()
        uplink = [self.topics.uplink_all, self.topics.enrol_all]
        if c.shared_group:
            uplink = [topics.shared(c.shared_group, t) for t in uplink]
        for t in uplink:
            self.transport.subscribe(t, self._enqueue)
        self.transport.subscribe(self.topics.status_all, self._enqueue)
        self.transport.subscribe(self.topics.rollout_report_all, self._enqueue)
        announce_keys(self.transport, self.writer, self.identity, c.aggregator_id, self.topics.aggregator_keys)
        if c.metrics_port is not None:
            self.metrics_server = serve_metrics(self, c.metrics_port, c.metrics_addr)
        if c.role == "edge":
            self.cloud = CloudLink(c.aggregator_id, self.identity, c.cloud_url, c.cloud_token, c.cloud_fingerprint,
                                   c.cloud_codec, self.shapes, self._on_cloud_mix, self.refusals, c.mqtt_topic_prefix).start()
        self._worker = threading.Thread(target=self._run, name="aggregator", daemon=True)
        self._worker.start()
        self.generation.start()
        log.info("aggregator %s (%s) up at %s, key fingerprint %s", c.aggregator_id, c.role, c.mqtt_url,
                 self.identity.public.fingerprint)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
            self.generation.stop()
        self._persist_metrics()
        if self.cloud is not None:
            self.cloud.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.transport is not None:
            self.transport.close()

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._queue.put((topic, payload))

    def _run(self) -> None:
        try:
            if self.is_leader():
                self.resume_open_rounds()
        except Exception:
            log.exception("could not resume open rounds")
        while not self._stop.is_set():
            try:
                topic, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                topic = None
            if topic is not None:
                self.handle(topic, payload)
            if time.monotonic() - self._last_tick > 0.5:
                self._last_tick = time.monotonic()
                try:
                    self.tick()
                except StateUnavailable as e:
                    log.error("state store unavailable, retrying: %s", e)
                except Exception:
                    log.exception("tick failed")

    def handle(self, topic: str, payload: bytes) -> None:
        """Route one MQTT message; refusals are counted and logged, never raised."""
        try:
            if topic == CLOUD_MIX_TOPIC:
                self._apply_cloud_mix(*payload)
            elif topic.startswith(f"{self.topics.root}/enrol/"):
                self._on_enrol(topic, payload)
            elif topic.startswith(f"{self.topics.root}/up/task/"):
                self._on_task(topic, payload)
            elif topic.startswith(f"{self.topics.root}/up/update/"):
                self._on_update(topic, payload)
            elif topic.startswith(f"{self.topics.root}/up/generate/"):
                self._on_generate(topic, payload)
            elif topic.startswith(f"{self.topics.root}/up/status/"):
                self._on_device_status(topic, payload)
            elif topic.startswith(f"{self.topics.root}/status/"):
                self.online[topics.device_of(topic)] = payload == b"online"
            elif topic.startswith(f"{self.topics.root}/rollout/report/"):
                record_report(self.store, *read_report(self.verifier, self.identity, self.store, topic, payload))
        except RefusedMessage as e:
            self.refusals.record(e, topic)
        except StateUnavailable as e:
            self.refusals.record(RefusedMessage(Refusal.UNAVAILABLE, str(e)), topic)
        except Exception:
            log.exception("unexpected error handling %s", topic)

    # ================================================================ identity of senders
    def _verify_key_of(self, sender: str) -> bytes:
        return verify_key_of(self.store, sender)

    def _check_topic(self, topic: str, sender: str) -> None:
        if topics.device_of(topic) != sender:
            raise RefusedMessage(Refusal.MALFORMED, f"sender {sender} published on {topic}")

    def send(self, device: str, mtype: MessageType, body: bytes, rnd: int = 0) -> None:
        rec = self.store.device(device)
        if rec is None:
            return
        env = self.writer.build(mtype, self.identity.encrypt_to(rec.box_key, body), rnd)
        self.transport.publish(self.topics.down(device), env)
        self._count(rnd, device, "down", len(env))

    def _count(self, rnd: int, device: str, direction: str, n: int) -> None:
        """Account ``n`` message bytes as the MQTT payload bytes they cost (envelope and chunk headers)."""
        n = self.transport.wire_bytes(n)
        with self._traffic_lock:  # the generation thread replies too
            per = self.traffic.setdefault(rnd, {}).setdefault(device, {"up": 0, "down": 0})
            per[direction] += n

    def traffic_totals(self) -> dict[str, int]:
        """MQTT payload bytes so far, per direction, over every round and device."""
        with self._traffic_lock:
            per_device = [v for per in self.traffic.values() for v in per.values()]
        return {d: sum(v.get(d, 0) for v in per_device) for d in ("up", "down")}

    # ================================================================ enrolment & tasks
    def _on_enrol(self, topic: str, data: bytes) -> None:
        env = self.verifier.parse(data, {MessageType.ENROL})
        self._check_topic(topic, env.sender)
        body = admit(self.store, self.identity, self.verifier, env)
        self._count(0, env.sender, "up", len(data))
        self.send(env.sender, MessageType.ENROL_ACK, EnrolAck(True, "").encode())
        log.info("enrolled %s (%s)", env.sender, body.profile)
        self._resume_device(env.sender)

    def _on_task(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.TASK})
        self._check_topic(topic, env.sender)
        vector = unpack_tensors(self.identity.open_sealed(env.payload), {"task": (EMBEDDING_DIM,)})["task"]
        if float(vector.norm()) == 0.0:
            raise RefusedMessage(Refusal.MALFORMED, "task vector is all zeros")
        self.store.put_task(env.sender, vector.numpy().astype(np.float32).tobytes())
        self._count(0, env.sender, "up", len(data))
        if self._first_task_at is None:
            self._first_task_at = time.monotonic()
        if self.clusters.assignment:
            if env.sender in self.clusters.assignment:
                self._resume_device(env.sender)
            elif self.is_leader():  # only the leader writes clusters; it finds joiners other workers stored
                self._join_late(env.sender, vector.numpy())
        elif self.config.expected_devices is not None and self.store.task_count() >= self.config.expected_devices \
                and self.is_leader():
            self.form_clusters()

    def _task_matrix(self) -> tuple[list[str], np.ndarray]:
        tasks = self.store.tasks()
        enrolled = {d.device_id for d in self.store.devices() if not d.revoked}
        devices = [d for d in sorted(tasks) if d in enrolled]
        return devices, np.stack([np.frombuffer(tasks[d], dtype=np.float32) for d in devices])

    @property
    def ifca(self) -> bool:
        return self.config.clustering == "ifca"

    def form_clusters(self) -> None:
        """First grouping (task clustering, one group, or IFCA's k candidates); opens round 1."""
        devices, vectors = self._task_matrix()
        if self.config.clustering == "tasks":
            labels = cluster_tasks(vectors, self.config.k)
        elif self.config.clustering == "single":
            labels = np.zeros(len(devices), dtype=np.int64)
        else:  # ifca: membership is each device's choice per round; start spread round-robin
            labels = np.arange(len(devices)) % self.config.k
        assignment = self.clusters.recluster(devices, vectors, labels)
        if self.ifca:  # IFCA needs distinct starting points to break the symmetry between clusters
            adapters = {cid: self.global_model.initial_adapter(self.config.seed + cid, b_std=1e-2)
                        for cid in set(assignment.values())}
        else:
            adapters = {cid: self.initial for cid in set(assignment.values())}
        log.info("clustered %d devices into %d clusters: %s", len(devices), len(adapters),
                 dict(Counter(assignment.values())))
        self._commit_round(1, adapters, {cid: 0 for cid in adapters})

    def _join_late(self, device: str, vector: np.ndarray) -> None:
        cid = self.clusters.join(device, vector)
        known = self.store.clusters()
        if cid not in known:
            known[cid] = (None, pack_tensors(self.initial), 0)
        centroid_blobs = {c: (self.clusters.centroid[c].astype(np.float32).tobytes(), a, v) for c, (_, a, v) in known.items()}
        self.store.save_clusters(centroid_blobs, self.clusters.assignment)
        rnd = self.current_round()
        if rnd and not any(r == rnd and c == cid for r, c, *_ in self.store.rounds()):
            self.store.open_round(rnd, cid, time.time() + self.config.round_timeout_s)
            self.global_model.set_cluster(cid, self.initial, 0)
        log.info("late device %s joined cluster %d", device, cid)
        self._resume_device(device)

    def _resume_device(self, device: str) -> None:
        """(Re)send a device what it needs to take part now: its cluster and the open round."""
        cid = self.clusters.assignment.get(device)
        if cid is None:
            return
        self.send(device, MessageType.CLUSTER_ASSIGN, ClusterAssign(cid).encode())
        rnd = self.current_round()
        if self.done.is_set() or self.store.get("done", False):
            self._send_round_start(device, rnd, cid, install_only=True)
            return
        if device in self.store.reported(rnd):
            return
        for r, c, *_ in self.store.rounds("open"):
            if r == rnd and (c == cid or self.ifca):
                self._send_round_start(device, rnd, c)

    # ================================================================ rounds
    def current_round(self) -> int:
        return int(self.store.get("current_round", 0))

    def members(self, cid: int) -> list[str]:
        revoked = self.store.revoked_devices()
        return sorted(d for d, c in self.clusters.assignment.items() if c == cid and d not in revoked)

    def recipients(self, cid: int) -> list[str]:
        """Who gets cluster ``cid``'s round start: its members, or everyone under IFCA."""
        if not self.ifca:
            return self.members(cid)
        revoked = self.store.revoked_devices()
        return sorted(d for d in self.clusters.assignment if d not in revoked)

    def cluster_adapter(self, cid: int) -> tuple[dict[str, torch.Tensor], int]:
        _, blob, version = self.store.clusters()[cid]
        return unpack_tensors(blob, self.shapes), version

    def _round_context(self, rnd: int, cid: int) -> tuple[dict[str, torch.Tensor], int, float, int]:
        """What every round start of (rnd, cid) shares: read once per batch of devices, not per device."""
        adapter, version = self.cluster_adapter(cid)
        deadline = next((d for r, c, _, _, d in self.store.rounds() if r == rnd and c == cid), time.time())
        return adapter, version, deadline, len(self.store.clusters())

    def _send_round_start(self, device: str, rnd: int, cid: int, install_only: bool = False,
                          context: tuple | None = None) -> None:
        adapter, version, deadline, n_clusters = context or self._round_context(rnd, cid)
        choices = n_clusters if self.ifca and not install_only else 1
        # under IFCA a device receives k candidates at once; deltas against one held adapter do not apply
        payload = (self.downlink.full(cid, version, adapter) if self.ifca else
                   self.downlink.payload(device, cid, version, adapter))
        body = RoundStart(rnd, cid, version, self.spec.rank, payload.base_cluster, payload.base_version, float(deadline),
                          0 if install_only else self.config.local_steps, choices, payload.codec, payload.data)
        self.send(device, MessageType.ROUND_START, body.encode(), rnd)

    def _commit_round(self, rnd: int, adapters: dict[int, dict[str, torch.Tensor]], versions: dict[int, int]) -> None:
        """Persist adapters and open round ``rnd`` in one transaction, then tell the devices."""
        deadline = time.time() + self.config.round_timeout_s
        final = rnd > self.config.rounds
        blobs = {cid: (self.clusters.centroid[cid].astype(np.float32).tobytes(), pack_tensors(a), versions[cid])
                 for cid, a in adapters.items()}
        with self.store.transaction() as cur:
            self.store.save_clusters(blobs, self.clusters.assignment, cur=cur)
            if not final:
                for cid in adapters:
                    self.store.open_round(rnd, cid, deadline, cur=cur)
            self.store.put("current_round", rnd if not final else self.config.rounds, cur=cur)
            self.store.put("done", final, cur=cur)
        for cid, adapter in adapters.items():
            self.global_model.set_cluster(cid, adapter, versions[cid])
        for cid in list(self.global_model.clusters):
            if cid not in adapters:
                self.global_model.drop_cluster(cid)
        for cid in adapters:
            context = self._round_context(rnd if not final else self.config.rounds, cid)
            for device in (self.members(cid) if final else self.recipients(cid)):
                self._send_round_start(device, rnd if not final else self.config.rounds, cid, install_only=final,
                                       context=context)
        for listener in self.round_listeners:
            listener(rnd - 1, {cid: {k: v.clone() for k, v in a.items()} for cid, a in adapters.items()})
        self._persist_metrics()
        if final:
            log.info("federation finished after %d rounds", self.config.rounds)
            self.done.set()
        else:
            log.info("round %d open for %d clusters", rnd, len(adapters))

    def _on_update(self, topic: str, data: bytes) -> None:
        if not self._leader:
            self._sync()
        env = self.verifier.open(data, {MessageType.UPDATE})
        device = env.sender
        self._check_topic(topic, device)
        rec = self.store.device(device)
        body = UpdateBody.decode(self.identity.decrypt_from(rec.box_key, env.payload))
        self._count(env.round, device, "up", len(data))
        cid = self.clusters.assignment.get(device)
        if self.ifca and cid is not None:
            cid = body.cluster  # under IFCA the device picks its cluster every round
        open_rounds = {(r, c) for r, c, *_ in self.store.rounds("open")}
        if cid is None or body.cluster != cid or (env.round, cid) not in open_rounds:
            self._refuse_update(device, env.round, RefusedMessage(
                Refusal.STALE_ROUND, f"{device}: round {env.round} of cluster {body.cluster} is not open"))
            return
        try:
            if body.samples < 1 or body.steps < 0:
                raise RefusedMessage(Refusal.MALFORMED, f"{device} reports {body.samples} samples")
            if not (math.isfinite(body.loss_before) and math.isfinite(body.loss_after)):
                raise RefusedMessage(Refusal.NON_FINITE, f"{device} reports a non-finite loss")
            if not (body.epsilon == -1.0 or body.epsilon >= 0) or not (body.dp_delta == 0 or 0 < body.dp_delta < 1):
                raise RefusedMessage(Refusal.MALFORMED,
                                     f"{device} reports epsilon {body.epsilon} at delta {body.dp_delta}")
            delta = decode_payload(body.codec, body.tensors, self.shapes, set(self.config.uplink_codecs))
        except RefusedMessage as e:
            self._refuse_update(device, env.round, e)
            return
        if self.ifca and device in self.store.reported(env.round) - self.store.reported(env.round, cid):
            self._refuse_update(device, env.round, RefusedMessage(
                Refusal.STALE_ROUND, f"{device} already chose another cluster in round {env.round}"))
            return
        start = self.downlink.confirm(device, cid, body.base_version)
        if start is not None:  # the device started from its (possibly lossy) copy: rebase onto ours
            current, _ = self.cluster_adapter(cid)
            delta = {k: start[k] + delta[k] - current[k] for k in delta}
        try:
            new = self.store.accept_update(UpdateRecord(env.round, cid, device, pack_tensors(delta), body.samples,
                                                        body.loss_after, body.base_version))
        except StateUnavailable:
            self.verifier.replays.forget(device, env.nonce)  # not kept: the device's re-send must not be a "replay"
            raise
        except ValueError:  # another worker closed the round since we looked
            self._refuse_update(device, env.round, RefusedMessage(
                Refusal.STALE_ROUND, f"{device}: round {env.round} of cluster {cid} closed meanwhile"))
            return
        self._record_privacy(env.round, device, body)
        if self.ifca:
            self.clusters.assignment[device] = cid
        self.send(device, MessageType.UPDATE_ACK, UpdateAck(env.round, True, "" if new else "duplicate").encode(), env.round)
        if new:
            self._maybe_close(env.round, cid)

    def _record_privacy(self, rnd: int, device: str, body: UpdateBody) -> None:
        """The DP budget a device says it has spent (its own accounting: the aggregator cannot verify noise)."""
        epsilon = None if math.isinf(body.epsilon) else float(body.epsilon)  # None: no finite bound (JSON has no inf)
        self.privacy.setdefault(rnd, {})[device] = {"epsilon": epsilon, "delta": float(body.dp_delta)}

    def _merged_privacy(self) -> dict[str, dict[str, dict]]:
        """Ours merged into the stored record: scale-out workers each see only some devices' updates."""
        merged = self.store.get("privacy", {})
        for rnd, reports in self.privacy.items():
            merged.setdefault(str(rnd), {}).update(reports)
        return merged

    def _refuse_update(self, device: str, rnd: int, error: RefusedMessage) -> None:
        self.refusals.record(error, device)
        self.send(device, MessageType.UPDATE_ACK, UpdateAck(rnd, False, error.reason.value).encode(), rnd)

    def _maybe_close(self, rnd: int, cid: int) -> None:
        if not self.is_leader():
            return  # the leading worker's tick sees the round complete
        if self.ifca:  # every device answers exactly one of the k clusters: close them together
            reported = self.store.reported(rnd)
            if set(self.recipients(cid)) <= reported:
                for r, c, *_ in self.store.rounds("open"):
                    if r == rnd:
                        self.close_cluster_round(rnd, c)
            return
        members = self.members(cid)  # ids only, counted first: this runs once per accepted update
        if self.store.reported_count(rnd, cid) >= len(members) and set(members) <= self.store.reported(rnd, cid):
            self.close_cluster_round(rnd, cid)

    def close_cluster_round(self, rnd: int, cid: int) -> None:
        current, version = self.cluster_adapter(cid)
        members = self.members(cid)
        with self.store.closing_round(rnd, cid) as closing:
            if closing is None:  # closed already (before a restart, or by another worker)
                return
            cur, records = closing  # no update can be accepted for (rnd, cid) until this commits
            updates = [ClientUpdate.from_delta(r.device_id, current, unpack_tensors(r.delta, self.shapes), r.samples)
                       for r in records]
            if updates:
                with _one_torch_thread():
                    result = self.rule.aggregate(current, updates, self.spec)
                adapter, accepted, rejected = result.adapter, result.accepted, result.rejected
            else:
                adapter, accepted, rejected = current, [], {}
            samples = sum(r.samples for r in records if r.device_id in accepted)
            loss = sum(r.loss * r.samples for r in records if r.device_id in accepted) / max(samples, 1)
            kept = [u for u in updates if u.device_id in accepted]
            summary = {"accepted": accepted, "rejected": rejected, "samples": samples, "loss": loss,
                       "members": members, "closed_at": time.time(),
                       "spread": update_spread(kept, self.spec)}
            self.store.close_round(rnd, cid, pack_tensors(adapter), version + 1, summary, cur=cur)
        for device, reason in rejected.items():
            self.refusals.record(RefusedMessage(Refusal(reason), f"{device}'s update screened out at aggregation"))
        log.info("round %d cluster %d closed: %d/%d updates, loss %.4f", rnd, cid, len(accepted),
                 len(members), loss)
        if not self.store.rounds("open") and self.current_round() == rnd:
            self.finish_round(rnd)

    def finish_round(self, rnd: int) -> None:
        """Cloud step for round ``rnd``: refinement, interaction, then open the next round."""
        clusters = self.store.clusters()
        adapters = {cid: unpack_tensors(blob, self.shapes) for cid, (_, blob, _) in clusters.items()}
        versions = {cid: v for cid, (_, _, v) in clusters.items()}
        spreads = {cid: summary.get("spread") for r, cid, summary in self.store.round_summaries() if r == rnd}
        if rnd == self.config.refine_after_round and self.config.k is None and self.config.clustering == "tasks":
            adapters, versions, spreads = self._refine(rnd, adapters, versions, spreads)
        if self.cloud is not None and self.cloud.report(rnd, adapters, self.clusters.centroid,
                                                        {c: len(self.members(c)) for c in adapters}, spreads):
            self._awaiting_cloud = (rnd, adapters, spreads, versions, time.monotonic())
            return  # the cloud's mix (or its timeout) opens the next round
        self._commit_round(rnd + 1, self._interact_locally(rnd, adapters, spreads), versions)

    def _interact_locally(self, rnd: int, adapters: dict[int, dict[str, torch.Tensor]],
                          spreads: Mapping[int, Spread | None]) -> dict[int, dict[str, torch.Tensor]]:
        if not (self.config.interaction and len(adapters) > 1):
            return adapters
        sizes = {cid: float(len(self.members(cid))) for cid in adapters}
        return interact(adapters, {c: self.clusters.centroid[c] for c in adapters}, sizes, self.spec,
                        self.config.borrow, self.config.temperature, self.config.interaction_min_similarity,
                        spreads=spreads if self.config.global_shrinkage else None,
                        min_agreement=self.config.interaction_min_agreement, label=f"round {rnd}")

    def _on_cloud_mix(self, rnd: int, adapters: dict[int, dict[str, torch.Tensor]]) -> None:
        self._queue.put((CLOUD_MIX_TOPIC, (rnd, adapters)))

    def _apply_cloud_mix(self, rnd: int, adapters: dict[int, dict[str, torch.Tensor]]) -> None:
        waiting = self._awaiting_cloud
        if waiting is None or waiting[0] != rnd or set(adapters) != set(waiting[1]):
            raise RefusedMessage(Refusal.STALE_ROUND, f"cloud mix for round {rnd} does not match what this edge awaits")
        self._awaiting_cloud = None
        self._commit_round(rnd + 1, adapters, waiting[3])

    def _refine(self, rnd: int, adapters, versions, spreads):
        """Re-cluster on task + update similarity; regroup this round's updates if groups changed."""
        records = self.store.updates(rnd)
        devices, vectors = self._task_matrix()
        by_device = {r.device_id: r for r in records}
        if len(devices) < 3 or any(d not in by_device for d in devices):
            return adapters, versions, spreads
        update_vectors = np.stack([
            torch.cat([t.flatten() for _, t in sorted(unpack_tensors(by_device[d].delta, self.shapes).items())]).numpy()
            for d in devices])
        labels = refine_with_updates(vectors, update_vectors)
        before = self.clusters.assignment
        same = _same_partition([before[d] for d in devices], labels.tolist())
        if same:
            log.info("refinement after round %d kept the clusters", rnd)
            return adapters, versions, spreads
        assignment = self.clusters.recluster(devices, vectors, labels)
        log.info("refinement after round %d regrouped devices: %d clusters %s", rnd,
                 len(set(assignment.values())), dict(Counter(assignment.values())))
        # every cluster started round 1 from the same initial adapter, so updates regroup freely
        new_adapters, new_versions, new_spreads = {}, {}, {}
        for cid in sorted(set(assignment.values())):
            group = [ClientUpdate.from_delta(d, self.initial, unpack_tensors(by_device[d].delta, self.shapes),
                                             by_device[d].samples) for d in devices if assignment[d] == cid]
            result = self.rule.aggregate(self.initial, group, self.spec)
            new_adapters[cid] = result.adapter
            new_versions[cid] = max(versions.values()) if versions else 1
            kept = [u for u in group if u.device_id in result.accepted]
            new_spreads[cid] = update_spread(kept, self.spec)
        return new_adapters, new_versions, new_spreads

    def is_leader(self) -> bool:
        """Whether this worker forms clusters, closes rounds and opens the next. Alone on SQLite it
        always is; PostgreSQL workers of one aggregator_id elect one by an advisory lock, and the
        first to ask after the leader died takes over (see ``tick``)."""
        if not self._leader and self.store.try_lead(self.config.aggregator_id):
            self._leader = True
            log.info("worker %s leads aggregator %s", self.config.worker_id, self.config.aggregator_id)
        return self._leader

    def _sync(self) -> None:
        """A worker that does not lead follows the leader's rounds and clusters through the store."""
        now = (self.current_round(), bool(self.store.get("done", False)))
        if now != self._synced:
            self._synced = now
            self._recover()

    def tick(self) -> None:
        """Time-driven work: the enrolment window, round deadlines, a silent cloud."""
        led = self._leader
        if not self.is_leader():
            self._sync()
            if time.monotonic() - getattr(self, "_metrics_at", 0.0) > 2.0:
                self._persist_metrics()
            return
        if not led:  # took over from a leader that died: its open round goes on from the store
            self._recover()
            self.resume_open_rounds()
        if self._awaiting_cloud is not None and time.monotonic() - self._awaiting_cloud[4] > self.config.cloud_timeout_s:
            rnd, adapters, spreads, versions, _ = self._awaiting_cloud
            log.warning("no cloud mix for round %d within %.0f s; interacting locally", rnd, self.config.cloud_timeout_s)
            self._awaiting_cloud = None
            self._commit_round(rnd + 1, self._interact_locally(rnd, adapters, spreads), versions)
        if not self.clusters.assignment:
            tasks = self.store.task_count()  # other workers may have received them
            if tasks and self._first_task_at is None:
                self._first_task_at = time.monotonic()
            if (self.config.expected_devices is not None and tasks >= self.config.expected_devices) or (
                    self._first_task_at is not None and time.monotonic() - self._first_task_at >= self.config.enrol_window_s):
                self.form_clusters()
        if self.config.shared_group and self.clusters.assignment:
            for device, vector in self.store.unassigned_tasks().items():  # late joiners other workers took
                self._join_late(device, np.frombuffer(vector, dtype=np.float32).astype(np.float64))
        now = time.time()
        for rnd, cid, _, _, deadline in self.store.rounds("open"):
            if now < deadline:
                self._maybe_close(rnd, cid)  # complete through updates other workers accepted
                continue
            members = self.recipients(cid) if self.ifca else self.members(cid)
            reported = self.store.reported(rnd, None if self.ifca else cid)
            needed = max(1, math.ceil(self.config.quorum * len(members)))
            extensions = int(self.store.get(f"extensions/{rnd}/{cid}", 0))
            if len(reported) >= needed or extensions >= self.config.max_extensions:
                log.info("round %d cluster %d deadline: closing with %d/%d updates", rnd, cid, len(reported), len(members))
                self.close_cluster_round(rnd, cid)
            else:
                self.store.put(f"extensions/{rnd}/{cid}", extensions + 1)
                self.store.extend_round(rnd, cid, now + self.config.round_timeout_s)
                context = self._round_context(rnd, cid)
                for device in members:
                    if device not in reported:  # maybe it missed the round start
                        self._send_round_start(device, rnd, cid, context=context)
        if time.monotonic() - getattr(self, "_metrics_at", 0.0) > 2.0:
            self._persist_metrics()

    # ================================================================ recovery & status
    def _recover(self) -> None:
        """Rebuild caches from the store after a restart; resume whatever round was open."""
        clusters = self.store.clusters()
        if not clusters:
            return
        self.clusters.assignment = self.store.assignment()
        self.clusters.centroid = {cid: np.frombuffer(c, dtype=np.float32).astype(np.float64)
                                  for cid, (c, _, _) in clusters.items() if c is not None}
        for cid, (_, blob, version) in clusters.items():
            self.global_model.set_cluster(cid, unpack_tensors(blob, self.shapes), version)
        if self.store.get("done", False):
            self.done.set()
        traffic = self.store.get("traffic", {})
        self.traffic = {int(r): v for r, v in traffic.items()}
        self.privacy = {int(r): v for r, v in self.store.get("privacy", {}).items()}
        log.info("recovered state: round %d, %d clusters, %d devices", self.current_round(), len(clusters),
                 len(self.clusters.assignment))

    def resume_open_rounds(self) -> None:
        """After a restart: close rounds that were complete, re-invite devices that had not reported."""
        rnd = self.current_round()
        rounds = self.store.rounds()
        if rounds and not self.store.rounds("open") and not self.done.is_set() and rnd:
            if all(state == "closed" for r, _, state, *_ in rounds if r == rnd):
                self.finish_round(rnd)
                return
        for r, cid, *_ in self.store.rounds("open"):
            self._maybe_close(r, cid)
        for r, cid, *_ in self.store.rounds("open"):
            reported = self.store.reported(r, None if self.ifca else cid)
            context = self._round_context(r, cid)
            for device in self.recipients(cid):
                if device not in reported:
                    self._send_round_start(device, r, cid, context=context)

    def _persist_metrics(self) -> None:
        self._metrics_at = time.monotonic()
        try:
            self.store.put("refusals", self.refusals.counts())
            self.store.put("traffic", {str(r): v for r, v in self.traffic.items()})
            self.store.put("privacy", self._merged_privacy())
            self.store.put("online", self.online)
        except StateUnavailable as e:
            log.error("cannot persist metrics: %s", e)

    def _on_device_status(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.STATUS})
        self._check_topic(topic, env.sender)
        rec = self.store.device(env.sender)
        status = DeviceStatus.decode(self.identity.decrypt_from(rec.box_key, env.payload))
        if status.state == "need_full":
            log.info("%s lost its adapter copy; sending full adapters from now on", env.sender)
            self.downlink.forget(env.sender)
            self._resume_device(env.sender)
        else:
            raise RefusedMessage(Refusal.MALFORMED, f"unknown device status {status.state[:40]!r}")

    def _on_generate(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.GENERATE_REQUEST})
        self._check_topic(topic, env.sender)
        body = GenerateRequest.decode(self.identity.open_sealed(env.payload))
        encoding = unpack_tensors(body.encoding, {"encoding": (EMBEDDING_DIM,)})["encoding"]
        try:
            mix = {int(c): float(w) for c, w in body.mix.items()}
        except ValueError:
            raise RefusedMessage(Refusal.MALFORMED, f"mix keys must be cluster ids, got {list(body.mix)[:3]}") from None
        self._count(0, env.sender, "up", len(data))
        request = Request(env.sender, body.request_id, encoding, mix, body.n, body.seed, time.monotonic())
        try:
            self.generation.submit(request)
        except ValueError as e:
            self._reply_generation(request, None, str(e))
            raise RefusedMessage(Refusal.MALFORMED, f"generation request from {env.sender}: {e}") from None

    def _reply_generation(self, request: Request, images: torch.Tensor | None, reason: str) -> None:
        payload = b"" if images is None else pack_tensors({"images": images})
        body = GenerateResult(request.request_id, images is not None, reason, payload)
        self.send(request.device, MessageType.GENERATE_RESULT, body.encode())


@contextlib.contextmanager
def _one_torch_thread():
    """Aggregation is many small SVDs and reductions: OpenMP hand-offs between threads cost more
    than they give (measured 38 SVDs: 0.09-0.4 s on one thread, 0.4-5 s on two on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same_partition(a: list[int], b: list[int]) -> bool:
    pairs = set(zip(a, b))
    return len(pairs) == len(set(a)) == len(set(b))
