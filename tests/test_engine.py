"""The continuous-batching engine against transformers' own generate, and its sampling rules."""

import pytest
import torch

import sedir_utils.engine.cpu_engine.engine as engine
from sedir_utils.engine.backends import vllm_sampling_kwargs
from sedir_utils.engine.cpu_engine.engine import Decoding, stream
from sedir_utils.engine.generation import generate
from sedir_utils.engine.sampling import SamplingParams, end_of_turn_ids

QUESTIONS = [
    "Say hello.",
    "What is 2 + 3?",
    "Name a prime number larger than 10 and explain why it is prime.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "Explain photosynthesis in detail.",
]


@pytest.fixture(scope="module")
def encoded(tokenizer):
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]


@pytest.fixture(scope="module")
def reference(model_fp32, tokenizer, encoded):
    """transformers' greedy generate, one prompt at a time (no padding), cut at the end of turn."""
    stop = end_of_turn_ids(tokenizer, model_fp32)
    out = []
    for ids in encoded:
        with torch.inference_mode():
            new = model_fp32.generate(
                torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=stop, pad_token_id=stop[0]
            )[0, len(ids) :].tolist()
        end = next((i for i, t in enumerate(new) if t in stop), None)
        out.append(new if end is None else new[:end])
    return out


@pytest.mark.parametrize("batch_size,prefill_batch", [(1, 1), (2, 1), (4, 2), (6, 16)])
def test_greedy_matches_transformers_generate(model_fp32, tokenizer, encoded, reference, batch_size, prefill_batch):
    done = list(
        stream(
            model_fp32,
            encoded,
            Decoding(0.0),
            40,
            end_of_turn_ids(tokenizer, model_fp32),
            batch_size,
            seed=0,
            prefill_batch=prefill_batch,
        )
    )
    assert sorted(d.index for d in done) == list(range(len(encoded)))  # each prompt exactly once
    got = {d.index: d for d in done}
    assert [got[i].tokens for i in range(len(encoded))] == reference
    for d in got.values():
        assert d.finished == (len(d.tokens) < 40)


def test_reused_slots_keep_outputs(model_fp32, tokenizer, encoded, reference, monkeypatch):
    # Many prompts through few slots: every slot is refilled several times by prompts of other lengths,
    # over the stale keys of the prompt before, and the batch shrinks at the end.
    placed = []
    original = engine.SlotCache.place
    monkeypatch.setattr(
        engine.SlotCache, "place", lambda self, rows, *a: (placed.extend(rows), original(self, rows, *a))
    )
    prompts, expected = (encoded * 3)[:15], (reference * 3)[:15]
    done = {
        d.index: d.tokens
        for d in stream(
            model_fp32, prompts, Decoding(0.0), 40, end_of_turn_ids(tokenizer, model_fp32), 3, 0, prefill_batch=1
        )
    }
    assert len(placed) == 15 and max(placed.count(r) for r in set(placed)) >= 4
    assert [done[i] for i in range(15)] == expected


def test_identical_prompts_are_prefilled_once(model_fp32, tokenizer, encoded, monkeypatch):
    # n answers to one question: one prefill row per distinct prompt, copied into each slot, and each
    # slot still samples its own continuation, the same as when every copy is prefilled alone (batch 1).
    prefilled = []
    original = engine.SlotCache.place
    monkeypatch.setattr(
        engine.SlotCache,
        "place",
        lambda self, rows, prefill, valid, sources: (
            prefilled.append((len(rows), valid.shape[0])),
            original(self, rows, prefill, valid, sources),
        ),
    )
    prompts = [encoded[1]] * 4 + [encoded[3]] * 4
    stop = end_of_turn_ids(tokenizer, model_fp32)
    together = {d.index: d.tokens for d in stream(model_fp32, prompts, Decoding(1.0), 12, stop, 8, seed=5)}
    assert prefilled == [(8, 2)]
    prefilled.clear()
    alone = {d.index: d.tokens for d in stream(model_fp32, prompts, Decoding(1.0), 12, stop, 1, seed=5)}
    assert prefilled == [(1, 1)] * 8
    assert together == alone
    assert len({tuple(together[i]) for i in range(4)}) > 1  # copies of one prompt still differ


def test_sampling_does_not_depend_on_batch_size(model_fp32, tokenizer, encoded):
    # Each prompt draws from its own generator, so in fp32 its sample is the same whatever shares its batch.
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20)
    prompts = [tokenizer.decode(e) for e in encoded]
    alone = generate(model_fp32, tokenizer, prompts, sampling, batch_size=1, seed=3)
    together = generate(model_fp32, tokenizer, prompts, sampling, batch_size=4, seed=3)
    assert [g.text for g in alone] == [g.text for g in together]
    assert len({g.text for g in together}) > 1


