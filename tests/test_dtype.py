"""One dtype decision for every stage (``models.dtype_decision``): bf16 only where the hardware computes it
natively. Posed here for each kind: GPUs by compute capability (a T4 gets fp16), CPUs by their features (AVX2
only gets fp32, AVX512-BF16 gets bf16), and checked at each stage: sampling, scoring, evaluation, training and
the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import AVX2_ONLY, AVX512_BF16

from sedir_utils.core import models

ROOT = Path(__file__).resolve().parent.parent
T4, A100 = (7, 5), (8, 0)
# (features, the dtype ``auto`` and ``bfloat16`` run in, whether training autocasts to bf16)
CPU_KINDS = {"avx2": (AVX2_ONLY, "float32", False), "avx512_bf16": (AVX512_BF16, "bfloat16", True)}


# --- GPUs -------------------------------------------------------------------------------------------------------


def test_bf16_only_from_compute_capability_8(monkeypatch):
    # torch says True on a T4 (emulated bf16): the decision must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert not models.cuda_bf16(T4)
    assert models.cuda_bf16(A100) and models.cuda_bf16((9, 0))


def test_resolved_dtype_per_gpu(capsys):
    assert models.resolve_dtype("auto", "cuda", capability=T4) == "float16"
    assert models.resolve_dtype("auto", "cuda", capability=A100) == "bfloat16"
    assert models.resolve_dtype("bfloat16", "cuda", capability=A100) == "bfloat16"
    assert models.resolve_dtype("float32", "cuda", capability=T4) == "float32"
    capsys.readouterr()
    assert models.resolve_dtype("bfloat16", "cuda", capability=T4) == "float16"
    assert "no native bf16" in capsys.readouterr().out


def test_every_stage_gets_the_resolved_dtype_on_a_t4(on_gpu):
    from sedir_utils.engine.backends import vllm_engine_args
    from sedir_utils.stages.evaluation.stage import lm_eval_model_args

    on_gpu(T4)
    assert models.torch_dtype("bfloat16") == torch.float16
    assert vllm_engine_args("/m", "bfloat16")["dtype"] == "float16"
    assert lm_eval_model_args("vllm", "/m", "bfloat16", 0)["dtype"] == "float16"
    assert lm_eval_model_args("hf", "/m", "auto", 0) == {"pretrained": "/m", "device": "cuda", "dtype": "float16"}
    on_gpu(A100)
    assert lm_eval_model_args("hf", "/m", "auto", 0)["dtype"] == "bfloat16"


def test_unsloth_and_trl_train_in_fp16_on_a_t4(on_gpu):
    from sedir_utils.core.params import FinetuneParams
    from sedir_utils.stages.finetune.methods import train_bf16
    from sedir_utils.stages.finetune.unsloth_backend import unsloth_load_args

    on_gpu(T4)
    section = FinetuneParams()
    assert unsloth_load_args("/m", section)["dtype"] == torch.float16 and not train_bf16(cuda=True)
    on_gpu(A100)
    assert unsloth_load_args("/m", section)["dtype"] == torch.bfloat16 and train_bf16(cuda=True)


def test_dtype_reads_the_device_it_is_asked_about(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: [T4, A100][index])
    assert models.resolve_dtype("auto", "cuda:1") == "bfloat16" and models.resolve_dtype("auto", "cuda:0") == "float16"


# --- CPUs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_the_cpu_gets_bf16_only_where_it_computes_it(on_cpu, capsys, kind):
    features, native, _ = CPU_KINDS[kind]
    on_cpu(features)
    assert models.cpu_bf16() is (native == "bfloat16")
    assert models.resolve_dtype("auto", "cpu") == native
    assert models.resolve_dtype("float32", "cpu") == "float32" and models.resolve_dtype("float16", "cpu") == "float16"
    capsys.readouterr()
    assert models.resolve_dtype("bfloat16", "cpu") == native and models.resolve_dtype("bfloat16") == native
    said = capsys.readouterr().out.splitlines()
    if native == "bfloat16":
        assert said == []
    else:  # bf16 asked of a CPU without it: one line, once, saying what runs instead and why
        assert len(said) == 1 and said[0].startswith("dtype bfloat16: the CPU has no native bf16 (no AVX512-BF16")
        assert said[0].endswith("using float32")
    dtype, why = models.dtype_decision("auto", "cpu")
    assert dtype == native and ("no native bf16" in why) is (native == "float32")


def test_arm_bf16_and_amx_count_as_native():
    assert models.cpu_bf16({"architecture": "arm64", "neon": True, "bf16": True})
    assert models.cpu_bf16({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True})
    assert not models.cpu_bf16({"architecture": "arm64", "neon": True, "bf16": False, "sve_bf16": False})
    assert not models.cpu_bf16({})


def test_this_cpus_answer_agrees_with_onednn():
    """oneDNN computes bf16 on any AVX-512 CPU (natively or not): where it says no, the decision must too."""
    features = models.cpu_capabilities()
    assert "architecture" in features or "avx512_bf16" in features
    if not models.onednn_bf16():
        assert not models.cpu_bf16()
    if models.cpu_bf16() and torch.backends.mkldnn.is_available():
        assert models.onednn_bf16()


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_every_stage_runs_in_the_cpus_dtype(on_cpu, tiny_random, tiny_reward_model, kind):
    """Sampling (the CPU engine's model), scoring (the judge's and a reward model), evaluation (lm-eval's
    model_args), training (TRL's autocast flag, accelerate's mixed precision) and the manifest."""
    from sedir_utils.core.models import load_reward_model
    from sedir_utils.core.params import FinetuneParams
    from sedir_utils.engine.backends import load_generator
    from sedir_utils.engine.scorers.base import ScoringContext
    from sedir_utils.run.manifest import _determinism
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.evaluation.stage import lm_eval_model_args
    from sedir_utils.stages.finetune.launch import launch_command
    from sedir_utils.stages.finetune.methods import train_bf16, trainer_config

    features, native, autocast = CPU_KINDS[kind]
    on_cpu(features)
    want = getattr(torch, native)
    policy, backend = load_generator(tiny_random, "auto")
    assert backend.name == "cpu-engine" and policy.dtype == want
    scoring = ScoringContext(section=None, policy_path=tiny_random, dtype="bfloat16", device="cpu")
    assert scoring.causal_lm(tiny_random)[0].dtype == want
    assert load_reward_model(tiny_reward_model, "auto", "cpu")[0].dtype == want
    assert lm_eval_model_args("hf", "/m", "auto", 0) == {"pretrained": "/m", "device": "cpu", "dtype": native}

    assert train_bf16(cuda=False) is autocast
    config = trainer_config(FinetuneParams(), "unused", 0, cuda=False, bf16=train_bf16(cuda=False))
    assert config.bf16 is autocast and not config.fp16 and config.use_cpu
    command = launch_command(FinetuneParams(num_processes=2), cuda=False, port=1)
    assert command[command.index("--mixed_precision") + 1] == ("bf16" if autocast else "no")

    params = load_params(ROOT / "params" / "embedded.yaml").to_dict()
    assert params["model"]["dtype"] == "auto"  # the embedded default follows the CPU
    determinism = _determinism(params)
    assert determinism["cpu_bf16"] is autocast
    assert determinism["dtypes"] == {
        "sampling_and_scoring": native,
        "reward_model": native,
        "training_autocast": native,
    }
    assert all(determinism["dtypes_why"].values())


def test_a_stage_fingerprint_holds_the_dtype_the_hardware_gives(on_cpu, tmp_path):
    """A run resumed on the other kind of CPU reruns its stages; a dtype's name alone changes nothing."""
    from sedir_utils.run.fingerprints import Fingerprints
    from sedir_utils.run.params import load_params

    (tmp_path / "p.yaml").write_text("iterations: 1\n")

    def prints(features, *overrides):
        on_cpu(features)
        found = Fingerprints(load_params(tmp_path / "p.yaml", list(overrides)), tmp_path)
        return {stage: found.stage(1, stage) for stage in ("questions", "responses", "reward", "finetune", "eval")}

    avx2, avx512 = prints(AVX2_ONLY), prints(AVX512_BF16)
    assert all(avx2[stage] != avx512[stage] for stage in avx2)  # auto: fp32 on one, bf16 on the other
    assert prints(AVX512_BF16, "model.dtype=bfloat16") == avx512  # bf16 either way
    assert prints(AVX2_ONLY, "model.dtype=bfloat16") == avx2 == prints(AVX2_ONLY, "model.dtype=float32")
    # float32 asked on both: only training's autocast differs, so the fine-tune and the eval of its model
    fp32_avx2, fp32_avx512 = prints(AVX2_ONLY, "model.dtype=float32"), prints(AVX512_BF16, "model.dtype=float32")
    assert [fp32_avx2[s] == fp32_avx512[s] for s in avx2] == [True, True, True, False, False]
