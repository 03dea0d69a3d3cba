"""``finetune.method: grpo``: online RL on the iteration's own questions with the suite's scorers as the reward
(TRL's GRPOTrainer; the reward function: sedir_utils/engine/group_reward.py), its arms, and the collapse watch.

- **Prompts**: one per question of the reward arm's pairs (capped at ``finetune.max_samples`` by the same ranking
  as SFT), asked exactly as the responses stage asked them. Every arm trains on the same prompts.
- **Arms**: ``reward`` trains with params ``reward`` (or the audit's fallback scorer, when it fired);
  ``random`` with the ``random`` scorer (uniform and seeded: Spurious Rewards' control); ``none`` does not train.
- **Collapse watch** (TTRL's rise-then-fall): the training log holds, per step, the reward's mean and spread,
  the share of groups with no spread, completion lengths and KL; after training the audit's labelled probe is
  answered by the trained model. Probe accuracy falling while the self-reward rose is reported loudly.
"""

from __future__ import annotations

import dataclasses
import math

from sedir_utils.core.config import build_section
from sedir_utils.core.declarations import PAPER
from sedir_utils.core.io import StageError, read_json, read_jsonl
from sedir_utils.core.params import RewardParams
from sedir_utils.engine.group_reward import GroupReward, self_reward
from sedir_utils.engine.scorers.majority_vote import majority_answer

# Per-step keys of TRL's GRPO log the watch reads (kl only with finetune.beta above 0).
WATCHED = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl")


def grpo_rows(pairs: list[dict], rewards: list[dict]) -> list[dict]:
    """One training prompt per question of ``pairs`` (the conversation the responses stage sampled), with the
    question's id and text for the reward functions."""
    text = {r["question_id"]: r["question"] for r in rewards}
    return [{"prompt": p["prompt"], "question_id": p["question_id"], "question": text[p["question_id"]]} for p in pairs]


def group_reward(rewards: dict, section, base_path: str, device: str) -> GroupReward:
    """GRPO's reward function from ``rewards`` (``grpo.reward_spec``: the arm's reward section as a dict, the
    seed, the iteration, the scorers' dtype), for completions in groups of ``finetune.grpo.num_generations``."""
    return GroupReward(
        build_section(RewardParams, rewards["section"], "reward.", "the GRPO reward"),
        num_generations=section.grpo.num_generations,
        seed=rewards["seed"],
        iteration=rewards["iteration"],
        policy_path=base_path,
        dtype=rewards["dtype"],
        device=device,
    )


def reward_spec(params, paths, section) -> dict:
    """What the training process needs to rebuild the arm's reward function (``group_reward``): JSON, so that it
    travels to Unsloth's worker process."""
    return {
        "section": dataclasses.asdict(section),
        "seed": params.seed,
        "iteration": paths.iteration,
        "dtype": params.reward.dtype or params.model.dtype,
    }


