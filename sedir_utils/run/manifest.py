"""The run's manifest.json: the params, the stages run or cached with their fingerprints and times, and what
the same files depend on beyond the params (versions, git commit, device, threads, dtypes, the decode kernel)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from sedir_utils.core import models
from sedir_utils.core.io import write_json
from sedir_utils.core.paths import RunPaths
from sedir_utils.engine.backends import choose
from sedir_utils.engine.cpu_engine.kernels import build_info


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

    device = models.pick_device()
    model_dtype = params["model"]["dtype"]
    reward_dtype = params["reward"]["dtype"] or model_dtype
    decided = {
        "sampling_and_scoring": models.dtype_decision(model_dtype, device),
        "reward_model": models.dtype_decision(reward_dtype, device),
        "training_autocast": models.training_autocast(device),
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
        "onednn_bf16": models.onednn_bf16(),
        "env": {k: os.environ[k] for k in DETERMINISM_ENV if k in os.environ},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }


def _chosen_backend(requested: str, device: str) -> str:
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
