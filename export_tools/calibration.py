"""Denoising inputs for int8 calibration and export-time parity checks, from any dataset.

Each row is what the sampler feeds the denoiser: an image of the dataset noised to a
random timestep of the training schedule, with its prompt's encoding, or (for a quarter of
the rows) the all-zero unconditional encoding that classifier-free guidance uses. The
dataset is a callable, so an app exports with inputs that look like its own users' data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.digits.unet import to_model_range, train_scheduler

Samples = Callable[[int, int, torch.Generator], tuple[torch.Tensor, Sequence[str]]]
"""``samples(n, seed, generator) -> (n images in [0, 1] shaped (n, C, H, W), n prompts)``: deterministic
for ``seed``, any random choice drawn from ``generator``."""

UNCONDITIONAL_SHARE = 0.25


def denoising_batches(samples: Samples, batches: int, batch_size: int, seed: int = 0,
                      encode=None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``batches`` deterministic ``(x, t, encoding)`` triples of ``batch_size`` rows each.

    ``encode(prompts) -> (n, 384) array`` defaults to the MiniLM ``PromptEncoder``.
    """
    if encode is None:
        from models.text import PromptEncoder

        encode = PromptEncoder().encode
    n = batches * batch_size
    g = torch.Generator().manual_seed(seed)
    images, prompts = samples(n, seed, g)
    if images.shape[0] != n or len(prompts) != n:
        raise ValueError(f"the calibration dataset gave {images.shape[0]} images and {len(prompts)} prompts, "
                         f"{n} were asked for")
    encodings = torch.as_tensor(encode(list(prompts)), dtype=torch.float32)
    encodings[torch.rand(n, generator=g) < UNCONDITIONAL_SHARE] = 0.0
    schedule = train_scheduler()
    t = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    x = schedule.add_noise(to_model_range(images), noise, t)
    return [(x[i:i + batch_size], t[i:i + batch_size].float(), encodings[i:i + batch_size])
            for i in range(0, n, batch_size)]
