"""Run the SeDiR loop: iteration 0 evaluates the base model, iterations 1..K run all five notebooks.

Each notebook is executed by papermill with ``params_file``, ``overrides``, ``run_dir``, ``iteration`` and
``arm`` injected; the executed copy is saved in ``<run_dir>/iter_<k>/notebooks/`` (a control arm's in
``<run_dir>/arms/<arm>/iter_<k>/notebooks/``). In each iteration the paper's arm samples and scores first; the
control arms (``arms.names``) share its questions, answers and scores and run their own selection, fine-tune
and eval; the paper arm's fine-tune and eval come last (``stages.schedule``).

Stage cache: each finished stage records a fingerprint (its params, its seed, its input files' hashes and
the fingerprints of the stages it depends on, the model included). A stage whose output exists with
the same fingerprint is skipped; change a param and that stage and the ones depending on it run again.
Inside a stage, generation writes finished chunks, so a rerun after a crash resumes mid-stage.
``<run_dir>/manifest.json`` records params, versions, commit, device and each stage's time and rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import models
from .arms import PAPER, trains
from .config import ParamsError, load_params, parse_override
from .io import DataError, RunPaths, StageError, digest, file_sha256, read_json, write_json, write_text
from .models import ModelError
from .preflight import PreflightError
from .progress import TEXT_PROGRESS
from .stages import STAGES, Stage, schedule
from .stages import stage as declaration

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class RunError(RuntimeError):
    """The run cannot go on; the message says why in one line."""


class Fingerprints:
    """Stage fingerprints of one run, computed from the params and the files on disk."""

    def __init__(self, params, run_path: Path):
        from .config import EXECUTION_ONLY, INERT_AT

        self.params, self.run_path, self.memo = params.to_dict(), run_path, {}
        for section, keys in EXECUTION_ONLY.items():  # how the work runs is no part of what it gives
            self.params[section] = {k: v for k, v in self.params[section].items() if k not in keys}
        for section, inert in INERT_AT.items():  # one training process: no layout to speak of
            values = self.params[section]
            if all(values[k] == v for k, v in inert.items() if v is not None):
                self.params[section] = {k: v for k, v in values.items() if k not in inert}
        self.own_samples = self.params["arms"]["own_samples"]
        # What the hardware makes of the dtype counts, not its name: `auto` is bf16 on one CPU and fp32 on another
        # (a run resumed on the other kind reruns its stages), and `bfloat16` and `auto` are one thing where both
        # are bf16. Training's autocast is decided the same way.
        device = models.pick_device()
        for section in ("model", "reward"):
            if self.params[section]["dtype"]:
                self.params[section]["dtype"] = models.dtype_decision(self.params[section]["dtype"], device)[0]
        self.params["finetune"]["autocast"] = models.dtype_decision("auto", device)[0]

    def model(self, iteration: int, arm: str = PAPER) -> str:
        """The model after ``iteration`` in ``arm``: the base model's params, or the fine-tune that made it."""
        if iteration <= 0 or not trains(arm):
            return digest({"model": self.params["model"]})
        return self.stage(iteration, "finetune", arm)

    def stage(self, iteration: int, name: str, arm: str = PAPER) -> str:
        declared = declaration(name)
        if iteration == 0 or (declared.shared and not self.own_samples):
            arm = PAPER  # the base model's eval, and the shared samples, are the paper arm's
        key = (iteration, name, arm)
        if key not in self.memo:
            paths = RunPaths(self.run_path, iteration, arm, self.own_samples)
            upstream = [self.model(iteration if declared.model == "own" else iteration - 1, arm)]
            upstream += [self.stage(k, s, arm) for k, s in declared.depends_on(self.params, iteration)]
            self.memo[key] = digest(
                {
                    "stage": name,
                    "seed": self.params["seed"],
                    "iteration": iteration,
                    "upstream": upstream,
                    "params": {section: self.params[section] for section in declared.sections(self.params)},
                    "inputs": {f: file_sha256(getattr(paths, f)) for f in declared.inputs(self.params)},
                    "param_files": self._param_files(declared.sections(self.params)),
                    # questions are decontaminated against the evaluation set: its questions are an input
                    "eval_questions": self._eval_questions() if name == "questions" else None,
                    **({} if arm == PAPER else {"arm": arm}),
                }
            )
        return self.memo[key]

    def _param_files(self, sections: tuple[str, ...]) -> dict:
        """Files the params name (eval file, probe file, an accelerate config of one's own): their content
        counts, not only their path."""
        found = {}
        for section in sections:
            for key, value in self.params[section].items():
                if (
                    isinstance(value, str)
                    and value.endswith((".csv", ".jsonl", ".json", ".yaml", ".yml"))
                    and Path(value).is_file()
                ):
                    found[f"{section}.{key}"] = file_sha256(Path(value))
        return found

    def _eval_questions(self):
        if not self.params["questions"]["decontaminate"]:
            return None
        local = self.params["eval"]["local_file"]
        return [self.params["eval"]["tasks"], file_sha256(Path(local)) if local else None]


