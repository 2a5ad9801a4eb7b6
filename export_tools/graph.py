"""The denoiser as an exportable graph: ``forward(x, t, conditioning) -> eps`` over a copy of the UNet.

Numerically the same network as the backend's eager call (``DiffusionBackend.run``), spelled
with ops XNNPACK delegates: GroupNorm and LayerNorm as 4-D means (XNNPACK's mean reduces
the two innermost dims of a 4-D tensor; it has no group- or layer-norm op), attention as
``bmm → softmax → bmm`` (SDPA's decomposition adds masking ops that split the graph into
~100 delegate partitions; this spelling gives 7). The timestep is a float tensor, one per
row, since Core ML has no int64 inputs and the UNet casts it to float anyway.

peft's LoRA layers are left as they are: an adapter stays a separate pair of weights in
the graph, which is what lets its data be swapped after export.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.backend import DiffusionBackend


class GroupNorm4d(nn.Module):
    """``nn.GroupNorm`` over (n, c, h, w) through a (n, groups, c/groups, h·w) view."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        y = _normalize(x.reshape(n, self.groups, c // self.groups, -1), self.eps).reshape(x.shape)
        affine = (1, c) + (1,) * (x.ndim - 2)
        return y * self.weight.reshape(affine) + self.bias.reshape(affine)


class LayerNorm4d(nn.Module):
    """``nn.LayerNorm`` over the last dim of (n, tokens, c) through a (n, tokens, c, 1) view."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError("only a LayerNorm over the last dimension is rewritten")
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, c = x.shape
        y = _normalize(x.reshape(n, tokens, c, 1), self.eps).reshape(n, tokens, c)
        return y * self.weight + self.bias if self.weight is not None else y


def _normalize(x4: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x4.mean(dim=(2, 3), keepdim=True)
    centred = x4 - mean
    var = (centred * centred).mean(dim=(2, 3), keepdim=True)
    return centred * torch.rsqrt(var + eps)


class BmmAttnProcessor:
    """diffusers attention as two batched matmuls and a softmax (no mask, no SDPA)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("BmmAttnProcessor covers the denoiser's attention: no mask, no spatial norm")
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:
            n, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(n, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, s, d = q.shape
        tokens, heads = k.shape[1], attn.heads
        hd = d // heads
        q = q.reshape(b, s, heads, hd).permute(0, 2, 1, 3).reshape(b * heads, s, hd)
        k = k.reshape(b, tokens, heads, hd).permute(0, 2, 3, 1).reshape(b * heads, hd, tokens)
        v = v.reshape(b, tokens, heads, hd).permute(0, 2, 1, 3).reshape(b * heads, tokens, hd)
        probs = torch.softmax(torch.bmm(q * attn.scale, k), dim=-1)
        out = torch.bmm(probs, v).reshape(b, heads, s, hd).permute(0, 2, 1, 3).reshape(b, s, d)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(1, 2).reshape(n, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ExportableDenoiser(nn.Module):
    """``forward(x, t, conditioning)``: the denoiser's output, the call the sampler makes each step."""

    def __init__(self, unet: nn.Module, backend: DiffusionBackend) -> None:
        super().__init__()
        self.unet = unet
        self.run = backend.run  # the model's conditioning convention, applied to this copy

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        return self.run(self.unet, x, t, conditioning)


def exportable(unet: nn.Module, backend: DiffusionBackend) -> ExportableDenoiser:
    """An export-friendly copy of ``unet`` (adapters and their activation included); ``unet`` is untouched."""
    unet = copy.deepcopy(unet).eval()
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, GroupNorm4d(child))
            elif isinstance(child, nn.LayerNorm):
                setattr(parent, name, LayerNorm4d(child))
    unet.set_attn_processor(BmmAttnProcessor())
    unet.requires_grad_(False)
    return ExportableDenoiser(unet, backend)
