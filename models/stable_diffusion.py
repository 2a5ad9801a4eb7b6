"""A Stable-Diffusion-family diffusers pipeline from a local directory, as a ``DiffusionBackend``.

The directory is what ``StableDiffusionPipeline.save_pretrained`` writes (``model_index.json``
and the ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` folders): SD 1.x and
2.x, SD-Turbo, BK-SDM, tiny-sd. Nothing is downloaded; the parts load one by one, so a device
never imports the pipeline class and its safety checker or image processor.

Diffusion runs in the VAE's latent space: an image in [0, 1] goes to [-1, 1], is encoded (the
latent distribution's mean, so a device's round is deterministic) and scaled by the VAE's
``scaling_factor``. The conditioning is the pipeline's own text encoder's last hidden state over
the tokenizer's full length (77 tokens for CLIP), the empty prompt's for classifier-free
guidance; the noise schedule and prediction type (epsilon or v-prediction) are the pipeline's
scheduler config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from models.backend import DiffusionBackend
from models.lora import DEFAULT_TARGETS

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusionBackend(DiffusionBackend):
    family = "stable-diffusion"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict) -> None:
        self.denoiser = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._scheduler_config = dict(scheduler_config)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent = int(unet.config.sample_size)
        self.image_shape = (int(vae.config.in_channels), latent * factor, latent * factor)
        self.sample_shape = (int(unet.config.in_channels), latent, latent)
        self.conditioning_shape = (int(tokenizer.model_max_length), int(text_encoder.config.hidden_size))
        self.default_targets = DEFAULT_TARGETS["stable-diffusion"]
        self.scaling_factor = float(vae.config.scaling_factor)
        # kohya's names: SD 1.x conditions on CLIP ViT-L (768), SD 2.x on OpenCLIP ViT-H (1024)
        self.model_version = {768: "sd_v1", 1024: "sd_v2"}.get(int(text_encoder.config.hidden_size), "")
        self._empty: torch.Tensor | None = None
        for module in (vae, text_encoder):
            module.requires_grad_(False)
            module.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "StableDiffusionBackend":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        missing = [p for p in PARTS if p not in index or not (path / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} is not a Stable-Diffusion-family pipeline: no {', '.join(missing)} "
                                    f"(model_index.json lists {sorted(k for k in index if not k.startswith('_'))})")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            # low_cpu_mem_usage=False: see models.digits.unet.load_base_unet (LoRA layers created meanwhile)
            unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, low_cpu_mem_usage=False)
            vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, low_cpu_mem_usage=False)
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        scheduler = json.loads(next((path / "scheduler").glob("scheduler_config.json")).read_text())
        unet.eval()
        return cls(unet, vae, text_encoder, tokenizer, scheduler)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.denoiser, "vae": self.vae, "text_encoder": self.text_encoder}

    # ---------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode_prompts takes a non-empty list of strings")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids)[0].to(torch.float32)

    def unconditional(self, n: int) -> torch.Tensor:
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty.expand(n, *self.conditioning_shape)

    # ---------------------------------------------------------------- images <-> latents
    @torch.no_grad()
    def encode_images(self, images01: torch.Tensor) -> torch.Tensor:
        x = self.check_images(images01) * 2.0 - 1.0
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(samples / self.scaling_factor).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---------------------------------------------------------------- the denoiser
    def run(self, denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            conditioning: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, encoder_hidden_states=conditioning).sample

    def scheduler_config(self) -> dict:
        return dict(self._scheduler_config)
