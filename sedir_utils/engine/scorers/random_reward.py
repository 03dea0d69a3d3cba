"""``random``: a uniform score in [0, 1) drawn for each answer from the run's seed, the iteration, the question
and the answer's id, never from its text. The control of "Spurious Rewards" (arXiv 2506.10947): a gain that a
random reward also gives is not the reward's doing. The same params and seed give the same scores."""

from __future__ import annotations

import random

from sedir_utils.core.io import digest
from sedir_utils.engine.scorers.base import Scorer


class RandomReward(Scorer):
    name = "random"
    scale = 1.0

    def score(self, rows, ctx):
        out = []
        for r in rows:
            key = {"seed": ctx.seed, "iteration": ctx.iteration, "question": r["question_id"], "answer": r["id"]}
            out.append({"score": random.Random(digest(key)).random()})
        return out, {}
