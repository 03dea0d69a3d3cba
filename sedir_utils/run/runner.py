"""Run the SeDiR loop: iteration 0 evaluates the base model, iterations 1..K run all five notebooks.

Each notebook is executed by papermill with ``params_file``, ``overrides``, ``run_dir``, ``iteration`` and
``arm`` injected; the executed copy is saved in ``<run_dir>/iter_<k>/notebooks/`` (a control arm's in
``<run_dir>/arms/<arm>/iter_<k>/notebooks/``). In each iteration the paper's arm samples and scores first; the
control arms (``arms.names``) share its questions, answers and scores and run their own selection, fine-tune
and eval; the paper arm's fine-tune and eval come last (``declarations.schedule``).

Stage cache: each finished stage records a fingerprint (its params, its seed, its input files' hashes and
the fingerprints of the stages it depends on, the model included). A stage whose output exists with
the same fingerprint is skipped; change a param and that stage and the ones depending on it run again.
Inside a stage, generation writes finished chunks, so a rerun after a crash resumes mid-stage.
``<run_dir>/manifest.json`` records params, versions, commit, device and each stage's time and rows.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from sedir_utils.core import models
from sedir_utils.core.declarations import PAPER, STAGES, Stage, schedule
from sedir_utils.core.declarations import stage as declaration
from sedir_utils.core.io import read_json, write_text
from sedir_utils.core.package import CHECKOUT_DIR
from sedir_utils.core.params import ParamsError
from sedir_utils.core.paths import RunPaths
from sedir_utils.core.progress import TEXT_PROGRESS
from sedir_utils.run import preflight
from sedir_utils.run.fingerprints import Fingerprints, record_fingerprint, recorded_fingerprint
from sedir_utils.run.manifest import run_environment, write_manifest
from sedir_utils.run.params import load_params
from sedir_utils.share.report import write_report
from sedir_utils.share.summary import read_verdict, write_summary
from sedir_utils.share.tracking import log_iterations
from sedir_utils.stages.finetune.grpo import collapse_text
from sedir_utils.stages.scoring.audit import verdict_text

NOTEBOOKS_DIR = CHECKOUT_DIR / "notebooks"


class RunError(RuntimeError):
    """The run cannot go on; the message says why in one line."""


def stage_rows(paths: RunPaths, name: str) -> int | None:
    """How many rows a finished stage produced (questions, answers, pairs, training samples, eval samples)."""
    declared = declaration(name)
    if declared.rows_key:
        path = getattr(paths, declared.output)
        return read_json(path).get(declared.rows_key) if path.is_file() else None
    path = getattr(paths, declared.rows)
    return sum(1 for line in open(path, encoding="utf-8") if line.strip()) if path.is_file() else None


def execute_stage(stage: Stage, paths: RunPaths, params, overrides: dict, notebooks_dir: Path) -> Path:
    """Execute one notebook with papermill; returns the executed copy's path."""
    import papermill as pm
    from traitlets.config import Config

    source = notebooks_dir / stage.notebook
    if not source.is_file():
        raise RunError(f"notebook {source} not found (is the package installed from its repository?)")
    out = paths.notebooks / stage.notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(source),
            str(out),
            parameters={
                "params_file": str(Path(params.source).resolve()),
                "overrides": overrides,
                "run_dir": str(paths.run_dir.resolve()),
                "iteration": paths.iteration,
                "arm": paths.arm,
            },
            cwd=str(notebooks_dir),
            kernel_name="python3",
            # CurveZMQ keys for the kernel's sockets where its kernelspec supports them (ipykernel does): the
            # kernel would otherwise warn, in every stage's output, that it runs over TCP without encryption.
            config=Config({"KernelManager": {"transport_encryption": "auto"}}),
            progress_bar=False,
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as exc:
        where = f"iteration {paths.iteration}" + ("" if paths.paper_arm else f", arm {paths.arm}")
        raise RunError(f"{where}, stage {stage.name}: {exc.ename}: {exc.evalue} (executed notebook: {out})") from None
    return out


def warn_about_audit(paths: RunPaths) -> None:
    """Say loudly, in the runner's own output, when the reward audit found the scorer untrustworthy."""
    audit = (read_json(paths.metrics).get("audit") if paths.metrics.is_file() else None) or {}
    if audit and not audit.get("ok", True):
        print(verdict_text(audit, paths.iteration))


def warn_about_collapse(params, paths: RunPaths) -> None:
    """Say loudly when GRPO's collapse watch saw the probe accuracy fall while the self-reward rose."""
    info = read_json(paths.finetune_info) if paths.finetune_info.is_file() else {}
    report = info.get("collapse")
    if report and report["warning"]:
        print(collapse_text(report, paths.iteration, paths.arm, info, params.audit.probe_file, params.audit.on_fail))


