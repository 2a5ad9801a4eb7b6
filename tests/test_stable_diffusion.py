"""Bring your own diffusion model: a Stable-Diffusion-family pipeline from a directory, end to end."""

import time
import uuid

import numpy as np
import pytest
import torch
from safetensors import safe_open

from aggregator.cli import main
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from edge_sdk import SHARED, DeviceConfig, EdgeClient, FederatedSession, LocalData, MqttConfig
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.messages import EnrolAck
from models.architectures import save_random_pipeline
from models.backend import load_backend
from models.lora import get_adapter_state, lora_config, set_adapter_state, set_mix
from models.lora_formats import LoraFormatError, save_lora
from tests.polling import wait_until

PROMPTS = ("a watercolour fox", "a watercolour fox at dusk", "a red car", "a red car in the rain")


def device(tmp_path, pipeline, name="d", **overrides) -> EdgeClient:
    config = dict(data_dir=tmp_path / name, base_model=pipeline, profile="jetson-orin-nano") | overrides
    return EdgeClient(DeviceConfig(**config))


def trained(client: EdgeClient, steps: int = 4) -> EdgeClient:
    client.train_round(None, LocalData(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                                       PROMPTS), steps=steps)
    g = torch.Generator().manual_seed(2)  # B is zero after so few steps: make the adapter's effect visible
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in get_adapter_state(client.unet, SHARED).items()}
    set_adapter_state(client.unet, SHARED, state)
    return client


def unet_outputs(unet, backend, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *backend.sample_shape, generator=g)
    return unet(x, torch.tensor([10, 700]), encoder_hidden_states=backend.encode_prompts(list(PROMPTS[:2]))).sample


def test_the_pipeline_states_its_shapes(tiny_sd):
    backend = load_backend(tiny_sd)
    assert (backend.image_shape, backend.sample_shape, backend.conditioning_shape) == ((3, 16, 16), (4, 8, 8), (16, 32))
    assert backend.family == "stable-diffusion" and backend.prediction_type == "epsilon"


@pytest.mark.parametrize("quantization, checkpointing", [("int8", True), ("none", False)])
def test_a_device_trains_and_generates_on_its_own_pipeline(tmp_path, tiny_sd, quantization, checkpointing):
    client = device(tmp_path, tiny_sd, quantization=quantization, gradient_checkpointing=checkpointing)
    update = client.train_round(None, LocalData(torch.rand(4, 3, 16, 16), PROMPTS), steps=4)
    assert update.samples == 4 and set(update.delta) == set(get_adapter_state(client.unet, SHARED))
    assert any(".to_q." in k for k in update.delta)  # attention projections: Stable Diffusion's targets
    images = client.generate("a watercolour fox", n=2, steps=4)
    assert images.shape == (2, 3, 16, 16) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0


@pytest.mark.parametrize("images, named", [(torch.rand(4, 1, 16, 16), r"\(n, 3, 16, 16\)"),
                                           (torch.rand(4, 3, 32, 32), r"\(n, 3, 16, 16\)"),
                                           (torch.rand(4, 3, 16, 16) * 255, r"\[0, 1\]")])
def test_images_the_pipeline_cannot_take_are_refused_naming_what_it_takes(tmp_path, tiny_sd, images, named):
    with pytest.raises(ValueError, match=named):
        device(tmp_path, tiny_sd).train_round(None, LocalData(images, PROMPTS), steps=1)


def test_a_v_prediction_pipeline_trains_toward_the_velocity(tmp_path):
    pipeline = save_random_pipeline("tiny-sd", tmp_path / "v", prediction_type="v_prediction")
    backend = load_backend(pipeline)
    scheduler = backend.train_scheduler()
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    assert backend.prediction_type == "v_prediction"
    torch.testing.assert_close(backend.target(x0, noise, t, scheduler), scheduler.get_velocity(x0, noise, t))
    update = device(tmp_path, pipeline).train_round(None, LocalData(torch.rand(4, 3, 16, 16), PROMPTS), steps=2)
    assert np.isfinite(update.loss_after)


