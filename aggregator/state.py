"""Durable aggregator state: SQLite (WAL) by default, PostgreSQL for scale-out.

(Over 350 lines: every query the daemon runs is here, beside the transaction and row locks that
make accepting an update and closing its round exclusive; apart, that guarantee is not readable.)

Everything the aggregator must not forget lives here: enrolled devices and tokens, task
vectors, clusters with their adapters, round progress and every accepted update. An
update counts as *accepted* only once its row is committed; the primary key
``(round, cluster_id, device_id)`` makes duplicates (QoS-1 redelivery, a worker
replaced mid-round) no-ops, so a restarted or replacement worker resumes from the
table and nothing is counted twice. Closing a round writes the new adapter and the
round's state in one transaction.

Both backends run the same SQL; only the parameter marker differs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.files import private

TOKEN_BYTES = 32  # 256 random bits: a digest without a salt is enough, no dictionary reaches it
CONFIG_LABEL = "config"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY, verify_key BLOB NOT NULL, box_key BLOB NOT NULL,
        profile TEXT NOT NULL, token TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS enrolment_tokens (
        digest TEXT PRIMARY KEY, label TEXT NOT NULL, device_id TEXT, used INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tasks (
        device_id TEXT PRIMARY KEY, vector BLOB NOT NULL, received_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS clusters (
        cluster_id INTEGER PRIMARY KEY, centroid BLOB, adapter BLOB NOT NULL, version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS assignments (
        device_id TEXT PRIMARY KEY, cluster_id INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rounds (
        round INTEGER NOT NULL, cluster_id INTEGER NOT NULL, state TEXT NOT NULL,
        opened_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL,
        closed_at DOUBLE PRECISION, summary TEXT, PRIMARY KEY (round, cluster_id))""",
    """CREATE TABLE IF NOT EXISTS updates (
        round INTEGER NOT NULL, cluster_id INTEGER NOT NULL, device_id TEXT NOT NULL,
        delta BLOB NOT NULL, samples INTEGER NOT NULL, loss DOUBLE PRECISION NOT NULL,
        base_version INTEGER NOT NULL, accepted_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (round, cluster_id, device_id))""",
    """CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
]


def token_digest(token: str) -> str:
    """What the store keeps of a token: its SHA-256 (a stolen database enrols nobody)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class StateUnavailable(RuntimeError):
    """The state store cannot be written (disk full, read-only, permissions): nothing was changed."""


def state_directory(path: str | Path) -> Path:
    """The aggregator's state directory, created if absent; ``StateUnavailable`` if it cannot be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateUnavailable(f"state directory {path} is not usable: {e}") from e
    return Path(path)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    verify_key: bytes
    box_key: bytes
    profile: str
    token: str  # the digest of the token it enrolled with
    revoked: bool


class RoundRow(NamedTuple):
    """One cluster's part of one round: ``open`` while it takes updates, ``closed`` once aggregated."""

    round: int
    cluster_id: int
    state: str
    opened_at: float
    deadline: float


@dataclass(frozen=True)
class UpdateRecord:
    round: int
    cluster_id: int
    device_id: str
    delta: bytes
    samples: int
    loss: float
    base_version: int


