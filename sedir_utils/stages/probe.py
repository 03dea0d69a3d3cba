"""The labelled probe: questions with known answers (a JSONL or GPQA-format file), graded by their final answer.
Balancing (responses) samples it to choose a temperature; the audit (scoring) measures the scorers on it."""

from __future__ import annotations

import re
from pathlib import Path

from sedir_utils.core.gpqa import read_gpqa_file, shuffled_choices
from sedir_utils.core.io import DataError, iter_jsonl_lines
from sedir_utils.core.models import load_tokenizer
from sedir_utils.engine import generation
from sedir_utils.engine.backends import generator_args, load_generator
from sedir_utils.engine.generation import sample_answers
from sedir_utils.engine.scorers import score_rows
from sedir_utils.engine.scorers.majority_vote import extract_final_answer

LETTERS = "ABCDEFGH"


def load_probe(path: str | Path, limit: int | None = None) -> list[dict]:
    """Probe questions as ``{id, question, answer, kind}``; kind is ``number`` or ``choice``.

    JSONL rows: ``question`` and ``answer`` (a number), or ``question``, ``choices`` and ``answer`` (a
    letter or the correct choice's text). A ``.csv`` is read in GPQA's columns as 4-option choice questions.
    """
    path = Path(path)
    if path.suffix == ".csv":
        items = []
        for i, row in enumerate(read_gpqa_file(path, "audit.probe_file")):
            choices, answer = shuffled_choices(row)
            items.append(_choice_item(f"probe{i:03d}", str(row["Question"]).strip(), choices, answer))
        return items[:limit]
    items = []
    for lineno, row in iter_jsonl_lines(path, "audit.probe_file"):
        if "question" not in row or "answer" not in row:
            raise DataError(f"audit.probe_file: {path}:{lineno}: expected a JSON object with 'question' and 'answer'")
        question, answer = str(row["question"]), str(row["answer"]).strip()
        pid = str(row.get("id", f"probe{lineno:03d}"))
        if "choices" in row:
            choices = [str(c) for c in row["choices"]]
            index = (
                LETTERS.index(answer.upper())
                if len(answer) == 1 and answer.upper() in LETTERS
                else (choices.index(answer) if answer in choices else -1)
            )
            if not 0 <= index < len(choices):
                raise DataError(
                    f"audit.probe_file: {path}:{lineno}: answer {answer!r} is not a letter or one of the choices"
                )
            items.append(_choice_item(pid, question, choices, index))
        else:
            if _number(answer) is None:
                raise DataError(f"audit.probe_file: {path}:{lineno}: answer {answer!r} is not a number (add 'choices')")
            items.append({"id": pid, "question": question, "answer": answer, "kind": "number"})
    if not items:
        raise DataError(f"audit.probe_file: {path}: no probe questions")
    return items[:limit]


def _choice_item(pid: str, question: str, choices: list[str], index: int) -> dict:
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return {
        "id": pid,
        "question": f"{question}\n\nOptions:\n{options}\n\nGive the letter of the correct option.",
        "answer": LETTERS[index],
        "choice_text": choices[index],
        "kind": "choice",
    }


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def grade(response: str, item: dict) -> tuple[bool, bool]:
    """(an answer could be extracted, it is right) for one response to a probe item.

    The text after the last "Final answer:" is read first; without one, as lm-eval's "flexible-extract",
    the last option letter "(X)" (choice items) or the last number (number items) in the response.
    """
    final = extract_final_answer(response)
    if item["kind"] == "number":
        value = _number(final) if final is not None else _last_number(response)
        target = float(item["answer"])
        return value is not None, value is not None and abs(value - target) <= 1e-6 * max(1.0, abs(target))
    if final is None:
        letters = re.findall(r"\(([A-H])\)", response)
        return bool(letters), bool(letters) and letters[-1] == item["answer"]
    letter = re.match(r"^\(?([a-h])\)?(?:$|[\s.):,])", final)
    if letter:
        return True, letter.group(1).upper() == item["answer"]
    return True, final == item["choice_text"].strip().rstrip(".").lower()


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def probe_answers(
    params, policy_path: str, models: dict | None, sampling, *, seed: int, checkpoint, desc: str = "audit answers"
) -> list[dict]:
    """``audit.num_samples`` answers to each of the probe's first ``audit.num_questions`` questions, sampled as
    the responses stage samples (``sampling``: that section, perhaps at another temperature), graded
    (``has_answer``, ``correct``) and scored by every scorer of ``params.reward``.

    ``models`` is the stage's dict of loaded models (``models.load_cached``), shared with the scorers. The
    audit and B-STaR's balancing sweep (sedir_utils/stages/responses/balance.py) both measure these rows.
    """
    from functools import partial

    section = params.audit
    items = load_probe(section.probe_file, section.num_questions)
    # the responses stage's sampler (its backend, its workers); a transformers model is the scorers' policy too
    model, backend = load_generator(policy_path, **generator_args(params.model), cache=models)
    answers = sample_answers(
        model,
        load_tokenizer(policy_path),
        items,
        sampling,
        section.num_samples,
        seed=seed,
        desc=desc,
        id_tag="a",
        checkpoint=checkpoint,
        generate_fn=partial(generation.generate, backend=backend),
    )
    rows = []
    for row, item in zip(answers, (item for item in items for _ in range(section.num_samples))):
        has_answer, correct = grade(row["response"], item)
        rows.append({**row, "has_answer": has_answer, "correct": correct, "target": item["answer"]})
    scored, _ = score_rows(
        rows,
        params.reward,
        policy_path=policy_path,
        dtype=params.model.dtype,
        models=models,
        checkpoint=checkpoint,
        replicas=params.model.data_parallel_size,
        seed=params.seed,
    )
    return scored