def recorded_fingerprint(paths: RunPaths, stage: str) -> str | None:
    return (read_json(paths.fingerprints) if paths.fingerprints.is_file() else {}).get(stage)


def record_fingerprint(paths: RunPaths, stage: str, fingerprint: str) -> None:
    data = read_json(paths.fingerprints) if paths.fingerprints.is_file() else {}
    data[stage] = fingerprint
    write_json(paths.fingerprints, data)


def stage_rows(paths: RunPaths, name: str) -> int | None:
    """How many rows a finished stage produced (questions, answers, pairs, training samples, eval samples)."""
    declared = declaration(name)
    if declared.rows_key:
        path = getattr(paths, declared.output)
        return read_json(path).get(declared.rows_key) if path.is_file() else None
    path = getattr(paths, declared.rows)
    return sum(1 for line in open(path, encoding="utf-8") if line.strip()) if path.is_file() else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in (
        "sedir",
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "lm_eval",
        "papermill",
        "unsloth",
        "vllm",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _device() -> dict:
    import torch

    if torch.cuda.is_available():
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(0),
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


# Environment variables that change how (and so in what order) the math libraries compute.
DETERMINISM_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "CUBLAS_WORKSPACE_CONFIG",
    "SEDIR_NO_KERNELS",
    "PYTHONHASHSEED",
)


def _determinism(params: dict) -> dict:
    """What the same params and seed giving the same files depends on, beyond the versions: threads, the
    dtypes each stage really runs in here, the decode kernel's build, the CPU's features, math-library
    settings. Two machines whose files differ can be compared on these."""
    import os

    import torch

    from .cpu_engine.kernels import build_info
    from .cpu_engine.scoped import onednn_bf16

    device = models.pick_device()
    model_dtype = params["model"]["dtype"]
    reward_dtype = params["reward"]["dtype"] or model_dtype
    decided = {
        "sampling_and_scoring": models.dtype_decision(model_dtype, device),
        "reward_model": models.dtype_decision(reward_dtype, device),
        "training_autocast": models.dtype_decision("auto", device),
    }
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        # Runs on CPUs with and without native bf16 compute in different dtypes: their files differ.
        "dtypes": {stage: dtype for stage, (dtype, _) in decided.items()},
        "dtypes_why": {stage: why for stage, (_, why) in decided.items()},
        "cpu_bf16": models.cpu_bf16(),
        "generation_backend": _chosen_backend(params["model"]["generation_backend"], device),
        "decode_kernel": build_info() if device == "cpu" else None,
        "onednn": torch.backends.mkldnn.is_available(),
        "onednn_bf16": onednn_bf16(),
        "env": {k: os.environ[k] for k in DETERMINISM_ENV if k in os.environ},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }


def _chosen_backend(requested: str, device: str) -> str:
    from .backends import choose

    try:
        return choose(requested, device)[0].name
    except RuntimeError as exc:  # StageError: preflight reports it; the manifest says what was asked
        return f"{requested} ({exc})"


def run_environment(params: dict) -> dict:
    """The manifest's description of where the run ran (read once per run: it calls git and the compiler)."""
    return {
        "versions": _versions(),
        "git_commit": _git_commit(),
        "device": _device(),
        "determinism": _determinism(params),
    }


