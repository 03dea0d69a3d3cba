"""Files in and out: the run tree, JSONL rows, atomic writes (write, then rename)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


class StageError(RuntimeError):
    """A stage produced nothing usable; the message names the step or filter."""


@dataclass(frozen=True)
class RunPaths:
    """Where iteration ``k`` of a run keeps its files: ``<run_dir>/iter_<k>/...`` for the paper's arm,
    ``<run_dir>/arms/<arm>/iter_<k>/...`` for a control arm (sedir_utils/arms.py). Iteration 0, the base
    model, is every arm's: its files are the paper arm's. A control arm that shares the paper arm's samples
    (``own_samples`` false) reads the sampling stages' files from the paper arm's folder."""

    run_dir: Path
    iteration: int
    arm: str = "reward"
    own_samples: bool = False

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @property
    def paper_arm(self) -> bool:
        from .arms import PAPER

        return self.arm == PAPER

    @property
    def arm_dir(self) -> Path:
        """The folder of this arm's iterations."""
        return self.run_dir if self.paper_arm else self.run_dir / "arms" / self.arm

    @property
    def iter_dir(self) -> Path:
        return (self.run_dir if self.iteration == 0 else self.arm_dir) / f"iter_{self.iteration}"

    @property
    def samples_dir(self) -> Path:
        """Where the sampling stages' files (questions, responses, scores, pairs) this arm uses are."""
        return self.iter_dir if self.own_samples else self.run_dir / f"iter_{self.iteration}"

    def of(self, iteration: int) -> RunPaths:
        return dataclasses.replace(self, iteration=iteration)

    def iterations(self) -> list[int]:
        """The iterations that have a folder in this arm (0, the base model's, in the run's), in order."""
        found = [p.name[len("iter_") :] for p in self.arm_dir.glob("iter_*") if p.is_dir()]
        if not self.paper_arm and (self.run_dir / "iter_0").is_dir():
            found.append("0")
        return sorted(int(k) for k in found if k.isdigit())

    # The files (questions, responses, pairs, eval ... ) are properties named as the stages declare them
    # (sedir_utils/stages.py), added below the class.

    def partial(self, stage: str) -> Path:
        """Finished chunks of a stage still running (removed once its output is written)."""
        return self.iter_dir / ".partial" / stage

    def clear_partial(self, stage: str) -> None:
        import shutil

        shutil.rmtree(self.partial(stage), ignore_errors=True)

    def policy_model(self, base: str | Path) -> str:
        """The model that samples and scores in this iteration: the previous iteration's (paper: "latest")."""
        return self.model_after(self.iteration - 1, base)

    def _trained(self, iteration: int) -> bool:
        from .arms import trains

        return iteration > 0 and trains(self.arm)  # an arm that does not train carries the base model

    def model_label(self, iteration: int, base_name: str) -> str:
        """A machine-independent name for ``model_after(iteration)``, for provenance."""
        if not self._trained(iteration):
            return base_name
        return self.of(iteration).model.relative_to(self.run_dir).as_posix()

    def model_after(self, iteration: int, base: str | Path) -> str:
        """The model as it stands after ``iteration`` in this arm (0 = the base model)."""
        if not self._trained(iteration):
            return str(base)
        return str(self.of(iteration).model)


def _add_file_properties() -> None:
    from .stages import ITERATION_FILES, ITERATION_FOLDERS, RUN_FILES, RUN_FOLDERS, STAGES

    def in_iteration(name):
        return property(lambda self: self.iter_dir / name)

    def in_samples(name):
        return property(lambda self: self.samples_dir / name)

    def in_run(name):
        return property(lambda self: self.run_dir / name)

    declared = [(a, f, in_samples if s.shared else in_iteration) for s in STAGES for a, f in s.writes.items()]
    declared += [(a, f, in_iteration) for a, f in {**ITERATION_FILES, **ITERATION_FOLDERS}.items()]
    declared += [(a, f, in_run) for a, f in {**RUN_FILES, **RUN_FOLDERS}.items()]
    for attr, name, kind in declared:
        if hasattr(RunPaths, attr):
            raise TypeError(f"RunPaths.{attr} is declared twice (sedir_utils/stages.py)")
        setattr(RunPaths, attr, kind(name))


_add_file_properties()


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
    their files some other way (worker processes: sedir_utils/parallel.py) with what ``compute`` would give.
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


def model_identity(model) -> list:
    """What identifies a loaded model's weights: its folder (or hub id), dtype, and its weight files' size and
    mtime. A transformers model names its folder in ``name_or_path``; a ``vllm.LLM`` in ``model_config.model``;
    a model loaded by worker processes (``parallel.Replicas``) says it itself."""
    from .parallel import Replicas

    if isinstance(model, Replicas):
        return model.identity()
    engine_config = getattr(model, "model_config", None)  # vllm.LLM (0.32: llm.model_config is llm_engine's)
    if engine_config is None:
        engine_config = getattr(getattr(model, "llm_engine", None), "model_config", None)
    if engine_config is not None and hasattr(engine_config, "model"):
        return weights_identity(str(engine_config.model), f"vllm {getattr(engine_config, 'dtype', '')}")
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    return weights_identity(name, str(getattr(model, "dtype", "")))


def weights_identity(name: str, dtype: str) -> list:
    """``model_identity`` of the model ``name`` (a folder or hub id) loaded in ``dtype`` (as a string)."""
    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) if name and folder.is_dir() else []
    return [name, dtype, [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


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
