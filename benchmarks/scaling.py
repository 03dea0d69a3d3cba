"""Scaling out: sampling throughput with one and several worker processes (sedir_utils/engine/parallel.py).

    python benchmarks/scaling.py                 # the CPU: the embedded model, 1 vs 2 processes (~3 minutes)
    python benchmarks/scaling.py --quick         # smaller, for a smoke check
    python benchmarks/scaling.py --model PATH --processes 1 2 4 --tensor-parallel 2   # a GPU machine: vLLM

The same response prompts (our own probe questions, not a benchmark's), settings and seed go through
``generation.generate`` three ways: in this process (the model loaded here, its load counted), in one
worker process, and in N worker processes (``model.data_parallel_size``: chunks dealt in turn, each worker
with its share of the cores or its GPUs). Figures are useful tokens per second over the whole call, worker
start and model load included, and each as a ratio to one worker; "same samples" says whether every run
gave the one-process samples (they must: per-prompt seeds and whole chunks). On a GPU the backend is vLLM
where installed (each worker an engine with ``--tensor-parallel`` GPUs), else transformers' ``generate``.
On 2 CPU cores, two processes get one thread each: the ratio shows what one thread's loss leaves of the
doubling. Prints figures only; it asserts nothing. Run it alone: two torch processes beside it slow both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedir_utils.core.models import describe_cpu, load_tokenizer, pick_device, resolve_dtype, resolve_model  # noqa: E402
from sedir_utils.engine.backends import choose  # noqa: E402
from sedir_utils.engine.generation import generate  # noqa: E402
from sedir_utils.engine.replicas import Replicas  # noqa: E402
from sedir_utils.engine.sampling import SamplingParams, response_messages  # noqa: E402

INSTRUCTION = (
    "Think through the problem step by step. "
    "Then give your final answer on the last line, starting with 'Final answer:'."
)


def prompts(tokenizer, n: int) -> list[str]:
    path = Path(__file__).resolve().parents[1] / "sedir_utils" / "data" / "probe_general_mc.jsonl"
    base = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    texts = [f"{base[i % len(base)]} (#{i + 1})" if i >= len(base) else base[i] for i in range(n)]
    return [
        tokenizer.apply_chat_template(response_messages(t, INSTRUCTION), tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def timed(model, tokenizer, texts, sampling, args, backend):
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        if model is None:  # in this process: the load counts, as a worker's does
            model = backend.load(args.model_path, args.dtype, tensor_parallel_size=args.tensor_parallel)
        out = generate(
            model, tokenizer, texts, sampling, args.batch_size, seed=0, checkpoint=folder, chunk_size=args.chunk_size
        )
        seconds = time.perf_counter() - start
    tokens = sum(g.num_tokens + g.finished for g in out)  # the end-of-turn token counts as produced
    return out, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="a params dtype (auto: bf16 where computed natively)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.model_path = resolve_model(args.model)
    device = pick_device()
    backend, why = choose("auto", device)
    n, new_tokens = (32, 64) if args.quick else (128, 128)
    args.batch_size, args.chunk_size = (16, 16) if device == "cpu" else (64, 64)
    tokenizer = load_tokenizer(args.model_path)
    texts = prompts(tokenizer, n)
    sampling = SamplingParams(temperature=0.8, max_new_tokens=new_tokens)
    dtype = resolve_dtype(args.dtype, device)
    print(f"# {describe_cpu()}" if device == "cpu" else f"# {device}")
    print(f"device {device}, backend {backend.name} ({why}), model {args.model}, {args.dtype} -> {dtype}")
    print(f"{n} prompts x up to {new_tokens} new tokens, batch {args.batch_size}, chunks of {args.chunk_size}")
    runs = [("in this process", None)]
    for size in sorted({1, *args.processes}):
        runs.append(
            (
                f"{size} worker process{'es' * (size > 1)}",
                Replicas(args.model_path, args.dtype, backend.name, size, args.tensor_parallel, device),
            )
        )
    reference, base = None, None
    rows = []
    for label, model in runs:
        out, tokens, seconds = timed(model, tokenizer, texts, sampling, args, backend)
        reference = reference or out
        rate = tokens / seconds
        if model is not None and model.size == 1:
            base = rate
        rows.append((label, tokens, seconds, rate, out == reference))
    print(f"\n{'':<20} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x 1 worker':>10}  same samples")
    for label, tokens, seconds, rate, same in rows:
        print(f"{label:<20} {tokens:>7} {seconds:>8.1f} {rate:>7.1f} {rate / base:>10.2f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
