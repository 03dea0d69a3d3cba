"""GPU smoke suite: every stage on CUDA with a tiny random model (skipped without CUDA; ``make gpu-smoke``).

The model is a randomly initialised Qwen2 (the architecture of the paper's Qwen2.5) with the embedded
model's tokenizer, built so that it ends a turn often (see ``tiny_policy``): questions and answers then
finish, the reward stage can pair them, and every stage has rows to work on. It runs Unsloth 16-bit and
4-bit LoRA SFT (and DPO), transformers' generate on CUDA, lm-eval's HF backend, the reward-model scorer, a
worker process and a launched trainer on the one GPU (scaling out), and, where vllm is installed, vLLM
sampling and lm-eval's vLLM backend. ``tools/gpu_smoke.sh`` runs it on a
bare CUDA machine from carried wheels (docs/gpu-and-colab.md, "GPU smoke suite").
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU smoke suite needs one)"),
]

needs_unsloth = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def smoke_params(tmp_path: Path, model: str, reward_model: str, **sections) -> Path:
    """A params file for the tiny model: small sizes, filters that random text can pass."""
    import yaml

    data = {
        "run_name": "gpu-smoke",
        "seed": 0,
        "iterations": 1,
        "model": {"name": model, "dtype": "auto"},
        "questions": {
            "num_questions": 8,
            "max_rounds": 3,
            "temperature": 1.0,
            "max_new_tokens": 48,
            "min_chars": 1,
            "batch_size": 16,
            "require_request": False,
            "drop_self_answers": False,
            "embedder": "none",
            "decontaminate": False,
            "dedup_history": False,
        },
        "responses": {"num_responses": 3, "max_new_tokens": 64, "batch_size": 16},
        "reward": {
            "scorers": ["reward_model", "self_certainty"],
            "reward_model": reward_model,
            "batch_size": 8,
            "max_length": 256,
        },
        "audit": {"enabled": False},
        "finetune": {
            "method": "sft",
            "max_samples": 16,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_length": 256,
            "load_in_4bit": False,
            "learning_rate": 1e-3,
        },
        "eval": {
            "tasks": ["gpqa_local", "gpqa_local_cot"],
            "limit": 8,
            "max_gen_toks": 32,
            "batch_size": 8,
            "bootstrap": 100,
        },
    }
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dtype_follows_compute_capability():
    from sedir_utils.core.models import cuda_bf16, resolve_dtype

    major, minor = torch.cuda.get_device_capability(0)
    print(f"{torch.cuda.get_device_name(0)}: compute capability {major}.{minor}")
    assert cuda_bf16() == ((major, minor) >= (8, 0))
    assert resolve_dtype("auto", "cuda") == ("bfloat16" if major >= 8 else "float16")


def test_preflight_passes_on_this_machine(tmp_path, tiny_policy, tiny_reward_model):
    """The checks the runner makes before any work see this GPU and what is installed here."""
    from sedir_utils.run import preflight
    from sedir_utils.run.params import load_params

    backend = "unsloth" if importlib.util.find_spec("unsloth") else "trl"
    params = load_params(
        smoke_params(tmp_path, tiny_policy, tiny_reward_model, finetune={"backend": backend}, reward={"device": "cuda"})
    )
    env = preflight.Environment.here(preflight.hub_ids(params))
    assert env.cuda
    assert preflight.problems(params, env) == []


def test_hf_backend_on_cuda_matches_greedy_without_cache(tiny_random):
    """On a GPU without vLLM, sampling is transformers' ``generate`` (the CPU engine is CPU-only): fp32,
    greedy, batches of 3 left-padded prompts of different lengths, against the definition: the argmax of a
    full forward pass over the whole text so far, one prompt at a time, no cache."""
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.engine.backends import choose
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams, end_of_turn_ids

    model, tokenizer = load_causal_lm(tiny_random, "float32", "cuda"), load_tokenizer(tiny_random)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question {i}: " + "why " * i}], tokenize=False, add_generation_prompt=True
        )
        for i in range(8)
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    reference = []
    with torch.inference_mode():
        for ids in encoded:
            text = list(ids)
            for _ in range(12):
                text.append(int(model(torch.tensor([text], device="cuda")).logits[0, -1].argmax()))
            reference.append(text[len(ids) :])
    assert choose("auto")[0].name in ("transformers", "vllm")
    stop = end_of_turn_ids(tokenizer, model)
    cut = [ref[: next((k for k, t in enumerate(ref) if t in stop), len(ref))] for ref in reference]
    got = generate(model, tokenizer, prompts, SamplingParams(temperature=0.0, max_new_tokens=12), 3, seed=0)
    same = sum(
        g.text == tokenizer.decode(c, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for g, c in zip(got, cut)
    )
    assert same >= 7, f"hf generate and the reference agree on {same} of 8 prompts"


def test_reward_model_scorer_on_cuda(tiny_reward_model):
    from sedir_utils.core.models import load_reward_model
    from sedir_utils.engine.scorers.reward_model import reward_model_scores

    model, tokenizer = load_reward_model(tiny_reward_model, "auto", "cuda")
    assert next(model.parameters()).device.type == "cuda"
    rows = [{"question": f"What is {i} + {i}?", "response": f"It is {2 * i}.\nFinal answer: {2 * i}"} for i in range(5)]
    scored, _ = reward_model_scores(model, tokenizer, rows, batch_size=2, max_length=64)
    scores = [r["score"] for r in scored]
    assert len(scores) == 5 and all(isinstance(s, float) and s == s for s in scores)


def _run_stages(params_file: Path, run_dir: Path, stages: list[str], iteration: int = 1):
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.evaluation import stage as evaluation
    from sedir_utils.stages.finetune import stage as finetune
    from sedir_utils.stages.questions import stage as questions
    from sedir_utils.stages.responses import stage as responses
    from sedir_utils.stages.scoring import stage as rewards

    modules = {
        "questions": questions,
        "responses": responses,
        "reward": rewards,
        "finetune": finetune,
        "eval": evaluation,
    }
    params = load_params(params_file)
    paths = RunPaths(run_dir, iteration)
    return {name: modules[name].run(params, paths) for name in stages}


@needs_unsloth
def test_every_stage_on_cuda_with_unsloth_16bit(tmp_path, tiny_policy, tiny_reward_model):
    """Iteration 0 evaluates the base model; iteration 1 runs questions, responses, reward (reward model +
    self-certainty), Unsloth 16-bit LoRA SFT and the evaluation of the merged model."""
    from sedir_utils.core.io import read_json, read_jsonl
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams

    params_file = smoke_params(tmp_path, tiny_policy, tiny_reward_model)
    run_dir = tmp_path / "run"
    _run_stages(params_file, run_dir, ["eval"], iteration=0)
    _run_stages(params_file, run_dir, ["questions", "responses", "reward", "finetune", "eval"])
    paths = RunPaths(run_dir, 1)
    assert len(read_jsonl(paths.questions)) == 8
    assert len(read_jsonl(paths.responses)) == 24
    assert read_jsonl(paths.sft), "the reward stage kept no pairs"
    info = read_json(paths.finetune_info)
    print("finetune.json:", json.dumps(info))
    assert info["backend"] == "unsloth" and info["steps"] >= 1
    # The cells after training, in this same process: load the merged model and sample with the engine.
    model, tokenizer = load_causal_lm(str(paths.model), "auto"), load_tokenizer(str(paths.model))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why?"}], tokenize=False, add_generation_prompt=True
    )
    out = generate(model, tokenizer, [prompt] * 4, SamplingParams(temperature=1.0, max_new_tokens=16), 4, seed=0)
    assert sum(g.num_tokens for g in out) >= 1
    report = read_json(paths.eval)
    assert set(report["tasks"]) == {"gpqa_local", "gpqa_local_cot"}
    print("eval backend:", report["backend"], {t: list(m) for t, m in report["tasks"].items()})


@needs_unsloth
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_unsloth_4bit_lora_trains_and_saves_a_plain_model(tmp_path, tiny_policy, method):
    """4-bit QLoRA (bitsandbytes) through Unsloth, SFT and DPO; the merged 16-bit folder reloads with plain
    transformers, still ends its turn, and the engine samples from it in this process."""
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.finetune import stage as finetune

    params = load_params(
        smoke_params(tmp_path, tiny_policy, tiny_policy, finetune={"load_in_4bit": True, "method": method})
    )
    prompt = [{"role": "user", "content": "What is two plus three?"}]
    rows = [
        {
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": f"Five. {'Why ' * i}"}],
            "chosen": [{"role": "assistant", "content": "Five."}],
            "rejected": [{"role": "assistant", "content": "Train " * (i + 1)}],
        }
        for i in range(8)
    ]
    info = finetune.finetune(
        tiny_policy, rows, params.finetune, out_dir=tmp_path / "model", log_path=tmp_path / "log.jsonl", seed=0
    )
    print(f"{method} 4-bit:", json.dumps(info))
    assert info["backend"] == "unsloth" and info["steps"] >= 1 and info["first_loss"] is not None
    model, tokenizer = load_causal_lm(str(tmp_path / "model"), "auto"), load_tokenizer(str(tmp_path / "model"))
    assert tokenizer.eos_token == load_tokenizer(tiny_policy).eos_token
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = generate(model, tokenizer, [text] * 4, SamplingParams(temperature=1.0, max_new_tokens=64), 4, seed=0)
    assert sum(g.finished for g in out) >= 1, "the merged model never ended its turn"


@needs_unsloth
@pytest.mark.parametrize("use_vllm", [False, pytest.param(True, marks=needs_vllm)])
def test_unsloth_grpo_trains_with_a_self_reward_and_saves_a_plain_model(tmp_path, tiny_policy, use_vllm):
    """GRPO through Unsloth's patched GRPOTrainer (16-bit LoRA), the reward the suite's majority vote and format
    scorers within each group; with vLLM also Unsloth's fast_inference. The merged folder reloads and ends its turn."""
    import dataclasses

    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams, response_messages
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.finetune import stage as finetune

    overrides = {"load_in_4bit": False, "method": "grpo", "per_device_train_batch_size": 4, "beta": 0.04}
    overrides["grpo"] = {"num_generations": 4, "max_completion_length": 32, "use_vllm": use_vllm}
    params = load_params(smoke_params(tmp_path, tiny_policy, tiny_policy, finetune=overrides))
    rows = [
        {"prompt": response_messages(q, "End with 'Final answer:'."), "question_id": f"q{i}", "question": q}
        for i, q in enumerate(["What is two plus three?", "Name a colour."])
    ]
    section = dataclasses.replace(params.reward, scorers=["majority_vote", "format"])
    rewards = {"section": dataclasses.asdict(section), "seed": 0, "iteration": 1, "dtype": "auto"}
    info = finetune.finetune(
        tiny_policy,
        rows,
        params.finetune,
        out_dir=tmp_path / "model",
        log_path=tmp_path / "log.jsonl",
        seed=0,
        rewards=rewards,
    )
    print(f"GRPO (use_vllm {use_vllm}):", json.dumps(info))
    assert info["backend"] == "unsloth" and info["steps"] == 2 and info["reward"] == ["majority_vote", "format"]
    assert info["reward_first"] is not None and info["dead_group_share"] is not None
    model, tokenizer = load_causal_lm(str(tmp_path / "model"), "auto"), load_tokenizer(str(tmp_path / "model"))
    text = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    out = generate(model, tokenizer, [text] * 4, SamplingParams(temperature=1.0, max_new_tokens=64), 4, seed=0)
    assert sum(g.finished for g in out) >= 1, "the merged model never ended its turn"


