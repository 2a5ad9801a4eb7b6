"""``EdgeClient``: everything a device app needs, usable fully offline.

(Over 350 lines: it is the SDK's one public object; training, inference, keys and the adapter
store are short methods over one model, and moving them apart would split that model's state.)

The client owns the device's identity keys, the frozen (optionally int8) base UNet with
a *shared* adapter (the cluster's, aggregated across devices) and a *personal* adapter
(never leaves the device), the prompt encoder and the adapter store. Networking lives
elsewhere (``edge_sdk.session``): this object only turns local data into payloads and
payloads into a better local model.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from edge_sdk.artifacts.manifest import model_digest, part_digests
from edge_sdk.config import DeviceConfig
from edge_sdk.memory import MemoryBudgetExceeded, estimate_training_bytes
from edge_sdk.privacy import (
    PrivacyLedger,
    fleet_rotation,
    keyed_rng,
    privatize_update,
    sample_prompts,
    task_vector_from_encodings,
)
from edge_sdk.protocol.codecs import ErrorFeedback, make_codec
from edge_sdk.protocol.errors import RefusedMessage
from edge_sdk.protocol.files import atomic_write_bytes
from edge_sdk.protocol.identity import Identity, PublicIdentity, seal_to
from edge_sdk.protocol.messages import UpdateBody
from edge_sdk.protocol.tensors import pack_tensors
from edge_sdk.quantize import quantize_base
from edge_sdk.store import AdapterStore
from models.backend import load_backend
from models.lora import (
    DEFAULT_RANK,
    LoraConfig,
    adapter_names,
    add_adapter,
    delete_adapter,
    draw_adapter,
    get_adapter_state,
    lora_config,
    lora_from_dict,
    lora_to_dict,
    same_lora,
    set_adapter_state,
    set_mix,
)
from models.lora_formats import save_lora
from models.text import PromptEncoder
from models.training import TrainConfig, evaluation_loss, train_adapters

log = logging.getLogger("fedaigc.edge")

SHARED = "shared"
PERSONAL = "personal"


class HybridServer(Protocol):
    """What runs the first steps of a hybrid generation: a ``FederatedSession`` while it is started."""

    def sample_remote(self, encoding: torch.Tensor, n: int, seed: int, steps: int, server_steps: int,
                      timeout: float) -> torch.Tensor: ...


@dataclass(frozen=True)
class Generation:
    """How the last ``EdgeClient.generate`` call was served, so an app can tell a fallback from a hybrid run.

    ``local``: the device ran every step (``server_steps=0``); ``hybrid``: the aggregator ran the first
    ``server_steps`` and the device the rest; ``fallback``: a hybrid call the server did not serve
    (``reason`` says why), sampled locally instead.
    """
    mode: Literal["local", "hybrid", "fallback"]
    server_steps: int
    reason: str = ""


@dataclass(frozen=True)
class LocalData:
    """A device's own training data: images ``(n, C, H, W)`` in [0, 1] and the prompt the user gave for each.

    The base model checks the images' shape and values when it trains on them
    (``DiffusionBackend.check_images`` names what it takes).
    """

    images: torch.Tensor
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise ValueError(f"images must be a tensor shaped (n, channels, height, width), "
                             f"got {getattr(self.images, 'shape', type(self.images).__name__)}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if len(self.prompts) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {len(self.prompts)} prompts")
        if len(self.prompts) == 0:
            raise ValueError("local data is empty")

    @classmethod
    def from_persona(cls, persona) -> "LocalData":
        return cls(persona.train_images, tuple(persona.train_prompts))


@dataclass(frozen=True)
class Update:
    """What a round produces: the shared adapter's change, and how much data made it."""

    delta: dict[str, torch.Tensor]
    samples: int
    steps: int
    loss_before: float
    loss_after: float
    base_version: int
    epsilon: float = -1.0   # privacy spent by this device once the update is out (-1: sent without DP)
    dp_delta: float = 0.0   # the delta that epsilon is stated at


