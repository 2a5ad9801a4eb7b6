"""Device configuration: a named hardware profile plus the app's own overrides.

A profile encodes what a class of device can afford (threads, a memory budget for the
training step, batch size, whether the frozen base is int8 and activations recomputed,
and the largest LoRA rank it will train). The adapter's shape itself is the fleet's: the
aggregator's LoRA config arrives with every round start. ``DeviceConfig`` starts from a
profile and lets the app override any field; it validates everything up front so a bad
setting fails at construction, not in the middle of a round.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_sdk.privacy import MIN_SECRET_BYTES, DPConfig
from edge_sdk.protocol.topics import check_device_id
from models.digits.unet import BASE_MODEL_DIR
from models.training import LORA_LR

QUANTIZATION_MODES = ("int8", "none")
# What stays on the device: "none" (the shared adapter only, the default), "dual" (plus a personal
# adapter trained jointly) or "residual" (a personal adapter trained on top); docs/device-sdk.md
# says when each pays and docs/results.md what benchmarks/personalization.py measured.
PERSONALIZATION_MODES = ("none", "dual", "residual")
INFERENCE_BACKENDS = ("eager", "executorch")
TRAINING_BACKENDS = ("eager", "executorch")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    threads: int
    memory_budget_mb: int  # for the training step: weights, adapters, gradients, optimizer, activations
    max_lora_rank: int     # the largest shared-adapter rank this device trains (the fleet chooses the rank)
    batch_size: int
    quantization: str
    local_steps: int
    gradient_checkpointing: bool  # recompute activations in backward: less memory for more time


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("raspberry-pi-4", "Raspberry Pi 4 class: 4 Cortex-A72 cores, 1 GB for training",
                      threads=4, memory_budget_mb=1024, max_lora_rank=4, batch_size=16, quantization="int8",
                      local_steps=20, gradient_checkpointing=True),
        DeviceProfile("jetson-orin-nano", "Jetson Orin Nano class: 6 Cortex-A78AE cores, 8 GB shared",
                      threads=6, memory_budget_mb=3072, max_lora_rank=8, batch_size=32, quantization="int8",
                      local_steps=40, gradient_checkpointing=False),
        DeviceProfile("apple-m", "Apple M-series class: 8+ cores, 16 GB unified memory",
                      threads=8, memory_budget_mb=6144, max_lora_rank=16, batch_size=64, quantization="none",
                      local_steps=40, gradient_checkpointing=False),
        DeviceProfile("simulator", "a simulated device sharing a CI machine: 1 thread, small steps",
                      threads=1, memory_budget_mb=1024, max_lora_rank=8, batch_size=16, quantization="int8",
                      local_steps=20, gradient_checkpointing=False),
    )
}


@dataclass(frozen=True)
class DeviceConfig:
    data_dir: Path
    device_id: str = field(default_factory=lambda: f"dev-{uuid.uuid4().hex[:12]}")
    profile: str = "raspberry-pi-4"
    threads: int | None = None
    memory_budget_mb: int | None = None
    max_lora_rank: int | None = None
    batch_size: int | None = None
    quantization: str | None = None
    local_steps: int | None = None
    gradient_checkpointing: bool | None = None
    lr: float = LORA_LR
    personalization: str = "none"
    personal_rank: int = 1
    # privacy (edge_sdk/privacy.py; defaults as chosen by benchmarks/privacy.py, except the secret)
    task_noise: float = 0.6  # expected norm of Gaussian noise added to the normalised task vector
    task_prompt_count: int | None = None  # prompts averaged into the task vector (None: all of them)
    fleet_secret: bytes | None = field(default=None, repr=False)  # >= 16 random bytes every device of the fleet
    #   shares and the aggregator never gets: rotates task vectors so a public-encoder attack misses; None: off
    update_dp: DPConfig | None = None  # clip + Gaussian noise on every shared-adapter delta before it leaves
    enrolment_token: str = ""
    aggregator_fingerprint: str | None = None  # pin the aggregator's keys (a provisioning bundle sets it)
    trust_on_first_use: bool = False  # without a fingerprint, trust the first key announced (else: refuse to start)
    base_model: Path = BASE_MODEL_DIR
    inference_backend: str = "eager"  # "executorch": sample through export_dir's program (executorch_backend.py)
    export_dir: Path | None = None  # a `fedaigc export --format executorch` directory built from base_model
    training_backend: str = "eager"  # "executorch": train the shared adapter through training_export_dir's program
    training_export_dir: Path | None = None  # a `fedaigc export --format executorch-training` directory (same base)
    seed: int = 0

    def __post_init__(self) -> None:
        check_device_id(self.device_id)  # it is a level of this device's topics and its broker user name
        if self.profile not in PROFILES:
            raise ValueError(f"unknown device profile {self.profile!r}; known: {', '.join(PROFILES)}")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "base_model", Path(self.base_model))
        _positive("threads", self.effective("threads"))
        _positive("memory_budget_mb", self.effective("memory_budget_mb"))
        _positive("max_lora_rank", self.effective("max_lora_rank"))
        _positive("batch_size", self.effective("batch_size"))
        _positive("personal_rank", self.personal_rank)
        if self.effective("local_steps") < 0 or not isinstance(self.effective("local_steps"), int):
            raise ValueError(f"local_steps must be a non-negative integer, got {self.local_steps!r}")
        if self.effective("quantization") not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}")
        if self.personalization not in PERSONALIZATION_MODES:
            raise ValueError(f"personalization must be one of {PERSONALIZATION_MODES}, got {self.personalization!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.task_noise < float("inf"):
            raise ValueError(f"task_noise must be >= 0, got {self.task_noise}")
        if self.task_prompt_count is not None:
            _positive("task_prompt_count", self.task_prompt_count)
        if self.fleet_secret is not None and (not isinstance(self.fleet_secret, bytes)
                                              or len(self.fleet_secret) < MIN_SECRET_BYTES):
            raise ValueError(f"fleet_secret must be None or at least {MIN_SECRET_BYTES} random bytes")
        if isinstance(self.update_dp, Mapping):  # e.g. from a TOML table
            object.__setattr__(self, "update_dp", DPConfig.from_dict(self.update_dp))
        if self.update_dp is not None and not isinstance(self.update_dp, DPConfig):
            raise ValueError(f"update_dp must be a DPConfig or None, got {type(self.update_dp).__name__}")
        if self.inference_backend not in INFERENCE_BACKENDS:
            raise ValueError(f"inference_backend must be one of {INFERENCE_BACKENDS}, got {self.inference_backend!r}")
        if self.inference_backend == "executorch" and self.export_dir is None:
            raise ValueError("inference_backend='executorch' needs export_dir (`fedaigc export --format executorch`)")
        if self.export_dir is not None:
            object.__setattr__(self, "export_dir", Path(self.export_dir))
        if self.training_backend not in TRAINING_BACKENDS:
            raise ValueError(f"training_backend must be one of {TRAINING_BACKENDS}, got {self.training_backend!r}")
        if self.training_backend == "executorch":
            if self.training_export_dir is None:
                raise ValueError("training_backend='executorch' needs training_export_dir "
                                 "(`fedaigc export --format executorch-training`)")
            if self.personalization != "none":  # the program has one trainable adapter: the shared one
                raise ValueError("training_backend='executorch' trains the shared adapter only; "
                                 f"personalization={self.personalization!r} needs the eager trainer")
            object.__setattr__(self, "training_export_dir", Path(self.training_export_dir))

    def effective(self, name: str):
        """The override if the app set one, else the profile's value."""
        value = getattr(self, name)
        return getattr(PROFILES[self.profile], name) if value is None else value

    def with_overrides(self, **changes) -> "DeviceConfig":
        return replace(self, **changes)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
