"""Small statistics the audit and the reports share: AUROC, a cluster bootstrap, correlation, paired tests."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence


def midranks(values: Sequence[float]) -> list[float]:
    """0-based ascending ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN if one class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    # Rank-based (Mann-Whitney U) with mid-ranks for ties: O(n log n).
    rank_sum = sum(r + 1 for r, y in zip(midranks(scores), labels) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def bootstrap_ci(
    statistic: Callable[[list[int]], float],
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over resamples of whole groups (e.g. questions).

    Answers to one question are not independent, so questions are resampled, not answers. Resamples
    where the statistic is NaN (one class missing) are left out.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    keys = sorted(members)
    rng = random.Random(seed)
    values = []
    for _ in range(n_boot):
        idx = [i for k in rng.choices(keys, k=len(keys)) for i in members[k]]
        v = statistic(idx)
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    values.sort()
    lo = values[int(math.floor((1 - level) / 2 * (len(values) - 1)))]
    hi = values[int(math.ceil((1 + level) / 2 * (len(values) - 1)))]
    return lo, hi


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than two points."""
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """McNemar's exact test on paired right/wrong outcomes (the same questions, two models): under "no
    difference" each discordant question is equally likely to be a gain or a loss, so the two-sided p-value
    is the binomial tail of the smaller count, doubled (capped at 1)."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes differ in length: {len(before)} and {len(after)}")
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * tail) if n else 1.0}


def paired_difference(
    before: Sequence[float],
    after: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """``mean(after - before)`` over paired questions, with a bootstrap interval that resamples questions
    (both models' outcomes on a question move together, which is what makes the interval paired)."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes differ in length: {len(before)} and {len(after)}")
    diffs = [float(b) - float(a) for a, b in zip(before, after)]
    if not diffs:
        return {"difference": math.nan, "ci": [math.nan, math.nan], "n": 0}

    def mean(idx):
        return sum(diffs[i] for i in idx) / len(idx)

    low, high = bootstrap_ci(mean, [str(i) for i in range(len(diffs))], n_boot=n_boot, seed=seed, level=level)
    return {"difference": sum(diffs) / len(diffs), "ci": [low, high], "n": len(diffs)}
