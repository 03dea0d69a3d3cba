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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

SCORE_CHUNK = 64  # answers per saved chunk of a model scorer's work


class Scorer:
    """One way to score answers. ``score`` returns one dict per row (``score``: a float, NaN where it cannot
    say; other keys are kept on the row) and a dict of counts for the stage's statistics."""

    name: ClassVar[str]
    scale: ClassVar[float | None] = None  # nominal score range, for the collapse check (None: unbounded)

    def check(self, section) -> str | None:
        """A params problem with this scorer, as ``key: why`` (None: none)."""
        return None

    def models(self, section) -> dict[str, str]:
        """Params key -> model this scorer loads besides the policy (preflight checks they exist)."""
        return {}

    def score(self, rows: list[dict], ctx: ScoringContext) -> tuple[list[dict], dict]:
        raise NotImplementedError


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


@dataclass
class ScoringContext:
    """What a scorer may use: the params' ``reward`` section, the policy, the device and dtype, the stage's
    loaded models (shared with the audit), a folder where model scorers save finished chunks, and how many
    worker processes score them (``model.data_parallel_size``; 1: this process)."""

    section: object
    policy_path: str
    dtype: str
    device: str
    models: dict = field(default_factory=dict)
    checkpoint: object = None
    replicas: int = 1

    def causal_lm(self, path: str):
        from ..models import load_cached

        return load_cached(self.models, path, self.dtype, self.device)

    def in_chunks(
        self, name: str, score_fn: Callable, rows: list[dict], *, model: str, loader: str = "causal_lm"
    ) -> tuple[list[dict], dict]:
        """``score_fn(model, tokenizer, rows, batch_size, max_length)`` (a module-level function) over chunks of
        ``SCORE_CHUNK`` rows, each saved under ``checkpoint`` as it finishes, so a rerun resumes after them.

        ``model`` is loaded by ``loader`` (``LOADERS``) only when a chunk is missing: here, or with
        ``replicas`` above 1 in that many worker processes (sedir_utils/parallel.py), each scoring its chunks
        as this process would.
        """
        from ..io import chunked, digest, weights_identity
        from ..models import torch_dtype
        from ..parallel import chunk_filler

        parts = [rows[i : i + SCORE_CHUNK] for i in range(0, len(rows), SCORE_CHUNK)]
        identity = weights_identity(model, str(torch_dtype(self.dtype, self.device)))
        batch_size, max_length = self.section.batch_size, self.section.max_length
        loaded = []

        def compute(c, part):
            if self.replicas > 1 and self.checkpoint is not None:
                raise RuntimeError(f"{name}: chunk {c} was not written by the worker processes")
            if not loaded:
                loaded.append(
                    self.causal_lm(model) if loader == "causal_lm" else LOADERS[loader](model, self.dtype, self.device)
                )
            return score_chunk(score_fn, *loaded[0], part, batch_size, max_length)

        def key(c, part):
            return digest(name, [(r["question"], r["response"]) for r in part], batch_size, max_length, identity)

        spec = dict(
            kind="score",
            loader=loader,
            path=model,
            dtype=self.dtype,
            device=self.device,
            score_fn=f"{score_fn.__module__}:{score_fn.__qualname__}",
            batch_size=batch_size,
            max_length=max_length,
        )
        fill = chunk_filler(spec, self.replicas, self.device, 1, name) if self.replicas > 1 else None
        done = chunked(self.checkpoint, name, parts, key, compute, fill)
        stats = {k: sum(d["stats"][k] for d in done) for k in (done[0]["stats"] if done else {})}
        out = [o for d in done for o in d["rows"]]
        for o in out:  # a saved chunk stores NaN as null
            o["score"] = float("nan") if o["score"] is None else o["score"]
        return out, stats


def score_chunk(score_fn: Callable, model, tokenizer, rows: list[dict], batch_size: int, max_length: int) -> dict:
    """One chunk's scores as saved: what ``in_chunks`` computes here and a worker process in its own."""
    out, stats = score_fn(model, tokenizer, rows, batch_size, max_length)
    return {"rows": out, "stats": stats}


def _causal_lm(path: str, dtype: str, device: str):
    from ..models import load_cached

    return load_cached(None, path, dtype, device)


def _reward_model(path: str, dtype: str, device: str):
    from .reward_model import load_reward_model

    return load_reward_model(path, dtype, device)


# How a model scorer's model is loaded (by name, so that a worker process can load it too).
LOADERS: dict[str, Callable] = {"causal_lm": _causal_lm, "reward_model": _reward_model}


def score_rows(
    rows: list[dict],
    section,
    *,
    policy_path: str,
    dtype: str,
    models: dict | None = None,
    checkpoint=None,
    replicas: int = 1,
) -> tuple[list[dict], dict]:
    """Score every row with each scorer in ``section.scorers``, then combine into ``reward``.

    Adds to each row: ``scores`` (scorer -> value), ``reward`` and ``scorer``, and what a scorer adds (the
    judge's probability mass on its digits, majority vote's ``final_answer``). ``models`` (see
    ``models.load_cached``) keeps models the stage already loaded: the policy serves as judge, for
    self-certainty and for the audit's answers, and is loaded once. ``replicas``: worker processes that
    score the model scorers' chunks (``model.data_parallel_size``; they need ``checkpoint``).
    """
    from ..models import pick_device
    from .combine import combine_scores

    ctx = ScoringContext(
        section,
        policy_path,
        section.dtype or dtype,
        pick_device() if section.device == "auto" else section.device,
        {} if models is None else models,
        checkpoint,
        replicas,
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


# The built-in scorers register themselves.
from . import judge, majority_vote, reward_model, self_certainty  # noqa: E402,F401
