"""The suite's scorers as one TRL reward function, for online training (``finetune.method: grpo``).

TRL's GRPOTrainer calls a reward function with the prompts of a generation batch, its completions (as text and
token ids), the dataset's other columns (one value per completion) and the trainer's state; the batch holds
``num_generations`` consecutive completions per prompt (a group), whose rewards it normalises. ``GroupReward``
turns the batch into the rows the scorers read, with each group as one "question" (its key names the question,
the step and the group), so that every scorer that compares a question's answers compares them *within the
group*: ``majority_vote`` is TTRL's group majority, ``borda`` ranks within the group, ``random`` is seeded per
completion. Several scorers are combined exactly as the reward stage combines them (``reward.combine``,
``reward.weights``). Model scorers (``self_certainty``, ``llm_judge`` with no judge model) score with the live
policy, bound once the trainer holds it (Intuitor's choice), and no chunk cache: the policy moves every step.
"""

from __future__ import annotations

import math

from sedir_utils.engine.scorers import combine_scores, get, label
from sedir_utils.engine.scorers.base import ScoringContext


class GroupReward:
    """One TRL reward function for params ``reward`` (``section``); ``policy_path`` is the model training starts
    from (the key under which ``bind`` puts the live policy, and what a judge with no model of its own reads)."""

    def __init__(
        self, section, *, num_generations: int, seed: int, iteration: int, policy_path: str, dtype: str, device: str
    ):
        self.section, self.group = section, num_generations
        self.__name__ = label(section)  # TRL logs rewards/<name>/mean and /std under it
        self.policy_path, self.dtype, self.device = policy_path, dtype, device
        self.models: dict = {}
        self.loaded: dict = {}  # models the scorers load besides the policy (a reward model), kept across steps
        self.eos_ids: set[int] = set()
        self.seed, self.iteration = seed, iteration

    def bind(self, model, tokenizer) -> None:
        """The trainer's model (the policy as it trains) serves the model scorers; ``tokenizer``'s end-of-turn
        ids tell a finished completion from one cut at ``max_completion_length``."""
        self.models[(self.policy_path, self.dtype, self.device)] = (model, tokenizer)
        ids = {tokenizer.eos_token_id}
        config = getattr(model, "generation_config", None)
        extra = getattr(config, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        self.eos_ids = {i for i in ids if i is not None}

    def rows(self, prompts, completions, completion_ids, question_id, question, step: int) -> list[dict]:
        """The scorers' rows for one batch: completion i belongs to group i // num_generations."""
        if len(completions) % self.group:
            raise ValueError(f"GRPO batch of {len(completions)} completions is not in groups of {self.group}")
        rows = []
        if completion_ids is None:  # a trainer that passes no token ids (older TRL, some patched ones)
            completion_ids = [None] * len(completions)
        for i, (prompt, completion, ids) in enumerate(zip(prompts, completions, completion_ids)):
            g, first = i // self.group, (i // self.group) * self.group
            if question_id[i] != question_id[first]:
                raise ValueError(
                    f"GRPO batch not in groups of finetune.grpo.num_generations ({self.group}): completion {i} "
                    f"answers {question_id[i]!r}, its group's first {question_id[first]!r} (per_device_train_batch_"
                    "size x steps_per_generation must be a multiple of num_generations)"
                )
            text = completion[0]["content"] if isinstance(completion, list) else completion
            key = f"{question_id[i]}/s{step}/g{g}"
            rows.append(
                {
                    "id": f"{key}-{i - first}",
                    "question_id": key,
                    "question": question[i],
                    "prompt": prompt,
                    "response": text.strip(),
                    # without ids a completion counts as finished: the format reward then reads the text alone
                    "finished": True if ids is None else bool(ids) and ids[-1] in self.eos_ids,
                    "num_tokens": None if ids is None else len(ids),
                }
            )
        return rows

    def scores(self, rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """(combined reward, each scorer's scores) for the rows, as ``scorers.score_rows`` computes them."""
        ctx = ScoringContext(
            self.section, self.policy_path, self.dtype, self.device, self.models, None, 1, self.seed, self.iteration
        )
        ctx.keep_loaded = self.loaded  # a reward model is loaded once for the whole training, not every step
        policy = self.models.get((self.policy_path, self.dtype, self.device), (None,))[0]
        training = getattr(policy, "training", False)
        if training:
            policy.eval()  # scored without dropout (LoRA's), as the reward stage scores; training resumes after
        try:
            per_scorer = {}
            for name in self.section.scorers:
                out, _ = get(name).score(rows, ctx)
                if len(out) != len(rows):
                    raise RuntimeError(f"scorer {name} returned {len(out)} scores for {len(rows)} completions")
                per_scorer[name] = [o["score"] for o in out]
        finally:
            if training:
                policy.train()
        keys = [r["question_id"] for r in rows]
        return combine_scores(per_scorer, keys, self.section.combine, self.section.weights), per_scorer

    def __call__(
        self,
        prompts,
        completions,
        completion_ids=None,
        question_id=(),
        question=(),
        trainer_state=None,
        log_metric=None,
        log_extra=None,
        **_,
    ) -> list[float | None]:
        if len(question_id) != len(completions) or len(question) != len(completions):
            raise ValueError(
                "GRPO reward: the dataset's question_id and question columns did not reach the reward function "
                "(GRPOConfig's remove_unused_columns must stay False)"
            )
        step = trainer_state.global_step if trainer_state is not None else 0
        rows = self.rows(prompts, completions, completion_ids, question_id, question, step)
        combined, per_scorer = self.scores(rows)
        if log_metric is not None:
            log_metric("self_reward", self.self_reward(per_scorer))
        if len(per_scorer) > 1:  # TRL logs the combined reward itself; each scorer's part is ours to log
            for name, values in per_scorer.items():
                finite = [v for v in values if not math.isnan(v)]
                if log_metric is not None and finite:
                    log_metric(f"scores/{name}/mean", sum(finite) / len(finite))
                if log_extra is not None:
                    log_extra(name, values)
        return [None if math.isnan(v) else float(v) for v in combined]

    def self_reward(self, per_scorer: dict[str, list[float]]) -> float:
        """The batch's self-reward in the scorers' own units (``self_reward``). What the collapse watch follows:
        TRL's logged ``reward`` is the combined one, which ``weighted_sum`` centres on 0 (z-scores over the batch)
        and ``borda`` turns into ranks, so it cannot rise for several scorers."""
        return self_reward(per_scorer, self.section.weights)


def self_reward(per_scorer: dict[str, list[float]], weights: dict[str, float] | None) -> float:
    """The weighted sum of each scorer's mean score (NaN scores aside; a weight not given is 1): a self-reward in
    the scorers' own units, comparable between training steps and the collapse watch's probe."""
    total = 0.0
    for name, values in per_scorer.items():
        finite = [v for v in values if not math.isnan(v)]
        total += (weights or {}).get(name, 1.0) * (sum(finite) / len(finite) if finite else 0.0)
    return total
