"""Stage 4: fine-tune the latest model on its own winning responses (paper, section 3.4).

Unsloth (LoRA on a 4- or 16-bit base, in a worker process) when CUDA and unsloth are present, TRL + PEFT
LoRA otherwise; SFT on the winners (the paper) or DPO on the pairs (``finetune.method``). Either way the
adapter is merged and the result saved as a plain model folder, which the next iteration, lm-eval and any
other loader read without knowing how it was trained.
"""

from __future__ import annotations

import errno
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from sedir_utils.core import children, models
from sedir_utils.core.config import build_section
from sedir_utils.core.io import StageError, atomic_dir, check_free_space, read_json, read_jsonl, write_json, write_jsonl
from sedir_utils.core.models import load_causal_lm, load_tokenizer, resolve_model, torch_dtype
from sedir_utils.core.params import (
    ACCELERATE_CONFIGS,
    ACCELERATE_CONFIGS_DIR,
    OPSD_TRL_FIELDS,
    TRL_FIELDS,
    FinetuneParams,
    reserved_trainer_arg,
)
from sedir_utils.share.cards import write_model_card
from sedir_utils.share.publish import save_iteration
from sedir_utils.share.tracking import trainer_environment, trainer_report
from sedir_utils.stages.finetune.opsd import before_after, trl_sdft
from sedir_utils.stages.finetune.selection import select_samples, write_training_data

# Timings differ run to run; they stay out of the training log so the same seed gives the same file.
_TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def training_layout(section) -> str | None:
    """The accelerate config several training processes use (None: one process)."""
    return section.distributed if section.num_processes > 1 else None


def select_backend(
    requested: str, *, cuda: bool | None = None, unsloth: bool | None = None, distributed: str | None = None
) -> tuple[str, str]:
    """Pick ``unsloth`` or ``trl`` (TRL + PEFT LoRA) and say why; ``requested`` is params ``finetune.backend``,
    ``distributed`` the accelerate config when several processes train (Unsloth's documented path is ddp)."""
    if distributed not in (None, "ddp") and requested == "auto":
        return "trl", f"finetune.distributed {distributed}: TRL (Unsloth's documented multi-GPU path is ddp)"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if unsloth is None:
        unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "trl":
        return "trl", "params ask for trl"
    if cuda and unsloth:
        return "unsloth", "CUDA and unsloth are both present"
    why = "no CUDA device" if not cuda else "unsloth is not installed (pip install -e '.[gpu]')"
    if requested == "unsloth":
        raise StageError(f"finetune.backend: 'unsloth' was asked for, but {why}")
    return "trl", f"unsloth skipped: {why}; using trl"


FIELDS = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "opsd": ("prompt", "privileged_context"),  # TRL's SDFT columns; the context reaches the teacher only
}


def _dataset(rows: list[dict], method: str):
    from datasets import Dataset

    if not rows:
        raise StageError("finetune: no training samples (the reward stage kept no pairs)")
    return Dataset.from_list([{k: r[k] for k in FIELDS[method]} for r in rows])


def _config_class(method: str):
    if method == "opsd":
        return trl_sdft().SDFTConfig
    from trl import DPOConfig, SFTConfig

    return DPOConfig if method == "dpo" else SFTConfig


def _trainer_class(method: str):
    """TRL's trainer for the method (under Unsloth, import it after ``unsloth``: Unsloth patches these classes)."""
    if method == "opsd":
        return trl_sdft().SDFTTrainer
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
    cls = _config_class(section.method)
    known = {f.name for f in fields(cls)}
    unknown = f"not a setting of TRL's {cls.__name__} (finetune.method: {section.method})"
    problems = {key: reserved_trainer_arg(key) or (None if key in known else unknown) for key in section.trainer_args}
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
            _train_config(section, Path(work_dir), 0, cuda=False, bf16=False, where=where)
        except StageError as exc:
            return [str(exc)]
        finally:
            os.environ.clear()
            os.environ.update(environment)
    return []


