"""Steering the question writer: ``questions.system_prompt`` as one prompt, a list, or weighted named
prompts, with presets. Shared by the params' validation and the questions stage."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Steering presets (``questions.system_prompt: preset:math``): the paper's prompt and three topics.
PRESETS = {
    "paper": "You are a helpful assistant.\nTry your best to answer the users reasoning question.",
    "math": "You are a helpful assistant.\nTry your best to answer the users math question. Users ask "
    "math word problems and competition-style problems that take several steps to solve.",
    "science": "You are a helpful assistant.\nTry your best to answer the users science question. Users ask "
    "hard questions in physics, chemistry and biology, often multiple choice, that need reasoning.",
    "code": "You are a helpful assistant.\nTry your best to answer the users programming question. Users ask "
    "about algorithms, data structures and code that needs reasoning about correctness or complexity.",
}


@dataclass(frozen=True)
class Steer:
    name: str
    prompt: str
    weight: float = 1.0


def steering_options(spec) -> list[Steer]:
    """``questions.system_prompt`` as options: a string, a list, or a mapping name -> prompt or
    name -> {prompt, weight}. ``preset:NAME`` anywhere stands for ``PRESETS[NAME]``."""

    def text(value: str, where: str) -> tuple[str, str | None]:
        if value.startswith("preset:"):
            name = value.removeprefix("preset:")
            if name not in PRESETS:
                raise ValueError(f"{where}: unknown preset {name!r} (presets: {', '.join(PRESETS)})")
            return PRESETS[name], name
        return value, None

    if isinstance(spec, str):
        prompt, preset = text(spec, "questions.system_prompt")
        return [Steer(preset or ("paper" if prompt == PRESETS["paper"] else "custom"), prompt)]
    if isinstance(spec, list):
        out = []
        for i, value in enumerate(spec):
            prompt, preset = text(value, f"questions.system_prompt[{i}]")
            out.append(Steer(preset or f"prompt{i}", prompt))
        return out
    out = []
    for name, value in spec.items():
        prompt, weight = (value, 1.0) if isinstance(value, str) else (value.prompt, value.weight)
        out.append(Steer(name, text(prompt, f"questions.system_prompt.{name}")[0], weight))
    return out


def assign_steering(options: list[Steer], count: int, seed: int) -> list[int]:
    """Which option each of ``count`` samples uses: weighted draws, fixed by ``seed``."""
    if len(options) == 1:
        return [0] * count
    rng = random.Random(seed)
    return rng.choices(range(len(options)), weights=[o.weight for o in options], k=count)