class EdgeClient:
    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.effective("threads"))
        self.store = AdapterStore(self.data_dir / "adapters")
        self.identity = self._load_or_create_identity()
        self.aggregator: PublicIdentity | None = None
        self.privacy = PrivacyLedger(self.data_dir / "privacy.json")
        self._rotation = None if config.fleet_secret is None else fleet_rotation(config.fleet_secret)
        self.encoder = PromptEncoder()  # task vectors (whatever the model's own text encoder is)
        self._task_cache: dict[str, np.ndarray] = {}
        self._conditioning_cache: dict[str, torch.Tensor] = {}
        self.backend = load_backend(config.base_model)
        self._part_digests = part_digests(self.backend)  # of the full-precision weights, before quantizing
        # the fleet's LoRA config replaces this one with its first round start (``adopt_lora``)
        self.shared_lora = lora_config(min(DEFAULT_RANK, config.effective("max_lora_rank")),
                                       target_modules=self.backend.default_targets)
        if config.effective("quantization") == "int8":
            quantize_base(self.unet)
        if config.effective("gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()
        self.unet.requires_grad_(False)
        add_adapter(self.unet, SHARED, self.shared_lora, seed=config.seed)
        if config.personalization in ("dual", "residual"):
            add_adapter(self.unet, PERSONAL, lora_config(config.personal_rank, target_modules=self.backend.default_targets),
                        seed=config.seed + 1)
            # B starts at zero, so a fresh personal adapter changes nothing until trained
        self.shared_version = 0
        self._executorch = None  # the exported program (inference_backend="executorch"), loaded on first use
        self._trainer = None  # the exported training program (training_backend="executorch"), loaded on first use
        self.hybrid_server: HybridServer | None = None  # set by a started FederatedSession
        self.last_generation: Generation | None = None
        self.load()
        self.check_memory(config.effective("batch_size"))  # a model the profile cannot train is refused now

    @property
    def unet(self) -> torch.nn.Module:
        """The base model's denoiser, which carries this device's adapters."""
        return self.backend.denoiser

    # ---------------------------------------------------------------- identity
    @property
    def device_id(self) -> str:
        return self.config.device_id

    def _load_or_create_identity(self) -> Identity:
        path = self.data_dir / "identity.key"
        if path.exists():
            return Identity.load(path)
        identity = Identity.generate()
        identity.save(path)
        return identity

    def _task_key(self) -> bytes:
        """The device-local key of the task vector's random draws (never leaves the device)."""
        path = self.data_dir / "privacy.key"
        if not path.exists():
            atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
        return path.read_bytes()

    def set_aggregator(self, aggregator: PublicIdentity, handed_over_from: str | None = None) -> None:
        """Accept the aggregator's public keys, checking the pinned fingerprint if one is set:
        ``handed_over_from`` names the pin whose signed hand-over (checked by the caller) led to them."""
        pinned = self.config.aggregator_fingerprint
        if pinned is not None and pinned not in (aggregator.fingerprint, handed_over_from):
            raise ValueError(f"aggregator key fingerprint {aggregator.fingerprint} does not match the pinned {pinned}")
        self.aggregator = aggregator

    def _require_aggregator(self) -> PublicIdentity:
        if self.aggregator is None:
            raise RuntimeError("the aggregator's public keys are not known yet; call set_aggregator() first")
        return self.aggregator

    # ---------------------------------------------------------------- prompts
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """MiniLM encodings of prompts: what task vectors are made of (cached per prompt)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._task_cache]
        if missing:
            for p, v in zip(missing, self.encoder.encode(missing)):
                self._task_cache[p] = v
        return np.stack([self._task_cache[p] for p in prompts])

    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """The base model's own conditioning of prompts (cached per prompt); it never leaves the device
        in clear."""
        if self.backend.conditioning_is_task_encoding:
            return torch.from_numpy(self.encode(prompts))
        missing = [p for p in dict.fromkeys(prompts) if p not in self._conditioning_cache]
        if missing:
            for p, v in zip(missing, self.backend.encode_prompts(missing)):
                self._conditioning_cache[p] = v
        return torch.stack([self._conditioning_cache[p] for p in prompts])

    def task_vector(self, prompts: Sequence[str], seed: int | None = None) -> np.ndarray:
        """The defended task vector (``edge_sdk.privacy``): the mean encoding of ``task_prompt_count`` of the
        prompts, plus noise of expected norm ``task_noise``, unit length, rotated if a fleet secret is set.

        The draws (which prompts, which noise) are keyed by a device-local secret and the set of
        prompts, so sending the same prompts again sends the same vector; ``seed`` overrides the key.
        """
        if not prompts:
            raise ValueError("task_vector needs at least one prompt")
        rng = keyed_rng(self._task_key(), prompts) if seed is None else np.random.default_rng(seed)
        chosen = sample_prompts(sorted(prompts), self.config.task_prompt_count, rng)
        return task_vector_from_encodings(self.encode(chosen), self.config.task_noise, rng, self._rotation)

    def task_payload(self, prompts: Sequence[str]) -> bytes:
        """The sealed task vector: only the aggregator's private key opens it; no prompt text inside."""
        aggregator = self._require_aggregator()
        vector = torch.from_numpy(self.task_vector(prompts))
        return seal_to(aggregator.box_key, pack_tensors({"task": vector}))

    # ---------------------------------------------------------------- training
    def train_round(self, cluster_adapter: Mapping[str, torch.Tensor] | None, data: LocalData,
                    steps: int | None = None, version: int = 0, seed: int | None = None) -> Update:
        """Start from the cluster's shared adapter, train locally, return the shared part's delta."""
        steps = self.config.effective("local_steps") if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if cluster_adapter is not None:
            set_adapter_state(self.unet, SHARED, cluster_adapter)
            self.shared_version = version
        start = get_adapter_state(self.unet, SHARED)
        samples, conditioning = self._model_inputs(data)
        eval_seed = self.config.seed if seed is None else seed
        set_mix(self.unet, self.default_mix())
        before = self._probe_loss(samples, conditioning, eval_seed)
        mode = self.config.personalization
        if mode == "dual":  # shared and personal adapters learn together
            self._train([SHARED, PERSONAL], self.default_mix(), samples, conditioning, steps, eval_seed + version)
        else:  # the shared adapter learns alone, so it carries everything the cluster can share ...
            self._train([SHARED], {SHARED: 1.0}, samples, conditioning, steps, eval_seed + version)
            if mode == "residual":  # ... and the personal adapter then fits only what it could not
                personal_steps = max(1, steps // 2) if steps else 0
                self._train([PERSONAL], self.default_mix(), samples, conditioning, personal_steps,
                            eval_seed + version + 1)
        set_mix(self.unet, self.default_mix())
        after = self._probe_loss(samples, conditioning, eval_seed)
        end = get_adapter_state(self.unet, SHARED)
        self.save()
        delta = {k: end[k] - start[k] for k in end}
        dp = self.config.update_dp
        if dp is not None:  # clipped and noised here: the raw delta never leaves this method
            delta, _ = privatize_update(delta, dp)
        epsilon = self.privacy.record(dp)  # persisted before the update can leave
        return Update(delta, len(data.prompts), steps, before, after, version, epsilon, dp.delta if dp else 0.0)

    def local_loss(self, adapter: Mapping[str, torch.Tensor], data: LocalData) -> float:
        """The denoising loss of our data under a candidate shared adapter (IFCA's cluster choice)."""
        set_adapter_state(self.unet, SHARED, adapter)
        set_mix(self.unet, self.default_mix())
        return self._probe_loss(*self._model_inputs(data), self.config.seed)

    def _model_inputs(self, data: LocalData) -> tuple[torch.Tensor, torch.Tensor]:
        """The data in the denoiser's space: samples (the VAE encodes once per round, not per step) and
        conditioning; images the model cannot take are refused here, naming what it takes."""
        with torch.no_grad():
            return self.backend.encode_images(data.images), self.conditioning(data.prompts)

    def _probe_loss(self, samples: torch.Tensor, conditioning: torch.Tensor, seed: int) -> float:
        """The loss on a fixed probe of the local data: cheap, and comparable before and after training."""
        probe = slice(0, 64)
        return evaluation_loss(self.backend, samples[probe], conditioning[probe], seed=seed, repeats=4)

    def adopt_lora(self, lora: LoraConfig) -> None:
        """Shape the shared adapter by the LoRA config round starts carry: the fleet's, at the rank this
        device enrolled with (``enrolment_rank``).

        A config over this device's ``max_lora_rank`` is refused: the profile says what the device
        can afford to train. A changed config starts the shared adapter afresh (the next round
        start carries the cluster's tensors for it).
        """
        if same_lora(lora, self.shared_lora):
            return
        limit = self.config.effective("max_lora_rank")
        if lora.r > limit:
            raise ValueError(f"the fleet's LoRA rank {lora.r} is above this device's max_lora_rank {limit} "
                             f"(profile {self.config.profile!r}); raise max_lora_rank if the device can afford it")
        log.info("shared adapter %s -> %s (the fleet's)", lora_to_dict(self.shared_lora), lora_to_dict(lora))
        self.shared_lora = lora
        delete_adapter(self.unet, SHARED)
        add_adapter(self.unet, SHARED, lora, seed=self.config.seed)
        self.check_memory(self.config.effective("batch_size"))  # a larger adapter may no longer fit

    def enrolment_rank(self, fleet: LoraConfig) -> int:
        """The rank this device asks to train the fleet's shared adapter at: as high as its ``max_lora_rank``
        allows, up to the fleet's (``fleet.r``); 0 when that is the fleet's own, the enrolment of a device
        that predates ranks, which any aggregator reads. Round starts then carry the config at that rank."""
        rank = min(self.config.effective("max_lora_rank"), fleet.r)
        return 0 if rank == fleet.r else rank

    def seeded_adapter(self, seed: int, lora: LoraConfig) -> dict[str, torch.Tensor]:
        """The fresh adapter of config ``lora`` that ``add_adapter`` draws from ``seed`` (what the aggregator
        sends as a seed instead of tensors); drawn on a scratch slot, ours untouched."""
        return draw_adapter(self.unet, lora, seed)

    def default_mix(self) -> dict[str, float]:
        """Shared adapter, plus the personal one where this device has it."""
        return {SHARED: 1.0} | ({PERSONAL: 1.0} if PERSONAL in adapter_names(self.unet) else {})

    def _train(self, names: list[str], mix: dict[str, float], samples: torch.Tensor, conditioning: torch.Tensor,
               steps: int, seed: int) -> None:
        if steps == 0:
            return
        config = TrainConfig(steps=steps, batch_size=self.config.effective("batch_size"), lr=self.config.lr, seed=seed)
        if self.config.training_backend == "executorch":  # config allows it only for the shared adapter alone
            self._train_exported(samples, conditioning, config)
            return
        set_mix(self.unet, mix)
        train_adapters(self.backend, names, samples, conditioning, config)

    def _train_exported(self, samples: torch.Tensor, conditioning: torch.Tensor, config: TrainConfig) -> None:
        """Train the shared adapter through the exported training program, then take its result back.

        Same data, noise, timesteps and AdamW as the eager trainer; the program holds a full-precision
        copy of the base, so an int8 device trains against fp32 weights here.
        """
        from edge_sdk.artifacts.training import ExecuTorchTrainer

        if self._trainer is None:
            self._trainer = ExecuTorchTrainer(self.config.training_export_dir, base_sha256=self.base_sha256(),
                                              threads=self.config.effective("threads"))
        peft = self.unet.peft_config[SHARED]
        if self._trainer.rank != peft.r or self._trainer.scale != peft.lora_alpha / peft.r:
            raise ValueError(f"the training program holds a rank-{self._trainer.rank} adapter (scale "
                             f"{self._trainer.scale}); the fleet's shared adapter has rank {peft.r}: export it "
                             f"again with the fleet's LoRA config (fedaigc export --config aggregator.toml)")
        self._trainer.set_adapter(get_adapter_state(self.unet, SHARED))
        self._trainer.train(self.backend, samples, conditioning, config)
        set_adapter_state(self.unet, SHARED, self._trainer.adapter_state())

    def check_memory(self, batch_size: int) -> None:
        """Fail before training if the step would not fit the profile's memory budget."""
        budget = self.config.effective("memory_budget_mb") * 1024 * 1024
        need = estimate_training_bytes(self.backend, batch_size)
        if need > budget:
            params = sum(p.numel() for m in self.backend.modules().values() for p in m.parameters())
            raise MemoryBudgetExceeded(
                f"a LoRA training step of this {self.backend.family} model ({params / 1e6:.1f}M parameters in all) "
                f"at batch {batch_size} needs ~{need / 2**20:.1f} MB, over this device's memory budget of "
                f"{budget / 2**20:.0f} MB (profile {self.config.profile!r}); lower batch_size, turn on "
                f"gradient_checkpointing or int8 quantization, or raise memory_budget_mb"
            )

    def seal_update(self, update: Update, cluster: int = 0, encoder: ErrorFeedback | None = None) -> bytes:
        """The update body as the aggregator receives it: compressed, then Box-encrypted to its key."""
        aggregator = self._require_aggregator()
        if self.config.update_dp is not None and update.epsilon < 0:
            raise ValueError("DP is on but this update was not privatized by train_round(); refusing to send it")
        encoder = encoder or ErrorFeedback(make_codec("fp32"))
        body = UpdateBody(cluster, encoder.codec.name, encoder.encode(update.delta), update.samples, update.steps,
                          update.loss_before, update.loss_after, update.base_version, update.epsilon, update.dp_delta)
        return self.identity.encrypt_to(aggregator.box_key, body.encode())

    def install_shared(self, adapter: Mapping[str, torch.Tensor], version: int) -> None:
        """Adopt a cluster adapter without training (e.g. the final one of a federation)."""
        set_adapter_state(self.unet, SHARED, adapter)
        self.shared_version = version
        self.save()

    # ---------------------------------------------------------------- inference
    def set_adapter(self, name: str, tensors: Mapping[str, torch.Tensor], lora: LoraConfig | None = None) -> None:
        """Hold another named adapter (e.g. another cluster's, for hybrid styles); ``lora`` defaults to the shared one's."""
        if name not in adapter_names(self.unet):
            add_adapter(self.unet, name, lora or self.shared_lora)
        set_adapter_state(self.unet, name, tensors)

    def generate(self, prompt: str, n: int = 8, mix: Mapping[str, float] | None = None,
                 seed: int = 0, steps: int = 20, guidance_scale: float = 2.0, server_steps: int = 0,
                 timeout: float = 30.0) -> torch.Tensor:
        """``n`` images for ``prompt``; ``mix`` weights named adapters (default: shared + personal).

        ``server_steps`` = k > 0 makes it hybrid: the aggregator runs the first k of the ``steps`` denoising
        steps with this device's cluster adapter (it receives the sealed conditioning and the seed, never
        the text), the device the remaining ones with ``mix`` and decodes. A server that is not connected,
        refuses or does not answer within ``timeout`` seconds leaves the whole run to the device.
        ``last_generation`` says which happened. k = 0 never contacts the server.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0 <= server_steps <= steps:
            raise ValueError(f"server_steps must be between 0 and steps ({steps}), got {server_steps}")
        if mix is None:
            mix = self.default_mix()
        conditioning = self.conditioning([prompt] * n)
        samples, how = None, Generation("local", 0)
        if server_steps:
            samples, how = self._server_samples(conditioning[0], n, seed, steps, server_steps, timeout)
        if samples is None or how.server_steps < steps:
            set_mix(self.unet, mix)
            denoiser = self._exported_denoiser(mix) if self.config.inference_backend == "executorch" else None
            samples = self.backend.sample(conditioning, steps=steps, seed=seed, guidance_scale=guidance_scale,
                                          denoiser=denoiser, noise=samples, start=how.server_steps)
        self.last_generation = how
        return self.backend.decode(samples)

    def _server_samples(self, encoding: torch.Tensor, n: int, seed: int, steps: int, server_steps: int,
                        timeout: float) -> tuple[torch.Tensor | None, Generation]:
        """The server's share of a hybrid run, or None and the reason it is left to this device."""
        if self.hybrid_server is None:
            reason = "no session with an aggregator is running"
        else:
            try:
                samples = self.hybrid_server.sample_remote(encoding, n, seed, steps, server_steps, timeout)
                return samples, Generation("hybrid", server_steps)
            except (TimeoutError, RefusedMessage) as e:
                reason = str(e)
        log.warning("%s: hybrid generation falls back to local sampling: %s", self.device_id, reason)
        return None, Generation("fallback", 0, reason)

    def _exported_denoiser(self, mix: Mapping[str, float]):
        """The exported program with ``mix`` of this device's adapters as its adapter data (no re-export)."""
        from edge_sdk.artifacts.inference import ExecuTorchDenoiser

        if self._executorch is None:
            self._executorch = ExecuTorchDenoiser(self.config.export_dir, base_sha256=self.base_sha256(),
                                                  threads=self.config.effective("threads"))
        peft = self.unet.peft_config
        self._executorch.set_mix({name: get_adapter_state(self.unet, name) for name in mix}, mix,
                                 {name: peft[name].lora_alpha / peft[name].r for name in mix})
        return self._executorch

    def save_lora(self, path: str | Path, format: str = "diffusers", adapter: str = SHARED) -> Path:
        """This device's adapter in a format image tools load: ``diffusers`` (a directory ``pipe.load_lora_weights``
        reads), ``kohya`` (one ``.safetensors`` for A1111 / ComfyUI) or ``peft``; refused unless every key lands."""
        if adapter not in adapter_names(self.unet):
            raise ValueError(f"no adapter {adapter!r} on this device; it holds {adapter_names(self.unet)}")
        return save_lora(get_adapter_state(self.unet, adapter), self.unet.peft_config[adapter], path, format,
                         self.unet, self.backend.model_version)

    def base_sha256(self) -> str:
        """The digest of the full-precision denoiser this device runs: an export must have been made from it."""
        return self._part_digests["denoiser"]

    def model_sha256(self) -> str:
        """The identity of the whole base model (every part): a fleet runs one."""
        return model_digest(self._part_digests)

    def use_export(self, export_dir: Path) -> None:
        """Sample through another export from now on (a rollout installed it); loaded on next use."""
        self.config = self.config.with_overrides(export_dir=Path(export_dir))
        self._executorch = None

    # ---------------------------------------------------------------- persistence
    def save(self) -> None:
        self.store.save(SHARED, get_adapter_state(self.unet, SHARED), version=self.shared_version,
                        lora=lora_to_dict(self.shared_lora))
        if PERSONAL in adapter_names(self.unet):
            self.store.save(PERSONAL, get_adapter_state(self.unet, PERSONAL),
                            lora=lora_to_dict(self.unet.peft_config[PERSONAL]))

    def load(self) -> None:
        """Restore adapters saved by an earlier run (no-op on a fresh device)."""
        for name in (SHARED, PERSONAL):
            if name in adapter_names(self.unet) and self.store.exists(name):
                stored = self.store.load(name)
                if name == SHARED:
                    if stored.lora is not None:
                        self.adopt_lora(lora_from_dict(stored.lora))
                    self.shared_version = stored.version
                set_adapter_state(self.unet, name, stored.tensors)
