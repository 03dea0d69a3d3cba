"""Stage 2: n chain-of-thought answers per question (paper, section 3.2)."""

from __future__ import annotations

import dataclasses
from functools import partial

from sedir_utils.core.io import StageError, read_jsonl, write_jsonl
from sedir_utils.core.models import load_tokenizer, resolve_model
from sedir_utils.engine.backends import generator_args, keep_engines, load_generator, release
from sedir_utils.engine.generation import generate, sample_answers
from sedir_utils.engine.sampling import SamplingParams
from sedir_utils.stages.responses.balance import run_sweep


def sample_responses(
    model,
    tokenizer,
    questions: list[dict],
    section,
    *,
    seed: int,
    iteration: int,
    model_name: str,
    generate_fn=generate,
    checkpoint=None,
) -> list[dict]:
    """Sample ``section.num_responses`` answers for every question row; one row per answer.

    ``checkpoint``: a folder for finished chunks, so a rerun after a crash resumes (see ``generate``).
    """
    sampling = SamplingParams.from_section(section).as_dict()
    rows = sample_answers(
        model,
        tokenizer,
        questions,
        section,
        section.num_responses,
        seed=seed,
        desc="responses",
        checkpoint=checkpoint,
        chunk_size=section.chunk_size,
        generate_fn=generate_fn,
    )
    return [{**row, "iteration": iteration, "model": model_name, "sampling": sampling, "seed": seed} for row in rows]


def run(params, paths) -> list[dict]:
    """The stage as the notebook runs it: answer this iteration's questions, write ``responses.jsonl``."""
    questions = read_jsonl(paths.questions)
    if not questions:
        raise StageError(f"responses: {paths.questions} has no questions")
    section = params.responses
    model_path = paths.policy_model(resolve_model(params.model.name))
    models: dict = {}  # the policy (or its vLLM engine), loaded once for the balancing sweep and the answers
    try:
        if params.balance.enabled:  # B-STaR: the temperature with the best balance score on the probe
            section = dataclasses.replace(section, temperature=run_sweep(params, paths, models)["temperature"])
            keep_engines(models)  # the scorers' models go before the answers are sampled; a started engine stays
        model, backend = load_generator(model_path, **generator_args(params.model), cache=models)
        tokenizer = load_tokenizer(model_path)
        rows = sample_responses(
            model,
            tokenizer,
            questions,
            section,
            seed=params.seed_for(paths.iteration) + 1,
            iteration=paths.iteration,
            model_name=paths.model_label(paths.iteration - 1, params.model.name),
            checkpoint=paths.partial("responses"),
            generate_fn=partial(generate, backend=backend),
        )
    finally:
        release(models)
    write_jsonl(paths.responses, rows)
    paths.clear_partial("responses")
    return rows
