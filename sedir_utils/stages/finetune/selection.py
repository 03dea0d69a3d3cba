"""The arm's training data: which scored answers each arm trains on (the paper's arm its pairs' winners; the
controls: random, worst, none; rules in sedir_utils/core/declarations.py), written as the fine-tune's first step."""

from __future__ import annotations

import random
from collections import defaultdict

from sedir_utils.core.declarations import PAPER, TRAINS
from sedir_utils.core.io import StageError, digest, read_jsonl, write_json, write_jsonl
from sedir_utils.stages.finetune.grpo import grpo_rows
from sedir_utils.stages.finetune.opsd import opsd_rows
from sedir_utils.stages.pairs import dpo_rows, has_score, preference_pair, sft_rows


def select(arm: str, pairs: list[dict], rewards: list[dict], seed: int, iteration: int) -> list[dict]:
    """The arm's training pairs, one per question of ``pairs`` (the reward arm's), chosen by its rule.

    ``rewards`` are every scored answer (``rewards.jsonl``). The reward arm's pairs are returned as they are.
    """
    if arm == PAPER:
        return list(pairs)
    if arm not in ("random", "worst"):
        raise ValueError(f"arm {arm!r} selects no training data (arms that train: {', '.join(TRAINS)})")
    by_question: dict[str, list[dict]] = defaultdict(list)
    for row in rewards:
        by_question[row["question_id"]].append(row)
    out = []
    for pair in pairs:
        answers = by_question[pair["question_id"]]
        finished = [r for r in answers if r.get("finished", True) and has_score(r)]
        if arm == "random":
            rng = random.Random(digest({"seed": seed, "iteration": iteration, "question": pair["question_id"]}))
            chosen = rng.choice(finished)
            rejected = rng.choice([r for r in answers if r is not chosen])
        else:
            chosen = min(finished, key=lambda r: r["reward"])  # the first of equal scores, as the reward arm
            # rejected: the reward arm's chosen, unless that is this answer too (its only finished one)
            other = pair["rejected_id"] if chosen["id"] == pair["chosen_id"] else pair["chosen_id"]
            rejected = next(r for r in answers if r["id"] == other)
        out.append(preference_pair(pair["question_id"], chosen, rejected))
    return out


def selection_stats(arm: str, selected: list[dict], pairs: list[dict]) -> dict:
    """How the arm's picks relate to the reward arm's: how many are the same answer, and their mean reward."""
    best = {p["question_id"]: p["chosen_id"] for p in pairs}
    scores = [p["chosen_score"] for p in selected]
    return {
        "arm": arm,
        "samples": len(selected),
        "same_as_reward_arm": sum(p["chosen_id"] == best.get(p["question_id"]) for p in selected),
        "mean_chosen_reward": sum(scores) / len(scores) if scores else None,
        "mean_reward_arm_reward": sum(p["chosen_score"] for p in pairs) / len(pairs) if pairs else None,
    }


def write_training_data(params, paths) -> dict:
    """The arm's ``sft.jsonl``, ``dpo.jsonl``, ``opsd.jsonl`` (its chosen answers as the teacher's privileged
    context: sedir_utils/stages/finetune/opsd.py), under GRPO ``grpo.jsonl`` (the pairs' questions as prompts:
    sedir_utils/stages/finetune/grpo.py) and ``selection.json`` from the reward stage's pairs and scores."""
    pairs = select_samples(read_jsonl(paths.pairs), params.finetune.max_samples)
    if not pairs:
        raise StageError(f"finetune: {paths.pairs} has no pairs (the reward stage kept none): nothing to train on")
    rewards = read_jsonl(paths.rewards)
    chosen = select(paths.arm, pairs, rewards, params.seed, paths.iteration)
    stats = selection_stats(paths.arm, chosen, pairs)
    contexts, stats["opsd"] = opsd_rows(chosen, rewards, params.finetune.opsd.privileged_context)
    write_jsonl(paths.sft, sft_rows(chosen))
    write_jsonl(paths.dpo, dpo_rows(chosen))
    write_jsonl(paths.opsd, contexts)
    if params.finetune.method == "grpo":  # the questions, whichever arm: the arms differ in the reward only
        write_jsonl(paths.grpo, grpo_rows(pairs, rewards))
    write_json(paths.selection, stats)
    mean, paper = stats["mean_chosen_reward"], stats["mean_reward_arm_reward"]
    print(
        f"arm {paths.arm}: {stats['samples']} samples, {stats['same_as_reward_arm']} the reward arm's own choice; "
        f"mean reward of the chosen {mean:.3f} (reward arm {paper:.3f})"
    )
    return stats


def select_samples(rows: list[dict], max_samples: int) -> list[dict]:
    """The ``max_samples`` winners with the highest scores (ties: stable by question id)."""
    ranked = sorted(rows, key=lambda r: (-r["chosen_score"], r["question_id"]))
    return ranked[:max_samples]
