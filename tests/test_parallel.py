"""Data parallelism on this machine: two CPU worker processes share the sampling and the scoring
(sedir_utils/engine/parallel.py), and what they write is byte for byte what one process writes."""

from __future__ import annotations

import filecmp
import shutil

import pytest
from conftest import AVX2_ONLY

from sedir_utils.engine.generation import generate
from sedir_utils.engine.parallel import assign, layout_problem, worker_environments
from sedir_utils.engine.replicas import Replicas
from sedir_utils.engine.sampling import SamplingParams


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _question_prompts(path, n):
    from sedir_utils.core.models import load_tokenizer
    from sedir_utils.core.params import PAPER_SYSTEM_PROMPT
    from sedir_utils.stages.questions.filters import question_prompt

    tokenizer = load_tokenizer(path)
    return tokenizer, [question_prompt(tokenizer, PAPER_SYSTEM_PROMPT)] * n


def test_two_processes_sample_the_file_one_process_samples_and_resume(tmp_path, tiny_policy, capsys):
    from sedir_utils.core.io import write_jsonl
    from sedir_utils.core.models import load_causal_lm

    tokenizer, prompts = _question_prompts(tiny_policy, 20)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24)
    one, two = tmp_path / "one", tmp_path / "two"
    kwargs = dict(batch_size=4, seed=5, chunk_size=4)  # five chunks: worker 0 samples three, worker 1 two
    alone = generate(
        load_causal_lm(tiny_policy, "float32", "cpu"), tokenizer, prompts, sampling, **kwargs, checkpoint=one
    )
    replicas = Replicas(tiny_policy, "float32", "cpu-engine", size=2)
    shared = generate(replicas, tokenizer, prompts, sampling, **kwargs, checkpoint=two)
    assert "5 chunks in 2 worker processes (1 CPU thread each)" in capsys.readouterr().out
    write_jsonl(one / "samples.jsonl", [vars(g) for g in alone])
    write_jsonl(two / "samples.jsonl", [vars(g) for g in shared])
    assert len({g.text for g in alone}) > 1  # sampled, not one text repeated
    assert _files(one) == _files(two)  # the same chunk files (keys) ...
    match, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 6  # ... and the same bytes, the merged file too
    # A run stopped midway: the chunks it finished stay, and only the others are sampled again.
    for chunk in sorted(two.glob("chunk-0000[13]-*.json")):
        chunk.unlink()
    again = generate(replicas, tokenizer, prompts, sampling, **kwargs, checkpoint=two)
    assert "2 chunks in 2 worker processes" in capsys.readouterr().out
    assert again == alone
    assert sorted(one.iterdir()) != [] and [p.name for p in two.iterdir() if p.is_dir()] == []  # no worker folder left


def test_a_failed_worker_stops_the_others_and_names_itself_and_its_log(tmp_path, tiny_policy, monkeypatch):
    """Worker 0's chunk fails at once; worker 1's would take 30 s: it is stopped, not waited for. A worker
    that fails after writing its chunks fails nothing."""
    from pathlib import Path

    from sedir_utils.core.io import StageError
    from sedir_utils.engine.parallel import chunk_filler

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the score function; the package: the worker's
    spec = dict(kind="score", loader="causal_lm", path=tiny_policy, dtype="float32", device="cpu")
    spec.update(score_fn="slow_scorer:fail_or_wait", batch_size=1, max_length=32)
    fill = chunk_filler(spec, 2, "cpu", 1, "scoring")
    missing = [(c, [{"question": "q", "response": text}], tmp_path / f"chunk-{c}.json") for c, text in enumerate("fw")]
    missing[0][1][0]["response"] = "fail"
    with pytest.raises(StageError, match=r"scoring: worker 0 of 2 failed \(exit 1\): .*posed.*log: .*worker-0"):
        fill(missing)
    assert not (tmp_path / "chunk-1.json").exists()  # stopped before it wrote
    # A worker that ends with an error after writing every chunk it owes (a crash in its teardown) loses nothing.
    spec["score_fn"] = "slow_scorer:crash_at_exit"
    chunk_filler(spec, 1, "cpu", 1, "scoring")(missing[1:])
    assert (tmp_path / "chunk-1.json").is_file()
    tokenizer, prompts = _question_prompts(tiny_policy, 4)
    broken = Replicas(str(tmp_path / "no-such-model"), "float32", "cpu-engine", size=2)
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        generate(broken, tokenizer, prompts, SamplingParams(temperature=1.0, max_new_tokens=8), batch_size=2, seed=0)


