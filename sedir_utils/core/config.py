"""Experiment parameters: one YAML file per experiment, validated once at load.

Every error names the file and the dotted key, in one line (``ParamsError``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from sedir_utils.core.declarations import PAPER, RULES
from sedir_utils.core.params import ACCELERATE_CONFIGS, Params, ParamsError, reserved_trainer_arg
from sedir_utils.core.steering import steering_options

_POSITIVE = {
    "iterations": 0,
    "model.data_parallel_size": 1,
    "model.tensor_parallel_size": 1,
    "questions.num_questions": 1,
    "questions.max_rounds": 1,
    "questions.max_new_tokens": 1,
    "questions.batch_size": 1,
    "responses.num_responses": 1,
    "responses.max_new_tokens": 1,
    "responses.batch_size": 1,
    "reward.batch_size": 1,
    "reward.max_length": 16,
    "finetune.max_samples": 1,
    "finetune.num_processes": 1,
    "finetune.per_device_train_batch_size": 1,
    "finetune.gradient_accumulation_steps": 1,
    "finetune.max_length": 16,
    "finetune.lora.r": 1,
    "finetune.opsd.num_generations": 1,
    "balance.n_star": 1,
    "finetune.opsd.max_completion_length": 1,
    "finetune.opsd.distillation_topk": 1,
    "finetune.opsd.max_prompt_length": 16,
    "finetune.grpo.num_generations": 2,  # a group of one has no spread to learn from
    "finetune.grpo.max_completion_length": 1,
    "finetune.grpo.num_iterations": 1,
    "eval.batch_size": 1,
}

# Keys renamed to TRL's and PEFT's own names: an old one gets the new name, not just "unknown key".
RENAMED = {
    "finetune.batch_size": "finetune.per_device_train_batch_size",
    "finetune.num_epochs": "finetune.num_train_epochs",
    "finetune.warmup": "finetune.warmup_steps",
    "finetune.dpo_loss": "finetune.loss_type",
    "finetune.lora.alpha": "finetune.lora.lora_alpha",
    "finetune.lora.dropout": "finetune.lora.lora_dropout",
}


def _describe(tp) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value, tp, key: str, where: str):
    if tp is Any:  # passed through (finetune.trainer_args: whoever consumes it checks it)
        return value
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{where}: {key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".", where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own, more precise, error
            return _coerce(value, others[0], key, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ParamsError:
                pass
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, f"{key}", where): _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()
        }
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported params type {tp}")  # a bug in this module, not in the user's file


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            new = RENAMED.get(prefix + key)
            if new:
                library = "PEFT" if ".lora." in new else "TRL"
                raise ParamsError(f"{where}: {prefix}{key} is now {new} ({library}'s name)")
            known = ", ".join(sorted(fields))
            raise ParamsError(f"{where}: unknown key '{prefix}{key}' (known here: {known})")
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, where)
    return cls(**kwargs)


def build_section(cls, data: dict, prefix: str, where: str):
    """One params section (e.g. ``FinetuneParams``) from its dict, validated as ``load_params`` does."""
    return _build(cls, data, prefix, where)


# Dotted keys and the interval each must lie in: (test, how the error states it).
_INTERVALS = {
    **{f"{section}.temperature": (lambda v: v >= 0, ">= 0") for section in ("questions", "responses")},
    **{f"{section}.top_p": (lambda v: 0 < v <= 1, "in (0, 1]") for section in ("questions", "responses")},
    **{f"{section}.min_p": (lambda v: 0 <= v < 1, "in [0, 1)") for section in ("questions", "responses")},
    "questions.near_duplicate_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "questions.contamination_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "questions.contamination_ngram": (lambda v: v >= 3, "at least 3"),
    "reward.collapse_share": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "reward.consistency_low": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "reward.consistency_high": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "finetune.opsd.distillation_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "finetune.opsd.temperature": (lambda v: v > 0, "above 0"),
    "finetune.grpo.temperature": (lambda v: v > 0, "above 0"),
    "finetune.grpo.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.grpo.min_p": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finetune.grpo.vllm_gpu_memory_utilization": (lambda v: 0 < v < 1, "in (0, 1)"),
    "finetune.grpo.collapse_tolerance": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _value(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _number_problems(params: Params):
    for key, low in _POSITIVE.items():
        if _value(params, key) < low:
            yield f"{key}: must be at least {low}, got {_value(params, key)}"
    for key in ("questions.chunk_size", "responses.chunk_size"):
        value = _value(params, key)
        if value is not None and value < 1:
            yield f"{key}: must be at least 1 (or null), got {value}"
    for key, (ok, interval) in _INTERVALS.items():
        if not ok(_value(params, key)):
            yield f"{key}: must be {interval}, got {_value(params, key)}"


def _section_problems(params: Params):
    for key in params.finetune.trainer_args:  # names TRL lacks: finetune.trainer_args_problems (imports TRL)
        problem = reserved_trainer_arg(key, params.finetune.method)
        if problem:
            yield f"finetune.trainer_args.{key}: {problem}"

    try:
        options = steering_options(params.questions.system_prompt)
    except ValueError as exc:
        options = None
        yield str(exc)
    if options is not None and (not options or any(o.weight <= 0 for o in options)):
        yield "questions.system_prompt: give at least one prompt, every weight above 0"
    opsd = params.finetune.opsd
    for name in ("prompt", "privileged_context"):
        if "{" + name + "}" not in opsd.teacher_prompt_template:
            where = "finetune.opsd.teacher_prompt_template"
            yield f"{where}: must hold {{prompt}} and {{privileged_context}} (no {{{name}}})"
    if params.finetune.method == "opsd":
        batch = params.finetune.per_device_train_batch_size * params.finetune.gradient_accumulation_steps
        if batch % opsd.num_generations:
            yield (
                f"finetune.opsd.num_generations: {opsd.num_generations} does not divide the "
                f"{batch} answers of a step (finetune.per_device_train_batch_size x gradient_accumulation_steps)"
            )
        if opsd.distillation_mode == "sampled_token" and opsd.distillation_alpha != 1.0:
            yield "finetune.opsd.distillation_alpha: must be 1.0 with distillation_mode 'sampled_token' (TRL's rule)"
    if params.finetune.method == "grpo":
        yield from _grpo_problems(params)
    distributed = params.finetune.distributed
    if distributed not in ACCELERATE_CONFIGS and not distributed.endswith((".yaml", ".yml", ".json")):
        yield (
            f"finetune.distributed: expected one of {', '.join(ACCELERATE_CONFIGS)} or an accelerate config file "
            f"(.yaml or .json), got {distributed!r}"
        )
    elif params.finetune.num_processes > 1 and params.finetune.backend == "unsloth" and distributed != "ddp":
        yield (
            f"finetune.distributed: {distributed} trains with TRL (finetune.backend: trl or auto); Unsloth's "
            "documented multi-GPU path is DDP (ddp)"
        )
    balance = params.balance
    if balance.enabled and (not balance.temperatures or any(t < 0 for t in balance.temperatures)):
        yield "balance.temperatures: give at least one temperature, none below 0"
    if balance.enabled and (
        not balance.threshold_quantiles or any(not 0 <= q < 1 for q in balance.threshold_quantiles)
    ):
        yield "balance.threshold_quantiles: give at least one quantile, each in [0, 1)"
    if params.reward.consistency_low > params.reward.consistency_high:
        yield "reward.consistency_low: must not exceed reward.consistency_high"
    if params.questions.min_chars > params.questions.max_chars:
        yield "questions.min_chars: must not exceed questions.max_chars"

    for task in ("gpqa_local", "gpqa_local_cot"):
        if task in params.eval.tasks and not params.eval.local_file:
            yield f"eval.local_file: task '{task}' needs a GPQA-format CSV/JSONL file"

    names = params.arms.names
    for i, name in enumerate(names):
        if name not in RULES:
            yield f"arms.names[{i}]: expected one of {', '.join(repr(r) for r in RULES)}, got {name!r}"
    if len(set(names)) != len(names):
        yield "arms.names: list each arm once"
    if PAPER not in names:
        yield f"arms.names: must include '{PAPER}' (the paper's arm, whose questions and answers the others share)"
    if not params.run_name or "/" in params.run_name:
        yield "run_name: must be a non-empty folder name without '/'"


def _grpo_problems(params: Params):
    finetune, grpo = params.finetune, params.finetune.grpo
    batch = finetune.per_device_train_batch_size * finetune.gradient_accumulation_steps
    if batch % grpo.num_generations:  # TRL's rule, per process: each process scores whole groups
        yield (
            f"finetune.grpo.num_generations: {grpo.num_generations} does not divide the {batch} completions of a "
            "step (finetune.per_device_train_batch_size x gradient_accumulation_steps)"
        )
    if "worst" in params.arms.names:
        yield "arms.names: 'worst' has no meaning under finetune.method grpo (arms: reward, random, none)"
    if finetune.num_processes > 1:
        yield "finetune.num_processes: grpo trains in one process (several are not yet verified with its rewards)"


def _check_ranges(params: Params, where: str, checks: tuple[Callable[[Params], Iterable[str]], ...]) -> None:
    """Raise the first problem (numbers, then sections, then ``checks``) as one line naming the file and key."""
    for problems in (_number_problems, _section_problems, *checks):
        for problem in problems(params):
            raise ParamsError(f"{where}: {problem}")


def _resolve_paths(obj, base: Path) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base)
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("names", ()):
            path = Path(value).expanduser()
            setattr(obj, f.name, str(path if path.is_absolute() else (base / path).resolve()))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected key=value, e.g. questions.temperature=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(data: dict, key: str, value, where: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"{where}: override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_params_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file's keys over those of its ``base`` (a params file it extends, relative to it), recursively;
    relative paths in a base are made relative to the base's own folder."""
    where = str(path)
    if not path.is_file():
        raise ParamsError(f"{where}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of keys at the top level")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.endswith((".yaml", ".yml")):
        raise ParamsError(f"{where}: base: expected the path of a params file (.yaml), got {base!r}")
    base_path = path.resolve().parent / Path(base).expanduser()
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        raise ParamsError(f"{where}: base: {base} extends itself ({' -> '.join(p.name for p in chain)} -> {base})")
    inherited = _read_params_file(base_path, chain)
    _build(Params, inherited, "", str(base_path))  # the base's own unknown keys, named in the base
    _absolute_paths(inherited, Params, base_path.resolve().parent)
    return _merged(inherited, data, Params)


