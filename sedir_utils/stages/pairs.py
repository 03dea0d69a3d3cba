"""Best and worst answer per question into preference pairs, and the training files made from them."""

from __future__ import annotations

import math
from collections import defaultdict


def has_score(row: dict) -> bool:
    return row.get("reward") is not None and not math.isnan(row["reward"])


def preference_pair(question_id: str, chosen: dict, rejected: dict) -> dict:
    """One pair row from two scored answers to the same question (``pairs.jsonl``'s columns)."""
    return {
        "question_id": question_id,
        "prompt": chosen["prompt"],
        "chosen": [{"role": "assistant", "content": chosen["response"]}],
        "rejected": [{"role": "assistant", "content": rejected["response"]}],
        "chosen_id": chosen["id"],
        "rejected_id": rejected["id"],
        "chosen_score": chosen["reward"],
        "rejected_score": rejected["reward"],
        "margin": chosen["reward"] - rejected["reward"],
        "scorer": chosen.get("scorer"),
        "iteration": chosen.get("iteration"),
    }


def build_preference_pairs(
    rows: list[dict], min_margin: float = 0.0, min_score: float | None = None
) -> tuple[list[dict], dict]:
    """Best vs worst response per question; the best must have finished its turn.

    A response cut off at ``max_new_tokens`` may be rejected but is never chosen: training on it would
    teach the model to stop mid-thought. Skipped and counted: NaN scores; questions with no finished
    response or fewer than two scored ones; pairs whose margin is not above ``min_margin`` (ties); with
    ``min_score`` (B-STaR's reward threshold, sedir_utils/stages/responses/balance.py), questions whose best scores
    below it.
    """
    by_question: dict[str, list[dict]] = defaultdict(list)
    stats = {
        "questions": 0,
        "pairs": 0,
        "responses_unfinished": 0,
        "nan": 0,
        "no_finished": 0,
        "too_few": 0,
        "margin_too_small": 0,
        "below_min_score": 0,
    }
    for row in rows:
        by_question[row["question_id"]].append(row)
    pairs = []
    for qid, group in by_question.items():
        stats["questions"] += 1
        scored = []
        for r in group:
            stats["responses_unfinished"] += not r.get("finished", True)
            if not has_score(r):
                stats["nan"] += 1
            else:
                scored.append(r)
        finished = [r for r in scored if r.get("finished", True)]
        if len(scored) < 2:
            stats["too_few"] += 1
            continue
        if not finished:
            stats["no_finished"] += 1
            continue
        # Among equal scores the earliest response wins / loses (max and min keep the first).
        best = max(finished, key=lambda r: r["reward"])
        worst = min((r for r in scored if r is not best), key=lambda r: r["reward"])
        margin = best["reward"] - worst["reward"]  # negative when the only finished answer scored lowest
        if margin <= min_margin:
            stats["margin_too_small"] += 1
            continue
        if min_score is not None and best["reward"] < min_score:
            stats["below_min_score"] += 1
            continue
        pairs.append(preference_pair(qid, best, worst))
    stats["pairs"] = len(pairs)
    return pairs, stats


PROVENANCE = ("question_id", "chosen_id", "chosen_score", "scorer", "iteration")  # kept beside TRL's columns


def sft_rows(pairs: list[dict]) -> list[dict]:
    """The winners in TRL's conversational prompt/completion format (loss on the completion only)."""
    return [{"prompt": p["prompt"], "completion": p["chosen"], **{k: p[k] for k in PROVENANCE}} for p in pairs]


def dpo_rows(pairs: list[dict]) -> list[dict]:
    """Pairs in TRL's conversational preference format (prompt/chosen/rejected), with their provenance."""
    return [
        {
            "prompt": p["prompt"],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "rejected_id": p["rejected_id"],
            **{k: p[k] for k in PROVENANCE},
        }
        for p in pairs
    ]
