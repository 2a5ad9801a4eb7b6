"""The MQTT transport against a real broker (Mosquitto here, the embedded broker elsewhere)."""

import os
import shutil
import threading
import time

import pytest

from aggregator.broker import EmbeddedBroker, free_port
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.transport import MqttConfig, MqttTransport


class Inbox:
    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, topic, payload):
        with self.cond:
            self.items.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, n, timeout=30, distinct=False):
        def count():
            return len({p for _, p in self.items}) if distinct else len(self.items)

        deadline = time.monotonic() + timeout
        with self.cond:
            while count() < n and time.monotonic() < deadline:
                self.cond.wait(0.1)
        return count() >= n


def topic(name):
    return f"fedaigc/v1/test/{os.getpid()}/{name}/{time.monotonic_ns()}"


def test_every_message_type_round_trips_through_the_broker(mqtt_url):
    ident = Identity.generate()
    t = topic("types")
    inbox = Inbox()
    with MqttTransport(MqttConfig(url=mqtt_url)) as sub, MqttTransport(MqttConfig(url=mqtt_url)) as pub:
        sub.subscribe(t, inbox)
        time.sleep(0.3)
        writer = EnvelopeWriter(ident, "dev-x")
        for i, mtype in enumerate(MessageType):
            pub.publish(t, writer.build(mtype, f"payload {i}".encode(), round=i))
        assert inbox.wait_for(len(MessageType))
    verifier = EnvelopeVerifier(lambda s: ident.public.verify_key)
    got = [verifier.open(p) for _, p in inbox.items]
    assert [e.type for e in got] == list(MessageType)
    assert [e.payload for e in got] == [f"payload {i}".encode() for i in range(len(MessageType))]


def test_a_twenty_megabyte_payload_arrives_intact_in_chunks(mqtt_url):
    t = topic("big")
    inbox = Inbox()
    payload = os.urandom(20 * 1024 * 1024)
    with MqttTransport(MqttConfig(url=mqtt_url, max_frame=1024 * 1024)) as sub, \
            MqttTransport(MqttConfig(url=mqtt_url, max_frame=1024 * 1024)) as pub:
        sub.subscribe(t, inbox, chunked=True)
        time.sleep(0.3)
        infos = pub.publish(t, payload)
        assert len(infos) == 21  # 20 MiB in 1 MiB frames with a 60-byte header each
        assert inbox.wait_for(1, timeout=60)
        assert inbox.items[0][1] == payload
        assert pub.bytes_out[t] > len(payload)  # byte accounting sees the framing overhead


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs the mosquitto binary to own a broker process")
def test_a_broker_restart_mid_stream_loses_no_qos1_message(tmp_path):
    broker = EmbeddedBroker("127.0.0.1", free_port(), kind="mosquitto", state_dir=tmp_path).start()
    t = topic("restart")
    inbox = Inbox()
    sub = MqttTransport(MqttConfig(url=broker.url, client_id="restart-sub", reconnect_max_s=2)).connect()
    pub = MqttTransport(MqttConfig(url=broker.url, client_id="restart-pub", reconnect_max_s=2)).connect()
    try:
        sub.subscribe(t, inbox)
        time.sleep(0.3)
        for i in range(50):
            pub.publish(t, f"m{i}".encode())
        broker.stop()  # mid-stream: some messages are in flight or queued
        for i in range(50, 100):
            pub.publish(t, f"m{i}".encode())  # queued by paho while the broker is down
        time.sleep(1.0)
        broker.start()
        assert inbox.wait_for(100, timeout=60, distinct=True)
        received = {p.decode() for _, p in inbox.items}
        assert received == {f"m{i}" for i in range(100)}  # QoS 1: at least once, none lost
    finally:
        sub.close()
        pub.close()
        broker.close()


def test_falls_back_to_mqtt_311_on_a_broker_without_v5(tmp_path):
    broker = EmbeddedBroker("127.0.0.1", free_port(), kind="amqtt", state_dir=tmp_path).start()
    sub, pub = MqttTransport(MqttConfig(url=broker.url)), MqttTransport(MqttConfig(url=broker.url))
    try:
        inbox = Inbox()
        t = topic("v311")
        # amqtt never answers a v5 CONNECT: each client waits out its v5 attempt (3 s here, 10 s by
        # default), then connects with MQTT 3.1.1
        sub.connect(timeout=3)
        pub.connect(timeout=3)
        assert not sub.v5
        sub.subscribe(t, inbox)
        time.sleep(0.3)
        pub.publish(t, b"hello", expiry_s=60)  # v5 extras are skipped, not fatal
        assert inbox.wait_for(1)
        with pytest.raises(RuntimeError, match="shared subscriptions need MQTT v5"):
            sub.subscribe("$share/g/" + t, inbox)
    finally:
        sub.close()
        pub.close()
        broker.close()


def test_malformed_chunks_are_counted_not_raised(mqtt_url):
    t = topic("junk")
    inbox = Inbox()
    with MqttTransport(MqttConfig(url=mqtt_url)) as sub, MqttTransport(MqttConfig(url=mqtt_url)) as pub:
        sub.subscribe(t, inbox, chunked=True)
        time.sleep(0.3)
        pub._client.publish(t, b"FCK1" + b"\x00" * 10, qos=1)
        pub.publish(t, b"\x95after")
        assert inbox.wait_for(1)
        assert sub.refusals["malformed"] == 1
