"""Operators scrape the daemon: /metrics speaks the Prometheus text format with live values."""

import urllib.request
import uuid

from prometheus_client.parser import text_string_to_metric_families

from aggregator.broker import free_port
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from edge_sdk.protocol.envelope import MessageType
from tests.polling import wait_until


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_refusals_and_bytes_as_they_happen(tmp_path, mqtt_url):
    port = free_port()
    service = AggregatorService(AggregatorConfig(aggregator_id=f"agg-{uuid.uuid4().hex[:6]}", mqtt_url=mqtt_url,
                                                 state_dir=tmp_path, expected_devices=5, metrics_port=port,
                                                 tokens=(DEMO_TOKEN,))).start()
    device = LiteDevice(mqtt_url).start()
    try:
        before = scrape(port)
        assert before[("fedaigc_round", ())] == 0
        device.send(device.topics.enrol(device.id), b"\x00not an envelope")
        device.enrol()
        device.wait_for(MessageType.ENROL_ACK)
        # the daemon counts the ack after publishing it, so the device may hold it first
        wait_until(lambda: scrape(port).get(("fedaigc_payload_bytes_total", (("direction", "down"),)), 0) > 0)
        after = scrape(port)
        assert after[("fedaigc_refusals_total", (("reason", "malformed"),))] == 1
        assert after[("fedaigc_payload_bytes_total", (("direction", "up"),))] > 0  # the enrolment
    finally:
        device.stop()
        service.stop()
