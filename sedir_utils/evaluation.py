"""Stage 5: evaluate the iteration's model with lm-eval (paper, section 4: GPQA).

Hub tasks (``gpqa_diamond_zeroshot``, ``gpqa_main_cot_zeroshot`` ...) are passed to lm-eval by name.
``gpqa_local`` and ``gpqa_local_cot`` are the same zero-shot log-likelihood and chain-of-thought tasks
over a local file in GPQA's own columns, declared as data in ``lm_eval_tasks/``. Each task and scorer is
reported with a 95% bootstrap interval, the share of generations with no extractable answer, and the
accuracy per domain when the file has one.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .gpqa import read_gpqa_file, shuffled_choices
from .io import RunPaths, StageError, collect_metrics, read_json, read_jsonl, write_json, write_jsonl, write_text

LOCAL_TASK = "gpqa_local"  # log-likelihood of the option letter, as lm-eval's gpqa_*_zeroshot
LOCAL_COT_TASK = "gpqa_local_cot"  # chain of thought, generated, as lm-eval's gpqa_*_cot_zeroshot
PACKAGED_DIR = Path(__file__).parent / "lm_eval_tasks"
LOCAL_TASKS = {LOCAL_TASK: "gpqa_local_zeroshot.yaml", LOCAL_COT_TASK: "gpqa_local_cot_zeroshot.yaml"}
INVALID = "[invalid]"  # what lm-eval's extraction filters return when they find no answer
# Paper, Table 1: GPQA accuracy (%) of Qwen2.5-1.5B-Instruct after iterations 0-4.
PAPER_GPQA = {0: 16.41, 1: 28.03, 2: 30.05, 3: 32.32, 4: 34.09}


def process_gpqa_docs(dataset):
    """lm-eval ``process_docs`` hook: add choice1..4, the choices list and the answer letter."""

    def one(doc):
        choices, answer = shuffled_choices(doc)
        out = {f"choice{i + 1}": c for i, c in enumerate(choices)}
        out["choices"] = choices  # the cot task's "flexible-extract" filter also matches option texts
        out["answer"] = f"({'ABCD'[answer]})"
        return out

    return dataset.map(one)


def check_gpqa_file(path: str | Path) -> int:
    """Fail in one line if the eval file is missing, unreadable or lacks GPQA's columns; returns its rows."""
    return len(read_gpqa_file(path, "eval.local_file"))


def write_local_task(
    tasks_dir: str | Path, data_file: str | Path, name: str = LOCAL_TASK, max_gen_toks: int = 512
) -> Path:
    """Write the run's task file for ``name``: the packaged task, pointed at ``data_file``."""
    import yaml

    data_file = Path(data_file).resolve()
    check_gpqa_file(data_file)
    kind = "json" if data_file.suffix in (".jsonl", ".json") else "csv"
    task = {
        "include": str(PACKAGED_DIR / LOCAL_TASKS[name]),
        "task": name,
        "dataset_path": kind,
        "dataset_kwargs": {"data_files": {"train": str(data_file)}},
    }
    if name == LOCAL_COT_TASK:
        task["generation_kwargs"] = {
            "until": ["</s>"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        }
    path = Path(tasks_dir) / f"{name}.yaml"
    write_text(path, yaml.safe_dump(task, sort_keys=False))
    return path


def select_backend(requested: str, *, cuda: bool | None = None, vllm: bool | None = None) -> tuple[str, str]:
    """lm-eval's ``vllm`` backend when CUDA and vllm are present, its ``hf`` backend otherwise; and why."""
    from .models import choose_backend

    return choose_backend(requested, fast="vllm", fallback="hf", field="eval.backend", cuda=cuda, installed=vllm)


def lm_eval_model_args(backend: str, model_path: str, dtype: str, seed: int) -> dict:
    """lm-eval's ``model_args`` for its ``vllm`` or ``hf`` backend, the dtype resolved for the device."""
    from .models import pick_device, resolve_dtype

    if backend == "vllm":
        return {
            "pretrained": model_path,
            "dtype": resolve_dtype(dtype, "cuda"),
            "gpu_memory_utilization": 0.8,
            "seed": seed,
        }
    device = pick_device()
    return {"pretrained": model_path, "device": device, "dtype": resolve_dtype(dtype, device)}


def sample_records(task: str, samples: list[dict]) -> list[dict]:
    """One row per (question, metric/filter) from lm-eval's logged samples: answer, extraction, right or not."""
    rows = []
    for s in samples:
        doc = s.get("doc", {})
        filt = s.get("filter", "none")
        filtered = s.get("filtered_resps") or [None]
        if isinstance(filtered[0], (list, tuple)):  # multiple choice: (loglik, is_greedy) per option
            logliks = [r[0] for r in filtered]
            response = extracted = f"({'ABCDEFGH'[logliks.index(max(logliks))]})"
        else:
            response, extracted = (s.get("resps") or [[None]])[0][0], filtered[0]
        for metric in s.get("metrics", []):
            if metric not in s:
                continue
            rows.append(
                {
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric}[{filt}]",
                    "doc_id": s.get("doc_id"),
                    "question": doc.get("Question"),
                    "domain": doc.get("High-level domain"),
                    "target": s.get("target"),
                    "response": response,
                    "extracted": extracted,
                    "no_answer": extracted == INVALID,
                    "correct": float(s[metric]),
                }
            )
    return rows


