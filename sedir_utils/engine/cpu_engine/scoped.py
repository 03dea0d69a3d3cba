"""What the engine changes in the process while it samples, each put back when sampling ends.

- ``flush_denormals``: denormal floats as zero (near-zero probabilities are otherwise very slow on the
  CPU), then the mode the calling thread had before.
- ``malloc_kept``: glibc keeps freed memory for reuse instead of unmapping large blocks (sampling allocates
  and frees the same megabyte-sized temporaries thousands of times), then glibc's defaults and a trim.
- ``packed_linears``: plain ``nn.Linear`` layers run from weights pre-packed for oneDNN, then their own
  forward again. Packing uses private oneDNN ops; ``packing_problem`` tries them once on a small layer
  against ``F.linear`` and, where they are missing or disagree (a torch upgrade), sampling keeps the plain
  layers: slower, not wrong.

The figures behind each (page faults, GFLOP/s, tokens/s) are measured by ``benchmarks/generation.py`` and
kept in docs/backends.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import warnings
from typing import TYPE_CHECKING

from sedir_utils.core import models

if TYPE_CHECKING:
    import torch

# glibc's mallopt parameters and their defaults (malloc/malloc.c): what ``malloc_kept`` restores.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_DEFAULTS = {M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 0}
KEPT = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 64 << 20}  # 32 MiB: glibc's cap
# A user who tunes malloc through the environment keeps their settings.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def flush_denormals_on() -> bool:
    """Whether the calling thread flushes denormals now (torch can set the mode but not read it)."""
    import torch

    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormals():
    import torch

    before = flush_denormals_on()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


@contextlib.contextmanager
def malloc_kept():
    """Raise glibc's mmap threshold to its cap and stop heap trimming for the duration; after, set glibc's
    defaults back and hand the kept memory back (``malloc_trim``). glibc's dynamic mmap threshold stays off
    after any ``mallopt`` (its rule): large blocks are then mapped from 128 KiB, glibc's static default."""
    libc = None if any(os.environ.get(name) for name in MALLOC_ENV) else _libc()
    if libc is None:
        yield
        return
    mallopt, malloc_trim = libc
    for param, value in KEPT.items():
        mallopt(param, value)
    try:
        yield
    finally:
        for param, value in GLIBC_DEFAULTS.items():
            mallopt(param, value)
        malloc_trim(0)


@functools.cache
def packing_problem(dtype: torch.dtype) -> str | None:
    """None where pre-packed linears work for ``dtype`` here, else why not (said once, as a warning).

    Tried on a small layer: pack with ``_reorder_linear_weight``, run with ``_linear_pointwise``, compare
    with ``F.linear``.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return "torch has no oneDNN"
    if dtype == torch.bfloat16 and not models.onednn_bf16():
        return "oneDNN has no bf16 on this CPU"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packs float32 and bfloat16, not {dtype}"
    generator = torch.Generator().manual_seed(0)
    weight, bias, x = (torch.randn(shape, generator=generator).to(dtype) for shape in ((24, 32), (24,), (5, 32)))
    try:
        with torch.no_grad():
            got = _packed_linear(_pack(weight), bias, x)
    except (AttributeError, RuntimeError, TypeError) as err:
        problem = f"oneDNN's private linear ops failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    else:
        want = torch.nn.functional.linear(x, weight, bias)
        close = got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=0.02, atol=0.05)
        problem = None if close else "oneDNN's private linear ops disagree with F.linear"
    if problem:
        warnings.warn(
            f"sampling without pre-packed linear layers ({dtype}): {problem}; slower, same method", stacklevel=3
        )
    return problem


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return models._onednn()._reorder_linear_weight(weight.detach(), None)


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return models._onednn()._linear_pointwise(x, packed, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model):
    """Run ``model``'s plain ``nn.Linear`` layers from weights pre-packed for oneDNN, then restore them.

    An eager CPU ``F.linear`` hands oneDNN a plain row-major weight, which it re-lays-out into its blocked
    format on every call; packing once (the layout torch.compile uses with ``freezing``) saves that.
    Subclasses of ``nn.Linear`` (LoRA, quantised layers) are left alone, as is anything not on the CPU.
    The packed copies live only inside the context (weights must not change there: sampling never trains).
    """
    import torch

    swapped = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or "forward" in vars(module):  # another call packed it already
            continue
        if weight.device.type != "cpu" or packing_problem(weight.dtype):
            continue
        with torch.no_grad():
            module.forward = functools.partial(_packed_linear, _pack(weight), module.bias)
        swapped.append((module, module.forward))
    try:
        yield
    finally:
        for module, forward in swapped:
            if vars(module).get("forward") is forward:
                del module.forward
