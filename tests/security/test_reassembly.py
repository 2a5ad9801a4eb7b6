"""Bounded, authenticated reassembly (issue 17): floods of chunked messages that never complete.

Against the real daemon on the real broker (each test on a topic prefix of its own). The flood is
published by a separate process, so the memory measured is the daemon's (it runs in this one),
not the attacker's send buffers. Numbers each test measured are printed (``pytest -s``).
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from aggregator.enrolled import EnrolledIds
from aggregator.state import open_store
from benchmarks.edge import PeakRss
from edge_sdk.client import EdgeClient, LocalData
from edge_sdk.config import DeviceConfig
from edge_sdk.protocol.chunking import HEADER_BYTES, split_payload
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.session import FederatedSession
from edge_sdk.transport import MqttConfig, MqttTransport
from tests.polling import wait_until
from tests.security.test_weights import Federation

MiB = 1024 * 1024
FRAME = MiB  # the flood's frame size: few frames, so the broker's per-client queue never drops any

FLOOD = """
import sys
import os
from edge_sdk.protocol.chunking import split_payload
from edge_sdk.transport import MqttConfig, MqttTransport

url, prefix, topic, size, frame, messages, *senders = sys.argv[1:]
t = MqttTransport(MqttConfig(url=url, topic_prefix=prefix)).connect()
for sender in senders:
    for _ in range(int(messages)):
        frames = split_payload(os.urandom(int(size)), int(frame))
        frames = frames[:-1]  # never completed
        t.wait_published([t._client.publish(getattr(t.topics, topic)(sender), f, qos=1) for f in frames], 120)
t.close()
"""


def flood(url: str, prefix: str, senders: list[str], messages: int, size: int, frame: int = FRAME,
          topic: str = "update") -> None:
    """Publish ``messages`` chunked messages of ``size`` bytes per sender on its ``topic`` (a ``Topics``
    method), all but their last chunk, from another process."""
    subprocess.run([sys.executable, "-c", FLOOD, url, prefix, topic, str(size), str(frame), str(messages), *senders],
                   check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=300)


def small_delta(shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def publish_chunked(fed: Federation, i: int, envelope: bytes, frame: int = 16 * 1024) -> None:
    """Device ``i``'s envelope on its update topic, in chunks (as a device whose broker takes small packets)."""
    d = fed.devices[i]
    with MqttTransport(MqttConfig(url=fed.mqtt_url, topic_prefix=d.topics.prefix, max_frame=frame)) as t:
        infos = t.publish(d.topics.update(d.id), envelope)
        assert len(infos) > 1 and t.wait_published(infos)


@pytest.fixture
def fed(tmp_path, mqtt_url, request):
    settings = {"max_message_bytes": 16 * MiB, "max_reassembly_bytes": 64 * MiB} | getattr(request, "param", {})
    federation = Federation(tmp_path, mqtt_url, 3, **settings)
    federation.mqtt_url = mqtt_url
    yield federation
    federation.close()


def test_a_flood_stays_within_the_budget_and_a_device_update_gets_through(fed):
    service, prefix = fed.service, fed.devices[0].topics.prefix
    enrolled, strangers = [d.id for d in fed.devices[1:]], [f"stranger{i}-{prefix}" for i in range(2)]
    envelope = fed.devices[0].update_envelope(fed.starts[0], small_delta(service.shapes))
    with PeakRss() as rss:
        start = rss.now_mb()
        attack = threading.Thread(target=flood, args=(fed.mqtt_url, prefix, enrolled + strangers, 6, 15 * MiB))
        attack.start()
        wait_until(lambda: service.refusals["oversized"] >= 2, 60, "the flood is evicting its own partials")
        publish_chunked(fed, 0, envelope)  # mid-flood
        attack.join()
        wait_until(lambda: service.refusals["unknown_sender"] >= 2 * 6 * 15, 60, "every stranger frame refused")
        acks = [b for _, b in fed.devices[0].wait_for(MessageType.UPDATE_ACK)]
    flooded = 4 * 6 * 15 * (FRAME - HEADER_BYTES)
    print(f"\nflood of {flooded / MiB:.0f} MiB: RSS {start:.0f} -> peak {rss.peak_mb:.0f} MiB, "
          f"reserved {service.transport.reassembler.reserved() / MiB:.0f} MiB, refusals {service.refusals.counts()}")
    assert len(acks) == 1
    assert service.store.reported(1) == {fed.devices[0].id}
    assert service.transport.reassembler.reserved() <= 64 * MiB
    assert (rss.peak_mb - start) * MiB < 64 * MiB + 32 * MiB  # the budget, plus frames in paho's buffers
    assert service.refusals["oversized"] == 2 * (6 - 2)  # each enrolled attacker holds two, losing the oldest


def test_chunks_on_a_topic_that_takes_none_are_refused(fed):
    service, d = fed.service, fed.devices[0]
    frames = split_payload(os.urandom(100_000), 16 * 1024)
    with MqttTransport(MqttConfig(url=fed.mqtt_url, topic_prefix=d.topics.prefix)) as t:
        assert t.wait_published([t._client.publish(topic, f, qos=1) for topic in (d.topics.task(d.id),
                                 d.topics.device_status(d.id)) for f in frames])
    wait_until(lambda: service.refusals["wrong_type"] == 2 * len(frames), 20, "every frame refused")
    assert service.transport.reassembler.pending() == 0


