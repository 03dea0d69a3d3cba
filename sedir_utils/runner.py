"""Run the SeDiR loop: iteration 0 evaluates the base model, iterations 1..K run all five notebooks.

Each notebook is executed by papermill with ``params_file``, ``overrides``, ``run_dir`` and ``iteration``
injected; the executed copy is saved in ``<run_dir>/iter_<k>/notebooks/``. A stage whose output file
already exists is skipped, so rerunning after a crash picks up at the first unfinished stage.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ParamsError, load_params, parse_override
from .io import DataError, RunPaths, StageError, read_json, write_text
from .models import ModelError

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    output: str  # the RunPaths attribute whose file marks the stage done (written last)


STAGES = (
    Stage("questions", "01_questions.ipynb", "questions"),
    Stage("responses", "02_responses.ipynb", "responses"),
    Stage("reward", "03_reward.ipynb", "pairs"),
    Stage("finetune", "04_finetune_unsloth.ipynb", "finetune_info"),
    Stage("eval", "05_eval.ipynb", "eval"),
)


class RunError(RuntimeError):
    """The run cannot go on; the message says why in one line."""


def stages_for(iteration: int) -> tuple[Stage, ...]:
    return STAGES[-1:] if iteration == 0 else STAGES


def _first_difference(a, b, prefix="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else prefix.rstrip(".")


def check_run_params(run_dir: Path, resolved: dict) -> None:
    """Refuse to mix results from different params in one run folder (``iterations`` may grow)."""
    path = run_dir / "params.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text()) or {}
        a = {k: v for k, v in previous.items() if k != "iterations"}
        b = {k: v for k, v in resolved.items() if k != "iterations"}
        diff = _first_difference(a, b)
        if diff:
            raise RunError(
                f"{run_dir} holds a run made with other params (first difference: {diff}); "
                f"use --run-dir for a new run, or delete the folder"
            )
    write_text(path, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def execute_stage(stage: Stage, paths: RunPaths, params_file: str, overrides: dict, notebooks_dir: Path) -> Path:
    """Execute one notebook with papermill; returns the executed copy's path."""
    import papermill as pm

    source = notebooks_dir / stage.notebook
    if not source.is_file():
        raise RunError(f"notebook {source} not found (is the package installed from its repository?)")
    out = paths.notebooks / stage.notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(source), str(out),
            parameters={"params_file": params_file, "overrides": overrides,
                        "run_dir": str(paths.run_dir.resolve()), "iteration": paths.iteration},
            cwd=str(notebooks_dir), kernel_name="python3", progress_bar=False,
            stdout_file=sys.stdout, stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as exc:
        raise RunError(
            f"iteration {paths.iteration}, stage {stage.name}: {exc.ename}: {exc.evalue} (executed notebook: {out})"
        ) from None
    return out


def warn_about_audit(paths: RunPaths) -> None:
    """Say loudly, in the runner's own output, when the reward audit found the scorer untrustworthy."""
    audit = (read_json(paths.metrics).get("audit") if paths.metrics.is_file() else None) or {}
    if audit and not audit.get("ok", True):
        bar = "!" * 100
        print(f"{bar}\n[iter {paths.iteration}] REWARD AUDIT FAILED for {audit['active_scorer']}: "
              f"{'; '.join(audit['reasons'])}\n  action: {audit['action']} (params audit.on_fail)\n{bar}")


def run(params_file: str, overrides: dict, *, iterations: int | None = None, run_dir: str | None = None,
        notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict]:
    """Run (or resume) the whole loop; returns one timing row per stage."""
    from .evaluation import write_summary
    from .models import resolve_model

    params = load_params(params_file, overrides)
    iterations = params.iterations if iterations is None else iterations
    if iterations < 0:
        raise ParamsError(f"--iterations: must be at least 0, got {iterations}")
    run_path = Path(run_dir) if run_dir else Path("outputs") / params.run_name
    run_path.mkdir(parents=True, exist_ok=True)
    check_run_params(run_path, params.to_dict())
    print(f"run {params.run_name}: {run_path} | model {params.model.name} | iterations 0..{iterations}")
    base = resolve_model(params.model.name)  # convert the embedded/GGUF model once, before any notebook
    print(f"base model: {base}")
    params_abs = str(Path(params_file).resolve())
    timings = []
    for k in range(iterations + 1):
        paths = RunPaths(run_path, k)
        for stage in stages_for(k):
            if getattr(paths, stage.output).exists():
                print(f"[iter {k}] {stage.name}: output exists, skipped")
                timings.append({"iteration": k, "stage": stage.name, "seconds": 0.0, "status": "skipped"})
                continue
            print(f"[iter {k}] {stage.name}: running {stage.notebook}", flush=True)
            start = time.time()
            execute_stage(stage, paths, params_abs, overrides, notebooks_dir)
            timings.append({"iteration": k, "stage": stage.name, "seconds": round(time.time() - start, 1),
                            "status": "ran"})
            if stage.name == "reward":
                warn_about_audit(paths)
    write_summary(run_path)
    print(f"\n{'iter':>4}  {'stage':<10} {'status':<8} {'seconds':>8}")
    for t in timings:
        print(f"{t['iteration']:>4}  {t['stage']:<10} {t['status']:<8} {t['seconds']:>8.1f}")
    print(f"summary: {run_path / 'summary.csv'}, {run_path / 'summary.png'}")
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sedir", description="Run the SeDiR self-improvement loop.")
    parser.add_argument("--params", required=True, help="experiment YAML, e.g. params/embedded.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. --set questions.temperature=0.7 (repeatable)")
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: params 'iterations')")
    parser.add_argument("--run-dir", help="output folder (default: outputs/<run_name>)")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        run(args.params, overrides, iterations=args.iterations, run_dir=args.run_dir)
    except (ParamsError, DataError, StageError, ModelError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ParamsError) else 1
    return 0
