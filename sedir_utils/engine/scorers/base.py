"""What a scorer is (``Scorer``) and what it is given (``ScoringContext``: the policy and the models already
loaded, the chunk folder); the worker process scores a chunk with ``score_chunk``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from sedir_utils.core import models as core_models
from sedir_utils.core.io import chunked, digest
from sedir_utils.engine.parallel import chunk_filler
from sedir_utils.engine.replicas import weights_identity

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


@dataclass
class ScoringContext:
    """What a scorer may use: the params' ``reward`` section, the policy, the device and dtype, the stage's
    loaded models (shared with the audit), a folder where model scorers save finished chunks, how many
    worker processes score them (``model.data_parallel_size``; 1: this process), and the run's seed and the
    iteration (what a seeded scorer, ``random``, draws from)."""

    section: object
    policy_path: str
    dtype: str
    device: str
    models: dict = field(default_factory=dict)
    checkpoint: object = None
    replicas: int = 1
    seed: int = 0
    iteration: int = 0
    # Where models loaded by a non-causal loader (a reward model) are kept between calls (None: loaded per call and
    # freed after it, as the reward stage wants; GRPO's reward keeps them for the whole training).
    keep_loaded: dict | None = None

    def causal_lm(self, path: str):
        return core_models.load_cached(self.models, path, self.dtype, self.device)

    def _load(self, loader: str, path: str):
        if self.keep_loaded is None:
            return LOADERS[loader](path, self.dtype, self.device)
        key = (loader, path, self.dtype, self.device)
        if key not in self.keep_loaded:
            self.keep_loaded[key] = LOADERS[loader](path, self.dtype, self.device)
        return self.keep_loaded[key]

    def in_chunks(
        self, name: str, score_fn: Callable, rows: list[dict], *, model: str, loader: str = "causal_lm"
    ) -> tuple[list[dict], dict]:
        """``score_fn(model, tokenizer, rows, batch_size, max_length)`` (a module-level function) over chunks of
        ``SCORE_CHUNK`` rows, each saved under ``checkpoint`` as it finishes, so a rerun resumes after them.

        ``model`` is loaded by ``loader`` (``LOADERS``) only when a chunk is missing: here, or with
        ``replicas`` above 1 in that many worker processes (sedir_utils/engine/parallel.py), each scoring its chunks
        as this process would.
        """
        parts = [rows[i : i + SCORE_CHUNK] for i in range(0, len(rows), SCORE_CHUNK)]
        identity = weights_identity(model, str(core_models.torch_dtype(self.dtype, self.device)))
        batch_size, max_length = self.section.batch_size, self.section.max_length
        loaded = []

        def compute(c, part):
            if self.replicas > 1 and self.checkpoint is not None:
                raise RuntimeError(f"{name}: chunk {c} was not written by the worker processes")
            if not loaded:
                loaded.append(self.causal_lm(model) if loader == "causal_lm" else self._load(loader, model))
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
    return core_models.load_cached(None, path, dtype, device)


def _reward_model(path: str, dtype: str, device: str):
    return core_models.load_reward_model(path, dtype, device)


# How a model scorer's model is loaded (by name, so that a worker process can load it too).
LOADERS: dict[str, Callable] = {"causal_lm": _causal_lm, "reward_model": _reward_model}