def test_chunks_from_an_unenrolled_sender_are_refused_before_reassembly(fed):
    service, prefix = fed.service, fed.devices[0].topics.prefix
    flood(fed.mqtt_url, prefix, [f"nobody-{prefix}"], 1, 300_000, 16 * 1024)
    wait_until(lambda: service.refusals["unknown_sender"] == 18, 20, "every frame refused")
    assert service.transport.reassembler.pending() == 0


@pytest.mark.parametrize("fed", [{"reassembly_timeout_s": 1.0}], indirect=True)
def test_expired_partials_return_their_memory(fed):
    service, prefix = fed.service, fed.devices[0].topics.prefix
    with PeakRss() as rss:
        start = rss.now_mb()
        flood(fed.mqtt_url, prefix, [d.id for d in fed.devices[1:]], 2, 15 * MiB)
        wait_until(lambda: service.refusals["incomplete"] == 4, 30, "the partials expired")
    after = rss.now_mb()
    print(f"\n60 MiB of partials expired: RSS {start:.0f} -> peak {rss.peak_mb:.0f} -> "
          f"{after:.0f} MiB, refusals {service.refusals.counts()}")
    assert service.transport.reassembler.reserved() == 0
    assert (rss.peak_mb - start) * MiB > 30 * MiB  # the partials were really held ...
    assert (after - start) * MiB < 16 * MiB  # ... and their memory is back


def test_intake_keeps_its_pace_after_twenty_thousand_chunk_frames(fed):
    """Each message is two chunks of a payload that is no envelope, refused ``malformed`` once whole."""
    service, d = fed.service, fed.devices[1]
    rng = np.random.default_rng(0)
    with MqttTransport(MqttConfig(url=fed.mqtt_url, topic_prefix=d.topics.prefix, max_frame=160)) as t:
        def batch(n: int, burst: int = 250) -> float:
            """Frames per second from publishing ``n`` messages to the daemon having refused them all, in
            bursts the broker's queue for the daemon (1,000 messages) always holds."""
            start = time.perf_counter()
            for _ in range(n // burst):
                target = service.refusals["malformed"] + burst
                for _ in range(burst):
                    t.publish(d.topics.update(d.id), b"\x00" + rng.bytes(199))
                wait_until(lambda: service.refusals["malformed"] >= target, 30, "a burst handled", interval=0.002)
            return 2 * n / (time.perf_counter() - start)

        first = batch(1000)
        for _ in range(8):
            batch(1000)
        last = batch(1000)
    print(f"\nintake: {first:.0f} frames/s for the first 2,000 frames, {last:.0f} after 18,000 more "
          f"(ratio {last / first:.2f})")
    assert last / first > 0.5


def test_a_devices_downlink_refuses_partials_beyond_its_budget_and_its_memory_stays_bounded(tmp_path, mqtt_url):
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "device", profile="simulator",
                                    trust_on_first_use=True))  # no aggregator here: only its downlink is flooded
    session = FederatedSession(client, LocalData(torch.rand(4, 1, 16, 16), ["a chunky 7"] * 4),
                               MqttConfig(url=mqtt_url, topic_prefix=prefix)).start()
    reassembler = session.transport.reassembler
    try:
        with PeakRss() as rss:
            start = rss.now_mb()
            flood(mqtt_url, prefix, [client.device_id], 16, 4 * MiB, topic="down")  # 4 frames each, all refused
            flood(mqtt_url, prefix, [client.device_id], 64, MiB, 64 * 1024, topic="down")  # each evicts the last
            wait_until(lambda: session.refusals["oversized"] >= 16 * 4 + 63, 30, "the flood refused")
        print(f"\ndevice downlink flood of 128 MiB, budget {reassembler.budget / MiB:.1f} MiB: RSS "
              f"{start:.0f} -> peak {rss.peak_mb:.0f} MiB, refusals {session.refusals.counts()}")
        assert reassembler.reserved() <= reassembler.max_sender_bytes
        assert (rss.peak_mb - start) * MiB < reassembler.budget + 16 * MiB  # frames in flight in paho's buffers
    finally:
        session.stop()


@pytest.fixture
def senders(tmp_path):
    """Who may send chunks, over a real SQLite store, on a clock the test turns."""
    store = open_store(str(tmp_path / "state.db"))
    store.add_token("token", "test")
    now = [0.0]
    yield store, now, EnrolledIds(store, refresh_s=1, max_age_s=10, clock=lambda: now[0])
    store.close()


def test_a_sender_refused_as_unknown_is_accepted_a_second_after_it_enrols(senders):
    store, now, accept = senders
    assert not accept("dev")
    store.enrol("dev", b"v" * 32, b"b" * 32, "simulator", "token")
    assert not accept("dev")  # the set was read a moment ago ...
    now[0] = 1.5
    assert accept("dev")  # ... for a second only


def test_a_revoked_sender_loses_reassembly_within_the_cache_lifetime(senders):
    store, now, accept = senders
    store.enrol("dev", b"v" * 32, b"b" * 32, "simulator", "token")
    assert accept("dev")
    store.revoke_device("dev")
    now[0] = 5.0
    assert accept("dev")  # cached: the envelope check refuses the revoked sender's message anyway
    now[0] = 10.5
    assert not accept("dev")
