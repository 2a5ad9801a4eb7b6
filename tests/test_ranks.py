"""Devices of different LoRA ranks in one cluster, over the real broker: each trains and receives its own rank,
and the cluster's adapter is the exact ΔW mean of theirs (at the fleet's rank) before it is split."""

import uuid

import msgpack
import numpy as np
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.rank_split import SvdSplit
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice, start_adapter
from aggregator.status import read_status, render_status
from edge_sdk import SHARED, DeviceConfig, EdgeClient, LocalData
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.errors import RefusedMessage
from edge_sdk.protocol.messages import SEEDED_CODEC, Enrol, EnrolAck
from edge_sdk.protocol.tensors import unpack_tensors
from edge_sdk.session import FederatedSession
from edge_sdk.transport import MqttConfig
from models.digits.data import make_personas
from models.lora import delta_weight, get_adapter_state, lora_modules, lora_scale
from models.lora_ranks import shapes_at_rank
from tests.polling import wait_until

FLEET_RANK = 4
DATA = LocalData.from_persona(make_personas(1, 1, seed=0)[0])


def service(tmp_path, mqtt_url, **kwargs) -> AggregatorService:
    cfg = AggregatorConfig(**({"aggregator_id": f"agg-{uuid.uuid4().hex[:6]}", "mqtt_url": mqtt_url,
                               "state_dir": tmp_path / "agg", "expected_devices": 3, "rounds": 2, "local_steps": 2,
                               "round_timeout_s": 120, "clustering": "single", "interaction": False, "clip": None,
                               "lora": {"r": FLEET_RANK, "lora_alpha": FLEET_RANK}, "tokens": (DEMO_TOKEN,)} | kwargs))
    return AggregatorService(cfg).start()


class RecordingClient(EdgeClient):
    """An EdgeClient that keeps the shared adapter each of its rounds trained (by the version it started from)."""

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.trained: dict[int, dict[str, torch.Tensor]] = {}

    def train_round(self, *args, **kwargs):
        update = super().train_round(*args, **kwargs)
        self.trained[update.base_version] = get_adapter_state(self.unet, SHARED)
        return update


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, mqtt_url):
    """Three SDK devices of max_lora_rank 1, 2 and 4 in a rank-4 fleet, two rounds, one cluster."""
    tmp = tmp_path_factory.mktemp("ranks")
    prefix = f"ranks-{uuid.uuid4().hex[:6]}"  # its own topics: it runs beside the other tests' aggregators
    agg = service(tmp, mqtt_url, mqtt_topic_prefix=prefix)
    clients = {rank: RecordingClient(DeviceConfig(
        data_dir=tmp / f"dev{rank}", device_id=f"rank{rank}-{uuid.uuid4().hex[:6]}", profile="simulator",
        max_lora_rank=rank, personalization="none", enrolment_token=DEMO_TOKEN, seed=rank,
        aggregator_fingerprint=agg.identity.public.fingerprint)) for rank in (1, 2, 4)}
    sessions = {rank: FederatedSession(c, DATA, MqttConfig(url=mqtt_url, topic_prefix=prefix))
                for rank, c in clients.items()}
    try:
        for s in sessions.values():
            s.start()
        assert all(s.finished.wait(240) for s in sessions.values())
        wait_until(agg.done.is_set, timeout=60)
        (cid, (_, blob, version)), = agg.store.clusters().items()
        final = unpack_tensors(blob, agg.shapes)
        yield agg, clients, sessions, final, version
    finally:
        for s in sessions.values():
            s.stop()
        agg.stop()


@pytest.mark.slow
def test_each_device_trains_and_holds_its_own_rank(mixed):
    agg, clients, sessions, final, _ = mixed
    assert {agg.rounds.rank_of(c.device_id) for c in clients.values()} == {1, 2, 4}
    for rank, client in clients.items():
        assert client.unet.peft_config[SHARED].r == rank
        assert set(client.trained) == {0, 1}  # both rounds trained, from versions 0 and 1
        assert all(t["conv_in.lora_A.weight"].shape[0] == rank for t in client.trained.values())
        assert [r.accepted for r in sessions[rank].rounds] == [True, True]


@pytest.mark.slow
def test_the_cluster_adapter_is_the_exact_delta_w_mean_at_the_fleets_rank(mixed):
    agg, clients, _, final, version = mixed
    assert version == 2 and final["conv_in.lora_A.weight"].shape[0] == FLEET_RANK
    scale = lora_scale(agg.config.lora)  # every rank keeps the fleet's scale
    for module in lora_modules(final):
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        mean = sum(delta_weight(c.trained[1][ka], c.trained[1][kb], scale) for c in clients.values()) / len(clients)
        u, s, vh = torch.linalg.svd(mean, full_matrices=False)  # 1 + 2 + 4 > 4: the best rank-4 approximation
        best = u[:, :FLEET_RANK] @ torch.diag(s[:FLEET_RANK]) @ vh[:FLEET_RANK]
        assert torch.allclose(delta_weight(final[ka], final[kb], scale), best, atol=1e-6 + 1e-4 * float(s[0])), module