def _sections(cls) -> dict[str, type]:
    """The fields of ``cls`` that are sections (dataclasses), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _merged(base: dict, over: dict, cls) -> dict:
    """``over``'s keys over ``base``'s, section by section; any other value (a list, a mapping such as
    ``reward.weights``) replaces the base's whole."""
    out, sections = dict(base), _sections(cls)
    for key, value in over.items():
        both = key in sections and isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value, sections[key]) if both else value
    return out


def _absolute_paths(data: dict, cls, folder: Path) -> None:
    sections = _sections(cls)
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        if f.name in sections and isinstance(value, dict):
            _absolute_paths(value, sections[f.name], folder)
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("names", ()):
            path = Path(value).expanduser()
            data[f.name] = str(path if path.is_absolute() else (folder / path).resolve())


def load_params(
    path: str | Path,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    checks: tuple[Callable[[Params], Iterable[str]], ...],
) -> Params:
    """Load and validate a params YAML; ``overrides`` maps dotted keys to values (or is a list of ``k=v``).
    ``checks`` yield further problems (the backend and scorer registries': sedir_utils/run/params.py).

    A file may extend another with ``base: other.yaml`` (relative to it): its keys replace the base's, section
    by section, as ``overrides`` replace the file's.
    """
    path = Path(path).expanduser()
    where = str(path)
    data = _read_params_file(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        _apply_override(data, key, value, where)
    params = _build(Params, data, "", where)
    _check_ranges(params, where, checks)
    _resolve_paths(params, path.resolve().parent)
    params.source = str(path.resolve())
    return params
