"""Denoising inputs for int8 calibration and export-time parity checks, from any dataset.

Each row is what the sampler feeds the denoiser: an image of the dataset noised to a
random timestep of the training schedule, with its prompt's encoding, or (for a quarter of
the rows) the all-zero unconditional encoding that classifier-free guidance uses. The
dataset is a callable, so an app exports with inputs that look like its own users' data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.backend import DiffusionBackend

Samples = Callable[[int, int, torch.Generator], tuple[torch.Tensor, Sequence[str]]]
"""``samples(n, seed, generator) -> (n images in [0, 1] shaped (n, C, H, W), n prompts)``: deterministic
for ``seed``, any random choice drawn from ``generator``."""

UNCONDITIONAL_SHARE = 0.25


def denoising_batches(backend: DiffusionBackend, samples: Samples, batches: int, batch_size: int,
                      seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``batches`` deterministic ``(x, t, conditioning)`` triples of ``batch_size`` rows each, for ``backend``."""
    n = batches * batch_size
    g = torch.Generator().manual_seed(seed)
    images, prompts = samples(n, seed, g)
    if images.shape[0] != n or len(prompts) != n:
        raise ValueError(f"the calibration dataset gave {images.shape[0]} images and {len(prompts)} prompts, "
                         f"{n} were asked for")
    conditioning = backend.encode_prompts(list(prompts))
    dropped = torch.rand(n, generator=g) < UNCONDITIONAL_SHARE
    conditioning = torch.where(dropped.reshape(n, *[1] * (conditioning.ndim - 1)), backend.unconditional(n),
                               conditioning)
    schedule = backend.train_scheduler()
    t = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=g)
    clean = backend.encode_images(images)
    noise = torch.randn(clean.shape, generator=g)
    x = schedule.add_noise(clean, noise, t)
    return [(x[i:i + batch_size], t[i:i + batch_size].float(), conditioning[i:i + batch_size])
            for i in range(0, n, batch_size)]


def training_batch(backend: DiffusionBackend, samples: Samples, batch: int, seed: int = 0,
                   p_uncond: float = 0.1) -> tuple[torch.Tensor, ...]:
    """One ``(x_t, t, conditioning, target)`` training batch of the dataset, drawn as the trainer draws it
    (an exported training program's parity batch)."""
    from models.training import noised_batch

    g = torch.Generator().manual_seed(seed)
    images, prompts = samples(batch, seed, g)
    xt, t, conditioning, target = noised_batch(backend, backend.encode_images(images),
                                               backend.encode_prompts(list(prompts)), backend.train_scheduler(), g,
                                               p_uncond)
    return xt, t.float(), conditioning, target
