"""The difficulty band (R-Zero, arXiv 2508.05004, keeps questions whose self-consistency is in [0.3, 0.7]; ScPO,
2411.04109): a question is worth training on when the model's answers to it neither all agree (nothing left to
learn) nor scatter (it cannot answer it, or reward noise decides). Agreement is the share of a question's answers
that give its majority final answer. R-Zero divides by the answers that have a final answer; here every answer
counts, so one that gives none lowers the share."""

from __future__ import annotations

from sedir_utils.engine.scorers.majority_vote import agreement_by_question


def difficulty_band(rows: list[dict], low: float, high: float) -> tuple[set[str], dict[str, float], dict]:
    """(the questions kept, each question's agreement, the counts): kept when ``low <= agreement <= high``."""
    agreement = agreement_by_question(rows)
    share = {q: s for q, (_, s) in agreement.items()}
    kept = {q for q, s in share.items() if low <= s <= high}
    stats = {
        "band_questions": len(share),
        "band_kept": len(kept),
        "band_too_hard": sum(s < low for s in share.values()),
        "band_no_final_answer": sum(answer is None for answer, _ in agreement.values()),
        "band_too_easy": sum(s > high for s in share.values()),
    }
    return kept, share, stats
