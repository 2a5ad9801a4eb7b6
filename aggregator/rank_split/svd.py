"""FlexLoRA's split: the best rank-r approximation of the cluster's ΔW (truncated SVD).

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources" (FlexLoRA, NeurIPS 2024): the server forms the full ΔW and hands each client
its top-r singular directions, which is the Eckart-Young optimum in Frobenius norm. The factors
are balanced as the exact rule balances its own (A's rows keep the adapter's row norm, B carries
the singular values: ``aggregator.rules.exact.refactorize``), and a slot with no energy keeps
the adapter's own A row with a zero B column, so a device's fresh slots still train.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aggregator.rank_split.base import Adapter, RankSplit
from aggregator.rules.exact import refactorize
from models.lora import delta_weight, lora_modules, row_norm
from models.lora_ranks import truncate_rank


class SvdSplit(RankSplit):
    name = "svd"

    def lower(self, adapter: Mapping[str, torch.Tensor], rank: int, scale: float) -> Adapter:
        kept = truncate_rank(adapter, rank)  # the slots a dead direction falls back to
        out: Adapter = {}
        for m in lora_modules(adapter):
            ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
            delta = delta_weight(adapter[ka], adapter[kb], scale)
            out[ka], out[kb] = refactorize(delta, kept[ka], kept[kb], scale, a_row_norm=row_norm(adapter[ka]))
        return out
