"""The bundled denoiser: a small diffusers ``UNet2DConditionModel`` conditioned on prompt encodings.

(``models/digits/backend.py`` puts it behind the ``DiffusionBackend`` interface; sampling and the
noise schedule's samplers live there.)

The pooled 384-d MiniLM encoding enters twice, the way SDXL feeds its pooled text
embedding: as a one-token cross-attention context *and* through the class-embedding
projection that is added to the timestep embedding. Cross-attention over a single token
only adds a per-channel bias at the attention resolutions; the projection path modulates
every ResNet block, which is what lets a tiny UNet follow the prompt.

An all-zero encoding is the unconditional prompt used for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from models.digits.paths import BASE_MODEL_DIR
from models.text import EMBEDDING_DIM

# The noise schedule the base model was trained with; samplers are derived from it.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


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


def denoise(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, encodings: torch.Tensor) -> torch.Tensor:
    """Predicted noise for noisy images ``x`` at timesteps ``t`` given ``(n, 384)`` encodings."""
    return unet(x, t, encoder_hidden_states=encodings[:, None, :], class_labels=encodings).sample
