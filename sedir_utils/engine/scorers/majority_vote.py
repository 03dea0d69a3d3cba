"""``majority_vote`` (Crescent): the share of the question's responses whose final answer agrees with
this one's; a response with no final answer scores 0."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from sedir_utils.engine.scorers.base import Scorer

_FINAL = re.compile(r"final answer\s*(?:is)?\s*[:\-]?\s*(.+)", re.IGNORECASE)


def extract_final_answer(response: str) -> str | None:
    """The text after the last 'Final answer:' (first line of it), normalised for comparison; None if absent."""
    matches = _FINAL.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip().splitlines()[0] if matches[-1].strip() else ""
    answer = re.sub(r"\\boxed\{|[*_`$\\}]", "", answer).strip().rstrip(".").strip().lower()
    answer = re.sub(r"\s+", " ", answer)
    return answer or None


def majority_vote_scores(rows: list[dict]) -> tuple[list[dict], dict]:
    """Each response's score: the share of its question's responses that give the same final answer."""
    answers = [extract_final_answer(r["response"]) for r in rows]
    by_question: dict[str, Counter] = defaultdict(Counter)
    sizes: Counter = Counter()
    for row, answer in zip(rows, answers):
        sizes[row["question_id"]] += 1
        if answer is not None:
            by_question[row["question_id"]][answer] += 1
    out = [
        {
            "score": (by_question[r["question_id"]][a] / sizes[r["question_id"]]) if a is not None else 0.0,
            "final_answer": a,
        }
        for r, a in zip(rows, answers)
    ]
    return out, {"no_final_answer": sum(a is None for a in answers)}


class MajorityVote(Scorer):
    name = "majority_vote"
    scale = 1.0  # a share

    def score(self, rows, ctx):
        return majority_vote_scores(rows)
