"""Load: N model-free devices deliver one round of updates to the aggregator daemon over the real broker.

    python -m benchmarks.load [--quick | --smoke] [--sizes 100,500,2000] [--codec int8] [--out DIR]
                              [--mqtt-url URL] [--max-queued-messages N] [--no-retry]

For each N the aggregator runs as its own process (``python -m aggregator.cli aggregator``,
SQLite state, one cluster, quorum 1.0) so its RSS and CPU are measured alone. N
``LiteDevice`` s with real Ed25519/X25519 keys, each with its own MQTT connection, spread
over a few device processes, enrol, send a task vector and wait for their round start.
Then every device publishes one boxed, signed update encoded with ``--codec`` (int8 by
default) as fast as the broker takes them.

Measured per N: ``seconds_to_aggregate`` (first update published -> round closed, i.e.
every update committed and the aggregate written), ``accepted`` (rows in the state store),
``lost`` (published with a PUBACK but not accepted; must be 0), ``updates_per_s``,
``p95_ms`` (publish -> commit of the update row, same machine clock), aggregator
``rss_mb`` (peak) and CPU, refusals. ``--smoke`` runs N = 4. Writes benchmarks/results/load.json
and load.png.

Devices behave like ``edge_sdk.session``: an update not acknowledged is re-sent on the product's
jittered exponential backoff (``edge_sdk.retry``, default policy; ``--no-retry`` turns it off),
counted as ``early_retries``; a device re-invited at the round deadline (``--round-timeout``,
counted from the round's opening) re-sends as well, counted (devices) as ``resent_after_reinvite``.
Both are how an update the broker dropped still arrives (Mosquitto drops QoS-1 messages beyond
``max_queued_messages`` queued for a subscriber that falls behind); ``lost`` counts updates never
accepted at all.

The broker: by default the benchmark starts its own Mosquitto on a free port with the delivery
limits ``fedaigc broker-config`` ships (``aggregator.broker_limits``, queues sized for the largest
N; ``--max-queued-messages`` overrides, e.g. 1000, Mosquitto's default, to see what it drops) and
reads that broker's log: ``broker_drop_notices`` is the number of "Outgoing messages are being
dropped" lines of the run (one per episode per client, not per message). With ``--mqtt-url``
the broker is someone else's: ``broker_drop_notices`` is null (its log is not ours to read),
devices pin the keys of the aggregator started here (read from its key file) rather than
trusting the retained keys topic, refusals may include other people's traffic, and the
persistent MQTT sessions of the run are discarded at the end (so the broker keeps no queue for
them). The load average is recorded either way.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from tqdm import tqdm  # noqa: E402

from aggregator.broker_limits import BrokerLimits, drop_notices, local_broker_conf  # noqa: E402
from aggregator.global_model import adapter_shapes  # noqa: E402
from aggregator.simulation.lite import DEMO_TOKEN  # noqa: E402
from benchmarks._results import ROOT, Output, add_arguments  # noqa: E402
from edge_sdk.retry import RetryPolicy  # noqa: E402
from edge_sdk.transport import discard_session  # noqa: E402

DEVICES_PER_PROCESS = 300  # paho select()s its sockets: ~340 clients fill FD_SETSIZE (3 fds each)


# ---------------------------------------------------------------------------------------- devices
def fleet_model() -> str:
    """The digest of the base model the daemons run (the default one): what a pinned device enrols with, as it
    reads no key announcement."""
    from aggregator.config import AggregatorConfig
    from edge_sdk.artifacts.manifest import model_digest, part_digests
    from models.backend import load_backend

    return model_digest(part_digests(load_backend(AggregatorConfig().base_model)))


def _device_process(conn, mqtt_url: str, ids: list[str], verify_key: bytes, box_key: bytes, aggregator_id: str,
                    codec: str, seed: int, model: str, retry: RetryPolicy) -> None:
    """Runs in a child process: drives ``ids`` through enrolment, then one update each on command."""
    import random

    import torch

    from aggregator.simulation.lite import LiteDevice, start_adapter
    from edge_sdk.protocol.envelope import EnvelopeVerifier, MessageType
    from edge_sdk.protocol.identity import PublicIdentity
    from edge_sdk.protocol.messages import RoundStart, UpdateAck
    from edge_sdk.retry import Resender
    from models.lora import lora_from_dict

    keys = PublicIdentity(verify_key, box_key)
    resender = Resender(retry)  # one timer thread for the process's devices, as edge_sdk.session has one each

    class PinnedDevice(LiteDevice):
        """Trusts exactly the aggregator started by this benchmark; records when its ack arrives."""

        def __init__(self, device_id: str) -> None:
            super().__init__(mqtt_url, device_id, model=model)
            self.aggregator, self.aggregator_id = keys, aggregator_id
            self.verifier = EnvelopeVerifier(lambda sender: keys.verify_key)
            self.acked_at: float | None = None
            self.ack_ok = False
            self.answer: bytes | None = None  # the sealed update (each send a fresh envelope)
            self.resent = 0
            self.started_at: float | None = None
            self.sizes: dict[str, int] = {}  # bytes of the first envelope of each type received

        def _on_keys(self, topic, data):  # the shared broker's retained keys may be someone else's
            pass

        def _on_down(self, topic, data):
            super()._on_down(topic, data)
            env, body = self.inbox[-1]
            self.sizes.setdefault(env.type.value, len(data))
            if env.type == MessageType.UPDATE_ACK and self.acked_at is None:
                self.acked_at = time.time()
                self.ack_ok = UpdateAck.decode(body).accepted
            elif env.type == MessageType.ROUND_START and self.started_at is None:
                self.started_at = time.time()
            elif env.type == MessageType.ROUND_START and self.answer is not None and self.acked_at is None:
                # re-invited at the deadline: our update never arrived (like edge_sdk.session, re-send it)
                start = RoundStart.decode(body)
                self.publish_update(start.round, self.answer, resender, start.deadline, self.rng)
                self.resent += 1

    def wait_all(devices, mtype, timeout):
        deadline = time.monotonic() + timeout
        done = 0
        for d in devices:
            d.wait_for(mtype, timeout=max(0.1, deadline - time.monotonic()))
            done += 1
            if done % 100 == 0:
                conn.send(("progress", 100))
        conn.send(("progress", done % 100))

    devices = []
    try:
        for i, device_id in enumerate(ids):
            devices.append(PinnedDevice(device_id).start())
            if (i + 1) % 100 == 0:
                conn.send(("progress", 100))
        conn.send(("progress", len(ids) % 100))
        conn.send(("connected", len(devices)))
        rng = np.random.default_rng(seed)
        base = rng.normal(size=384)
        for d in devices:
            d.enrol()
        wait_all(devices, MessageType.ENROL_ACK, 300)
        for d in devices:
            d.send_task(base + 0.01 * rng.normal(size=384))
        conn.send(("enrolled", len(devices)))
        wait_all(devices, MessageType.ROUND_START, 600)
        starts = [RoundStart.decode(d.wait_for(MessageType.ROUND_START)[0][1]) for d in devices]
        shapes = adapter_shapes(lora_from_dict(starts[0].lora))  # the fleet's LoRA config rides in the round start
        start_adapter(starts[0], shapes)  # the round start carries our adapter (round 1: as its seed)
        envelopes, sealed = [], []
        for i, (d, start) in enumerate(zip(devices, starts)):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            delta = {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}
            sealed.append(d.seal_update(start, delta, codec=codec))
            envelopes.append(d.writer.build(MessageType.UPDATE, sealed[-1], start.round))  # signed before "go"
            d.rng = random.Random(f"{d.id}/{seed}")
        conn.send(("ready", ([len(e) for e in envelopes], max(d.started_at or 0.0 for d in devices))))
        assert conn.recv() == "go"
        published_at, infos = [], []
        for d, start, body, env in zip(devices, starts, sealed, envelopes):
            d.answer = body
            published_at.append(time.time())
            infos.append(d.publish_update(start.round, body, resender, start.deadline, d.rng, envelope=env))
        pubacked = [d.transport.wait_published(i, timeout=120) for d, i in zip(devices, infos)]
        conn.send(("published", len(devices)))
        deadline = time.monotonic() + float(conn.recv())  # how long to wait for acks
        while time.monotonic() < deadline and any(d.acked_at is None for d in devices):
            time.sleep(0.05)
        conn.send(("acks", ([(d.id, published_at[i], pubacked[i], d.acked_at, d.ack_ok, d.resent, d.sizes)
                             for i, d in enumerate(devices)], resender.retries)))
        conn.recv()  # "stop"
    except Exception as e:  # report, do not hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        resender.close()
        for d in devices:
            try:
                d.stop()
                discard_session(mqtt_url, f"fedaigc-{d.id}")
            except Exception:
                pass


# ---------------------------------------------------------------------------------------- aggregator
class _Aggregators:
    """The daemon(s) under test and a reader of their state: one worker on SQLite, or ``workers``
    PostgreSQL workers sharing the uplink through an MQTT v5 shared subscription (one aggregator
    key, one schema of their own, a leader elected by advisory lock)."""

    def __init__(self, tmp: Path, mqtt_url: str, n: int, aggregator_id: str, round_timeout_s: float, workers: int,
                 pg_url: str) -> None:
        from edge_sdk.protocol.identity import Identity

        self.tmp, self.mqtt_url, self.aggregator_id, self.workers = tmp, mqtt_url, aggregator_id, workers
        state_dir = tmp / "state"
        state_dir.mkdir()
        Identity.generate().save(state_dir / "aggregator.key")  # shared by the workers: devices see one aggregator
        self.keys = Identity.load(state_dir / "aggregator.key").public
        base = ("[aggregator]\n"
                f'aggregator_id = "{aggregator_id}"\nmqtt_url = "{mqtt_url}"\nstate_dir = "{state_dir}"\n'
                f"expected_devices = {n}\nenrol_window_s = 3600\nclustering = \"single\"\nrounds = 1\n"
                f"round_timeout_s = {round_timeout_s}\nmax_extensions = 10\nquorum = 1.0\nrefine_after_round = 0\n"
                f'interaction = false\ntokens = ["{DEMO_TOKEN}"]\n')  # the lite devices' fleet token
        self.pg = self.schema = None
        if workers > 1:
            import psycopg

            self.schema = f"load_{aggregator_id.replace('-', '_')}"
            self.admin = psycopg.connect(pg_url, autocommit=True)
            self.admin.execute(f"CREATE SCHEMA {self.schema}")
            url = f"{pg_url}?options=-csearch_path%3D{self.schema}"
            self.pg = psycopg.connect(url, autocommit=True)
            base += f'state_url = "{url}"\nshared_group = "{aggregator_id}"\n'
        self.client_ids, self.procs, self.logs = [], [], []
        for w in range(workers):
            text = base + (f'worker_id = "w{w}"\n' if workers > 1 else "")
            (tmp / f"aggregator{w}.toml").write_text(text)
            log = tmp / f"aggregator{w}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "aggregator.cli", "aggregator", "--config", str(tmp / f"aggregator{w}.toml")],
                cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT))
            self.client_ids.append(f"fedaigc-{aggregator_id}" + (f"-w{w}" if workers > 1 else ""))
        deadline = time.monotonic() + 120
        for proc, log in zip(self.procs, self.logs):
            while b"running" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("aggregator did not start:\n" + log.read_text()[-3000:])
                time.sleep(0.2)

    def rows(self, sql: str) -> list[tuple]:
        if self.pg is not None:
            return self.pg.execute(sql).fetchall()
        with sqlite3.connect(f"file:{self.tmp / 'state' / 'state.db'}?mode=ro", uri=True, timeout=30) as c:
            return c.execute(sql).fetchall()

    def round_state(self) -> tuple[str | None, float | None]:
        rows = self.rows("SELECT state, closed_at FROM rounds WHERE round = 1 AND cluster_id = 0")
        return rows[0] if rows else (None, None)

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)  # the daemons persist their refusal counters on the way out
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for client_id in self.client_ids:
            discard_session(self.mqtt_url, client_id)  # their queues must not outlive the run

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
            self.admin.execute(f"DROP SCHEMA {self.schema} CASCADE")
            self.admin.close()


class _Sampler(threading.Thread):
    """RSS and CPU of the aggregator process(es) every 0.2 s."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(pid) for pid in pids]
        self.rss: list[float] = []  # the largest worker's
        self.stop = threading.Event()
        self.cpu_start = self._cpu()
        self.cpu_end = self.cpu_start

    def _cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss.append(max(p.memory_info().rss for p in self.procs) / 2**20)
                self.cpu_end = self._cpu()
            except psutil.Error:
                return
            time.sleep(0.2)


