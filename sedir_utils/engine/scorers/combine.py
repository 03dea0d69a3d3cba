"""Several scorers' scores into one reward per response."""

from __future__ import annotations

import math
from collections import defaultdict

from sedir_utils.core.stats import midranks


def _zscores(values: list[float]) -> list[float]:
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else 0.0
    return [math.nan if math.isnan(v) else ((v - mean) / std if std > 0 else 0.0) for v in values]


def combine_scores(
    per_scorer: dict[str, list[float]],
    question_ids: list[str],
    method: str = "weighted_sum",
    weights: dict[str, float] | None = None,
) -> list[float]:
    """One reward per response from several scorers; a single scorer's scores pass through unchanged.

    ``weighted_sum``: sum of weight x z-score (each scorer normalised over all responses).
    ``borda``: within each question, sum of weight x rank (0 = worst). A NaN from any scorer gives NaN.
    """
    names = list(per_scorer)
    n = len(question_ids)
    if len(names) == 1:
        return list(per_scorer[names[0]])
    weights = {name: (weights or {}).get(name, 1.0) for name in names}
    nan_rows = {i for name in names for i, v in enumerate(per_scorer[name]) if math.isnan(v)}
    total = [0.0] * n
    if method == "weighted_sum":
        for name in names:
            for i, z in enumerate(_zscores(per_scorer[name])):
                if i not in nan_rows:
                    total[i] += weights[name] * z
    elif method == "borda":
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(question_ids):
            if i not in nan_rows:
                groups[q].append(i)
        for name in names:
            for idx in groups.values():
                for i, rank in zip(idx, midranks([per_scorer[name][i] for i in idx])):
                    total[i] += weights[name] * rank
    else:
        raise ValueError(f"reward.combine: unknown method {method!r}")
    return [math.nan if i in nan_rows else total[i] for i in range(n)]
