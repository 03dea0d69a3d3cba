"""The training methods (``finetune.method``: sft, dpo, opsd, grpo) as TRL configures them: each method's dataset
columns, config and trainer classes, the config built from the params (checked against TRL's own class), the
mixed precision, and how the merged model is saved."""

from __future__ import annotations

import errno
from pathlib import Path

from sedir_utils.core import models
from sedir_utils.core.io import StageError, atomic_dir, check_free_space
from sedir_utils.core.params import GRPO_TRL_FIELDS, OPSD_TRL_FIELDS, TRL_FIELDS, reserved_trainer_arg
from sedir_utils.stages.finetune.opsd import trl_sdft

FIELDS = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "opsd": ("prompt", "privileged_context"),  # TRL's SDFT columns; the context reaches the teacher only
    "grpo": ("prompt", "question_id", "question"),  # the id and text reach the reward functions
}


def training_dataset(rows: list[dict], method: str):
    from datasets import Dataset

    if not rows:
        raise StageError("finetune: no training samples (the reward stage kept no pairs)")
    return Dataset.from_list([{k: r[k] for k in FIELDS[method]} for r in rows])


def config_class(method: str):
    if method == "opsd":
        return trl_sdft().SDFTConfig
    if method == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    from trl import DPOConfig, SFTConfig

    return DPOConfig if method == "dpo" else SFTConfig


def trainer_class(method: str):
    """TRL's trainer for the method (under Unsloth, import it after ``unsloth``: Unsloth patches these classes)."""
    if method == "opsd":
        return trl_sdft().SDFTTrainer
    if method == "grpo":
        from trl import GRPOTrainer

        return GRPOTrainer
    from trl import DPOTrainer, SFTTrainer

    return DPOTrainer if method == "dpo" else SFTTrainer


def trainer_args_problems(section) -> list[str]:
    """One line per ``finetune.trainer_args`` key that cannot be passed to TRL's config for ``section.method``.

    Imports TRL's configs (~5 s, transformers and torch), so it runs in ``finetune`` before any model loads and
    in preflight, not at every params load (which checks the suite's own and suite-set keys without TRL).
    """
    from dataclasses import fields

    if not section.trainer_args:
        return []
    cls = config_class(section.method)
    known = {f.name for f in fields(cls)}
    unknown = f"not a setting of TRL's {cls.__name__} (finetune.method: {section.method})"
    problems = {
        key: reserved_trainer_arg(key, section.method) or (None if key in known else unknown)
        for key in section.trainer_args
    }
    return [f"finetune.trainer_args.{key}: {problem}" for key, problem in problems.items() if problem]


def trainer_config_problems(section, where: str | None = None) -> list[str]:
    """What TRL's own config class for ``section.method`` rejects in params ``finetune`` (names, then values), as
    one line each: preflight builds the config the stage will build, before any work. The precision flags are
    the stage's own decision on its device, not a setting, so the config is built as on a CPU in fp32."""
    import os
    import tempfile

    problems = trainer_args_problems(section)
    if problems:
        return problems
    environment = dict(os.environ)  # TrainingArguments sets variables that the stages' processes would inherit
    with tempfile.TemporaryDirectory() as work_dir:
        try:
            trainer_config(section, Path(work_dir), 0, cuda=False, bf16=False, where=where)
        except StageError as exc:
            return [str(exc)]
        finally:
            os.environ.clear()
            os.environ.update(environment)
    return []


def trainer_config(
    section, work_dir: Path, seed: int, *, cuda: bool, bf16: bool, where: str | None = None, report=None, **extra
):
    """SFTConfig, DPOConfig, SDFTConfig or GRPOConfig from params ``finetune``: its TRL-named fields (for OPSD and
    GRPO also those of ``finetune.opsd`` / ``finetune.grpo``), ``trainer_args``, what the suite sets.

    ``report``: TRL's tracking settings (``tracking.trainer_report``: report_to, run_name, project); none: no
    tracking. ``extra`` are the backend's defaults (Unsloth: ``optim``), which ``trainer_args`` may replace. TRL checks
    the values; what it rejects becomes one line naming ``finetune.trainer_args`` (and ``where``, the params file).
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched (accelerate launch): every LoRA weight takes part in every step, so DDP need not search the
        # graph for unused ones (transformers' default for a PEFT model), which also breaks with checkpointing.
        extra = {"ddp_find_unused_parameters": False, **extra}
    cls = config_class(section.method)
    common = {name: getattr(section, name) for name in TRL_FIELDS}
    if section.loss_type is not None:
        common["loss_type"] = section.loss_type
    if section.method == "dpo":
        common["beta"] = section.beta
    elif section.method == "opsd":
        del common["max_length"]  # SDFT's lengths: opsd.max_prompt_length and opsd.max_completion_length
        common.update({name: getattr(section.opsd, name) for name in OPSD_TRL_FIELDS})
    elif section.method == "grpo":
        # GRPOConfig has no max_length (TRL 1.14: prompts are not cut; completions stop at max_completion_length);
        # finetune.max_length stays Unsloth's max_seq_length. beta: the KL coefficient (0: no reference forward).
        del common["max_length"]
        common["beta"] = section.beta
        common.update({name: getattr(section.grpo, name) for name in GRPO_TRL_FIELDS})
        extra = {"remove_unused_columns": False, **extra}  # question ids reach the reward function
    else:
        common["completion_only_loss"] = True  # loss on the answer, not on the question
    try:
        return cls(
            **common,
            **{**extra, **section.trainer_args},
            output_dir=str(work_dir),
            bf16=bf16,
            fp16=cuda and not bf16,
            use_cpu=not cuda,
            logging_steps=1,
            save_strategy="no",
            **(report or {"report_to": "none"}),
            seed=seed,
            data_seed=seed,
        )
    except (ValueError, TypeError) as exc:
        key = "finetune.trainer_args" if section.trainer_args else "finetune"
        raise StageError(
            f"{where + ': ' if where else ''}{key}: TRL's {cls.__name__} rejected it: {' '.join(str(exc).split())}"
        ) from None


def train_bf16(cuda: bool) -> bool:
    """Train in bf16 autocast where the hardware computes bf16 natively (``models.training_autocast``: GPUs from
    Ampere, CPUs with AVX512-BF16/AMX); else fp16 on a GPU (a T4) and fp32 on a CPU (AVX2: emulated bf16 steps
    are slower than fp32 ones)."""
    return models.training_autocast("cuda" if cuda else "cpu")[0] == "bfloat16"


def memory_stats(label: str) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    stats = {
        f"{label}_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "gpu": props.name,
        "gpu_total_gb": round(props.total_memory / 2**30, 3),
    }
    print(f"[{label}] GPU {props.name}: {stats[f'{label}_reserved_gb']} of {stats['gpu_total_gb']} GB reserved")
    return stats


def save_merged(merged, tokenizer, out_dir: Path) -> None:
    size = sum(p.numel() * p.element_size() for p in merged.parameters())

    def save(tmp):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_model(out_dir, size, save)


def save_model(out_dir: Path, weight_bytes: int, save) -> None:
    """``save(folder)`` into ``out_dir`` atomically, after checking the disk can hold it (tokenizer: +10%)."""
    what = f"finetune: saving the model to {out_dir}"
    check_free_space(Path(out_dir).parent, int(weight_bytes * 1.1) + (50 << 20), what)
    try:
        with atomic_dir(out_dir) as tmp:
            save(tmp)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StageError(f"{what}: no space left on the device ({exc.strerror})") from None
        raise