def run_size(n: int, mqtt_url: str, codec: str, seed: int, timeout: float, round_timeout_s: float,
             aggregator_workers: int = 1, pg_url: str = "", broker_log: Path | None = None,
             retry: RetryPolicy = RetryPolicy(), no_log: str | None = None) -> dict:
    """One round of ``n`` devices. ``broker_log``: the log of the broker this benchmark started (its drop
    notices are counted for the run); None: a broker whose log is not read, for the reason ``no_log``."""
    log_offset = broker_log.stat().st_size if broker_log is not None and broker_log.exists() else 0
    run = uuid.uuid4().hex[:6]
    aggregator_id = f"load-{run}"
    with tempfile.TemporaryDirectory(prefix="fedaigc-load-") as tmp_name:
        tmp = Path(tmp_name)
        daemons = _Aggregators(tmp, mqtt_url, n, aggregator_id, round_timeout_s, aggregator_workers, pg_url)
        keys = daemons.keys
        model = fleet_model()
        ids = [f"ld{run}-{i:05d}" for i in range(n)]
        procs = max(1, math.ceil(n / DEVICES_PER_PROCESS))
        ctx = mp.get_context("spawn")
        workers = []
        try:
            for p in range(procs):
                parent, child = ctx.Pipe()
                w = ctx.Process(target=_device_process, daemon=True,
                                args=(child, mqtt_url, ids[p::procs], keys.verify_key, keys.box_key, aggregator_id,
                                      codec, seed * 1000 + p, model, retry))
                w.start()
                workers.append((w, parent))
        except BaseException:  # the daemons must not outlive a failed start
            daemons.stop()
            daemons.close()
            raise
        result: dict = {"devices": n, "device_processes": procs, "codec": codec,
                        "aggregator_workers": aggregator_workers,
                        "state": "postgresql" if aggregator_workers > 1 else "sqlite"}
        started = time.monotonic()

        def collect(kind: str, bar: tqdm | None = None, limit: float = timeout) -> list:
            out = []
            for _, conn in workers:
                while True:
                    if not conn.poll(max(0.0, limit - (time.monotonic() - started))):
                        raise TimeoutError(f"N={n}: no '{kind}' from a device process within {limit:.0f} s")
                    msg = conn.recv()
                    if msg[0] == "error":
                        raise RuntimeError(f"device process failed: {msg[1]}")
                    if msg[0] == "progress":
                        if bar is not None:
                            bar.update(msg[1])
                        continue
                    if msg[0] != kind:
                        raise RuntimeError(f"expected {kind}, got {msg[0]}")
                    out.append(msg[1])
                    break
            return out

        finished = False
        try:
            with tqdm(total=3 * n, desc=f"N={n} connect+enrol+round start", unit="dev") as bar:
                collect("connected", bar)
                result["connect_s"] = time.monotonic() - started
                collect("enrolled", bar)
                result["enrol_s"] = time.monotonic() - started - result["connect_s"]
                ready = collect("ready", bar)
                sizes = sum((r[0] for r in ready), [])
                last_start = max(r[1] for r in ready)
            result["setup_s"] = time.monotonic() - started
            result["update_envelope_bytes"] = int(np.mean(sizes))
            sampler = _Sampler([p.pid for p in daemons.procs])
            sampler.start()
            load_before = os.getloadavg()[0]
            t0 = time.time()
            for _, conn in workers:
                conn.send("go")
            closed_at = None
            with tqdm(total=n, desc=f"N={n} updates accepted", unit="upd") as bar:
                seen = 0
                while time.time() - t0 < timeout:
                    count = daemons.rows("SELECT COUNT(*) FROM updates WHERE round = 1")[0][0]
                    bar.update(count - seen)
                    seen = count
                    state, closed_at = daemons.round_state()
                    if state == "closed":
                        break
                    time.sleep(0.25)
            sampler.stop.set()
            load_after = os.getloadavg()[0]
            collect("published", limit=time.monotonic() - started + 120)
            for _, conn in workers:
                conn.send(str(30.0 if closed_at else 5.0))
            replies = collect("acks", limit=time.monotonic() - started + 60)
            acks = sum((r[0] for r in replies), [])
            early_retries = sum(r[1] for r in replies)
            for _, conn in workers:
                conn.send("stop")
            finished = True
        finally:
            daemons.stop()
            for w, _ in workers:
                w.join(60)
                if w.is_alive():
                    w.kill()
            if not finished:
                daemons.close()  # drop the PostgreSQL schema of a failed run
        try:
            rows = daemons.rows("SELECT device_id, accepted_at FROM updates WHERE round = 1")
            refusals = daemons.rows("SELECT value FROM kv WHERE key LIKE 'refusals/%'")  # one row per worker
            summary = (daemons.rows("SELECT summary FROM rounds WHERE round = 1") or [None])[0]
            opened_at = daemons.rows("SELECT opened_at FROM rounds WHERE round = 1")[0][0]
        finally:
            daemons.close()
        accepted_at = dict(rows)
        published = {d: (t, ok) for d, t, ok, *_ in acks}
        latencies = [accepted_at[d] - published[d][0] for d in accepted_at if d in published]
        pubacked = [d for d, (_, ok) in published.items() if ok]
        lost = [d for d in pubacked if d not in accepted_at]
        first = min(t for t, _ in published.values())
        last_accept = max(accepted_at.values()) if accepted_at else first
        summary = json.loads(summary[0]) if summary and summary[0] else {}
        result.update({
            "seconds_to_aggregate": (closed_at - first) if closed_at else None,
            "aggregate_ms": (closed_at - last_accept) * 1000 if closed_at else None,
            "round_closed": closed_at is not None,
            "accepted": len(accepted_at),
            "in_aggregate": len(summary.get("accepted", [])),
            "published": len(pubacked),
            "lost": len(lost),
            "acks_received": sum(1 for *_, t, ok, _, _ in acks if t is not None and ok),
            "resent_after_reinvite": sum(1 for *_, resent, _ in acks if resent),
            "early_retries": early_retries,  # re-sends before any re-invitation (edge_sdk.retry), all devices
            "retry_policy": None if retry.max_attempts == 0 else retry.__dict__,
            "round_start_bytes": acks[0][-1].get("round_start"),  # full fp32 adapter, boxed and signed
            "update_ack_bytes": acks[0][-1].get("update_ack"),
            "updates_per_s": len(accepted_at) / max(1e-9, last_accept - first),
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else None,
            "p95_ms": float(np.percentile(latencies, 95) * 1000) if latencies else None,
            "rss_mb": max(sampler.rss) if sampler.rss else None,
            "aggregator_cpu_s": sampler.cpu_end - sampler.cpu_start,  # all workers
            "aggregator_cpu_percent": 100 * (sampler.cpu_end - sampler.cpu_start) / max(1e-9, time.time() - t0),
            "refusals": dict(sum((Counter(json.loads(v)) for v, in refusals), Counter())),
            "bytes_uploaded": int(np.sum(sizes)),
            "round_start_fanout_s": last_start - opened_at,  # round opened -> last device has its round start
            "load_average": [round(load_before, 1), round(load_after, 1)],  # the machine is shared
        })
        if broker_log is not None:
            result["broker_drop_notices"], dropped_for = drop_notices(broker_log, log_offset)
            result["broker_dropped_for"] = sorted(set(dropped_for))
        else:
            result["broker_drop_notices"] = None
            result["broker_drop_notices_reason"] = no_log or "the broker's log is not read"
        return result


