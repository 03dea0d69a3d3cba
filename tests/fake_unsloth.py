"""A stand-in for Unsloth where there is no GPU: it replaces transformers' Llama forward process-wide the way
Unsloth does (the cache it is given is never filled, and none is returned), then trains with TRL. Used by
tests/test_gpu_decisions.py as the worker process's trainer (``launch.UNSLOTH_TRAINER``)."""

from __future__ import annotations


def patch_like_unsloth(set_attribute=setattr) -> None:
    from transformers.models.llama.modeling_llama import LlamaModel

    original = LlamaModel.forward

    def forward(self, *args, past_key_values=None, use_cache=None, **kwargs):
        return original(self, *args, past_key_values=None, use_cache=False, **kwargs)

    set_attribute(LlamaModel, "forward", forward)


def train(base_path, dataset, section, work_dir, seed, out_dir, report=None):
    from sedir_utils.stages.finetune.trl_backend import train_trl

    patch_like_unsloth()
    (work_dir / "patched_in_worker").write_text("LlamaModel.forward was replaced in the worker process\n")
    return train_trl(base_path, dataset, section, work_dir, seed, out_dir, report=report)


def fail(*args, **kwargs):
    raise RuntimeError("out of GPU memory (posed)")
