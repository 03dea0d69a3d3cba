"""``majority_vote`` (Crescent): the share of the question's responses whose final answer agrees with
this one's; a response with no final answer scores 0."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from sedir_utils.engine.scorers.base import Scorer

_FINAL = re.compile(r"final answer\s*(?:is)?\s*[:\-]?\s*(.+)", re.IGNORECASE)
_SEPARATOR_ONLY = re.compile(r"\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)  # what _FINAL's group takes when nothing follows


def extract_final_answer(response: str) -> str | None:
    """The text after the last 'Final answer:' (first line of it), normalised for comparison; None if absent."""
    matches = _FINAL.findall(response)
    if not matches or _SEPARATOR_ONLY.fullmatch(matches[-1]):  # "Final answer:" with nothing after it
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


def agreement_by_question(rows: list[dict]) -> dict[str, tuple[str | None, float]]:
    """Per question: its majority final answer (None: no answer has one) and the share of all its answers that
    give it (an answer with no final answer disagrees). Ties go to the answer given first."""
    answers: dict[str, list[str | None]] = defaultdict(list)
    for row in rows:
        answers[row["question_id"]].append(extract_final_answer(row["response"]))
    out = {}
    for question, given in answers.items():
        counts = Counter(a for a in given if a is not None)
        if not counts:
            out[question] = (None, 0.0)
            continue
        top = max(counts.values())
        majority = next(a for a in given if a is not None and counts[a] == top)
        out[question] = (majority, top / len(given))
    return out


class MajorityVote(Scorer):
    name = "majority_vote"
    scale = 1.0  # a share

    def score(self, rows, ctx):
        return majority_vote_scores(rows)