class StateStore:
    """SQL state behind a lock; use ``open_store(url)`` to get one."""

    marker = "?"
    share_row = update_row = ""  # PostgreSQL row locks; SQLite's BEGIN IMMEDIATE already serialises writers

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -------------------------------------------------------------- plumbing
    def _connect(self):
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.marker == "?" else sql.replace("?", self.marker)

    @contextmanager
    def transaction(self) -> Iterator:
        with self._lock:
            try:
                with self._tx() as cur:
                    yield cur
            except (sqlite3.OperationalError, OSError) as e:
                raise StateUnavailable(f"state store is not writable: {e}") from e
            except Exception as e:
                if _is_pg_operational(e):
                    raise StateUnavailable(f"state store is not writable: {e}") from e
                raise

    def _tx(self):
        raise NotImplementedError

    def execute(self, cur, sql: str, params: tuple = ()) -> None:
        cur.execute(self._sql(sql), params)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.transaction() as cur:
            cur.execute(self._sql(sql), params)
            return [tuple(bytes(x) if isinstance(x, memoryview) else x for x in row) for row in cur.fetchall()]

    def init_schema(self) -> None:
        with self.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)
            self._hash_clear_tokens(cur)

    def _has_table(self, cur, name: str) -> bool:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return cur.fetchone() is not None

    def _hash_clear_tokens(self, cur) -> None:
        """A store from before tokens were hashed: move its ``tokens`` table into ``enrolment_tokens`` as
        digests, and replace the clear tokens devices enrolled with by theirs."""
        if self._has_table(cur, "tokens"):
            cur.execute("SELECT token, label, revoked FROM tokens")
            for token, label, revoked in cur.fetchall():
                self.execute(cur, "INSERT INTO enrolment_tokens (digest, label, revoked, created_at) "
                                  "VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                             (token_digest(token), label, revoked, time.time()))
            cur.execute("DROP TABLE tokens")
        self.execute(cur, "SELECT device_id, token FROM devices WHERE substr(token, 1, 7) <> 'sha256:'")
        for device_id, token in cur.fetchall():
            self.execute(cur, "UPDATE devices SET token = ? WHERE device_id = ?", (token_digest(token), device_id))

    # -------------------------------------------------------------- key/value
    def get(self, key: str, default=None):
        rows = self.query("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value, cur=None) -> None:
        sql = "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        if cur is not None:
            self.execute(cur, sql, (key, json.dumps(value)))
            return
        with self.transaction() as c:
            self.execute(c, sql, (key, json.dumps(value)))

    def get_prefixed(self, prefix: str) -> dict:
        """Every value whose key starts with ``prefix``, by the rest of the key: records kept one row
        per device, so recording one device's never rewrites the others'."""
        rows = self.query("SELECT key, value FROM kv WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
        return {k[len(prefix):]: json.loads(v) for k, v in rows}

    # -------------------------------------------------------------- tokens & devices
    def issue_token(self, device_id: str, label: str = "provisioned") -> str:
        """A new one-time token that enrols ``device_id`` only; returned once, stored as its digest."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self.transaction() as cur:
            self.execute(cur, "INSERT INTO enrolment_tokens (digest, label, device_id, created_at) VALUES (?, ?, ?, ?)",
                         (token_digest(token), label, device_id, time.time()))
        return token

    def add_token(self, token: str, label: str = "") -> None:
        """A fleet-wide token any number of devices may enrol with (simulations, tests; ``tokens`` in the config)."""
        with self.transaction() as cur:
            self.execute(cur, "INSERT INTO enrolment_tokens (digest, label, created_at) VALUES (?, ?, ?) "
                              "ON CONFLICT (digest) DO NOTHING", (token_digest(token), label, time.time()))

    def sync_config_tokens(self, tokens: Iterable[str]) -> int:
        """Make the config's fleet tokens exactly ``tokens``: add the new ones, revoke the ones no longer
        listed and every device they enrolled (a token is removed because it leaked). Returns how many
        were revoked."""
        keep = {token_digest(t) for t in tokens}
        for token in tokens:
            self.add_token(token, CONFIG_LABEL)
        gone = [d for (d,) in self.query("SELECT digest FROM enrolment_tokens WHERE label = ? AND revoked = 0",
                                         (CONFIG_LABEL,)) if d not in keep]
        for digest in gone:
            self._revoke_digest(digest)
        return len(gone)

    def revoke_token(self, token: str) -> None:
        """Revoke a fleet token and every device enrolled with it."""
        self._revoke_digest(token_digest(token))

    def _revoke_digest(self, digest: str) -> None:
        with self.transaction() as cur:
            self.execute(cur, "UPDATE enrolment_tokens SET revoked = 1 WHERE digest = ?", (digest,))
            self.execute(cur, "UPDATE devices SET revoked = 1 WHERE token = ?", (digest,))

    def revoke_tokens_of(self, device_id: str) -> int:
        """Revoke the tokens issued for ``device_id`` (a bundle lost before or after use); its enrolment,
        if any, stands. Returns how many were still valid."""
        with self.transaction() as cur:
            self.execute(cur, "SELECT COUNT(*) FROM enrolment_tokens WHERE device_id = ? AND revoked = 0", (device_id,))
            (n,) = cur.fetchone()
            self.execute(cur, "UPDATE enrolment_tokens SET revoked = 1 WHERE device_id = ?", (device_id,))
            return int(n)

    def token_valid(self, token: str) -> bool:
        return self._token_row(token_digest(token)) is not None

    def _token_row(self, digest: str, cur=None) -> tuple | None:
        """(device_id, used) of an unrevoked token, compared in constant time once found."""
        sql, params = "SELECT digest, device_id, used FROM enrolment_tokens WHERE digest = ? AND revoked = 0", (digest,)
        if cur is None:
            rows = self.query(sql, params)
        else:
            self.execute(cur, sql + self.update_row, params)
            rows = cur.fetchall()
        if not rows or not hmac.compare_digest(rows[0][0], digest):
            return None
        return rows[0][1], bool(rows[0][2])

    def enrol(self, device_id: str, verify_key: bytes, box_key: bytes, profile: str, token: str) -> None:
        """Register a device's keys under ``token``, or refuse (``bad_token``, ``revoked``) with the reason.

        A fleet token enrols any id not taken; a provisioned token enrols its own id only, once: the
        first enrolment with it binds the keys (replacing those of an earlier enrolment of the id, which
        is how an operator re-provisions a device), and later ones are idempotent for those keys only.
        """
        digest = token_digest(token)
        with self.transaction() as cur:
            row = self._token_row(digest, cur)
            if row is None:
                raise RefusedMessage(Refusal.BAD_TOKEN, f"{device_id} presented an unknown or revoked token")
            bound, used = row
            if bound is not None and bound != device_id:
                raise RefusedMessage(Refusal.BAD_TOKEN, f"{device_id} presented a token issued for another device")
            self.execute(cur, "SELECT verify_key, box_key, revoked FROM devices WHERE device_id = ?" + self.update_row,
                         (device_id,))
            known = cur.fetchone()
            fresh = bound is not None and not used  # an unused provisioned token (re-)keys its device
            if known is not None and not fresh:
                if (bytes(known[0]), bytes(known[1])) != (verify_key, box_key):
                    raise RefusedMessage(Refusal.BAD_TOKEN, f"{device_id} is enrolled with other keys; "
                                                            "this token cannot enrol new ones")
                if known[2]:
                    raise RefusedMessage(Refusal.REVOKED, f"{device_id}'s enrolment was revoked")
                return
            self.execute(cur, "DELETE FROM devices WHERE device_id = ?", (device_id,))
            self.execute(cur, "INSERT INTO devices (device_id, verify_key, box_key, profile, token, enrolled_at) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                         (device_id, verify_key, box_key, profile, digest, time.time()))
            if bound is not None:
                self.execute(cur, "UPDATE enrolment_tokens SET used = 1 WHERE digest = ?", (digest,))

    def revoke_device(self, device_id: str) -> bool:
        """Refuse the device from its next message on, and its tokens with it; False if it was never
        enrolled (its tokens are revoked all the same)."""
        with self.transaction() as cur:
            self.execute(cur, "UPDATE enrolment_tokens SET revoked = 1 WHERE device_id = ?", (device_id,))
            self.execute(cur, "SELECT COUNT(*) FROM devices WHERE device_id = ?", (device_id,))
            (known,) = cur.fetchone()
            self.execute(cur, "UPDATE devices SET revoked = 1 WHERE device_id = ?", (device_id,))
            return bool(known)

    def device(self, device_id: str) -> DeviceRecord | None:
        rows = self.query("SELECT device_id, verify_key, box_key, profile, token, revoked FROM devices WHERE device_id = ?",
                          (device_id,))
        return DeviceRecord(*rows[0][:5], bool(rows[0][5])) if rows else None

    def enrolled_ids(self) -> set[str]:
        """The ids of enrolled devices that are not revoked (one narrow query, for caches)."""
        return {r[0] for r in self.query("SELECT device_id FROM devices WHERE revoked = 0")}

    def devices(self) -> list[DeviceRecord]:
        rows = self.query("SELECT device_id, verify_key, box_key, profile, token, revoked FROM devices ORDER BY device_id")
        return [DeviceRecord(*r[:5], bool(r[5])) for r in rows]

    # -------------------------------------------------------------- tasks & clusters
    def put_task(self, device_id: str, vector: bytes) -> None:
        with self.transaction() as cur:
            self.execute(cur, "INSERT INTO tasks (device_id, vector, received_at) VALUES (?, ?, ?) "
                              "ON CONFLICT (device_id) DO UPDATE SET vector = excluded.vector, received_at = excluded.received_at",
                         (device_id, vector, time.time()))

    def tasks(self) -> dict[str, bytes]:
        return {d: v for d, v in self.query("SELECT device_id, vector FROM tasks ORDER BY device_id")}

    def task_count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM tasks")[0][0])

    def unassigned_tasks(self) -> dict[str, bytes]:
        """Task vectors of enrolled, unrevoked devices that no cluster holds yet (late joiners)."""
        return {d: v for d, v in self.query(
            "SELECT t.device_id, t.vector FROM tasks t JOIN devices d ON d.device_id = t.device_id "
            "LEFT JOIN assignments a ON a.device_id = t.device_id WHERE a.device_id IS NULL AND d.revoked = 0")}

    def revoked_devices(self) -> set[str]:
        return {d for (d,) in self.query("SELECT device_id FROM devices WHERE revoked = 1")}

    def save_clusters(self, clusters: dict[int, tuple[bytes | None, bytes, int]], assignment: dict[str, int], cur=None) -> None:
        """Replace the cluster table and assignments: ``{id: (centroid, adapter, version)}``."""
        def write(c):
            self.execute(c, "DELETE FROM clusters")
            for cid, (centroid, adapter, version) in sorted(clusters.items()):
                self.execute(c, "INSERT INTO clusters (cluster_id, centroid, adapter, version) VALUES (?, ?, ?, ?)",
                             (cid, centroid, adapter, version))
            self.execute(c, "DELETE FROM assignments")
            for device, cid in sorted(assignment.items()):
                self.execute(c, "INSERT INTO assignments (device_id, cluster_id) VALUES (?, ?)", (device, cid))
        if cur is not None:
            write(cur)
        else:
            with self.transaction() as c:
                write(c)

    def clusters(self) -> dict[int, tuple[bytes | None, bytes, int]]:
        return {cid: (cen, ad, ver) for cid, cen, ad, ver in
                self.query("SELECT cluster_id, centroid, adapter, version FROM clusters ORDER BY cluster_id")}

    def assignment(self) -> dict[str, int]:
        return {d: c for d, c in self.query("SELECT device_id, cluster_id FROM assignments ORDER BY device_id")}

    # -------------------------------------------------------------- rounds & updates
    def open_round(self, rnd: int, cluster_id: int, deadline: float, cur=None) -> None:
        sql = ("INSERT INTO rounds (round, cluster_id, state, opened_at, deadline) VALUES (?, ?, 'open', ?, ?) "
               "ON CONFLICT (round, cluster_id) DO NOTHING")
        if cur is not None:
            self.execute(cur, sql, (rnd, cluster_id, time.time(), deadline))
            return
        with self.transaction() as c:
            self.execute(c, sql, (rnd, cluster_id, time.time(), deadline))

    def extend_round(self, rnd: int, cluster_id: int, deadline: float) -> None:
        with self.transaction() as cur:
            self.execute(cur, "UPDATE rounds SET deadline = ? WHERE round = ? AND cluster_id = ?", (deadline, rnd, cluster_id))

    def rounds(self, state: str | None = None) -> list[RoundRow]:
        sql = "SELECT round, cluster_id, state, opened_at, deadline FROM rounds"
        params: tuple = ()
        if state is not None:
            sql += " WHERE state = ?"
            params = (state,)
        return [RoundRow(*row) for row in self.query(sql + " ORDER BY round, cluster_id", params)]

    def round_summaries(self) -> list[tuple[int, int, dict]]:
        rows = self.query("SELECT round, cluster_id, summary FROM rounds WHERE state = 'closed' ORDER BY round, cluster_id")
        return [(r, c, json.loads(s or "{}")) for r, c, s in rows]

    def accept_update(self, rec: UpdateRecord) -> bool:
        """Persist an update; False if this (round, cluster, device) was already accepted.

        The round row is locked until commit, so a worker closing the round (``closing_round``)
        either sees this update or makes it fail as not open: never accepted-but-not-aggregated.
        """
        with self.transaction() as cur:
            self.execute(cur, "SELECT state FROM rounds WHERE round = ? AND cluster_id = ?" + self.share_row,
                         (rec.round, rec.cluster_id))
            row = cur.fetchone()
            if row is None or row[0] != "open":
                raise ValueError(f"round {rec.round} of cluster {rec.cluster_id} is not open")
            self.execute(cur, "INSERT INTO updates (round, cluster_id, device_id, delta, samples, loss, base_version, accepted_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round, cluster_id, device_id) DO NOTHING",
                         (rec.round, rec.cluster_id, rec.device_id, rec.delta, rec.samples, rec.loss, rec.base_version, time.time()))
            return cur.rowcount == 1

    def updates(self, rnd: int, cluster_id: int | None = None) -> list[UpdateRecord]:
        sql = "SELECT round, cluster_id, device_id, delta, samples, loss, base_version FROM updates WHERE round = ?"
        params: tuple = (rnd,)
        if cluster_id is not None:
            sql += " AND cluster_id = ?"
            params += (cluster_id,)
        return [UpdateRecord(*r) for r in self.query(sql + " ORDER BY device_id", params)]

    def reported(self, rnd: int, cluster_id: int | None = None) -> set[str]:
        """Devices with an accepted update in ``rnd`` (ids only: cheap enough to ask per update)."""
        sql, params = "SELECT device_id FROM updates WHERE round = ?", (rnd,)
        if cluster_id is not None:
            sql, params = sql + " AND cluster_id = ?", (rnd, cluster_id)
        return {d for (d,) in self.query(sql, params)}

    def reported_count(self, rnd: int, cluster_id: int | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM updates WHERE round = ?", (rnd,)
        if cluster_id is not None:
            sql, params = sql + " AND cluster_id = ?", (rnd, cluster_id)
        return int(self.query(sql, params)[0][0])

    @contextmanager
    def closing_round(self, rnd: int, cluster_id: int) -> Iterator[tuple | None]:
        """One transaction to close (rnd, cluster): yields ``(cur, updates)``, or ``None`` if it is
        not open (another worker closed it). The round row stays locked until the caller's
        ``close_round(..., cur=cur)`` commits, so no update can be accepted in between."""
        with self.transaction() as cur:
            self.execute(cur, "SELECT state FROM rounds WHERE round = ? AND cluster_id = ?" + self.update_row,
                         (rnd, cluster_id))
            row = cur.fetchone()
            if row is None or row[0] != "open":
                yield None
                return
            self.execute(cur, "SELECT round, cluster_id, device_id, delta, samples, loss, base_version FROM updates "
                              "WHERE round = ? AND cluster_id = ? ORDER BY device_id", (rnd, cluster_id))
            yield cur, [UpdateRecord(*(bytes(x) if isinstance(x, memoryview) else x for x in r)) for r in cur.fetchall()]

    def close_round(self, rnd: int, cluster_id: int, adapter: bytes, version: int, summary: dict, cur=None) -> None:
        """New adapter and closed round, atomically."""
        def write(c):
            self.execute(c, "UPDATE clusters SET adapter = ?, version = ? WHERE cluster_id = ?", (adapter, version, cluster_id))
            self.execute(c, "UPDATE rounds SET state = 'closed', closed_at = ?, summary = ? WHERE round = ? AND cluster_id = ?",
                         (time.time(), json.dumps(summary), rnd, cluster_id))
        if cur is not None:
            write(cur)
            return
        with self.transaction() as c:
            write(c)

    def try_lead(self, name: str) -> bool:
        """Whether this store's holder leads the workers named ``name`` (one store per worker)."""
        return True

    def close(self) -> None:
        pass


class SqliteStore(StateStore):
    def __init__(self, path: str | Path, create: bool = True) -> None:
        """The store at ``path``; ``create=False`` (a reader) refuses a path holding none, writing nothing."""
        super().__init__()
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StateUnavailable(f"no fedaigc state at {self.path}")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # SQLite gives the -wal and -shm files the database's mode: create it 0600, tighten an older one
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")  # what is deleted (clear tokens migrated away) is zeroed
            if not create and not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'kv'").fetchall():
                raise StateUnavailable(f"{self.path} is not a fedaigc state store: it holds none of its tables")
            if create:
                for suffix in ("", "-wal", "-shm"):
                    private(Path(f"{self.path}{suffix}"))
        except (sqlite3.OperationalError, OSError) as e:
            raise StateUnavailable(f"cannot open state database {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:  # a file that is not SQLite reads as "file is not a database"
            raise StateUnavailable(f"{self.path} is not a fedaigc state store: {e}") from None
        self.init_schema()

    @contextmanager
    def _tx(self):
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            # also when COMMIT itself fails (disk full): left open, the transaction would make
            # every later BEGIN fail; SQLite may already have rolled back on its own
            if self._conn.in_transaction:
                cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()


class PostgresStore(StateStore):
    marker = "%s"
    share_row, update_row = " FOR SHARE", " FOR UPDATE"

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg

        try:
            self._conn = psycopg.connect(url, autocommit=False)
        except psycopg.OperationalError as e:
            raise StateUnavailable(f"cannot connect to PostgreSQL at {url}: {e}") from e
        self.init_schema()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s").replace("BLOB", "BYTEA")

    def init_schema(self) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7261)")  # workers starting together must not race on DDL
            for stmt in SCHEMA:
                cur.execute(self._sql(stmt))
            self._hash_clear_tokens(cur)

    def _has_table(self, cur, name: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(cur.fetchone()[0])

    @contextmanager
    def _tx(self):
        with self._conn.transaction():
            with self._conn.cursor() as cur:
                yield cur

    def execute(self, cur, sql: str, params: tuple = ()) -> None:
        cur.execute(self._sql(sql), params)

    def try_lead(self, name: str) -> bool:
        """A session advisory lock: held until this connection ends, so a killed leader's lock
        is released by the server and the next worker to ask takes over."""
        key = zlib.crc32(f"fedaigc-leader/{name}".encode()) - 2**31
        return bool(self.query("SELECT pg_try_advisory_lock(?)", (key,))[0][0])

    def close(self) -> None:
        self._conn.close()


def _is_pg_operational(e: Exception) -> bool:
    try:
        import psycopg

        return isinstance(e, psycopg.OperationalError)
    except ImportError:
        return False


def open_store(url: str, create: bool = True) -> StateStore:
    """``sqlite:///path/state.db`` (or a plain path) or ``postgresql://...``; ``create=False`` for a
    reader (``fedaigc status``): a SQLite path with no store is a ``StateUnavailable``, never a new file."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:///"):  # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy style)
        url = url[len("sqlite:///"):]
    return SqliteStore(url, create)
