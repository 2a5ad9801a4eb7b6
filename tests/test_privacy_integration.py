"""Privacy in the SDK and the aggregator: what a device seals, what it reports, what status shows."""

import json
import math
import uuid

import numpy as np
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from aggregator.status import read_status, render_status
from edge_sdk import SHARED, DeviceConfig, EdgeClient, LocalData, Update
from edge_sdk.privacy import DPConfig, PrivacyAccountant, PrivacyLedger, fleet_rotation
from edge_sdk.protocol.codecs import decode_payload
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import UpdateBody
from edge_sdk.protocol.tensors import shapes_of, unpack_tensors
from edge_sdk.session import FederatedSession
from edge_sdk.transport import MqttConfig
from models.digits.data import make_personas
from models.lora import get_adapter_state
from tests.polling import wait_until

AGGREGATOR = Identity.generate()
PERSONA = make_personas(1, 1, seed=0)[0]
DATA = LocalData.from_persona(PERSONA)
SECRET = bytes(range(100, 132))


def device(path, **overrides):
    c = EdgeClient(DeviceConfig(**({"data_dir": path, "profile": "simulator", "personalization": "none",
                                    "seed": 3} | overrides)))
    c.set_aggregator(AGGREGATOR.public)
    return c


def opened(client, sealed) -> tuple[UpdateBody, dict[str, torch.Tensor]]:
    """The update as the aggregator sees it."""
    body = UpdateBody.decode(AGGREGATOR.decrypt_from(client.identity.public.box_key, sealed))
    return body, decode_payload(body.codec, body.tensors, shapes_of(get_adapter_state(client.unet, SHARED)))


def flat(delta) -> torch.Tensor:
    return torch.cat([delta[k].double().flatten() for k in sorted(delta)])


# ------------------------------------------------------------------ updates


def test_with_dp_on_the_sealed_delta_is_clipped_then_noised(tmp_path):
    raw = device(tmp_path / "raw").train_round(None, DATA, steps=2)
    norm = float(flat(raw.delta).norm())
    clip = norm / 4  # small enough that clipping must bite
    clipper = device(tmp_path / "clip", update_dp=DPConfig(clip, 0.0))
    noiser = device(tmp_path / "noise", update_dp=DPConfig(clip, 1.0))
    clipped_body, clipped = opened(clipper, clipper.seal_update(clipper.train_round(None, DATA, 2)))
    noised_body, noised = opened(noiser, noiser.seal_update(noiser.train_round(None, DATA, 2)))

    # same seed, same data: the three devices train the same raw delta, so the sealed ones differ only by DP
    c = flat(clipped)
    assert float(c.norm()) <= clip
    assert torch.allclose(c, flat(raw.delta) * (clip / norm), atol=1e-6)
    residual = flat(noised) - c
    assert float(residual.std()) == pytest.approx(1.0 * clip, rel=0.05)  # N(0, (z C)^2) per coordinate
    assert abs(float(residual.mean())) < 0.05 * clip
    assert math.isinf(clipped_body.epsilon)  # clipping alone bounds nothing
    assert 0 < noised_body.epsilon < math.inf and noised_body.dp_delta == 1e-5


def test_with_dp_on_a_hand_made_update_is_never_sealed(tmp_path):
    c = device(tmp_path / "d", update_dp=DPConfig(0.1, 1.0))
    raw = Update({"w": torch.ones(3)}, 10, 1, 1.0, 0.5, 0)  # not from train_round: unclipped, no epsilon
    with pytest.raises(ValueError, match="not privatized"):
        c.seal_update(raw)


def test_reported_epsilon_grows_with_rounds_and_survives_a_restart(tmp_path):
    dp = DPConfig(0.05, 2.0, delta=1e-6)
    c = device(tmp_path / "d", update_dp=dp)
    reported = []
    for _ in range(3):
        body, _ = opened(c, c.seal_update(c.train_round(None, DATA, steps=1)))
        reported.append(body.epsilon)
        assert body.dp_delta == 1e-6
    reference = PrivacyAccountant(delta=1e-6)
    assert reported == pytest.approx([reference.step(dp) for _ in range(3)])
    assert reported[0] < reported[1] < reported[2]

    again = device(tmp_path / "d", update_dp=dp)  # a restarted device keeps counting
    assert again.privacy.rounds == 3
    assert again.train_round(None, DATA, steps=1).epsilon == pytest.approx(reference.step(dp))
    state = json.loads((tmp_path / "d" / "privacy.json").read_text())
    assert sum(n for _, _, n in state["accountant"]["history"]) == 4


