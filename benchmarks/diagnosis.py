"""Why a device training alone beats the federation: the federation's own code paths, one cause at a time.

    python -m benchmarks.diagnosis [--smoke] [--variants base,fp32,...] [--seeds 0,1] [--out DIR]

One process, no broker: ``benchmarks._inprocess`` (real ``EdgeClient`` devices on the int8 base,
the uplink codec with error feedback, the aggregator's rule with its defaults, the
``DownlinkMirror``). Personas, seeds, rounds, local steps and the per-round evaluation
(``score_styles`` on the held-out prompts, 24 images and 8 sampling steps per style) are those
of ``federation.py --fleet --quick``.
Devices are grouped by their true style: the real ``ours_intra`` fleet reaches that grouping
after its first-round refinement (ARI 1.0), and every cluster starts round 1 from the same
adapter, so round 1 regrouped equals round 1 trained in these groups.

A variant changes one thing against ``base`` (ours_intra as the product runs it):

* ``fp32``        devices train on the full-precision base (the evaluation's) instead of int8;
* ``rank<k>``     the fleet's LoRA rank is k (devices and aggregator; local at rank k too);
* ``exact_eval``  each round is also scored with the untruncated ΔW mean (no SVD truncation);
* ``no_downlink`` full fp32 adapters down, no deltas and no seeded start;
* ``keep_opt``    each device keeps its AdamW state across rounds (the product resets it);
* ``lr<x>``, ``steps<n>``  learning rate / local steps per round (local with the same);
* ``split_<s>``   how the SVD puts the singular values into A and B: ``balanced`` (sqrt(s) in
                  each: the product before issue 18), ``init`` (A's rows at the norm of a fresh
                  adapter's A, B takes the rest), ``b`` (A orthonormal rows, B = U·S); the product
                  now gives A's rows the devices' own A row norm;
* ``server<x>``   the cluster moves x times the mean ΔW change (FedOpt's server learning rate);
* ``fedavg``      one adapter for all, factors averaged (the FedAvg baseline).

``local`` (each device alone, ``_inprocess.run_alone``) runs once per (lr, steps, rank,
seed) with the same number of rounds. Writes benchmarks/results/diagnosis.json and diagnosis.png.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.global_model import GlobalModel  # noqa: E402
from aggregator.rules.exact import mean_delta  # noqa: E402
from aggregator.simulation.fleet import FleetConfig  # noqa: E402
from benchmarks._inprocess import InProcessFederation, Variant, run_alone, true_style_groups  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from benchmarks.federation import QUICK_FLEET, SMOKE_FLEET  # noqa: E402
from models.lora import factorize, lora_config, lora_modules, lora_scale  # noqa: E402

METRICS = ("style_acc", "digit_acc", "frechet")


@dataclass(frozen=True)
class Knobs(Variant):
    """A run's variant, with the knobs only a diagnosis turns."""

    exact_eval: bool = False
    keep_optimizer: bool = False
    split: str | None = None          # None: the product's factorisation
    server_lr: float = 1.0            # the cluster moves server_lr x the mean ΔW change (FedOpt's server step)


def variant(name: str) -> Knobs:
    """A variant by name (see the module docstring)."""
    fixed = {"base": Knobs("base"), "fp32": Knobs("fp32", quantization="none"),
             "exact_eval": Knobs("exact_eval", exact_eval=True),
             "no_downlink": Knobs("no_downlink", downlink_deltas=False),
             "keep_opt": Knobs("keep_opt", keep_optimizer=True), "fedavg": Knobs("fedavg", method="fedavg")}
    if name in fixed:
        return fixed[name]
    if name.startswith("rank"):
        return Knobs(name, rank=int(name[4:]))
    if name.startswith("lr"):
        return Knobs(name, lr=float(name[2:]))
    if name.startswith("steps"):
        return Knobs(name, local_steps=int(name[5:]))
    if name.startswith("server"):
        return Knobs(name, server_lr=float(name[6:]))
    if name.startswith("split_"):
        return Knobs(name, split=name[6:])
    if "+" in name:  # combinations: "fp32+split_init"
        parts = [variant(p) for p in name.split("+")]
        merged = {}
        for p in parts:
            merged |= {k: v for k, v in asdict(p).items() if k != "name" and v != getattr(Knobs("x"), k)}
        return Knobs(name, **merged)
    raise SystemExit(f"unknown variant {name!r}")


