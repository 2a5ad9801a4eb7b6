"""Privacy you can measure and dial: task-vector defences and client-level DP for updates.

(Over 350 lines: both defences, their accounting and the device's ledger are one contract with
``benchmarks/privacy.py``, which measures them together; a split into the two defences is due.)

Two things leave a device, and each gets its own defence, applied on the device:

* **The task vector** (mean MiniLM encoding of the user's prompts, sealed to the
  aggregator). An honest-but-curious aggregator that decrypts it can rank a bank of
  candidate prompts, encoded with the *public* encoder, by cosine and often name the
  user's exact words (``benchmarks/privacy.py`` measures how often). The knobs:

  - average fewer or more prompts (``sample_prompts``): a mean of many prompts is not any
    one prompt;
  - Gaussian noise of expected norm ``noise`` before re-normalising
    (``defend_task_vector``): blurs every direction equally, so it costs clustering as
    much as it costs the attacker;
  - a secret per-fleet random rotation (``fleet_rotation``): every device of a fleet
    multiplies its vector by the same orthogonal matrix derived from a secret the
    aggregator never gets. Rotations preserve inner products, so the aggregator's cosine
    clustering, centroids and similarity-weighted mixing are exactly unchanged, while a
    bank or a classifier built with the public encoder no longer points anywhere useful.
    It is a secret-key defence, not a DP one: it protects only while the aggregator does
    not hold the secret (an enrolled colluding device has it) and does not know enough
    (vector, prompt) pairs to fit the rotation back (orthogonal Procrustes).

* **The shared adapter's delta.** ``privatize_update`` clips the whole delta to L2 norm
  ``clip_norm`` and adds N(0, (noise_multiplier * clip_norm)^2) to every coordinate before
  the delta is compressed and encrypted: the Gaussian mechanism on one device's
  contribution (DP-FedAvg, McMahan et al., ICLR 2018, with the noise added locally
  because the aggregator sees every update on its own). ``PrivacyAccountant`` wraps
  opacus' RDP accountant; ``PrivacyLedger`` persists it in the device's data dir, with
  a count of updates sent without DP, so a device can report the epsilon it has spent.

Randomness: with ``rng=None`` / ``generator=None`` each call draws a fresh seed from the
OS (``secrets``), because noise an attacker can predict protects nothing. Pass a seeded
generator only in tests and benchmarks. Floating-point Gaussian sampling is not a
perfect DP sampler (Mironov, CCS 2012); that caveat is standard and applies here too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edge_sdk.protocol.files import atomic_write_bytes

TASK_DIM = 384
MIN_SECRET_BYTES = 16
_ROTATION_DOMAIN = b"fedaigc/fleet-rotation/v1"
_KEYED_RNG_DOMAIN = b"fedaigc/task-vector-draws/v1"
# opacus' default orders stop at 63; strong privacy (large multipliers, few rounds) wants higher ones
_RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                       + [80, 96, 128, 192, 256, 384, 512, 1024])

Adjacency = Literal["replace", "add_remove"]
ADJACENCIES: tuple[str, ...] = ("replace", "add_remove")


class PrivacyConfigError(ValueError):
    """A privacy setting or input that cannot give the guarantee it claims (a ``ValueError``)."""


# ------------------------------------------------------------------------------------------ task vectors


def sample_prompts(prompts: Sequence[str], k: int | None, rng: np.random.Generator | None = None) -> list[str]:
    """``k`` of the prompts, drawn without replacement (all of them when ``k`` is None or >= len).

    Why: the fewer prompts a task vector averages, the closer it sits to one exact prompt;
    a device may also want to *limit* the prompts it reveals, so both directions are a knob.
    """
    if isinstance(prompts, str):
        raise PrivacyConfigError("sample_prompts() takes a sequence of prompts, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise PrivacyConfigError("sample_prompts() needs at least one prompt")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise PrivacyConfigError(f"k must be a positive integer or None, got {k!r}")
    if k is None or k >= len(prompts):
        return prompts
    rng = _numpy_rng(rng)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=k, replace=False).tolist())]


def defend_task_vector(vector: np.ndarray, noise: float = 0.0, rng: np.random.Generator | None = None,
                       rotation: np.ndarray | None = None) -> np.ndarray:
    """Unit-normalise, add Gaussian noise of expected norm ``noise``, re-normalise, then rotate.

    The noise has per-coordinate std ``noise / sqrt(d)``, so ``noise`` is directly
    comparable to the (unit) signal: at ``noise=1`` the result keeps a cosine of about
    ``1/sqrt(2)`` with the clean vector. Isotropic noise commutes with a rotation, so the
    order of the two steps does not change the distribution. Returns float32, unit norm.
    """
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise PrivacyConfigError(f"vector must be a non-empty 1-d array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise PrivacyConfigError("vector holds NaN or Inf")
    norm = float(np.linalg.norm(v))
    if norm <= 1e-12:
        raise PrivacyConfigError("vector is zero: it has no direction to defend")
    noise = _non_negative("noise", noise)
    v = v / norm
    if noise > 0:
        v = v + _numpy_rng(rng).normal(0.0, noise / math.sqrt(v.size), size=v.shape)
        v /= max(float(np.linalg.norm(v)), 1e-12)
    if rotation is not None:
        v = check_rotation(rotation, v.size) @ v
    return v.astype(np.float32)


def task_vector_from_encodings(encodings: np.ndarray, noise: float = 0.0, rng: np.random.Generator | None = None,
                               rotation: np.ndarray | None = None) -> np.ndarray:
    """The defended task vector of ``(n, d)`` prompt encodings: their mean, then ``defend_task_vector``.

    This is what ``EdgeClient.task_vector`` seals; benchmarks call it on cached encodings
    so that what they attack is exactly what a device sends.
    """
    e = np.asarray(encodings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] == 0:
        raise PrivacyConfigError(f"encodings must be a non-empty (n, d) array, got shape {e.shape}")
    return defend_task_vector(e.mean(axis=0), noise, rng, rotation)


def keyed_rng(key: bytes, prompts: Sequence[str]) -> np.random.Generator:
    """A generator keyed by a device-local secret and the set of prompts: the same prompts, the same draws.

    Why: a device re-sends its task vector on every (re)enrolment; with fresh noise each
    time, an aggregator holding n copies could average the noise down by sqrt(n). Keyed
    draws make a re-send an exact copy, and stay unpredictable to anyone without the key.
    """
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_SECRET_BYTES:
        raise PrivacyConfigError(f"key must be at least {MIN_SECRET_BYTES} bytes")
    if isinstance(prompts, str):
        raise PrivacyConfigError("keyed_rng() takes a sequence of prompts, not a single string")
    mac = hmac.new(bytes(key), _KEYED_RNG_DOMAIN, hashlib.sha256)
    for p in sorted(prompts):
        mac.update(hashlib.sha256(p.encode()).digest())
    return np.random.default_rng(int.from_bytes(mac.digest(), "big"))


def fleet_rotation(secret: bytes, dim: int = TASK_DIM) -> np.ndarray:
    """A Haar-random ``dim x dim`` orthogonal matrix, the same on every device holding ``secret``.

    The Gaussian entries come from SHAKE-256 of the secret (not from numpy's generators,
    whose streams are not promised across versions), so devices on different numpy builds
    agree; QR with the sign fix of Mezzadri (2007) makes the result Haar-distributed and
    independent of LAPACK's sign conventions. The secret needs >= 16 bytes: it is the key,
    and it must never be sent to the aggregator. The returned array is read-only (cached).
    """
    if not isinstance(secret, bytes | bytearray):
        raise PrivacyConfigError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise PrivacyConfigError(f"secret must have at least {MIN_SECRET_BYTES} random bytes, got {len(secret)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PrivacyConfigError(f"dim must be a positive integer, got {dim!r}")
    return _rotation(bytes(secret), dim)


@lru_cache(maxsize=8)
def _rotation(secret: bytes, dim: int) -> np.ndarray:
    n = dim * dim
    shake = hashlib.shake_256(_ROTATION_DOMAIN + dim.to_bytes(4, "big") + secret)
    words = np.frombuffer(shake.digest(8 * 2 * ((n + 1) // 2)), dtype=">u8").astype(np.float64)
    uniform = (np.floor(words / 2.0**11) + 0.5) / 2.0**53  # 53-bit uniforms in (0, 1), never 0
    u1, u2 = uniform[0::2], uniform[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    gaussian = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    q, r = np.linalg.qr(gaussian.reshape(dim, dim))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    q.flags.writeable = False
    return q


def check_rotation(rotation: np.ndarray, dim: int) -> np.ndarray:
    """``rotation`` as float64 if it is a ``dim x dim`` orthogonal matrix; anything else would bend cosines."""
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (dim, dim):
        raise PrivacyConfigError(f"rotation must have shape ({dim}, {dim}), got {r.shape}")
    # R^T R = I tested on random probes: as exact as the full product for any fixed R, and 50x cheaper
    probes = _probes(dim)
    if not np.isfinite(r).all() or not np.allclose(r.T @ (r @ probes), probes, atol=1e-6):
        raise PrivacyConfigError("rotation is not orthogonal: it would change the cosines clustering relies on")
    return r


@lru_cache(maxsize=4)
def _probes(dim: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((dim, 8))


# ------------------------------------------------------------------------------------------ DP for updates


@dataclass(frozen=True)
class DPConfig:
    """Client-level Gaussian mechanism on one device's update.

    ``clip_norm`` bounds the L2 norm of the whole delta (all tensors together);
    ``noise_multiplier`` z sets the per-coordinate noise std to ``z * clip_norm``;
    ``delta`` is the target of the (epsilon, delta) report; ``sample_rate`` is the
    probability a device takes part in a round, used only for the ``add_remove``
    accounting of the released model (sampling cannot hide participation from the
    aggregator, which sees who sent an update).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if not _finite_number(self.clip_norm) or self.clip_norm <= 0:
            raise PrivacyConfigError(f"clip_norm must be a finite number > 0, got {self.clip_norm!r}")
        _non_negative("noise_multiplier", self.noise_multiplier)
        _check_delta(self.delta)
        if not _finite_number(self.sample_rate) or not 0 < self.sample_rate <= 1:
            raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")

    @property
    def noise_std(self) -> float:
        """The per-coordinate std of the added noise."""
        return float(self.noise_multiplier) * float(self.clip_norm)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DPConfig":
        unknown = set(data) - {"clip_norm", "noise_multiplier", "delta", "sample_rate"}
        if unknown:
            raise PrivacyConfigError(f"unknown DPConfig fields: {sorted(unknown)}")
        return cls(**data)


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of an update taken together (accumulated in float64)."""
    _check_delta_tensors(delta)
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in delta.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``(delta scaled to L2 norm <= clip_norm, its norm before)``; an update already inside is unchanged.

    The whole update is clipped as one vector (flat clipping), so its direction is kept.
    Rounding in the tensors' dtype can overshoot by an ulp, so the scale is nudged down
    until the stored result really is inside the ball: the bound is the privacy proof.
    """
    if not _finite_number(clip_norm) or clip_norm <= 0:
        raise PrivacyConfigError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    norm = update_norm(delta)
    if norm <= clip_norm:
        return {k: t.detach().clone() for k, t in delta.items()}, norm
    factor = clip_norm / norm
    for attempt in range(64):
        out = {k: (t.detach().double() * factor).to(t.dtype) for k, t in delta.items()}
        if update_norm(out) <= clip_norm:
            return out, norm
        factor *= 1.0 - min(0.5, 1e-7 * 2.0**attempt)
    raise ArithmeticError(f"could not scale an update of norm {norm} inside {clip_norm}")  # pragma: no cover


