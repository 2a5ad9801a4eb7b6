"""Does inter-cluster interaction lift a small cluster over intra-cluster aggregation alone?

    python -m benchmarks.interaction [--seeds 3] [--rounds 4] [--images 24] [--smoke] [--out DIR_OR_JSON]
                                                                         (or: fedaigc bench interaction)

In process, on *true* clusters (no clustering error, no broker: only the interaction rule
differs), 12 devices in clusters of 4/3/3/2, each with few images (``--images``: 24 by
default, where a 2-device cluster already scores like a 3-device one of its style; at 8,
``interaction_images8.json``, data is scarce, which is where borrowing can pay). Each round
every device trains its cluster's adapter for 12 steps, each cluster aggregates exactly,
then one of ``intra`` (nothing more), ``mix`` (the shipped default: similarity mixing,
gated by the cosine of the clusters' ΔW), ``mix_text`` (gated instead by the centered
cosine of the centroids of the devices' defended task vectors, at 0.2) or ``shrink``
(James-Stein pull toward the fleet's mean ΔW, opt-in). Two fleets:

* ``distinct``: four different styles (bold 4, thin 3, slanted 3, framed 2); nothing is
  common beyond drawing digits, so the right amount to borrow is nothing;
* ``split``: one task in two clusters (framed 3 and framed 2, beside bold 4 and thin 3),
  as when a task spans two edge sites or clustering splits it: the 2-device cluster has a
  3-device cluster of its own task to learn from;
* ``split_slanted``: the same with the hardest style (slanted), the easiest being framed.

Scores the smallest cluster and every other cluster (64 generated images each), and records
the two gate signals for pairs that share a task and pairs that do not: the clusters' ΔW
cosine every round, and the centered task-centroid cosine over ``--gate-fleets`` random
fleets (prompt encodings only, no training). ``--smoke``: the ``split`` fleet only, one seed and
round, one local step, 8 images per device, 4 samples per cluster, 2 gate fleets. Writes
benchmarks/results/interaction.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
from concurrent.futures import ProcessPoolExecutor

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.clustering import centroids  # noqa: E402
from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.interaction import adapter_agreement, centered_similarity, interact, update_spread  # noqa: E402
from aggregator.rules import ClientUpdate, make_rule  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk.privacy import task_vector_from_encodings  # noqa: E402
from models.digits.backend import DigitsBackend  # noqa: E402
from models.digits.data import STYLES, make_personas  # noqa: E402
from models.digits.evaluate import evaluate, sample_for_personas  # noqa: E402
from models.lora import add_adapter, draw_adapter, get_adapter_state, lora_config, set_adapter_state, set_mix  # noqa: E402
from models.text import PromptEncoder  # noqa: E402
from models.training import LORA_LR, TrainConfig, train_adapters  # noqa: E402

MODES = ("intra", "mix", "mix_text", "shrink")
FLEETS = {"distinct": ("bold", "thin", "slanted", "framed"), "split": ("bold", "thin", "framed", "framed"),
          "split_slanted": ("bold", "thin", "slanted", "slanted")}
SMOKE_FLEETS = ("split",)  # a same-task pair and different-task pairs: every gate signal gets samples
SIZES = (4, 3, 3, 2)  # the last cluster is the smallest
METRICS = ("style_acc", "digit_acc", "frechet")
TASK_NOISE = 0.3  # the simulator's default defence on task vectors
TEXT_GATE = 0.2  # mix_text's threshold, chosen from the gate calibration this benchmark records


def task_centroids(personas, cluster_of: list[int], encodings: list[np.ndarray], seed: int) -> dict[int, np.ndarray]:
    """Cluster centroids of the devices' defended task vectors, as the aggregator forms them."""
    rng = np.random.default_rng(seed)
    vectors = np.stack([task_vector_from_encodings(e, TASK_NOISE, rng) for e in encodings])
    return centroids(vectors, np.array(cluster_of))


def gate_calibration(fleets: int, images: int) -> dict:
    """Centered centroid cosine of same-task and different-task cluster pairs over random fleets.

    Half the fleets are like ``split`` (four clusters 4/3/3/2, two of them one task), half
    have six different styles (3/2/2/2/2/1); styles drawn at random from all ten.
    """
    encoder = PromptEncoder()
    same: list[float] = []
    different: list[float] = []
    for seed in range(fleets):
        rng = np.random.default_rng(1000 + seed)
        if seed % 2 == 0:
            drawn = list(rng.choice(STYLES, size=3, replace=False))
            styles, sizes = (*drawn, drawn[int(rng.integers(3))]), SIZES
        else:
            styles, sizes = tuple(rng.choice(STYLES, size=6, replace=False)), (3, 2, 2, 2, 2, 1)
        personas = make_personas(sum(sizes), len(sizes), seed=seed, sizes=sizes, styles=styles, images_per_client=images)
        cluster_of = [c for c, k in enumerate(sizes) for _ in range(k)]
        sim = centered_similarity(task_centroids(personas, cluster_of,
                                                 [encoder.encode(list(p.train_prompts)) for p in personas], seed))
        for a, b in itertools.combinations(range(len(sizes)), 2):
            (same if styles[a] == styles[b] else different).append(sim[a][b])
    thresholds = (0.0, 0.1, 0.2, 0.3, 0.5)
    return {"fleets": fleets, "same_task": same, "different_task": different,
            "same_task_passing": {str(t): float(np.mean(np.array(same) >= t)) for t in thresholds},
            "different_task_passing": {str(t): float(np.mean(np.array(different) >= t)) for t in thresholds}}