def test_stopping_a_child_stops_what_it_started_even_after_it_ended(processes):
    """A child that started a process of its own and ended (a worker whose engine outlives it): stopping the
    child ends that process too (its process group)."""
    import subprocess
    import time

    from sedir_utils.core import children

    def alive(pid):  # a killed process no one has reaped yet (a zombie) counts as ended
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    proc = children.start(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, env=children.environment())
    orphan = int(proc.stdout.readline())
    proc.stdout.close()
    proc.wait()
    time.sleep(0.2)
    assert alive(orphan)  # still there after its parent ended
    children.stop(proc)
    deadline = time.monotonic() + 10
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(orphan), "the process the child started outlived stop()"


def test_the_policy_embedder_never_gets_the_workers_model(tmp_path, tiny_policy, monkeypatch):
    """``questions.embedder: policy`` pools the policy this process has loaded, or loads it itself when
    worker processes sample (``model.data_parallel_size`` above 1)."""
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.questions import stage as questions

    class Enough(Exception):
        pass

    given = []

    def embedder(params, model_path, policy=None):
        given.append(policy)
        raise Enough

    monkeypatch.setattr(questions, "question_embedder", embedder)
    (tmp_path / "p.yaml").write_text(
        f"model: {{name: {tiny_policy}, dtype: float32}}\nquestions: {{embedder: policy}}\n"
    )
    for size in (1, 2):
        with pytest.raises(Enough):
            questions.run(load_params(tmp_path / "p.yaml", [f"model.data_parallel_size={size}"]), RunPaths(tmp_path, 1))
    assert type(given[0]).__name__ == "Qwen2ForCausalLM" and given[1] is None


def test_the_reward_stage_with_two_processes_writes_the_same_files(tmp_path, tiny_policy, monkeypatch):
    """The reward stage end to end, audit included: its probe answers are sampled, and both they and the
    responses are scored, in two worker processes; every file is the one-process run's."""
    import yaml

    from sedir_utils.core.io import write_jsonl
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.engine.scorers import base as scorer_base
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.responses.stage import sample_responses
    from sedir_utils.stages.scoring import stage as rewards

    monkeypatch.setattr(scorer_base, "SCORE_CHUNK", 8)  # several chunks from few rows (the stage's process chunks)
    settings = {
        "model": {"name": tiny_policy, "dtype": "float32"},
        "responses": {"num_responses": 3, "max_new_tokens": 16, "batch_size": 4, "chunk_size": 4},
        "audit": {"num_questions": 4, "num_samples": 2, "bootstrap": 50},
        "reward": {"scorers": ["llm_judge"], "batch_size": 4, "max_length": 256},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    params = load_params(tmp_path / "params.yaml")
    questions = [{"id": f"q{i}", "question": f"What is {i} plus {i + 2}?"} for i in range(5)]
    model, tokenizer = load_causal_lm(tiny_policy, "float32", "cpu"), load_tokenizer(tiny_policy)
    responses = sample_responses(model, tokenizer, questions, params.responses, seed=1, iteration=1, model_name="tiny")
    written = {}
    for size in (1, 2):
        paths = RunPaths(tmp_path / f"dp{size}", 1)
        write_jsonl(paths.responses, responses)
        rewards.run(load_params(tmp_path / "params.yaml", [f"model.data_parallel_size={size}"]), paths)
        written[size] = paths.iter_dir
    names = _files(written[1])
    assert {"audit.jsonl", "rewards.jsonl", "pairs.jsonl", "metrics.json"} <= set(names)
    assert names == _files(written[2])
    match, mismatch, errors = filecmp.cmpfiles(written[1], written[2], names, shallow=False)
    assert mismatch == [] and errors == []


def test_worker_environments_split_the_gpus_this_process_sees_or_its_threads():
    cuda = worker_environments(2, 2, "cuda", visible="2,3,4,5")
    assert cuda == [{"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5"}]
    assert worker_environments(3, 1, "cuda", visible="0,1,2") == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(3)]
    eight = list(range(8))
    assert worker_environments(2, 1, "cpu", threads=8, cores=eight)[1] == {
        "OMP_NUM_THREADS": "4",
        "MKL_NUM_THREADS": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "4-7",  # a vLLM engine's worker: cores of its own
    }
    four = worker_environments(4, 1, "cpu", threads=2, cores=[0, 1])
    assert [env["OMP_NUM_THREADS"] for env in four] == ["1"] * 4  # at least one each
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in four] == ["0", "1", "0", "1"]
    assert worker_environments(2, 1, "cpu", threads=8, cores=[0, 1])[0]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert assign(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]


