"""LoRA adapters on the denoiser, by name, through peft and diffusers' adapter API.

Adapters are addressed by name ("cluster-3", "personal", ...), their tensors travel as
plain ``dict[str, Tensor]`` in peft's naming (``<module>.lora_A.weight``) so they are
safetensors-ready, and several adapters can be active at once with weights for hybrid
styles. Nothing here hand-rolls a LoRA layer: peft owns the layers, we own the bookkeeping.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

# The LoRA targets that suit each model family, as peft keeps one table per architecture; the
# fleet's LoraConfig may name others. Digits (docs/results.md, "LoRA targets", says why):
# attention values/outputs read the prompt, the class-embedding projection and the ResNets' time
# projections turn it into per-block modulation, and the input/output and first ResNet
# convolutions carry the spatial part of a style (slant, frames) that attention alone misses.
# Stable Diffusion: every attention projection, as diffusers' own LoRA training scripts adapt.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "digits": ("to_v", "to_out.0", "linear_1", "linear_2", "time_emb_proj", "conv_in", "conv_out", "conv1"),
    "stable-diffusion": ("to_q", "to_k", "to_v", "to_out.0"),
}
DEFAULT_RANK = 2
_WIRE_FIELDS = ("r", "lora_alpha", "target_modules")


def lora_config(rank: int = DEFAULT_RANK, alpha: float | None = None,
                target_modules: Iterable[str] = DEFAULT_TARGETS["digits"]) -> LoraConfig:
    """peft's ``LoraConfig``, the one adapter configuration: a fleet owns it and sends it in every
    round start (``lora_to_dict``); ``alpha=None`` means alpha = rank, a scale of 1. The default
    targets are the bundled model's; other models pass their backend's ``default_targets``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                  and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    targets = sorted(set(target_modules)) if not isinstance(target_modules, str) else []
    if not targets or not all(isinstance(t, str) and t and len(t) <= 128 for t in targets):
        raise ValueError(f"LoRA needs target module names, got {target_modules!r}")
    # init_lora_weights=True: A Kaiming-uniform, B zero, so a new adapter changes nothing
    return LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), target_modules=targets,
                      init_lora_weights=True)


def lora_scale(config: LoraConfig) -> float:
    """The factor peft multiplies B·A by: ΔW = scale · B · A."""
    return config.lora_alpha / config.r


def lora_to_dict(config: LoraConfig) -> dict:
    """What of a ``LoraConfig`` shapes an adapter, as plain values (the wire, TOML, adapter metadata)."""
    return {"r": int(config.r), "lora_alpha": float(config.lora_alpha), "target_modules": sorted(config.target_modules)}


