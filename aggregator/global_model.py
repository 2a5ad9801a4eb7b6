"""The global model: one base UNet carrying every cluster's adapter by name.

Adapters are named ``cluster-<id>`` and mixed through diffusers' ``set_adapters`` with
weights, so ``generate(conditioning, mix={0: 0.5, 2: 0.5})`` draws a hybrid of two styles
from one network. The aggregator never trains this model; it only loads the adapters
its rounds produce (and the generation service samples from it).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.protocol.tensors import shapes_of
from models.backend import load_backend
from models.digits.unet import BASE_MODEL_DIR
from models.lora import (
    LoraConfig,
    adapter_names,
    add_adapter,
    delete_adapter,
    draw_adapter,
    lora_from_dict,
    lora_to_dict,
    set_adapter_state,
    set_mix,
)


def adapter_shapes(lora: LoraConfig, base_model: str | Path = BASE_MODEL_DIR) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the fleet's shared adapter: what a receiver validates payloads against
    when it holds no adapter of its own (codecs carry only a digest of them)."""
    return dict(_adapter_shapes(json.dumps(lora_to_dict(lora), sort_keys=True), str(base_model)))


@functools.lru_cache(maxsize=4)
def _adapter_shapes(lora_json: str, base_model: str) -> tuple:
    denoiser = load_backend(base_model).denoiser
    return tuple(shapes_of(draw_adapter(denoiser, lora_from_dict(json.loads(lora_json)), seed=0)).items())


def adapter_name(cluster_id: int) -> str:
    return f"cluster-{int(cluster_id)}"


class GlobalModel:
    def __init__(self, lora: LoraConfig, base_model: str | Path = BASE_MODEL_DIR) -> None:
        self.lora = lora
        self.backend = load_backend(base_model)
        self.unet.requires_grad_(False)
        self.versions: dict[int, int] = {}
        self._lock = threading.Lock()  # adapter activation is model-global state

    @property
    def unet(self) -> torch.nn.Module:
        """The base model's denoiser, carrying one adapter per cluster."""
        return self.backend.denoiser

    @property
    def clusters(self) -> list[int]:
        return sorted(self.versions)

    def set_cluster(self, cluster_id: int, adapter: Mapping[str, torch.Tensor], version: int) -> None:
        name = adapter_name(cluster_id)
        with self._lock:
            if name not in adapter_names(self.unet):
                add_adapter(self.unet, name, self.lora)
            set_adapter_state(self.unet, name, adapter)
            self.versions[int(cluster_id)] = int(version)

    def initial_adapter(self, seed: int, b_std: float = 0.0, lora: LoraConfig | None = None) -> dict[str, torch.Tensor]:
        """A fresh adapter, deterministic for ``seed``: A random, B zero (no effect yet) unless
        ``b_std`` > 0 asks for small random B too (IFCA's k starting points must differ); ``lora``
        (default: the fleet's) draws it at a device's lower rank."""
        with self._lock:
            state = draw_adapter(self.unet, lora or self.lora, seed)
        if b_std > 0:
            g = torch.Generator().manual_seed(seed)
            state = {k: torch.randn(v.shape, generator=g) * b_std if ".lora_B." in k else v for k, v in state.items()}
        return state

    def drop_cluster(self, cluster_id: int) -> None:
        with self._lock:
            delete_adapter(self.unet, adapter_name(cluster_id))
            self.versions.pop(int(cluster_id), None)

    def check_mix(self, mix: Mapping[int, float]) -> dict[str, float]:
        if not mix:
            raise ValueError("mix must name at least one cluster")
        unknown = [c for c in mix if int(c) not in self.versions]
        if unknown:
            raise ValueError(f"unknown clusters in mix: {unknown}; known: {self.clusters}")
        for w in mix.values():
            if not (isinstance(w, (int, float)) and -4.0 <= float(w) <= 4.0):
                raise ValueError(f"mix weights must be numbers in [-4, 4], got {w!r}")
        return {adapter_name(c): float(w) for c, w in mix.items()}

    def generate(self, conditioning: torch.Tensor, mix: Mapping[int, float], seed: int = 0, steps: int = 20,
                 guidance_scale: float = 2.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images for the base model's conditioning (``backend.conditioning_shape`` per row) from the
        weighted mix of cluster adapters."""
        return self.backend.decode(self.sample(conditioning, mix, seed, steps, guidance_scale, noise))

    def sample(self, conditioning: torch.Tensor, mix: Mapping[int, float], seed: int = 0, steps: int = 20,
               guidance_scale: float = 2.0, noise: torch.Tensor | None = None,
               stop: int | None = None) -> torch.Tensor:
        """Undecoded samples after the first ``stop`` of ``steps`` steps (all when None): a hybrid request's
        share of a run the device finishes (``DiffusionBackend.sample``)."""
        weights = self.check_mix(mix)
        with self._lock:
            set_mix(self.unet, weights)
            return self.backend.sample(conditioning, steps=steps, seed=seed, guidance_scale=guidance_scale,
                                       noise=noise, stop=stop)
