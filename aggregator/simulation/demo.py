"""``fedaigc demo``: a real federation on this machine, and what it produced.

Writes to the output directory: ``cluster-<id>.png`` (samples of each cluster's adapter
for its members' own prompts), ``hybrid.png`` (two clusters and their 50/50 mix),
``convergence.png`` (quality and loss per round) and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from aggregator.global_model import GlobalModel  # noqa: E402
from aggregator.simulation.fleet import FederationResult, FleetConfig, run_federation  # noqa: E402
from models.lora import lora_config  # noqa: E402
from models.text import PromptEncoder  # noqa: E402


def image_grid(rows: list[torch.Tensor], labels: list[str], path: Path, title: str) -> None:
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.8, len(rows) * 0.9 + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_ylabel(labels[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: FederationResult, cfg: FleetConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    personas = cfg.personas()
    ids = sorted(result.true_style)
    persona_of = dict(zip(ids, personas))
    rank = next(v.shape[0] for k, v in next(iter(result.adapters.values())).items() if k.endswith("lora_A.weight"))
    model = GlobalModel(lora_config(rank))
    for cid, adapter in result.adapters.items():
        model.set_cluster(cid, adapter, cfg.rounds)
    encoder = PromptEncoder()
    members = {cid: [persona_of[d] for d, c in result.assignment.items() if c == cid] for cid in result.adapters}
    for cid, group in members.items():
        if not group:
            continue
        rows, labels = [], []
        for p in group[:4]:
            prompts = list(p.test_prompts)[:8]
            rows.append(model.generate(torch.from_numpy(encoder.encode(prompts)), {cid: 1.0}, seed=cfg.seed))
            labels.append(f"{p.style}")
        image_grid(rows, labels, out / f"cluster-{cid}.png", f"cluster {cid}: members' own prompts")
    ranked = sorted((c for c in members if members[c]), key=lambda c: -len(members[c]))
    hybrid = None
    if len(ranked) >= 2:
        a, b = ranked[:2]
        prompts = [f"a {d}" for d in range(8)]
        enc = torch.from_numpy(encoder.encode(prompts))
        rows = [model.generate(enc, {a: 1.0}, seed=cfg.seed), model.generate(enc, {a: 0.5, b: 0.5}, seed=cfg.seed),
                model.generate(enc, {b: 1.0}, seed=cfg.seed)]
        style_a, style_b = members[a][0].style, members[b][0].style
        image_grid(rows, [f"{style_a}", "50/50 mix", f"{style_b}"], out / "hybrid.png",
                   f"hybrid style: cluster {a} ({style_a}) x cluster {b} ({style_b})")
        hybrid = {"clusters": [a, b], "styles": [style_a, style_b]}
    plot_convergence(result, out / "convergence.png")
    summary = summarize(result)
    summary["hybrid"] = hybrid
    (out / "report.md").write_text(report_markdown(result, summary, cfg))
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def plot_convergence(result: FederationResult, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    rounds = sorted(result.curves)
    styles = sorted({s for r in rounds for s in result.curves[r]["styles"]})
    for style in styles:
        xs = [r for r in rounds if style in result.curves[r]["styles"]]
        axes[0].plot(xs, [result.curves[r]["styles"][style]["style_acc"] for r in xs], marker="o", label=style)
        axes[1].plot(xs, [result.curves[r]["styles"][style]["frechet"] for r in xs], marker="o", label=style)
    axes[0].set(xlabel="round", ylabel="style accuracy", title="style accuracy (devices' cluster adapters)",
                ylim=(-0.02, 1.02))
    axes[1].set(xlabel="round", ylabel="Fréchet distance", title="Fréchet distance (lower is better)", yscale="log")
    lr = sorted(result.losses)
    axes[2].plot(lr, [result.losses[r] for r in lr], marker="o", color="black")
    axes[2].set(xlabel="round", ylabel="local loss after training", title="devices' training loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(result: FederationResult) -> dict:
    personal = [d["personal"]["style_acc"] for d in result.devices.values() if "personal" in d]
    base = [d["base"]["style_acc"] for d in result.devices.values() if "base" in d]
    up = sum(v["up"] for per in result.traffic.values() for v in per.values())
    down = sum(v["down"] for per in result.traffic.values() for v in per.values())
    return {
        "seconds": round(result.seconds, 1),
        "ari_text": round(result.ari("text"), 3),
        "ari_final": round(result.ari("final"), 3),
        "styles": {s: {k: round(v, 4) for k, v in m.items()} for s, m in result.final["styles"].items()},
        "clusters": result.final["clusters"],
        "device_style_acc_base": round(sum(base) / max(1, len(base)), 3),
        "device_style_acc_personal": round(sum(personal) / max(1, len(personal)), 3),
        "bytes_up": up,
        "bytes_down": down,
        "refusals": result.refusals,
        "round_seconds": [round(s, 1) for s in result.round_seconds],
    }


def report_markdown(result: FederationResult, s: dict, cfg: FleetConfig) -> str:
    lines = [
        "# fedaigc demo report", "",
        f"{cfg.devices} devices, {cfg.styles} styles, {cfg.rounds} rounds of {cfg.local_steps} local steps; "
        f"finished in {s['seconds']} s.", "",
        "## Clustering", "",
        f"- adjusted Rand index vs the true styles: **{s['ari_text']}** from encrypted task vectors alone, "
        f"**{s['ari_final']}** after refinement with first-round update similarity", "",
        "Clusters (true styles of their devices): " + "; ".join(
            f"{c}: " + ", ".join(f"{n} {st}" for st, n in comp.items()) for c, comp in result.final["clusters"].items()),
        "", "## Quality per style of the cluster adapters (global model, devices' held-out prompts)", "",
        "| style | devices | style acc | digit acc | Fréchet |", "|---|---|---|---|---|",
    ]
    for st, m in sorted(result.final["styles"].items()):
        lines.append(f"| {st} | {int(m['devices'])} | {m['style_acc']:.2f} | {m['digit_acc']:.2f} | {m['frechet']:.0f} |")
    lines += [
        "", "## Devices (the adapters each device runs, its own test prompts)", "",
        f"- style accuracy: base model {s['device_style_acc_base']:.2f} -> after the federation "
        f"{s['device_style_acc_personal']:.2f}", "",
        "## Bytes on the wire (MQTT payloads, envelopes and chunking included)", "",
        f"- uplink {s['bytes_up'] / 1e6:.2f} MB, downlink {s['bytes_down'] / 1e6:.2f} MB, "
        f"{(s['bytes_up'] + s['bytes_down']) / max(1, cfg.devices * cfg.rounds) / 1e3:.1f} kB per device per round", "",
        f"Refusals: {s['refusals'] or 'none'}", "",
        "Files: `cluster-*.png`, `hybrid.png`, `convergence.png`, `result.json`.", "",
    ]
    return "\n".join(lines)


def run_demo(cfg: FleetConfig, out: Path) -> dict:
    started = time.monotonic()
    result = run_federation(cfg)
    summary = write_outputs(result, cfg, out)
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    return summary