def plot(results: dict, out: Output) -> None:
    """One line for the single SQLite worker (keys "100", "500", "2000"), points for PostgreSQL workers."""
    series = {"1 worker (SQLite)": {int(k): v for k, v in results.items() if k.isdigit()}}
    for w, per_n in sorted(results.get("scale_out", {}).items()):
        series[f"{w} workers (PostgreSQL)"] = {int(k): v for k, v in per_n.items()}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    panels = [("seconds_to_aggregate", "s", "publish -> round aggregated"),
              ("updates_per_s", "updates / s", "accepted updates / s"),
              ("p95_ms", "ms", "p95 publish -> accepted"),
              ("rss_mb", "MB", "aggregator peak RSS (largest worker)")]
    for ax, (key, unit, title) in zip(axes, panels):
        for label, per_n in series.items():
            ns = sorted(per_n)
            ax.plot(ns, [per_n[n][key] if per_n[n][key] is not None else np.nan for n in ns], marker="o", label=label)
        ax.set(xscale="log", xlabel="devices", ylabel=unit, title=title)
        ax.grid(alpha=0.3)
    axes[0].axhline(60, color="red", linestyle="--", linewidth=1, label="target at N=2000")
    axes[0].legend(fontsize=7)
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 only")
    parser.add_argument("--sizes", default=None, help="comma-separated device counts (default 100,500,2000)")
    parser.add_argument("--codec", default="int8", help="uplink codec of the updates")
    parser.add_argument("--mqtt-url", default=None,
                        help="use this broker (e.g. mqtt://127.0.0.1:1883); default: start a Mosquitto of our own "
                             "with the shipped delivery limits and count its drop notices")
    parser.add_argument("--max-queued-messages", type=int, default=None,
                        help="our own broker's per-session queue (default: sized for the largest N, as "
                             "`fedaigc broker-config --devices N` does; 1000 is Mosquitto's default)")
    parser.add_argument("--no-retry", action="store_true",
                        help="devices re-send only when re-invited at the deadline (no early re-sends)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per N")
    parser.add_argument("--round-timeout", type=float, default=60.0,
                        help="round deadline: updates the broker dropped are re-sent when devices are re-invited")
    parser.add_argument("--workers", type=int, default=1,
                        help="aggregator workers; > 1 runs them on PostgreSQL with a shared subscription "
                             "(results under \"scale_out\")")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seed", type=int, default=0)
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "load")
    default = "4" if args.smoke else "100" if args.quick else "100,500,2000"
    sizes = [int(s) for s in (args.sizes or default).split(",")]
    from dataclasses import replace

    from aggregator.broker import EmbeddedBroker, ensure_broker, free_port

    retry = RetryPolicy(max_attempts=0) if args.no_retry else RetryPolicy()
    broker_log, no_log = None, None
    if args.mqtt_url is not None and args.max_queued_messages is not None:
        parser.error("--max-queued-messages sets the queue of the broker this benchmark starts; not with --mqtt-url")
    if args.mqtt_url is None and not shutil.which("mosquitto"):
        args.mqtt_url = "mqtt://127.0.0.1:1883"
        no_log = "no mosquitto binary: the benchmark could not start a broker of its own"
        print(f"benchmarks.load: {no_log}; using {args.mqtt_url}", file=sys.stderr)
    if args.mqtt_url is None:  # our own Mosquitto, with what `fedaigc broker-config` ships
        limits = BrokerLimits.for_fleet(max(sizes))
        if args.max_queued_messages is not None:
            limits = replace(limits, max_queued_messages=args.max_queued_messages)
        broker_dir = Path(tempfile.mkdtemp(prefix="fedaigc-load-broker-"))
        (broker_dir / "data").mkdir()  # its persistence_location
        port = free_port()
        (broker_dir / "mosquitto.conf").write_text(local_broker_conf(port, broker_dir, limits))
        broker = EmbeddedBroker("127.0.0.1", port, config=broker_dir / "mosquitto.conf", state_dir=broker_dir).start()
        mqtt_url, broker_log = broker.url, broker_dir / "mosquitto.log"
        broker_meta = {"broker": "own mosquitto, aggregator.broker_limits", "max_queued_messages":
                       limits.max_queued_messages, "max_inflight_messages": limits.max_inflight_messages}
    else:
        mqtt_url = args.mqtt_url
        broker = ensure_broker(mqtt_url)
        broker_meta = {"broker": mqtt_url}
        no_log = no_log or f"the broker at {mqtt_url} is not this benchmark's: its log is not read"
    # a partial run (--sizes, --workers) updates the recorded results instead of replacing them
    previous = out.previous() if args.sizes or args.workers > 1 else None
    results: dict = dict(previous or {})
    target = results.setdefault("scale_out", {}).setdefault(str(args.workers), {}) if args.workers > 1 else results
    try:
        for n in sizes:
            r = run_size(n, mqtt_url, args.codec, args.seed, args.timeout, args.round_timeout,
                         args.workers, args.pg_url, broker_log, retry, no_log)
            r.update(broker_meta)
            target[str(n)] = r
            print(json.dumps({str(n): {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}}),
                  flush=True)
    finally:
        if broker is not None:
            broker.close()
        if broker_log is not None:
            shutil.rmtree(broker_log.parent, ignore_errors=True)
    results["meta"] = {"cpus": os.cpu_count(), "mqtt_url": mqtt_url, "python": sys.version.split()[0],
                       "round_timeout_s": args.round_timeout, "codec": args.codec, "retry": not args.no_retry,
                       **broker_meta}
    out.write(results, kept_from=previous)
    plot(results, out)
    big = target.get("2000")
    if big:
        ok = big["round_closed"] and big["seconds_to_aggregate"] < 60 and big["lost"] == 0
        print(f"N=2000, {args.workers} worker(s): {big['seconds_to_aggregate']:.1f} s to aggregate, lost {big['lost']}: "
              f"{'meets' if ok else 'misses'} the < 60 s / zero-lost target")


if __name__ == "__main__":
    main()