def print_verdict(run_path: Path) -> None:
    """The verdict's readings (verdict.csv), one line per iteration, task and scorer."""
    frame = read_verdict(run_path)
    if frame.empty:
        return
    print("\nverdict (paper arm vs the base model; control arms beside it):")
    for r in frame.to_dict("records"):
        print(f"  iter {r['iteration']} {r['task']} {r['metric']}: {r['gain (reward)']} -> {r['reading']}")


def run(
    params_file: str,
    overrides: dict,
    *,
    iterations: int | None = None,
    run_dir: str | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    start: tuple[int, int] | None = None,
) -> list[dict]:
    """Run (or resume) the whole loop; returns one row per stage (status, seconds, rows)."""
    params = load_params(params_file, overrides)
    iterations = params.iterations if iterations is None else iterations
    if iterations < 0:
        raise ParamsError(f"--iterations: must be at least 0, got {iterations}")
    preflight.check(params)  # devices, packages, files, hub access: refused now, not after hours of work
    run_path = Path(run_dir) if run_dir else Path("outputs") / params.run_name
    run_path.mkdir(parents=True, exist_ok=True)
    resolved = params.to_dict()
    write_text(run_path / "params.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    print(f"run {params.run_name}: {run_path} | model {params.model.name} | iterations 0..{iterations}")
    base = models.resolve_model(params.model.name)  # convert the embedded/GGUF model once, before any notebook
    print(f"base model: {base}")
    device = models.pick_device()
    dtype, why = models.dtype_decision(params.model.dtype, device)
    print(f"dtype {params.model.dtype} -> {dtype} on {device}: {why}")
    prints = Fingerprints(params, run_path)
    environment = run_environment(resolved)
    os.environ.setdefault(TEXT_PROGRESS, "1")  # the kernels' progress bars print to this terminal: text, not widgets
    stages: list[dict] = []
    for k in range(iterations + 1):
        for arm, stage in schedule(k, params.arms.names, params.arms.own_samples):
            paths = RunPaths(run_path, k, arm, params.arms.own_samples)
            where = f"[iter {k}]" if arm == PAPER else f"[iter {k}, arm {arm}]"
            fingerprint = prints.stage(k, stage.name, arm)
            forced = start is not None and (k, STAGES.index(stage)) >= start
            done = getattr(paths, stage.output).exists()
            row = {"iteration": k, "arm": arm, "stage": stage.name, "fingerprint": fingerprint}
            if done and not forced and recorded_fingerprint(paths, stage.name) == fingerprint:
                print(f"{where} {stage.name}: cached (same params and inputs), skipped")
                stages.append({**row, "status": "cached", "seconds": 0.0, "rows": stage_rows(paths, stage.name)})
                continue
            why = "forced by --from" if forced else "params or inputs changed" if done else "running"
            print(f"{where} {stage.name}: {why}, {stage.notebook}", flush=True)
            began = time.time()
            execute_stage(stage, paths, params, overrides, notebooks_dir)
            record_fingerprint(paths, stage.name, fingerprint)
            seconds = round(time.time() - began, 1)
            stages.append({**row, "status": "ran", "seconds": seconds, "rows": stage_rows(paths, stage.name)})
            write_manifest(run_path, resolved, stages, environment)
            if stage.name == "reward":
                warn_about_audit(paths)
            if stage.name == "finetune":
                warn_about_collapse(params, paths)
        track(params, run_path, k, stages)
    write_manifest(run_path, resolved, stages, environment)
    write_summary(run_path, params.eval.bootstrap, params.seed)
    report = write_report(run_path)
    print(f"\n{'iter':>4}  {'arm':<7} {'stage':<10} {'status':<7} {'seconds':>8} {'rows':>6}")
    for t in stages:
        rows = "" if t["rows"] is None else t["rows"]
        print(f"{t['iteration']:>4}  {t['arm']:<7} {t['stage']:<10} {t['status']:<7} {t['seconds']:>8.1f} {rows:>6}")
    print_verdict(run_path)
    run = RunPaths(run_path, 0)
    print(f"summary: {run.summary_csv}, {run.summary_plot}, {run.verdict_csv}; manifest: {run.manifest}")
    print(f"report: {report}; datasets: iter_<k>/dataset/ (sedir export {run_path} gathers them)")
    return stages


def track(params, run_path: Path, iteration: int, stages: list[dict]) -> None:
    """Log the iteration to the tracking backend (once per result: a resumed run does not log it twice)."""
    seconds = {(t["iteration"], t["arm"], t["stage"]): t["seconds"] for t in stages if t["status"] == "ran"}
    if log_iterations(params, run_path, [iteration], seconds):
        print(f"[iter {iteration}] logged to {params.tracking.backend}")