def test_layout_problems_name_the_fields_and_the_gpus():
    assert layout_problem(2, 1, "cpu") is None
    assert layout_problem(1, 2, "cpu") == "model.tensor_parallel_size: 2 needs CUDA GPUs (this run's device is cpu)"
    assert layout_problem(2, 2, "cuda", gpus=4) is None
    assert layout_problem(2, 2, "cuda", gpus=2) == (
        "model.data_parallel_size 2 x model.tensor_parallel_size 2 needs 4 GPUs; 2 are visible"
    )


def test_replicas_key_chunks_as_the_loaded_model_does(tiny_policy, tmp_path):
    from sedir_utils.core.models import load_causal_lm
    from sedir_utils.engine.replicas import model_identity

    folder = tmp_path / "m"
    shutil.copytree(tiny_policy, folder)
    loaded = load_causal_lm(str(folder), "float16", "cpu")  # not bf16: on a CPU without it that loads fp32
    assert Replicas(str(folder), "float16", "cpu-engine", 2).identity() == model_identity(loaded)
    assert Replicas(str(folder), "float32", "cpu-engine", 2).identity() != model_identity(loaded)


def test_load_generator_loads_nothing_for_several_processes(tiny_policy, capsys):
    from sedir_utils.engine.backends import for_model, load_generator

    model, backend = load_generator(tiny_policy, "float32", "cpu-engine", data_parallel_size=2)
    assert model == Replicas(tiny_policy, "float32", "cpu-engine", 2, 1, "cpu")
    assert for_model(model) is backend
    assert "cpu-engine (params ask for it; 2 processes)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no tensor parallelism"):
        backend.load(tiny_policy, "float32", tensor_parallel_size=2)


def test_parallelism_is_no_part_of_a_stage_fingerprint(tmp_path):
    from sedir_utils.run.fingerprints import Fingerprints
    from sedir_utils.run.params import load_params

    (tmp_path / "p.yaml").write_text("iterations: 1\n")
    one = Fingerprints(load_params(tmp_path / "p.yaml"), tmp_path)
    many = Fingerprints(load_params(tmp_path / "p.yaml", ["model.data_parallel_size=4"]), tmp_path)
    other = Fingerprints(load_params(tmp_path / "p.yaml", ["model.dtype=float16"]), tmp_path)  # auto: bf16 or fp32
    for stage in ("questions", "responses", "reward", "finetune", "eval"):
        assert one.stage(1, stage) == many.stage(1, stage) != other.stage(1, stage)


