"""Clustering quality: ARI of task-vector clustering, and after refinement with update similarity.

    python -m benchmarks.clustering [--quick | --smoke] [--out DIR]

For each seed and task-noise level: personas -> EdgeClient task vectors (the exact
vectors devices seal) -> ``cluster_tasks``; then one real local round per device from the
common initial adapter -> ``refine_with_updates``. Writes benchmarks/results/clustering.json
and clustering.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.clustering import cluster_tasks, refine_with_updates  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk import DeviceConfig, EdgeClient, LocalData  # noqa: E402
from models.digits.data import make_personas  # noqa: E402
from models.digits.unet import load_base_unet  # noqa: E402
from models.lora import add_adapter, get_adapter_state, lora_config  # noqa: E402


def first_round_updates(personas, seed: int, steps: int) -> np.ndarray:
    """Each device trains ``steps`` from the same initial adapter; rows = flattened deltas."""
    unet = load_base_unet()
    add_adapter(unet, "init", lora_config(), seed=seed)
    init = get_adapter_state(unet, "init")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(tqdm(personas, desc="local rounds", leave=False)):
            client = EdgeClient(DeviceConfig(data_dir=Path(tmp) / str(i), profile="simulator", seed=seed + i,
                                             personalization="dual"))
            update = client.train_round(init, LocalData.from_persona(p), steps=steps)
            rows.append(torch.cat([update.delta[k].flatten() for k in sorted(update.delta)]).numpy())
    return np.stack(rows)


def task_vectors(personas, noise: float, seed: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        client = EdgeClient(DeviceConfig(data_dir=tmp, profile="simulator", task_noise=noise))
        return np.stack([client.task_vector(list(p.train_prompts), seed=seed * 1000 + i) for i, p in enumerate(personas)])


def run(devices: int, styles: int, seeds: list[int], noises: list[float], steps: int) -> dict:
    rows = []
    for seed in seeds:
        personas = make_personas(devices, styles, seed=seed)
        truth = [p.style for p in personas]
        updates = first_round_updates(personas, seed, steps)
        for noise in noises:
            vectors = task_vectors(personas, noise, seed)
            text = cluster_tasks(vectors)
            refined = refine_with_updates(vectors, updates)
            rows.append({"seed": seed, "noise": noise, "ari_text": adjusted_rand_score(truth, text),
                         "ari_refined": adjusted_rand_score(truth, refined),
                         "k_text": int(text.max() + 1), "k_refined": int(refined.max() + 1)})
            print(rows[-1], flush=True)
    summary = {}
    for noise in noises:
        sel = [r for r in rows if r["noise"] == noise]
        summary[str(noise)] = {k: float(np.mean([r[k] for r in sel])) for k in ("ari_text", "ari_refined", "k_text", "k_refined")}
        summary[str(noise)]["ari_refined_min"] = float(min(r["ari_refined"] for r in sel))
    return {"devices": devices, "styles": styles, "local_steps": steps, "seeds": seeds, "rows": rows, "by_noise": summary}


def plot(result: dict, out: Output) -> None:
    noises = sorted(float(n) for n in result["by_noise"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("ari_text", "task vectors only"), ("ari_refined", "+ first-round update similarity")):
        ax.plot(noises, [result["by_noise"][str(n)][key] for n in noises], marker="o", label=label)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="task-vector noise (expected norm)", ylabel="adjusted Rand index", ylim=(0, 1.02),
           title=f"{result['devices']} devices, {result['styles']} styles")
    ax.legend(fontsize=8)
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one noise level")
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--styles", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="local steps of the first round")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "clustering")
    started = time.monotonic()
    seeds = [0] if args.quick or args.smoke else [0, 1, 2]
    noises = [0.3] if args.quick or args.smoke else [0.0, 0.3, 0.6]
    devices, styles, steps = (4, 2, 1) if args.smoke else (args.devices, args.styles, args.steps)
    result = run(devices, styles, seeds, noises, steps)
    result["seconds"] = time.monotonic() - started
    out.write(result)
    plot(result, out)
    print(json.dumps(result["by_noise"], indent=2))


if __name__ == "__main__":
    main()
