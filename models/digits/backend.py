"""The bundled digits model as a ``DiffusionBackend``: pixel-space diffusion on 16x16 images.

No VAE: a sample is the image itself, moved to [-1, 1]. The prompt's pooled 384-d MiniLM
encoding is the conditioning (``models.digits.unet.denoise`` feeds it twice), and the empty
prompt is the all-zero encoding the base model was trained with for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from models.backend import DiffusionBackend
from models.digits.unet import BASE_MODEL_DIR, NOISE_SCHEDULE, denoise, load_base_unet
from models.lora import DEFAULT_TARGETS


class DigitsBackend(DiffusionBackend):
    family = "digits"
    model_version = "fedaigc_digits_v1"
    conditioning_is_task_encoding = True

    def __init__(self, unet: torch.nn.Module) -> None:
        c = unet.config
        self.denoiser = unet
        self.image_shape = self.sample_shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
        self.conditioning_shape = (int(c.cross_attention_dim),)
        self.default_targets = DEFAULT_TARGETS["digits"]

    @classmethod
    def from_pretrained(cls, path: str | Path = BASE_MODEL_DIR) -> "DigitsBackend":
        return cls(load_base_unet(path))

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        from models.text import PromptEncoder

        return torch.from_numpy(PromptEncoder().encode(prompts))

    def unconditional(self, n: int) -> torch.Tensor:
        return torch.zeros((n, *self.conditioning_shape))

    def encode_images(self, images01: torch.Tensor) -> torch.Tensor:
        return self.check_images(images01) * 2.0 - 1.0

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)

    def run(self, denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            conditioning: torch.Tensor) -> torch.Tensor:
        return denoise(denoiser, x, t, conditioning)

    def scheduler_config(self) -> dict:
        return dict(NOISE_SCHEDULE)

