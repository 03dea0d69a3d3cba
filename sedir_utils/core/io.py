"""Files in and out: the run tree, JSONL rows, atomic writes (write, then rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sedir_utils.core.paths import RunPaths


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


class StageError(RuntimeError):
    """A stage produced nothing usable; the message names the step or filter."""


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(_finite(data), indent=2, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def update_metrics(path: str | Path, section: str, data: dict) -> None:
    """Set one section of an iteration's ``metrics.json`` (each stage owns its own section)."""
    path = Path(path)
    metrics = read_json(path) if path.is_file() else {}
    metrics[section] = data
    write_json(path, metrics)


def collect_metrics(run_dir: str | Path, section: str) -> list[tuple[int, dict]]:
    """``(iteration, metrics[section])`` for every iteration of a run that has that section."""
    run = RunPaths(run_dir, 0)
    found = []
    for k in run.iterations():
        data = read_json(run.of(k).metrics) if run.of(k).metrics.is_file() else {}
        if section in data:
            found.append((k, data[section]))
    return found


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically, one JSON object per line; returns the row count."""
    lines = [json.dumps(_finite(row), ensure_ascii=False, sort_keys=True, allow_nan=False) for row in rows]
    write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def iter_jsonl_lines(path: str | Path, field: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for each JSON object in a JSONL file; errors name ``field`` (a params key), file, line."""
    path = Path(path)
    where = f"{field}: {path}" if field else str(path)
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    for _, row in iter_jsonl_lines(path):
        yield row


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def chunked(folder: str | Path | None, prefix: str, chunks: list, key_of, compute, fill=None) -> list:
    """``compute(c, chunk)`` for each chunk, each result saved as soon as it exists, so a crash loses
    at most the chunk in progress: with ``folder``, a result goes to ``<prefix>-<c>-<key>.json`` (written,
    then renamed), where ``key_of(c, chunk)`` digests everything the result depends on; a rerun reads
    finished chunks back instead of computing them. Without ``folder`` it only computes.

    ``fill`` (with ``folder``): called first with ``(c, chunk, path)`` of each chunk not yet saved, it writes
    their files some other way (worker processes: sedir_utils/engine/parallel.py) with what ``compute`` would give.
    """
    paths = (
        [Path(folder) / f"{prefix}-{c:05d}-{key_of(c, chunk)}.json" for c, chunk in enumerate(chunks)] if folder else []
    )
    if fill is not None and folder is not None:
        missing = [(c, chunk, path) for (c, chunk), path in zip(enumerate(chunks), paths) if not path.is_file()]
        if missing:
            fill(missing)
    results = []
    for c, chunk in enumerate(chunks):
        if folder is None:
            results.append(compute(c, chunk))
            continue
        if paths[c].is_file():
            results.append(read_json(paths[c]))
            continue
        value = compute(c, chunk)
        write_json(paths[c], value)
        results.append(value)
    return results


def digest(*parts) -> str:
    """A short, stable hash of JSON-able parts (chunk keys, fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str | None:
    """The sha256 of a file's bytes, read in blocks (None if there is no such file)."""
    path = Path(path)
    if not path.is_file():
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, in one line, to start writing ``needed`` bytes where the disk has less free."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StageError(
            f"{what}: not enough disk space in {folder}: needs about {needed / 2**20:,.0f} MB, "
            f"{free / 2**20:,.0f} MB free"
        )


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