def test_preflight_checks_the_layout_against_the_machine(tmp_path, on_cpu, on_gpu):
    from sedir_utils.run.params import load_params
    from sedir_utils.run.preflight import Environment, parallel_problems
    from sedir_utils.stages.evaluation.stage import lm_eval_model_args

    (tmp_path / "p.yaml").write_text("iterations: 1\n")

    def problems(overrides, env, backend):
        return parallel_problems(load_params(tmp_path / "p.yaml", overrides), env, backend)

    cpu, one_gpu = Environment(cuda=False), Environment(cuda=True, gpus=1, packages={"vllm"})
    four = Environment(cuda=True, gpus=4, packages={"vllm", "ray"})
    assert problems(["model.data_parallel_size=2"], cpu, "cpu-engine") == []
    assert problems(["model.data_parallel_size=2"], one_gpu, "vllm")[0].endswith("needs 2 GPUs; 1 is visible")
    assert (
        "lm-eval's vLLM backend runs its replicas as Ray actors"
        in problems(["model.data_parallel_size=2"], Environment(cuda=True, gpus=2, packages={"vllm"}), "vllm")[0]
    )
    assert problems(["model.data_parallel_size=2", "eval.backend=hf"], Environment(cuda=True, gpus=2), "vllm") == []
    assert problems(["model.data_parallel_size=2", "model.tensor_parallel_size=2"], four, "vllm") == []
    assert problems(["model.tensor_parallel_size=2"], four, "transformers") == [
        "model.tensor_parallel_size: 2 needs the vllm sampling backend (this run samples with transformers)"
    ]
    # on the CPU lm-eval's vLLM backend evaluates in one engine (its replicas are Ray actors with GPUs)
    on_cpu(AVX2_ONLY)
    assert lm_eval_model_args("vllm", "/m", "float32", 0, data_parallel_size=3)["data_parallel_size"] == 1
    on_gpu((8, 0))
    args = lm_eval_model_args("vllm", "/m", "float16", 0, tensor_parallel_size=2, data_parallel_size=3)
    assert (args["tensor_parallel_size"], args["data_parallel_size"]) == (2, 3)


