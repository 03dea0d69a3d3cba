"""Stage 2: n chain-of-thought answers per question (paper, section 3.2)."""

from __future__ import annotations

from .generation import SamplingParams, generate, response_messages


def sample_responses(model, tokenizer, questions: list[dict], section, *, seed: int, iteration: int,
                     model_name: str, generate_fn=generate, checkpoint=None) -> list[dict]:
    """Sample ``section.num_responses`` answers for every question row; one row per answer.

    ``checkpoint``: a folder for finished chunks, so a rerun after a crash resumes (see ``generate``).
    """
    sampling = SamplingParams.from_section(section)
    jobs = []
    for q in questions:
        messages = response_messages(q["question"], section.instruction)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        jobs.extend((q, messages, prompt, j) for j in range(section.num_responses))
    extra = {"checkpoint": checkpoint, "chunk_size": section.chunk_size} if checkpoint is not None else {}
    gens = generate_fn(model, tokenizer, [job[2] for job in jobs], sampling, section.batch_size, seed=seed,
                       desc="responses", **extra)
    rows = []
    for (q, messages, _, j), gen in zip(jobs, gens):
        rows.append({
            "id": f"{q['id']}-r{j}",
            "question_id": q["id"],
            "question": q["question"],
            "prompt": messages,
            "response": gen.text.strip(),
            "finished": gen.finished,
            "num_tokens": gen.num_tokens,
            "iteration": iteration,
            "model": model_name,
            "sampling": sampling.as_dict(),
            "seed": seed,
        })
    return rows


def run(params, paths) -> list[dict]:
    """The stage as the notebook runs it: answer this iteration's questions, write ``responses.jsonl``."""
    from .io import StageError, read_jsonl, write_jsonl
    from .models import load_generator, load_tokenizer, resolve_model

    questions = read_jsonl(paths.questions)
    if not questions:
        raise StageError(f"responses: {paths.questions} has no questions")
    model_path = paths.policy_model(resolve_model(params.model.name))
    model, _ = load_generator(model_path, params.model.dtype, params.model.generation_backend)
    tokenizer = load_tokenizer(model_path)
    rows = sample_responses(
        model, tokenizer, questions, params.responses, seed=params.seed_for(paths.iteration) + 1,
        iteration=paths.iteration, model_name=paths.model_label(paths.iteration - 1, params.model.name),
        checkpoint=paths.partial("responses"),
    )
    write_jsonl(paths.responses, rows)
    paths.clear_partial("responses")
    return rows
