"""ExecuTorch programs of a latent model's other parts: the VAE decoder and the text encoder.

A device that samples through an exported denoiser still turns prompts into conditioning and
latents into images; for a Stable-Diffusion-family pipeline those are ``text_encoder.pte``
(token ids -> the last hidden state) and ``vae_decoder.pte`` (latents -> images in [-1, 1]),
written beside the denoiser's program, fp32, XNNPACK-delegated, with their parity against the
eager parts measured at export. They hold no adapter, so they are exported once per base model.
The VAE keeps its own attention spelling (its mid-block attention has a group norm, which the
denoiser's bmm spelling does not cover); its GroupNorms take the 4-D spelling XNNPACK delegates.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from export_tools.graph import GroupNorm4d
from models.backend import DiffusionBackend


class VaeDecoder(nn.Module):
    """``forward(latents) -> images in [-1, 1]``: the sampler's last step before ``(x + 1) / 2``."""

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


class TextEncoder(nn.Module):
    """``forward(token_ids) -> last hidden state``: the conditioning of tokenized prompts."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(token_ids)[0]


def encoder_parts(backend: DiffusionBackend, xnnpack: bool = False) -> dict[str, tuple[nn.Module, tuple]]:
    """``{"text_encoder": (module, example), "vae_decoder": ...}``: copies of the backend's encoders as
    exportable modules with example inputs; ``{}`` for a backend without them (the bundled pixel-space
    model). ``xnnpack`` gives the VAE's GroupNorms the 4-D spelling XNNPACK delegates."""
    parts = backend.modules()
    if "vae" not in parts or "text_encoder" not in parts:
        return {}
    tokens = backend.tokenizer(["a photo"], padding="max_length", max_length=backend.conditioning_shape[0],
                               truncation=True, return_tensors="pt").input_ids
    latents = torch.randn(1, *backend.sample_shape, generator=torch.Generator().manual_seed(0))
    vae = copy.deepcopy(backend.vae)
    return {"text_encoder": (TextEncoder(copy.deepcopy(backend.text_encoder)).eval(), (tokens,)),
            "vae_decoder": (VaeDecoder(_xnnpack_norms(vae) if xnnpack else vae, backend.scaling_factor).eval(),
                            (latents,))}


def export_encoders(backend: DiffusionBackend, out_dir: str | Path) -> dict[str, dict]:
    """Write the backend's text encoder and VAE decoder programs to ``out_dir``; ``{file: parity}``."""
    out = Path(out_dir)
    return {f"{name}.pte": _export(module, example, out / f"{name}.pte")
            for name, (module, example) in encoder_parts(backend, xnnpack=True).items()}


def _xnnpack_norms(module: nn.Module) -> nn.Module:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, GroupNorm4d(child))
    return module


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> dict:
    """Lower ``module`` for XNNPACK to ``path`` and measure it against the eager module on ``example``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    with torch.no_grad():
        reference = module(*example)
        program = to_edge_transform_and_lower(torch.export.export(module, example, strict=False),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    output = Runtime.get().load_program(program.buffer).load_method("forward").execute(list(example))[0]
    return {"max_abs_err": float((output - reference).abs().max()), "reference_max_abs": float(reference.abs().max()),
            "inputs": {"shape": list(example[0].shape), "dtype": str(example[0].dtype).removeprefix("torch.")}}
