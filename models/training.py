"""The denoising objective and one training loop, shared by pretraining, the centralized
baseline and on-device LoRA rounds (which differ only in *which* parameters train), on any
``DiffusionBackend``: samples are already in the denoiser's space, so a latent model's VAE
encodes a device's images once per round, not once per step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from models.backend import DiffusionBackend

# The LoRA learning rate chosen on a styled-digits persona (docs/results.md, "LoRA learning rate").
LORA_LR = 1e-2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    p_uncond: float = 0.1  # prompt dropout that makes classifier-free guidance possible
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")


def noised_batch(
    backend: DiffusionBackend,
    samples: torch.Tensor,
    conditioning: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    p_uncond: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, conditioning, target)``: the diffusion objective's random draws, apart from the network.

    ``samples`` are in the denoiser's space (``backend.encode_images``); the target is the noise
    or the velocity, as the model predicts. A ``p_uncond`` share of rows gets the empty prompt's
    conditioning. Split out so an exported training program (which takes these four tensors as
    inputs) sees exactly the draws the eager trainer makes from the same generator.
    """
    n = samples.shape[0]
    noise = torch.randn(samples.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    xt = scheduler.add_noise(samples, noise, t)
    if p_uncond > 0:
        keep = torch.rand(n, generator=generator) >= p_uncond
        conditioning = torch.where(keep.reshape(n, *[1] * (conditioning.ndim - 1)), conditioning,
                                   backend.unconditional(n))
    return xt, t, conditioning, backend.target(samples, noise, t, scheduler)


def diffusion_loss(
    backend: DiffusionBackend,
    samples: torch.Tensor,
    conditioning: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    p_uncond: float = 0.0,
) -> torch.Tensor:
    """MSE between the denoiser's output and its target at uniformly drawn timesteps."""
    xt, t, conditioning, target = noised_batch(backend, samples, conditioning, scheduler, generator, p_uncond)
    return F.mse_loss(backend.predict(xt, t, conditioning), target)


@torch.no_grad()
def evaluation_loss(backend: DiffusionBackend, samples: torch.Tensor, conditioning: torch.Tensor,
                    seed: int = 0, repeats: int = 8) -> float:
    """The denoising loss under fixed noise and timesteps: comparable before and after training."""
    was_training = backend.denoiser.training
    backend.denoiser.eval()
    generator = torch.Generator().manual_seed(seed)
    scheduler = backend.train_scheduler()
    total = sum(diffusion_loss(backend, samples, conditioning, scheduler, generator).item() for _ in range(repeats))
    backend.denoiser.train(was_training)
    return total / repeats


# One training step given a noised batch: computes the loss, leaves each parameter's gradient
# in its ``.grad`` and returns the loss value.
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]


def train_steps(
    step: StepFn,
    params: list[torch.Tensor],
    backend: DiffusionBackend,
    samples: torch.Tensor,
    conditioning: torch.Tensor,
    config: TrainConfig,
    progress: bool = False,
    description: str = "training",
) -> list[float]:
    """The loop every trainer shares: batches, noise and timesteps from ``config.seed``, clipping, AdamW.

    ``step`` supplies the forward and backward pass (eager autograd, or an exported
    ExecuTorch training program), so both backends see identical data and updates and
    differ only in how the gradients are computed.
    """
    if samples.shape[0] != conditioning.shape[0]:
        raise ValueError(f"{samples.shape[0]} samples but {conditioning.shape[0]} conditionings")
    if samples.shape[0] == 0:
        raise ValueError("cannot train on an empty dataset")
    if not params:
        raise ValueError("no trainable parameters were given")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = backend.train_scheduler()
    n = samples.shape[0]
    losses: list[float] = []
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=description, leave=False)
    for _ in steps:
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        batch = noised_batch(backend, samples[idx], conditioning[idx], scheduler, generator, config.p_uncond)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step(*batch))
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if progress:
            steps.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def train_denoiser(
    backend: DiffusionBackend,
    params: Iterable[torch.nn.Parameter],
    samples: torch.Tensor,
    conditioning: torch.Tensor,
    config: TrainConfig,
    progress: bool = False,
    description: str = "training",
) -> list[float]:
    """Train ``params`` of ``backend.denoiser`` on (sample, conditioning) pairs; returns every step's loss."""
    params = [p for p in params if p.requires_grad]

    def step(xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor) -> float:
        loss = F.mse_loss(backend.predict(xt, t, cond), target)
        loss.backward()
        return loss.item()

    backend.denoiser.train()
    try:
        return train_steps(step, params, backend, samples, conditioning, config, progress, description)
    finally:
        backend.denoiser.eval()


def train_adapters(
    backend: DiffusionBackend,
    names: Sequence[str],
    samples: torch.Tensor,
    conditioning: torch.Tensor,
    config: TrainConfig,
    progress: bool = False,
    description: str = "training",
) -> list[float]:
    """Train only the LoRA adapters ``names`` of the denoiser (their mix set by the caller); the rest stays frozen.

    The adapters' parameters are unfrozen for the loop and frozen again after it, also when it raises.
    """
    params = [p for n, p in backend.denoiser.named_parameters() if any(f".{a}." in n for a in names)]
    for p in params:
        p.requires_grad_(True)
    try:
        return train_denoiser(backend, params, samples, conditioning, config, progress, description)
    finally:
        for p in params:
            p.requires_grad_(False)
