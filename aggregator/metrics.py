"""Prometheus metrics for operators: ``metrics_port = 9108`` in aggregator.toml, then scrape /metrics.

Values are read from the running service at scrape time (a custom collector), so there is
no second set of counters to keep in step with the state the daemon already holds.
"""

from __future__ import annotations

import errno
import socket

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class MetricsUnavailable(RuntimeError):
    """``/metrics`` cannot be served where the config says (the port is taken, the address is not ours)."""


class ServiceCollector:
    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        s = self.service
        yield GaugeMetricFamily("fedaigc_round", "Current federated round", value=s.current_round())
        yield GaugeMetricFamily("fedaigc_finished", "1 once the federation finished", value=float(s.done.is_set()))
        yield GaugeMetricFamily("fedaigc_devices_clustered", "Devices with a cluster",
                                value=len(s.membership.assignment))
        yield GaugeMetricFamily("fedaigc_devices_online", "Devices whose last will says online",
                                value=sum(1 for v in s.telemetry.online.values() if v))
        clusters = GaugeMetricFamily("fedaigc_cluster_devices", "Devices per cluster", labels=["cluster"])
        for cid in sorted(set(s.membership.assignment.values())):
            clusters.add_metric([str(cid)], len(s.membership.members(cid)))
        yield clusters
        refusals = CounterMetricFamily("fedaigc_refusals", "Refused messages by reason", labels=["reason"])
        for reason, n in sorted(s.refusals.counts().items()):
            refusals.add_metric([reason], n)
        yield refusals
        yield CounterMetricFamily("fedaigc_duplicate_updates", "Updates already stored, acknowledged 'duplicate' "
                                  "(device re-sends, QoS-1 redelivery)", value=s.telemetry.duplicate_updates)
        wire = CounterMetricFamily("fedaigc_payload_bytes", "MQTT payload bytes (envelopes and chunk headers)",
                                   labels=["direction"])
        for direction, n in s.telemetry.totals().items():
            wire.add_metric([direction], n)
        yield wire


def serve_metrics(service, port: int, addr: str = "127.0.0.1"):
    """Start /metrics on ``addr:port`` in a daemon thread; returns the HTTP server (``shutdown()`` stops it)."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise unavailable(e, port, addr) from None
    return server


def check_port(port: int, addr: str = "127.0.0.1") -> None:
    """Raise ``MetricsUnavailable`` now if ``serve_metrics`` could not bind there later."""
    with socket.socket() as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            raise unavailable(e, port, addr) from None


def unavailable(e: OSError, port: int, addr: str) -> MetricsUnavailable:
    if e.errno == errno.EADDRINUSE:
        return MetricsUnavailable(f"metrics port {port} is in use on {addr}")
    return MetricsUnavailable(f"cannot serve metrics on {addr}:{port}: {e.strerror or e}")
