"""The denoiser: a small diffusers ``UNet2DConditionModel`` conditioned on prompt encodings.

The pooled 384-d MiniLM encoding enters twice, the way SDXL feeds its pooled text
embedding: as a one-token cross-attention context *and* through the class-embedding
projection that is added to the timestep embedding. Cross-attention over a single token
only adds a per-channel bias at the attention resolutions; the projection path modulates
every ResNet block, which is what lets a tiny UNet follow the prompt.

An all-zero encoding is the unconditional prompt used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from models.text import EMBEDDING_DIM

BASE_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "base"

# The noise schedule the base model was trained with; samplers are derived from it.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

SAMPLERS = ("ddim", "dpm", "ddpm")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture knobs of the denoiser; everything else is fixed by the benchmark."""

    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    sample_size: int = 16

    def __post_init__(self) -> None:
        if len(self.block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least two levels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block width must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")


def build_unet(config: UNetConfig = UNetConfig(), seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised denoiser, deterministic for ``seed``."""
    levels = len(config.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=config.sample_size,
            in_channels=1,
            out_channels=1,
            layers_per_block=config.layers_per_block,
            block_out_channels=config.block_out_channels,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=EMBEDDING_DIM,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=EMBEDDING_DIM,
        )


def unet_config_of(unet: UNet2DConditionModel) -> UNetConfig:
    c = unet.config
    return UNetConfig(
        block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
        attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups, sample_size=c.sample_size,
    )


def load_base_unet(path: str | Path = BASE_MODEL_DIR) -> UNet2DConditionModel:
    """The shipped foundation model every device and aggregator starts from."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no UNet at {path}; rebuild it with `fedaigc pretrain --out {path}`")
    # low_cpu_mem_usage=False: the default builds the model under accelerate's init_empty_weights,
    # which patches parameter registration process-wide, so a LoRA layer another thread creates
    # meanwhile lands on the meta device and silently ignores its weights
    unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    unet.eval()
    return unet


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def make_sampler(name: str = "ddim") -> SchedulerMixin:
    """A sampler sharing the training noise schedule, chosen by name (diffusers-style swap)."""
    base = train_scheduler().config
    if name == "ddim":
        return DDIMScheduler.from_config(base)
    if name == "dpm":
        from diffusers import DPMSolverMultistepScheduler  # it imports SciPy, which a device need not load

        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    if name == "ddpm":
        return DDPMScheduler.from_config(base)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def denoise(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, encodings: torch.Tensor) -> torch.Tensor:
    """Predicted noise for noisy images ``x`` at timesteps ``t`` given ``(n, 384)`` encodings."""
    return unet(x, t, encoder_hidden_states=encodings[:, None, :], class_labels=encodings).sample


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    return images01 * 2.0 - 1.0


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    encodings: torch.Tensor,
    steps: int = 20,
    seed: int = 0,
    *,
    guidance_scale: float = 2.0,
    sampler: str = "ddim",
    batch_size: int = 256,
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``(n, 1, 16, 16)`` images in [0, 1], one per encoding row; same seed, same images.

    ``noise`` (n, 1, 16, 16) replaces the seeded starting noise, so callers that batch
    unrelated requests can keep each request's samples independent of its batch-mates.

    ``denoiser(x, t, encodings)`` replaces the eager UNet call (an exported program, say)
    while keeping this exact sampling loop, so backends differ only in the network.
    """
    encodings = torch.as_tensor(encodings, dtype=torch.float32)
    if encodings.ndim != 2 or encodings.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"encodings must have shape (n, {EMBEDDING_DIM}), got {tuple(encodings.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    call = denoiser or (lambda x, t, e: denoise(unet, x, t, e))
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    if noise is None:
        noise = torch.randn((encodings.shape[0], 1, size, size), generator=generator)
    elif tuple(noise.shape) != (encodings.shape[0], 1, size, size):
        raise ValueError(f"noise must have shape {(encodings.shape[0], 1, size, size)}, got {tuple(noise.shape)}")
    outputs = []
    for start in range(0, encodings.shape[0], batch_size):
        enc = encodings[start:start + batch_size]
        x = noise[start:start + batch_size]
        scheduler = make_sampler(sampler)
        scheduler.set_timesteps(steps)
        guided = guidance_scale != 1.0
        context = torch.cat([enc, torch.zeros_like(enc)]) if guided else enc
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if guided else x
            eps = call(model_in, t.expand(model_in.shape[0]), context)
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        outputs.append(to_image_range(x))
    return torch.cat(outputs)
