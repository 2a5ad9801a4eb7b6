"""Adapters in the formats image tools load: diffusers, kohya (A1111, ComfyUI) and peft.

Conversions are diffusers' and peft's own (``save_lora_weights``, ``convert_state_dict_to_kohya``,
``LoraConfig.save_pretrained``), never key mangling written again. A LoRA whose keys do not all
land is the commonest failure of these formats, and it is silent (a warning, a no-op adapter),
so every file written here is read back by the loader the tools use and loaded into the model;
a key that does not land, or a value that does not survive, is a ``LoraFormatError``.

* ``diffusers``: a directory with ``pytorch_lora_weights.safetensors`` (``unet.``-prefixed peft
  keys, the ``LoraConfig`` in the header), what ``pipe.load_lora_weights(dir)`` reads.
* ``kohya``: one ``.safetensors`` with ``lora_unet_*`` keys, ``lora_down``/``lora_up`` and an
  ``.alpha`` per module (the adapter's real alpha), ``ss_*`` metadata as kohya's sd-scripts write.
* ``peft``: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from models.lora import adapter_names, delete_adapter, get_adapter_state, lora_from_dict, lora_to_dict

FORMATS = ("diffusers", "kohya", "peft")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_CHECK = "_format_check"


class LoraFormatError(ValueError):
    """An adapter file whose keys or values do not all land in the model."""


def save_lora(state: Mapping[str, torch.Tensor], lora: LoraConfig, path: str | Path, fmt: str,
              denoiser: torch.nn.Module, base_model_version: str = "") -> Path:
    """Write adapter ``state`` (peft names, config ``lora``) to ``path`` in format ``fmt``; checked by loading
    it back into ``denoiser`` (a scratch adapter, removed again). Returns the file or directory written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown adapter format {fmt!r}; choose one of {', '.join(FORMATS)}")
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    written = {"diffusers": _save_diffusers, "kohya": _save_kohya, "peft": _save_peft}[fmt](
        state, lora, path, base_model_version)
    loaded, loaded_lora = read_lora(written, fmt)
    check_lands(denoiser, state, lora, loaded, loaded_lora, f"{fmt} file {written}")
    return written


def read_lora(path: str | Path, fmt: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """An adapter file as the tools' loaders read it: peft-named tensors of the denoiser, and its config."""
    path = Path(path)
    if fmt == "diffusers":
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        state, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
        unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        config = {k[len("unet."):]: v for k, v in (metadata or {}).items() if k.startswith("unet.")}
        return unet, _config_of(config, unet)
    if fmt == "kohya":
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from diffusers.utils import convert_unet_state_dict_to_peft

        raw = load_file(path)
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw))  # kohya -> diffusers' names
        unet = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
        alpha = {float(v) for v in (alphas or {}).values()}
        if len(alpha) > 1:
            raise LoraFormatError(f"{path}: one adapter has one alpha, the file holds {sorted(alpha)}")
        return unet, _config_of({"lora_alpha": alpha.pop() if alpha else None}, unet)
    if fmt == "peft":
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(path), device="cpu")
        unet = {_peft_key(k): v for k, v in weights.items()}
        return unet, LoraConfig.from_pretrained(str(path))
    raise ValueError(f"unknown adapter format {fmt!r}; choose one of {', '.join(FORMATS)}")


def check_lands(denoiser: torch.nn.Module, state: Mapping[str, torch.Tensor], lora: LoraConfig,
                loaded: Mapping[str, torch.Tensor], loaded_lora: LoraConfig, what: str) -> None:
    """``loaded`` (as a tool reads the file) holds ``state`` exactly, with the same scale, and every key
    lands in ``denoiser``: loaded there as a scratch adapter it reads back as ``state``."""
    missing, extra = sorted(set(state) - set(loaded)), sorted(set(loaded) - set(state))
    if missing or extra:
        raise LoraFormatError(f"{what}: {len(missing)} keys do not land (e.g. {missing[:2]}), "
                              f"{len(extra)} keys are unknown (e.g. {extra[:2]})")
    changed = [k for k in state if not torch.equal(loaded[k].to(torch.float32), state[k])]
    if changed:
        raise LoraFormatError(f"{what}: {len(changed)} tensors change on the way (e.g. {changed[0]})")
    if loaded_lora.r != lora.r or float(loaded_lora.lora_alpha) != float(lora.lora_alpha):
        raise LoraFormatError(f"{what}: rank {loaded_lora.r} and alpha {loaded_lora.lora_alpha} read back, "
                              f"{lora.r} and {lora.lora_alpha} written")
    from models.lora import add_adapter, set_adapter_state

    if _CHECK in adapter_names(denoiser):
        delete_adapter(denoiser, _CHECK)
    add_adapter(denoiser, _CHECK, loaded_lora)
    try:
        try:
            set_adapter_state(denoiser, _CHECK, loaded)
        except ValueError as e:
            raise LoraFormatError(f"{what}: does not load into the model: {e}") from None
        landed = get_adapter_state(denoiser, _CHECK)
        if any(not torch.equal(landed[k], state[k]) for k in state):
            raise LoraFormatError(f"{what}: loaded into the model, its tensors differ from the adapter's")
    finally:
        delete_adapter(denoiser, _CHECK)


def _save_diffusers(state, lora, path: Path, base_model_version: str) -> Path:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionLoraLoaderMixin.save_lora_weights(path, unet_lora_layers=state, weight_name=DIFFUSERS_WEIGHTS,
                                                     unet_lora_adapter_metadata=_metadata(lora))
    return path


def _save_kohya(state, lora, path: Path, base_model_version: str) -> Path:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    if path.suffix != ".safetensors":
        raise ValueError(f"a kohya adapter is one .safetensors file, got {path}")
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    alpha = torch.tensor(float(lora.lora_alpha))  # the converter writes alpha = rank; the adapter's is kept
    kohya = {k: alpha.clone() if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.r),
                "ss_network_alpha": f"{float(lora.lora_alpha):g}", "ss_base_model_version": base_model_version,
                "ss_output_name": path.stem, "ss_training_comment": "fedaigc federated LoRA"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, path, metadata=metadata)
    return path


def _save_peft(state, lora, path: Path, base_model_version: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = lora_from_dict(lora_to_dict(lora))
    config.base_model_name_or_path = base_model_version or None
    config.save_pretrained(str(path))
    save_file({PEFT_PREFIX + k: v for k, v in state.items()}, path / PEFT_WEIGHTS, metadata={"format": "pt"})
    return path


def _metadata(lora: LoraConfig) -> dict:
    """What diffusers keeps in the header to rebuild the adapter's ``LoraConfig`` (its alpha above all)."""
    return lora_to_dict(lora) | {"init_lora_weights": True}


def _config_of(metadata: Mapping, state: Mapping[str, torch.Tensor]) -> LoraConfig:
    """The config a loader builds from a file: its metadata, else the rank read off the tensors."""
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise LoraFormatError(f"an adapter has one rank, the file holds {sorted(ranks)}")
    rank = int(metadata.get("r", ranks.pop()))
    # without a config, the modules the tensors belong to, by their full paths (peft matches them exactly)
    targets = metadata.get("target_modules") or sorted({k.split(".lora_")[0] for k in state})
    alpha = metadata.get("lora_alpha")
    return lora_from_dict({"r": rank, "lora_alpha": float(alpha) if alpha is not None else rank,
                           "target_modules": list(targets)})


def _peft_key(key: str) -> str:
    """peft's saved names (``base_model.model.<module>.lora_A.weight``) as the model's adapter names."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