@pytest.mark.slow
def test_each_device_receives_the_cluster_adapter_split_to_its_rank(mixed):
    agg, clients, sessions, final, _ = mixed
    for rank, client in clients.items():
        expected = SvdSplit().split(final, rank, lora_scale(agg.config.lora))
        held = get_adapter_state(client.unet, SHARED)
        assert sessions[rank].held[1] == 2
        for k, v in expected.items():
            assert torch.allclose(held[k], v, atol=1e-6), (rank, k)


@pytest.mark.slow
def test_status_reports_the_ranks_and_the_aggregates_spectrum(mixed):
    agg, *_ = mixed
    status = read_status(agg.config.store_url)
    assert status["ranks"] == {"1": 1, "2": 1}  # the rank-4 device enrolled at the fleet's rank
    shares = status["spectrum"]["0"]["shares"]
    assert status["spectrum"]["0"]["round"] == 2 and len(shares) == FLEET_RANK
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert "spectrum cluster 0 (round 2): " in render_status(status)


def test_a_rank_above_the_fleets_is_refused_with_the_reason(tmp_path, mqtt_url):
    agg = service(tmp_path, mqtt_url, expected_devices=1)
    device = LiteDevice(mqtt_url).start()
    try:
        device.enrol(lora_rank=FLEET_RANK + 1)
        (_, body), = device.wait_for(MessageType.ENROL_ACK)
        ack = EnrolAck.decode(body)
        assert not ack.accepted and ack.reason.startswith("rank_above_fleet: ")
        assert f"LoRA rank {FLEET_RANK + 1}, above the fleet's maximum {FLEET_RANK}" in ack.reason
        wait_until(lambda: agg.refusals["rank_above_fleet"] == 1)
        assert agg.store.device(device.id) is None
    finally:
        device.stop()
        agg.stop()


def test_a_lower_rank_device_draws_its_seeded_start_and_gets_deltas_at_its_rank(tmp_path, mqtt_url):
    agg = service(tmp_path, mqtt_url, expected_devices=2)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    try:
        vector = np.random.default_rng(0).normal(size=384)
        for d, rank in zip(devices, (1, 0)):
            d.join(vector, lora_rank=rank)
        low, full = (d.round_start() for d in devices)
        assert (low.lora["r"], full.lora["r"]) == (1, FLEET_RANK) and low.codec == full.codec == SEEDED_CODEC
        shapes = shapes_at_rank(agg.shapes, 1)
        start = start_adapter(low, shapes)  # drawn from the seed at rank 1, digest checked
        assert {k: tuple(v.shape) for k, v in start.items()} == shapes
        g = torch.Generator().manual_seed(0)
        for d, s, layout in ((devices[0], low, shapes), (devices[1], full, agg.shapes)):
            d.send(d.topics.update(d.id), d.update_envelope(s, {k: torch.randn(v, generator=g) * 0.01
                                                                for k, v in layout.items()}))
        devices[0].wait_for(MessageType.ROUND_START, count=2)
        nxt = devices[0].round_start(index=-1)
        assert nxt.round == 2 and nxt.lora["r"] == 1
        assert (nxt.base_cluster, nxt.base_version) == (low.cluster, low.version)  # a delta against its own copy
    finally:
        for d in devices:
            d.stop()
        agg.stop()


def test_an_enrolment_stays_readable_across_versions():
    fields = {"token": "t", "verify_key": b"v" * 32, "box_key": b"b" * 32, "profile": "simulator", "model": "m"}
    assert Enrol.decode(msgpack.packb(fields, use_bin_type=True)).lora_rank == 0  # an older device: the fleet's rank
    assert set(msgpack.unpackb(Enrol(*fields.values()).encode())) == set(fields)  # what an older aggregator reads
    assert Enrol.decode(Enrol(*fields.values(), lora_rank=2).encode()).lora_rank == 2
    with pytest.raises(RefusedMessage, match="lora_rank = -1"):
        Enrol.decode(msgpack.packb(fields | {"lora_rank": -1}, use_bin_type=True))
    with pytest.raises(RefusedMessage, match="fields"):
        Enrol.decode(msgpack.packb(fields | {"rank": 2}, use_bin_type=True))
