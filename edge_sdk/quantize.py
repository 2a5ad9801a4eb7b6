"""The frozen base, quantized for devices: int8 weights for every Linear and Conv2d.

Weights are stored as int8 with one fp32 scale per output channel (symmetric, ``max|w| / 127``);
the layers stay ``nn.Linear`` / ``nn.Conv2d`` subclasses, so peft wraps them with its own LoRA
layers and gradients reach the adapters. Two measured reasons for not using torchao's
``Int8WeightOnlyConfig`` here (docs/results.md, "edge"): it quantizes Linear layers only, which
leaves the convolutions of a diffusion UNet (most of its bytes) in fp32, and training through its
layers keeps a dequantized fp32 copy of every weight alive for the backward pass, so LoRA on an
int8 base took *more* memory than on an fp32 one. Here the forward dequantizes a weight, uses it
and drops it; the backward dequantizes it again from the int8 bytes it saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 127
# The first and last convolution stay fp32: a handful of weights, and where int8 errors reach the
# input and the prediction unscaled (the ExecuTorch int8 export keeps them fp32 for the same reason).
FP32_LAYERS = ("conv_in", "conv_out")


def quantize_base(model: nn.Module) -> nn.Module:
    """Give ``model``'s Linear and Conv2d layers (but ``FP32_LAYERS``) int8 weights, in place; call before
    adding adapters."""
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("quantize the base before adding LoRA adapters")
    for name, layer in list(model.named_modules()):
        quantized = {nn.Linear: Int8Linear, nn.Conv2d: Int8Conv2d}.get(type(layer))
        if quantized is not None and name.rsplit(".", 1)[-1] not in FP32_LAYERS:
            layer.__class__ = quantized  # in place: every attribute and hook of the layer stays
            layer.quantize()
    model.requires_grad_(False)
    return model


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per output channel) with ``values * scale`` ~ ``weight``."""
    flat = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(flat / scale[:, None]).clamp(-LEVELS, LEVELS).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.reshape(-1, *[1] * (q.ndim - 1))


class _Int8Weight(torch.autograd.Function):
    """``layer(x)`` with a dequantized weight that lives only while it is used: the backward pass
    recomputes it from the saved int8 values instead of keeping an fp32 copy for every layer."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, layer):
        ctx.layer = layer
        ctx.input_shape = x.shape
        ctx.save_for_backward(q, scale)
        return layer.apply_weight(x, dequantize(q, scale), bias)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        grad_x = ctx.layer.input_grad(ctx.input_shape, dequantize(q, scale), grad) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class _Int8Weights:
    """A Linear or Conv2d whose weight, once ``quantize()`` ran, lives as int8 values and per-channel scales.

    Until then it is the plain float layer: peft builds its LoRA factors with the base layer's own
    class (``type(base_layer)(in, r, ...)``), and those must stay trainable float layers.
    """

    def quantize(self) -> None:
        q, scale = quantize_per_channel(self.weight)
        del self.weight
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def __getattr__(self, name: str):
        # the dequantized weight, made on demand (what peft and diffusers read shapes and dtypes from)
        if name == "weight" and "qweight" in self.__dict__.get("_buffers", {}):
            return dequantize(self._buffers["qweight"], self._buffers["scale"])
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "qweight" not in self._buffers:
            return super().forward(x)
        return _Int8Weight.apply(x, self.qweight, self.scale, self.bias, self)


class Int8Linear(_Int8Weights, nn.Linear):
    def apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def input_grad(self, input_shape, weight, grad):
        return grad @ weight


class Int8Conv2d(_Int8Weights, nn.Conv2d):
    def apply_weight(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def input_grad(self, input_shape, weight, grad):
        if self.padding_mode != "zeros":
            raise NotImplementedError("int8 convolutions train only with zero padding")
        return torch.nn.grad.conv2d_input(input_shape, weight, grad, self.stride, self.padding, self.dilation,
                                          self.groups)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers, as stored (int8 weights at one byte each)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