@needs_vllm
def test_vllm_sampling_backend(tmp_path, tiny_policy):
    from sedir_utils.core.models import load_tokenizer
    from sedir_utils.engine.backends import load_generator
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.replicas import model_identity
    from sedir_utils.engine.sampling import SamplingParams

    llm, backend = load_generator(tiny_policy, "auto", "vllm")
    tokenizer = load_tokenizer(tiny_policy)
    assert backend.name == "vllm" and model_identity(llm)[0] == tiny_policy
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Q{i}"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(6)
    ]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=32)
    first = generate(llm, tokenizer, prompts, sampling, 6, seed=3, checkpoint=tmp_path / "chunks")
    again = generate(llm, tokenizer, prompts, sampling, 6, seed=3)
    assert [g.text for g in first] == [g.text for g in again], "vLLM's per-prompt seeds did not repeat"
    assert any(g.finished for g in first)


@needs_vllm
def test_lm_eval_vllm_backend(tmp_path, tiny_policy, tiny_reward_model):
    params_file = smoke_params(tmp_path, tiny_policy, tiny_reward_model, eval={"backend": "vllm"})
    report = _run_stages(params_file, tmp_path / "run", ["eval"], iteration=0)["eval"]
    assert report["backend"] == "vllm"
    assert set(report["tasks"]) == {"gpqa_local", "gpqa_local_cot"}


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two GPUs")


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=needs_two_gpus)])
def test_worker_processes_on_gpus_sample_what_this_process_samples(tmp_path, tiny_policy, workers):
    """``model.data_parallel_size``'s mechanism on CUDA: worker processes, each given its GPU by
    ``CUDA_VISIBLE_DEVICES`` (one worker: GPU 0, the GPU this process uses), load the model as this process
    does, so their chunk files have the same keys, and sample the same texts (same batches, same seeds)."""
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.replicas import Replicas
    from sedir_utils.engine.sampling import SamplingParams

    tokenizer = load_tokenizer(tiny_policy)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Q{i}"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(16)
    ]
    sampling, kwargs = SamplingParams(temperature=1.0, max_new_tokens=24), dict(batch_size=4, seed=3, chunk_size=4)
    model = load_causal_lm(tiny_policy, "auto", "cuda")
    here = generate(model, tokenizer, prompts, sampling, **kwargs, checkpoint=tmp_path / "here")
    replicas = Replicas(tiny_policy, "auto", "transformers", size=workers, device="cuda")
    there = generate(replicas, tokenizer, prompts, sampling, **kwargs, checkpoint=tmp_path / "there")
    names = [sorted(p.name for p in (tmp_path / side).iterdir()) for side in ("here", "there")]
    assert names[0] == names[1]
    assert [g.text for g in there] == [g.text for g in here]


