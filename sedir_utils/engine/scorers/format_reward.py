"""``format``: 1 for an answer that finished its turn with a final answer the suite can read ("Final answer:
..."), else 0. A self-reward of the field (the format term of R1-style training): it says nothing of being
right, which makes it a control as much as a reward."""

from __future__ import annotations

from sedir_utils.engine.scorers.base import Scorer
from sedir_utils.engine.scorers.majority_vote import extract_final_answer


class FinalAnswerFormat(Scorer):
    name = "format"
    scale = 1.0

    def score(self, rows, ctx):
        out = [
            {"score": float(r.get("finished", True) and extract_final_answer(r["response"]) is not None)} for r in rows
        ]
        return out, {"with_final_answer": int(sum(o["score"] for o in out))}
