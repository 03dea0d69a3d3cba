"""Stage 1: the model writes its own questions from an empty user turn (paper, section 3.1).

The prompt is the system prompt followed by the opening of a user turn, taken from the tokenizer's own
chat template; whatever the model writes until it closes the turn is a question.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np

from sedir_utils.core.gpqa import read_gpqa_file
from sedir_utils.core.io import StageError, read_jsonl, update_metrics, write_json, write_jsonl
from sedir_utils.core.models import load_causal_lm, load_tokenizer, resolve_model
from sedir_utils.core.paths import RunPaths
from sedir_utils.core.steering import assign_steering, steering_options
from sedir_utils.engine.backends import generator_args, load_generator, release
from sedir_utils.engine.embeddings import load_embedder
from sedir_utils.engine.generation import generate
from sedir_utils.engine.replicas import Replicas
from sedir_utils.engine.sampling import SamplingParams
from sedir_utils.stages.questions.filters import FILTERS, filter_questions, question_prompt, template_markers
from sedir_utils.stages.questions.screen import Screen, diversity


def synthesize_questions(
    model,
    tokenizer,
    section,
    *,
    seed: int,
    iteration: int,
    model_name: str,
    generate_fn=generate,
    checkpoint=None,
    screen: Screen | None = None,
) -> tuple[list[dict], dict]:
    """Sample questions until ``section.num_questions`` survive the filters or rounds run out.

    ``checkpoint``: a folder for finished chunks of each round, so a rerun after a crash resumes.
    ``screen``: the embedding filters (near duplicates, contamination); without it only the text filters run.
    Returns the rows (with provenance, the steering option included) and statistics: generated, kept,
    drops per filter, the surplus, examples of what the screen dropped.
    """
    options = steering_options(section.system_prompt)
    prompts = [question_prompt(tokenizer, o.prompt) for o in options]
    markers = template_markers(tokenizer)
    sampling = SamplingParams.from_section(section)
    seen: set[str] = set()
    rows: list[dict] = []
    dropped: Counter = Counter({name: 0 for name in FILTERS})
    generated = 0
    for round_ in range(section.max_rounds):
        missing = section.num_questions - len(rows)
        if missing <= 0:
            break
        # Over-generate: after round 0, scale by the observed survival rate (at least 2x what is missing).
        survival = len(rows) / generated if generated else 0.5
        count = min(8 * missing, max(2 * missing, math.ceil(missing / max(survival, 1e-3))))
        count = math.ceil(count / section.batch_size) * section.batch_size
        choice = assign_steering(options, count, seed + 1000 * round_)
        extra = (
            {"checkpoint": Path(checkpoint) / f"round{round_}", "chunk_size": section.chunk_size}
            if checkpoint is not None
            else {}
        )
        gens = generate_fn(
            model,
            tokenizer,
            [prompts[c] for c in choice],
            sampling,
            section.batch_size,
            seed=seed + 1000 * round_,
            desc=f"questions, round {round_ + 1}",
            **extra,
        )
        generated += count
        kept, drops = filter_questions(
            gens,
            markers,
            section.min_chars,
            section.max_chars,
            seen,
            require_request=section.require_request,
            drop_self_answers=section.drop_self_answers,
            script=section.script,
        )
        dropped.update(drops)
        if screen is not None:
            # Screen only as many as needed, in order, so the surplus is never embedded into the history.
            survivors = []
            for i, text in kept:
                if len(rows) + len(survivors) >= section.num_questions:
                    break
                reason = screen.check([text])[0]
                if reason:
                    dropped[reason] += 1
                else:
                    survivors.append((i, text))
            kept = survivors
        for i, text in kept[:missing]:
            option = options[choice[i]]
            rows.append(
                {
                    "id": f"it{iteration}-q{len(rows):04d}",
                    "question": text,
                    "num_tokens": gens[i].num_tokens,
                    "iteration": iteration,
                    "model": model_name,
                    "steering": option.name,
                    "system_prompt": option.prompt,
                    "sampling": sampling.as_dict(),
                    "seed": seed,
                    "round": round_,
                }
            )
    stats = {
        "generated": generated,
        "kept": len(rows),
        "target": section.num_questions,
        "dropped": dict(dropped),
        # samples that passed every filter after the target was reached: generated = kept + dropped + surplus
        "surplus": generated - len(rows) - sum(dropped.values()),
        "steering": dict(Counter(r["steering"] for r in rows)),
        "examples": screen.examples if screen is not None else {},
    }
    if not rows:
        worst = max(dropped, key=dropped.get)
        raise StageError(
            f"questions: none of {generated} samples survived the filters; '{worst}' dropped "
            f"{dropped[worst]} (drops: {dict(dropped)})"
        )
    return rows, stats


def earlier_questions(paths) -> list[tuple[str, str]]:
    """(question, "iter_<j>") for every question kept by earlier iterations of this run."""
    out = []
    for j in range(1, paths.iteration):
        earlier = paths.of(j).questions
        if earlier.is_file():
            out.extend((row["question"], f"iter_{j}") for row in read_jsonl(earlier))
    return out


def eval_question_texts(params) -> list[str]:
    """The evaluation set's questions, to decontaminate against: the local GPQA-format file, and the hub's
    GPQA when a hub ``gpqa_*`` task is evaluated (needs the hub and a token; unverified here)."""
    texts = []
    local = [t for t in params.eval.tasks if t.startswith("gpqa_local")]
    if local and params.eval.local_file:
        texts += [row["Question"] for row in read_gpqa_file(params.eval.local_file, "eval.local_file")]
    if any(t.startswith("gpqa_") and not t.startswith("gpqa_local") for t in params.eval.tasks):
        from datasets import load_dataset

        for subset in ("gpqa_main", "gpqa_diamond", "gpqa_extended"):
            texts += list(load_dataset("Idavidrein/gpqa", subset, split="train")["Question"])
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def question_embedder(params, model_path: str, policy=None):
    """The embedder ``questions.embedder`` names (None for ``none``); ``policy`` pools the transformers
    policy (``policy`` if already loaded, else loaded from ``model_path``). The last one built is kept, so
    the stage and the notebook's diversity map share it; a ``policy`` embedder is kept for that model folder
    as its files are now (a model retrained into the same folder is loaded again), and only one at a time."""
    kind = params.questions.embedder
    if kind == "none":
        return None
    key: tuple = (kind,)
    if kind == "policy":
        weights = Path(model_path) / "model.safetensors"
        stamp = (weights.stat().st_size, weights.stat().st_mtime_ns) if weights.is_file() else None
        key = (kind, model_path, params.model.dtype, stamp)
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()
        if kind == "policy":
            policy = policy if policy is not None else load_causal_lm(model_path, params.model.dtype)
            _EMBEDDERS[key] = load_embedder("policy", policy, load_tokenizer(model_path, padding_side="right"))
        else:
            _EMBEDDERS[key] = load_embedder(kind)
    return _EMBEDDERS[key]


_EMBEDDERS: dict[tuple, object] = {}


def run(params, paths) -> tuple[list[dict], dict]:
    """The stage as the notebook runs it: sample with the latest model, write ``questions.jsonl``.

    Also writes the filter counts and examples (``question_filters.json``) and the diversity figures
    (``metrics.json``, section ``questions``).
    """
    section = params.questions
    model_path = paths.policy_model(resolve_model(params.model.name))
    models: dict = {}
    model, backend = load_generator(model_path, **generator_args(params.model), cache=models)
    try:
        tokenizer = load_tokenizer(model_path)
        in_memory = backend.transformers_model and not isinstance(model, Replicas)  # workers' models are not here
        embedder = question_embedder(params, model_path, model if in_memory else None)
        screen = Screen(
            embedder,
            history=earlier_questions(paths) if section.dedup_history else [],
            eval_texts=eval_question_texts(params) if section.decontaminate else [],
            near_threshold=section.near_duplicate_threshold,
            contamination_threshold=section.contamination_threshold,
            ngram=section.contamination_ngram,
        )
        rows, stats = synthesize_questions(
            model,
            tokenizer,
            section,
            seed=params.seed_for(paths.iteration),
            iteration=paths.iteration,
            model_name=paths.model_label(paths.iteration - 1, params.model.name),
            checkpoint=paths.partial("questions"),
            screen=screen,
            generate_fn=functools.partial(generate, backend=backend),
        )
    finally:
        release(models)
    embeddings = np.stack(screen.kept_emb[: len(rows)]) if embedder is not None and screen.kept_emb else None
    stats["embedder"] = section.embedder
    stats["decontaminated_against"] = len(screen.eval_texts)
    stats["history"] = len(screen.pool_texts) - len(screen.kept_emb)
    figures = diversity([r["question"] for r in rows], embeddings)
    figures["duplicate_rate"] = round(
        (stats["dropped"]["duplicate"] + stats["dropped"]["near_duplicate"]) / max(stats["generated"], 1), 4
    )
    figures["contaminated"] = stats["dropped"]["contaminated"]
    figures["kept_share"] = round(stats["kept"] / max(stats["generated"], 1), 4)
    stats["diversity"] = figures
    write_json(paths.question_stats, stats)
    update_metrics(paths.metrics, "questions", {"dropped": stats["dropped"], **figures})
    write_jsonl(paths.questions, rows)
    paths.clear_partial("questions")
    return rows, stats


def question_map(run_dir, iterations: list[int], embedder) -> tuple[np.ndarray, list[int], list[str]]:
    """A 2-D map (first two principal components) of every iteration's questions, for the notebook's plot."""
    texts, labels = [], []
    for k in iterations:
        path = RunPaths(run_dir, k).questions
        if path.is_file():
            for row in read_jsonl(path):
                texts.append(row["question"])
                labels.append(k)
    if len(texts) < 3:
        return np.zeros((len(texts), 2)), labels, texts
    emb = embedder.encode(texts)
    centred = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, labels, texts
