"""What an honest-but-curious aggregator learns, and what each privacy knob costs.

    python -m benchmarks.privacy [--part attacks|dp|all] [--quick | --smoke] [--out DIR]

**Attacks on task vectors.** The aggregator decrypts every device's task vector (what
``edge_sdk.privacy.task_vector_from_encodings`` produces, the exact computation a device
runs) and tries two attacks with the public MiniLM encoder:

* *exact prompt recovery*: rank a bank of candidate prompts (every style's templates x
  every digit x every digit wording x every verbal tic, 40,000 prompts, checked to hold
  every persona's true prompts) by cosine to the vector; success when the top-1 (top-5)
  candidates include any of the device's prompts, or its most frequent prompt;
* *attribute inference*: logistic regressions trained on task vectors of *other* personas
  (another seed, all ten styles, same defence setting, simulated by the attacker with the
  public encoder) predict the device's style and its dominant digit.

Knobs swept: task noise (expected norm), prompts averaged (1, 5, all), and the secret
fleet rotation (the attacker does not hold the secret). Clustering quality is the
adjusted Rand index of ``cluster_tasks`` against the true styles, 24 personas / 6 styles,
three seeds; it is text-only (a lower bound: the aggregator refines clusters with update
similarity, see ``benchmarks/clustering.py``).

**DP on updates.** A small in-process federation (true clusters; ``EdgeClient`` on the
simulator profile; ``privatize_update`` on every delta; ``ExactLoraAggregation``) for
several noise multipliers at a clip norm calibrated to the median first-round update
norm of the no-DP run; reports the cluster adapters' style/digit accuracy against the
epsilon each device has spent.

``--smoke`` attacks 4 devices of 2 styles with an attacker of 8 personas and a bank of their own
prompts plus 200 others (the whole bank takes minutes to encode), and runs one DP multiplier
over one round of 2 devices.

Writes benchmarks/results/privacy.json and privacy.png (a panel per measured part, drawn
from the JSON). Each part overwrites only its own keys, so the parts can run as separate
commands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.clustering import cluster_tasks  # noqa: E402
from aggregator.rules import ClientUpdate, ExactLoraAggregation  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk import SHARED, DeviceConfig, EdgeClient, LocalData  # noqa: E402
from edge_sdk.privacy import (  # noqa: E402
    DPConfig,
    PrivacyAccountant,
    fleet_rotation,
    privatize_update,
    sample_prompts,
    task_vector_from_encodings,
    update_norm,
)
from models.digits.data import _DIGIT_WORDINGS, _TICS, STYLES, Persona, make_personas, style_templates  # noqa: E402
from models.digits.evaluate import cache_dir, evaluate_personas  # noqa: E402
from models.lora import get_adapter_state, lora_config, set_mix  # noqa: E402
from models.text import PromptEncoder  # noqa: E402

NOISES = (0.0, 0.1, 0.3, 0.6, 1.0, 2.0)
PROMPT_COUNTS: tuple[int | None, ...] = (1, 5, None)
FLEET_SECRET = hashlib.sha256(b"benchmark fleet secret (a real fleet draws 32 random bytes)").digest()
TARGET_ARI, TARGET_TOP1 = 0.9, 0.05
NEAR_BEST_ARI = 0.02
KNOWN_PAIRS = (10, 25, 50, 100, 200)


# ------------------------------------------------------------------------------------------ the bank


def candidate_bank(styles: Sequence[str] = STYLES) -> list[str]:
    """Every prompt the persona generator can write: a worst-case attacker knows its vocabulary."""
    return [template.format(d=wording(digit)) + tic
            for style in styles for template in style_templates(style)
            for digit in range(10) for wording in _DIGIT_WORDINGS for tic in _TICS]


def bank_prompts(personas: Sequence[Persona], decoys: int | None) -> list[str]:
    """The whole candidate bank, or (``decoys`` given) the personas' own prompts and that many other candidates
    of their styles: a bank small enough to encode in seconds, for smoke runs."""
    if decoys is None:
        return candidate_bank()
    true = sorted({q for p in personas for q in p.train_prompts})
    others = sorted(set(candidate_bank(sorted({p.style for p in personas}))) - set(true))
    return true + random.Random(0).sample(others, min(decoys, len(others)))


def encode_bank(bank: Sequence[str]) -> np.ndarray:
    """Public-encoder encodings of the bank, cached on disk (the whole bank takes minutes to encode)."""
    key = hashlib.sha256("\n".join(bank).encode() + b"all-MiniLM-L6-v2").hexdigest()[:16]
    path = cache_dir() / f"privacy-bank-{key}.npy"
    if path.exists():
        return np.load(path)
    encoder = PromptEncoder(batch_size=256)
    chunks = [encoder.encode(bank[i:i + 2000]) for i in tqdm(range(0, len(bank), 2000), desc="encoding bank")]
    encodings = np.concatenate(chunks)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, encodings)
    tmp.replace(path)
    return encodings


@dataclass(frozen=True)
class Bank:
    prompts: list[str]
    encodings: np.ndarray  # (n, 384), unit rows
    index: dict[str, int]

    @classmethod
    def build(cls, prompts: list[str]) -> "Bank":
        return cls(prompts, encode_bank(prompts), {p: i for i, p in enumerate(prompts)})

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise RuntimeError(f"the bank misses true prompts (the attack would be understated): {missing[:3]}")
        return self.encodings[[self.index[p] for p in prompts]]


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class AttackSizes:
    """How big the attack part is: the targets, the noise levels swept, the attacker's own personas, the bank."""

    devices: int
    styles: int
    seeds: tuple[int, ...]
    noises: tuple[float, ...]
    attacker_personas: int
    attacker_styles: int = len(STYLES)
    known_pairs: tuple[int, ...] = KNOWN_PAIRS
    decoys: int | None = None  # None: the whole candidate bank (see bank_prompts)