def test_an_update_sent_without_dp_voids_the_bound(tmp_path):
    plain = device(tmp_path / "d")
    body, _ = opened(plain, plain.seal_update(plain.train_round(None, DATA, steps=1)))
    assert (body.epsilon, body.dp_delta) == (-1.0, 0.0)
    later = device(tmp_path / "d", update_dp=DPConfig(0.05, 2.0))  # DP switched on afterwards
    assert math.isinf(later.train_round(None, DATA, steps=1).epsilon)
    assert PrivacyLedger(tmp_path / "d" / "privacy.json").unprotected == 1


# ------------------------------------------------------------------ task vectors


def task_of(client, prompts) -> np.ndarray:
    sealed = client.task_payload(prompts)
    return unpack_tensors(AGGREGATOR.open_sealed(sealed), {"task": (384,)})["task"].double().numpy()


def test_rotated_noisy_task_payload_opens_at_the_aggregator_with_unit_norm(tmp_path):
    prompts = list(PERSONA.train_prompts)
    other = list(make_personas(2, 2, seed=5)[1].train_prompts)
    plain = device(tmp_path / "d", task_noise=0.6)
    v, w = task_of(plain, prompts), task_of(plain, other)
    rotated = device(tmp_path / "d", task_noise=0.6, fleet_secret=SECRET)  # same device key: same noise draws
    rv, rw = task_of(rotated, prompts), task_of(rotated, other)
    assert np.linalg.norm(rv) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(rv, fleet_rotation(SECRET) @ v, atol=1e-5)
    assert float(rv @ rw) == pytest.approx(float(v @ w), abs=1e-5)  # what clustering uses is unchanged
    assert float(rv @ v) < 0.5  # ... while the public-encoder direction is gone
    assert np.array_equal(task_of(rotated, prompts), rv)  # a re-send is an exact copy: no averaging the noise away
    assert float(task_of(device(tmp_path / "e", task_noise=0.6), prompts) @ v) < 0.99  # another device, other draws


def test_task_vector_averages_the_configured_number_of_prompts(tmp_path):
    c = device(tmp_path / "d", task_noise=0.0, task_prompt_count=1)
    v = task_of(c, list(PERSONA.train_prompts))
    encodings = c.encode(sorted(set(PERSONA.train_prompts))).astype(np.float64)
    encodings /= np.linalg.norm(encodings, axis=1, keepdims=True)
    assert np.max(encodings @ v) == pytest.approx(1.0, abs=1e-5)  # exactly one of the prompts


@pytest.mark.parametrize("bad", [{"fleet_secret": b"short"}, {"fleet_secret": "x" * 32}, {"task_prompt_count": 0},
                                 {"update_dp": {"clip_norm": -1.0, "noise_multiplier": 1.0}}, {"update_dp": 1.0},
                                 {"task_noise": float("inf")}])
def test_invalid_privacy_settings_fail_at_construction(tmp_path, bad):
    with pytest.raises(ValueError):
        DeviceConfig(data_dir=tmp_path, **bad)


