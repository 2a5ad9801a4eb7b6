"""How much the broker holds and hands over at once: the delivery half of a production ``mosquitto.conf``.

Mosquitto keeps at most ``max_queued_messages`` QoS-1 messages (1000 by default) beyond the
in-flight window for each client session, connected or not, and *drops* the rest with one log
line, ``Outgoing messages are being dropped for client <id>.``, per episode. Every device of a
round publishes its update to the aggregator's session (or, scaled out, to one of its workers'
sessions) within seconds, so with the default a fleet above ~1000 devices loses most of a round on
the way in; QoS 1 only covers the hop from the device to the broker. The limits here size that
queue for a round's burst (``BrokerLimits.for_fleet``), bound it in bytes so a flood still has a
ceiling, and keep the queue on disk (persistence) across a broker restart.

``delivery_lines`` is shared by ``broker_auth.mosquitto_conf`` (the production config, with
accounts and ACLs) and by the brokers benchmarks and tests start of their own, so what is
measured is what ships. ``drop_notices`` counts the broker's drop lines in its log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DROP_NOTICE = "Outgoing messages are being dropped for client"
FRAME_BYTES = 256 * 1024  # the transport's largest frame: an update above it travels as several messages


@dataclass(frozen=True)
class BrokerLimits:
    """What one client can make the broker hold: a packet, the messages queued for it, those in flight."""

    max_packet_bytes: int = 1024 * 1024  # above the transport's 256 KiB frames; stated in the v5 CONNACK
    max_queued_messages: int = 10_000    # per client session, QoS 1, beyond those in flight
    max_queued_bytes: int = 256 * 1024 * 1024
    max_inflight_messages: int = 100     # per session: sent, not PUBACKed (unless a v5 CONNECT states Receive Maximum)
    session_expiry: str = "7d"           # sessions of clients gone longer are dropped

    def __post_init__(self) -> None:
        for name in ("max_packet_bytes", "max_queued_messages", "max_queued_bytes", "max_inflight_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r} (0, Mosquitto's 'no limit', "
                                 "lets one client exhaust the broker's memory)")

    @classmethod
    def for_fleet(cls, devices: int, update_bytes: int = 64 * 1024, headroom: float = 2.0) -> "BrokerLimits":
        """Limits under which one aggregator session takes a whole round's burst from ``devices`` devices
        (each update ``update_bytes`` on the wire) ``headroom`` times over: retries and duplicates,
        the task vectors and status of the same devices. Never below the defaults."""
        if devices < 1 or update_bytes < 1 or headroom < 1:
            raise ValueError(f"need devices >= 1, update_bytes >= 1 and headroom >= 1, got {devices}, "
                             f"{update_bytes}, {headroom}")
        frames = math.ceil(update_bytes / FRAME_BYTES)
        base = cls()
        return cls(max_queued_messages=max(base.max_queued_messages, math.ceil(headroom * devices * frames)),
                   max_queued_bytes=max(base.max_queued_bytes, math.ceil(headroom * devices * update_bytes)))


def delivery_lines(limits: BrokerLimits, data_dir: Path, log_file: Path | None) -> list[str]:
    """Mosquitto 2 settings for queues, in-flight window, packet size, persistence and the log.

    ``max_packet_size`` is Mosquitto 2's message size limit (``message_size_limit`` is its deprecated
    spelling). QoS-0 messages are never queued for absent clients (the fleet sends none that matter).
    ``log_file`` None: Mosquitto's default destination (stderr).
    """
    lines = ["persistence true", f"persistence_location {data_dir}/", "autosave_interval 60",
             f"max_packet_size {limits.max_packet_bytes}",
             f"max_queued_messages {limits.max_queued_messages}", f"max_queued_bytes {limits.max_queued_bytes}",
             f"max_inflight_messages {limits.max_inflight_messages}", "queue_qos0_messages false",
             f"persistent_client_expiration {limits.session_expiry}",
             # the drop notices are "notice"; $SYS/broker/publish/messages/dropped counts drops broker-wide
             "log_type error", "log_type warning", "log_type notice", "log_type information",
             "log_timestamp_format %Y-%m-%dT%H:%M:%S", "sys_interval 10"]
    if log_file is not None:
        lines.insert(0, f"log_dest file {log_file}")
    return lines


def drop_notices(log_file: Path, offset: int = 0) -> tuple[int, list[str]]:
    """The broker's drop notices in ``log_file`` after byte ``offset``: how many, and the clients named."""
    with open(log_file, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    clients = [line.split(DROP_NOTICE, 1)[1].strip().rstrip(".") for line in text.splitlines() if DROP_NOTICE in line]
    return len(clients), clients


def local_broker_conf(port: int, state_dir: Path, limits: BrokerLimits = BrokerLimits(), host: str = "127.0.0.1",
                      run_as: str | None = None) -> str:
    """An anonymous Mosquitto on ``host:port`` with the production delivery limits, persistence and log
    (``state_dir/mosquitto.log``): for the broker a benchmark or test starts of its own. Accounts and
    ACLs change who may connect, not how messages queue, so what it measures is what ships. The caller
    creates ``state_dir/data`` (the persistence location)."""
    import getpass

    return "\n".join([f"listener {port} {host}", "allow_anonymous true",
                      *delivery_lines(limits, state_dir / "data", state_dir / "mosquitto.log"),
                      f"user {run_as or getpass.getuser()}"]) + "\n"
