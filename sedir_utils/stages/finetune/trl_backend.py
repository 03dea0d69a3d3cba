"""``finetune.backend: trl``: TRL + PEFT LoRA in this process (or in each process ``accelerate launch``
starts), then the adapter merged into the base model."""

from __future__ import annotations

from pathlib import Path

from sedir_utils.stages.finetune import methods
from sedir_utils.stages.finetune.grpo import group_reward
from sedir_utils.stages.finetune.methods import save_merged, train_bf16


def train_trl(
    base_path: str,
    dataset,
    section,
    work_dir: Path,
    seed: int,
    out_dir: Path,
    where: str | None = None,
    callbacks=None,
    report=None,
    rewards: dict | None = None,
):
    """Train with TRL; ``rewards``: GRPO's reward (``grpo.reward_spec``), for ``finetune.method: grpo`` only."""
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    cuda = torch.cuda.is_available()
    args = methods.trainer_config(section, work_dir, seed, cuda=cuda, bf16=train_bf16(cuda), where=where, report=report)
    # LoRA's A matrices are drawn when the trainer wraps the model, before Trainer seeds anything:
    # seed first, or two runs with the same params train different adapters.
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lora = LoraConfig(**dataclasses.asdict(section.lora), task_type="CAUSAL_LM")  # PEFT's names already
    # DPO with a LoRA adapter and no ref_model: the reference is the same weights with the adapter off; so is
    # OPSD's teacher of kind "base" (TRL runs it with the adapter disabled).
    kwargs = {}
    if section.method == "grpo":
        reward = group_reward(rewards, section, base_path, "cuda" if cuda else "cpu")
        kwargs["reward_funcs"] = [reward]
    trainer = methods.trainer_class(section.method)(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
        **kwargs,
    )
    if section.method == "grpo":
        reward.bind(trainer.model, tokenizer)  # self-certainty and the judge read the policy as it trains
    memory = methods.memory_stats("before")
    trainer.train()
    memory.update(methods.memory_stats("after"))
    if trainer.accelerator.num_processes > 1:
        # Launched: every process joins save_model (under ZeRO-3 or FSDP it gathers the sharded adapter), the
        # main one writes it; the stage's own process merges it once the launch has ended (merge_adapter).
        trainer.save_model(str(work_dir / "adapter"))
        return trainer.state.log_history, memory
    save_merged(trainer.model.merge_and_unload(), tokenizer, out_dir)
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
    save_merged(merged, tokenizer, out_dir)
    shutil.rmtree(adapter, ignore_errors=True)
