"""Seeded sampling that stops at the model's end-of-turn token, resumable chunk by chunk.

``generate`` is what the stages call; the sampling itself is a backend's (``backends``: the CPU engine,
transformers' ``generate``, vLLM), chosen when the model was loaded or from the model given.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sedir_utils.core.io import chunked, digest
from sedir_utils.engine.backends import for_model
from sedir_utils.engine.parallel import chunk_filler
from sedir_utils.engine.replicas import Replicas, model_identity
from sedir_utils.engine.sampling import Generation, SamplingParams, response_messages


def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingParams,
    batch_size: int,
    seed: int,
    desc: str = "generating",
    checkpoint: str | Path | None = None,
    chunk_size: int | None = None,
    backend=None,
) -> list[Generation]:
    """Sample one completion per prompt (prompts are rendered chat text, special tokens included).

    ``batch_size`` is the number of sequences decoded together. Prompt ``i`` samples from its own
    generator seeded from ``seed`` and ``i``: the same prompts, batch size and seed give the same texts.
    ``backend`` (a ``backends.Backend``) samples; default: the one for ``model`` (``backends.for_model``).

    With ``checkpoint`` (a folder), prompts run in chunks of ``chunk_size`` (default 4 x batch size) and
    each finished chunk is written there atomically under a key of everything that determines it; a
    rerun after a crash reads finished chunks back and samples only the rest, to the same result.

    ``model`` may be a ``replicas.Replicas`` (``model.data_parallel_size`` above 1): worker processes then
    sample the missing chunks, each as this process would, so the result is the same; it needs ``checkpoint``.
    """
    backend = backend or for_model(model)
    replicas = model if isinstance(model, Replicas) else None
    if replicas is not None and checkpoint is None:
        raise ValueError("sampling in worker processes needs a checkpoint folder (they write their chunks there)")
    size = chunk_size or 4 * batch_size
    starts = list(range(0, len(prompts), size)) if checkpoint is not None else [0]
    parts = [prompts[start : start + size] for start in starts] if checkpoint is not None else [prompts]
    identity = model_identity(model) if checkpoint is not None else None

    def compute(c, part):
        if replicas is not None:
            raise RuntimeError(f"{desc}: chunk {c} was not written by the worker processes")
        label = f"{desc} [{c + 1}/{len(parts)}]" if len(parts) > 1 else desc
        return sample_chunk(backend, model, tokenizer, part, sampling, batch_size, seed, starts[c], label)

    def key(c, part):
        return digest(part, sampling.as_dict(), batch_size, seed, starts[c], identity, backend.name)

    fill = None
    if replicas is not None:
        spec = dict(
            kind="generate",
            path=replicas.path,
            dtype=replicas.dtype,
            device=replicas.device,
            backend=backend.name,
            tensor_parallel_size=replicas.tensor_parallel_size,
            sampling=sampling.as_dict(),
            batch_size=batch_size,
            seed=seed,
        )
        tp = replicas.tensor_parallel_size
        fill = chunk_filler(spec, replicas.size, replicas.device, tp, desc, lambda c: {"start": starts[c]})

    chunks = chunked(checkpoint, "chunk", parts, key, compute, fill)
    return [Generation(**row) for rows in chunks for row in rows]


def sample_chunk(
    backend,
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingParams,
    batch_size: int,
    seed: int,
    start: int,
    desc,
) -> list[dict]:
    """One chunk's samples as saved (``Generation`` fields), prompt ``i`` seeded as prompt ``start + i``: what
    ``generate`` computes in this process and a worker process in its own (sedir_utils/engine/parallel.py)."""
    return [asdict(g) for g in backend.sample(model, tokenizer, prompts, sampling, batch_size, seed, start, desc)]


def sample_answers(
    model,
    tokenizer,
    questions: list[dict],
    section,
    num: int,
    *,
    seed: int,
    desc: str,
    id_tag: str = "r",
    checkpoint=None,
    chunk_size: int | None = None,
    generate_fn=generate,
) -> list[dict]:
    """``num`` chain-of-thought answers to each question row (``id``, ``question``), as the responses stage
    samples them (``section``: its instruction, sampling settings and batch size); one row per answer, in
    question order: ``id`` (``<question id>-<id_tag><j>``), the question, the conversation, the answer."""
    sampling = SamplingParams.from_section(section)
    jobs = [(q, response_messages(q["question"], section.instruction), j) for q in questions for j in range(num)]
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for _, m, _ in jobs]
    extra = {"checkpoint": checkpoint, "chunk_size": chunk_size} if checkpoint is not None else {}
    gens = generate_fn(model, tokenizer, prompts, sampling, section.batch_size, seed=seed, desc=desc, **extra)
    return [
        {
            "id": f"{q['id']}-{id_tag}{j}",
            "question_id": q["id"],
            "question": q["question"],
            "prompt": messages,
            "response": gen.text.strip(),
            "finished": gen.finished,
            "num_tokens": gen.num_tokens,
        }
        for (q, messages, j), gen in zip(jobs, gens)
    ]