def test_a_diffusers_format_adapter_loads_into_the_pipeline_with_the_same_output(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    client = trained(device(tmp_path, tiny_sd, quantization="none"))
    out = client.save_lora(tmp_path / "lora", format="diffusers")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(out)
    set_mix(client.unet, {SHARED: 1.0})
    torch.testing.assert_close(unet_outputs(pipe.unet, client.backend), unet_outputs(client.unet, client.backend),
                               atol=1e-5, rtol=0)


def test_a_kohya_format_adapter_keeps_its_alpha_and_loads_into_the_pipeline(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    client = trained(device(tmp_path, tiny_sd, quantization="none"))
    client.adopt_lora(lora_config(4, 8.0, target_modules=client.backend.default_targets))
    client = trained(client)
    out = client.save_lora(tmp_path / "fox.safetensors", format="kohya")
    with safe_open(out, framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys) and any(".lora_down." in k for k in keys)
    assert alphas == {8.0} and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "" or meta["ss_base_model_version"].startswith("sd")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    set_mix(client.unet, {SHARED: 1.0})
    torch.testing.assert_close(unet_outputs(pipe.unet, client.backend), unet_outputs(client.unet, client.backend),
                               atol=1e-5, rtol=0)


def test_a_peft_format_adapter_is_a_config_and_weights_peft_loads(tmp_path, tiny_sd):
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    client = trained(device(tmp_path, tiny_sd, quantization="none"))
    out = client.save_lora(tmp_path / "peft", format="peft")
    config = LoraConfig.from_pretrained(str(out))
    assert config.r == client.shared_lora.r and set(config.target_modules) == set(client.shared_lora.target_modules)
    weights = load_peft_weights(str(out), device="cpu")
    assert {k.removeprefix("base_model.model.") for k in weights} == set(get_adapter_state(client.unet, SHARED))


def test_an_adapter_whose_keys_do_not_all_land_is_an_error(tmp_path, tiny_sd):
    client = device(tmp_path, tiny_sd, quantization="none")
    state = get_adapter_state(client.unet, SHARED) | {"up_blocks.9.nowhere.lora_A.weight": torch.zeros(2, 8)}
    with pytest.raises(LoraFormatError, match="does not load into the model.*nowhere"):
        save_lora(state, client.shared_lora, tmp_path / "bad", "diffusers", client.unet)


def sd_aggregator(tmp_path, mqtt_url, pipeline, **overrides) -> AggregatorService:
    return AggregatorService(AggregatorConfig(**({
        "aggregator_id": f"agg-{uuid.uuid4().hex[:6]}", "mqtt_url": mqtt_url, "state_dir": tmp_path / "agg",
        "base_model": pipeline, "expected_devices": 3, "rounds": 2, "local_steps": 2, "round_timeout_s": 60,
        "refine_after_round": 0, "tokens": (DEMO_TOKEN,)} | overrides))).start()


@pytest.mark.slow
def test_three_devices_federate_two_rounds_on_the_pipeline(tmp_path, mqtt_url, tiny_sd):
    agg = sd_aggregator(tmp_path, mqtt_url, tiny_sd)
    sessions = []
    try:
        for i in range(3):
            client = device(tmp_path, tiny_sd, f"d{i}", device_id=f"sd-{uuid.uuid4().hex[:8]}", batch_size=4,
                            enrolment_token=DEMO_TOKEN, aggregator_fingerprint=agg.identity.public.fingerprint)
            data = LocalData(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)), PROMPTS)
            sessions.append(FederatedSession(client, data, MqttConfig(url=mqtt_url)).start())
        assert all(s.finished.wait(240) for s in sessions)
        wait_until(agg.done.is_set, timeout=60)
        summaries = agg.store.round_summaries()
        assert {r for r, _, _ in summaries} == {1, 2}
        assert sum(len(s["accepted"]) for r, _, s in summaries if r == 2) == 3
        shapes = {k: tuple(v.shape) for k, v in get_adapter_state(sessions[0].client.unet, SHARED).items()}
        assert shapes == agg.shapes  # the fleet's LoRA config, adopted from the round starts
        cluster = agg.membership.assignment[sessions[0].client.device_id]
        out = tmp_path / "cluster.safetensors"
        assert main(["adapters", "export", "--cluster", str(cluster), "--format", "kohya", "--out", str(out),
                     "--state", agg.config.store_url, "--base-model", str(tiny_sd)]) == 0
        with safe_open(out, framework="pt") as f:
            assert all(k.startswith("lora_unet_") for k in f.keys())
    finally:
        for s in sessions:
            s.stop()
        agg.stop()