def privatize_update(delta: Mapping[str, torch.Tensor], cfg: DPConfig,
                     generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``(clipped delta + N(0, (z * C)^2) per coordinate, the delta's norm before clipping)``.

    The norm before clipping is returned for monitoring (how often clipping bites) and
    must stay on the device: it is not privatized. Noise is drawn in float32 on the CPU,
    in the dict's key order, so a seeded ``generator`` reproduces it exactly.
    """
    if not isinstance(cfg, DPConfig):
        raise PrivacyConfigError(f"cfg must be a DPConfig, got {type(cfg).__name__}")
    clipped, norm = clip_update(delta, cfg.clip_norm)
    std = cfg.noise_std
    if std == 0:
        return clipped, norm
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    out = {}
    for k, t in clipped.items():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        out[k] = (t.float() + noise.to(t.device)).to(t.dtype)
    return out, norm


class PrivacyAccountant:
    """Epsilon spent by one device's released updates, per round, via opacus' RDP accountant.

    ``adjacency="replace"`` (default) is the guarantee against the aggregator itself: it
    sees each device's update, and two different datasets of one device can move the
    clipped update by up to ``2 * clip_norm``, so each release is a Gaussian mechanism with
    effective multiplier ``z / 2`` and no amplification by sampling (the aggregator knows
    who took part). Call ``step`` once per update the device sends.

    ``adjacency="add_remove"`` is DP-FedAvg's user-level notion for the *released* model
    (whether the device took part at all, sensitivity ``clip_norm``, amplified by secret
    sampling at ``cfg.sample_rate``). In that mode call ``step`` every round the device was
    eligible, sampled or not. Both numbers are upper bounds from RDP.
    """

    def __init__(self, delta: float = 1e-5, adjacency: Adjacency = "replace") -> None:
        try:
            from opacus.accountants import RDPAccountant
        except ImportError:
            raise ImportError("accounting differentially private updates needs opacus: "
                              "pip install 'fedaigc[dp]'") from None

        _check_delta(delta)
        if adjacency not in ADJACENCIES:
            raise PrivacyConfigError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
        self.delta = float(delta)
        self.adjacency: Adjacency = adjacency
        self._rdp = RDPAccountant()
        self._epsilons: list[float] = []

    @property
    def rounds(self) -> int:
        """Rounds accounted so far."""
        return len(self._epsilons)

    @property
    def epsilons(self) -> list[float]:
        """Epsilon (at ``self.delta``) after each accounted round; ``inf`` once a noiseless round is in."""
        return list(self._epsilons)

    def step(self, cfg: DPConfig) -> float:
        """Account one round under ``cfg``; returns the epsilon spent so far."""
        if not isinstance(cfg, DPConfig):
            raise PrivacyConfigError(f"cfg must be a DPConfig, got {type(cfg).__name__}")
        z, q = self._mechanism(cfg)
        self._rdp.step(noise_multiplier=z, sample_rate=q)
        self._epsilons.append(self.epsilon())
        return self._epsilons[-1]

    def _mechanism(self, cfg: DPConfig) -> tuple[float, float]:
        if self.adjacency == "replace":
            return float(cfg.noise_multiplier) / 2.0, 1.0
        return float(cfg.noise_multiplier), float(cfg.sample_rate)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the accountant's); 0 before any round."""
        delta = self.delta if delta is None else _check_delta(delta)
        if not self._rdp.history:
            return 0.0
        if any(z == 0 for z, _, _ in self._rdp.history):
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": the bound is still valid
            warnings.simplefilter("ignore", UserWarning)
            return float(self._rdp.get_epsilon(delta=delta, alphas=list(_RDP_ORDERS)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state: the mechanism history (what was released), not derived numbers."""
        return {"version": 1, "delta": self.delta, "adjacency": self.adjacency,
                "history": [[float(z), float(q), int(n)] for z, q, n in self._rdp.history]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyAccountant":
        """Rebuild from ``to_dict`` output, replaying the history so per-round epsilons come back too."""
        if data.get("version") != 1:
            raise PrivacyConfigError(f"unsupported accountant state version {data.get('version')!r}")
        acc = cls(delta=data["delta"], adjacency=data["adjacency"])
        for entry in data["history"]:
            if len(entry) != 3:
                raise PrivacyConfigError(f"history entries are [noise_multiplier, sample_rate, steps], got {entry!r}")
            z, q, n = float(entry[0]), float(entry[1]), int(entry[2])
            if not (_finite_number(z) and z >= 0 and 0 < q <= 1 and n >= 1):
                raise PrivacyConfigError(f"invalid history entry {entry!r}")
            for _ in range(n):
                acc._rdp.step(noise_multiplier=z, sample_rate=q)
                acc._epsilons.append(acc.epsilon())
        return acc


class PrivacyLedger:
    """Everything one device has released, on disk: the accountant of its DP updates, and a count of the rest.

    ``record(cfg)`` is called once for every update that will leave the device, *before*
    it leaves, and persists before returning, so a crash can only over-count. It returns
    the epsilon to report with that update: ``-1`` for an update sent without DP
    (``cfg=None``), else ``epsilon()``. An update sent without DP has no guarantee, so
    once there is one, ``epsilon()`` is ``inf`` for good: turning DP on later does not
    retroactively protect what the aggregator already saw. Deleting the file resets the
    ledger; that is the operator's call, never the SDK's. opacus is imported only when
    the ledger holds a DP round.
    """

    VERSION = 1

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.unprotected = 0
        self.accountant: PrivacyAccountant | None = None
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("version") != self.VERSION:
                raise PrivacyConfigError(f"{self.path}: unsupported ledger version {data.get('version')!r}")
            self.unprotected = int(data["unprotected_updates"])
            if data.get("accountant") is not None:
                self.accountant = PrivacyAccountant.from_dict(data["accountant"])

    @property
    def rounds(self) -> int:
        """Updates recorded so far, with DP or without."""
        return self.unprotected + (self.accountant.rounds if self.accountant else 0)

    @property
    def delta(self) -> float:
        """The delta ``epsilon()`` is stated at (0 while no DP round is recorded)."""
        return self.accountant.delta if self.accountant else 0.0

    def record(self, cfg: DPConfig | None) -> float:
        """Account one released update (``cfg``: its DP setting, None without DP); returns the epsilon to report."""
        if cfg is None:
            self.unprotected += 1
            self._save()
            return -1.0
        if not isinstance(cfg, DPConfig):
            raise PrivacyConfigError(f"cfg must be a DPConfig or None, got {type(cfg).__name__}")
        if self.accountant is None:
            self.accountant = PrivacyAccountant(cfg.delta)
        elif self.accountant.delta != cfg.delta:  # the history is what was released; delta only states it
            self.accountant = PrivacyAccountant.from_dict({**self.accountant.to_dict(), "delta": cfg.delta})
        self.accountant.step(cfg)
        self._save()
        return self.epsilon()

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta``: 0 before any update, ``inf`` once one went out without DP."""
        if self.unprotected:
            return math.inf
        return self.accountant.epsilon() if self.accountant else 0.0

    def _save(self) -> None:
        state = {"version": self.VERSION, "unprotected_updates": self.unprotected,
                 "accountant": self.accountant.to_dict() if self.accountant else None}
        atomic_write_bytes(self.path, json.dumps(state).encode(), mode=0o600)


# ------------------------------------------------------------------------------------------ helpers


def _numpy_rng(rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(secrets.randbits(128))
    if not isinstance(rng, np.random.Generator):
        raise PrivacyConfigError(f"rng must be a numpy Generator or None, got {type(rng).__name__}")
    return rng


def _finite_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_) and math.isfinite(float(x))


def _non_negative(name: str, x: object) -> float:
    if not _finite_number(x) or x < 0:
        raise PrivacyConfigError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


def _check_delta(delta: object) -> float:
    if not _finite_number(delta) or not 0 < delta < 1:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_delta_tensors(delta: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(delta, Mapping) or not delta:
        raise PrivacyConfigError("an update must be a non-empty mapping of name -> tensor")
    for k, t in delta.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise PrivacyConfigError(f"{k} must be a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise PrivacyConfigError(f"{k} holds NaN or Inf: such an update cannot be clipped")