def run(fleet: str, mode: str, seed: int, rounds: int, local_steps: int, images: int, samples: int) -> dict:
    torch.set_num_threads(1)
    personas = make_personas(sum(SIZES), len(SIZES), seed=seed, sizes=SIZES, styles=FLEETS[fleet],
                             images_per_client=images)
    cluster_of = [c for c, k in enumerate(SIZES) for _ in range(k)]
    clusters = range(len(SIZES))
    defaults = AggregatorConfig()
    spec = lora_config()
    backend = DigitsBackend.from_pretrained()
    unet = backend.denoiser
    unet.requires_grad_(False)
    add_adapter(unet, "device", spec, seed=seed)
    set_mix(unet, {"device": 1.0})
    encoder = PromptEncoder()
    encodings = [encoder.encode(list(p.train_prompts)) for p in personas]
    centroid = task_centroids(personas, cluster_of, encodings, seed)
    rule = make_rule("exact")
    current = {c: draw_adapter(unet, spec, seed) for c in clusters}
    agreement: list[dict] = []  # per round, before interaction: ΔW cosine of every cluster pair
    for rnd in range(1, rounds + 1):
        groups: dict[int, list[ClientUpdate]] = {c: [] for c in clusters}
        for i, p in enumerate(personas):
            set_adapter_state(unet, "device", current[cluster_of[i]])
            train_adapters(backend, ["device"], backend.encode_images(p.train_images), torch.from_numpy(encodings[i]),
                           TrainConfig(steps=local_steps, batch_size=16, lr=LORA_LR, seed=seed * 1000 + rnd * 100 + i))
            groups[cluster_of[i]].append(ClientUpdate(f"d{i}", get_adapter_state(unet, "device"), len(p.train_images)))
        current = {c: rule.aggregate(current[c], groups[c], spec).adapter for c in clusters}
        sizes = {c: float(len(groups[c])) for c in clusters}
        cos = adapter_agreement(current, spec)
        agreement.append({f"{a}-{b}": cos[a][b] for a, b in itertools.combinations(clusters, 2)})
        if mode in ("mix", "mix_text"):
            gates = ({"min_similarity": defaults.interaction_min_similarity,
                      "min_agreement": defaults.interaction_min_agreement} if mode == "mix"
                     else {"min_similarity": TEXT_GATE, "min_agreement": None})
            current = interact(current, centroid, sizes, spec, defaults.borrow, defaults.temperature, **gates)
        elif mode == "shrink":
            current = interact(current, centroid, sizes, spec, borrow=0.0,
                               spreads={c: update_spread(groups[c], spec) for c in clusters})
    scores = {}
    for c in clusters:
        set_adapter_state(unet, "device", current[c])
        members = [p for i, p in enumerate(personas) if cluster_of[i] == c]
        scores[c] = evaluate(*sample_for_personas(unet, members, samples, seed, 8), members[0].style)
    sim = centered_similarity(centroid)
    return {"fleet": fleet, "mode": mode, "seed": seed, "clusters": {str(c): s for c, s in scores.items()},
            "task_similarity": {f"{a}-{b}": sim[a][b] for a, b in itertools.combinations(clusters, 2)},
            "agreement": agreement}


def plot(summary: dict, out: Output) -> None:
    """Style accuracy (top) and Fréchet distance relative to intra-only (bottom) per cluster."""
    fig, axes = plt.subplots(2, len(summary), figsize=(13, 6), sharey="row", squeeze=False)
    width = 0.8 / len(MODES)
    for col, fleet in enumerate(summary):
        labels = [f"{st} ({n})" + ("*" if c == len(SIZES) - 1 else "") for c, (st, n) in enumerate(zip(FLEETS[fleet], SIZES))]
        for i, m in enumerate(MODES):
            per = summary[fleet][m]
            x = np.arange(len(SIZES)) + i * width
            axes[0, col].bar(x, [per[str(c)]["style_acc"] for c in range(len(SIZES))], width, label=m)
            axes[1, col].bar(x, [per[str(c)]["frechet"] / summary[fleet]["intra"][str(c)]["frechet"]
                                 for c in range(len(SIZES))], width, label=m)
        for row in (0, 1):
            axes[row, col].set_xticks(np.arange(len(SIZES)) + 1.5 * width, labels, fontsize=8)
        axes[0, col].set(title=f"{fleet} (* smallest)", ylim=(0, 1))
        axes[1, col].axhline(1.0, color="grey", lw=0.8)
        axes[1, col].set_ylim(0.5, 1.5)
    axes[0, 0].set_ylabel("style accuracy (higher is better)")
    axes[1, 0].set_ylabel("Fréchet / intra-only (lower is better)")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    out.save_figure(fig)


