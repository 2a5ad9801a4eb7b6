"""The global multi-adapter model: hybrid styles and the generation service."""

import threading
import time
import uuid

import pytest
import torch

from aggregator.global_model import GlobalModel
from aggregator.serve import GenerationService, Request
from edge_sdk.protocol.errors import RefusedMessage
from models.digits.data import STYLES, make_personas
from models.digits.pretrain import train_central
from models.digits.unet import BASE_MODEL_DIR
from models.lora import get_adapter_state, lora_config
from models.text import PromptEncoder
from models.training import LORA_LR, TrainConfig

A, B, C = "framed", "slanted", "thin"


@pytest.fixture(scope="module")
def model():
    personas = make_personas(6, 3, seed=0, styles=[A, B, C])
    central = train_central(BASE_MODEL_DIR, personas, train=TrainConfig(steps=150, batch_size=16, lr=LORA_LR), progress=False)
    g = GlobalModel(lora_config())
    for cid, style in enumerate((A, B, C)):
        g.set_cluster(cid, get_adapter_state(central, style), 1)
    return g


def style_scores(model, mix, prompts):
    from models.digits.evaluate import load_evaluator

    enc = torch.from_numpy(PromptEncoder().encode(prompts))
    probs = load_evaluator().style_probabilities(model.generate(enc, mix, seed=0, steps=15))
    return {s: float(probs[:, STYLES.index(s)].mean()) for s in (A, B, C)}


@pytest.mark.slow
def test_a_half_half_mix_is_a_blend_of_the_two_styles(model):
    prompts = [f"a {d}" for d in range(10)] * 3
    only_a, only_b = style_scores(model, {0: 1.0}, prompts), style_scores(model, {1: 1.0}, prompts)
    only_c, hybrid = style_scores(model, {2: 1.0}, prompts), style_scores(model, {0: 0.5, 1: 0.5}, prompts)
    assert hybrid[A] > only_c[A] and hybrid[B] > only_c[B]
    assert hybrid[A] < only_a[A] and hybrid[B] < only_b[B]


def test_unknown_clusters_and_absurd_weights_are_refused(model):
    enc = torch.zeros(1, 384)
    with pytest.raises(ValueError):
        model.generate(enc, {42: 1.0})
    with pytest.raises(ValueError):
        model.generate(enc, {0: 1e6})
    with pytest.raises(ValueError):
        model.generate(enc, {})


def test_the_service_batches_concurrent_requests_and_keeps_each_seed(model):
    replies = {}
    done = threading.Event()

    def reply(request, images, reason):
        replies[request.request_id] = images
        if len(replies) == 6:
            done.set()

    service = GenerationService(model, reply, max_batch=64, max_wait_s=0.3, steps=4).start()
    enc = torch.from_numpy(PromptEncoder().encode(["a 3"])[0])
    ids = [uuid.uuid4().hex for _ in range(6)]
    for i, rid in enumerate(ids):
        service.submit(Request("dev", rid, enc, {0: 1.0}, 2, seed=i, received=time.monotonic()))
    assert done.wait(60)
    service.stop()
    assert len(service.batches) < 6  # several requests per sampling call
    alone = {}
    solo = GenerationService(model, lambda r, im, why: alone.setdefault(r.request_id, im), max_batch=1, steps=4).start()
    solo.submit(Request("dev", "solo", enc, {0: 1.0}, 2, seed=3, received=time.monotonic()))
    deadline = time.monotonic() + 30
    while "solo" not in alone and time.monotonic() < deadline:
        time.sleep(0.05)
    solo.stop()
    torch.testing.assert_close(alone["solo"], replies[ids[3]], atol=1e-5, rtol=0)  # same seed, same images


def test_bad_requests_are_refused_with_a_reason(model):
    service = GenerationService(model, lambda *a: None)
    enc = torch.zeros(384)
    with pytest.raises(RefusedMessage, match="malformed: n must be"):
        service.submit(Request("d", "r", enc, {0: 1.0}, 0, 0, 0.0))
    with pytest.raises(RefusedMessage, match="malformed: unknown clusters"):
        service.submit(Request("d", "r", enc, {9: 1.0}, 1, 0, 0.0))
    with pytest.raises(RefusedMessage, match="bad_tensors: .*shape"):
        service.submit(Request("d", "r", torch.zeros(5), {0: 1.0}, 1, 0, 0.0))


def test_a_request_for_more_steps_than_the_services_draws_that_many_more_images_from_the_bucket(model):
    service = GenerationService(model, lambda *a: None, steps=4, device_rate=1.0, device_burst=4)
    enc = torch.zeros(384)
    service.submit(Request("d", "long", enc, {0: 1.0}, 1, 0, 0.0, steps=16))  # 16 steps: 4 images' worth
    with pytest.raises(RefusedMessage, match="busy"):
        service.submit(Request("d", "short", enc, {0: 1.0}, 1, 0, 0.0))
    service.submit(Request("e", "short", enc, {0: 1.0}, 1, 0, 0.0))  # another device's bucket is untouched
