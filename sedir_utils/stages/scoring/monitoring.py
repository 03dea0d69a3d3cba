"""What the reward stage measures of its scores (B-STaR's "exploitation" view): spread, collapse, ties."""

from __future__ import annotations

import math
from collections import defaultdict

from sedir_utils.core.stats import quantile
from sedir_utils.engine.scorers import REGISTRY, label


def collapse_share(scores: list[float], band: float) -> float:
    """Share of the finite scores within ``band`` of their median (1.0: every score the same)."""
    finite = sorted(v for v in scores if not math.isnan(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    median = finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2
    return sum(abs(v - median) <= band for v in finite) / len(finite)


def reward_metrics(rows: list[dict], pairs: list[dict], pair_stats: dict, section) -> dict:
    """B-STaR's "exploitation" view of one iteration: does the reward still tell answers apart?

    Per scorer: mean, std, mean within-question spread (max - min), collapse share (where the scorer has a
    nominal scale). For the combined reward: the same, plus the margin distribution and the tie share.
    """

    def describe(values: list[float], question_ids: list[str], scale: float | None) -> dict:
        finite = [v for v in values if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else math.nan
        groups: dict[str, list[float]] = defaultdict(list)
        for v, q in zip(values, question_ids):
            if not math.isnan(v):
                groups[q].append(v)
        spreads = [max(g) - min(g) for g in groups.values() if len(g) > 1]
        out = {"mean": mean, "std": std, "within_question_spread": sum(spreads) / len(spreads) if spreads else math.nan}
        if scale is not None:
            share = collapse_share(values, section.collapse_band * scale)
            out.update(collapse_share=share, collapsed=bool(share >= section.collapse_share))
        return out

    qids = [r["question_id"] for r in rows]
    per_scorer = {
        name: describe([r["scores"][name] for r in rows], qids, REGISTRY[name].scale) for name in section.scorers
    }
    margins = sorted(p["margin"] for p in pairs)
    combined = describe(
        [r["reward"] for r in rows], qids, REGISTRY[section.scorers[0]].scale if len(section.scorers) == 1 else None
    )
    questions = max(pair_stats["questions"], 1)
    combined.update(
        {
            "pairs": len(pairs),
            "tie_share": pair_stats["margin_too_small"] / questions,
            "margin_mean": sum(margins) / len(margins) if margins else math.nan,
            "margin_p10": quantile(margins, 0.1),
            "margin_median": quantile(margins, 0.5),
            "margin_p90": quantile(margins, 0.9),
        }
    )
    return {"scorers": per_scorer, "reward": combined, "scorer": label(section)}
