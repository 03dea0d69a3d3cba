"""A CPU kernel torch lacks: decode attention with grouped heads and per-row lengths, built at first use.

For one decoded token per row, torch offers batched matmuls (tiny ``group x dim`` by ``dim x columns``
products, far from the memory floor) or SDPA (slower still on the CPU, measured in ``benchmarks/``).
``csrc/decode_attention.c`` reads each row's cached keys and values once, only up to that row's length.
It is compiled here with the system C compiler (``$CC``, else ``gcc``/``cc``; ``-O3 -march=native
-ffast-math -fopenmp``) into ``cache_dir()/kernels`` once per source, flags and CPU, and loaded with ctypes.
It is linked without ``-ffast-math``: GCC before 13 then adds ``crtfastmath.o``, whose constructor turns on
flush-to-zero for the thread that loads the library, changing the rounding of every later computation in
the process (the kernel sets that mode itself, per thread and per call, and restores it). Where
that fails (no compiler, no OpenMP), ``decode_attention_kernel()`` returns None, says why once, and the
engine keeps torch's matmuls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from sedir_utils.core.models import cache_dir

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK_FLAGS = ["-shared", "-fopenmp"]  # no -ffast-math here: see the module's docstring
FLAGS = f"{' '.join(COMPILE_FLAGS)}, then {' '.join(LINK_FLAGS)}"  # for the build key and the manifest
SYMBOLS = {"torch.bfloat16": "decode_attention_bf16", "torch.float32": "decode_attention_f32"}  # by str(dtype)


def _cpu_signature() -> str:
    """The CPU's feature flags (a ``-march=native`` build must not be reused on another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler(compiler: str | None = None) -> str | None:
    return compiler or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build_key(compiler: str) -> str:
    """What a build depends on: the source, the flags, the compiler, this CPU's features."""
    return hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), FLAGS.encode(), compiler.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]


def build_info() -> dict:
    """How the kernel is (or would be) built here, for the run manifest: a different build, or none, samples
    with different floating-point rounding (``SEDIR_NO_KERNELS`` turns it off)."""
    compiler = _compiler()
    if os.environ.get("SEDIR_NO_KERNELS") or not compiler:
        return {"kernel": None, "why": "SEDIR_NO_KERNELS is set" if compiler else "no C compiler"}
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return {
        "kernel": f"decode_attention-{_build_key(compiler)}.so",
        "compiler": compiler,
        "compiler_version": (version.splitlines() or [""])[0],
        "flags": FLAGS,
        "cpu_flags_sha256": hashlib.sha256(_cpu_signature().encode()).hexdigest()[:16],
    }


def build(out_dir: Path, compiler: str | None = None) -> Path:
    """Compile the kernel into ``out_dir`` (write, then rename) unless this build is already there."""
    compiler = _compiler(compiler)
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    key = _build_key(compiler)
    target = Path(out_dir) / f"decode_attention-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".decode_attention.", suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        for command in (
            [compiler, *COMPILE_FLAGS, str(SOURCE), "-o", obj],
            [compiler, *LINK_FLAGS, obj, "-o", tmp, "-lm"],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {first}")
        os.replace(tmp, target)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return target


@functools.lru_cache(maxsize=1)
def decode_attention_kernel():
    """The loaded library, or None (with one warning saying why) where it cannot be built here."""
    if os.environ.get("SEDIR_NO_KERNELS"):
        return None
    try:
        lib = ctypes.CDLL(str(build(cache_dir() / "kernels")))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"decode attention kernel unavailable, using torch's matmuls: {err}", stacklevel=2)
        return None
    for name in SYMBOLS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    return lib


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, counts: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Attention of ``query`` ``[batch, heads, 1, dim]`` against ``key``/``value`` ``[batch, kv_heads,
    columns, dim]``, row ``b`` reading its first ``counts[b]`` columns. Returns ``[batch, heads, 1, dim]``,
    or None where the kernel does not apply (not built, not the CPU, another dtype)."""
    import torch  # not at the top: the manifest reads build_info without loading torch

    symbol = SYMBOLS.get(str(key.dtype))
    if symbol is None or key.device.type != "cpu" or value.dtype != key.dtype:
        return None
    lib = decode_attention_kernel()
    if lib is None:
        return None
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    query = query.to(key.dtype).contiguous()
    key, value = key.contiguous(), value.contiguous()
    counts = counts.to(torch.int64).contiguous()
    out = torch.empty_like(query)
    failed = getattr(lib, symbol)(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        counts.data_ptr(),
        out.data_ptr(),
        batch,
        kv_heads,
        heads // kv_heads,
        columns,
        dim,
        float(scale),
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("decode attention kernel: out of memory for its scratch buffers")
    return out