@dataclass(frozen=True)
class Setting:
    noise: float
    prompts: int | None  # None: all of the device's prompts
    rotation: bool

    @property
    def label(self) -> str:
        return f"noise={self.noise:g} prompts={self.prompts or 'all'} rotation={'on' if self.rotation else 'off'}"


def device_vectors(bank: Bank, personas: Sequence[Persona], setting: Setting, tag: int,
                   rotation: np.ndarray | None) -> np.ndarray:
    """Task vectors as the devices would send them; the same draws for rotation on and off (common numbers)."""
    rows = []
    for i, p in enumerate(personas):
        rng = np.random.default_rng([tag, i, setting.prompts or 0])
        prompts = sample_prompts(p.train_prompts, setting.prompts, rng)
        rows.append(task_vector_from_encodings(bank.encode(prompts), setting.noise, rng,
                                               rotation if setting.rotation else None))
    return np.stack(rows)


def bank_attack(bank: Bank, vectors: np.ndarray, personas: Sequence[Persona]) -> dict[str, list[bool]]:
    """Nearest neighbours by cosine in the public bank: does the top-1 / top-5 name a true prompt?"""
    sims = vectors.astype(np.float32) @ bank.encodings.T
    top5 = np.argpartition(-sims, 5, axis=1)[:, :5]
    top5 = np.take_along_axis(top5, np.argsort(-np.take_along_axis(sims, top5, axis=1), axis=1), axis=1)
    out: dict[str, list[bool]] = {"top1": [], "top5": [], "top1_frequent": [], "top5_frequent": []}
    for row, p in zip(top5, personas):
        guesses = [bank.prompts[j] for j in row]
        true = set(p.train_prompts)
        frequent = Counter(p.train_prompts).most_common(1)[0][0]
        out["top1"].append(guesses[0] in true)
        out["top5"].append(any(g in true for g in guesses))
        out["top1_frequent"].append(guesses[0] == frequent)
        out["top5_frequent"].append(frequent in guesses)
    return out