def test_max_new_tokens_is_respected(model_fp32, tokenizer, encoded):
    done = list(stream(model_fp32, encoded, Decoding(1.0), 3, end_of_turn_ids(tokenizer, model_fp32), 4, 0))
    assert all(len(d.tokens) <= 3 for d in done)
    assert any(not d.finished and len(d.tokens) == 3 for d in done)


def test_attention_is_restored(model_fp32, tokenizer, encoded):
    before = model_fp32.config._attn_implementation
    list(stream(model_fp32, encoded[:2], Decoding(0.0), 2, end_of_turn_ids(tokenizer, model_fp32), 2, 0))
    assert model_fp32.config._attn_implementation == before


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_top_k_and_min_p_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    picks = {
        "top_k": Decoding(1.0, top_k=2).choose(logits, _generators(400)),
        "min_p": Decoding(1.0, min_p=0.5).choose(logits, _generators(400)),  # keeps p >= 0.25
        "top_p": Decoding(1.0, top_p=0.7).choose(logits, _generators(400)),  # 0.5 + 0.3 reach 0.7
        "plain": Decoding(1.0).choose(logits, _generators(400)),
    }
    assert set(picks["top_k"].tolist()) == {0, 1}
    assert set(picks["min_p"].tolist()) == {0, 1}
    assert set(picks["top_p"].tolist()) == {0, 1}
    assert set(picks["plain"].tolist()) == {0, 1, 2, 3}
    share = (picks["plain"] == 0).float().mean().item()
    assert 0.4 < share < 0.6  # the categorical itself: token 0 has probability 0.5


def test_greedy_and_zero_probability_tokens():
    logits = torch.tensor([[0.0, 5.0, float("-inf"), 1.0]])
    assert Decoding(0.0).choose(logits, _generators(1)).tolist() == [1]
    draws = Decoding(1.0).choose(logits.repeat(300, 1), _generators(300))
    assert 2 not in draws.tolist()


def test_vllm_settings_match_ours():
    kwargs = vllm_sampling_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=99, min_p=0.05), [2], seed=5
    )
    assert kwargs == dict(
        n=1,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        max_tokens=99,
        seed=5,
        stop_token_ids=[2],
        skip_special_tokens=False,
    )


def test_the_process_is_left_as_it_was(model_fp32, tokenizer, encoded):
    """Attention registration, denormal mode, malloc settings: set inside ``stream`` only, then undone."""
    from transformers import AttentionInterface

    from sedir_utils.engine.cpu_engine.scoped import flush_denormals_on

    seen = []
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            for _ in stream(model_fp32, encoded[:2], Decoding(0.0), 2, end_of_turn_ids(tokenizer, model_fp32), 2, 0):
                seen.append((engine.ATTENTION in AttentionInterface._global_mapping, flush_denormals_on()))
            assert flush_denormals_on() == flush
        finally:
            torch.set_flush_denormal(False)
        assert engine.ATTENTION not in AttentionInterface._global_mapping
    assert seen and all(seen_inside == (True, True) for seen_inside in seen)


def test_calls_within_a_call_share_the_registration_and_a_users_entry_comes_back(model_fp32, tokenizer, encoded):
    from transformers import AttentionInterface

    stop = end_of_turn_ids(tokenizer, model_fp32)

    def users_own(*args, **kwargs):  # something a user registered under the same name before
        raise AssertionError("not called while the engine samples")

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model_fp32.config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    AttentionInterface.register(engine.ATTENTION, users_own)
    try:
        first = stream(model_fp32, encoded[:2], Decoding(0.0), 3, stop, 1, 0)
        next(first)  # the first call is under way when a second one runs to its end
        assert len(list(stream(small, encoded[2:4], Decoding(0.0), 3, stop, 1, 0))) == 2
        assert AttentionInterface._global_mapping[engine.ATTENTION] is engine.slot_attention  # the first still needs it
        assert len(list(first)) == 1
        assert AttentionInterface._global_mapping[engine.ATTENTION] is users_own
    finally:
        AttentionInterface._global_mapping.pop(engine.ATTENTION, None)