# ------------------------------------------------------------------ the SVD split under test (f)
@contextlib.contextmanager
def split(kind: str | None):
    """Swap how the exact rule re-factorises ΔW into (A, B) for the duration (None: the product's own)."""
    if kind is None:
        yield
        return
    import aggregator.rules.exact as exact

    def factorize_as(delta, rank, a_shape, b_shape, scale, a_row_norm=None):
        u, s, vh = torch.linalg.svd(delta / scale, full_matrices=False)
        k = min(rank, s.shape[0])
        if kind == "balanced":
            left, right = s[:k].sqrt(), s[:k].sqrt()
        elif kind == "b":
            left, right = s[:k], torch.ones_like(s[:k])
        elif kind == "init":  # A's rows as long as a fresh Kaiming-uniform A's: 1/sqrt(3) (bound 1/sqrt(fan_in))
            norm = (1 / 3) ** 0.5
            left, right = s[:k] / norm, torch.full_like(s[:k], norm)
        else:
            raise SystemExit(f"unknown split {kind!r}")
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :k] = u[:, :k] * left
        a[:k] = right[:, None] * vh[:k]
        return a.reshape(a_shape).float(), b.reshape(b_shape).float()

    original = exact.factorize
    exact.factorize = factorize_as
    try:
        yield
    finally:
        exact.factorize = original


# ------------------------------------------------------------------ optimizer state across rounds (d)
@contextlib.contextmanager
def kept_optimizer(memory: dict, key: str, enabled: bool):
    """While a device trains, its AdamW starts from the state it ended the last round with (if ``enabled``)."""
    if not enabled:
        yield
        return
    real = torch.optim.AdamW

    def make(params, **kw):
        opt = real(params, **kw)
        if key in memory:
            opt.load_state_dict(memory[key])
        made.append(opt)
        return opt

    made: list = []
    torch.optim.AdamW = make
    try:
        yield
    finally:
        torch.optim.AdamW = real
        if made:
            memory[key] = made[-1].state_dict()


# ------------------------------------------------------------------ the federation, in one process
class Diagnosis(InProcessFederation):
    """The product's federation in one process, grouped by true style, with a variant's knobs turned and
    the statistics a diagnosis reads (truncation error, update agreement, the untruncated mean's scores)."""

    def __init__(self, cfg: FleetConfig, v: Knobs) -> None:
        personas = cfg.personas()
        groups = true_style_groups({f"d{i}": p for i, p in enumerate(personas)})
        super().__init__(cfg, v, personas, groups={d: 0 for d in groups} if v.method == "fedavg" else groups)
        self.opt_memory: dict = {}
        self.exact_model = GlobalModel(lora_config(v.rank * cfg.devices)) if v.exact_eval else None
        self.exact_adapters: dict = {}
        self.stats = {"truncation": {}, "agreement": {}, "exact_curves": {}}

    def train(self, device, client, start, data, version):
        with kept_optimizer(self.opt_memory, device, self.v.keep_optimizer):
            return super().train(device, client, start, data, version)

    def aggregate(self, rnd, cid, current, updates):
        with split(self.v.split):
            if self.exact_model is not None:
                self.exact_adapters[cid] = untruncated(updates, self.lora, self.v.rank * self.cfg.devices)
            adapter = super().aggregate(rnd, cid, current, updates)
        self.stats["truncation"].setdefault(rnd, {})[cid] = truncation_error(updates, adapter, self.lora)
        self.stats["agreement"].setdefault(rnd, {})[cid] = update_agreement(updates, current, self.lora)
        return server_step(current, adapter, self.v.server_lr, self.lora)

    def after_round(self, rnd, updates, adapters):
        if self.exact_model is not None:
            self.stats["exact_curves"][rnd] = self.score(self.exact_adapters, true_style_groups(self.persona_of),
                                                         self.exact_model)


def run_federated(cfg: FleetConfig, v: Knobs) -> dict:
    run = Diagnosis(cfg, v)
    out = run.run()
    out = {"curves": out["curves"], "losses": out["losses"], "truncation": run.stats["truncation"],
           "agreement": run.stats["agreement"]}
    if v.exact_eval:
        out["exact_curves"] = {0: out["curves"][0]} | run.stats["exact_curves"]
    return out


def _stacks(updates, module):
    ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    a = torch.stack([u.adapter[ka].reshape(u.adapter[ka].shape[0], -1) for u in updates]).double()
    b = torch.stack([u.adapter[kb].reshape(u.adapter[kb].shape[0], -1) for u in updates]).double()
    return ka, kb, a, b


def _weights(updates):
    return torch.tensor([float(u.samples) for u in updates], dtype=torch.float64)


