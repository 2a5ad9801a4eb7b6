"""Two tiers over real brokers: each edge site has its own, the cloud has another.

Two edge aggregators each serve two devices of the same task; the cloud mixes their
clusters, so each edge's next adapter carries what the other site learned, while only
cluster adapters cross the wide-area link.
"""

import uuid

import numpy as np
import pytest
import torch

from aggregator.broker import EmbeddedBroker, free_port
from aggregator.config import AggregatorConfig
from aggregator.hierarchy import CloudAggregator
from aggregator.provisioning import provision_device
from aggregator.rules import ClientUpdate
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.tensors import unpack_tensors
from edge_sdk.transport import MqttConfig, MqttTransport
from models.lora import delta_weight, lora_config, lora_modules, lora_scale
from tests.polling import wait_until


@pytest.fixture
def sites(tmp_path):
    """A cloud broker + cloud aggregator, two edge sites (broker, edge aggregator, 2 devices each)."""
    brokers = [EmbeddedBroker(port=free_port(), kind="mosquitto").start() for _ in range(3)]
    cloud_url = brokers[0].url
    cloud = CloudAggregator(AggregatorConfig(aggregator_id="cloud", role="cloud", mqtt_url=cloud_url,
                                             state_dir=tmp_path / "cloud", expected_edges=2, borrow=2.0,
                                             interaction=True)).start()
    edges, devices = [], []
    vector = np.random.default_rng(0).normal(size=384)
    for i, broker in enumerate(brokers[1:]):
        edge_id = f"edge{i}-{uuid.uuid4().hex[:4]}"
        bundle = provision_device(cloud.store, cloud.identity, cloud.config, edge_id)  # as `fedaigc provision` does
        edges.append(AggregatorService(AggregatorConfig(
            aggregator_id=edge_id, role="edge", mqtt_url=broker.url, cloud_url=cloud_url,
            cloud_token=bundle.token, cloud_fingerprint=bundle.aggregator_fingerprint, tokens=(DEMO_TOKEN,),
            state_dir=tmp_path / f"edge{i}", expected_devices=2, rounds=2, round_timeout_s=60,
            refine_after_round=0, cloud_timeout_s=30)).start())
        for _ in range(2):
            d = LiteDevice(broker.url).start()
            d.join(vector)
            devices.append((i, d))
    wait_until(lambda: all(e.cloud.enrolled.is_set() for e in edges))
    yield cloud, edges, devices
    for _, d in devices:
        d.stop()
    for e in edges:
        e.stop()
    cloud.stop()
    for b in brokers:
        b.close()


def delta_w(adapter):
    spec = lora_config()
    return torch.cat([delta_weight(adapter[f"{m}.lora_A.weight"], adapter[f"{m}.lora_B.weight"], lora_scale(spec)).flatten()
                      for m in lora_modules(adapter)])


def run_round_one(edges, devices):
    # one task at both sites: a shared direction, plus each site's own (what it saw that the other did not)
    shared = torch.Generator().manual_seed(100)
    common = {k: torch.randn(shape, generator=shared) * 0.05 for k, shape in edges[0].shapes.items()}
    for i, d in devices:
        start = d.round_start()
        g = torch.Generator().manual_seed(i)
        delta = {k: common[k] + torch.randn(shape, generator=g) * 0.03 for k, shape in edges[i].shapes.items()}
        d.send(d.topics.update(d.id), d.update_envelope(start, delta))
    wait_until(lambda: all(e.current_round() == 2 for e in edges), timeout=60)


def test_each_edge_learns_from_the_other_site_through_the_cloud(sites):
    cloud, edges, devices = sites
    run_round_one(edges, devices)
    summaries = [{cid: s for r, cid, s in e.store.round_summaries() if r == 1} for e in edges]
    assert all(len(s) == 1 for s in summaries)
    own = [delta_w(edges[i].rounds.cluster_adapter(next(iter(summaries[i])))[0]) for i in range(2)]
    # what each edge would have had alone: its rule over its own devices' updates
    alone = []
    for e in edges:
        cid = next(iter(e.membership.centroid))
        ups = [ClientUpdate.from_delta(r.device_id, e.initial, unpack_tensors(r.delta, e.shapes), r.samples)
               for r in e.store.updates(1, cid)]
        alone.append(delta_w(e.rounds.rule.aggregate(e.initial, ups, e.rounds.lora).adapter))
    cos = torch.nn.functional.cosine_similarity
    for i in range(2):
        assert cos(own[i], alone[1 - i], dim=0) > cos(alone[i], alone[1 - i], dim=0) + 0.1
    assert cloud.mixed_rounds == [1]


def test_only_cluster_adapters_cross_the_wide_area_link(sites):
    cloud, edges, devices = sites
    run_round_one(edges, devices)
    wan_up = sum(v["up"] for v in cloud.traffic[1].values())
    device_up = sum(v["up"] for e in edges for v in e.telemetry.traffic[1].values())
    # one report per edge (one cluster each) against one update per device (two per edge)
    assert set(cloud.traffic[1]) == {e.config.aggregator_id for e in edges}
    assert wan_up < 0.6 * device_up
    assert not any(d.id in cloud.traffic.get(1, {}) for _, d in devices)


def test_an_unenrolled_edge_report_is_refused(sites):
    cloud, edges, devices = sites
    intruder = Identity.generate()
    t = MqttTransport(MqttConfig(url=cloud.config.mqtt_url, client_id="intruder")).connect()
    try:
        env = EnvelopeWriter(intruder, "rogue-edge").build(MessageType.EDGE_REPORT, b"\x00" * 64, 1)
        before = cloud.refusals["unknown_sender"]
        t.wait_published(t.publish(t.topics.cloud_up("rogue-edge"), env))
        wait_until(lambda: cloud.refusals["unknown_sender"] > before)
    finally:
        t.close()