def lora_from_dict(raw: Mapping, default_targets: Iterable[str] = DEFAULT_TARGETS["digits"]) -> LoraConfig:
    """The inverse of ``lora_to_dict``; a missing, unknown or mistyped field is a ``ValueError`` naming it
    (``target_modules`` may be left out: the model's ``default_targets``)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a LoRA config is a table of {', '.join(_WIRE_FIELDS)}, got {type(raw).__name__}")
    unknown = sorted(map(str, set(raw) - set(_WIRE_FIELDS)))
    if unknown or "r" not in raw:
        raise ValueError(f"a LoRA config has the fields {', '.join(_WIRE_FIELDS)} (r required); got {sorted(map(str, raw))}")
    targets = raw.get("target_modules", tuple(default_targets))
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"LoRA target_modules must be a list of module names, got {type(targets).__name__}")
    return lora_config(raw["r"], raw.get("lora_alpha"), targets)


def same_lora(a: LoraConfig, b: LoraConfig) -> bool:
    return lora_to_dict(a) == lora_to_dict(b)


def add_adapter(unet: torch.nn.Module, name: str, config: LoraConfig, seed: int = 0) -> None:
    """Attach a fresh adapter ``name``; its initial A is deterministic for ``seed``."""
    if name in adapter_names(unet):
        raise ValueError(f"adapter {name!r} already exists")
    with torch.random.fork_rng(), warnings.catch_warnings():
        # peft warns on every second adapter and on quantized bases; both are what we intend
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        torch.manual_seed(seed)
        unet.add_adapter(copy.deepcopy(config), adapter_name=name)  # peft keeps (and may amend) the object


def draw_adapter(unet: torch.nn.Module, config: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """A fresh adapter for ``seed`` (A: peft's Kaiming-uniform init, B: zero) that an aggregator
    and a device each compute to agree on round 1 without sending it.

    A is drawn from a private generator, not torch's global one: ``add_adapter``'s seeding of
    the global RNG is not private to a thread, and a device process training another device
    meanwhile made two draws of the same seed differ (measured in the simulator).
    """
    scratch = "_drawn"
    add_adapter(unet, scratch, config, seed=seed)
    try:
        state = get_adapter_state(unet, scratch)
    finally:
        delete_adapter(unet, scratch)
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(state[name], a=math.sqrt(5), generator=generator)
    return state


def adapter_names(unet: torch.nn.Module) -> list[str]:
    return list(getattr(unet, "peft_config", {}) or {})


# peft warns when the adapter it deletes was active and re-activates another; every caller here sets
# its mix explicitly before use. A process-wide filter, because catch_warnings() is not thread-safe
# (devices draw adapters on paho's thread while another trains).
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")


def delete_adapter(unet: torch.nn.Module, name: str) -> None:
    _require(unet, name)
    unet.delete_adapters(name)


def get_adapter_state(unet: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A detached copy of adapter ``name``'s tensors, keyed like ``<module>.lora_A.weight``."""
    _require(unet, name)
    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def set_adapter_state(unet: torch.nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Load tensors into adapter ``name``; names and shapes must match exactly."""
    check_adapter_state(get_adapter_state(unet, name), state)
    set_peft_model_state_dict(unet, {k: v.to(torch.float32) for k, v in state.items()}, adapter_name=name)


def check_adapter_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first difference in keys or shapes."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(reference[k].shape)}")


def set_mix(unet: torch.nn.Module, weights: Mapping[str, float]) -> None:
    """Activate adapters with weights (``{"cluster-0": 0.5, "cluster-1": 0.5}``); empty = base only."""
    if not weights:
        if adapter_names(unet):
            unet.disable_adapters()
        return
    for name in weights:
        _require(unet, name)
    unet.enable_adapters()
    unet.set_adapters(list(weights), weights=[float(w) for w in weights.values()])


def merge_adapters(unet: torch.nn.Module, weights: Mapping[str, float]) -> None:
    """Fold the weighted adapters into the base weights (for export or faster sampling)."""
    set_mix(unet, weights)
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=list(weights))


def base_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under their original names, whatever adapters sit on top."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def trainable_share(unet: torch.nn.Module, name: str) -> float:
    """Adapter parameters as a fraction of the base model's parameters."""
    adapter = sum(v.numel() for v in get_peft_model_state_dict(unet, adapter_name=name).values())
    total = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
    return adapter / total


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes that have both an A and a B factor, in a stable order."""
    modules = sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    for m in modules:
        if f"{m}.lora_B.weight" not in state:
            raise ValueError(f"adapter tensor {m}.lora_B.weight is missing")
    return modules


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B · A as a 2-D matrix (convolutions flattened to out x in·k·k)."""
    return scale * (b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double())


def factorize(delta: torch.Tensor, rank: int, a_shape, b_shape, scale: float,
              a_row_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A, B) with scale·B·A ≈ ``delta`` (truncated SVD).

    Any split of the singular values between A and B gives the same product, but not the same
    training afterwards: an optimizer step on B moves ΔW in proportion to A's size and one on A in
    proportion to B's. ``a_row_norm`` gives A's rows that norm (B carries the singular values), so
    an adapter keeps the balance it was trained with; ``None`` splits them evenly (sqrt(s) in each),
    which makes both factors small when ΔW is and slows the next training down (issue 18).
    """
    u, s, vh = torch.linalg.svd(delta / scale, full_matrices=False)
    k = min(rank, s.shape[0])
    if a_row_norm is None:
        left = right = s[:k].sqrt()
    else:
        if not (math.isfinite(a_row_norm) and a_row_norm > 0):
            raise ValueError(f"a_row_norm must be a finite number > 0, got {a_row_norm!r}")
        left, right = s[:k] / a_row_norm, torch.full_like(s[:k], a_row_norm)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * left
    a[:k] = right[:, None] * vh[:k]
    return a.reshape(a_shape).float(), b.reshape(b_shape).float()


def row_norm(a: torch.Tensor) -> float | None:
    """The root-mean-square norm of a LoRA A factor's rows (None if A is all zero)."""
    flat = a.reshape(a.shape[0], -1).double()
    norm = float(flat.pow(2).sum(dim=1).mean().sqrt())
    return norm if norm > 0 and math.isfinite(norm) else None


def _require(unet: torch.nn.Module, name: str) -> None:
    if name not in adapter_names(unet):
        raise ValueError(f"no adapter named {name!r}; adapters: {adapter_names(unet)}")
