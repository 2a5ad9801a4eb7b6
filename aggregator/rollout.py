"""Fleet rollout of an export directory: ``fedaigc rollout --artifact DIR --to cluster:ID|all [--canary 10%]``.

The command signs with the aggregator's own identity (``{state_dir}/aggregator.key``, the
key devices already trust from its retained announcement) and reads the device registry
and cluster assignment from the aggregator's state store. It

1. hashes every file of the export (``model.pte``, ``base.ptd``, ``adapter.ptd`` and the
   export's ``manifest.json``, checked against it first) and publishes each file
   *retained*, by content hash, in signed parts of one MQTT frame each
   (``edge_sdk.protocol.rollout.artifact_parts``): a device that is offline now, or enrols next
   month, still finds them; a file every version shares is published once;
2. publishes the versioned ``RolloutManifest`` retained on the target's manifest topic,
   first for the **canary** devices only: the ``ceil(fraction * n)`` targeted devices
   whose sha256(device id) sorts first, the same devices every time;
3. waits for the canaries' reports: any failure (refused file, failed load or health
   check, rolled back) **halts** the rollout — the target's previous manifest is
   published again and the new version's files are withdrawn; all healthy, or the
   canary timeout without a failure, opens the version to every targeted device;
4. withdraws the retained files and manifests no live version needs any more.

While it runs, a part or manifest someone else alters or clears on the broker is published
again (``aggregator.retained``), counted as ``retained_altered`` and in the summary's ``restored``.

Reports (``rollout/report/{device}``) are signed by the device and Box-encrypted to the
aggregator; ``read_report`` opens them for both this command and the daemon, which
records every device's installed version for ``fedaigc status``.

State (key ``rollout`` of the store): the next version number, the live manifest per
target and the last attempt with its outcome; each device's latest report under
``rollout_report/{device}``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator.enrolment import verify_key_of
from aggregator.retained import RetainedGuard
from aggregator.state import StateStore
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import RolloutManifest, RolloutReport
from edge_sdk.protocol.rollout import artifact_parts
from edge_sdk.transport import MqttTransport

log = logging.getLogger("fedaigc.rollout")

ALL = "all"
REPORTS = "rollout_report/"  # state key prefix of each device's latest report


@dataclass(frozen=True)
class RolloutPlan:
    artifact: Path
    target: str                  # "all" or "cluster-{id}" (also the manifest topic's last level)
    clusters: tuple[int, ...]    # () for "all"
    canary: float                # fraction of the targeted devices that get the version first (0: none)
    canary_timeout_s: float = 600.0
    wait_s: float = 0.0          # after opening to all: wait this long for every targeted device's report


def parse_target(text: str) -> tuple[str, tuple[int, ...]]:
    """``all`` or ``cluster:ID`` -> (target name, clusters)."""
    if text == ALL:
        return ALL, ()
    kind, sep, ident = text.partition(":")
    if kind != "cluster" or not sep or not ident.isdigit():
        raise ValueError(f"--to takes all or cluster:ID, got {text!r}")
    return f"cluster-{int(ident)}", (int(ident),)


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--canary must be between 0% and 100%, got {text!r}")
    return value


def canary_devices(devices: list[str], fraction: float) -> list[str]:
    """The first ``ceil(fraction * n)`` devices by sha256 of their id: deterministic, and spread over
    whatever naming scheme the fleet uses."""
    ranked = sorted(devices, key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    return ranked[:math.ceil(fraction * len(ranked))] if fraction > 0 else []


def export_files(export_dir: Path) -> dict[str, bytes]:
    """Every file of an export directory by relative path, after checking them against its manifest
    (a corrupt export is refused here, not on a thousand devices)."""
    from edge_sdk.artifacts.manifest import Manifest

    manifest = Manifest.load(export_dir)
    for name in manifest.files:
        manifest.verify_file(export_dir, name)
    return {p.relative_to(export_dir).as_posix(): p.read_bytes() for p in sorted(export_dir.rglob("*")) if p.is_file()}


def read_report(verifier: EnvelopeVerifier, identity: Identity, store: StateStore, topic: str,
                data: bytes) -> tuple[str, RolloutReport]:
    """(device, report) from a signed, encrypted report of an enrolled device; refused otherwise."""
    env = verifier.open(data, {MessageType.STATUS}, topic)
    rec = store.device(env.sender)
    return env.sender, RolloutReport.decode(identity.decrypt_from(rec.box_key, env.payload))


def record_report(store: StateStore, device: str, report: RolloutReport) -> None:
    """The device's latest report, for ``fedaigc status`` (one row per device: ``REPORTS`` + id)."""
    store.put(REPORTS + device, {"version": report.version, "installed": report.installed, "ok": report.ok,
                                 "reason": report.reason, "at": time.time()})


