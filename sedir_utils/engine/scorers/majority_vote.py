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


def majority_answer(answers: list[dict]) -> tuple[str, dict] | None:
    """The final answer most of ``answers`` (finished ones) give, and the first answer that gives it.

    Final answers are read by ``extract_final_answer`` (the text after the last 'Final answer:');
    ties go to the answer met first. None when no answer has a final answer.
    """
    finals = [(extract_final_answer(a["response"]), a) for a in answers]
    counts = Counter(final for final, _ in finals if final is not None)
    if not counts:
        return None
    top = max(counts.values())
    final, answer = next((f, a) for f, a in finals if f is not None and counts[f] == top)
    return final, answer


def agreement_by_question(rows: list[dict]) -> dict[str, tuple[str | None, float]]:
    """Per question: its majority final answer (``majority_answer``; None: no answer has one) and the share of all
    its answers that give it (an answer with no final answer disagrees)."""
    by_question: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_question[row["question_id"]].append(row)
    out = {}
    for question, answers in by_question.items():
        majority = majority_answer(answers)
        if majority is None:
            out[question] = (None, 0.0)
            continue
        final = majority[0]
        out[question] = (final, sum(extract_final_answer(a["response"]) == final for a in answers) / len(answers))
    return out


class MajorityVote(Scorer):
    name = "majority_vote"
    scale = 1.0  # a share

    def score(self, rows, ctx):
        return majority_vote_scores(rows)
