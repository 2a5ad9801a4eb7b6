"""Building the shared foundation model and the centralized upper bound.

``pretrain_base`` trains the unstyled base denoiser on the public half of the digits
with neutral prompts; its weights ship inside the package so nobody has to rerun it.
``train_central`` trains one adapter per style on the pooled data of every persona:
the quality a federation would reach if privacy did not matter.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.digits.backend import DigitsBackend
from models.digits.data import Persona, plain_prompts, public_digits
from models.digits.unet import UNetConfig, build_unet
from models.lora import LoraConfig, add_adapter, lora_config, set_mix
from models.text import PromptEncoder
from models.training import LORA_LR, TrainConfig, train_adapters, train_denoiser

PROMPTS_PER_IMAGE = 4


@dataclass(frozen=True)
class PretrainResult:
    unet: torch.nn.Module
    losses: list[float]
    seconds: float


def pretrain_base(
    config: UNetConfig = UNetConfig(),
    train: TrainConfig = TrainConfig(steps=3000, batch_size=64, lr=2e-3, seed=0),
    progress: bool = True,
) -> PretrainResult:
    """Train the base denoiser from scratch on unstyled public digits (deterministic)."""
    started = time.perf_counter()
    torch.manual_seed(train.seed)
    images, digits = public_digits()
    images = images.repeat(PROMPTS_PER_IMAGE, 1, 1, 1)
    digits = digits.repeat(PROMPTS_PER_IMAGE)
    encodings = torch.from_numpy(PromptEncoder().encode(plain_prompts(digits.tolist(), seed=train.seed)))
    unet = build_unet(config, seed=train.seed)
    losses = _train_with_cosine_decay(DigitsBackend(unet), images, encodings, train, progress)
    return PretrainResult(unet, losses, time.perf_counter() - started)


def _train_with_cosine_decay(backend: DigitsBackend, images, encodings, train: TrainConfig,
                             progress: bool) -> list[float]:
    """Full-model training in chunks, decaying the learning rate between chunks."""
    samples = backend.encode_images(images)
    chunks = 10
    losses: list[float] = []
    per_chunk = max(1, train.steps // chunks)
    for i in range(chunks):
        lr = train.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * i / chunks)).item())
        cfg = TrainConfig(steps=per_chunk, batch_size=train.batch_size, lr=lr, p_uncond=train.p_uncond, seed=train.seed + i)
        losses += train_denoiser(backend, backend.denoiser.parameters(), samples, encodings, cfg, progress,
                                 f"pretrain {i + 1}/{chunks}")
    return losses


def persona_encodings(personas: Sequence[Persona], split: str = "train") -> torch.Tensor:
    prompts = [p for persona in personas for p in getattr(persona, f"{split}_prompts")]
    return torch.from_numpy(PromptEncoder().encode(prompts))


def train_central(
    base_path: str | Path,
    personas: Sequence[Persona],
    spec: LoraConfig = lora_config(),
    train: TrainConfig = TrainConfig(steps=600, batch_size=32, lr=LORA_LR, seed=0),
    progress: bool = True,
) -> torch.nn.Module:
    """One adapter per style (named after the style) trained on all personas of that style."""
    from models.digits.unet import load_base_unet

    backend = DigitsBackend(load_base_unet(base_path))
    unet = backend.denoiser
    unet.requires_grad_(False)
    for style in sorted({p.style for p in personas}):
        group = [p for p in personas if p.style == style]
        add_adapter(unet, style, spec, seed=train.seed)
        set_mix(unet, {style: 1.0})
        samples = backend.encode_images(torch.cat([p.train_images for p in group]))
        train_adapters(backend, [style], samples, persona_encodings(group), train, progress, f"central {style}")
    return unet


def central_report(clients: int = 12, styles: int = 4, seed: int = 0, steps: int = 400,
                   samples: int = 64, progress: bool = True) -> dict:
    """Per-style quality of the base model and of centrally trained adapters (the upper bound)."""
    from models.digits.data import make_personas
    from models.digits.evaluate import evaluate_personas
    from models.digits.unet import BASE_MODEL_DIR

    personas = make_personas(clients, styles, seed=seed)
    unet = train_central(BASE_MODEL_DIR, personas, train=TrainConfig(steps=steps, batch_size=32, lr=LORA_LR, seed=seed),
                         progress=progress)
    report: dict = {"clients": clients, "styles": styles, "steps": steps, "seed": seed, "per_style": {}}
    for style in sorted({p.style for p in personas}):
        group = [p for p in personas if p.style == style]
        set_mix(unet, {})
        base = evaluate_personas(unet, group, samples=samples, seed=seed)
        set_mix(unet, {style: 1.0})
        central = evaluate_personas(unet, group, samples=samples, seed=seed)
        report["per_style"][style] = {"base": base, "central": central}
    return report
