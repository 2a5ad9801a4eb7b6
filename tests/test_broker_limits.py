"""The broker side ships what a round needs (issue 20): ``fedaigc broker-config``'s ``mosquitto.conf``, run by a
real Mosquitto on a free port, holds a round's burst for the aggregator's session instead of dropping it.

The burst is published while the aggregator's persistent session is away (Mosquitto queues for an absent
session exactly as for one that reads too slowly: ``max_queued_messages`` beyond the in-flight window). On
reconnecting, the aggregator publishes a marker to the same topic: Mosquitto delivers a session's queue in
order, so once the marker arrives everything the broker kept has arrived. (The device publishes the marker:
only a device may speak on its update topic.)
"""

from __future__ import annotations

import shutil
import threading
import tomllib
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.broker import EmbeddedBroker, free_port
from aggregator.broker_auth import add_broker_user, write_broker_config
from aggregator.broker_limits import BrokerLimits, drop_notices
from edge_sdk.protocol.topics import Topics

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs the mosquitto binary")

BURST = 1500  # above Mosquitto's default max_queued_messages (1000)
MARKER = b"marker"


class Session:
    """A raw MQTT v5 client with a persistent session: what arrives, and a way to wait for the marker."""

    def __init__(self, port: int, client_id: str, user: str, password: str) -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.received: list[bytes] = []
        self.marked = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.port = port

    def _on_message(self, client, userdata, message) -> None:
        if message.payload == MARKER:
            self.marked.set()
        else:
            self.received.append(bytes(message.payload))

    def connect(self) -> "Session":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.connected.clear()
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"
        return self

    def leave(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def burst_through(out: Path, limits: BrokerLimits) -> tuple[int, int, list[str]]:
    """A generated config with ``limits``; the aggregator subscribes to every update topic and leaves, one
    device publishes ``BURST`` updates, the aggregator comes back. Returns (published, received, the
    clients the broker's log says it dropped messages for)."""
    prefix = f"lim{uuid.uuid4().hex[:8]}"
    port = free_port()
    files = write_broker_config(out / "broker", prefix, port=port, bind="127.0.0.1", limits=limits)
    aggregator = tomllib.loads(files.aggregator_toml.read_text())["aggregator"]
    add_broker_user(files.passwd, "devA", "secret-a")
    topics = Topics(prefix)
    broker = EmbeddedBroker("127.0.0.1", port, config=files.conf, state_dir=out / "run").start()
    try:
        agg = Session(port, f"fedaigc-agg-{prefix}", aggregator["mqtt_username"], aggregator["mqtt_password"])
        agg.connect()
        agg.client.subscribe(topics.update_all, qos=1)
        assert agg.subscribed.wait(10), "no SUBACK"
        agg.leave()

        device = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="fedaigc-devA",
                             protocol=mqtt.MQTTv5)
        device.username_pw_set("devA", "secret-a")
        device.connect("127.0.0.1", port)
        device.loop_start()
        try:
            infos = [device.publish(topics.update("devA"), i.to_bytes(4, "big") * 64, qos=1) for i in range(BURST)]
            for info in infos:
                info.wait_for_publish(30)
            published = sum(info.is_published() for info in infos)
            agg.connect()
            device.publish(topics.update("devA"), MARKER, qos=1)
            assert agg.marked.wait(30), "the marker did not come back"
            agg.leave()
        finally:
            device.disconnect()
            device.loop_stop()
        _, dropped_for = drop_notices(out / "broker" / "mosquitto.log")
        return published, len(agg.received), dropped_for
    finally:
        broker.close()


def test_the_generated_config_keeps_a_burst_beyond_mosquittos_default_queue_for_the_aggregator(tmp_path):
    published, received, dropped_for = burst_through(tmp_path, BrokerLimits())
    assert published == BURST
    assert received == BURST
    assert dropped_for == []


def test_with_mosquittos_default_queue_the_same_burst_is_dropped_and_the_broker_log_names_the_session(tmp_path):
    published, received, dropped_for = burst_through(tmp_path, BrokerLimits(max_queued_messages=1000))
    assert published == BURST
    assert received < BURST
    assert len(dropped_for) == 1 and dropped_for[0].startswith("fedaigc-agg-")


def test_queues_are_sized_for_a_fleets_round_never_below_the_defaults():
    assert BrokerLimits.for_fleet(100) == BrokerLimits()
    big = BrokerLimits.for_fleet(50_000, update_bytes=300 * 1024)  # two frames per update
    assert big.max_queued_messages == 2 * 50_000 * 2
    assert big.max_queued_bytes == 2 * 50_000 * 300 * 1024


def test_no_limit_is_refused_as_a_limit():
    with pytest.raises(ValueError, match="max_queued_messages must be a positive integer"):
        BrokerLimits(max_queued_messages=0)