def summarise(records: list[dict], n_boot: int, seed: int) -> dict:
    """Per task and metric: accuracy, a 95% bootstrap interval over questions, no-answer share, by domain."""
    from .stats import bootstrap_ci

    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        grouped[(r["task"], r["metric"])].append(r)
    out: dict[str, dict] = defaultdict(dict)
    for (task, metric), rows in grouped.items():
        values = [r["correct"] for r in rows]

        def mean(idx, values=values):
            return sum(values[i] for i in idx) / len(idx) if idx else float("nan")

        low, high = bootstrap_ci(mean, [str(r["doc_id"]) for r in rows], n_boot=n_boot, seed=seed)
        by_domain: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["domain"] is not None:
                by_domain[str(r["domain"])].append(r["correct"])
        out[task][metric] = {
            "value": sum(values) / len(values),
            "ci": [low, high],
            "n": len(values),
            "no_answer_share": sum(r["no_answer"] for r in rows) / len(rows),
            "by_domain": {d: {"value": sum(v) / len(v), "n": len(v)} for d, v in sorted(by_domain.items())},
        }
    return dict(out)


def run_evaluation(model, section, *, tasks_dir: str | Path, seed: int, dtype: str) -> tuple[dict, list[dict], str]:
    """Evaluate ``model`` (a folder or hub id, or an lm-eval ``LM`` object) on the params' tasks.

    Returns (per-task summary, per-question records, the backend that ran).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = list(section.tasks)
    include = None
    for name in LOCAL_TASKS:
        if name in names:
            write_local_task(tasks_dir, section.local_file, name, section.max_gen_toks)
            include = str(tasks_dir)
    if isinstance(model, str):
        backend, reason = select_backend(section.backend)
        lm, model_args = backend, lm_eval_model_args(backend, model, dtype, seed)
        print(f"lm-eval backend: {backend} ({reason})")
    else:  # an LM object (the tests pass a scripted one)
        backend, lm, model_args = type(model).__name__, model, None
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=names,
            task_manager=TaskManager(include_path=include),
            batch_size="auto" if backend == "vllm" else section.batch_size,
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
        raise StageError(f"eval of model {model} on tasks {names} failed: {first}") from None
    records = [r for name in names for r in sample_records(name, results.get("samples", {}).get(name, []))]
    return summarise(records, section.bootstrap, seed), records, backend


def run(params, paths) -> dict:
    """The stage as the notebook runs it: evaluate the iteration's model, write ``eval.json``."""
    import lm_eval

    from .models import resolve_model

    model_path = paths.model_after(paths.iteration, resolve_model(params.model.name))
    if paths.iteration > 0 and not Path(model_path, "config.json").is_file():
        raise StageError(
            f"eval: {model_path} has no saved model; run 04_finetune_unsloth for iteration {paths.iteration}"
        )
    summary, records, backend = run_evaluation(
        model_path, params.eval, tasks_dir=paths.tasks_dir, seed=params.seed, dtype=params.model.dtype
    )
    write_jsonl(paths.eval_samples, records)
    local = [t for t in params.eval.tasks if t in LOCAL_TASKS]
    report = {
        "iteration": paths.iteration,
        "model": paths.model_label(paths.iteration, params.model.name),
        "tasks": summary,
        "backend": backend,
        "seed": params.seed,
        "limit": params.eval.limit,
        "apply_chat_template": params.eval.apply_chat_template,
        "local_file": _file_id(params.eval.local_file) if local else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    write_json(paths.eval, report)
    return report


def _file_id(path) -> dict:
    from .io import file_sha256

    return {"name": Path(path).name, "sha256": file_sha256(path)}


def collect_results(run_dir: str | Path):
    """Every iteration's ``eval.json`` under ``run_dir`` as one table, a row per iteration, task and metric."""
    import pandas as pd

    rows = []
    run = RunPaths(run_dir, 0)
    for path in (run.of(k).eval for k in run.iterations()):
        if not path.is_file():
            continue
        report = read_json(path)
        for task, metrics in report["tasks"].items():
            for metric, m in metrics.items():
                low, high = m["ci"]
                rows.append(
                    {
                        "iteration": report["iteration"],
                        "task": task,
                        "metric": metric,
                        "value": m["value"],
                        "ci_low": low,
                        "ci_high": high,
                        "n": m["n"],
                        "no_answer_share": m["no_answer_share"],
                    }
                )
    columns = ["iteration", "task", "metric", "value", "ci_low", "ci_high", "n", "no_answer_share"]
    return pd.DataFrame(rows, columns=columns)


def beside_paper(table):
    """The summary table as one row per iteration: the paper's Table 1 GPQA (%), then each task and scorer
    here (%) with its 95% interval."""
    import pandas as pd

    rows = {}
    for r in table.itertuples():
        column = f"{r.task} {r.metric}"
        rows.setdefault(r.iteration, {})[column] = (
            f"{100 * r.value:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
            if r.ci_low == r.ci_low
            else f"{100 * r.value:.1f}"
        )
    iterations = sorted(set(rows) | set(PAPER_GPQA))
    frame = pd.DataFrame(
        [{"paper GPQA (Table 1)": PAPER_GPQA.get(k), **rows.get(k, {})} for k in iterations],
        index=pd.Index(iterations, name="iteration"),
    )
    return frame


def compare_records(before: list[dict], after: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per task and metric, two models on the same questions (two iterations, or two arms): the accuracy
    difference (after - before) with a paired bootstrap interval over questions, McNemar's exact test on
    per-question correctness, and how many questions only one side has (left out of both)."""
    from .stats import mcnemar_exact, paired_difference

    def index(records):
        return {(r["task"], r["metric"], str(r["doc_id"])): r["correct"] for r in records}

    old, new = index(before), index(after)
    out: dict[str, dict] = defaultdict(dict)
    for task, metric in sorted({k[:2] for k in old} | {k[:2] for k in new}):
        keys = sorted(k for k in old if k[:2] == (task, metric) and k in new)
        a, b = [bool(old[k]) for k in keys], [bool(new[k]) for k in keys]
        unpaired = sum(1 for k in {**old, **new} if k[:2] == (task, metric) and not (k in old and k in new))
        out[task][metric] = {**paired_difference(a, b, n_boot, seed), **mcnemar_exact(a, b), "unpaired": unpaired}
    return dict(out)


def comparison_table(run_dir: str | Path, before: int, after: int, n_boot: int = 1000, seed: int = 0):
    """``compare_records`` of two iterations' eval samples as a table, with a reading per row: a difference
    is outside noise when its paired interval excludes 0."""
    import pandas as pd

    found = compare_records(
        read_jsonl(RunPaths(run_dir, before).eval_samples),
        read_jsonl(RunPaths(run_dir, after).eval_samples),
        n_boot,
        seed,
    )
    rows = []
    for task, metrics in found.items():
        for metric, c in metrics.items():
            low, high = c["ci"]
            reading = "gain outside noise" if low > 0 else "loss outside noise" if high < 0 else "within noise"
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    f"{after} - {before}": c["difference"],
                    "95% CI": f"{low:+.3f} to {high:+.3f}",
                    "gained": c["gained"],
                    "lost": c["lost"],
                    "McNemar p": c["p"],
                    "n": c["n"],
                    "reading": reading,
                }
            )
    return pd.DataFrame(rows)


def changed_answers(run_dir: str | Path, before: int, after: int, limit: int = 5) -> list[dict]:
    """Questions whose extracted answer changed between two iterations (generative metrics first)."""

    def load(k):
        return {(r["task"], r["metric"], r["doc_id"]): r for r in read_jsonl(RunPaths(run_dir, k).eval_samples)}

    old, new = load(before), load(after)
    keys = sorted(
        (k for k in new if k in old and old[k]["extracted"] != new[k]["extracted"]), key=lambda k: ("[" not in k[1], k)
    )
    return [
        {
            "task": k[0],
            "metric": k[1],
            "question": new[k]["question"],
            "target": new[k]["target"],
            "before": old[k]["extracted"],
            "after": new[k]["extracted"],
            "response_after": new[k]["response"],
        }
        for k in keys[:limit]
    ]


def write_summary(run_dir: str | Path):
    """Write ``summary.csv`` and ``summary.png`` (scores by iteration, the paper's Table 1 beside them)."""
    from .plots import plot_scores_by_iteration

    run_dir = Path(run_dir)
    table = collect_results(run_dir)
    write_text(run_dir / "summary.csv", table.to_csv(index=False))
    fig = plot_scores_by_iteration(table, PAPER_GPQA, collect_metrics(run_dir, "audit"))
    fig.savefig(run_dir / "summary.png", dpi=120, bbox_inches="tight")
    return table, fig