def run_all(fleets: tuple[str, ...], args: argparse.Namespace) -> list[dict]:
    """Every (seed, fleet, mode), ``args.workers`` at a time, each in a process of its own."""
    jobs = [(f, m, s) for s in range(args.seeds) for f in fleets for m in MODES]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run, f, m, s, args.rounds, args.local_steps, args.images, args.samples) for f, m, s in jobs]
        return [fut.result() for fut in tqdm(futures, desc="interaction runs")]


def summarize(runs: list[dict], fleets: tuple[str, ...], seeds: int) -> tuple[dict, dict]:
    """Mean quality per fleet, mode and cluster; and each mode's gain over intra-only for the smallest cluster."""
    summary = {f: {m: {str(c): {k: float(np.mean([r["clusters"][str(c)][k] for r in runs
                                                   if r["fleet"] == f and r["mode"] == m]))
                                for k in METRICS} for c in range(len(SIZES))} for m in MODES} for f in fleets}
    small, others = str(len(SIZES) - 1), [str(c) for c in range(len(SIZES) - 1)]

    def per_seed_gain(f: str, m: str, c: str, k: str) -> list[float]:
        pick = {(r["mode"], r["seed"]): r["clusters"][c][k] for r in runs if r["fleet"] == f}
        return [pick[(m, s)] - pick[("intra", s)] for s in range(seeds)]

    gains = {f: {m: {"smallest": {k: per_seed_gain(f, m, small, k) for k in METRICS},
                     "others_mean_style_acc": float(np.mean([summary[f][m][c]["style_acc"]
                                                             - summary[f]["intra"][c]["style_acc"] for c in others]))}
                 for m in MODES[1:]} for f in fleets}
    return summary, gains


def agreement_calibration(runs: list[dict]) -> dict:
    """The clusters' ΔW cosine before interaction, for pairs of one task and pairs of different tasks."""
    pairs: dict[str, list[float]] = {"same_task": [], "different_task": []}
    for r in (r for r in runs if r["mode"] == "intra"):  # the others' ΔW have been mixed or shrunk
        styles = FLEETS[r["fleet"]]
        for rnd in r["agreement"]:
            for pair, cos in rnd.items():
                a, b = map(int, pair.split("-"))
                pairs["same_task" if styles[a] == styles[b] else "different_task"].append(cos)
    return {k: {"min": min(v), "max": max(v), "median": float(np.median(v))} for k, v in pairs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=24, help="images per device (a quarter held out)")
    parser.add_argument("--samples", type=int, default=64, help="generated images per cluster")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--gate-fleets", type=int, default=20, help="random fleets for the gate calibration")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Output.of(parser, args, "interaction")
    fleets = SMOKE_FLEETS if args.smoke else tuple(FLEETS)
    if args.smoke:
        args.seeds, args.rounds, args.local_steps, args.images, args.samples, args.gate_fleets = 1, 1, 1, 8, 4, 2
    gate = gate_calibration(args.gate_fleets, args.images)
    print(f"centered task-centroid cosine, pairs passing per threshold: same task {gate['same_task_passing']} "
          f"(n={len(gate['same_task'])}), different tasks {gate['different_task_passing']} "
          f"(n={len(gate['different_task'])})")
    runs = run_all(fleets, args)
    summary, gains = summarize(runs, fleets, args.seeds)
    agreement = agreement_calibration(runs)
    print(f"ΔW cosine, same task {agreement['same_task']}, different tasks {agreement['different_task']}")
    small, others = str(len(SIZES) - 1), [str(c) for c in range(len(SIZES) - 1)]
    result = {"config": vars(args), "fleets": {f: dict(zip(FLEETS[f], SIZES)) for f in fleets},
              "smallest_cluster": small,
              "gate_calibration": gate, "agreement_calibration": agreement,
              "summary": summary, "gain_over_intra": gains, "runs": runs}
    out.write(result)
    plot(summary, out)
    for f in fleets:
        for m in MODES:
            s = summary[f][m][small]
            print(f"{f:8s} {m:6s} smallest: style {s['style_acc']:.2f} digit {s['digit_acc']:.2f} Fréchet {s['frechet']:.0f}; "
                  f"others' style {np.mean([summary[f][m][c]['style_acc'] for c in others]):.2f}")


if __name__ == "__main__":
    main()