def _train_config(
    section, work_dir: Path, seed: int, *, cuda: bool, bf16: bool, where: str | None = None, report=None, **extra
):
    """SFTConfig, DPOConfig or SDFTConfig from params ``finetune``: its TRL-named fields (for OPSD also those of
    ``finetune.opsd``), ``trainer_args``, what the suite sets.

    ``report``: TRL's tracking settings (``tracking.trainer_report``: report_to, run_name, project); none: no
    tracking. ``extra`` are the backend's defaults (Unsloth: ``optim``), which ``trainer_args`` may replace. TRL checks
    the values; what it rejects becomes one line naming ``finetune.trainer_args`` (and ``where``, the params file).
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched (accelerate launch): every LoRA weight takes part in every step, so DDP need not search the
        # graph for unused ones (transformers' default for a PEFT model), which also breaks with checkpointing.
        extra = {"ddp_find_unused_parameters": False, **extra}
    cls = _config_class(section.method)
    common = {name: getattr(section, name) for name in TRL_FIELDS}
    if section.loss_type is not None:
        common["loss_type"] = section.loss_type
    if section.method == "dpo":
        common["beta"] = section.beta
    elif section.method == "opsd":
        del common["max_length"]  # SDFT's lengths: opsd.max_prompt_length and opsd.max_completion_length
        common.update({name: getattr(section.opsd, name) for name in OPSD_TRL_FIELDS})
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
    """Train in bf16 autocast where the hardware computes bf16 natively (``models.dtype_decision``: GPUs from
    Ampere, CPUs with AVX512-BF16/AMX); else fp16 on a GPU (a T4) and fp32 on a CPU (AVX2: emulated bf16 steps
    are slower than fp32 ones)."""
    return models.training_autocast("cuda" if cuda else "cpu")[0] == "bfloat16"


def _memory_stats(label: str) -> dict:
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


def _train_trl(
    base_path: str,
    dataset,
    section,
    work_dir: Path,
    seed: int,
    out_dir: Path,
    where: str | None = None,
    callbacks=None,
    report=None,
):
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    cuda = torch.cuda.is_available()
    args = _train_config(section, work_dir, seed, cuda=cuda, bf16=train_bf16(cuda), where=where, report=report)
    # LoRA's A matrices are drawn when the trainer wraps the model, before Trainer seeds anything:
    # seed first, or two runs with the same params train different adapters.
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lora = LoraConfig(**dataclasses.asdict(section.lora), task_type="CAUSAL_LM")  # PEFT's names already
    # DPO with a LoRA adapter and no ref_model: the reference is the same weights with the adapter off; so is
    # OPSD's teacher of kind "base" (TRL runs it with the adapter disabled).
    trainer = _trainer_class(section.method)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=callbacks
    )
    memory = _memory_stats("before")
    trainer.train()
    memory.update(_memory_stats("after"))
    if trainer.accelerator.num_processes > 1:
        # Launched: every process joins save_model (under ZeRO-3 or FSDP it gathers the sharded adapter), the
        # main one writes it; the stage's own process merges it once the launch has ended (merge_adapter).
        trainer.save_model(str(work_dir / "adapter"))
        return trainer.state.log_history, memory
    _save_merged(trainer.model.merge_and_unload(), tokenizer, out_dir)
    return trainer.state.log_history, memory


def merge_adapter(base_path: str, adapter: Path, out_dir: Path) -> None:
    """Merge a LoRA adapter saved by launched trainers into its base model, on the CPU in this process (outside
    the launched ones, where a ZeRO-3 setting would partition the base as it loads), and save the folder."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    _save_merged(merged, tokenizer, out_dir)
    shutil.rmtree(adapter, ignore_errors=True)


def _save_merged(merged, tokenizer, out_dir: Path) -> None:
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


def unsloth_load_args(base_path: str, section) -> dict:
    """``FastLanguageModel.from_pretrained`` arguments: the dtype decided by compute capability (fp16 on a T4),
    4-bit or 16-bit LoRA base, the training length."""
    return dict(
        model_name=base_path,
        max_seq_length=section.max_length,
        dtype=torch_dtype("auto", "cuda"),
        load_in_4bit=section.load_in_4bit,
        load_in_16bit=not section.load_in_4bit,
    )


def unsloth_peft_args(section, seed: int) -> dict:
    """``FastLanguageModel.get_peft_model`` arguments from params ``finetune.lora`` (PEFT's names already)."""
    import dataclasses

    return dict(
        **dataclasses.asdict(section.lora),
        bias="none",
        use_gradient_checkpointing="unsloth" if section.gradient_checkpointing else False,
        random_state=seed,
    )


