"""Pure reductions over a stack of per-client tensors (first dimension = client)."""

from __future__ import annotations

import torch


def weighted_mean(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
    return (stack * w).sum(0) / weights.sum()


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al., 2018); robust to < 50% arbitrary clients."""
    return stack.median(dim=0).values if stack.shape[0] % 2 else stack.quantile(0.5, dim=0)


def trimmed_mean(stack: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean after dropping the ``beta`` fraction largest and smallest values per coordinate."""
    n = stack.shape[0]
    k = int(beta * n)
    if k == 0:
        return stack.mean(0)
    ordered = stack.sort(dim=0).values
    return ordered[k:n - k].mean(0)
