"""Judges of generated digits: a digit classifier, a style classifier and a Fréchet distance.

Both classifiers train on the *public* half of the digits rendered in every style, so
they never see a persona's images; they are built once and cached on disk (a few
seconds of CPU, ~200 KB). The Fréchet distance is measured in the concatenated
penultimate features of the two classifiers against real images of the requested
style with the same digit mix, so a model is not penalised for a persona's skew.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn

from models.digits.data import STYLES, apply_style, check_style, public_digits

_EVALUATOR_VERSION = "1"
FEATURE_DIM = 32


def cache_dir() -> Path:
    """Where built artefacts are cached: ``$FEDAIGC_CACHE_DIR`` or ``~/.cache/fedaigc``."""
    root = os.environ.get("FEDAIGC_CACHE_DIR") or Path.home() / ".cache" / "fedaigc"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class SmallCNN(nn.Module):
    """Three conv layers and a 32-d feature layer: enough for 16x16 digits and styles."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def styled_dataset(images: torch.Tensor, digits: torch.Tensor, styles=STYLES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image rendered in every style: (images, digit labels, style labels)."""
    xs, ds, ss = [], [], []
    for s_idx, style in enumerate(styles):
        xs.append(apply_style(images, style))
        ds.append(digits)
        ss.append(torch.full_like(digits, s_idx))
    return torch.cat(xs), torch.cat(ds), torch.cat(ss)


