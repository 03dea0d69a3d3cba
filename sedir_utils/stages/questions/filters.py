"""The question prompt (an empty user turn, the model writes the user's question) and the filters each sampled
question passes: a finished turn, a length, a request rather than an answer, mostly Latin script, no chat
template markers."""

from __future__ import annotations

import re
from collections import Counter

from sedir_utils.engine.sampling import Generation

FILTERS = (
    "empty",
    "truncated",
    "too_short",
    "too_long",
    "template_tokens",
    "not_a_request",
    "self_answer",
    "script",
    "duplicate",
    "contaminated",
    "near_duplicate",
)
_SENTINEL = "SEDIR_USER_TURN_SENTINEL"


def question_prompt(tokenizer, system_prompt: str) -> str:
    """The empty-template prompt: the system prompt, then the opening of a user turn, nothing after.

    Derived by rendering a conversation whose user text is a sentinel and cutting at the sentinel, so it
    works for any template that places the user's text verbatim and never adds an assistant turn. A
    template with no system role (Gemma's raises on one) gets the system text where such templates put
    it: at the start of the user turn, which the model then continues.
    """
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        folded = False
    except Exception:  # jinja raises whatever the template author chose, e.g. "System role not supported"
        merged = f"{system_prompt}\n\n{_SENTINEL}" if system_prompt.strip() else _SENTINEL
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": merged}], tokenize=False, add_generation_prompt=False
            )
        except Exception as exc:
            raise ValueError(f"the tokenizer's chat template rejects a plain user turn: {exc}") from None
        folded = True
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not place the user text verbatim")
    prefix = text[: text.index(_SENTINEL)]
    if system_prompt.strip() and system_prompt.strip() not in prefix:
        raise ValueError("the tokenizer's chat template dropped the system prompt")
    if folded and not prefix.endswith("\n\n"):
        raise ValueError("the tokenizer's chat template changed the user text")
    return prefix


def template_markers(tokenizer) -> list[str]:
    """Special tokens that must never appear inside a question (they would forge turns)."""
    return sorted(
        {t for t in tokenizer.all_special_tokens if len(t) > 1} | set(getattr(tokenizer, "added_tokens_encoder", {}))
    )


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# A request starts with one of these (an imperative, "I need ...", or a question word without its '?').
REQUEST_STARTS = {
    "write",
    "explain",
    "describe",
    "calculate",
    "compute",
    "solve",
    "find",
    "prove",
    "show",
    "list",
    "give",
    "name",
    "determine",
    "evaluate",
    "simplify",
    "compare",
    "summarize",
    "summarise",
    "design",
    "create",
    "implement",
    "translate",
    "derive",
    "estimate",
    "identify",
    "classify",
    "suggest",
    "help",
    "tell",
    "please",
    "consider",
    "suppose",
    "imagine",
    "let",
    "given",
    "analyze",
    "analyse",
    "convert",
    "rewrite",
    "generate",
    "draft",
    "outline",
    "discuss",
    "predict",
    "choose",
    "select",
    "rank",
    "sort",
    "fix",
    "debug",
    "i",
    "i'm",
    "my",
    "we",
    "assume",
    "if",
    "using",
    "use",
    "complete",
    "fill",
    "answer",
    "decide",
    "plan",
    # questions that forgot their question mark
    "what",
    "why",
    "how",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "is",
    "are",
    "can",
    "could",
    "would",
    "should",
    "do",
    "does",
    "did",
    "will",
    "may",
}
# The model answering its own question inside the user turn: an answer or solution label on its own line.
_SELF_ANSWER = re.compile(
    r"(^|\n)\s*(\**)(answer|solution|final answer|a|response|assistant)\s*\2\s*[:：]", re.IGNORECASE
)


def is_request(text: str) -> bool:
    """A question (a '?') or a request (starts with an imperative or 'I ...')."""
    if "?" in text:
        return True
    words = re.findall(r"[A-Za-z']+", text.lower())
    return bool(words) and words[0] in REQUEST_STARTS


def answers_itself(text: str) -> bool:
    return bool(_SELF_ANSWER.search(text)) or bool(re.search(r"\?\s*\n+\s*the answer is\b", text, re.IGNORECASE))


def latin_share(text: str) -> float:
    """Share of the letters that are Latin script (accents included): a language check needing no model."""
    import unicodedata

    letters = [c for c in text if c.isalpha()]
    return sum(unicodedata.name(c, "").startswith("LATIN") for c in letters) / len(letters) if letters else 1.0


def filter_questions(
    generations: list[Generation],
    markers: list[str],
    min_chars: int,
    max_chars: int,
    seen: set[str] | None = None,
    *,
    require_request: bool = True,
    drop_self_answers: bool = True,
    script: str | None = None,
) -> tuple[list[tuple[int, str]], Counter]:
    """The text filters, in ``FILTERS`` order; returns kept (index, question) and drops per filter.

    ``seen`` holds normalised questions already kept (earlier rounds); it is updated in place. Questions
    are never cut: multi-line and multiple-choice questions are kept whole.
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
        elif require_request and not is_request(text):
            reason = "not_a_request"
        elif drop_self_answers and answers_itself(text):
            reason = "self_answer"
        elif script == "latin" and latin_share(text) < 0.95:
            reason = "script"
        elif normalise(text) in seen:
            reason = "duplicate"
        else:
            seen.add(normalise(text))
            kept.append((i, text))
            continue
        dropped[reason] += 1
    return kept, dropped
