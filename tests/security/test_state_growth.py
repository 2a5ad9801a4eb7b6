"""Nothing unauthenticated grows state; every refusal is answered (issue 17).

Against the real daemon on the real broker (each test on a topic prefix of its own): invented
presence ids and invented rounds leave the online and traffic maps as they were, refusal counts
survive a restart, a device flooding the generation service is answered ``busy`` within its rate
while another device is served, the queue stays within its bound, and every kind of bad request
an authenticated device sends gets its reason back at once.
"""

import resource
import time
import uuid

import pytest
import torch

from aggregator.ratelimit import TokenBuckets
from aggregator.service import AggregatorService
from aggregator.state import open_store
from aggregator.status import read_status
from aggregator.telemetry import Telemetry, merged_refusals
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage, RequestRefused
from edge_sdk.protocol.messages import DeviceStatus, GenerateRequest, UpdateAck
from edge_sdk.protocol.tensors import pack_tensors
from edge_sdk.transport import MqttConfig, MqttTransport
from tests.polling import wait_until
from tests.security.test_weights import Federation

ENCODING = torch.randn(384, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def federation(tmp_path, mqtt_url, request):
    settings = {"n": 2} | getattr(request, "param", {})
    fed = Federation(tmp_path, mqtt_url, **settings)
    fed.service.generation.service.steps = 4  # what a request costs does not matter here, only how many
    yield fed
    fed.close()


def attacker(mqtt_url: str, prefix: str) -> MqttTransport:
    """A broker client with no enrolment: it may publish whatever the broker lets it."""
    return MqttTransport(MqttConfig(url=mqtt_url, client_id=f"intruder-{uuid.uuid4().hex[:8]}",
                                    topic_prefix=prefix)).connect()


def enrolled(fed) -> set[str]:
    return {d.id for d in fed.devices}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- presence
def test_presence_of_invented_ids_is_refused_and_the_online_map_holds_only_the_enrolled_fleet(federation, mqtt_url):
    fed, flood, wave = federation, 3000, 500  # in waves: the broker drops what queues beyond 1000 for a client
    before = fed.service.refusals["unknown_sender"]
    intruder = attacker(mqtt_url, fed.service.config.mqtt_topic_prefix)
    started = time.monotonic()
    for start in range(0, flood, wave):
        infos = [info for i in range(start, start + wave)
                 for info in intruder.publish(intruder.topics.status(f"ghost{i}"), b"online")]
        assert intruder.wait_published(infos)
        wait_until(lambda: fed.service.refusals["unknown_sender"] >= before + start + wave, 30,
                   "every invented presence refused")
    elapsed = time.monotonic() - started
    intruder.close()

    assert fed.service.refusals["unknown_sender"] == before + flood
    assert set(fed.service.telemetry.online) == enrolled(fed)
    fed.service.telemetry.persist()
    assert set(fed.service.store.get("online")) == enrolled(fed)
    assert read_status(fed.service.config.store_url)["devices"]["online"] == len(fed.devices)  # was 17612 for 7
    print(f"{flood} invented presences refused in {elapsed:.1f} s; online map {len(fed.service.telemetry.online)}")


def test_the_presence_of_an_enrolled_device_is_taken(federation, mqtt_url):
    fed = federation
    gone = fed.devices[0].id
    intruder = attacker(mqtt_url, fed.service.config.mqtt_topic_prefix)
    assert intruder.wait_published(intruder.publish(intruder.topics.status(gone), b"offline"))
    intruder.close()
    wait_until(lambda: fed.service.telemetry.online.get(gone) is False, 10, "the offline presence taken")
    assert fed.service.telemetry.online == {gone: False, fed.devices[1].id: True}


# ---------------------------------------------------------------------------------------------- traffic
def test_updates_for_invented_rounds_are_refused_stale_round_and_make_no_traffic_rounds(federation):
    fed, invented = federation, 300
    device = fed.devices[0]
    delta = {k: torch.zeros(s) for k, s in fed.service.shapes.items()}
    rounds_before = set(fed.service.telemetry.traffic)
    before = fed.service.refusals["stale_round"]
    for rnd in range(1000, 1000 + invented):
        device.send(device.topics.update(device.id), device.update_envelope(fed.starts[0], delta, round=rnd))
    acks = [UpdateAck.decode(b) for _, b in device.wait_for(MessageType.UPDATE_ACK, invented, timeout=60)]

    assert {(a.accepted, a.reason) for a in acks} == {(False, "stale_round")}
    assert sorted(a.round for a in acks) == list(range(1000, 1000 + invented))  # each told, under its round
    assert fed.service.refusals["stale_round"] == before + invented
    assert set(fed.service.telemetry.traffic) == rounds_before == {0, 1}  # was 4,070 rounds
    fed.service.telemetry.persist()
    assert set(read_status(fed.service.config.store_url)["bytes"]["per_round"]) == {"0", "1"}


# ---------------------------------------------------------------------------------------------- refusal counts
def test_refusal_counts_survive_a_daemon_restart(federation):
    fed = federation
    device = fed.devices[0]
    delta = {k: torch.zeros(s) for k, s in fed.service.shapes.items()}
    for rnd in (50, 51, 52):
        device.send(device.topics.update(device.id), device.update_envelope(fed.starts[0], delta, round=rnd))
    wait_until(lambda: len(device.acks()) == 3, 10, "three refusals")
    counts = fed.service.refusals.counts()
    fed.service.stop()
    fed.service = AggregatorService(fed.service.config).start()  # the same state directory and worker

    assert fed.service.refusals.counts() == counts
    device.send(device.topics.update(device.id), device.update_envelope(fed.starts[0], delta, round=53))
    wait_until(lambda: len(device.acks()) == 4, 10, "a refusal after the restart")
    assert fed.service.refusals["stale_round"] == counts["stale_round"] + 1


def test_workers_sharing_a_store_each_keep_their_counts_and_status_sums_them(tmp_path):
    store = open_store(str(tmp_path / "state.db"))
    workers = {name: Telemetry(store, RefusalCounter(), name) for name in ("agg-w1", "agg-w2")}
    for name, n in (("agg-w1", 3), ("agg-w2", 5)):
        for _ in range(n):
            workers[name].refusals.record(RefusedMessage(Refusal.REPLAYED, "a test's"))
        workers[name].persist()
    workers["agg-w1"].persist()  # a worker persisting again does not overwrite the other's

    assert merged_refusals(store) == {"replayed": 8}
    restarted = Telemetry(store, RefusalCounter(), "agg-w2")
    restarted.restore_refusals()
    assert restarted.refusals.counts() == {"replayed": 5}
    store.close()
    assert read_status(str(tmp_path / "state.db"))["refusals"] == {"replayed": 8}


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("federation", [{"serve_device_rate": 30.0, "serve_device_burst": 4}], indirect=True)
def test_a_flooding_device_is_answered_busy_within_its_rate_while_another_device_is_served(federation):
    fed, flood, n = federation, 200, 2
    flooder, other = fed.devices
    cpu_before, started = cpu_s(), time.monotonic()
    rids = [flooder.request_generation(ENCODING.numpy(), {0: 1.0}, n=n, seed=i) for i in range(flood)]
    images = other.generate(ENCODING.numpy(), {0: 1.0}, n=1, timeout=30)
    results = [flooder.generation_result(rid, timeout=60) for rid in rids]
    elapsed, cpu = time.monotonic() - started, cpu_s() - cpu_before
    served = [r for r in results if r.ok]
    busy = [r for r in results if not r.ok]

    assert images.shape[0] == 1
    assert {RequestRefused.from_reply(r.reason).reason for r in busy} == {Refusal.BUSY}
    assert len(served) * n <= 4 + 30.0 * elapsed / 60  # the burst, then 30 images a minute
    assert len(busy) >= flood - (4 + 30.0 * elapsed / 60) / n
    assert fed.service.refusals["busy"] == len(busy)
    print(f"flood of {flood} x {n} images in {elapsed:.1f} s: {len(served)} served, {len(busy)} busy, "
          f"{cpu:.1f} CPU-s in the test process, queue high-water {fed.service.generation.service.high_water}")


@pytest.mark.parametrize("federation", [{"n": 4, "serve_max_queue": 8, "serve_device_rate": None}], indirect=True)
def test_the_generation_queue_never_holds_more_than_its_bound(federation):
    fed, each, n = federation, 30, 2
    service = fed.service.generation.service
    sent = {d.id: [d.request_generation(ENCODING.numpy(), {0: 1.0}, n=n, seed=i) for i in range(each)]
            for d in fed.devices}
    results = [d.generation_result(rid, timeout=120) for d in fed.devices for rid in sent[d.id]]
    busy = [r for r in results if not r.ok]

    assert 0 < service.high_water <= 8
    assert busy and {RequestRefused.from_reply(r.reason).reason for r in busy} == {Refusal.BUSY}
    assert sum(1 for r in results if r.ok) * n == sum(service.batches)  # every image sampled was asked for
    print(f"{len(results)} requests of {n} images: queue high-water {service.high_water} (bound 8), "
          f"{len(busy)} busy, {len(service.batches)} sampling calls")


def bad_request(rid: str) -> dict[str, tuple[bytes, str, Refusal]]:
    """Each way a request body can be refused: (sealed body, the request id its answer carries, reason)."""
    def body(encoding=ENCODING, mix=None, n=1) -> bytes:
        return GenerateRequest(rid, pack_tensors({"encoding": encoding}), mix or {"0": 1.0}, n, 0).encode()

    return {"encoding shape": (body(encoding=torch.zeros(5)), rid, Refusal.BAD_TENSORS),
            "mix keys": (body(mix={"zero": 1.0}), rid, Refusal.MALFORMED),
            "mix weights": (body(mix={"0": 99.0}), rid, Refusal.MALFORMED),
            "no images": (body(n=0), rid, Refusal.MALFORMED),
            "too many images": (body(n=17), rid, Refusal.MALFORMED),
            "unknown cluster": (body(mix={"9": 1.0}), rid, Refusal.MALFORMED),
            "undecodable body": (b"\xc1 not msgpack", "", Refusal.MALFORMED)}


@pytest.fixture(scope="module")
def generation_service(tmp_path_factory, mqtt_url):
    """One daemon for the request kinds below: each only reads how one request is answered."""
    fed = Federation(tmp_path_factory.mktemp("generation"), mqtt_url, n=2)
    fed.service.generation.service.steps = 4
    yield fed
    fed.close()


@pytest.mark.parametrize("kind", list(bad_request("")))
def test_each_bad_generation_request_is_answered_with_its_reason(generation_service, kind):
    device = generation_service.devices[0]
    rid = uuid.uuid4().hex
    sealed, answered_id, reason = bad_request(rid)[kind]
    device.send_sealed_request(sealed)
    result = device.generation_result(rid, timeout=5)  # answered, not left to the device's timeout

    assert (result.request_id, result.ok) == (answered_id, False)
    assert RequestRefused.from_reply(result.reason).reason is reason


def test_a_request_sealed_to_another_key_is_answered_tampered_with_no_id(generation_service):
    device = generation_service.devices[0]
    device.send(device.topics.generate(device.id), device.writer.build(MessageType.GENERATE_REQUEST, b"\x00" * 80))
    result = device.generation_result("unreadable", timeout=5)  # answered, not left to the device's timeout

    assert (result.request_id, result.ok) == ("", False)
    assert RequestRefused.from_reply(result.reason).reason is Refusal.TAMPERED


class SamplingFails:
    """The daemon's global model, except that sampling raises (as running out of memory would)."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def sample(self, *args, **kwargs):
        raise RuntimeError("out of memory")


def test_a_failed_sampling_call_is_answered_unavailable(federation):
    fed = federation
    fed.service.generation.service.model = SamplingFails(fed.service.global_model)
    with pytest.raises(RequestRefused) as refused:
        fed.devices[0].generate(ENCODING.numpy(), {0: 1.0}, timeout=10)
    assert refused.value.reason is Refusal.UNAVAILABLE and "RuntimeError" in refused.value.detail
    assert fed.service.refusals["unavailable"] == 1


# ---------------------------------------------------------------------------------------------- updates and status
def test_an_update_that_does_not_open_is_answered_tampered(federation):
    fed = federation
    device = fed.devices[0]
    device.send(device.topics.update(device.id), device.writer.build(MessageType.UPDATE, b"\x00" * 80, 1))
    (ack,) = fed.acks(0)
    assert (ack.round, ack.accepted, ack.reason) == (1, False, "tampered")


def test_a_device_status_refused_after_authentication_is_answered(federation):
    fed = federation
    device = fed.devices[0]
    sealed = device.identity.encrypt_to(device.aggregator.box_key, DeviceStatus("reboot", 1).encode())
    device.send(device.topics.device_status(device.id), device.writer.build(MessageType.STATUS, sealed, 1))
    (ack,) = fed.acks(0)
    assert (ack.round, ack.accepted, ack.reason) == (1, False, "malformed")  # a status is answered as its round


# ---------------------------------------------------------------------------------------------- on the device
def test_generate_remote_raises_a_refusal_at_once_and_busy_is_distinguishable(tmp_path, mqtt_url):
    from edge_sdk.client import EdgeClient, LocalData
    from edge_sdk.config import DeviceConfig
    from edge_sdk.session import FederatedSession
    from tests.test_service import make_service

    prefix = f"sec{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, expected_devices=None, mqtt_topic_prefix=prefix,
                           serve_device_rate=1.0, serve_device_burst=1)
    service.generation.service.steps = 4
    service.global_model.set_cluster(0, service.initial, 0)  # a cluster to sample from, without a round
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", device_id=f"dev-{prefix}", profile="simulator",
                                     enrolment_token="fedaigc-demo-token",
                                     aggregator_fingerprint=service.identity.public.fingerprint))
    session = FederatedSession(client, LocalData(torch.rand(1, 1, 16, 16), ["a 7"]),
                               MqttConfig(url=mqtt_url, topic_prefix=prefix))
    try:
        session.start()
        assert session.enrolled.wait(30)
        assert session.generate_remote("a bold 7", {0: 1.0}, n=1).shape[0] == 1  # the burst
        for n, reason in ((1, Refusal.BUSY), (17, Refusal.MALFORMED)):
            with pytest.raises(RequestRefused) as refused:  # answered: no TimeoutError
                session.generate_remote("a bold 7", {0: 1.0}, n=n, timeout=30)
            assert refused.value.reason is reason
    finally:
        session.stop()
        service.stop()


# ---------------------------------------------------------------------------------------------- the maths
def test_a_token_bucket_gives_its_burst_then_its_rate_per_device():
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=4, clock=lambda: now[0])
    assert buckets.take("a", 4) and not buckets.take("a", 1)  # the burst, then nothing
    now[0] = 1.5
    assert buckets.take("a", 1) and not buckets.take("a", 1)  # 1 a second, half a token left
    now[0] = 1000.0
    assert buckets.take("a", 4) and not buckets.take("a", 0.5)  # a quiet spell saves up the burst, no more
    assert buckets.take("b", 4)  # another device has its own bucket
    assert not buckets.take("c", 5)  # more than the burst is never granted, nothing spent
    assert buckets.take("c", 4)
