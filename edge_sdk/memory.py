"""How much memory a LoRA training step needs, known before the step runs.

Weights are counted at their stored size (int8 where quantized); trainable parameters
cost four times their size (value, gradient, two AdamW moments); activations are
measured by running one batch-1 forward pass under ``saved_tensors_hooks``, which sees
exactly the tensors autograd keeps for backward, and scaling by the batch size.
"""

from __future__ import annotations

import torch

from edge_sdk.quantize import weight_bytes
from models.unet import denoise


class MemoryBudgetExceeded(ValueError):
    """A training step would not fit the device's memory budget."""


def activation_bytes_per_sample(unet: torch.nn.Module) -> int:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    size = unet.config.sample_size
    x = torch.zeros(1, 1, size, size)
    t = torch.zeros(1, dtype=torch.long)
    enc = torch.zeros(1, unet.config.cross_attention_dim)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    flags = [p.requires_grad for p in unet.parameters()]
    if not trainable:  # autograd saves nothing without a trainable leaf; mimic LoRA training
        for n, p in unet.named_parameters():
            p.requires_grad_(".lora_" in n)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            denoise(unet, x, t, enc)
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
    return saved


def estimate_training_bytes(unet: torch.nn.Module, batch_size: int) -> int:
    lora = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if ".lora_" in n)
    return weight_bytes(unet) + 3 * lora + batch_size * activation_bytes_per_sample(unet)
