"""The frozen base, quantized for devices: int8 weight-only linears via torchao.

Measured on this stack (``benchmarks/edge.py``): torchao's ``Int8WeightOnlyConfig``
stores linear weights as int8 with per-channel scales, peft wraps the quantized
linears with its torchao LoRA layer, gradients reach the adapters, and outputs stay close
to fp32 (docs/results.md, "edge"). Convolutions stay fp32 under this config; the benchmark
reports how much of each UNet that leaves unquantized.
"""

from __future__ import annotations

import torch


def quantize_base(unet: torch.nn.Module) -> torch.nn.Module:
    """Quantize ``unet``'s linear weights to int8 in place; call before adding adapters."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if any(".lora_" in n for n, _ in unet.named_parameters()):
        raise ValueError("quantize the base before adding LoRA adapters")
    quantize_(unet, Int8WeightOnlyConfig())
    unet.requires_grad_(False)
    return unet


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers, counting quantized tensors at their packed size."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return _tensor_bytes(t.data)
    return t.numel() * t.element_size()
