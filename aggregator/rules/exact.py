"""Exact LoRA aggregation: average ΔW = scale·B·A, then re-factorise to rank r by SVD.

Averaging in the product space is what FedEx-LoRA (Singhal et al., 2024) and FLoRA
(Wang et al., NeurIPS 2024, which stacks the factors instead) argue for: the server's
adapter then represents the sample-weighted mean of the clients' weight changes. When
that mean has rank <= r, re-factorising is exact; otherwise the truncated SVD is the
best rank-r approximation (Eckart-Young). The singular values go into B and A's rows keep
the devices' own A norm, so the next round trains the cluster's adapter as fast as a device
trains its own (an even split, sqrt(s) in each factor, made both factors small and slowed the
next round down: issue 18, docs/results.md). Rank slots with no energy keep the current
A rows and a zero B column, so the adapter never degenerates into all-zero factors
(whose gradients would vanish).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aggregator.rules.base import Adapter, AggregationRule, ClientUpdate, sample_weights
from aggregator.rules.reducers import weighted_mean
from models.lora import LoraConfig, factorize, lora_modules, lora_scale, row_norm


class ExactLoraAggregation(AggregationRule):
    name = "exact"

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    def reduce(self, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(stack, weights)

    def combine(self, current: Adapter, updates: Sequence[ClientUpdate], lora: LoraConfig) -> tuple[Adapter, set[str]]:
        w = sample_weights(updates)
        out: Adapter = {}
        for module in lora_modules(current):
            ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            a = torch.stack([u.adapter[ka].reshape(u.adapter[ka].shape[0], -1) for u in updates]).double()
            b = torch.stack([u.adapter[kb].reshape(u.adapter[kb].shape[0], -1) for u in updates]).double()
            mean = self.reduce_factors(a, b, w, lora_scale(lora))
            out[ka], out[kb] = refactorize(mean, current[ka], current[kb], lora_scale(lora), self.rank,
                                           a_row_norm=clients_row_norm(a, w))
        return out, set()

    def reduce_factors(self, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """Reduce the clients' ΔW_i = scale·B_i·A_i from factors stacked on dim 0 (A: n x r x in, B: n x out x r).

        The weighted mean is one product of the concatenated factors, Σ w_i B_i A_i = [w_1 B_1 … w_n B_n]·[A_1; …; A_n],
        so no per-client ΔW is built (thousands of clients); other reducers get the n x out x in stack.
        """
        if type(self).reduce is not ExactLoraAggregation.reduce:
            return self.reduce(scale * torch.bmm(b, a), weights)
        return mean_delta(a, b, weights, scale)


def mean_delta(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ w_i scale·B_i·A_i (weights normalised) as one product of the concatenated factors
    [w_1 B_1 … w_n B_n]·[A_1; …; A_n]: no per-client ΔW is built."""
    wb = b * (weights / weights.sum()).to(b.dtype)[:, None, None]
    return scale * (wb.permute(1, 0, 2).reshape(b.shape[1], -1) @ a.reshape(-1, a.shape[2]))


def clients_row_norm(a: torch.Tensor, weights: torch.Tensor) -> float | None:
    """The clients' A row norm (root-mean-square over rows) that carries the most weight: the weighted
    median over clients (A stacked on dim 0), so one device cannot set the cluster's factor balance by
    sending a huge A with a tiny B (the same ΔW, which clipping and robust rules would let through)."""
    # over the rows each client has: a lower-rank device's zero padding (models.lora_ranks) is not a short row
    rows = a.pow(2).sum(dim=2)
    per_client = (rows.sum(dim=1) / (rows > 0).sum(dim=1).clamp(min=1)).sqrt()
    order = torch.argsort(per_client)
    cumulative = torch.cumsum((weights / weights.sum()).to(per_client.dtype)[order], dim=0)
    norm = float(per_client[order][int(torch.searchsorted(cumulative, torch.tensor(0.5, dtype=cumulative.dtype)))])
    return norm if norm > 0 and math.isfinite(norm) else None


def refactorize(delta: torch.Tensor, a_now: torch.Tensor, b_now: torch.Tensor, scale: float,
                rank: int | None = None, a_row_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of ``delta`` shaped like the current ones, with dead slots re-seeded.

    A's rows get ``a_row_norm`` (default: the current A's), B the singular values: the adapter
    keeps the balance between its factors that it was trained with, so the next round's steps
    move ΔW as far as they would have on the devices' own adapters (``factorize`` says why).
    """
    r = a_now.shape[0] if rank is None else rank
    if r != a_now.shape[0]:
        raise ValueError(f"re-factorising to rank {r} needs adapters of rank {r}, these have {a_now.shape[0]}")
    a, b = factorize(delta, r, a_now.shape, b_now.shape, scale, a_row_norm or row_norm(a_now))
    a2, b2 = a.reshape(r, -1), b.reshape(b.shape[0], r)
    energy = a2.norm(dim=1) * b2.norm(dim=0)
    dead = energy <= 1e-12 * max(float(energy.max()), 1e-30)
    if bool(dead.any()):
        a2[dead] = a_now.reshape(r, -1)[dead].float()
        b2[:, dead] = 0.0
    return a2.reshape(a_now.shape).contiguous(), b2.reshape(b_now.shape).contiguous()