def untruncated(updates, lora, rank: int) -> dict:
    """The exact sample-weighted ΔW mean as a rank-``rank`` adapter (rank >= the sum of the members' ranks: exact)."""
    out = {}
    scale = lora_scale(lora)
    big_scale = 1.0  # lora_config(rank) has alpha = rank
    for module in lora_modules(updates[0].adapter):
        ka, kb, a, b = _stacks(updates, module)
        mean = mean_delta(a, b, _weights(updates), scale)
        a_shape = (rank, *updates[0].adapter[ka].shape[1:])
        b_shape = (updates[0].adapter[kb].shape[0], rank, *updates[0].adapter[kb].shape[2:])
        out[ka], out[kb] = factorize(mean, rank, a_shape, b_shape, big_scale)
    return out


def truncation_error(updates, adapter, lora) -> float:
    """||mean ΔW - ΔW of the aggregated adapter|| / ||mean ΔW||, summed over modules (0: exact)."""
    scale = lora_scale(lora)
    err = tot = 0.0
    for module in lora_modules(adapter):
        ka, kb, a, b = _stacks(updates, module)
        mean = mean_delta(a, b, _weights(updates), scale)
        got = scale * (adapter[kb].reshape(adapter[kb].shape[0], -1).double()
                       @ adapter[ka].reshape(adapter[ka].shape[0], -1).double())
        err += float((mean - got).norm() ** 2)
        tot += float(mean.norm() ** 2)
    return (err / max(tot, 1e-30)) ** 0.5


def server_step(current, aggregated, lr: float, lora):
    """ΔW_now + lr·(ΔW_aggregated - ΔW_now), re-factorised like the rule does (lr 1: the aggregate itself)."""
    if lr == 1.0:
        return aggregated
    from aggregator.rules.exact import refactorize
    from models.lora import row_norm

    scale = lora_scale(lora)
    out = {}
    for module in lora_modules(current):
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        dw = lambda ad: scale * (ad[kb].reshape(ad[kb].shape[0], -1).double()  # noqa: E731
                                 @ ad[ka].reshape(ad[ka].shape[0], -1).double())
        target = dw(current) + lr * (dw(aggregated) - dw(current))
        out[ka], out[kb] = refactorize(target, aggregated[ka], aggregated[kb], scale,
                                       a_row_norm=row_norm(aggregated[ka]))
    return out


def update_agreement(updates, current, lora) -> float:
    """||mean of the devices' ΔW changes|| / mean of their norms, over all modules: 1 when the devices
    moved alike, 1/sqrt(n) when their changes were orthogonal (the average then moves that much less)."""
    scale = lora_scale(lora)
    w = _weights(updates) / _weights(updates).sum()
    changes = []
    for module in lora_modules(current):
        ka, kb, a, b = _stacks(updates, module)
        now = scale * (current[kb].reshape(current[kb].shape[0], -1).double()
                       @ current[ka].reshape(current[ka].shape[0], -1).double())
        changes.append((scale * torch.bmm(b, a) - now).reshape(len(updates), -1))
    flat = torch.cat(changes, dim=1)
    mean = (w[:, None] * flat).sum(0)
    return float(mean.norm() / (w * flat.norm(dim=1)).sum())


def run_local(cfg: FleetConfig, v: Knobs) -> dict:
    """``local`` (``run_alone``), with the variant's learning rate, steps, rank and base."""
    return run_alone(cfg, pooled=False, rank=v.rank, lr=v.lr, local_steps=v.local_steps, quantization=v.quantization)


# ------------------------------------------------------------------ summaries
def mean_styles(curve: dict, key: str) -> float:
    return float(np.mean([m[key] for m in curve["styles"].values()]))


def last(run: dict, cfg: FleetConfig, curves: str = "curves") -> dict:
    return {k: mean_styles(run[curves][cfg.rounds], k) for k in METRICS}


def per_style_last(run: dict, cfg: FleetConfig) -> dict:
    return {s: {k: m[k] for k in METRICS} for s, m in run["curves"][cfg.rounds]["styles"].items()}


def local_key(v: Variant) -> tuple:
    return (v.lr, v.local_steps, v.rank, v.quantization)


def summarize(runs: dict, locals_: dict, variants: list[Variant], cfg: FleetConfig, seeds: list[int]) -> dict:
    table = {}
    for v in variants:
        fed = [last(runs[v.name][s], cfg) for s in seeds]
        loc = [last(locals_[local_key(v)][s], cfg) for s in seeds]
        row = {k: float(np.mean([f[k] for f in fed])) for k in METRICS}
        row |= {f"{k}_sd": float(np.std([f[k] for f in fed])) for k in METRICS}
        row |= {f"local_{k}": float(np.mean([x[k] for x in loc])) for k in METRICS}
        row["style_gap_vs_local"] = row["style_acc"] - row["local_style_acc"]
        row["digit_gap_vs_local"] = row["digit_acc"] - row["local_digit_acc"]
        row["frechet_ratio_vs_local"] = row["frechet"] / row["local_frechet"]
        row["per_style"] = {str(s): per_style_last(runs[v.name][s], cfg) for s in seeds}
        row["local_per_style"] = {str(s): per_style_last(locals_[local_key(v)][s], cfg) for s in seeds}
        if v.exact_eval:
            ex = [last(runs[v.name][s], cfg, "exact_curves") for s in seeds]
            row["untruncated"] = {k: float(np.mean([x[k] for x in ex])) for k in METRICS}
        row["truncation_error_last_round"] = float(np.mean(
            [np.mean(list(runs[v.name][s]["truncation"][cfg.rounds].values())) for s in seeds]))
        table[v.name] = row
    return table