def _train_unsloth(base_path: str, dataset, section, work_dir: Path, seed: int, out_dir: Path, report=None):
    """Unsloth LoRA training; runs in its own process (``_train_in_worker``). unsloth is imported before trl."""
    import unsloth  # noqa: F401  (patches TRL's trainers, SDFT's included: unsloth/models/rl.py)
    from unsloth import FastLanguageModel, PatchDPOTrainer

    if section.method == "dpo":
        PatchDPOTrainer()

    model, tokenizer = FastLanguageModel.from_pretrained(**unsloth_load_args(base_path, section))
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_args(section, seed))
    args = _train_config(section, work_dir, seed, cuda=True, bf16=train_bf16(True), report=report, optim="adamw_8bit")
    trainer_cls = _trainer_class(section.method)  # imported after unsloth: its patched class
    if section.method == "dpo":
        trainer = trainer_cls(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:  # Unsloth's patched trainers ignore peft_config: the LoRA adapter is already on (get_peft_model)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    memory = _memory_stats("before")
    trainer.train()
    memory.update(_memory_stats("after"))
    size = 2 * model.num_parameters()  # merged_16bit: two bytes a weight (counts 4-bit weights unpacked)
    if trainer.accelerator.is_main_process:  # under DDP (accelerate launch) every process holds the same weights
        save_model(
            out_dir, size, lambda tmp: model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
        )
    trainer.accelerator.wait_for_everyone()
    return trainer.state.log_history, memory


# What the worker process runs for ``backend: unsloth`` ("module:function"; the tests point it at a stand-in).
UNSLOTH_TRAINER = "sedir_utils.stages.finetune.stage:_train_unsloth"
TRL_TRAINER = "sedir_utils.stages.finetune.stage:_train_trl"


def accelerate_config(section) -> Path:
    """The accelerate config file ``finetune.distributed`` names: one the suite ships, or the user's own."""
    if section.distributed in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS_DIR / f"{section.distributed}.yaml"
    return Path(section.distributed).expanduser()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(section, *, cuda: bool, port: int | None = None) -> list[str]:
    """How the stage starts ``finetune.num_processes`` trainers: ``accelerate launch`` with the config, the
    process count, the mixed precision the trainer uses (``train_bf16``: bf16, else fp16 on a GPU and none on a
    CPU) and, with a config the suite ships (one machine), a free rendezvous port, so that two runs on one
    machine do not collide.
    The spec file's path follows. Without a GPU the processes train on the CPU and talk through gloo."""
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(section))]
    command += [
        "--num_processes",
        str(section.num_processes),
        "--mixed_precision",
        "bf16" if train_bf16(cuda) else ("fp16" if cuda else "no"),
    ]
    if section.distributed in ACCELERATE_CONFIGS:
        command += ["--main_process_port", str(port or _free_port())]
    if not cuda:  # the configs are for GPUs; accelerate would give each CPU process one thread
        import torch

        command += ["--num_cpu_threads_per_process", str(max(1, torch.get_num_threads() // section.num_processes))]
    return command + ["-m", "sedir_utils.stages.finetune.stage"]


def _train_in_worker(
    base_path: str,
    rows: list[dict],
    section,
    work_dir: Path,
    seed: int,
    out_dir: Path,
    report=None,
    *,
    target: str | None = None,
    launcher: list[str] | None = None,
):
    """Train in child processes, relaying their output; returns (log history, memory figures).

    ``launcher``: the command that starts them (default: one Python process; ``launch_command``: ``accelerate
    launch`` with ``finetune.num_processes``), which runs ``target`` ("module:function", default Unsloth's).

    Unsloth always trains in a child: importing Unsloth replaces the forward of transformers' Llama/Qwen2
    models process-wide, and its forward does not fill a cache passed to it: the cells after training (which
    load the saved model and sample from it with the suite's engine) and every later stage in the same kernel
    would break. In a child process the caller's interpreter never sees the patches, and the GPU memory of
    training is released when the child exits.
    """
    import codecs
    import dataclasses
    import subprocess
    import sys

    work_dir.mkdir(parents=True, exist_ok=True)
    spec, result = work_dir / "worker_spec.json", work_dir / "worker_result.json"
    result.unlink(missing_ok=True)
    write_json(
        spec,
        {
            "target": target or UNSLOTH_TRAINER,
            "base_path": base_path,
            "rows": rows,
            "seed": seed,
            "section": dataclasses.asdict(section),
            "work_dir": str(work_dir),
            "out_dir": str(out_dir),
            "result": str(result),
            "method": section.method,
            "report": report,
            "launched": launcher is not None,
        },
    )
    command = (launcher or [sys.executable, "-m", "sedir_utils.stages.finetune.stage"]) + [str(spec)]
    if launcher:
        print("training processes: " + " ".join(command))
    proc = children.start(command, stdout=subprocess.PIPE, env=children.environment())
    decoder, tail = codecs.getincrementaldecoder("utf-8")("replace"), ""  # tail: for the error's one line
    try:
        for raw in iter(lambda: proc.stdout.read1(4096), b""):
            text = decoder.decode(raw)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-4000:]
        code = proc.wait()
    finally:
        children.stop(proc)  # interrupted: it stops, and its children (accelerate's trainers) with it
        spec.unlink(missing_ok=True)  # it holds every training row: no second copy stays behind
    try:
        if code != 0 or not result.is_file():
            what = "the training processes (accelerate launch)" if launcher else "the Unsloth training process"
            raise StageError(f"finetune: {what} failed (exit {code}): {children.last_line(tail)}")
        out = read_json(result)
    finally:
        result.unlink(missing_ok=True)
    return out["history"], out["memory"]


def _worker_main(spec_path: str) -> None:
    """A child process of ``_train_in_worker``: rebuild the inputs, train, write the result (the main process
    only, when ``accelerate launch`` started several)."""
    import importlib
    import os

    spec = read_json(spec_path)
    section = build_section(FinetuneParams, spec["section"], "finetune.", spec_path)
    module, _, name = spec["target"].partition(":")
    train = getattr(importlib.import_module(module), name)
    history, memory = train(
        spec["base_path"],
        _dataset(spec["rows"], spec["method"]),
        section,
        Path(spec["work_dir"]),
        spec["seed"],
        Path(spec["out_dir"]),
        report=spec.get("report"),
    )
    if not spec.get("launched") or int(os.environ.get("RANK", "0")) == 0:  # launched: the main process writes
        write_json(spec["result"], {"history": history, "memory": memory})


def finetune(
    base_path: str,
    rows: list[dict],
    section,
    *,
    out_dir: str | Path,
    log_path: str | Path,
    seed: int,
    where: str | None = None,
    backend: tuple[str, str] | None = None,
    callbacks: list | None = None,
    report: dict | None = None,
) -> dict:
    """Train on ``rows`` (SFT: prompt/completion; DPO: prompt/chosen/rejected; OPSD: prompt/privileged_context),
    save the merged model. ``callbacks``: transformers ``TrainerCallback``s for TRL's trainer (TRL backend);
    ``report``: TRL's tracking settings (``tracking.trainer_report``).

    Returns a summary: backend and why, samples, steps, first and last logged loss (no timings: the same
    params and seed give the same file; the run manifest records each stage's time). ``where``: the params
    file, for errors. ``backend``: (name, why) when already chosen (``plan``), else chosen here.
    """
    problems = trainer_args_problems(section)  # before any model loads
    if problems:
        raise StageError(f"{where + ': ' if where else ''}{problems[0]}")
    backend, reason = backend or select_backend(section.backend, distributed=training_layout(section))
    layout = f", {section.num_processes} processes ({section.distributed})" if section.num_processes > 1 else ""
    print(f"fine-tuning: {section.method.upper()} with {backend} ({reason}){layout}")
    dataset = _dataset(rows, section.method)
    out_dir = Path(out_dir)
    work_dir = out_dir.parent / ".trainer"
    start = time.time()
    if section.num_processes > 1:
        import torch

        target = UNSLOTH_TRAINER if backend == "unsloth" else TRL_TRAINER
        launcher = launch_command(section, cuda=torch.cuda.is_available())
        history, memory = _train_in_worker(
            base_path, rows, section, work_dir, seed, out_dir, report, target=target, launcher=launcher
        )
        if backend == "trl":
            merge_adapter(base_path, work_dir / "adapter", out_dir)
    elif backend == "unsloth":
        history, memory = _train_in_worker(base_path, rows, section, work_dir, seed, out_dir, report)
    else:
        history, memory = _train_trl(base_path, dataset, section, work_dir, seed, out_dir, where, callbacks, report)
    print(f"trained in {time.time() - start:.1f} s")  # timings stay out of the files (the manifest has each stage's)
    history = [{k: v for k, v in h.items() if k not in _TIMING_KEYS} for h in history]
    write_jsonl(log_path, history)
    steps = [h for h in history if "loss" in h]
    summary = {
        "backend": backend,
        "reason": reason,
        "method": section.method,
        "samples": len(rows),
        "steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        **memory,
    }
    if section.num_processes > 1:
        summary.update(processes=section.num_processes, distributed=section.distributed)
    if section.method == "dpo" and steps:
        summary.update(first_margin=steps[0].get("rewards/margins"), last_margin=steps[-1].get("rewards/margins"))
    if section.method == "opsd" and steps:  # per-token divergence between student and teacher, as TRL logs it
        key = "sdft/distillation_loss"
        summary.update(first_divergence=steps[0].get(key), last_divergence=steps[-1].get(key))
    return summary


def completion_loss(model, tokenizer, rows: list[dict], max_length: int = 1024) -> float:
    """Mean negative log-likelihood of the completions given their prompts (the SFT objective)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in rows:
        prefix = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) <= len(p_ids):
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : len(ids) - 1], dim=-1)
        targets = torch.tensor(ids[len(p_ids) :], device=device)
        total += -logp.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return total / max(count, 1)


def loss_before_after(
    start_path: str, model, tokenizer, rows: list[dict], dtype: str, limit: int = 16
) -> tuple[float, float]:
    """Mean completion loss on (up to ``limit`` of) the winners: under the start model, and under ``model``."""
    sample = rows[:limit]
    before = completion_loss(load_causal_lm(start_path, dtype), load_tokenizer(start_path), sample)
    return before, completion_loss(model, tokenizer, sample)


def training_rows(params, paths) -> tuple[str, list[dict], str]:
    """What this iteration trains: (start model, rows, label of the start model).

    ``start_from: latest`` (the paper): iteration k-1's model on iteration k's winners.
    ``start_from: base`` (ReST-EM-style ablation): the base model on the winners of iterations 1..k.
    """
    section = params.finetune
    base = resolve_model(params.model.name)

    def rows_of(k):
        p = paths.of(k)
        return select_samples(read_jsonl(getattr(p, section.method)), section.max_samples)

    if section.start_from == "base":
        rows = [row for k in range(1, paths.iteration + 1) for row in rows_of(k)]
        return base, rows, params.model.name
    return paths.policy_model(base), rows_of(paths.iteration), paths.model_label(paths.iteration - 1, params.model.name)


@dataclass
class Plan:
    """What this iteration's fine-tune will do, decided once (notebook 04 shows it, ``run`` carries it out)."""

    method: str
    backend: str
    reason: str
    start: str  # the model trained from
    start_label: str
    rows: list[dict]

    def __str__(self) -> str:
        return (
            f"{self.method.upper()} with {self.backend} ({self.reason}), from {self.start_label}, "
            f"on {len(self.rows)} samples"
        )


def plan(params, paths) -> Plan:
    """Select this iteration's training data by the arm's rule (writes ``sft.jsonl``, ``dpo.jsonl``,
    ``opsd.jsonl``, ``selection.json``: sedir_utils/stages/finetune/selection.py) and save the iteration's rows as
    datasets (``dataset/``: sedir_utils/share/publish.py), then decide the start model and the backend."""
    write_training_data(params, paths)
    save_iteration(params.to_dict(), paths)  # the iteration's rows as datasets, with a card
    start, rows, label = training_rows(params, paths)
    backend, reason = select_backend(params.finetune.backend, distributed=training_layout(params.finetune))
    return Plan(params.finetune.method, backend, reason, start, label, rows)


def run(params, paths, planned: Plan | None = None) -> dict:
    """The stage as the notebook runs it: train, save ``model/`` (with its card), ``training_log.jsonl``,
    ``finetune.json``."""
    planned = planned or plan(params, paths)
    with trainer_environment(params, paths):
        info = finetune(
            planned.start,
            planned.rows,
            params.finetune,
            out_dir=paths.model,
            log_path=paths.training_log,
            seed=params.seed_for(paths.iteration),
            where=params.source,
            backend=(planned.backend, planned.reason),
            report=trainer_report(params, paths),
        )
    info.update(base_model=planned.start_label, start_from=params.finetune.start_from)
    if params.finetune.method == "opsd":
        info["opsd_probe"] = before_after(
            planned.start, str(paths.model), planned.rows, params.finetune.opsd, params.model.dtype, params.seed
        )
    write_model_card(params.to_dict(), paths, info)  # the eval stage adds its scores
    write_json(paths.finetune_info, info)  # last: its presence marks the stage done
    return info


if __name__ == "__main__":  # the Unsloth worker process (see ``_train_in_worker``)
    import sys

    _worker_main(sys.argv[1])
