"""Hybrid inference: a sampling run split between the aggregator (first k steps) and the device (the rest)."""

import time
import uuid

import msgpack
import pytest
import torch

from aggregator.simulation.lite import DEMO_TOKEN
from edge_sdk import SHARED, DeviceConfig, EdgeClient, FederatedSession, LocalData, MqttConfig
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.messages import MAX_SAMPLING_STEPS, GenerateRequest
from models.backend import load_backend
from models.digits.unet import BASE_MODEL_DIR
from models.lora import get_adapter_state
from tests.test_service import make_service


@pytest.fixture(scope="module", params=["digits", "stable-diffusion"])
def backend(request, tiny_sd):
    return load_backend(BASE_MODEL_DIR if request.param == "digits" else tiny_sd)


def conditioning(backend, n=3):
    return torch.randn((n, *backend.conditioning_shape), generator=torch.Generator().manual_seed(1))


def test_running_steps_from_zero_to_the_end_is_sample_bit_for_bit(backend):
    cond = conditioning(backend)
    assert torch.equal(backend.sample(cond, steps=6, seed=3, start=0, stop=6), backend.sample(cond, steps=6, seed=3))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_run_split_at_k_with_the_same_weights_equals_the_unsplit_run(backend, k):
    cond = conditioning(backend)
    first = backend.sample(cond, steps=6, seed=3, stop=k)
    split = backend.sample(cond, steps=6, seed=3, start=k, noise=first)
    torch.testing.assert_close(split, backend.sample(cond, steps=6, seed=3), rtol=0, atol=1e-6)


def test_a_sampler_that_carries_state_between_steps_refuses_a_split(backend):
    with pytest.raises(ValueError, match="cannot run part of a schedule"):
        backend.sample(conditioning(backend), steps=6, sampler="dpm", stop=3)


# ---------------------------------------------------------------------------------------------- over the broker
@pytest.fixture
def hybrid(tmp_path, mqtt_url):
    """An aggregator whose cluster 0 holds the device's own (untrained) shared adapter, and an enrolled device
    in cluster 0: both sides run the same weights, so a split run can be compared with an unsplit one."""
    prefix = f"hy{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, expected_devices=None, mqtt_topic_prefix=prefix)
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", device_id=f"dev-{prefix}", profile="simulator",
                                     enrolment_token=DEMO_TOKEN, quantization="none",
                                     aggregator_fingerprint=service.identity.public.fingerprint))
    service.global_model.set_cluster(0, get_adapter_state(client.unet, SHARED), 0)
    session = FederatedSession(client, LocalData(torch.rand(1, 1, 16, 16), ["a 7"]),
                               MqttConfig(url=mqtt_url, topic_prefix=prefix))
    session.start()
    assert session.enrolled.wait(30)
    session.cluster = 0
    yield service, client, session
    session.stop()
    service.stop()


def test_all_server_steps_equal_the_servers_own_sampling(hybrid):
    service, client, _ = hybrid
    images = client.generate("a bold 7", n=2, seed=5, steps=4, server_steps=4, guidance_scale=2.0)
    assert client.last_generation.mode == "hybrid"
    served = service.global_model.generate(client.conditioning(["a bold 7"] * 2), {0: 1.0}, seed=5, steps=4,
                                           guidance_scale=service.generation.service.guidance_scale)
    torch.testing.assert_close(images, served, rtol=0, atol=1e-6)


def test_a_half_split_call_returns_images_and_says_hybrid(hybrid):
    service, client, _ = hybrid
    images = client.generate("a bold 7", n=2, seed=5, steps=4, server_steps=2)
    assert client.last_generation.mode == "hybrid" and client.last_generation.server_steps == 2
    assert images.shape == (2, *client.backend.image_shape)
    torch.testing.assert_close(images, client.generate("a bold 7", n=2, seed=5, steps=4), rtol=0, atol=1e-6)


def test_zero_server_steps_is_local_sampling_bit_for_bit_and_sends_nothing(hybrid):
    service, client, _ = hybrid
    before = list(service.generation.service.batches)
    images = client.generate("a bold 7", n=2, seed=5, steps=4, server_steps=0)
    assert client.last_generation.mode == "local"
    assert torch.equal(images, client.backend.generate(client.conditioning(["a bold 7"] * 2), steps=4, seed=5))
    assert service.generation.service.batches == before


def test_a_silent_server_falls_back_to_local_within_the_timeout_and_says_so(hybrid):
    service, client, _ = hybrid
    service.generation.service.stop()  # the aggregator still takes requests and never answers them
    begun = time.monotonic()
    images = client.generate("a bold 7", n=2, seed=5, steps=4, server_steps=2, timeout=1.0)
    assert time.monotonic() - begun < 10
    assert client.last_generation.mode == "fallback" and "within 1.0 s" in client.last_generation.reason
    assert torch.equal(images, client.generate("a bold 7", n=2, seed=5, steps=4))


def test_samples_of_the_wrong_shape_are_refused_counted_and_sampled_locally(hybrid):
    service, client, session = hybrid
    endpoint = service.generation
    endpoint.service.reply = lambda r, samples, refusal: endpoint._answer(r.device, r.request_id, samples[:, :, :8],
                                                                           refusal, "samples")
    images = client.generate("a bold 7", n=2, seed=5, steps=4, server_steps=2)
    assert client.last_generation.mode == "fallback" and "bad_tensors" in client.last_generation.reason
    assert session.refusals[Refusal.BAD_TENSORS] == 1
    assert torch.equal(images, client.generate("a bold 7", n=2, seed=5, steps=4))


def test_without_a_session_a_hybrid_call_falls_back_and_says_why(tmp_path):
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", profile="simulator"))
    client.generate("a bold 7", n=1, steps=4, server_steps=2)
    assert client.last_generation.mode == "fallback" and "no session" in client.last_generation.reason


@pytest.mark.parametrize("k", [-1, 5])
def test_server_steps_outside_the_schedule_are_refused_on_the_device(tmp_path, k):
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "dev", profile="simulator"))
    with pytest.raises(ValueError, match=r"server_steps must be between 0 and steps \(4\)"):
        client.generate("a bold 7", n=1, steps=4, server_steps=k)


@pytest.mark.parametrize("steps, k", [(4, 5), (4, -1), (MAX_SAMPLING_STEPS + 1, 1)])
def test_a_request_with_bad_steps_is_refused_by_the_server_with_its_reason(steps, k):
    body = msgpack.packb({"request_id": "r", "encoding": b"", "mix": {"0": 1.0}, "n": 1, "seed": 0,
                          "steps": steps, "server_steps": k})
    with pytest.raises(RefusedMessage, match="outside") as refused:
        GenerateRequest.decode(body)
    assert refused.value.reason is Refusal.MALFORMED
