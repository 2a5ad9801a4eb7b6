"""A device's side of a fleet rollout: install signed export versions atomically, roll back on a failed check.

A rollout travels as retained, aggregator-signed manifests (one per target) and artifact
parts on the ``rollout/`` topics (``edge_sdk.protocol.topics.LAYOUT``; their format is
``edge_sdk.protocol.rollout``, the publisher ``aggregator/rollout.py``); the device answers
with a signed report.

Retained messages may be days old, so the envelope clock window does not apply to them: a
manifest is checked the way the aggregator's key announcement is (signature by the key
this device trusts), and a replayed manifest cannot move a device backwards: a device
ignores versions at or below the one it runs and versions that already failed here.
Every file is checked against the sha256 the signed manifest gives for it, so a
tampered part (or a broker serving another file) is refused before anything is
installed; files the device already holds (the program and base weights when only the
adapter changed) are copied locally instead of fetched.

On disk, under ``{data_dir}/exports/``::

    v{N}/             one directory per version: the current one and the previous one are kept
    current           {"version": N, "previous": M}, written atomically (edge_sdk.protocol.files); while N is
                      being checked it also says "checking", so a crash mid-check rolls back at start
    failed.json       {version: reason} of versions whose check failed here (never retried)
    .staging-v{N}/    files of a version being fetched

A new version is fetched into staging, verified, renamed to ``v{N}``, and made current by
rewriting ``current``; then it must pass the load check (the real ExecuTorch runtime loads
the program with its data) and the app's health check, else ``current`` goes back to the
previous version. Either way the device reports what it runs now.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_sdk.protocol.chunking import Reassembler, is_chunk
from edge_sdk.protocol.digest import file_digest
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.files import atomic_write_bytes
from edge_sdk.protocol.identity import Identity, PublicIdentity
from edge_sdk.protocol.messages import RolloutManifest, RolloutReport
from edge_sdk.protocol.rollout import read_manifest, read_signed
from edge_sdk.transport import MqttTransport

log = logging.getLogger("fedaigc.rollout")

Check = Callable[[Path], None]
"""Raises (with the reason a person needs) when the export in that directory must not be used."""


def check_export(export_dir: Path, base_sha256: str | None = None) -> None:
    """The default load check: every file matches the export manifest, the export was made from this
    device's base model (when given), and an ExecuTorch program really loads with its data."""
    from edge_sdk.artifacts.manifest import Manifest, ManifestError

    manifest = Manifest.load(export_dir)
    for name in manifest.files:
        manifest.verify_file(export_dir, name)
    if base_sha256 is not None and manifest.base_sha256 != base_sha256:
        raise ManifestError(f"exported from base model {manifest.base_sha256[:12]}…, this device runs "
                            f"{base_sha256[:12]}…")
    if manifest.format == "executorch":
        from edge_sdk.artifacts.inference import ExecuTorchDenoiser

        ExecuTorchDenoiser(export_dir).close()


# ---------------------------------------------------------------- one file being fetched
class _Fetch:
    """Collects the retained parts of one file and keeps the file only if it has the signed sha256."""

    def __init__(self, name: str, sha256: str, size: int, dest: Path, aggregator_id: str, verify_key: bytes) -> None:
        self.name, self.sha256, self.size, self.dest = name, sha256, size, dest
        self.aggregator_id, self.verify_key = aggregator_id, verify_key
        self.reassembler = Reassembler(max_message_bytes=max(1, size))
        self.done = threading.Event()
        self.blob: bytes | None = None  # the verified file; the agent's thread writes it, not paho's
        self.error: RefusedMessage | None = None

    def on_part(self, topic: str, data: bytes) -> None:
        """Runs on paho's thread; a refusal raised here is counted by the transport."""
        if not data or self.done.is_set():
            return
        env = read_signed(data, MessageType.ROLLOUT_ARTIFACT, self.aggregator_id, self.verify_key)
        blob = self.reassembler.feed(self.sha256, env.payload) if is_chunk(env.payload) else env.payload
        if blob is None:
            return
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.sha256 or len(blob) != self.size:
            self.error = RefusedMessage(Refusal.TAMPERED, f"{self.name} is not the file the signed manifest names "
                                                          f"(sha256 {digest[:12]}… != {self.sha256[:12]}…)")
        else:
            self.blob = blob
        self.done.set()