def test_training_launched_through_accelerate_on_the_gpu(tmp_path, tiny_policy, training_rows, sft_section):
    """``finetune.num_processes``'s launcher on CUDA with one process: ``accelerate launch`` with the shipped
    ddp config and bf16 (or fp16) mixed precision starts TRL's trainer on the GPU, which trains and (one
    process: nothing to gather) saves the merged model, which loads. The launcher only: with one process
    accelerate wraps nothing in DDP; ``test_two_training_processes_on_two_gpus`` is the stage's own path."""
    from sedir_utils.core.models import load_causal_lm
    from sedir_utils.stages.finetune import launch

    section = sft_section(1)
    work, out = tmp_path / ".trainer", tmp_path / "model"
    history, memory = launch.train_in_worker(
        tiny_policy,
        training_rows,
        section,
        work,
        0,
        out,
        target=launch.TRL_TRAINER,
        launcher=launch.launch_command(section, cuda=True),
    )
    losses = [h["loss"] for h in history if "loss" in h]
    print("launched on the GPU:", losses, memory)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (out / "model.safetensors").is_file() and not (work / "adapter").exists()
    load_causal_lm(str(out), "auto", "cuda")


@needs_two_gpus
def test_two_training_processes_on_two_gpus(tmp_path, tiny_policy, training_rows, sft_section):
    """``finetune.num_processes: 2`` as the stage runs it: DDP over NCCL, the adapter saved by the main process
    and merged by this one into one model that loads."""
    from sedir_utils.core.models import load_causal_lm
    from sedir_utils.stages.finetune.stage import finetune

    section = sft_section(2)
    out = tmp_path / "iter_1" / "model"
    info = finetune(tiny_policy, training_rows, section, out_dir=out, log_path=tmp_path / "log.jsonl", seed=0)
    print("two GPUs:", info)
    assert (info["processes"], info["steps"]) == (2, 8) and info["last_loss"] < info["first_loss"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    load_causal_lm(str(out), "auto", "cuda")
