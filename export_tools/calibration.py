"""Denoising inputs drawn from styled digits: int8 calibration and export-time parity checks.

Each row is what the sampler feeds the denoiser: a styled digit noised to a random
timestep of the training schedule, with its user's prompt encoding, or — for a quarter
of the rows — the all-zero unconditional encoding that classifier-free guidance uses.
"""

from __future__ import annotations

import torch

from models.data import STYLES, make_personas
from models.unet import to_model_range, train_scheduler


def denoising_batches(batches: int, batch_size: int, seed: int = 0,
                      encode=None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``batches`` deterministic ``(x, t, encoding)`` triples of ``batch_size`` rows each.

    ``encode(prompts) -> (n, 384) array`` defaults to the MiniLM ``PromptEncoder``.
    """
    if encode is None:
        from models.text import PromptEncoder

        encode = PromptEncoder().encode
    n = batches * batch_size
    personas = make_personas(len(STYLES), len(STYLES), seed=seed, images_per_client=max(8, n // len(STYLES) + 2))
    images = torch.cat([p.train_images for p in personas])
    prompts = [pr for p in personas for pr in p.train_prompts]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(prompts), generator=g)[:n]
    if len(pick) < n:
        pick = pick.repeat(n // len(pick) + 1)[:n]
    encodings = torch.as_tensor(encode([prompts[i] for i in pick.tolist()]), dtype=torch.float32)
    encodings[torch.rand(n, generator=g) < 0.25] = 0.0
    schedule = train_scheduler()
    t = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(n, 1, 16, 16, generator=g)
    x = schedule.add_noise(to_model_range(images[pick]), noise, t)
    return [(x[i:i + batch_size], t[i:i + batch_size].float(), encodings[i:i + batch_size])
            for i in range(0, n, batch_size)]
