"""Stage 1: the model writes its own questions from an empty user turn (paper, section 3.1).

The prompt is the system prompt followed by the opening of a user turn, taken from the tokenizer's own
chat template; whatever the model writes until it closes the turn is a question.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from .generation import Generation, SamplingParams, generate
from .io import StageError

FILTERS = ("empty", "truncated", "too_short", "too_long", "template_tokens", "duplicate")
_SENTINEL = "SEDIR_USER_TURN_SENTINEL"


def question_prompt(tokenizer, system_prompt: str) -> str:
    """The empty-template prompt: system turn, then the opening of a user turn, nothing after.

    Derived by rendering a conversation whose user text is a sentinel and cutting at the sentinel, so
    it works for any template that places the user's text verbatim (and never adds an assistant turn).
    """
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # jinja raises whatever the template author chose
        raise ValueError(f"the tokenizer's chat template rejects a system + user conversation: {exc}") from None
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not place the user text verbatim")
    prefix = text[: text.index(_SENTINEL)]
    if system_prompt.strip() and system_prompt.strip() not in prefix:
        raise ValueError("the tokenizer's chat template dropped the system prompt")
    return prefix


def template_markers(tokenizer) -> list[str]:
    """Special tokens that must never appear inside a question (they would forge turns)."""
    return sorted({t for t in tokenizer.all_special_tokens if len(t) > 1} | set(getattr(tokenizer, "added_tokens_encoder", {})))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def filter_questions(generations: list[Generation], markers: list[str], min_chars: int, max_chars: int,
                     seen: set[str] | None = None) -> tuple[list[tuple[int, str]], Counter]:
    """Apply the filters in ``FILTERS`` order; returns kept (index, question) and drops per filter.

    ``seen`` holds normalised questions already kept (earlier rounds); it is updated in place.
    """
    seen = set() if seen is None else seen
    dropped: Counter = Counter({name: 0 for name in FILTERS})
    kept: list[tuple[int, str]] = []
    for i, gen in enumerate(generations):
        text = gen.text.strip()
        if not text:
            reason = "empty"
        elif not gen.finished:
            reason = "truncated"
        elif len(text) < min_chars:
            reason = "too_short"
        elif len(text) > max_chars:
            reason = "too_long"
        elif any(m in text for m in markers):
            reason = "template_tokens"
        elif normalise(text) in seen:
            reason = "duplicate"
        else:
            seen.add(normalise(text))
            kept.append((i, text))
            continue
        dropped[reason] += 1
    return kept, dropped


def synthesize_questions(model, tokenizer, section, *, seed: int, iteration: int, model_name: str,
                         generate_fn=generate, checkpoint=None) -> tuple[list[dict], dict]:
    """Sample questions until ``section.num_questions`` survive the filters or rounds run out.

    ``checkpoint``: a folder for finished chunks of each round, so a rerun after a crash resumes.
    Returns the rows (with provenance) and statistics: generated, kept, drops per filter.
    """
    prompt = question_prompt(tokenizer, section.system_prompt)
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
        extra = {"checkpoint": Path(checkpoint) / f"round{round_}"} if checkpoint is not None else {}
        gens = generate_fn(model, tokenizer, [prompt] * count, sampling, section.batch_size,
                           seed=seed + 1000 * round_, desc=f"questions, round {round_ + 1}", **extra)
        generated += count
        kept, drops = filter_questions(gens, markers, section.min_chars, section.max_chars, seen)
        dropped.update(drops)
        for i, text in kept[:missing]:
            rows.append({
                "id": f"it{iteration}-q{len(rows):04d}",
                "question": text,
                "num_tokens": gens[i].num_tokens,
                "iteration": iteration,
                "model": model_name,
                "system_prompt": section.system_prompt,
                "sampling": sampling.as_dict(),
                "seed": seed,
                "round": round_,
            })
    stats = {"generated": generated, "kept": len(rows), "target": section.num_questions, "dropped": dict(dropped),
             # samples that passed every filter after the target was reached: generated = kept + dropped + surplus
             "surplus": generated - len(rows) - sum(dropped.values())}
    if not rows:
        worst = max(dropped, key=dropped.get)
        raise StageError(
            f"questions: none of {generated} samples survived the filters; '{worst}' dropped "
            f"{dropped[worst]} (drops: {dict(dropped)})"
        )
    return rows, stats


def run(params, paths) -> tuple[list[dict], dict]:
    """The stage as the notebook runs it: sample with the latest model, write ``questions.jsonl``."""
    from .io import write_json, write_jsonl
    from .models import load_causal_lm, load_tokenizer, resolve_model

    model_path = paths.policy_model(resolve_model(params.model.name))
    model, tokenizer = load_causal_lm(model_path, params.model.dtype), load_tokenizer(model_path)
    rows, stats = synthesize_questions(
        model, tokenizer, params.questions, seed=params.seed_for(paths.iteration), iteration=paths.iteration,
        model_name=paths.model_label(paths.iteration - 1, params.model.name), checkpoint=paths.partial("questions"),
    )
    write_json(paths.question_stats, stats)
    write_jsonl(paths.questions, rows)
    paths.clear_partial("questions")
    return rows, stats
