"""Experiment tracking: a run is one tracked run, each iteration one step (``tracking.backend``).

After each iteration the runner reads that iteration's files (``metrics.json``: question diversity and filters,
reward monitoring, the audit; every arm's ``eval.json`` with its intervals and ``finetune.json``) and the stage
times it measured, and logs their numbers at step = iteration to TensorBoard, trackio or wandb. TRL's trainers
log their own steps through their ``report_to`` (``trainer_report``), one tracked run per fine-tune.

Where it goes: TensorBoard event files under ``<run_dir>/tracking/tensorboard/``; trackio's local store (its
own folder, ``$TRACKIO_DIR`` or ``~/.cache/huggingface/trackio``; ``trackio show`` opens it); wandb's files
under ``<run_dir>/tracking/`` (``WANDB_MODE=offline`` keeps them there). ``<run_dir>/tracking/logged.json``
records what was logged, so a resumed run does not log an iteration twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

from sedir_utils.core.io import read_json, write_json
from sedir_utils.core.paths import RunPaths

BACKENDS = ("none", "tensorboard", "trackio", "wandb")
# The package each backend imports (preflight names it when missing; `pip install -e .[tracking]` has all three).
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def tracking_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tracking"


def flatten(data, prefix: str) -> dict[str, float]:
    """The numbers in nested ``data`` as ``prefix/key/...`` -> float; a ``[low, high]`` interval under a key
    ending ``ci`` becomes ``..._ci_low`` and ``..._ci_high``; text and other lists are left out."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}/{key}"
            if str(key).endswith("ci") and isinstance(value, list | tuple) and len(value) == 2:
                out.update(flatten(value[0], f"{name}_low") | flatten(value[1], f"{name}_high"))
            else:
                out.update(flatten(value, name))
    elif isinstance(data, bool):
        out[prefix] = float(data)
    elif isinstance(data, int | float) and math.isfinite(data):
        out[prefix] = float(data)
    return out


def _eval_scalars(eval_report: dict, arm: str) -> dict[str, float]:
    """Each task and scorer's value, interval, n and no-answer share (not the per-domain and letter counts)."""
    out = {}
    for task, metrics in eval_report.get("tasks", {}).items():
        for metric, m in metrics.items():
            kept = {k: m[k] for k in ("value", "ci", "n", "no_answer_share") if k in m}
            out.update(flatten(kept, f"eval/{arm}/{task}/{metric}"))
    return out


# GRPO's self-reward over its steps (finetune.json; stages/finetune/grpo.py: training_summary)
GRPO_KEYS = ("reward_first", "reward_last", "dead_group_share", "kl_last", "completion_length_mean")


def iteration_scalars(run_dir: str | Path, iteration: int, arms: list[str], own_samples: bool, seconds: dict) -> dict:
    """Everything tracked at step ``iteration``, read from the run's files; ``seconds``: (arm, stage) -> seconds
    of the stages that ran in this invocation (a cached stage has no time to log)."""
    out: dict[str, float] = {}
    for arm in arms:
        paths = RunPaths(run_dir, iteration, arm, own_samples)
        prefix = "" if paths.paper_arm else f"{arm}/"
        if (paths.paper_arm or own_samples) and paths.metrics.is_file():
            for section, data in read_json(paths.metrics).items():
                out.update(flatten(data, f"{prefix}{section}"))
        if paths.eval.is_file():
            out.update(_eval_scalars(read_json(paths.eval), arm))
        if iteration > 0 and paths.finetune_info.is_file():
            info = read_json(paths.finetune_info)
            kept = {k: v for k, v in info.items() if k in ("samples", "steps", "first_loss", "last_loss", *GRPO_KEYS)}
            out.update(flatten(kept, f"finetune/{arm}"))
            out.update(flatten(info.get("opsd_probe", {}), f"finetune/{arm}/opsd_probe"))
            out.update(flatten(info.get("collapse", {}), f"finetune/{arm}/collapse"))  # GRPO's watch
    for (arm, stage), value in seconds.items():
        out[f"time/{arm}/{stage}_s"] = float(value)
    return out


