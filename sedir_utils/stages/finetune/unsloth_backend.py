"""``finetune.backend: unsloth``: Unsloth's LoRA on a 4- or 16-bit base, always in a worker process
(sedir_utils/stages/finetune/launch.py), saved merged in 16 bits."""

from __future__ import annotations

from pathlib import Path

from sedir_utils.core.models import torch_dtype
from sedir_utils.stages.finetune import methods
from sedir_utils.stages.finetune.grpo import group_reward
from sedir_utils.stages.finetune.methods import save_model, train_bf16


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


def unsloth_grpo_args(section) -> dict:
    """``from_pretrained``'s extra arguments for GRPO: vLLM inside Unsloth (``fast_inference``) where
    ``finetune.grpo.use_vllm`` asks for it (preflight refuses it where vllm is not installed), sized by the LoRA
    rank and the memory share."""
    if not section.grpo.use_vllm:
        return {}
    return dict(
        fast_inference=True,
        max_lora_rank=section.lora.r,
        gpu_memory_utilization=section.grpo.vllm_gpu_memory_utilization,
    )


def train_unsloth(
    base_path: str, dataset, section, work_dir: Path, seed: int, out_dir: Path, report=None, rewards=None
):
    """Unsloth LoRA training; runs in its own process (``train_in_worker``). unsloth is imported before trl."""
    import unsloth  # noqa: F401  (patches TRL's trainers, SDFT's and GRPO's included: unsloth/models/rl.py)
    from unsloth import FastLanguageModel, PatchDPOTrainer

    if section.method == "dpo":
        PatchDPOTrainer()
    if section.method == "grpo" and hasattr(unsloth, "PatchFastRL"):  # older Unsloth patches GRPO on request
        unsloth.PatchFastRL("GRPO", FastLanguageModel)

    extra = unsloth_grpo_args(section) if section.method == "grpo" else {}
    model, tokenizer = FastLanguageModel.from_pretrained(**unsloth_load_args(base_path, section), **extra)
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_args(section, seed))
    args = methods.trainer_config(
        section, work_dir, seed, cuda=True, bf16=train_bf16(True), report=report, optim="adamw_8bit"
    )
    trainer_cls = methods.trainer_class(section.method)  # imported after unsloth: its patched class
    if section.method == "dpo":
        trainer = trainer_cls(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    elif section.method == "grpo":
        reward = group_reward(rewards, section, base_path, "cuda")
        trainer = trainer_cls(
            model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer
        )
        reward.bind(trainer.model, tokenizer)
    else:  # Unsloth's patched trainers ignore peft_config: the LoRA adapter is already on (get_peft_model)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    memory = methods.memory_stats("before")
    trainer.train()
    memory.update(methods.memory_stats("after"))
    size = 2 * model.num_parameters()  # merged_16bit: two bytes a weight (counts 4-bit weights unpacked)
    if trainer.accelerator.is_main_process:  # under DDP (accelerate launch) every process holds the same weights
        save_model(
            out_dir, size, lambda tmp: model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
        )
    trainer.accelerator.wait_for_everyone()
    return trainer.state.log_history, memory