def test_a_failing_sampling_call_restores_the_model_at_once(model_fp32, tokenizer, encoded, monkeypatch):
    from sedir_utils.engine import backends

    before = model_fp32.config._attn_implementation
    prompts = [tokenizer.decode(e) for e in encoded[:3]]
    calls = []

    def fail_on_second(*args):  # the progress bar's update: fails after the first finished prompt
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("tqdm.tqdm.update", lambda self, n=1: fail_on_second())
    with pytest.raises(KeyboardInterrupt):
        backends.REGISTRY["cpu-engine"].sample(model_fp32, tokenizer, prompts, SamplingParams(0.0), 1, 0, 0, "x")
    # closed at once (a traceback kept alive by Jupyter would otherwise hold the engine's settings)
    assert model_fp32.config._attn_implementation == before
    assert not any("forward" in vars(m) for m in model_fp32.modules())


def test_importing_the_engine_changes_nothing(processes):
    import subprocess
    import sys

    script = (
        "import torch\nfrom transformers import AttentionInterface\n"
        "import sedir_utils.engine.cpu_engine.engine, sedir_utils.engine.backends, sedir_utils.engine.generation\n"
        "from sedir_utils.engine.cpu_engine.scoped import flush_denormals_on\n"
        "assert 'sedir_slots' not in AttentionInterface._global_mapping\n"
        "assert not flush_denormals_on()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_malloc_settings_are_scoped(monkeypatch):
    # Whether the allocator then reuses memory depends on the heap's layout (measured by the benchmark);
    # here: what is asked of glibc on the way in and out, nothing where the user set MALLOC_* or the C
    # library is not glibc.
    from sedir_utils.engine.cpu_engine import scoped

    calls = []
    monkeypatch.setattr(
        scoped, "_libc", lambda: (lambda p, v: calls.append((p, v)), lambda pad: calls.append(("trim", pad)))
    )
    for name in scoped.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    with scoped.malloc_kept():
        assert calls == [
            (-3, 32 << 20),
            (-1, 2**31 - 1),
            (-2, 64 << 20),
        ]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    assert calls[3:] == [(-3, 128 * 1024), (-1, 128 * 1024), (-2, 0), ("trim", 0)]  # glibc's defaults, then a trim
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with scoped.malloc_kept():
        pass
    assert calls == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(scoped, "_libc", lambda: None)  # not glibc
    with scoped.malloc_kept():
        pass
    assert calls == []


@pytest.mark.parametrize("broken", ["missing", "raises", "wrong"])
def test_a_changed_private_onednn_op_costs_speed_not_correctness(
    model_fp32, tokenizer, encoded, reference, monkeypatch, broken
):
    """The packed linears use private oneDNN ops: a torch without them, or where they fail or compute
    something else, is detected once, said once, and sampling goes on with plain layers to the same result."""
    import types

    from sedir_utils.core import models
    from sedir_utils.engine.cpu_engine import scoped

    real = torch.ops.mkldnn
    ops = {
        "missing": types.SimpleNamespace(_is_mkldnn_bf16_supported=real._is_mkldnn_bf16_supported),
        "raises": types.SimpleNamespace(
            _is_mkldnn_bf16_supported=real._is_mkldnn_bf16_supported,
            _reorder_linear_weight=lambda w, b: (_ for _ in ()).throw(RuntimeError("no")),
            _linear_pointwise=real._linear_pointwise,
        ),
        "wrong": types.SimpleNamespace(
            _is_mkldnn_bf16_supported=real._is_mkldnn_bf16_supported,
            _reorder_linear_weight=real._reorder_linear_weight,
            _linear_pointwise=lambda x, w, b, *a: real._linear_pointwise(x, w, b, *a) * 2,
        ),
    }
    monkeypatch.setattr(models, "_onednn", lambda: ops[broken])
    scoped.packing_problem.cache_clear()
    try:
        with pytest.warns(UserWarning, match="without pre-packed linear layers"):
            assert scoped.packing_problem(torch.float32)
        with scoped.packed_linears(model_fp32):
            assert not any("forward" in vars(m) for m in model_fp32.modules())
        done = stream(model_fp32, encoded, Decoding(0.0), 40, end_of_turn_ids(tokenizer, model_fp32), 4, seed=0)
        assert [d.tokens for d in sorted(done, key=lambda d: d.index)] == reference
    finally:
        scoped.packing_problem.cache_clear()


def test_onednn_bf16_is_false_where_the_private_op_moved(monkeypatch):
    import types

    from sedir_utils.core import models

    monkeypatch.setattr(models, "_onednn", lambda: types.SimpleNamespace())
    assert models.onednn_bf16() is False