# ---------------------------------------------------------------- the device agent
class RolloutAgent:
    """Follows the retained rollout manifest for one device; installs, checks, rolls back, reports.

    ``aggregator`` returns the trusted aggregator ``(id, public keys)`` or None while unknown;
    ``cluster`` this device's cluster (None before assignment: only fleet-wide rollouts apply).
    Installs run on the agent's own thread, never on paho's network thread.
    """

    def __init__(self, transport: MqttTransport, identity: Identity, writer: EnvelopeWriter, data_dir: str | Path, *,
                 aggregator: Callable[[], tuple[str, PublicIdentity] | None],
                 cluster: Callable[[], int | None] = lambda: None,
                 load_check: Check = check_export, health_check: Check | None = None,
                 on_installed: Callable[[int, Path], None] | None = None,
                 refusals: RefusalCounter | None = None, fetch_timeout_s: float = 120.0) -> None:
        self.transport, self.identity, self.writer = transport, identity, writer
        self.topics = transport.topics
        self.root = Path(data_dir) / "exports"
        self.root.mkdir(parents=True, exist_ok=True)
        self.aggregator, self.cluster = aggregator, cluster
        self.load_check, self.health_check, self.on_installed = load_check, health_check, on_installed
        self.refusals = refusals or transport.refusals
        self.fetch_timeout_s = fetch_timeout_s
        self.reports: list[RolloutReport] = []  # what this device reported, in order
        self._pending: dict[str, bytes] = {}  # manifests that arrived before the aggregator's keys, by topic
        self._work: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"rollout-{writer.sender}", daemon=True)

    @property
    def device_id(self) -> str:
        return self.writer.sender

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "RolloutAgent":
        """Subscribe before the transport connects, so the retained manifest finds its handler."""
        self._recover()
        self._thread.start()
        self.transport.subscribe(self.topics.rollout_manifests, self._on_manifest)
        return self

    def stop(self) -> None:
        self._work.put(None)
        self._thread.join(30)

    def retry_pending(self) -> None:
        """The aggregator's keys just became known: judge the manifest that came before them."""
        pending, self._pending = self._pending, {}
        for topic, data in pending.items():
            self._on_manifest(topic, data)

    # ------------------------------------------------------------ state on disk
    def pointer(self) -> dict:
        path = self.root / "current"
        return json.loads(path.read_text()) if path.exists() else {"version": 0, "previous": 0}

    @property
    def installed(self) -> int:
        return int(self.pointer()["version"])

    def current_dir(self) -> Path | None:
        version = self.installed
        return self.root / f"v{version}" if version else None

    def failed(self) -> dict[str, str]:
        path = self.root / "failed.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _point(self, version: int, previous: int, checking: bool = False) -> None:
        pointer = {"version": version, "previous": previous} | ({"checking": True} if checking else {})
        atomic_write_bytes(self.root / "current", json.dumps(pointer).encode())

    def _recover(self) -> None:
        """A version whose check never finished (the device stopped, or the check crashed the process)
        counts as failed: back to the previous version, never retried."""
        pointer = self.pointer()
        if pointer.get("checking"):
            version, previous = int(pointer["version"]), int(pointer["previous"])
            self._point(previous, 0)
            shutil.rmtree(self.root / f"v{version}", ignore_errors=True)
            self._remember_failure(version, f"version {version} was still being checked when the device stopped; "
                                            f"rolled back to {previous}")
            log.warning("%s: version %d never finished its check; rolled back to %d", self.device_id, version, previous)

    def _remember_failure(self, version: int, reason: str) -> None:
        failed = self.failed() | {str(version): reason}
        atomic_write_bytes(self.root / "failed.json", json.dumps(failed).encode())

    # ------------------------------------------------------------ manifest (paho thread)
    def _on_manifest(self, topic: str, data: bytes) -> None:
        if not data:  # a cleared retained manifest
            return
        trusted = self.aggregator()
        if trusted is None:
            self._pending[topic] = data
            return
        aggregator_id, keys = trusted
        self._work.put(read_manifest(data, aggregator_id, keys.verify_key))

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            manifest = self._work.get()
            if manifest is None:
                return
            try:
                self._consider(manifest)
            except RefusedMessage as e:
                self.refusals.record(e, "rollout")
            except Exception:
                log.exception("%s: rollout of version %d failed", self.device_id, manifest.version)

    def _targeted(self, m: RolloutManifest) -> bool:
        if m.clusters and self.cluster() not in m.clusters:
            return False
        return m.stage == "all" or self.device_id in m.canary

    def _consider(self, m: RolloutManifest) -> None:
        if not self._targeted(m):
            return
        installed = self.installed
        failed = self.failed()
        if m.version == installed:  # seen again (reconnect, next stage): say so, the aggregator may have missed it
            self._report(m.version, True, "")
        elif str(m.version) in failed:
            self._report(m.version, False, failed[str(m.version)])
        elif m.version > installed:
            self._install(m)

    def _install(self, m: RolloutManifest) -> None:
        before = self.pointer()
        previous = int(before["version"])
        log.info("%s: installing export version %d (running %d)", self.device_id, m.version, previous)
        staging = self.root / f".staging-v{m.version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._fetch(m, staging)
        except RefusedMessage as e:  # tampered, forged or missing files: nothing was installed
            self.refusals.record(e, f"rollout v{m.version}")
            shutil.rmtree(staging, ignore_errors=True)
            self._report(m.version, False, str(e))
            return
        target = self.root / f"v{m.version}"
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        self._point(m.version, previous, checking=True)  # the swap: one atomic rename of the pointer file
        try:
            self.load_check(target)
            if self.health_check is not None:
                self.health_check(target)
        except Exception as e:
            reason = f"version {m.version} failed its check, rolled back to {previous}: {type(e).__name__}: {e}"
            log.warning("%s: %s", self.device_id, reason)
            self._point(previous, int(before["previous"]))
            shutil.rmtree(target, ignore_errors=True)
            self._remember_failure(m.version, reason)
            self._report(m.version, False, reason)
            return
        self._point(m.version, previous)
        self._prune(keep={m.version, previous})
        if self.on_installed is not None:
            self.on_installed(m.version, target)
        self._report(m.version, True, "")

    def _fetch(self, m: RolloutManifest, staging: Path) -> None:
        """Every file into ``staging``: copied from a version on disk when the hash matches, else fetched."""
        aggregator_id, keys = self.aggregator()
        held = self._held_files()
        fetches = []
        for name, sha in sorted(m.files.items()):
            dest = staging / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if sha in held:
                shutil.copyfile(held[sha], dest)
            else:
                fetches.append(_Fetch(name, sha, m.sizes[name], dest, aggregator_id, keys.verify_key))
        for f in fetches:
            self.transport.subscribe(self.topics.rollout_artifact_parts(f.sha256), f.on_part)
        deadline = time.monotonic() + self.fetch_timeout_s
        try:
            for f in fetches:
                if not f.done.wait(max(0.0, deadline - time.monotonic())):
                    raise RefusedMessage(Refusal.UNAVAILABLE,
                                         f"{f.name} did not arrive within {self.fetch_timeout_s:.0f} s")
                if f.error is not None:
                    raise f.error
                atomic_write_bytes(f.dest, f.blob)
        finally:
            for f in fetches:
                self.transport.unsubscribe(self.topics.rollout_artifact_parts(f.sha256))
        for name, sha in m.files.items():  # copies included: nothing unverified gets installed
            if file_digest(staging / name) != sha:
                raise RefusedMessage(Refusal.TAMPERED, f"{name} does not match the signed manifest")

    def _held_files(self) -> dict[str, Path]:
        """sha256 -> a file of an installed version, so unchanged files are not fetched again."""
        held = {}
        pointer = self.pointer()
        for version in {pointer["version"], pointer["previous"]} - {0}:
            d = self.root / f"v{version}"
            for p in d.rglob("*") if d.exists() else ():
                if p.is_file():
                    held[file_digest(p)] = p
        return held

    def _prune(self, keep: set[int]) -> None:
        """Versions other than ``keep``, and staging left by an interrupted fetch."""
        for d in [*self.root.glob("v*"), *self.root.glob(".staging-v*")]:
            if d.is_dir() and d.name.rsplit("v", 1)[1].isdigit() and int(d.name.rsplit("v", 1)[1]) not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------ report
    def _report(self, version: int, ok: bool, reason: str) -> None:
        trusted = self.aggregator()
        report = RolloutReport(version, self.installed, ok, reason[:500])
        self.reports.append(report)
        sealed = self.identity.encrypt_to(trusted[1].box_key, report.encode())
        self.transport.publish(self.topics.rollout_report(self.device_id), self.writer.build(MessageType.STATUS, sealed))

