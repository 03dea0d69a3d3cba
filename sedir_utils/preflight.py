"""Check, before the first stage, every choice that could fail later for lack of a device, a package, a file
or hub access, so that a run stops in its first second with one line instead of after an hour of sampling.

``problems(params)`` lists what is wrong (empty: go); the runner raises the first as a ``PreflightError``.
What it looks at is passed in (``Environment``), so the tests can pose any machine.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path


class PreflightError(RuntimeError):
    """A run cannot start on this machine; the message names the params key and the reason."""


@dataclass
class Environment:
    cuda: bool
    packages: set[str] = field(default_factory=set)  # importable packages among those the params may need
    offline: bool = False  # HF_HUB_OFFLINE: nothing can come from the hub
    hub_token: bool = False  # logged in to the hub (gated datasets such as GPQA need it)
    cached: set[str] = field(default_factory=set)  # hub ids found in the local hub cache

    @classmethod
    def here(cls, hub_ids: list[str]) -> "Environment":
        import torch

        packages = {name for name in ("unsloth", "vllm", "bitsandbytes") if importlib.util.find_spec(name) is not None}
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        try:
            from huggingface_hub import get_token

            token = get_token() is not None
        except ImportError:
            token = False
        return cls(cuda=torch.cuda.is_available(), packages=packages, offline=offline, hub_token=token,
                   cached={h for h in hub_ids if _in_hub_cache(h)})


def _in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet, or an unreadable one: nothing is cached
        return False


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


GATED_TASK_PREFIXES = ("gpqa_",)  # lm-eval tasks over gated hub datasets (GPQA: accept its terms, log in)


def hub_ids(params) -> list[str]:
    """Hub model ids the params name (policy, reward model, judge)."""
    names = [params.model.name, params.reward.reward_model, params.reward.judge_model]
    return [n for n in names if n and _is_hub_id(n)]


def problems(params, env: Environment) -> list[str]:
    """Everything in ``params`` that cannot work in ``env``, one line each, in the order the run would meet it."""
    from .evaluation import LOCAL_TASKS, check_gpqa_file
    from .io import DataError

    found: list[str] = []

    def fast_backend(key: str, value: str, package: str, hint: str):
        if value != package:
            return
        if not env.cuda:
            found.append(f"{key}: '{package}' was asked for, but there is no CUDA device")
        elif package not in env.packages:
            found.append(f"{key}: '{package}' was asked for, but {package} is not installed ({hint})")

    fast_backend("model.generation_backend", params.model.generation_backend, "vllm", "pip install -e '.[vllm]'")
    fast_backend("finetune.backend", params.finetune.backend, "unsloth", "pip install -e '.[gpu]'")
    fast_backend("eval.backend", params.eval.backend, "vllm", "pip install -e '.[vllm]'")
    unsloth_runs = env.cuda and "unsloth" in env.packages and params.finetune.backend != "trl"
    if unsloth_runs and params.finetune.load_in_4bit and "bitsandbytes" not in env.packages:
        found.append("finetune.load_in_4bit: 4-bit loading needs bitsandbytes, which is not installed "
                     "(pip install -e '.[gpu]', or set finetune.load_in_4bit: false)")
    if params.reward.device == "cuda" and not env.cuda:
        found.append("reward.device: 'cuda' was asked for, but there is no CUDA device")

    for key, name in (("model.name", params.model.name), ("reward.judge_model", params.reward.judge_model),
                      ("reward.reward_model", params.reward.reward_model)):
        if not name:
            continue
        if not _is_hub_id(name):
            path = Path(name).expanduser()
            if name != "embedded" and not name.endswith(".gguf") and not (path / "config.json").is_file():
                found.append(f"{key}: {name}: no such model folder (no config.json)")
        elif env.offline and name not in env.cached:
            found.append(f"{key}: {name} is a hub model, HF_HUB_OFFLINE is set and it is not in the local hub cache")

    if params.audit.enabled:
        try:
            from .audit import load_probe

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
    gated = [t for t in params.eval.tasks if t not in LOCAL_TASKS and t.startswith(GATED_TASK_PREFIXES)]
    if gated and env.offline:
        found.append(f"eval.tasks: {gated} read GPQA from the hub, but HF_HUB_OFFLINE is set "
                     "(use gpqa_local / gpqa_local_cot with eval.local_file offline)")
    elif gated and not env.hub_token:
        found.append(f"eval.tasks: {gated} read GPQA, a gated hub dataset: accept its terms on the hub, then log in "
                     "(huggingface-cli login, or HF_TOKEN)")
    return found


def check(params, env: Environment | None = None) -> None:
    """Raise ``PreflightError`` with every problem (the first line names the first) before any work starts."""
    env = env or Environment.here(hub_ids(params))
    found = problems(params, env)
    if found:
        more = f" (and {len(found) - 1} more: {'; '.join(found[1:])})" if len(found) > 1 else ""
        raise PreflightError(found[0] + more)
