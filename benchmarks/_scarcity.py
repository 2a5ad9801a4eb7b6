"""Where collaboration pays: the methods against images per device, scored the way a user would.

Each persona owns 3 of the 10 digits and ``n`` images of them (n = 4 ... 80), in one style, in its
own phrasing. It is judged on (a) held-out prompts for digits it owns ("seen") and (b) prompts
for the 7 digits it never had, in its style's templates and digit wordings it never used
("unseen"). The headline measure is **joint accuracy**: a generated image counts only if both
its digit and its style are right; with it the Fréchet distance to real images of that style
and digit mix. The fleet is 12 devices over 4 styles in groups of 4/3/3/2.

Every federated method runs in one process over the product's code (``benchmarks._inprocess``):
``fedavg``, ``ifca``, ``ours_intra`` (task clustering from the sealed, noised task vectors, CFL
refinement after round 1, exact ΔW aggregation: the product's default) and ``ours`` (the same
with ``interaction = true``: ΔW-gated mixing between clusters, no shrinkage); ``local`` and
``central`` are ``run_alone``. The scarcest setting is also scored after every round (rounds to reach 90% of
central's joint accuracy).

The interaction experiment puts a clustering mistake and genuinely different tasks in one fleet:
the 4-device style is split into two clusters of 2, beside a 2-device cluster of another style,
and it compares ``ours`` with ``ours_intra`` on the fixed groups for the 2-device clusters.

Means over seeds come with 95% t-intervals; gains are paired per seed.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from aggregator.simulation.fleet import FleetConfig
from benchmarks._inprocess import InProcessFederation, Variant, run_alone, seen_and_unseen_scorer, true_style_groups
from models.digits.data import make_personas

METHODS = ("local", "fedavg", "ifca", "ours_intra", "ours", "central")
KINDS = ("unseen", "seen")
METRICS = ("joint_acc", "style_acc", "digit_acc", "frechet")


@dataclass(frozen=True)
class Sweep:
    """What one run of the sweep covers (the default is ``fedaigc bench federation``'s)."""

    images: tuple[int, ...] = (4, 8, 16, 32, 80)
    headline_seeds: int = 5          # seeds of the scarcest setting (the headline's)
    seeds_scarce: int = 3            # seeds of the other settings with images <= 16
    seeds_plenty: int = 2            # seeds above
    sizes: tuple[int, ...] = (4, 3, 3, 2)
    classes_per_device: int = 3
    held_out: int = 6
    unseen: int = 12
    rounds: int = 3
    local_steps: int = 10
    eval_samples: int = 24           # images per style and kind (seen / unseen)
    eval_steps: int = 8
    task_noise: float = 0.3
    methods: tuple[str, ...] = METHODS
    interaction_seeds: int = 8

    def seeds(self, n: int) -> list[int]:
        if n == self.headline_images:
            return list(range(self.headline_seeds))
        return list(range(self.seeds_scarce if n <= 16 else self.seeds_plenty))

    def settings(self) -> dict:
        """What a run's outcome depends on (not how many settings and seeds the sweep covers): runs
        recorded under equal settings are the same runs and can be reused (``--resume``)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("images", "seeds_scarce", "seeds_plenty", "methods", "interaction_seeds",
                             "headline_seeds")}

    @property
    def headline_images(self) -> int:
        """The scarcest setting with at most 16 images per device."""
        return min(n for n in self.images if n <= 16)

    def fleet(self, seed: int) -> FleetConfig:
        return FleetConfig(devices=sum(self.sizes), styles=len(self.sizes), sizes=self.sizes, rounds=self.rounds,
                           local_steps=self.local_steps, eval_samples=self.eval_samples, eval_steps=self.eval_steps,
                           task_noise=self.task_noise, seed=seed)

    def personas(self, n: int, seed: int, styles: tuple[str, ...] | None = None) -> list:
        return make_personas(sum(self.sizes), len(self.sizes), seed=seed, sizes=self.sizes, styles=styles,
                             images_per_client=n, classes_per_client=self.classes_per_device,
                             held_out=self.held_out, unseen=self.unseen)


QUICK = Sweep(images=(4, 16), headline_seeds=1, seeds_scarce=1, interaction_seeds=1)  # a subset of the default's runs
SMOKE = Sweep(images=(4,), headline_seeds=1, seeds_scarce=1, seeds_plenty=1, sizes=(2, 1), held_out=2, unseen=2,
              rounds=2, local_steps=1, eval_samples=2, eval_steps=2, interaction_seeds=1)
# the interaction fleet: the largest style's devices split in two clusters by a clustering mistake, beside
# genuinely different tasks; the 2-device clusters are the ones interaction is for
SPLIT_STYLES = ("bold", "thin", "slanted", "framed")


# ------------------------------------------------------------------ one job
def run_job(job: tuple) -> tuple[tuple, dict]:
    """One (experiment, images, seed, method) run, in a worker process."""
    experiment, n, seed, method, sweep = job
    torch.set_num_threads(1)
    cfg = sweep.fleet(seed)
    scored = None if n == sweep.headline_images and experiment == "sweep" else [cfg.rounds]
    started = time.monotonic()
    if experiment == "sweep":
        personas = sweep.personas(n, seed)
        scorer = seen_and_unseen_scorer(cfg)
        if method in ("local", "central"):
            out = run_alone(cfg, method == "central", personas, scorer=scorer, eval_rounds=scored)
        else:
            out = InProcessFederation(cfg, Variant(method, method=method), personas, scorer=scorer,
                                      eval_rounds=scored).run()
    else:  # "split": fixed groups with one style split in two
        personas = sweep.personas(n, seed, styles=SPLIT_STYLES[:len(sweep.sizes)])
        groups = split_groups({f"d{i}": p for i, p in enumerate(personas)})
        out = InProcessFederation(cfg, Variant(method, method=method), personas, groups=groups,
                                  scorer=cluster_scorer(cfg), eval_rounds=[cfg.rounds]).run()
        out["groups"] = out["assignment"]
    out["seconds"] = time.monotonic() - started
    return job[:4], out


def split_groups(persona_of: dict) -> dict[str, int]:
    """True-style groups, except that the largest style's devices are split over two clusters."""
    groups = true_style_groups(persona_of)
    largest = max(set(groups.values()), key=lambda g: (list(groups.values()).count(g), -g))
    members = [d for d in persona_of if groups[d] == largest]
    top = max(groups.values())
    return {d: (top + 1 if d in members[len(members) // 2:] else g) for d, g in groups.items()}


def cluster_scorer(cfg: FleetConfig):
    """Unseen scores per *cluster* (each cluster's devices judged on its adapter alone)."""
    from aggregator.simulation.fleet import score_styles

    def score(model_of, groups, persona_of):
        out = {}
        for cid in sorted(set(groups.values())):
            members = {d: g for d, g in groups.items() if g == cid}
            for which in KINDS:
                out.setdefault(which, {})[str(cid)] = next(iter(score_styles(
                    model_of, members, persona_of, cfg.eval_samples, cfg.seed, cfg.eval_steps,
                    which=which)["styles"].values()))
        return out

    return score


# ------------------------------------------------------------------ statistics
def interval(values) -> dict:
    """Mean and 95% t-interval half-width over seeds (the half-width is None for one seed)."""
    v = np.asarray(values, dtype=float)
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "ci95": half, "per_seed": v.tolist()}


def fleet_mean(run: dict, rnd: int, kind: str, key: str) -> float:
    """A run's score in round ``rnd``, averaged over styles (each style over its devices)."""
    return float(np.mean([m[key] for m in run["curves"][rnd][kind]["styles"].values()]))


def summarize(runs: dict, sweep: Sweep) -> dict:
    """Per images-per-device setting and method: each metric's mean and interval, for unseen and seen."""
    table: dict = {}
    for n in sweep.images:
        for m in sweep.methods:
            per = [runs[("sweep", n, s, m)] for s in sweep.seeds(n)]
            table.setdefault(str(n), {})[m] = {kind: {k: interval([fleet_mean(r, sweep.rounds, kind, k) for r in per])
                                                      for k in METRICS} for kind in KINDS}
    return table


def paired(runs: dict, n: int, seeds: list[int], a: str, b: str, kind: str, key: str, ratio: bool = False) -> dict:
    """Per-seed ``a - b`` (or ``a / b``) of a fleet-mean metric, with its interval."""
    rounds = max(runs[("sweep", n, seeds[0], a)]["curves"])
    va = [fleet_mean(runs[("sweep", n, s, a)], rounds, kind, key) for s in seeds]
    vb = [fleet_mean(runs[("sweep", n, s, b)], rounds, kind, key) for s in seeds]
    return interval([x / y if ratio else x - y for x, y in zip(va, vb)])


def rounds_to_target(runs: dict, sweep: Sweep, kind: str) -> dict:
    """Per method and seed: the first round whose joint accuracy reaches 90% of central's last round (None: never)."""
    n = sweep.headline_images
    out: dict = {"target_fraction_of_central": 0.9, "per_method": {}}
    for s in sweep.seeds(n):
        target = 0.9 * fleet_mean(runs[("sweep", n, s, "central")], sweep.rounds, kind, "joint_acc")
        for m in sweep.methods:
            run = runs[("sweep", n, s, m)]
            # a target of 0 (central learnt nothing) would be "reached" by every method in round 1
            hit = [r for r in sorted(run["curves"]) if r > 0 and target > 0
                   and fleet_mean(run, r, kind, "joint_acc") >= target]
            out["per_method"].setdefault(m, []).append(hit[0] if hit else None)
    return out


def small_clusters(runs: dict, sweep: Sweep) -> dict:
    """What interaction does for each 2-device cluster of the split fleet: paired per seed, unseen and seen."""
    n = sweep.headline_images
    seeds = list(range(sweep.interaction_seeds))
    intra0 = runs[("split", n, 0, "ours_intra")]
    sizes = {cid: list(intra0["groups"].values()).count(cid) for cid in set(intra0["groups"].values())}
    smallest = sorted(c for c, k in sizes.items() if k == min(sizes.values()))
    out: dict = {"cluster_sizes": {str(c): k for c, k in sizes.items()}, "smallest": [str(c) for c in smallest],
                 "split_clusters": [str(c) for c in split_of(intra0["groups"], sizes)], "per_cluster": {}}
    for kind in KINDS:
        for cid in map(str, sizes):
            def get(m, key):
                return np.array([runs[("split", n, s, m)]["curves"][sweep.rounds][kind][cid][key] for s in seeds])
            out["per_cluster"].setdefault(kind, {})[cid] = {
                "joint_gain": interval(get("ours", "joint_acc") - get("ours_intra", "joint_acc")),
                "frechet_ratio": interval(get("ours", "frechet") / get("ours_intra", "frechet")),
                "intra_joint": interval(get("ours_intra", "joint_acc")),
            }
        gains = np.array([out["per_cluster"][kind][str(c)]["joint_gain"]["per_seed"] for c in smallest])
        out.setdefault("smallest_joint_gain", {})[kind] = interval(gains.mean(axis=0))
    return out


def split_of(groups: dict, sizes: dict) -> list[int]:
    """The two clusters ``split_groups`` made of one style: the newest id and the one its devices came from."""
    newest = max(sizes)
    devices = sorted(groups, key=lambda d: int(d[1:]))
    first = next(d for d in devices if groups[d] == newest)
    before = devices[devices.index(first) - 1]
    return [groups[before], newest]


def headline(runs: dict, sweep: Sweep, small: dict | None) -> dict:
    """The scarcest setting's comparison of ours with local and central; ``small`` is ``small_clusters``'s."""
    n = sweep.headline_images
    seeds = sweep.seeds(n)
    out = {"images_per_device": n, "seeds": len(seeds),
           "unseen_joint_gain_vs_local": paired(runs, n, seeds, "ours", "local", "unseen", "joint_acc"),
           "seen_joint_gap_vs_local": paired(runs, n, seeds, "ours", "local", "seen", "joint_acc"),
           "frechet_ratio_vs_local": {k: paired(runs, n, seeds, "ours", "local", k, "frechet", ratio=True)
                                      for k in KINDS},
           "frechet_ratio_vs_central": {k: paired(runs, n, seeds, "ours", "central", k, "frechet", ratio=True)
                                        for k in KINDS},
           "rounds_to_target": {k: rounds_to_target(runs, sweep, k) for k in KINDS}}
    if small is not None:
        out["small_cluster_interaction_gain"] = small["smallest_joint_gain"]["unseen"]["mean"]
        out["small_cluster_interaction_ci"] = small["smallest_joint_gain"]["unseen"]["ci95"]
    return out


# ------------------------------------------------------------------ the run
def jobs(sweep: Sweep) -> list[tuple]:
    """Every run: the headline setting's first, then the interaction fleet's, then the other settings
    seed by seed (so a sweep stopped early covers every setting with its first seeds)."""
    n0 = sweep.headline_images
    out = [("sweep", n0, s, m, sweep) for s in sweep.seeds(n0) for m in sweep.methods]
    if sweep.interaction_seeds:
        out += [("split", n0, s, m, sweep) for s in range(sweep.interaction_seeds) for m in ("ours_intra", "ours")]
    most = max(len(sweep.seeds(n)) for n in sweep.images)
    return out + [("sweep", n, s, m, sweep) for s in range(most) for n in sweep.images
                  if n != n0 and s in sweep.seeds(n) for m in sweep.methods]


def covered(runs: dict, sweep: Sweep) -> Sweep:
    """The sweep the recorded ``runs`` complete: per setting the seeds every method ran (a setting's
    seed count is the smallest of them), the interaction fleet's complete seeds."""
    def complete(n, s):
        return all(("sweep", n, s, m) in runs for m in sweep.methods)

    counts = {n: next((s for s in range(len(sweep.seeds(n)) + 1) if s == len(sweep.seeds(n)) or not complete(n, s)))
              for n in sweep.images}
    n0 = sweep.headline_images
    if not counts[n0]:
        raise SystemExit("no complete seed of the scarcest setting is recorded yet")
    others = [n for n in sweep.images if n != n0 and counts[n] > 0]
    scarce = min((counts[n] for n in others if n <= 16), default=counts[n0])
    plenty = min((counts[n] for n in others if n > 16), default=sweep.seeds_plenty)
    images = (n0, *(n for n in others if counts[n] >= (scarce if n <= 16 else plenty)))
    inter = next(s for s in range(sweep.interaction_seeds + 1) if s == sweep.interaction_seeds
                 or not all(("split", sweep.headline_images, s, m) in runs for m in ("ours_intra", "ours")))
    return replace(sweep, images=tuple(sorted(images)), seeds_scarce=scarce, seeds_plenty=plenty,
                   interaction_seeds=inter, headline_seeds=counts[n0])


def reusable(recorded_result: dict | None, sweep: Sweep) -> dict:
    """The runs of an earlier (partial or finished) result with the same settings, keyed like ``run``'s."""
    if not recorded_result or recorded_result.get("settings") != json_safe(sweep.settings()):
        return {}
    out = {}
    for key, r in recorded_result.get("runs", {}).items():
        experiment, n, seed, method = key.split("/")
        r = dict(r, curves={int(k): v for k, v in r["curves"].items()})
        if experiment == "sweep" and int(n) == sweep.headline_images and len(r["curves"]) < sweep.rounds + 1:
            continue  # scored at its last round only (another setting was the headline): rounds_to_target needs all
        out[(experiment, int(n), int(seed), method)] = r
    return out


def json_safe(x):
    import json

    return json.loads(json.dumps(x, default=str))


def run(sweep: Sweep, workers: int, on_result=None, done: dict | None = None) -> dict:
    """All runs not in ``done``, ``workers`` processes at a time; ``on_result(runs)`` after each one."""
    runs: dict = {k: v for k, v in (done or {}).items() if k in {j[:4] for j in jobs(sweep)}}
    todo = [j for j in jobs(sweep) if j[:4] not in runs]
    if workers <= 1:
        results = map(run_job, todo)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=4)
        results = pool.imap_unordered(run_job, todo)
    previous = signal.signal(signal.SIGTERM, _interrupted)  # a stopped sweep must not leave its workers running
    try:
        for key, out in tqdm(results, total=len(todo), desc="federation sweep", unit="run"):
            runs[key] = out
            if on_result is not None:
                on_result(runs)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.close()
            pool.join()
    return runs


def _interrupted(signum, frame) -> None:
    raise SystemExit(128 + signum)


def seen_prompt_overlap(sweep: Sweep, n: int) -> float:
    """The share of the seen (held-out) prompts that are also, word for word, one of the persona's
    training prompts: a persona phrases its few digits in few ways, so with many images the seen
    prompts are mostly ones it trained on (its held-out *images* never are)."""
    shares = [np.mean([q in set(p.train_prompts) for q in p.test_prompts])
              for s in sweep.seeds(n) for p in sweep.personas(n, s)]
    return float(np.mean(shares))


def result(runs: dict, sweep: Sweep, seconds: float) -> dict:
    n = sweep.headline_images
    small = small_clusters(runs, sweep) if sweep.interaction_seeds else None
    return {"sweep": asdict(sweep), "seconds": seconds} | recorded(runs, sweep) | {
            "cpu_seconds": float(sum(r["seconds"] for r in runs.values())),
            "table": summarize(runs, sweep),
            "seen_prompt_overlap": {str(k): seen_prompt_overlap(sweep, k) for k in sweep.images},
            "headline": headline(runs, sweep, small), "interaction": small,
            "ari": {m: interval([runs[("sweep", k, s, m)]["ari"] for k in sweep.images for s in sweep.seeds(k)])
                    for m in ("ours_intra", "ours") if m in sweep.methods},
            "ari_text": {m: interval([runs[("sweep", k, s, m)]["ari_text"] for k in sweep.images
                                      for s in sweep.seeds(k)]) for m in ("ours_intra", "ours") if m in sweep.methods},
            # the per-round curves of the headline setting, per method and seed
            "methods": {m: {str(s): {"curves": runs[("sweep", n, s, m)]["curves"],
                                     "seconds": runs[("sweep", n, s, m)]["seconds"]}
                            for s in sweep.seeds(n)} for m in sweep.methods}}


def recorded(runs: dict, sweep: Sweep) -> dict:
    """Every finished run, keyed "experiment/images/seed/method", with the settings they ran under."""
    return {"settings": sweep.settings(), "runs": {"/".join(map(str, k)): v for k, v in runs.items()}}


def plot(res: dict, sweep: Sweep, out) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = (("unseen", "joint_acc", "unseen joint accuracy"), ("seen", "joint_acc", "seen joint accuracy"),
              ("unseen", "frechet", "unseen Fréchet"), ("seen", "frechet", "seen Fréchet"))
    xs = list(sweep.images)
    for ax, (kind, key, label) in zip(axes, panels):
        for m in sweep.methods:
            cells = [res["table"][str(n)][m][kind][key] for n in xs]
            mu = np.array([c["mean"] for c in cells])
            half = np.array([c["ci95"] or 0.0 for c in cells])
            ax.plot(xs, mu, marker="o", ms=3, label=m, ls="--" if m in ("local", "central") else "-")
            low, high = (0.0, 1.0) if key != "frechet" else (mu.min() / 4, mu.max() * 4)  # bands of 2 seeds are wide
            ax.fill_between(xs, np.clip(mu - half, low, high), np.clip(mu + half, low, high), alpha=0.12)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set(xlabel="images per device", ylabel=label, xticks=xs, xticklabels=[str(x) for x in xs])
        if key == "frechet":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{sum(sweep.sizes)} devices in styles of {'/'.join(map(str, sweep.sizes))}, "
                 f"{sweep.classes_per_device} digits each, {sweep.rounds} rounds x {sweep.local_steps} steps "
                 f"(mean, 95% interval over seeds)", fontsize=9)
    out.save_figure(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    n = sweep.headline_images
    for ax, kind in zip(axes, KINDS):
        for m in sweep.methods:
            per = res["methods"][m]
            rounds = sorted(next(iter(per.values()))["curves"])
            vals = np.array([[fleet_mean(per[s], r, kind, "joint_acc") for r in rounds] for s in per])
            ax.plot(rounds, vals.mean(0), marker="o", ms=3, label=m, ls="--" if m in ("local", "central") else "-")
        ax.set(xlabel="round", ylabel=f"{kind} joint accuracy", ylim=(0, 1), title=f"{n} images per device")
    axes[0].legend(fontsize=7)
    out.save_figure(fig, "rounds")


def sized(sweep: Sweep, images: str | None, seeds: int | None, methods: str | None) -> Sweep:
    """The sweep with the command line's overrides."""
    if images:
        sweep = replace(sweep, images=tuple(sorted(int(x) for x in images.split(","))))
    if seeds:
        sweep = replace(sweep, headline_seeds=seeds, seeds_scarce=seeds, seeds_plenty=seeds,
                        interaction_seeds=max(seeds, 2))
    if methods:
        chosen = tuple(m for m in methods.split(",") if m)
        if unknown := set(chosen) - set(METHODS):
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
        if not {"local", "central", "ours"} <= set(chosen):
            raise SystemExit("the sweep's summary compares ours with local and central: keep all three")
        sweep = replace(sweep, methods=chosen, interaction_seeds=sweep.interaction_seeds
                        if "ours_intra" in chosen else 0)
    return sweep