def manifest_of(record: dict, stage: str) -> RolloutManifest:
    files = record["files"]
    return RolloutManifest(record["version"], stage, list(record["clusters"]), list(record["canary"]),
                           {n: f["sha256"] for n, f in files.items()}, {n: f["bytes"] for n, f in files.items()},
                           {n: f["parts"] for n, f in files.items()}, record["created"])


class Rollout:
    """One run of ``fedaigc rollout`` over a connected transport."""

    def __init__(self, transport: MqttTransport, identity: Identity, aggregator_id: str, store: StateStore) -> None:
        self.transport, self.identity, self.store = transport, identity, store
        self.topics = transport.topics
        self.writer = EnvelopeWriter(identity, aggregator_id)
        self.verifier = EnvelopeVerifier(lambda sender: verify_key_of(store, sender))
        self.retained = RetainedGuard(transport, transport.refusals)  # parts and manifests, while the run lasts
        self._reports: dict[str, RolloutReport] = {}
        self._cond = threading.Condition()
        self._version = 0

    # ------------------------------------------------------------ reports
    def _on_report(self, topic: str, data: bytes) -> None:
        device, report = read_report(self.verifier, self.identity, self.store, topic, data)
        with self._cond:
            if report.version == self._version:
                self._reports[device] = report
                self._cond.notify_all()

    def _wait(self, devices: list[str], timeout: float, stop_on_failure: bool) -> dict[str, RolloutReport]:
        """Reports of ``devices`` for this version once all are in, a failure is (if asked), or at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {d: self._reports[d] for d in devices if d in self._reports}
                if len(got) == len(devices) or (stop_on_failure and any(not r.ok for r in got.values())):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return got
                self._cond.wait(min(left, 0.2))

    # ------------------------------------------------------------ publishing
    def _publish_files(self, files: dict[str, bytes]) -> dict[str, dict]:
        infos, record = [], {}
        for name, blob in files.items():
            sha = hashlib.sha256(blob).hexdigest()
            parts = artifact_parts(blob, self.writer, self.transport.max_frame())
            for i, part in enumerate(parts):
                infos += self.retained.publish(self.topics.rollout_artifact_part(sha, i), part,
                                               watch=self.topics.rollout_artifact_parts(sha))
            record[name] = {"sha256": sha, "bytes": len(blob), "parts": len(parts)}
        if not self.transport.wait_published(infos, timeout=120):
            raise RuntimeError("the broker did not acknowledge every artifact part within 120 s")
        return record

    def _publish_manifest(self, target: str, manifest: RolloutManifest) -> None:
        env = self.writer.build(MessageType.ROLLOUT_MANIFEST, manifest.encode(), round=manifest.version)
        self.transport.wait_published(self.retained.publish(self.topics.rollout_manifest(target), env))

    def _clear(self, topic: str) -> list:
        """Withdraw a retained message on purpose: no longer kept by the guard."""
        self.retained.release(topic)
        return self.transport.publish(topic, b"", retain=True)

    def _withdraw(self, records: list[dict], keep: list[dict]) -> None:
        """Clear the retained parts of files only ``records`` use (``keep`` still needs its own)."""
        live = {f["sha256"] for r in keep for f in r["files"].values()}
        infos = []
        for r in records:
            for f in r["files"].values():
                if f["sha256"] not in live:
                    for i in range(f["parts"]):
                        infos += self._clear(self.topics.rollout_artifact_part(f["sha256"], i))
        self.transport.wait_published(infos)

    # ------------------------------------------------------------ the run
    def run(self, plan: RolloutPlan) -> dict:
        state = self.store.get("rollout", {"next_version": 1, "live": {}, "last": None})
        assignment = self.store.assignment()
        targeted = [d.device_id for d in self.store.devices()
                    if not d.revoked and (not plan.clusters or assignment.get(d.device_id) in plan.clusters)]
        canary = canary_devices(targeted, plan.canary)
        version = int(state["next_version"])
        with self._cond:
            self._version = version
        self.transport.subscribe(self.topics.rollout_report_all, self._on_report)
        record = {"version": version, "target": plan.target, "clusters": list(plan.clusters), "canary": canary,
                  "created": time.time(), "files": self._publish_files(export_files(plan.artifact))}
        state["next_version"] = version + 1
        summary = {"version": version, "target": plan.target, "devices": len(targeted), "canary": canary}

        if canary:
            self._save(state, record, "canary")
            self._publish_manifest(plan.target, manifest_of(record, "canary"))
            log.info("version %d to %d canary device(s) of %s", version, len(canary), plan.target)
            reports = self._wait(canary, plan.canary_timeout_s, stop_on_failure=True)
            failed = {d: r.reason for d, r in reports.items() if not r.ok}
            summary["canary_reports"] = {d: ("ok" if r.ok else r.reason) for d, r in reports.items()}
            if failed:
                return self._halt(state, record, plan.target, failed, summary)
            if len(reports) < len(canary):
                log.warning("canary timeout: %d of %d canaries reported healthy, none failed; opening to all",
                            len(reports), len(canary))
        self._publish_manifest(plan.target, manifest_of(record, "all"))
        # an "all" rollout supersedes every cluster's version; a cluster's only that cluster's previous one
        superseded = {t: r for t, r in state["live"].items() if plan.target in (ALL, t)}
        state["live"] = {t: r for t, r in state["live"].items() if t not in superseded} | {plan.target: record}
        for t in superseded.keys() - {plan.target}:
            self.transport.wait_published(self._clear(self.topics.rollout_manifest(t)))
        self._withdraw(list(superseded.values()), keep=list(state["live"].values()))
        self._save(state, record, "all")
        if plan.wait_s > 0:
            reports = self._wait(targeted, plan.wait_s, stop_on_failure=False)
            summary["reports"] = {d: ("ok" if r.ok else r.reason) for d, r in reports.items()}
        summary["stage"] = "all"
        return summary | {"restored": self.retained.restored}

    def _halt(self, state: dict, record: dict, target: str, failed: dict[str, str], summary: dict) -> dict:
        reason = "; ".join(f"{d}: {why}" for d, why in sorted(failed.items()))
        log.error("version %d halted at the canary stage: %s", record["version"], reason)
        previous = state["live"].get(target)
        if previous is not None:  # the target's devices (offline ones included) stay on the previous version
            self._publish_manifest(target, manifest_of(previous, "all"))
        else:
            self.transport.wait_published(self._clear(self.topics.rollout_manifest(target)))
        self._withdraw([record], keep=list(state["live"].values()))
        self._save(state, record, "halted", reason)
        return summary | {"stage": "halted", "halted": reason, "restored": self.retained.restored}

    def _save(self, state: dict, record: dict, stage: str, outcome: str = "") -> None:
        state["last"] = record | {"stage": stage, "outcome": outcome}
        self.store.put("rollout", state)