def test_privacy_settings_have_the_benchmarked_defaults(tmp_path):
    cfg = DeviceConfig(data_dir=tmp_path, update_dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    assert cfg.update_dp == DPConfig(0.5, 1.0)
    default = DeviceConfig(data_dir=tmp_path, fleet_secret=SECRET)
    assert (default.task_noise, default.task_prompt_count) == (0.6, None)
    assert SECRET.hex() not in repr(default) and str(list(SECRET)) not in repr(default)
    assert DeviceConfig(data_dir=tmp_path).fleet_secret is None and DeviceConfig(data_dir=tmp_path).update_dp is None


# ------------------------------------------------------------------ the aggregator


def service(tmp_path, mqtt_url, **kwargs):
    cfg = AggregatorConfig(**({"aggregator_id": f"agg-{uuid.uuid4().hex[:6]}", "mqtt_url": mqtt_url,
                               "state_dir": tmp_path / "agg", "expected_devices": 2, "rounds": 2,
                               "round_timeout_s": 60, "refine_after_round": 0, "tokens": (DEMO_TOKEN,)} | kwargs))
    return AggregatorService(cfg).start()


def test_the_aggregator_records_each_devices_epsilon_per_round(tmp_path, mqtt_url):
    agg = service(tmp_path, mqtt_url)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    try:
        v = np.random.default_rng(0).normal(size=384)
        for d in devices:
            d.join(v)
        starts = [d.round_start() for d in devices]
        delta = {k: torch.zeros(s) for k, s in agg.shapes.items()}
        dp, off = devices
        before = agg.refusals["malformed"]
        dp.send(dp.topics.update(dp.id), dp.update_envelope(starts[0], delta, epsilon=float("nan"), dp_delta=1e-5))
        wait_until(lambda: agg.refusals["malformed"] > before, timeout=60)
        dp.send(dp.topics.update(dp.id), dp.update_envelope(starts[0], delta, epsilon=1.5, dp_delta=1e-5))
        off.send(off.topics.update(off.id), off.update_envelope(starts[1], delta))
        wait_until(lambda: agg.current_round() == 2, timeout=60)
        for d in devices:
            d.wait_for(MessageType.ROUND_START, count=2)
        starts = [d.round_start(index=-1) for d in devices]
        assert [s.round for s in starts] == [2, 2]
        dp.send(dp.topics.update(dp.id), dp.update_envelope(starts[0], delta, epsilon=math.inf, dp_delta=1e-5))
        off.send(off.topics.update(off.id), off.update_envelope(starts[1], delta, epsilon=2.25, dp_delta=1e-5))
        wait_until(agg.done.is_set, timeout=60)
        recorded = agg.store.get("privacy")
        assert recorded == {"1": {dp.id: {"epsilon": 1.5, "delta": 1e-5}, off.id: {"epsilon": -1.0, "delta": 0.0}},
                            "2": {dp.id: {"epsilon": None, "delta": 1e-5}, off.id: {"epsilon": 2.25, "delta": 1e-5}}}
    finally:
        for d in devices:
            d.stop()
        agg.stop()
    status = read_status(agg.config.store_url)
    assert status["privacy"] == recorded
    text = render_status(status)
    assert "privacy round 1: epsilon 1.50 at delta 1e-05 (1 device); 1 without DP" in text
    assert "privacy round 2: epsilon 2.25 at delta 1e-05 (1 device); epsilon inf (1 device: no finite bound)" in text
    again = AggregatorService(agg.config)  # a restart keeps the record
    try:
        again.recover()
        assert again.telemetry.privacy == {int(r): v for r, v in recorded.items()}
    finally:
        again.store.close()
    worker = AggregatorService(agg.config)  # a scale-out worker that saw other devices merges, never overwrites
    try:
        worker.telemetry.privacy = {2: {"dev-x": {"epsilon": 0.5, "delta": 1e-5}}}
        worker.telemetry.persist()
        merged = worker.store.get("privacy")
        assert merged["1"] == recorded["1"] and merged["2"] == recorded["2"] | worker.telemetry.privacy[2]
    finally:
        worker.store.close()


def test_a_dp_device_reports_its_spent_epsilon_through_a_real_federation(tmp_path, mqtt_url):
    """EdgeClient + FederatedSession over the broker: clipped, noised, accounted, shown by ``fedaigc status``."""
    dp = DPConfig(0.05, 2.0)
    agg = service(tmp_path, mqtt_url, expected_devices=1, clustering="single", local_steps=1, interaction=False)
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", device_id=f"dev-{uuid.uuid4().hex[:8]}",
                                     profile="simulator", personalization="none", enrolment_token=DEMO_TOKEN,
                                     aggregator_fingerprint=agg.identity.public.fingerprint, update_dp=dp,
                                     fleet_secret=SECRET))
    session = FederatedSession(client, DATA, MqttConfig(url=mqtt_url))
    try:
        session.start()
        assert session.finished.wait(120)
        wait_until(agg.done.is_set, timeout=60)
    finally:
        session.stop()
        agg.stop()
    reference = PrivacyAccountant()
    expected = [reference.step(dp) for _ in range(2)]
    recorded = read_status(agg.config.store_url)["privacy"]
    assert [recorded[r][client.device_id]["epsilon"] for r in ("1", "2")] == pytest.approx(expected)
    assert client.privacy.epsilon() == pytest.approx(expected[-1])
    assert f"privacy round 2: epsilon {expected[-1]:.2f} at delta 1e-05 (1 device)" in render_status(
        read_status(agg.config.store_url))
