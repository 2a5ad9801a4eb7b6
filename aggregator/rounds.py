"""The round engine: an explicit state machine over the state store.

(About 420 lines: each transition reads and writes the same store rows; one file keeps every
transition of the machine in view.)

A global round r moves through four phases, each read from the store (``phase``), never
kept beside it, so a restarted or replacement worker resumes exactly where the last one
stopped::

    OPEN        round rows (r, cluster) written with their deadline, round starts sent
    COLLECTING  accepted updates arrive; each is committed before it is acknowledged
    CLOSING     every cluster of r closed (all recipients reported, or the deadline passed with
                quorum or its extensions used up): the policy may regroup, then the cloud step mixes
    COMMITTED   r + 1's adapters persisted and its rows opened in one transaction (or the
                federation is done), round starts sent

A cluster of r closes on its own (``close_cluster``): its accepted updates are aggregated by
the rule and the new adapter and the closed row commit together, so no update can be
accepted for a closed round. A close always ends: updates the rule fails on are quarantined
and the rest aggregate (``rules/quarantine.py``); a regrouping or an interaction step that fails
opens the next round from the clusters as they are. Deadlines are extended ``max_extensions``
times for stragglers, re-inviting devices that have not reported. Only the leading worker closes
and opens rounds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from aggregator.cloud_step import Adapters, CloudStep
from aggregator.config import AggregatorConfig
from aggregator.downlink import DownlinkMirror
from aggregator.global_model import GlobalModel
from aggregator.interaction import update_spread
from aggregator.membership import Membership
from aggregator.outbox import Outbox
from aggregator.policies import RoundPlan
from aggregator.rank_split import RankShares, make_split
from aggregator.rules import AggregateResult, AggregationRule, ClientUpdate
from aggregator.rules.quarantine import aggregate_or_quarantine
from aggregator.state import StateStore, StateUnavailable
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.messages import ClusterAssign, RoundStart, UpdateAck
from edge_sdk.protocol.tensors import pack_tensors, unpack_tensors
from models.lora import LoraConfig, lora_scale, lora_to_dict
from models.lora_ranks import energy_spectrum, lora_at_rank, shapes_at_rank

log = logging.getLogger("fedaigc.aggregator")
RANKS = "lora_rank/"  # store key prefix: a device's LoRA rank, kept for devices below the fleet's


class Phase(str, Enum):
    OPEN = "open"
    COLLECTING = "collecting"
    CLOSING = "closing"
    COMMITTED = "committed"


@dataclass(frozen=True)
class RoundContext:
    """What every round start of one (round, cluster) shares: read once per batch of devices, not per device."""

    adapter: dict[str, torch.Tensor]
    version: int
    deadline: float
    plan: RoundPlan


@dataclass
class RoundEvents:
    """Hooks for what watches a federation (simulations, evaluators); called on the worker thread."""

    formed: list[Callable[[dict[str, int]], None]] = field(default_factory=list)  # the first grouping
    committed: list[Callable[[int, Adapters], None]] = field(default_factory=list)  # (completed round, adapters)


class RoundController:
    def __init__(self, config: AggregatorConfig, store: StateStore, membership: Membership, rule: AggregationRule,
                 lora: LoraConfig, global_model: GlobalModel, initial: dict[str, torch.Tensor], downlink: DownlinkMirror,
                 outbox: Outbox, cloud: CloudStep, refusals: RefusalCounter, persist: Callable[[], None],
                 is_leader: Callable[[], bool]) -> None:
        self.config, self.store, self.membership, self.rule, self.lora = config, store, membership, rule, lora
        self.policy = membership.policy
        self.global_model, self.initial, self.downlink, self.outbox = global_model, initial, downlink, outbox
        self.cloud, self.refusals, self.persist, self.is_leader = cloud, refusals, persist, is_leader
        self.shapes = {k: tuple(v.shape) for k, v in initial.items()}
        self.shares = RankShares(make_split(config.rank_split), lora,
                                 lambda at: global_model.initial_adapter(config.seed, lora=at), downlink)
        self._ranks: dict[str, int] = {}  # device -> the rank it enrolled with, cached from the store
        self.done = threading.Event()
        self.events = RoundEvents()

    # ---------------------------------------------------------------- reading the state
    def current_round(self) -> int:
        return int(self.store.get("current_round", 0))

    def phase(self, rnd: int) -> Phase:
        rows = [row for row in self.store.rounds() if row.round == rnd]
        if self.current_round() > rnd or (self.done.is_set() and rnd <= self.config.rounds):
            return Phase.COMMITTED
        if rows and all(row.state == "closed" for row in rows):
            return Phase.CLOSING
        return Phase.COLLECTING if self.store.reported(rnd) else Phase.OPEN

    def cluster_adapter(self, cid: int) -> tuple[dict[str, torch.Tensor], int]:
        _, blob, version = self.store.clusters()[cid]
        return unpack_tensors(blob, self.shapes), version

    def context(self, rnd: int, cid: int, plan: RoundPlan | None = None) -> RoundContext:
        adapter, version = self.cluster_adapter(cid)
        deadline = next((row.deadline for row in self.store.rounds() if (row.round, row.cluster_id) == (rnd, cid)),
                        time.time())
        return RoundContext(adapter, version, deadline, plan or self.membership.plan(cid))

    # ---------------------------------------------------------------- devices of lower rank
    def set_rank(self, device: str, rank: int) -> None:
        """Record the LoRA rank a device enrolled with (0: the fleet's); it trains at it from its next round start."""
        rank = rank or self.lora.r
        if rank != self.rank_of(device):
            self.store.put(RANKS + device, rank)
        self._ranks[device] = rank

    def rank_of(self, device: str) -> int:
        """The rank a device trains at: what it enrolled with (read once from the store), else the fleet's."""
        if device not in self._ranks:
            self._ranks[device] = int(self.store.get(RANKS + device, self.lora.r))
        return self._ranks[device]

    def shapes_of(self, device: str) -> dict[str, tuple[int, ...]]:
        """The adapter layout a device trains and sends: the fleet's at the device's rank."""
        rank = self.rank_of(device)
        return self.shapes if rank == self.lora.r else shapes_at_rank(self.shapes, rank)

    def at_rank(self, adapter: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """A cluster adapter as a device of ``rank`` holds it (``RankShares.at_rank``)."""
        return self.shares.at_rank(adapter, rank)

    def rebase(self, device: str, cid: int, start: dict[str, torch.Tensor] | None,
               delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A device's update as a delta against the cluster's current adapter at the fleet's rank.

        ``start`` is what the device trained from (the downlink mirror's copy; None: the cluster's current
        adapter at its rank). A lower-rank device's trained adapter is zero-padded to the fleet's rank,
        which keeps its ΔW exactly, so every rule averages it with the others in ΔW space.
        """
        rank = self.rank_of(device)
        if start is None and rank == self.lora.r:
            return delta
        current, _ = self.cluster_adapter(cid)
        return self.shares.to_fleet(self.at_rank(current, rank) if start is None else start, delta, current)

    def restore(self) -> None:
        """The global model's adapters and the finished flag, from the store."""
        for cid, (_, blob, version) in self.store.clusters().items():
            self.global_model.set_cluster(cid, unpack_tensors(blob, self.shapes), version)
        if self.store.get("done", False):
            self.done.set()

    # ---------------------------------------------------------------- OPEN: round 1, late joiners, round starts
    def start(self) -> None:
        """Group the fleet and open round 1 (the policy decides groups and starting adapters)."""
        assignment = self.membership.form()
        for listener in self.events.formed:
            listener(dict(assignment))
        adapters = self.policy.starting_adapters(
            sorted(set(assignment.values())), self.initial,
            lambda cid: self.global_model.initial_adapter(self.config.seed + cid, b_std=1e-2))
        self.commit(1, adapters, {cid: 0 for cid in adapters})

    def join_late(self, device: str, vector: np.ndarray) -> None:
        cid = self.membership.join(device, vector, pack_tensors(self.initial))
        rnd = self.current_round()
        if rnd and not any((row.round, row.cluster_id) == (rnd, cid) for row in self.store.rounds()):
            self.store.open_round(rnd, cid, time.time() + self.config.round_timeout_s)
            self.global_model.set_cluster(cid, self.initial, 0)
        self.resume_device(device)

    def resume_device(self, device: str) -> None:
        """(Re)send a device what it needs to take part now: its cluster and the open round."""
        cid = self.membership.assignment.get(device)
        if cid is None:
            return
        self.outbox.send(device, MessageType.CLUSTER_ASSIGN, ClusterAssign(cid).encode())
        rnd = self.current_round()
        if self.done.is_set() or self.store.get("done", False):
            self.send_round_start(device, rnd, self.context(rnd, cid), cid, install_only=True)
            return
        if device in self.store.reported(rnd):
            return
        for row in self.store.rounds("open"):
            plan = self.membership.plan(row.cluster_id)
            if row.round == rnd and device in plan.recipients:
                self.send_round_start(device, rnd, self.context(rnd, row.cluster_id, plan), row.cluster_id)

    def send_round_start(self, device: str, rnd: int, context: RoundContext, cid: int,
                         install_only: bool = False) -> None:
        rank = self.rank_of(device)
        adapter = self.at_rank(context.adapter, rank)
        # a device choosing among candidates keeps none of them: deltas against one held adapter do not apply
        if context.plan.candidates > 1:
            payload = self.downlink.full(cid, context.version, adapter)
        else:
            payload = self.downlink.payload(device, cid, context.version, adapter)
        lora = lora_at_rank(self.lora, rank)
        body = RoundStart(rnd, cid, context.version, lora_to_dict(lora), payload.base_cluster, payload.base_version,
                          float(context.deadline), 0 if install_only else self.config.local_steps,
                          1 if install_only else context.plan.candidates, payload.codec, payload.data)
        self.outbox.send(device, MessageType.ROUND_START, body.encode(), rnd)

    # ---------------------------------------------------------------- COMMITTED -> OPEN
    def commit(self, rnd: int, adapters: Adapters, versions: dict[int, int]) -> None:
        """Persist adapters and open round ``rnd`` in one transaction, then tell the devices."""
        deadline = time.time() + self.config.round_timeout_s
        final = rnd > self.config.rounds
        blobs = {cid: (self.membership.centroid_blob(cid), pack_tensors(a), versions[cid]) for cid, a in adapters.items()}
        with self.store.transaction() as cur:
            self.store.save_clusters(blobs, self.membership.assignment, cur=cur)
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
        shown = rnd if not final else self.config.rounds
        for cid in adapters:
            context = self.context(shown, cid)
            for device in (self.membership.members(cid) if final else context.plan.recipients):
                self.send_round_start(device, shown, context, cid, install_only=final)
        for listener in self.events.committed:
            listener(rnd - 1, {cid: {k: v.clone() for k, v in a.items()} for cid, a in adapters.items()})
        self.persist()
        if final:
            log.info("federation finished after %d rounds", self.config.rounds)
            self.done.set()
        else:
            log.info("round %d open for %d clusters", rnd, len(adapters))

    # ---------------------------------------------------------------- COLLECTING -> cluster closed
    def reported(self, rnd: int, cid: int) -> set[str]:
        """Devices whose updates count toward closing (rnd, cid) under the policy."""
        return self.store.reported(rnd, self.policy.report_scope(cid))

    def maybe_close(self, rnd: int, cid: int) -> None:
        """Close (rnd, cid) once every recipient of its plan reported within the policy's report scope;
        a round-wide scope (one update answers every cluster) closes all of the round's clusters together."""
        if not self.is_leader():
            return  # the leading worker's tick sees the round complete
        recipients = self.membership.plan(cid).recipients
        scope = self.policy.report_scope(cid)
        # ids only, counted first: this runs once per accepted update
        if self.store.reported_count(rnd, scope) < len(recipients) or \
                not set(recipients) <= self.store.reported(rnd, scope):
            return
        together = [row.cluster_id for row in self.store.rounds("open") if row.round == rnd]
        for c in [cid] if scope is not None else together:
            self.close_cluster(rnd, c)

    def close_cluster(self, rnd: int, cid: int) -> None:
        current, version = self.cluster_adapter(cid)
        members = self.membership.members(cid)
        with self.store.closing_round(rnd, cid) as closing:
            if closing is None:  # closed already (before a restart, or by another worker)
                return
            cur, records = closing  # no update can be accepted for (rnd, cid) until this commits
            adapter, summary, quarantined = self.aggregate_records(rnd, cid, current, records)
            summary |= {"members": members, "closed_at": time.time(),
                        "spectrum": energy_spectrum(adapter, lora_scale(self.lora))}
            self.store.close_round(rnd, cid, pack_tensors(adapter), version + 1, summary, cur=cur)
        for device, reason in summary["rejected"].items():
            detail = quarantined.get(device, "screened out at aggregation")
            self.refusals.record(RefusedMessage(Refusal(reason), f"{device}'s update in round {rnd}: {detail}"))
        for device in quarantined:  # it was acknowledged as accepted: tell it the update was set aside
            self.outbox.send(device, MessageType.UPDATE_ACK,
                             UpdateAck(rnd, False, Refusal.QUARANTINED.value).encode(), rnd)
        log.info("round %d cluster %d closed: %d/%d updates, loss %.4f", rnd, cid, len(summary["accepted"]),
                 len(members), summary["loss"])
        if self.phase(rnd) is Phase.CLOSING:
            self.finish(rnd)

    def aggregate_records(self, rnd: int, cid: int, current: dict[str, torch.Tensor],
                          records: list) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
        """The cluster's new adapter, the round's summary and the quarantined devices (device -> what failed).

        Never raises on what devices sent: an update that cannot be read or that makes the rule fail is
        quarantined and the others aggregate (``aggregate_or_quarantine``), so a close ends instead of
        rolling back and being retried by every tick.
        """
        quarantined: dict[str, str] = {}
        updates = []
        for r in records:
            try:
                updates.append(ClientUpdate.from_delta(r.device_id, current, unpack_tensors(r.delta, self.shapes),
                                                       r.samples))
            except Exception as e:  # noqa: BLE001 - a stored delta that no longer reads
                quarantined[r.device_id] = f"its stored update does not read: {type(e).__name__}: {e}"[:300]
        failure = None
        if updates:
            with one_torch_thread():
                guarded = aggregate_or_quarantine(self.rule, current, updates, self.lora)
            result, failure = guarded.result, guarded.failure
            quarantined |= guarded.quarantined
        else:
            result = AggregateResult(current, [], {})
        rejected = result.rejected | {d: Refusal.QUARANTINED.value for d in quarantined}
        if failure is not None:
            log.error("round %d cluster %d: aggregation failed and no single update explains it; the cluster keeps "
                      "its adapter and its %d updates are set aside: %s", rnd, cid, len(updates), failure)
        elif quarantined:
            log.error("round %d cluster %d: %d update(s) quarantined, the rest aggregated: %s", rnd, cid,
                      len(quarantined), quarantined)
        weighted = result.samples  # accepted device -> the samples it counted as, after the caps
        samples = sum(weighted.values())
        loss = sum(r.loss * weighted[r.device_id] for r in records if r.device_id in weighted) / max(samples, 1)
        kept = [ClientUpdate(u.device_id, u.adapter, weighted[u.device_id]) for u in updates if u.device_id in weighted]
        try:
            spread = update_spread(kept, self.lora)
        except Exception:  # noqa: BLE001 - a statistic for the interaction step; not knowing it is allowed
            log.exception("round %d cluster %d: the update spread could not be computed", rnd, cid)
            spread = None
        summary = {"accepted": result.accepted, "rejected": rejected, "samples": samples, "loss": loss,
                   "spread": spread}
        if failure is not None:
            summary["failure"] = failure
        return result.adapter, summary, quarantined

    # ---------------------------------------------------------------- CLOSING -> COMMITTED
    def finish(self, rnd: int) -> None:
        """Every cluster of ``rnd`` closed: regroup (policy), interact (cloud step), open the next round."""
        clusters = self.store.clusters()
        adapters = {cid: unpack_tensors(blob, self.shapes) for cid, (_, blob, _) in clusters.items()}
        versions = {cid: v for cid, (_, _, v) in clusters.items()}
        spreads = {cid: summary.get("spread") for r, cid, summary in self.store.round_summaries() if r == rnd}
        try:
            adapters, versions, spreads = self.regroup(rnd, adapters, versions, spreads)
        except StateUnavailable:
            raise
        except Exception:  # a failed regrouping must not leave the round closed and nothing opened
            log.exception("round %d: regrouping failed; the clusters stay as they are", rnd)
        try:
            mixed = self.cloud.begin(rnd, adapters, self.membership.centroid, self.sizes(adapters), spreads, versions)
        except StateUnavailable:
            raise
        except Exception:  # the mix failing must not leave the round closed and nothing opened: go on unmixed
            log.exception("round %d: the interaction step failed; the next round starts from the clusters' own "
                          "adapters", rnd)
            mixed = adapters
        if mixed is not None:  # else the cloud's mix (or its timeout) commits the next round
            self.commit(rnd + 1, mixed, versions)

    def sizes(self, adapters: Adapters) -> dict[int, int]:
        return {cid: len(self.membership.members(cid)) for cid in adapters}

    def regroup(self, rnd: int, adapters, versions, spreads):
        """Ask the policy to regroup on this round's updates; if groups changed, aggregate the updates anew."""
        if not self.policy.regroups_after(rnd):
            return adapters, versions, spreads
        records = {r.device_id: r for r in self.store.updates(rnd)}
        devices, vectors = self.membership.task_matrix()
        if any(d not in records for d in devices):
            return adapters, versions, spreads
        deltas = {d: unpack_tensors(records[d].delta, self.shapes) for d in devices}
        update_vectors = np.stack([torch.cat([t.flatten() for _, t in sorted(deltas[d].items())]).numpy()
                                   for d in devices])
        labels = self.policy.regroup(rnd, vectors, update_vectors, [self.membership.assignment[d] for d in devices])
        if labels is None:
            log.info("after round %d the clusters stay as they are", rnd)
            return adapters, versions, spreads
        assignment = self.membership.regroup(devices, vectors, labels)
        # every cluster started round 1 from the same initial adapter, so updates regroup freely
        new_adapters, new_versions, new_spreads = {}, {}, {}
        for cid in sorted(set(assignment.values())):
            group = [ClientUpdate.from_delta(d, self.initial, deltas[d], records[d].samples)
                     for d in devices if assignment[d] == cid]
            guarded = aggregate_or_quarantine(self.rule, self.initial, group, self.lora)
            if guarded.quarantined:
                log.error("regrouping after round %d: cluster %d aggregates without %s", rnd, cid, guarded.quarantined)
            result = guarded.result
            new_adapters[cid] = result.adapter
            new_versions[cid] = max(versions.values()) if versions else 1
            new_spreads[cid] = update_spread([ClientUpdate(u.device_id, u.adapter, result.samples[u.device_id])
                                              for u in group if u.device_id in result.samples], self.lora)
        return new_adapters, new_versions, new_spreads

    def cloud_mix_arrived(self, rnd: int, adapters: Adapters) -> None:
        mixed, versions = self.cloud.arrived(rnd, adapters)
        self.commit(rnd + 1, mixed, versions)

    # ---------------------------------------------------------------- time: deadlines, a silent cloud
    def check_cloud(self) -> None:
        """A cloud that did not answer in time: interact locally and go on."""
        waiting = self.cloud.awaiting
        if waiting is None:
            return
        try:
            expired = self.cloud.expired(self.membership.centroid, self.sizes(waiting.adapters))
        except StateUnavailable:
            raise
        except Exception:  # as in ``finish``: go on unmixed rather than never
            log.exception("round %d: the local interaction step failed; the next round starts from the clusters' "
                          "own adapters", waiting.round)
            self.cloud.awaiting = None
            expired = (waiting.round, waiting.adapters, waiting.versions)
        if expired is not None:
            rnd, mixed, versions = expired
            self.commit(rnd + 1, mixed, versions)

    def check_deadlines(self) -> None:
        """Close what is complete or past its deadline with quorum; extend the rest and re-invite."""
        now = time.time()
        for row in self.store.rounds("open"):
            rnd, cid = row.round, row.cluster_id
            if now < row.deadline:
                self.maybe_close(rnd, cid)  # complete through updates other workers accepted
                continue
            plan = self.membership.plan(cid)
            reported = self.reported(rnd, cid)
            needed = max(1, math.ceil(self.config.quorum * len(plan.recipients)))
            extensions = int(self.store.get(f"extensions/{rnd}/{cid}", 0))
            if len(reported) >= needed or extensions >= self.config.max_extensions:
                log.info("round %d cluster %d deadline: closing with %d/%d updates", rnd, cid, len(reported),
                         len(plan.recipients))
                self.close_cluster(rnd, cid)
            else:
                self.store.put(f"extensions/{rnd}/{cid}", extensions + 1)
                self.store.extend_round(rnd, cid, now + self.config.round_timeout_s)
                context = self.context(rnd, cid, plan)
                for device in plan.recipients:
                    if device not in reported:  # maybe it missed the round start
                        self.send_round_start(device, rnd, context, cid)

    def resume(self) -> None:
        """After a restart: close rounds that were complete, re-invite devices that had not reported."""
        rnd = self.current_round()
        rounds = self.store.rounds()
        if rounds and rnd and not self.done.is_set() and self.phase(rnd) is Phase.CLOSING:
            self.finish(rnd)
            return
        for row in self.store.rounds("open"):
            self.maybe_close(row.round, row.cluster_id)
        for row in self.store.rounds("open"):
            reported = self.reported(row.round, row.cluster_id)
            context = self.context(row.round, row.cluster_id)
            for device in context.plan.recipients:
                if device not in reported:
                    self.send_round_start(device, row.round, context, row.cluster_id)


@contextlib.contextmanager
def one_torch_thread():
    """Aggregation is many small SVDs and reductions, where OpenMP hand-offs between threads cost
    more than they give; one thread for the duration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
