"""Which embedder tells near-duplicate questions from different ones: all-MiniLM-L6-v2 or the policy's states.

    python benchmarks/embedders.py

On pairs we wrote (a question and a paraphrase of it; the same question against other questions, some on
the same topic), prints for each embedder: AUROC of cosine similarity (paraphrase vs different), the
similarity quantiles of both groups, how many of each a threshold would call duplicates, and texts/s.
Prints figures only.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedir_utils.core.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from sedir_utils.core.stats import auroc  # noqa: E402
from sedir_utils.engine.embeddings import load_embedder  # noqa: E402

PAIRS = [
    (
        "What is the sum of the interior angles of a hexagon?",
        "How many degrees do the inner angles of a six-sided polygon add up to?",
    ),
    ("Why does ice float on water?", "Explain why frozen water floats instead of sinking."),
    (
        "A train travels 120 km in 2 hours. What is its average speed?",
        "If a train covers 120 kilometres in two hours, what's its mean speed?",
    ),
    ("Write a Python function that reverses a string.", "Implement a function in Python to reverse a given string."),
    ("What causes the seasons on Earth?", "Why do we have summer and winter on our planet?"),
    ("Is 91 a prime number?", "Determine whether 91 is prime."),
    ("How does photosynthesis produce oxygen?", "Explain where the oxygen released during photosynthesis comes from."),
    ("What is the derivative of x^3 + 2x?", "Differentiate x cubed plus two x."),
    ("Name the largest planet in the solar system.", "Which planet in our solar system is the biggest?"),
    ("How many moles are in 18 grams of water?", "Calculate the number of moles in 18 g of H2O."),
    ("What is the time complexity of binary search?", "How fast is binary search, in big-O notation?"),
    ("Why is the sky blue during the day?", "Explain the reason the daytime sky looks blue."),
    ("Solve for x: 3x + 5 = 20.", "Find x if three times x plus five equals twenty."),
    ("What is the capital of Australia?", "Which city is Australia's capital?"),
    (
        "How do vaccines train the immune system?",
        "Explain how a vaccine teaches the body's immune system to fight disease.",
    ),
    (
        "If a shirt costs $20 after a 20% discount, what was the original price?",
        "A shirt is $20 once 20% is taken off. What did it cost before the discount?",
    ),
    ("What is the difference between a list and a tuple in Python?", "How do Python lists differ from tuples?"),
    (
        "Why do objects fall at the same rate in a vacuum?",
        "Explain why a feather and a hammer fall equally fast without air.",
    ),
    ("How many edges does a cube have?", "Count the edges of a cube."),
    ("What does DNA polymerase do?", "Describe the role of the enzyme DNA polymerase."),
]


def main() -> None:
    questions = [a for a, _ in PAIRS]
    paraphrases = [b for _, b in PAIRS]
    path = resolve_model("embedded")
    model, tokenizer = load_causal_lm(path, "float32"), load_tokenizer(path, padding_side="right")
    print(f"{len(PAIRS)} paraphrase pairs, {len(PAIRS) * (len(PAIRS) - 1)} different pairs (our own questions)")
    print(
        f"{'embedder':9} {'AUROC':>6} {'paraphrase p10/p50':>19} {'different p50/p90/max':>22} "
        f"{'at 0.9: dup/diff':>17} {'at 0.8':>8} {'texts/s':>8}"
    )
    for kind in ("minilm", "policy"):
        start = time.perf_counter()
        embedder = load_embedder(kind, model, tokenizer)
        load = time.perf_counter() - start
        start = time.perf_counter()
        a, b = embedder.encode(questions), embedder.encode(paraphrases)
        rate = 2 * len(PAIRS) / (time.perf_counter() - start)
        sims = a @ b.T
        same = [float(sims[i, i]) for i in range(len(PAIRS))]
        different = [float(sims[i, j]) for i in range(len(PAIRS)) for j in range(len(PAIRS)) if i != j]
        score = auroc(same + different, [1] * len(same) + [0] * len(different))
        q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
        above = (same, different)
        at = lambda t, above=above: "/".join(str(sum(s >= t for s in xs)) for xs in above)  # noqa: E731
        print(
            f"{kind:9} {score:>6.3f} {q(same, 0.1):>9.2f}/{statistics.median(same):.2f}      "
            f"{statistics.median(different):>8.2f}/{q(different, 0.9):.2f}/{max(different):.2f}     "
            f"{at(0.9):>12} {at(0.8):>8} {rate:>8.0f}   (load {load:.1f} s)"
        )


if __name__ == "__main__":
    main()