class Tracker:
    """One tracked run: ``log(scalars, step)`` then ``close()``. ``backend`` none logs nothing."""

    def __init__(self, backend: str, run_dir: str | Path, project: str, name: str, config: dict | None = None):
        self.backend, self.run_dir = backend, Path(run_dir)
        self._writer = self._module = None
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(tracking_dir(run_dir) / "tensorboard" / "iterations"))
        elif backend == "trackio":
            import trackio

            self._module = trackio
            trackio.init(project=project, name=name, resume="allow", config=config)
        elif backend == "wandb":
            import wandb

            self._module = wandb
            tracking_dir(run_dir).mkdir(parents=True, exist_ok=True)
            # The run's id follows from its folder: a resumed run continues the same wandb run.
            run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
            wandb.init(
                project=project, name=name, id=run_id, resume="allow", dir=str(tracking_dir(run_dir)), config=config
            )
        elif backend != "none":
            raise ValueError(f"tracking.backend: {backend!r} is not one of {', '.join(BACKENDS)}")

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in sorted(scalars.items()):
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        elif self._module is not None:
            self._module.log(dict(sorted(scalars.items())), step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        elif self._module is not None:
            self._module.finish()


def _digest(scalars: dict) -> str:
    return hashlib.sha256(json.dumps(scalars, sort_keys=True).encode()).hexdigest()


def log_iterations(params, run_dir: str | Path, iterations: list[int], seconds: dict) -> list[int]:
    """Log each of ``iterations`` not yet logged with the same numbers; returns the iterations logged.

    ``seconds``: (iteration, arm, stage) -> seconds, for the stages this invocation ran."""
    backend = params.tracking.backend
    if backend == "none":
        return []
    ledger_path = tracking_dir(run_dir) / "logged.json"
    ledger = read_json(ledger_path) if ledger_path.is_file() else {}
    pending = {}
    for k in iterations:
        times = {(arm, stage): s for (i, arm, stage), s in seconds.items() if i == k}
        scalars = iteration_scalars(run_dir, k, params.arms.names, params.arms.own_samples, times)
        # Times differ between invocations: the ledger compares the results only.
        key = _digest({t: v for t, v in scalars.items() if not t.startswith("time/")})
        if scalars and ledger.get(backend, {}).get(str(k)) != key:
            pending[k] = (scalars, key)
    if not pending:
        return []
    tracker = Tracker(
        backend, run_dir, params.tracking.project or params.run_name, Path(run_dir).name, params.to_dict()
    )
    try:
        for k, (scalars, key) in sorted(pending.items()):
            tracker.log(scalars, step=k)
            ledger.setdefault(backend, {})[str(k)] = key
    finally:
        tracker.close()
        write_json(ledger_path, ledger)
    return sorted(pending)


def trainer_report(params, paths) -> dict:
    """TRL's own tracking settings for this fine-tune (``report_to``, ``run_name``, ``project``): a tracked run
    per fine-tune, named after the run, iteration and arm."""
    backend = params.tracking.backend
    if backend == "none":
        return {"report_to": "none"}
    name = f"{Path(paths.run_dir).name}-iter{paths.iteration}-{paths.arm}"
    return {"report_to": [backend], "run_name": name, "project": params.tracking.project or params.run_name}


@contextlib.contextmanager
def trainer_environment(params, paths):
    """The environment TRL's callbacks read (set for the fine-tune, then restored): TensorBoard's event folder
    (``TENSORBOARD_LOGGING_DIR``) and wandb's (``WANDB_DIR``, ``WANDB_PROJECT``), inside the run's tracking/."""
    backend = params.tracking.backend
    where = tracking_dir(paths.run_dir)
    settings = {}
    if backend == "tensorboard":
        settings["TENSORBOARD_LOGGING_DIR"] = str(where / "tensorboard" / f"finetune-iter{paths.iteration}-{paths.arm}")
    elif backend == "wandb":
        where.mkdir(parents=True, exist_ok=True)
        settings.update(WANDB_DIR=str(where), WANDB_PROJECT=params.tracking.project or params.run_name)
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
