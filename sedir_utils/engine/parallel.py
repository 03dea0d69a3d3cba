"""Data parallelism: worker processes share a stage's chunks of sampling or model scoring, one process per
device group (``CUDA_VISIBLE_DEVICES``) or, on the CPU, per share of the cores.

A stage already works in chunks, each saved under a key of everything that determines it (``io.chunked``).
With ``model.data_parallel_size`` N above 1 the stage loads no model itself: it hands the chunks still
missing to N workers (``python -m sedir_utils.engine.worker``), chunk by chunk in turn, each worker loads the
model once and writes each finished chunk to the very file a one-process run would write, by the same
function. The stage then reads every chunk back in order: the same file as one process gives, and a run
that stops midway resumes from whatever chunks any worker finished, with as many workers as it likes.

Tensor parallelism is vLLM's own (``vllm.LLM(tensor_parallel_size=...)``); each vLLM worker here gets
``tensor_parallel_size`` GPUs. vLLM 0.32 has no offline data parallelism for dense models (it refuses
``data_parallel_size`` above 1 in one ``LLM``), so replicas of the engine are these processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sedir_utils.core import children
from sedir_utils.core.io import StageError, write_json
from sedir_utils.core.progress import TEXT_PROGRESS
from sedir_utils.core.progress import bar as progress_bar
from sedir_utils.engine.backends import CPU_THREADS_BIND, core_ranges

FIELD_DP = "model.data_parallel_size"
FIELD_TP = "model.tensor_parallel_size"
POLL_SECONDS = 0.5


def layout_problem(data_parallel: int, tensor_parallel: int, device: str, gpus: int | None = None) -> str | None:
    """Why ``data_parallel`` x ``tensor_parallel`` processes cannot run on ``device`` (None: they can)."""
    if device != "cuda":
        return (
            f"{FIELD_TP}: {tensor_parallel} needs CUDA GPUs (this run's device is cpu)" if tensor_parallel > 1 else None
        )
    if data_parallel * tensor_parallel == 1:
        return None
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    needed = data_parallel * tensor_parallel
    if needed > gpus:
        return (
            f"{FIELD_DP} {data_parallel} x {FIELD_TP} {tensor_parallel} needs {needed} GPUs; "
            f"{gpus} {'is' if gpus == 1 else 'are'} visible"
        )
    return None


def worker_environments(
    size: int,
    tensor_parallel: int,
    device: str,
    *,
    visible: str | None = None,
    threads: int | None = None,
    cores: list[int] | None = None,
) -> list[dict[str, str]]:
    """The environment each of ``size`` workers starts with: on CUDA the ``tensor_parallel`` GPUs it owns,
    counted within the GPUs this process sees (``CUDA_VISIBLE_DEVICES``); on the CPU its share of the
    threads this process has (at least one each) and, for a vLLM engine, cores of its own (``cores``: those
    this process may use), unless ``VLLM_CPU_OMP_THREADS_BIND`` is set already."""
    if device == "cuda":
        if visible is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            ids = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(ids[w * tensor_parallel : (w + 1) * tensor_parallel])}
            for w in range(size)
        ]
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    share = max(1, threads // size)
    envs = [{"OMP_NUM_THREADS": str(share), "MKL_NUM_THREADS": str(share)} for _ in range(size)]
    if CPU_THREADS_BIND not in os.environ:
        cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
        for w, env in enumerate(envs):
            env[CPU_THREADS_BIND] = core_ranges({cores[(w * share + k) % len(cores)] for k in range(share)})
    return envs


def assign(missing: list, size: int) -> list[list]:
    """The missing chunks dealt to ``size`` workers in turn (worker w gets the w-th, (w+size)-th, ...)."""
    return [missing[w::size] for w in range(size)]


def chunk_filler(spec: dict, size: int, device: str, tensor_parallel: int, desc: str, job_fields=None):
    """``io.chunked``'s ``fill``: the missing chunks (index, items, path) as jobs for ``run_workers``, each
    with ``job_fields(index)``'s fields too (say, where its prompts' seeds start)."""

    def fill(missing):
        jobs = [
            {"path": str(path), "items": part, **(job_fields(c) if job_fields else {})} for c, part, path in missing
        ]
        run_workers(spec, jobs, size, device, tensor_parallel, desc)

    return fill


def run_workers(spec: dict, jobs: list[dict], size: int, device: str, tensor_parallel: int, desc: str) -> None:
    """Run ``jobs`` (each: ``path`` to write, ``items`` to work on, its own fields) in up to ``size`` worker
    processes sharing ``spec`` (what to load and how to work: ``_work``); a progress bar counts items as
    their chunk files appear. A worker that fails stops the others at once and is a ``StageError`` naming
    its log; the chunks already written stay, so a rerun resumes after them."""
    if not jobs:
        return
    problem = layout_problem(size, tensor_parallel, device)  # preflight says it first; a notebook may not run it
    if problem:
        raise StageError(f"{desc}: {problem}")
    shares = [share for share in assign(jobs, size) if share]
    folder = Path(jobs[0]["path"]).parent / ".workers"
    folder.mkdir(parents=True, exist_ok=True)
    # The workers' own bars would only fill their logs: this process counts chunks.
    base = children.environment({TEXT_PROGRESS: "1", "TQDM_DISABLE": "1"})
    envs = worker_environments(len(shares), tensor_parallel, device)
    procs, logs = [], []
    try:
        for w, share in enumerate(shares):
            spec_path, log = folder / f"worker-{w}.json", folder / f"worker-{w}.log"
            write_json(spec_path, {**spec, "jobs": share})
            logs.append(log)
            with open(log, "wb") as out:
                command = [sys.executable, "-m", "sedir_utils.engine.worker", str(spec_path)]
                procs.append(children.start(command, stdout=out, env={**base, **envs[w]}))
        chunks, workers = f"chunk{'s' * (len(jobs) > 1)}", f"process{'es' * (len(procs) > 1)}"
        print(f"{desc}: {len(jobs)} {chunks} in {len(procs)} worker {workers} ({_where(envs)})")
        total, written = sum(len(j["items"]) for j in jobs), 0
        with progress_bar(total=total, desc=desc, unit="item") as bar:
            while True:
                codes = [p.poll() for p in procs]  # first: a worker that has ended has written all it will
                now = sum(len(j["items"]) for j in jobs if Path(j["path"]).is_file())
                bar.update(now - written)
                written = now
                # Failed: ended with an error before writing its chunks (after them, a teardown's crash loses
                # nothing: every chunk it owes is on disk).
                failed = [w for w, code in enumerate(codes) if code not in (None, 0) and _unwritten(shares[w])]
                if failed:
                    w = failed[0]
                    raise StageError(
                        f"{desc}: worker {w} of {len(procs)} failed (exit {codes[w]}): "
                        f"{children.last_line(_read(logs[w]))} (log: {logs[w]}; finished chunks are kept, a "
                        "rerun resumes after them)"
                    )
                if written == total or all(code is not None for code in codes):
                    break
                time.sleep(POLL_SECONDS)
        deadline = time.monotonic() + children.STOP_GRACE_SECONDS  # done: a moment to exit, for all at once
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a hung teardown: stopped below
                pass
    finally:
        children.stop(*procs)  # interrupted, a worker failed, or done: what they started (vLLM's engines) goes too
    missing = _unwritten(jobs)
    if missing:
        raise StageError(f"{desc}: the workers ended without writing {missing[0]['path']}")
    for w in range(len(procs)):  # every chunk is in: the specs (which hold the rows) and the logs go
        (folder / f"worker-{w}.json").unlink(missing_ok=True)
        logs[w].unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # another stage's workers still use it
        pass


def _unwritten(jobs: list[dict]) -> list[dict]:
    return [j for j in jobs if not Path(j["path"]).is_file()]


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.is_file() else ""


def _where(envs: list[dict[str, str]]) -> str:
    if "CUDA_VISIBLE_DEVICES" in envs[0]:
        return "GPUs " + " | ".join(env["CUDA_VISIBLE_DEVICES"] for env in envs)
    threads = envs[0]["OMP_NUM_THREADS"]
    return f"{threads} CPU thread{'s' * (threads != '1')} each"