def test_two_processes_train_through_accelerate_and_save_the_model_once(
    tmp_path, tiny_policy, training_rows, sft_section, capsys, monkeypatch
):
    """``finetune.num_processes: 2``: ``accelerate launch`` starts two trainers (gloo on the CPU), TRL's
    SFT runs unchanged under DDP, the loss falls, and one merged model is saved, which loads and samples."""
    import torch

    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.stages.finetune.stage import completion_loss, finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU even where there are GPUs:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the test is about two processes, not two devices
    rows, section = training_rows, sft_section(2)
    out = tmp_path / "iter_1" / "model"
    info = finetune(tiny_policy, rows, section, out_dir=out, log_path=tmp_path / "log.jsonl", seed=0)
    printed = capsys.readouterr().out
    assert "accelerate.commands.launch --config_file" in printed and "--num_processes 2" in printed
    assert (info["processes"], info["distributed"], info["samples"]) == (2, "ddp", 16)
    assert info["steps"] == 8  # 16 rows / (2 per process x 2 processes) x 2 epochs: the batch is global
    assert info["last_loss"] < info["first_loss"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not (out.parent / ".trainer" / "adapter").exists()  # merged here after the launch, then removed
    tokenizer = load_tokenizer(str(out))
    before = completion_loss(load_causal_lm(tiny_policy, "float32", "cpu"), tokenizer, rows[:4], 64)
    after = completion_loss(load_causal_lm(str(out), "float32", "cpu"), tokenizer, rows[:4], 64)
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize(
    "name, kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"), ("fsdp", "FSDP")]
)
def test_the_shipped_accelerate_configs_are_ones_accelerate_reads(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    from sedir_utils.core.params import FinetuneParams
    from sedir_utils.stages.finetune.launch import accelerate_config

    config = load_config_from_file(str(accelerate_config(FinetuneParams(distributed=name))))  # unknown keys raise
    assert config.distributed_type.value == kind and config.num_machines == 1
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # saving gathers the weights


def test_launch_command_and_the_choices_around_it(tmp_path):
    from sedir_utils.core.params import FinetuneParams, ParamsError
    from sedir_utils.run.fingerprints import Fingerprints
    from sedir_utils.run.params import load_params
    from sedir_utils.run.preflight import Environment, parallel_problems
    from sedir_utils.run.preflight import problems as preflight
    from sedir_utils.stages.finetune.launch import launch_command
    from sedir_utils.stages.finetune.methods import train_bf16
    from sedir_utils.stages.finetune.stage import select_backend

    command = launch_command(FinetuneParams(num_processes=4, distributed="zero3"), cuda=False, port=1234)
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[4].endswith("accelerate_configs/zero3.yaml") and command[-2:] == [
        "-m",
        "sedir_utils.stages.finetune.launch",
    ]
    assert command[-4] == "--num_cpu_threads_per_process"  # on the CPU: a share of the cores each
    mixed = "bf16" if train_bf16(cuda=False) else "no"  # by the CPU's bf16 (both kinds posed in test_dtype.py)
    assert command[5:11] == ["--num_processes", "4", "--mixed_precision", mixed, "--main_process_port", "1234"]
    own = launch_command(FinetuneParams(num_processes=16, distributed="/cluster/two_nodes.yaml"), cuda=False)
    assert own[4] == "/cluster/two_nodes.yaml" and "--main_process_port" not in own  # the user's config says
    (tmp_path / "p.yaml").write_text("finetune: {distributed: configs/two_nodes.yaml}\n")
    assert load_params(tmp_path / "p.yaml").finetune.distributed == str(tmp_path / "configs/two_nodes.yaml")
    assert select_backend("auto", cuda=True, unsloth=True, distributed="fsdp")[0] == "trl"
    assert select_backend("auto", cuda=True, unsloth=True, distributed="ddp")[0] == "unsloth"

    (tmp_path / "p.yaml").write_text("iterations: 1\n")
    with pytest.raises(ParamsError, match="finetune.distributed: expected one of ddp, fsdp, zero2, zero3 or an"):
        load_params(tmp_path / "p.yaml", ["finetune.distributed=zero4"])
    unsloth = ["finetune.backend=unsloth", "finetune.num_processes=2", "finetune.distributed=zero3"]
    with pytest.raises(ParamsError, match="zero3 trains with TRL .*Unsloth's documented multi-GPU path is DDP"):
        load_params(tmp_path / "p.yaml", unsloth)

    def problems(overrides, env):
        return parallel_problems(load_params(tmp_path / "p.yaml", overrides), env, "vllm")

    two = ["finetune.num_processes=2"]
    assert problems(two + ["finetune.distributed=zero2"], Environment(cuda=True, gpus=2)) == [
        "finetune.distributed: zero2 needs deepspeed, which is not installed"
    ]
    assert problems(two, Environment(cuda=True, gpus=1)) == [
        "finetune.num_processes: 2 processes, one per GPU, and 1 is visible"
    ]
    assert "no such accelerate config file" in problems(two + ["finetune.distributed=nope.yaml"], Environment(False))[0]
    assert problems(two, Environment(cuda=False)) == []
    # Unsloth (4-bit) needs bitsandbytes; where TRL trains instead (ZeRO, FSDP), preflight does not ask for it.
    unsloth_gpus = Environment(cuda=True, gpus=2, packages={"unsloth", "deepspeed"})
    for layout, asked in (("ddp", True), ("zero2", False)):
        params = load_params(tmp_path / "p.yaml", two + [f"finetune.distributed={layout}"])
        assert any(line.startswith("finetune.load_in_4bit") for line in preflight(params, unsloth_gpus)) is asked

    def finetune_print(overrides):
        return Fingerprints(load_params(tmp_path / "p.yaml", overrides), tmp_path).stage(1, "finetune")

    # One process has no layout: its fingerprint is what it was before these settings existed; several train
    # with a larger global batch, another model.
    assert finetune_print([]) == finetune_print(["finetune.distributed=fsdp"]) != finetune_print(two)
    # An accelerate config of one's own counts by its content, as the other files params name.
    own = tmp_path / "own.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    before = finetune_print(two + [f"finetune.distributed={own}"])
    own.write_text("distributed_type: FSDP\n")
    assert finetune_print(two + [f"finetune.distributed={own}"]) != before
