"""Scorers: each reads question + answer rows (the answer with its reasoning) and gives each a score.

A scorer is a class with a ``name`` and ``score(rows, ctx)``, registered with ``@register``; the params
(``reward.scorers``, ``audit.fallback``), the reward stage, the audit and preflight all read this registry.
Built in (one module each): ``llm_judge``, ``reward_model``, ``self_certainty``, ``majority_vote``. A new
scorer is one class and its registration::

    @register
    class Length(Scorer):
        name = "length"

        def score(self, rows, ctx):
            return [{"score": float(len(r["response"]))} for r in rows], {}

``score_rows`` scores rows with the params' scorers and combines them into one reward.
"""

from __future__ import annotations

from sedir_utils.core import models as core_models
from sedir_utils.core.params import Params
from sedir_utils.engine.scorers.base import Scorer, ScoringContext
from sedir_utils.engine.scorers.combine import combine_scores
from sedir_utils.engine.scorers.format_reward import FinalAnswerFormat
from sedir_utils.engine.scorers.judge import LLMJudge
from sedir_utils.engine.scorers.majority_vote import MajorityVote
from sedir_utils.engine.scorers.random_reward import RandomReward
from sedir_utils.engine.scorers.reward_model import RewardModel
from sedir_utils.engine.scorers.self_certainty import SelfCertainty

REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` a scorer the params can name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a scorer needs a name")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise TypeError(f"scorer {name!r} is already registered ({REGISTRY[name].__name__})")
    REGISTRY[name] = cls
    return cls


# The built-in scorers, in the order the params' error messages list them.
for _builtin in (LLMJudge, MajorityVote, RewardModel, SelfCertainty, FinalAnswerFormat, RandomReward):
    register(_builtin)


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Scorer:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown scorer {name!r} (scorers: {', '.join(REGISTRY)})") from None


def label(section) -> str:
    """The reward's name: the scorer, or ``combine(a,b)`` for several."""
    if len(section.scorers) == 1:
        return section.scorers[0]
    return f"{section.combine}({','.join(section.scorers)})"


def score_rows(
    rows: list[dict],
    section,
    *,
    policy_path: str,
    dtype: str,
    models: dict | None = None,
    checkpoint=None,
    replicas: int = 1,
    seed: int = 0,
    iteration: int = 0,
) -> tuple[list[dict], dict]:
    """Score every row with each scorer in ``section.scorers``, then combine into ``reward``.

    Adds to each row: ``scores`` (scorer -> value), ``reward`` and ``scorer``, and what a scorer adds (the
    judge's probability mass on its digits, majority vote's ``final_answer``). ``models`` (see
    ``models.load_cached``) keeps models the stage already loaded: the policy serves as judge, for
    self-certainty and for the audit's answers, and is loaded once. ``replicas``: worker processes that
    score the model scorers' chunks (``model.data_parallel_size``; they need ``checkpoint``). ``seed`` and
    ``iteration``: what a seeded scorer (``random``) draws from.
    """
    ctx = ScoringContext(
        section,
        policy_path,
        section.dtype or dtype,
        core_models.pick_device() if section.device == "auto" else section.device,
        {} if models is None else models,
        checkpoint,
        replicas,
        seed,
        iteration,
    )
    per_scorer: dict[str, list[float]] = {}
    extras: list[dict] = [{} for _ in rows]
    stats: dict = {}
    for name in section.scorers:
        out, st = get(name).score(rows, ctx)
        if len(out) != len(rows):
            raise RuntimeError(f"scorer {name} returned {len(out)} scores for {len(rows)} rows")
        per_scorer[name] = [o.pop("score") for o in out]
        for extra, o in zip(extras, out):
            extra.update(o)
        stats[name] = st
    combined = combine_scores(per_scorer, [r["question_id"] for r in rows], section.combine, section.weights)
    scorer = label(section)
    scored = [
        {**row, **extra, "scores": {n: per_scorer[n][i] for n in per_scorer}, "reward": combined[i], "scorer": scorer}
        for i, (row, extra) in enumerate(zip(rows, extras))
    ]
    return scored, {
        "scorer": scorer,
        "scored": len(scored),
        **{f"{n}_{k}": v for n, st in stats.items() for k, v in st.items()},
    }


def params_problems(params: Params):
    """``reward.scorers`` and ``audit.fallback`` against the scorer registry (each scorer checks its settings)."""
    reward, audit = params.reward, params.audit
    if not reward.scorers or len(set(reward.scorers)) != len(reward.scorers):
        yield "reward.scorers: list each scorer once, at least one"
    for i, name in enumerate(reward.scorers):
        if name not in REGISTRY:
            yield f"reward.scorers[{i}]: expected one of {', '.join(repr(n) for n in REGISTRY)}, got {name!r}"
        elif problem := REGISTRY[name]().check(reward):
            yield problem
    for name in reward.weights or {}:
        if name not in reward.scorers:
            yield f"reward.weights.{name}: not one of reward.scorers {reward.scorers}"
    fallbacks = (*REGISTRY, "require_final_answer")
    if audit.on_fail == "fallback" and audit.fallback is None:
        yield "audit.fallback: audit.on_fail is 'fallback' but no fallback is named"
    if audit.fallback is not None and audit.fallback not in fallbacks:
        yield f"audit.fallback: expected one of {', '.join(fallbacks)}, got {audit.fallback!r}"
    if audit.fallback in REGISTRY and (problem := REGISTRY[audit.fallback]().check(reward)):
        yield f"{problem} (audit.fallback)"
    if audit.num_questions is not None and audit.num_questions < 1 or audit.num_samples < 2:
        yield "audit: num_questions must be at least 1 and num_samples at least 2"
