"""Stage 5: evaluate the iteration's model with lm-eval (paper, section 4: GPQA).

Hub tasks (``gpqa_diamond_zeroshot`` ...) are passed to lm-eval by name. ``gpqa_local`` is the same
zero-shot task over a local file in GPQA's own columns, declared as data in
``lm_eval_tasks/gpqa_local_zeroshot.yaml``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .gpqa import GPQA_COLUMNS, read_gpqa_file, shuffled_choices
from .io import StageError, collect_metrics, read_json, write_json, write_jsonl, write_text

LOCAL_TASK = "gpqa_local"
PACKAGED_TASK = Path(__file__).parent / "lm_eval_tasks" / "gpqa_local_zeroshot.yaml"
# Paper, Table 1: GPQA accuracy (%) of Qwen2.5-1.5B-Instruct after iterations 0-4.
PAPER_GPQA = {0: 16.41, 1: 28.03, 2: 30.05, 3: 32.32, 4: 34.09}


def process_gpqa_docs(dataset):
    """lm-eval ``process_docs`` hook: add choice1..4 and the answer letter."""

    def one(doc):
        choices, answer = shuffled_choices(doc)
        out = {f"choice{i + 1}": c for i, c in enumerate(choices)}
        out["answer"] = f"({'ABCD'[answer]})"
        return out

    return dataset.map(one)


def check_gpqa_file(path: str | Path) -> int:
    """Fail in one line if the eval file is missing, unreadable or lacks GPQA's columns; returns its rows."""
    return len(read_gpqa_file(path, "eval.local_file"))


def write_local_task(tasks_dir: str | Path, data_file: str | Path) -> Path:
    """Write the run's ``gpqa_local`` task file: the packaged task, pointed at ``data_file``."""
    import yaml

    data_file = Path(data_file).resolve()
    check_gpqa_file(data_file)
    kind = "json" if data_file.suffix in (".jsonl", ".json") else "csv"
    task = {
        "include": str(PACKAGED_TASK),
        "task": LOCAL_TASK,
        "dataset_path": kind,
        "dataset_kwargs": {"data_files": {"train": str(data_file)}},
    }
    path = Path(tasks_dir) / f"{LOCAL_TASK}.yaml"
    write_text(path, yaml.safe_dump(task, sort_keys=False))
    return path


def _metrics(task_result: dict) -> dict:
    out = {}
    for key, value in task_result.items():
        name, _, filt = key.partition(",")
        if not filt or not isinstance(value, (int, float)):
            continue
        label = name if filt == "none" else f"{name}[{filt}]"
        out[label] = value if value == value else None  # NaN (e.g. stderr of 1 sample) -> null
    return out


def run_evaluation(model_path: str, section, *, tasks_dir: str | Path, seed: int, dtype: str) -> tuple[dict, list[dict]]:
    """Evaluate ``model_path`` on the params' tasks; returns (per-task metrics, per-question samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .models import pick_device

    names = list(section.tasks)
    include = None
    if LOCAL_TASK in names:
        write_local_task(tasks_dir, section.local_file)
        include = str(tasks_dir)
    device = pick_device()
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_path, "device": device, "dtype": dtype},
            tasks=names,
            task_manager=TaskManager(include_path=include),
            batch_size=section.batch_size,
            limit=section.limit,
            apply_chat_template=section.apply_chat_template,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=True,
        )
    except Exception as exc:  # lm-eval raises many kinds; the user needs the model and the tasks
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StageError(f"eval of model {model_path} on tasks {names} failed: {first}") from None
    metrics = {name: {**_metrics(results["results"][name]), "n": results["n-samples"][name]["effective"]}
               for name in names}
    samples = []
    for name in names:
        for s in results.get("samples", {}).get(name, []):
            doc = s.get("doc", {})
            scores = [r[0] for r in s.get("filtered_resps", [])] if s.get("filtered_resps") else []
            samples.append({
                "task": name,
                "doc_id": s.get("doc_id"),
                "question": doc.get("Question"),
                "target": s.get("target"),
                "scores": scores if all(isinstance(x, (int, float)) for x in scores) else None,
                "acc": s.get("acc"),
            })
    return metrics, samples


def run(params, paths) -> dict:
    """The stage as the notebook runs it: evaluate the iteration's model, write ``eval.json``."""
    import lm_eval

    from .models import resolve_model

    model_path = paths.model_after(paths.iteration, resolve_model(params.model.name))
    if paths.iteration > 0 and not Path(model_path, "config.json").is_file():
        raise StageError(f"eval: {model_path} has no saved model; run 04_finetune_unsloth for iteration {paths.iteration}")
    metrics, samples = run_evaluation(model_path, params.eval, tasks_dir=paths.tasks_dir, seed=params.seed,
                                      dtype=params.model.dtype)
    write_jsonl(paths.eval_samples, samples)
    report = {
        "iteration": paths.iteration,
        "model": paths.model_label(paths.iteration, params.model.name),
        "tasks": metrics,
        "seed": params.seed,
        "limit": params.eval.limit,
        "apply_chat_template": params.eval.apply_chat_template,
        "local_file": _file_id(params.eval.local_file) if LOCAL_TASK in params.eval.tasks else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    write_json(paths.eval, report)
    return report


def _file_id(path) -> dict:
    data = Path(path).read_bytes()
    return {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()}


def collect_results(run_dir: str | Path):
    """Every iteration's ``eval.json`` under ``run_dir`` as one table: iteration, task, metric, value."""
    import pandas as pd

    rows = []
    for path in sorted(Path(run_dir).glob("iter_*/eval.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        report = read_json(path)
        for task, metrics in report["tasks"].items():
            for metric, value in metrics.items():
                if metric == "n" or metric.endswith("_stderr") or "_stderr[" in metric:
                    continue
                stderr = metrics.get(f"{metric}_stderr") if "[" not in metric else None
                rows.append({"iteration": report["iteration"], "task": task, "metric": metric, "value": value,
                             "stderr": stderr, "n": metrics.get("n")})
    return pd.DataFrame(rows, columns=["iteration", "task", "metric", "value", "stderr", "n"])


def write_summary(run_dir: str | Path):
    """Write ``summary.csv`` and ``summary.png`` (scores by iteration, the paper's Table 1 beside them)."""
    from .plots import plot_scores_by_iteration

    run_dir = Path(run_dir)
    table = collect_results(run_dir)
    write_text(run_dir / "summary.csv", table.to_csv(index=False))
    fig = plot_scores_by_iteration(table, PAPER_GPQA, collect_metrics(run_dir, "audit"))
    fig.savefig(run_dir / "summary.png", dpi=120, bbox_inches="tight")
    return table, fig
