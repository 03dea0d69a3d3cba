"""The screen against near-duplicates: a new question is dropped when it shares word n-grams (or, with an
embedder, a near direction) with a question kept before, this iteration's or an earlier one's, or with an
evaluation question (decontamination); and the diversity figures of a set of questions."""

from __future__ import annotations

import re

import numpy as np

from sedir_utils.engine.embeddings import nearest


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class Screen:
    """Embedding filters: contamination (eval set) and near duplicates (this iteration and earlier ones).

    A question is ``contaminated`` if it shares a word ``ngram`` with an evaluation question or its
    embedding is within ``contamination_threshold`` (cosine) of one; a ``near_duplicate`` if within
    ``near_threshold`` of a question kept earlier in this iteration or in an earlier iteration
    (Crescent's history). Keeps a few examples of each with their similarity.
    """

    def __init__(
        self,
        embedder,
        *,
        history: list[tuple[str, str]] = (),
        eval_texts: list[str] = (),
        near_threshold: float = 0.9,
        contamination_threshold: float = 0.85,
        ngram: int = 8,
        examples: int = 5,
    ):
        self.embedder, self.near, self.contam, self.n, self.max_examples = (
            embedder,
            near_threshold,
            contamination_threshold,
            ngram,
            examples,
        )
        self.pool_texts = [t for t, _ in history]
        self.pool_sources = [src for _, src in history]
        self.pool = embedder.encode(self.pool_texts) if embedder and history else None
        self.eval_texts = list(eval_texts)
        self.eval_emb = embedder.encode(self.eval_texts) if embedder and self.eval_texts else None
        self.eval_grams = {g: i for i, t in enumerate(self.eval_texts) for g in word_ngrams(t, ngram)}
        self.examples: dict[str, list[dict]] = {"near_duplicate": [], "contaminated": []}
        self.kept_emb: list[np.ndarray] = []

    def _example(self, reason: str, text: str, other: str, sim: float, source: str, **extra) -> None:
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(
                {"question": text, "nearest": other, "similarity": round(float(sim), 3), "source": source, **extra}
            )

    def check(self, texts: list[str]) -> list[str | None]:
        """The reason each text is dropped (None: kept, and it joins the pool for later texts)."""
        emb = self.embedder.encode(texts) if self.embedder else None
        reasons: list[str | None] = []
        for j, text in enumerate(texts):
            vec = emb[j : j + 1] if emb is not None else None
            shared = next((g for g in word_ngrams(text, self.n) if g in self.eval_grams), None)
            if shared is not None:
                other = self.eval_texts[self.eval_grams[shared]]
                sim = float((vec @ self.eval_emb[self.eval_grams[shared]]).item()) if vec is not None else 1.0
                self._example("contaminated", text, other, sim, "eval", ngram=" ".join(shared))
                reasons.append("contaminated")
                continue
            if vec is not None and self.eval_emb is not None:
                idx, sim = nearest(vec, self.eval_emb)
                if sim[0] >= self.contam:
                    self._example("contaminated", text, self.eval_texts[idx[0]], sim[0], "eval")
                    reasons.append("contaminated")
                    continue
            if vec is not None and self.pool is not None and len(self.pool):
                idx, sim = nearest(vec, self.pool)
                if sim[0] >= self.near:
                    self._example("near_duplicate", text, self.pool_texts[idx[0]], sim[0], self.pool_sources[idx[0]])
                    reasons.append("near_duplicate")
                    continue
            reasons.append(None)
            if vec is not None:
                self.pool = vec if self.pool is None else np.concatenate([self.pool, vec])
                self.pool_texts.append(text)
                self.pool_sources.append("this iteration")
                self.kept_emb.append(vec[0])
        return reasons


def diversity(texts: list[str], embeddings: np.ndarray | None) -> dict:
    """Distinct-1/2 (unique over all word uni/bigrams) and mean pairwise cosine distance of the questions."""
    words = [re.findall(r"\w+", t.lower()) for t in texts]
    unigrams = [w for ws in words for w in ws]
    bigrams = [tuple(ws[i : i + 2]) for ws in words for i in range(len(ws) - 1)]
    out = {
        "questions": len(texts),
        "distinct_1": round(len(set(unigrams)) / len(unigrams), 4) if unigrams else None,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
        "mean_pairwise_distance": None,
    }
    if embeddings is not None and len(embeddings) > 1:
        sims = embeddings @ embeddings.T
        n = len(embeddings)
        out["mean_pairwise_distance"] = round(float(1 - (sims.sum() - np.trace(sims)) / (n * (n - 1))), 4)
    return out