def plot(runs: dict, locals_: dict, variants: list[Variant], cfg: FleetConfig, seeds: list[int], out: Output) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rounds = list(range(cfg.rounds + 1))
    drawn = set()
    for v in variants:
        for label, run in ((v.name, runs[v.name]), (f"local{local_key(v)}", locals_[local_key(v)])):
            if label in drawn:
                continue
            drawn.add(label)
            for ax, key in zip(axes, METRICS):
                vals = np.mean([[mean_styles(run[s]["curves"][r], key) for r in rounds] for s in seeds], axis=0)
                ax.plot(rounds, vals, marker="o", ms=3, label=label, ls="--" if label.startswith("local") else "-")
    axes[0].set(xlabel="round", ylabel="style accuracy", ylim=(0, 1))
    axes[1].set(xlabel="round", ylabel="digit accuracy", ylim=(0, 1))
    axes[2].set(xlabel="round", ylabel="Fréchet distance", yscale="log")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"diagnosis: {cfg.devices} devices, {cfg.rounds} rounds x {cfg.local_steps} steps, "
                 f"seeds {seeds}", fontsize=9)
    out.save_figure(fig, "variants")


DEFAULT_VARIANTS = ("base", "split_balanced", "fp32", "exact_eval", "rank4", "no_downlink", "keep_opt", "lr0.005",
                    "lr0.02", "steps20", "split_init", "split_b", "server2", "fedavg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None, help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seeds", default="0", help="comma-separated fleet seeds (default 0)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="images per style and round (default federation.py --quick's 24; more: less noise)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = Output.of(parser, args, "diagnosis")
    torch.set_num_threads(1)
    base_cfg = FleetConfig(**(SMOKE_FLEET if args.smoke else QUICK_FLEET))
    if args.smoke:
        base_cfg = replace(base_cfg, eval_samples=4)
    if args.eval_samples:
        base_cfg = replace(base_cfg, eval_samples=args.eval_samples)
    names = (args.variants or ("base" if args.smoke else ",".join(DEFAULT_VARIANTS))).split(",")
    variants = [variant(n) for n in names if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.monotonic()
    runs: dict = {v.name: {} for v in variants}
    locals_: dict = {}
    jobs = [("local", v, s) for s in seeds for v in {local_key(v): v for v in variants}.values()] + \
           [("fed", v, s) for s in seeds for v in variants]
    seconds: dict = {}
    for kind, v, s in tqdm(jobs, desc="diagnosis", unit="run"):
        cfg = replace(base_cfg, seed=s)
        t = time.monotonic()
        if kind == "local":
            locals_.setdefault(local_key(v), {})[s] = run_local(cfg, v)
            seconds[f"local{local_key(v)}:{s}"] = time.monotonic() - t
        else:
            runs[v.name][s] = run_federated(cfg, v)
            seconds[f"{v.name}:{s}"] = time.monotonic() - t
        out.write({"runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()},
                   "local_runs": {str(k): {str(s): r for s, r in per.items()} for k, per in locals_.items()}},
                  partial=True)
    table = summarize(runs, locals_, variants, base_cfg, seeds)
    result = {"config": {k: str(x) for k, x in base_cfg.__dict__.items()}, "seeds": seeds,
              "variants": {v.name: asdict(v) for v in variants}, "table": table,
              "runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()},
              "local_runs": {str(k): {str(s): r for s, r in per.items()} for k, per in locals_.items()},
              "seconds": seconds, "total_seconds": time.monotonic() - started}
    plot(runs, locals_, variants, base_cfg, seeds, out)
    out.write(result)
    for name, row in table.items():
        print(f"{name:>14}: style {row['style_acc']:.3f} (local {row['local_style_acc']:.3f}) digit "
              f"{row['digit_acc']:.3f} ({row['local_digit_acc']:.3f}) frechet {row['frechet']:.0f} "
              f"({row['local_frechet']:.0f}) trunc {row['truncation_error_last_round']:.3f}"
              + (f" untruncated style {row['untruncated']['style_acc']:.3f}" if "untruncated" in row else ""))


if __name__ == "__main__":
    main()