def test_a_device_with_another_base_model_is_refused_at_enrolment(tmp_path, mqtt_url, tiny_sd):
    agg = sd_aggregator(tmp_path, mqtt_url, tiny_sd, expected_devices=None)
    liar = LiteDevice(mqtt_url, model="0" * 64).start()
    digits = EdgeClient(DeviceConfig(data_dir=tmp_path / "digits", profile="simulator",
                                     aggregator_fingerprint=agg.identity.public.fingerprint))
    session = FederatedSession(digits, LocalData(torch.rand(4, 1, 16, 16), PROMPTS), MqttConfig(url=mqtt_url))
    try:
        liar.enrol()
        ack = EnrolAck.decode(liar.wait_for(MessageType.ENROL_ACK)[0][1])
        assert not ack.accepted and ack.reason.startswith("model_mismatch: model mismatch: fleet runs")
        assert agg.refusals["model_mismatch"] == 1 and agg.store.device(liar.id) is None
        session.start()  # the bundled-model device sees the fleet's announcement and does not enrol
        wait_until(lambda: session.refusals["model_mismatch"] >= 1)
        time.sleep(0.5)
        assert not session.enrolled.is_set() and agg.store.device(digits.device_id) is None
    finally:
        session.stop()
        liar.stop()
        agg.stop()


@pytest.mark.slow
def test_the_pipelines_unet_exports_to_executorch_and_runs_as_eager(tmp_path, tiny_sd):
    from aggregator.cli.export import calibration_dataset
    from edge_sdk.artifacts.inference import ExecuTorchDenoiser
    from export_tools.calibration import denoising_batches
    from export_tools.executorch import export_executorch

    backend = load_backend(tiny_sd)
    calibration = denoising_batches(backend, calibration_dataset(backend), 1, 2)
    manifest = export_executorch(backend, {}, {}, tmp_path / "et", batch=2, slot_rank=4, calibration=calibration,
                                 latency_reps=1)
    assert manifest.parity["max_abs_err"] < 1e-4
    for part in ("text_encoder.pte", "vae_decoder.pte"):  # the latent model's other parts, exported beside it
        assert part in manifest.files and manifest.parity[part]["max_abs_err"] < 1e-4
    program = ExecuTorchDenoiser(tmp_path / "et")
    try:
        g = torch.Generator().manual_seed(5)
        x, t = torch.randn(3, *backend.sample_shape, generator=g), torch.tensor([3, 400, 999])
        cond = backend.encode_prompts(list(PROMPTS[:3]))
        torch.testing.assert_close(program(x, t, cond), backend.predict(x, t, cond), atol=1e-4, rtol=0)
    finally:
        program.close()


@pytest.mark.slow
def test_the_pipeline_converts_to_core_ml_with_its_text_encoder_and_vae_decoder(tmp_path, tiny_sd):
    from export_tools.coreml import export_coreml, validate_package

    backend = load_backend(tiny_sd)
    manifest = export_coreml(backend, {}, {"base": {}}, tmp_path / "cm", batch=2)
    assert validate_package(tmp_path / "cm" / "model.mlpackage", manifest)["functions"]
    tokens, hidden = backend.conditioning_shape
    assert list(manifest.parity["text_encoder.mlpackage"]["outputs"].values()) == [[1, tokens, hidden]]
    assert list(manifest.parity["vae_decoder.mlpackage"]["outputs"].values()) == [[1, *backend.image_shape]]
    assert {"text_encoder.mlpackage", "vae_decoder.mlpackage"} <= set(manifest.files)
