"""Score functions for worker processes (``scorers.score_chunk``'s ``score_fn``): chunks that fail at once or
take long, and a worker that crashes at exit after its chunks; tests/test_parallel.py checks that a failing
worker stops the others and that a crash after the chunks are written fails nothing."""

from __future__ import annotations

import time


def fail_or_wait(model, tokenizer, rows, batch_size, max_length):
    if rows[0]["response"] == "fail":
        raise RuntimeError("this chunk fails (posed)")
    time.sleep(30)  # were the worker not stopped, it would write this chunk after the wait
    return [{"score": 1.0} for _ in rows], {}


def crash_at_exit(model, tokenizer, rows, batch_size, max_length):
    """Scores, then the worker process ends with exit code 3 after writing its chunks (a teardown's crash)."""
    import atexit
    import os

    atexit.register(os._exit, 3)
    return [{"score": 2.0} for _ in rows], {}