def dominant_digit(p: Persona) -> int:
    return p.digits[0]


def procrustes(public: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||public @ R.T - observed|| (Schoenemann, 1966): the rotation, refitted."""
    u, _, vt = np.linalg.svd(observed.T.astype(np.float64) @ public.astype(np.float64))
    return u @ vt


def known_plaintext(bank: Bank, attacker: Sequence[Persona], model: "AttributeAttack", setting: Setting,
                    rotation: np.ndarray, targets: dict[int, list[Persona]], pairs: Sequence[int]) -> list[dict]:
    """Rotation without the secret: the aggregator knows the prompts of ``m`` devices and refits the rotation.

    The first ``m`` of the attacker's personas play fleet devices whose prompts leaked (say,
    through the plaintext prompts of generation requests); their public clean means and
    the vectors they actually sent give the rotation by Procrustes; the attacks then run on
    the un-rotated target vectors.
    """
    rows = []
    for m in pairs:
        leaked = attacker[:m]
        public = np.stack([bank.encode(p.train_prompts).mean(axis=0) for p in leaked])
        estimate = procrustes(public, device_vectors(bank, leaked, setting, 2000, rotation))
        flags: dict[str, list[bool]] = {}
        for s, personas in targets.items():
            vectors = device_vectors(bank, personas, setting, s, rotation) @ estimate
            for k, v in (bank_attack(bank, vectors, personas) | model.score(vectors, personas)).items():
                flags.setdefault(k, []).extend(v)
        rows.append({"pairs": m, "top1_recovery": float(np.mean(flags["top1"])),
                     "top5_recovery": float(np.mean(flags["top5"])),
                     "attribute_acc": {"style": float(np.mean(flags["style"])),
                                       "dominant_digit": float(np.mean(flags["dominant_digit"]))}})
    return rows


class AttributeAttack:
    """Logistic regressions from task vector to style and dominant digit, fit on the attacker's own personas.

    Plain L2-regularised logistic regression (no per-coordinate scaling) is rotation
    equivariant: an attacker with *labelled rotated* vectors would score exactly what the
    rotation-off rows show, so rotation only helps against an attacker without them.
    """

    def __init__(self, vectors: np.ndarray, personas: Sequence[Persona]) -> None:
        self.style = LogisticRegression(C=100.0, max_iter=3000).fit(vectors, [p.style for p in personas])
        self.digit = LogisticRegression(C=100.0, max_iter=3000).fit(vectors, [dominant_digit(p) for p in personas])

    def score(self, vectors: np.ndarray, personas: Sequence[Persona]) -> dict[str, list[bool]]:
        style = self.style.predict(vectors)
        digit = self.digit.predict(vectors)
        return {"style": [s == p.style for s, p in zip(style, personas)],
                "dominant_digit": [int(d) == dominant_digit(p) for d, p in zip(digit, personas)]}


def run_attacks(sizes: AttackSizes, counts: Sequence[int | None]) -> dict:
    rotation = fleet_rotation(FLEET_SECRET)
    targets = {s: make_personas(sizes.devices, sizes.styles, seed=s) for s in sizes.seeds}
    attacker = make_personas(sizes.attacker_personas, sizes.attacker_styles, seed=1000)
    bank = Bank.build(bank_prompts([*attacker, *(p for ps in targets.values() for p in ps)], sizes.decoys))
    majority_digit = Counter(dominant_digit(p) for p in attacker).most_common(1)[0][0]
    rows = []
    for noise in tqdm(sizes.noises, desc="noise levels"):
        for count in counts:
            # the attacker simulates devices with the public encoder: it cannot rotate without the secret
            model = AttributeAttack(device_vectors(bank, attacker, Setting(noise, count, False), 1000, None), attacker)
            for rotated in (False, True):
                setting = Setting(noise, count, rotated)
                aris, hits = [], Counter()
                flags: dict[str, list[bool]] = {}
                for s, personas in targets.items():
                    vectors = device_vectors(bank, personas, setting, s, rotation)
                    aris.append(adjusted_rand_score([p.style for p in personas], cluster_tasks(vectors)))
                    for k, v in (bank_attack(bank, vectors, personas) | model.score(vectors, personas)).items():
                        flags.setdefault(k, []).extend(v)
                hits.update({k: float(np.mean(v)) for k, v in flags.items()})
                rows.append({"noise": noise, "prompts": count or "all", "rotation": rotated,
                             "ari": float(np.mean(aris)), "ari_per_seed": [float(a) for a in aris],
                             "top1_recovery": hits["top1"], "top5_recovery": hits["top5"],
                             "top1_recovery_frequent": hits["top1_frequent"],
                             "top5_recovery_frequent": hits["top5_frequent"],
                             "attribute_acc": {"style": hits["style"], "dominant_digit": hits["dominant_digit"]}})
                if rotated and count is None:
                    rows[-1]["known_plaintext"] = known_plaintext(bank, attacker, model, setting, rotation, targets,
                                                                  sizes.known_pairs)
                print(setting.label, {k: round(v, 3) for k, v in rows[-1].items() if isinstance(v, float)},
                      rows[-1]["attribute_acc"], flush=True)
    for row in rows:  # what each setting gives away if the fleet secret leaks: the rotation-off twin
        twin = next(r for r in rows if r["noise"] == row["noise"] and r["prompts"] == row["prompts"]
                    and not r["rotation"])
        row["if_secret_leaked"] = {k: twin[k] for k in ("top1_recovery", "top5_recovery", "attribute_acc")}
    true_prompts = {prompt for ps in targets.values() for p in ps for prompt in p.train_prompts}
    return {
        "devices": sizes.devices, "styles": sizes.styles, "seeds": list(sizes.seeds), "bank_size": len(bank.prompts),
        "bank_holds_all_true_prompts": all(p in bank.index for p in true_prompts),
        "attacker_personas": sizes.attacker_personas, "attacker_styles": sizes.attacker_styles, "attacker_seed": 1000,
        "chance": {"style": 1 / sizes.attacker_styles,
                   "dominant_digit_majority": float(np.mean([dominant_digit(p) == majority_digit
                                                             for ps in targets.values() for p in ps])),
                   "top1_recovery_random_guess": float(np.mean([len(set(p.train_prompts)) / len(bank.prompts)
                                                                for ps in targets.values() for p in ps]))},
        "settings": rows,
    }


def choose_default(rows: Sequence[dict]) -> tuple[dict, str]:
    """The setting to ship, by a rule written down before looking (returned with the rule's outcome)."""
    feasible = [r for r in rows if r["ari"] >= TARGET_ARI and r["top1_recovery"] <= TARGET_TOP1]
    if feasible:
        best = max(feasible, key=lambda r: (r["ari"], -r["top1_recovery"]))
        return best, (f"highest text-only ARI among settings with ARI >= {TARGET_ARI} and top-1 recovery "
                      f"<= {TARGET_TOP1:.0%}")
    private = [r for r in rows if r["top1_recovery"] <= TARGET_TOP1]
    if not private:
        best = min(rows, key=lambda r: (r["top1_recovery"], -r["ari"]))
        return best, f"no setting keeps top-1 recovery <= {TARGET_TOP1:.0%}: the least recoverable one"
    top = max(r["ari"] for r in private)
    near = [r for r in private if r["ari"] >= top - NEAR_BEST_ARI]
    best = min(near, key=lambda r: (r["if_secret_leaked"]["top1_recovery"],
                                    r["if_secret_leaked"]["attribute_acc"]["style"], -r["ari"]))
    return best, (f"no setting reaches text-only ARI >= {TARGET_ARI} (the best is {top:.3f}); among settings with "
                  f"top-1 recovery <= {TARGET_TOP1:.0%} and ARI within {NEAR_BEST_ARI} of the best, the one that "
                  "gives away least if the fleet secret leaks")


# ------------------------------------------------------------------------------------------ DP federation


def run_federation(personas: Sequence[Persona], rounds: int, steps: int, seed: int, dp: DPConfig | None,
                   samples: int, tmp: Path) -> dict:
    """True-cluster federation with DP (or none) on every delta; final cluster-adapter quality and epsilon."""
    rule, spec = ExactLoraAggregation(), lora_config()
    clients = [EdgeClient(DeviceConfig(data_dir=tmp / f"{i}", profile="simulator", personalization="none",
                                       seed=seed + i)) for i in range(len(personas))]
    init = get_adapter_state(clients[0].unet, SHARED)
    adapters = {s: init for s in {p.style for p in personas}}
    local = [PrivacyAccountant(dp.delta if dp else 1e-5, "replace") for _ in personas]
    released = [PrivacyAccountant(dp.delta if dp else 1e-5, "add_remove") for _ in personas]
    norms: list[list[float]] = []
    for rnd in range(1, rounds + 1):
        updates: dict[str, list[ClientUpdate]] = {}
        norms.append([])
        for i, (c, p) in enumerate(tqdm(list(zip(clients, personas)), desc=f"round {rnd}", leave=False)):
            u = c.train_round(adapters[p.style], LocalData.from_persona(p), steps=steps, version=rnd)
            delta = u.delta
            if dp is None:
                norms[-1].append(update_norm(delta))
            else:
                noise = torch.Generator().manual_seed(seed * 10_000 + rnd * 100 + i)
                delta, before = privatize_update(delta, dp, noise)
                norms[-1].append(before)
                local[i].step(dp)
                released[i].step(dp)
            updates.setdefault(p.style, []).append(ClientUpdate.from_delta(str(i), adapters[p.style], delta, u.samples))
        adapters = {s: rule.aggregate(adapters[s], ups, spec).adapter for s, ups in updates.items()}
    quality = evaluate_clusters(clients[0], personas, adapters, seed, samples)
    return {"noise_multiplier": None if dp is None else dp.noise_multiplier,
            "clip_norm": None if dp is None else dp.clip_norm,
            "epsilon_local": _json_eps(local[0].epsilon()) if dp else None,
            "epsilon_released": _json_eps(released[0].epsilon()) if dp else None,
            "epsilon_local_per_round": [_json_eps(e) for e in local[0].epsilons],
            "update_norms_mean": [float(np.mean(r)) for r in norms],
            "clipped_fraction": (float(np.mean([n > dp.clip_norm for r in norms for n in r])) if dp else 0.0),
            "first_round_norms": norms[0], **quality}


def evaluate_clusters(probe: EdgeClient, personas: Sequence[Persona], adapters: dict | None, seed: int,
                      samples: int) -> dict[str, float]:
    """Mean quality of each style's cluster adapter (``adapters=None``: the base model, adapters off)."""
    scores = []
    for style in sorted({p.style for p in personas}):
        if adapters is not None:
            probe.install_shared(adapters[style], 0)
        set_mix(probe.unet, {SHARED: 1.0} if adapters is not None else {})
        scores.append(evaluate_personas(probe.unet, [p for p in personas if p.style == style], samples=samples,
                                        seed=seed, steps=10))
    return {k: float(np.mean([s[k] for s in scores])) for k in ("style_acc", "digit_acc", "frechet")}


def run_dp(devices: int, styles: int, rounds: int, steps: int, seed: int, multipliers: Sequence[float],
           samples: int, delta: float) -> dict:
    personas = make_personas(devices, styles, seed=seed)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base_client = EdgeClient(DeviceConfig(data_dir=Path(tmp) / "base", profile="simulator",
                                              personalization="none", seed=seed))
        base = evaluate_clusters(base_client, personas, None, seed, samples)
        print("base model", base, flush=True)
        started = time.monotonic()
        reference = run_federation(personas, rounds, steps, seed, None, samples, Path(tmp) / "nodp")
        reference["seconds"] = time.monotonic() - started
        print("no DP", {k: v for k, v in reference.items() if not isinstance(v, list)}, flush=True)
        # calibrated on the no-DP run's first round; a deployment would use a public proxy population
        clip = float(statistics.median(reference["first_round_norms"]))
        for z in multipliers:
            started = time.monotonic()
            r = run_federation(personas, rounds, steps, seed, DPConfig(clip, z, delta=delta), samples,
                               Path(tmp) / f"z{z}")
            r["seconds"] = time.monotonic() - started
            runs.append(r)
            print(f"z={z}", {k: v for k, v in r.items() if not isinstance(v, list)}, flush=True)
    return {"devices": devices, "styles": styles, "rounds": rounds, "local_steps": steps, "seed": seed,
            "samples_per_cluster": samples, "delta": delta, "clip_norm": clip,
            "clip_calibration": "median L2 norm of the no-DP run's first-round updates",
            "adapter_parameters": int(sum(v.numel() for v in get_adapter_state(base_client.unet, SHARED).values())),
            "base_model": base, "no_dp": reference, "runs": runs,
            "epsilon_note": ("epsilon_local: replace-one-dataset adjacency (sensitivity 2C, what the aggregator, "
                             "which sees each update, can learn about a device); epsilon_released: DP-FedAvg "
                             "add/remove-a-device adjacency (sensitivity C); both after all rounds, RDP, "
                             "sample rate 1, at delta")}


def _json_eps(eps: float) -> float | None:
    return None if not np.isfinite(eps) else float(eps)


# ------------------------------------------------------------------------------------------ plots


def plot(result: dict, out: Output) -> None:
    """privacy.png: the attack panels (if measured) and the DP panel (if measured), from the JSON alone."""
    panels = (2 if "settings" in result else 0) + (1 if "dp" in result else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if "settings" in result:
        plot_attacks(result, axes[:2])
        axes[1].sharey(axes[0])
    if "dp" in result:
        plot_dp(result["dp"], axes[-1])
    out.save_figure(fig)


def plot_attacks(result: dict, axes) -> None:
    rows, default = result["settings"], result["default"]
    noises = sorted({r["noise"] for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {n: cmap(i / max(1, len(noises) - 1)) for i, n in enumerate(noises)}
    markers = {1: "^", 5: "s", "all": "o"}
    for ax, key, xlabel in ((axes[0], "top1_recovery", "exact-prompt recovery, top-1"),
                            (axes[1], "style", "style inferred by the aggregator")):
        for r in rows:
            x = r["attribute_acc"]["style"] if key == "style" else r[key]
            ax.scatter(x, r["ari"], marker=markers[r["prompts"]], s=45, edgecolors=colour[r["noise"]],
                       facecolors="none" if r["rotation"] else colour[r["noise"]], linewidths=1.4)
        x = default["attribute_acc"]["style"] if key == "style" else default[key]
        ax.scatter(x, default["ari"], marker="*", s=260, facecolors="none", edgecolors="red", linewidths=1.2)
        ax.axhline(TARGET_ARI, color="grey", ls="--", lw=0.8)
        if key == "top1_recovery":
            ax.axvline(TARGET_TOP1, color="grey", ls=":", lw=0.8)
        ax.set(xlabel=xlabel, xlim=(-0.03, 1.03))
    axes[0].set_ylabel("clustering ARI (task vectors only)")
    handles = [plt.Line2D([], [], color=colour[n], marker="o", ls="", label=f"noise {n:g}") for n in noises]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=f"{c} prompt(s) averaged")
                for c, m in markers.items()]
    handles += [plt.Line2D([], [], color="k", marker="o", ls="", mfc="none", label="rotation on (hollow)"),
                plt.Line2D([], [], color="red", marker="*", ls="", mfc="none", ms=12, label="default")]
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    axes[0].set_title(f"task vectors: {result['attacks']['devices']} devices, {result['attacks']['styles']} styles, "
                      f"bank of {result['attacks']['bank_size']:,} prompts", fontsize=9, loc="left")


def plot_dp(dp: dict, ax) -> None:
    """Quality against the epsilon a device reports (replace adjacency: its guarantee against the aggregator)."""
    finite = sorted((r for r in dp["runs"] if r["epsilon_local"] is not None), key=lambda r: r["epsilon_local"])
    eps = [r["epsilon_local"] for r in finite]
    for key, label, colour in (("style_acc", "style accuracy", "C0"), ("digit_acc", "digit accuracy", "C1")):
        ax.plot(eps, [r[key] for r in finite], "o-", color=colour, label=f"{label}, with DP")
        ax.axhline(dp["no_dp"][key], color=colour, lw=0.9, label=f"{label}, no DP")
        ax.axhline(dp["base_model"][key], color=colour, ls="--", lw=0.9, label=f"{label}, base model")
    for r in finite:
        ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon_local"], r["style_acc"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel=f"epsilon vs the aggregator after {dp['rounds']} rounds (delta={dp['delta']:g})",
           ylabel="cluster adapter quality", ylim=(0, 1.02))
    ax.set_title(f"updates: client-level DP, {dp['devices']} devices, clip {dp['clip_norm']:.2f}", fontsize=9)
    ax.legend(fontsize=6)


# ------------------------------------------------------------------------------------------ main


def attack_sizes(args: argparse.Namespace) -> AttackSizes:
    if args.smoke:
        return AttackSizes(4, 2, (0,), (0.3,), 8, attacker_styles=2, known_pairs=(2, 4), decoys=200)
    if args.quick:
        return AttackSizes(args.devices, args.styles, (0,), (0.0, 0.3, 1.0), 100)
    return AttackSizes(args.devices, args.styles, (0, 1, 2), NOISES, 200)


def attacks_part(args: argparse.Namespace) -> dict:
    """The attack sweep and the default chosen from it: the keys of privacy.json this part owns."""
    attacks = run_attacks(attack_sizes(args), PROMPT_COUNTS)
    settings = attacks.pop("settings")
    default, rule = choose_default(settings)
    return {"settings": settings, "attacks": attacks, "default": default, "default_rule": rule,
            "default_note": "ARI here is text-only; the aggregator refines clusters with first-round update "
                            "similarity, which benchmarks/clustering.py measures"}


def dp_part(args: argparse.Namespace) -> dict:
    if args.smoke:
        return run_dp(2, 1, 1, 1, seed=0, multipliers=[1.0], samples=4, delta=1e-5)
    multipliers = [0.0, 1.0] if args.quick else args.multipliers
    return run_dp(args.dp_devices, args.dp_styles, 2 if args.quick else args.dp_rounds, args.dp_steps,
                  seed=0, multipliers=multipliers, samples=32, delta=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("attacks", "dp", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="one seed, fewer settings, two multipliers")
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--styles", type=int, default=6)
    parser.add_argument("--dp-devices", type=int, default=4)
    parser.add_argument("--dp-styles", type=int, default=2)
    parser.add_argument("--dp-rounds", type=int, default=3)
    parser.add_argument("--dp-steps", type=int, default=15)
    parser.add_argument("--multipliers", type=float, nargs="+",
                        default=[0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "privacy")
    previous = out.previous() if args.part != "all" else None  # one part keeps the other's keys
    result = dict(previous or {})
    seconds = result.setdefault("seconds", {})
    parts = {"attacks": attacks_part, "dp": lambda a: {"dp": dp_part(a)}}
    for name, part in parts.items():
        if args.part not in (name, "all"):
            continue
        started = time.monotonic()
        result |= part(args)
        seconds[name] = time.monotonic() - started
        out.write(result, kept_from=previous)
        plot(result, out)
        if name == "attacks":
            print("default:", result["default_rule"], json.dumps(result["default"], indent=2))


if __name__ == "__main__":
    main()
