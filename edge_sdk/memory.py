"""How much memory a LoRA training step needs, known before the step runs.

Weights are counted at their stored size (int8 where quantized); trainable parameters
cost three times their size again (gradient, two AdamW moments); activations are
measured by running one batch-1 forward pass under ``saved_tensors_hooks``, which sees
the tensors autograd keeps for backward, and scaling by the batch size; a fixed
workspace covers the rest. ``benchmarks/edge.py`` compares the estimate with the
measured peak (docs/results.md): the aim is to err on the high side, so a step that would
not fit fails before it starts instead of being killed halfway.
"""

from __future__ import annotations

import torch

from edge_sdk.quantize import weight_bytes
from models.backend import DiffusionBackend


class MemoryBudgetExceeded(ValueError):
    """A training step would not fit the device's memory budget."""


def activation_bytes_per_sample(backend: DiffusionBackend) -> int:
    """Bytes a training step needs per sample beyond the weights (``activation_parts``, summed)."""
    return sum(activation_parts(backend).values())


ATTENTION_MATRICES = 3


def activation_parts(backend: DiffusionBackend) -> dict[str, int]:
    """Per sample: ``saved``, the bytes autograd keeps for backward (each storage once, weights excluded),
    and ``attention``, what the backward pass of the largest attention layer builds on top.

    Scaled-dot-product attention saves only its inputs and output for backward, so the hooks below
    never see its (heads, queries, keys) probabilities; the backward rebuilds them, one layer at a
    time, and holds ``ATTENTION_MATRICES`` such matrices at once: the probabilities, their gradient
    and the scores' gradient. At 64x64 latents one matrix is hundreds of MB, more than everything
    else a LoRA step of an int8 base keeps, so it is counted from the attention layers' shapes.
    """
    from diffusers.models.attention_processor import Attention

    unet = backend.denoiser
    largest_attention = 0

    def attention_shape(module: Attention, args: tuple, kwargs: dict) -> None:
        nonlocal largest_attention
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        queries = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        keys = queries if context is None else context.shape[1]
        largest_attention = max(largest_attention, ATTENTION_MATRICES * module.heads * queries * keys * 4)

    hooks = [m.register_forward_pre_hook(attention_shape, with_kwargs=True)
             for m in unet.modules() if isinstance(m, Attention)]
    weights = {_storage(p) for p in [*unet.parameters(), *unet.buffers()]}  # int8 weights are buffers
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        key = _storage(t)
        if key is not None and key not in seen and key not in weights:
            seen.add(key)
            saved += t.numel() * t.element_size()
        return t

    x = torch.zeros(1, *backend.sample_shape)
    t = torch.zeros(1, dtype=torch.long)
    enc = torch.zeros(1, *backend.conditioning_shape)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    flags = [p.requires_grad for p in unet.parameters()]
    if not trainable:  # autograd saves nothing without a trainable leaf; mimic LoRA training
        for n, p in unet.named_parameters():
            p.requires_grad_(".lora_" in n)
    was_training = unet.training
    unet.train()  # gradient checkpointing, when enabled, only acts in training mode
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backend.predict(x, t, enc)
    finally:
        unet.train(was_training)
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        for hook in hooks:
            hook.remove()
    return {"saved": saved, "attention": largest_attention}


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses (int8 weights) have no plain storage
        return None


# Allocator arenas and backward workspaces that do not scale with the model, sized from the peak
# above the loaded model that benchmarks/edge.py measures for a LoRA step (docs/results.md, "edge").
WORKSPACE_BYTES = 64 * 2**20


def estimate_training_bytes(backend: DiffusionBackend, batch_size: int) -> int:
    """A conservative estimate: every part's weights + trainable x 3 (grad, two AdamW moments) + activations
    + workspace."""
    unet = backend.denoiser
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:  # adapters are frozen between rounds; a round trains the LoRA tensors
        trainable = [p for n, p in unet.named_parameters() if ".lora_" in n]
    states = 3 * sum(p.numel() * p.element_size() for p in trainable)
    weights = sum(weight_bytes(module) for module in backend.modules().values())
    return weights + states + batch_size * activation_bytes_per_sample(backend) + WORKSPACE_BYTES
