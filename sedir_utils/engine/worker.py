"""The worker process of data parallelism (``python -m sedir_utils.engine.worker SPEC``, started by
sedir_utils/engine/parallel.py): it loads its model once, then samples or scores its chunks in order."""

from __future__ import annotations

import os
import sys

from sedir_utils.core.io import read_json, write_json
from sedir_utils.core.models import load_tokenizer
from sedir_utils.engine.backends import REGISTRY
from sedir_utils.engine.generation import sample_chunk
from sedir_utils.engine.sampling import SamplingParams
from sedir_utils.engine.scorers.base import LOADERS, score_chunk


def _work(spec: dict) -> None:
    """A worker: load the model once, compute its chunks in order, write each as soon as it is done."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and spec["device"] == "cpu":
        import torch

        torch.set_num_threads(int(threads))
    if spec["kind"] == "generate":
        backend = REGISTRY[spec["backend"]]
        model = backend.load(spec["path"], spec["dtype"], tensor_parallel_size=spec["tensor_parallel_size"])
        tokenizer = load_tokenizer(spec["path"])
        sampling = SamplingParams(**spec["sampling"])
        for job in spec["jobs"]:
            rows = sample_chunk(
                backend,
                model,
                tokenizer,
                job["items"],
                sampling,
                spec["batch_size"],
                spec["seed"],
                job["start"],
                "chunk",
            )
            write_json(job["path"], rows)
    elif spec["kind"] == "score":
        import importlib

        model, tokenizer = LOADERS[spec["loader"]](spec["path"], spec["dtype"], spec["device"])
        module, _, name = spec["score_fn"].partition(":")
        score_fn = getattr(importlib.import_module(module), name)
        for job in spec["jobs"]:
            write_json(
                job["path"],
                score_chunk(score_fn, model, tokenizer, job["items"], spec["batch_size"], spec["max_length"]),
            )
    else:
        raise ValueError(f"unknown worker kind {spec['kind']!r}")


if __name__ == "__main__":
    _work(read_json(sys.argv[1]))