def write_manifest(run_path: Path, params: dict, stages: list[dict], environment: dict) -> None:
    write_json(RunPaths(run_path, 0).manifest, {"params": params, **environment, "stages": stages})


def parse_start(text: str | None) -> tuple[int, int] | None:
    """``--from 2`` or ``--from 2:reward`` -> (iteration, stage index): run from there even if cached."""
    if text is None:
        return None
    iteration, _, stage = text.partition(":")
    names = [s.name for s in STAGES]
    try:
        k = int(iteration)
    except ValueError:
        raise ParamsError(f"--from: expected ITERATION or ITERATION:STAGE, e.g. 1:reward, got {text!r}") from None
    if stage and stage not in names:
        raise ParamsError(f"--from: unknown stage {stage!r} (stages: {', '.join(names)})")
    return k, names.index(stage) if stage else 0


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
    from .audit import verdict_text

    audit = (read_json(paths.metrics).get("audit") if paths.metrics.is_file() else None) or {}
    if audit and not audit.get("ok", True):
        print(verdict_text(audit, paths.iteration))


def print_verdict(run_path: Path) -> None:
    """The verdict's readings (verdict.csv), one line per iteration, task and scorer."""
    from .evaluation import read_verdict

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
    from . import preflight
    from .evaluation import write_summary
    from .models import resolve_model
    from .report import write_report

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
    base = resolve_model(params.model.name)  # convert the embedded/GGUF model once, before any notebook
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
    from .tracking import log_iterations

    seconds = {(t["iteration"], t["arm"], t["stage"]): t["seconds"] for t in stages if t["status"] == "ran"}
    if log_iterations(params, run_path, [iteration], seconds):
        print(f"[iter {iteration}] logged to {params.tracking.backend}")


def export_main(argv: list[str]) -> None:
    """``sedir export RUN_DIR [--to PATH | --push-to-hub REPO]``."""
    from . import publish

    parser = argparse.ArgumentParser(
        prog="sedir export", description="Gather a run's datasets into one DatasetDict with a dataset card."
    )
    parser.add_argument("run_dir", help="a run folder (outputs/<run_name>)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--to", help="folder to save it in (default: RUN_DIR/export); load it with load_from_disk")
    where.add_argument("--push-to-hub", metavar="REPO", help="a hub dataset repo, e.g. you/sedir-run (private)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: make the repo public")
    args = parser.parse_args(argv)
    if args.push_to_hub:
        print(f"pushed: {publish.push(args.run_dir, args.push_to_hub, private=not args.public)}")
        return
    folder, counts = publish.export(args.run_dir, args.to)
    print(f"exported {', '.join(f'{s} {n}' for s, n in counts.items())} rows to {folder} (datasets.load_from_disk)")


def report_main(argv: list[str]) -> None:
    """``sedir report RUN_DIR``."""
    from .report import write_report

    parser = argparse.ArgumentParser(prog="sedir report", description="Write a run's one-page HTML report.")
    parser.add_argument("run_dir", help="a run folder (outputs/<run_name>)")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / "manifest.json").is_file():
        raise DataError(f"{args.run_dir}: no manifest.json (not a run folder the runner wrote)")
    print(f"report: {write_report(args.run_dir)}")


COMMANDS = {"export": export_main, "report": report_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        try:
            COMMANDS[argv[0]](argv[1:])
        except (ParamsError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(
        prog="sedir",
        description="Run the SeDiR self-improvement loop (also: sedir export RUN_DIR, sedir report RUN_DIR).",
    )
    parser.add_argument("--params", required=True, help="experiment YAML, e.g. params/embedded.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set questions.temperature=0.7 (repeatable)",
    )
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: params 'iterations')")
    parser.add_argument("--run-dir", help="output folder (default: outputs/<run_name>)")
    parser.add_argument(
        "--from",
        dest="start",
        metavar="ITER[:STAGE]",
        help="re-run from this iteration (and stage) on, even where cached, e.g. --from 1:reward",
    )
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        run(args.params, overrides, iterations=args.iterations, run_dir=args.run_dir, start=parse_start(args.start))
    except (ParamsError, DataError, StageError, ModelError, RunError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ParamsError) else 1
    return 0