def _train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int, epochs: int = 10) -> SmallCNN:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallCNN(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * -(-len(y) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 128):
            idx = order[start:start + 128]
            xb = x[idx]
            # one-pixel jitter: generated samples are never pixel-aligned with the data
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    return model


@dataclass
class Evaluator:
    digit_model: SmallCNN
    style_model: SmallCNN
    reference_features: dict[str, torch.Tensor]  # style -> (n, 2*FEATURE_DIM) of public images
    reference_digits: torch.Tensor               # digit label of each reference row

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.digit_model.features(images), self.style_model.features(images)], dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit predictions, style predictions as indices into STYLES)."""
        return self.digit_model(images).argmax(1), self.style_model(images).argmax(1)

    @torch.no_grad()
    def style_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.style_model(images).softmax(1)

    def evaluate(self, images: torch.Tensor, digits, style: str) -> dict[str, float]:
        check_style(style)
        images = _check_images(images)
        digits = torch.as_tensor(digits, dtype=torch.long).flatten()
        if len(digits) != len(images):
            raise ValueError(f"{len(images)} images but {len(digits)} target digits")
        digit_pred, style_pred = self.predict(images)
        digit_ok, style_ok = digit_pred == digits, style_pred == STYLES.index(style)
        return {
            "digit_acc": float(digit_ok.float().mean()),
            "style_acc": float(style_ok.float().mean()),
            # what a user counts: the image is only right if it shows the digit asked for in their style
            "joint_acc": float((digit_ok & style_ok).float().mean()),
            "frechet": self.frechet(images, digits, style),
        }

    def frechet(self, images: torch.Tensor, digits: torch.Tensor, style: str, reference_size: int = 512) -> float:
        feats = self.features(_check_images(images)).double().numpy()
        ref = self._matched_reference(digits, style, reference_size).double().numpy()
        return frechet_distance(feats, ref)

    def _matched_reference(self, digits: torch.Tensor, style: str, size: int) -> torch.Tensor:
        """Real features of ``style`` resampled to the digit mix of ``digits`` (deterministic)."""
        feats = self.reference_features[style]
        counts = torch.bincount(digits, minlength=10).double()
        weights = counts[self.reference_digits] / torch.bincount(self.reference_digits, minlength=10).double()[self.reference_digits]
        g = torch.Generator().manual_seed(0)
        idx = torch.multinomial(weights, size, replacement=True, generator=g)
        return feats[idx]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features have dead units, so covariances are singular; a tiny ridge keeps sqrtm stable
    ridge = np.eye(a.shape[1]) * 1e-6
    ca, cb = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = linalg.sqrtm(ca @ cb).real
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2.0 * covmean), 0.0))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"images must have shape (n, 1, 16, 16), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    return images


def _cache_key() -> str:
    x, y = public_digits()
    h = hashlib.sha256()
    h.update(_EVALUATOR_VERSION.encode())
    h.update(",".join(STYLES).encode())
    h.update(apply_style(x[:32], STYLES[-1]).numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def build_evaluator(seed: int = 0) -> Evaluator:
    x, y = public_digits()
    xs, ds, ss = styled_dataset(x, y)
    digit_model = _train_classifier(xs, ds, 10, seed)
    style_model = _train_classifier(xs, ss, len(STYLES), seed + 1)
    return _assemble(digit_model, style_model)


def _assemble(digit_model: SmallCNN, style_model: SmallCNN) -> Evaluator:
    x, y = public_digits()
    ev = Evaluator(digit_model, style_model, {}, y.clone())
    ev.reference_features = {s: ev.features(apply_style(x, s)) for s in STYLES}
    return ev


_lock = threading.Lock()
_evaluator: Evaluator | None = None


def load_evaluator() -> Evaluator:
    """The process-wide evaluator, built on first use and cached on disk."""
    global _evaluator
    with _lock:
        if _evaluator is not None:
            return _evaluator
        path = cache_dir() / f"evaluator-{_cache_key()}.safetensors"
        if path.exists():
            state = load_file(path)
            digit_model, style_model = SmallCNN(10), SmallCNN(len(STYLES))
            digit_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("digit.")})
            style_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("style.")})
            digit_model.eval()
            style_model.eval()
            _evaluator = _assemble(digit_model, style_model)
        else:
            _evaluator = build_evaluator()
            state = {f"digit.{k}": v for k, v in _evaluator.digit_model.state_dict().items()}
            state |= {f"style.{k}": v for k, v in _evaluator.style_model.state_dict().items()}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(state, tmp)
            os.replace(tmp, path)
        return _evaluator


def evaluate(images: torch.Tensor, digits, style: str) -> dict[str, float]:
    """``{digit_acc, style_acc, joint_acc, frechet}`` of ``images`` meant to show ``digits`` in ``style``."""
    return load_evaluator().evaluate(images, digits, style)


def sample_for_personas(
    unet: torch.nn.Module,
    personas,
    samples: int = 64,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 2.0,
    which: str = "seen",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, target digits): what ``unet`` (active adapters as set) draws for the personas'
    held-out test prompts (``which="seen"``: digits they own, in their words; ``"unseen"``: digits
    they never had, in words they never used), cycled to ``samples`` images in all.

    The prompts are taken in turn from each persona (its first, then every persona's second, ...),
    so ``samples`` images of n personas are ``samples / n`` of each one's first prompts: the same
    prompts whether the personas are judged together (a cluster's adapter) or one by one (each
    device's own), and no persona's phrasing or digits dominate a cluster's score.
    """
    from models.digits.backend import DigitsBackend

    if which not in ("seen", "unseen"):
        raise ValueError(f"which must be 'seen' or 'unseen', got {which!r}")
    backend = DigitsBackend(unet)
    columns = [list(zip(p.test_prompts, p.test_digits.tolist())) if which == "seen"
               else list(zip(p.unseen_prompts, p.unseen_digits.tolist())) for p in personas]
    if not any(columns):
        raise ValueError(f"the personas have no {which} prompts (make_personas(unseen=...) adds unseen ones)")
    pairs = [c[j] for j in range(max(map(len, columns))) for c in columns if j < len(c)]
    prompts = [pr for pr, _ in pairs]
    digits = torch.tensor([d for _, d in pairs], dtype=personas[0].test_digits.dtype)
    order = torch.arange(samples) % len(prompts)
    encodings = backend.encode_prompts([prompts[i] for i in order.tolist()])
    images = backend.generate(encodings, steps=steps, seed=seed, guidance_scale=guidance_scale)
    return images, digits[order]


def evaluate_personas(
    unet: torch.nn.Module,
    personas,
    samples: int = 64,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 2.0,
) -> dict[str, float]:
    """Quality of what ``unet`` draws for personas that share one style (see ``sample_for_personas``)."""
    styles = {p.style for p in personas}
    if len(styles) != 1:
        raise ValueError(f"evaluate_personas needs personas of one style, got {sorted(styles)}")
    images, digits = sample_for_personas(unet, personas, samples, seed, steps, guidance_scale)
    return evaluate(images, digits, styles.pop())
