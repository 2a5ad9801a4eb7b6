"""The model backend interface: one base diffusion model, whatever its family, as fedaigc sees it.

Everything outside ``models/`` (the device client, the aggregator's global model, the
generation service, exports) talks to a base model only through ``DiffusionBackend``: prompts
become conditioning, images become samples in the denoiser's space (latents or pixels), the
denoiser predicts, a sampler walks the schedule, samples decode back to images. What the wire
and the data checks state (image, sample and conditioning shapes), the LoRA targets that suit
the model and a parts a digest covers come from here too, so no other layer knows which model
it is. ``load_backend`` picks the family from what a directory holds: the bundled digits UNet
(``models/digits/backend.py``) or a Stable-Diffusion-family diffusers pipeline
(``models/stable_diffusion.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS = ("ddim", "dpm", "ddpm")
# samplers whose step reads only the current sample (DDIM at eta 0 draws no noise): a run split at any step
# resumes exactly; DPM-Solver++ keeps earlier model outputs and DDPM draws fresh noise from the generator
SPLIT_SAMPLERS = ("ddim",)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionBackend(ABC):
    """A frozen base model; LoRA adapters attach to ``denoiser`` (a diffusers ``UNet2DConditionModel``)."""

    family: str = "base"
    denoiser: torch.nn.Module
    image_shape: tuple[int, ...]         # one user image, channels first, values in [0, 1]
    sample_shape: tuple[int, ...]        # one sample in the denoiser's space
    conditioning_shape: tuple[int, ...]  # one prompt's conditioning
    default_targets: tuple[str, ...]     # the LoRA targets that suit this model (models.lora.lora_config)
    model_version: str = ""              # what kohya's ss_base_model_version calls the model ("sd_v1", ...)
    # True where the conditioning *is* the MiniLM encoding task vectors are made of (the bundled
    # model): a device then encodes each prompt once for both
    conditioning_is_task_encoding: bool = False

    # ---------------------------------------------------------------- the model's own parts
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(n, *conditioning_shape)`` float32 for ``n`` prompts."""

    @abstractmethod
    def unconditional(self, n: int) -> torch.Tensor:
        """The conditioning of no prompt, for classifier-free guidance and prompt dropout."""

    @abstractmethod
    def encode_images(self, images01: torch.Tensor) -> torch.Tensor:
        """Checked ``(n, *image_shape)`` images in [0, 1] -> ``(n, *sample_shape)`` samples."""

    @abstractmethod
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """``(n, *sample_shape)`` samples -> ``(n, *image_shape)`` images in [0, 1]."""

    @abstractmethod
    def run(self, denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            conditioning: torch.Tensor) -> torch.Tensor:
        """``denoiser`` (this model's, or a copy of it: an export's) called with this model's conditioning."""

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The denoiser's output (noise or velocity, per ``prediction_type``) for noisy samples at ``t``."""
        return self.run(self.denoiser, x, t, conditioning)

    @abstractmethod
    def scheduler_config(self) -> dict:
        """The noise schedule the base model was trained with; samplers derive from it."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every part a device holds in memory, by name: the denoiser and, where it has them, the encoders
        (a digest of the model covers each part's base weights: ``edge_sdk.artifacts.manifest.model_digest``)."""
        return {"denoiser": self.denoiser}

    # ---------------------------------------------------------------- derived
    @property
    def prediction_type(self) -> str:
        return self.scheduler_config().get("prediction_type", "epsilon")

    def train_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config())

    def sampler(self, name: str = "ddim") -> SchedulerMixin:
        """A sampler sharing the training noise schedule, chosen by name (diffusers-style swap)."""
        config = self.train_scheduler().config
        if name == "ddim":
            return DDIMScheduler.from_config(config)
        if name == "dpm":
            from diffusers import DPMSolverMultistepScheduler  # it imports SciPy, which a device need not load

            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
        if name == "ddpm":
            return DDPMScheduler.from_config(config)
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               scheduler: DDPMScheduler) -> torch.Tensor:
        """What ``predict`` is trained to output: the noise, or the velocity (v-prediction)."""
        if self.prediction_type == "v_prediction":
            return scheduler.get_velocity(x0, noise, t)
        if self.prediction_type != "epsilon":
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        return noise

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """The images as float32, or a ``ValueError`` naming what this model takes."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor shaped (n, {', '.join(map(str, self.image_shape))}), "
                             f"got {type(images).__name__}")
        if images.ndim != 1 + len(self.image_shape) or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"this {self.family} model takes images shaped (n, {', '.join(map(str, self.image_shape))}) "
                             f"(channels, height, width), got {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("no images")
        images = images.detach().to(torch.float32)
        if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
            raise ValueError("image values must be finite and in [0, 1] (divide 8-bit pixels by 255)")
        return images

    def check_conditioning(self, conditioning: torch.Tensor) -> torch.Tensor:
        conditioning = torch.as_tensor(conditioning, dtype=torch.float32)
        if conditioning.ndim != 1 + len(self.conditioning_shape) or \
                tuple(conditioning.shape[1:]) != self.conditioning_shape:
            raise ValueError(f"conditioning must have shape (n, {', '.join(map(str, self.conditioning_shape))}), "
                             f"got {tuple(conditioning.shape)}")
        return conditioning

    @torch.no_grad()
    def sample(self, conditioning: torch.Tensor, steps: int = 20, seed: int = 0, *, guidance_scale: float = 2.0,
               sampler: str = "ddim", batch_size: int = 256, denoiser: Denoiser | None = None,
               noise: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(n, *sample_shape)`` samples, one per conditioning row; same seed, same samples.

        ``noise`` replaces the seeded starting noise, so callers that batch unrelated requests keep
        each request's samples independent of its batch-mates; ``denoiser(x, t, conditioning)``
        replaces the eager network (an exported program, say) while keeping this exact loop.

        ``start`` / ``stop`` run only steps ``[start, stop)`` of the ``steps``-step schedule, so two
        parties can share one sampling run (hybrid inference: a server runs the first steps, a device the
        rest): with ``start > 0``, ``noise`` is the sample after ``start`` steps, and the result after
        ``stop`` steps is what an uninterrupted run holds there. Only samplers whose step depends on
        the current sample alone can be resumed (``SPLIT_SAMPLERS``).
        """
        conditioning = self.check_conditioning(conditioning)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        stop = steps if stop is None else stop
        if not 0 <= start <= stop <= steps:
            raise ValueError(f"steps [{start}, {stop}) are not within a {steps}-step schedule")
        if (start, stop) != (0, steps) and sampler not in SPLIT_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} cannot run part of a schedule (it carries state between "
                             f"steps); split runs use {', '.join(SPLIT_SAMPLERS)}")
        if start > 0 and noise is None:
            raise ValueError(f"resuming at step {start} needs the sample reached there (noise=)")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        call = denoiser or self.predict
        n = conditioning.shape[0]
        generator = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = torch.randn((n, *self.sample_shape), generator=generator)
        elif tuple(noise.shape) != (n, *self.sample_shape):
            raise ValueError(f"noise must have shape {(n, *self.sample_shape)}, got {tuple(noise.shape)}")
        outputs = []
        for first in range(0, n, batch_size):
            cond = conditioning[first:first + batch_size]
            x = noise[first:first + batch_size]
            scheduler = self.sampler(sampler)
            scheduler.set_timesteps(steps)
            if start == 0:
                x = x * scheduler.init_noise_sigma
            guided = guidance_scale != 1.0
            context = torch.cat([cond, self.unconditional(len(cond))]) if guided else cond
            for t in scheduler.timesteps[start:stop]:
                model_in = torch.cat([x, x]) if guided else x
                out = call(scheduler.scale_model_input(model_in, t), t.expand(model_in.shape[0]), context)
                if guided:
                    cond_out, uncond_out = out.chunk(2)
                    out = uncond_out + guidance_scale * (cond_out - uncond_out)
                x = scheduler.step(out, t, x, generator=generator).prev_sample
            outputs.append(x)
        return torch.cat(outputs)

    def generate(self, conditioning: torch.Tensor, steps: int = 20, seed: int = 0, **options) -> torch.Tensor:
        """Images in [0, 1] (``sample`` then ``decode``)."""
        return self.decode(self.sample(conditioning, steps, seed, **options))


def family_of(path: str | Path) -> str:
    """Which backend a model directory is for, from its files alone (nothing loads)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return "stable-diffusion"
    if (path / "config.json").exists():
        return "digits"
    raise FileNotFoundError(f"{path} holds no model: expected a diffusers pipeline (model_index.json with unet, "
                            f"vae, text_encoder, tokenizer, scheduler) or a bundled-family UNet (config.json)")


def load_backend(path: str | Path) -> DiffusionBackend:
    """The backend for a model directory: a diffusers pipeline (``model_index.json``) or the bundled UNet."""
    if family_of(path) == "stable-diffusion":
        from models.stable_diffusion import StableDiffusionBackend

        return StableDiffusionBackend.from_pretrained(path)
    from models.digits.backend import DigitsBackend

    return DigitsBackend.from_pretrained(path)
