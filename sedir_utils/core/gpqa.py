"""GPQA's file format (its own column names), shared by the evaluation and the reward audit."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from sedir_utils.core.io import DataError

GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def _clean(text) -> str:
    # As lm-eval's GPQA preprocessing: strip, drop " [title]" markers, collapse double spaces.
    if text is None:
        return " "
    return str(text).strip().replace(" [title]", ". ").replace("  ", " ")


def shuffled_choices(doc: dict) -> tuple[list[str], int]:
    """The four options in an order fixed by the question text alone, and the correct one's index.

    lm-eval's GPQA shuffles with the global ``random``; seeding from the question keeps the order the
    same in every iteration and every process, whatever else consumed random numbers.
    """
    correct = _clean(doc["Correct Answer"])
    choices = [_clean(doc[f"Incorrect Answer {i}"]) for i in (1, 2, 3)] + [correct]
    seed = int.from_bytes(hashlib.sha256(_clean(doc["Question"]).encode()).digest()[:8], "big")
    random.Random(seed).shuffle(choices)
    return choices, choices.index(correct)


def rotated(choices: list[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options turned cyclically by ``shift`` places (MMBench's CircularEval): option ``i`` moves to
    ``i - shift``; returns the new order and the correct one's new index."""
    shift %= len(choices)
    return choices[shift:] + choices[:shift], (answer - shift) % len(choices)


def read_gpqa_file(path: str | Path, field: str) -> list[dict]:
    """Rows of a GPQA-format CSV/JSONL; one-line errors name ``field`` (the params key), file and line."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{field}: {path}: file not found")
    try:
        frame = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".json") else pd.read_csv(path)
    except ValueError as exc:
        raise DataError(f"{field}: {path}: cannot be read ({exc})") from None
    missing = [c for c in GPQA_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{field}: {path}: missing GPQA columns {missing}")
    empty = frame[list(GPQA_COLUMNS)].isna().any(axis=1)
    if empty.any():
        row = int(empty.idxmax()) + (2 if path.suffix == ".csv" else 1)
        raise DataError(f"{field}: {path}:{row}: empty GPQA field")
    return frame.to_dict("records")