def arm_reward(arm: str, section, audit_report: dict | None = None):
    """The reward section the arm trains with: the reward arm's is params ``reward``, or the audit's fallback
    scorer where the audit failed and fell back to one (its report's action ``fallback:<scorer>``, as the reward
    stage scored); the random arm's is ``random``."""
    if arm == "random":
        return dataclasses.replace(section, scorers=["random"], weights=None)
    if arm != PAPER:
        raise ValueError(f"arm {arm!r} has no GRPO reward (arms: reward, random, none)")
    action = (audit_report or {}).get("action") or ""
    fallback = action.partition(":")[2] if action.startswith("fallback:") else None
    if fallback not in (None, "require_final_answer"):
        return dataclasses.replace(section, scorers=[fallback], weights=None)
    return section


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def training_summary(history: list[dict]) -> dict:
    """The watch's per-step figures reduced: the self-reward (``GroupReward.self_reward``: the scorers' weighted mean
    in their own units; TRL's combined ``reward`` where it is missing) over the first and last quarter of the steps,
    the mean share of dead groups (no reward spread: nothing to learn), the last KL, the mean completion length."""
    steps = [h for h in history if "reward" in h]
    if not steps:
        return {}
    quarter = max(1, len(steps) // 4)
    key = "self_reward" if all("self_reward" in h for h in steps) else "reward"
    return {
        "reward_first": _mean([h.get(key) for h in steps[:quarter]]),
        "reward_last": _mean([h.get(key) for h in steps[-quarter:]]),
        "dead_group_share": _mean([h.get("frac_reward_zero_std") for h in steps]),
        "kl_last": steps[-1].get("kl"),
        "completion_length_mean": _mean([h.get("completions/mean_length") for h in steps]),
    }


def probe_accuracy(rows: list[dict], weights: dict[str, float] | None = None) -> dict:
    """On graded probe answers (``probe.probe_answers``): the policy's accuracy (share of answers graded
    correct), the majority pseudo-label's (share of questions whose majority final answer is correct: what TTRL
    trains towards), the share of answers with no answer, and the self-reward in the scorers' own units, as
    training logs it (``group_reward.self_reward`` of each answer's ``scores``: the combined ``reward`` of a
    ``weighted_sum`` is centred on 0 per question, so its mean says nothing)."""
    by_question: dict[str, list[dict]] = {}
    per_scorer: dict[str, list[float]] = {}
    for row in rows:
        by_question.setdefault(row["question_id"], []).append(row)
        for name, value in (row.get("scores") or {}).items():
            per_scorer.setdefault(name, []).append(float("nan") if value is None else value)
    majority_correct = 0
    for answers in by_question.values():
        top = majority_answer(answers)
        majority_correct += bool(top and top[1]["correct"])
    return {
        "questions": len(by_question),
        "answers": len(rows),
        "policy_accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else None,
        "majority_accuracy": majority_correct / len(by_question) if by_question else None,
        "no_answer_share": sum(not r["has_answer"] for r in rows) / len(rows) if rows else None,
        "self_reward": self_reward(per_scorer, weights) if per_scorer else None,
    }


def collapse_report(summary: dict, before: dict, after: dict, tolerance: float) -> dict:
    """TTRL's rise-then-fall: the self-reward rose during training while the probe's accuracy fell by more than
    ``tolerance`` (a probe of 16 x 4 answers moves in steps of 1/64: 0 would fire on noise)."""
    first, last = summary.get("reward_first"), summary.get("reward_last")
    rose = first is not None and last is not None and last > first
    b, a = before.get("policy_accuracy"), after.get("policy_accuracy")
    fell = b is not None and a is not None and a < b - tolerance
    return {"before": before, "after": after, "reward_rose": rose, "accuracy_fell": fell, "warning": rose and fell}


def collapse_text(report: dict, iteration: int, arm: str, summary: dict, probe_file: str, on_fail: str) -> str:
    """The warning as the runner and notebook 04 print it (empty when there is nothing to warn of)."""
    if not report["warning"]:
        return ""
    b, a = report["before"], report["after"]
    bar = "!" * 100
    return (
        f"{bar}\n[iter {iteration}, arm {arm}] COLLAPSE WATCH: self-reward rose {summary['reward_first']:.3f} -> "
        f"{summary['reward_last']:.3f} during GRPO while probe accuracy fell {b['policy_accuracy']:.3f} -> "
        f"{a['policy_accuracy']:.3f} (majority pseudo-label {b['majority_accuracy']:.3f} -> "
        f"{a['majority_accuracy']:.3f}) on {probe_file} (TTRL's rise-then-fall)\n"
        f"  action: {_action(on_fail, arm)} (params audit.on_fail)\n{bar}"
    )


def _action(on_fail: str, arm: str) -> str:
    if on_fail == "stop" and arm != PAPER:
        return "continue (a control arm's reward rising is chance: only the reward arm stops)"
    if on_fail == "fallback":
        return "continue (a fallback scorer cannot undo training; it applies to the reward stage)"
    return on_fail


def stops(on_fail: str, arm: str) -> bool:
    """Whether a collapse warning stops the stage: ``audit.on_fail: stop``, in the reward arm."""
    return on_fail == "stop" and arm == PAPER


def earlier_probe(params, paths) -> dict | None:
    """The probe accuracy of the model this arm's GRPO starts from, where it was already measured with the same
    sampling: the previous iteration's watch (``after``) of this arm, or at iteration 1 (and in the reward arm)
    the reward stage's audit of the policy, unless balancing sampled it at another temperature."""
    latest = params.finetune.start_from == "latest"
    if paths.iteration > 1 and latest:
        previous = paths.of(paths.iteration - 1).finetune_info
        watch = read_json(previous).get("collapse") if previous.is_file() else None
        if watch:
            return watch["after"]
    same_model = paths.iteration == 1 or (paths.arm == PAPER and latest)
    if same_model and params.audit.enabled and not params.balance.enabled and paths.audit.is_file():
        rows = read_jsonl(paths.audit)
        return probe_accuracy(rows) if rows else None
    return None


def whole_steps(rows: list[dict], section) -> list[dict]:
    """The prompts TRL will train on: whole steps of ``batch / num_generations`` prompts (its sampler leaves out a
    last, partial step), so that the summary and the card count what was trained; fewer than one step fails."""
    batch = section.per_device_train_batch_size * section.gradient_accumulation_steps
    need = max(1, batch // section.grpo.num_generations)
    if len(rows) < need:
        raise StageError(
            f"finetune: {len(rows)} question(s) to train on, fewer than the {need} a GRPO step takes "
            "(finetune.per_device_train_batch_size x gradient_accumulation_steps / finetune.grpo.num_generations); "
            "the reward stage's pair_stats.json says how many the difficulty band and the pairing kept"
        )
    kept = rows[: len(rows) - len(rows) % need]
    if len(kept) < len(rows):
        print(f"GRPO: {len(rows) - len(kept)} of {len(rows)} questions left out (steps take {need} questions each)")
    return kept
