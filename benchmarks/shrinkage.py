"""Does the global component (James-Stein shrinkage toward the fleet's mean ΔW) help?

    python -m benchmarks.shrinkage [--seeds 1] [--rounds 4]      (or: fedaigc bench shrinkage)

In process, on the *true* style clusters (no clustering error, no broker: only the
interaction rule differs), 12 devices in groups of 4/3/3/2, each round every device trains
its cluster's adapter for 12 steps, the cluster aggregates exactly, then one of:
``intra`` (nothing more), ``shrink`` (toward the device-weighted fleet mean) or
``shrink_loo`` (toward the mean of the other clusters). Scores every style's final adapter
(64 samples per style) and writes benchmarks/results/shrinkage.json and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.global_model import GlobalModel, adapter_name  # noqa: E402
from aggregator.interaction import shrink_to_global, update_spread  # noqa: E402
from aggregator.rules import ClientUpdate, make_rule  # noqa: E402
from aggregator.simulation import FleetConfig, _personas, score_styles  # noqa: E402
from models.lora import LoraSpec, add_adapter, get_adapter_state, set_adapter_state, set_mix  # noqa: E402
from models.text import PromptEncoder  # noqa: E402
from models.training import LORA_LR, TrainConfig, train_denoiser  # noqa: E402
from models.unet import load_base_unet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("intra", "shrink", "shrink_loo")


def run(mode: str, seed: int, rounds: int, local_steps: int, samples: int) -> dict:
    personas = _personas(FleetConfig(devices=12, styles=4, sizes=(4, 3, 3, 2), seed=seed))
    spec = LoraSpec()
    model = GlobalModel(spec)
    initial = model.initial_adapter(seed)
    unet = load_base_unet()
    unet.requires_grad_(False)
    add_adapter(unet, "device", spec, seed=seed)
    set_mix(unet, {"device": 1.0})
    encoder = PromptEncoder()
    encodings = [torch.from_numpy(encoder.encode(list(p.train_prompts))) for p in personas]
    rule = make_rule("exact")
    styles = sorted({p.style for p in personas})
    current = {st: initial for st in styles}
    factors: list[dict] = []
    for rnd in tqdm(range(1, rounds + 1), desc=f"{mode} seed {seed}", leave=False):
        groups: dict[str, list[ClientUpdate]] = {st: [] for st in styles}
        for i, p in enumerate(personas):
            set_adapter_state(unet, "device", current[p.style])
            params = [q for k, q in unet.named_parameters() if ".device." in k]
            for q in params:
                q.requires_grad_(True)
            train_denoiser(unet, params, p.train_images, encodings[i],
                           TrainConfig(steps=local_steps, batch_size=16, lr=LORA_LR, seed=seed * 1000 + rnd * 100 + i))
            for q in params:
                q.requires_grad_(False)
            groups[p.style].append(ClientUpdate(f"d{i}", get_adapter_state(unet, "device"), len(p.train_images)))
        current = {st: rule.aggregate(current[st], groups[st], spec).adapter for st in styles}
        if mode != "intra":
            sizes = {st: float(len(groups[st])) for st in styles}
            spreads = {st: update_spread(groups[st], spec) for st in styles}
            current, f = shrink_to_global(current, sizes, spreads, spec, leave_one_out=mode == "shrink_loo")
            factors.append({st: float(np.mean(list(v.values()))) for st, v in f.items()})
    index = {st: k for k, st in enumerate(styles)}
    for st, k in index.items():
        model.set_cluster(k, current[st], rounds)

    def model_of(st):
        set_mix(model.unet, {adapter_name(index[st]): 1.0})
        return model.unet

    devices = {f"d{i}": p for i, p in enumerate(personas)}
    scores = score_styles(model_of, {d: p.style for d, p in devices.items()}, devices, samples, seed, 8)["styles"]
    return {"styles": scores, "mean_shrinkage_per_round": factors,
            "sizes": {st: sum(p.style == st for p in personas) for st in styles}}


def plot(per_style: dict, smallest: str, path: Path) -> None:
    styles = sorted(per_style["intra"])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(MODES)
    for i, m in enumerate(MODES):
        ax.bar(np.arange(len(styles)) + i * width, [per_style[m][st]["style_acc"] for st in styles], width, label=m)
    ax.set_xticks(np.arange(len(styles)) + width, [f"{st}*" if st == smallest else st for st in styles])
    ax.set(ylabel="style accuracy", ylim=(0, 1), title="global shrinkage vs intra-cluster only (* smallest cluster)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--samples", type=int, default=64, help="generated images per style")
    parser.add_argument("--out", default=str(RESULTS / "shrinkage.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = {m: {s: run(m, s, args.rounds, args.local_steps, args.samples) for s in range(args.seeds)} for m in MODES}
    styles = sorted(runs["intra"][0]["styles"])
    summary = {m: {st: {k: float(np.mean([runs[m][s]["styles"][st][k] for s in runs[m]]))
                        for k in ("style_acc", "digit_acc", "frechet")} for st in styles} for m in MODES}
    mean_style = {m: float(np.mean([summary[m][st]["style_acc"] for st in styles])) for m in MODES}
    smallest = min(styles, key=lambda st: runs["intra"][0]["sizes"][st])
    result = {"config": vars(args), "per_style": summary, "mean_style_acc": mean_style, "smallest": smallest,
              "smallest_gain": {m: {k: summary[m][smallest][k] - summary["intra"][smallest][k]
                                    for k in ("style_acc", "digit_acc", "frechet")} for m in MODES[1:]},
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, smallest, out.with_suffix(".png"))
    for m in MODES:
        print(m, {st: round(summary[m][st]["style_acc"], 2) for st in styles}, f"mean {mean_style[m]:.3f}")


if __name__ == "__main__":
    main()
