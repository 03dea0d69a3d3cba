"""The engine's CPU speed-ups against plain torch: the decode attention kernel, pre-packed linears, the
slot cache's re-layout. Each must give what the plain computation gives."""

import warnings

import pytest
import torch

import sedir_utils.engine.cpu_engine.kernels as kernels
from sedir_utils.core import models
from sedir_utils.engine.cpu_engine import scoped
from sedir_utils.engine.cpu_engine.engine import slot_attention, slot_cache_type
from sedir_utils.engine.cpu_engine.scoped import packed_linears


def reference_attention(query, key, value, counts, scale):
    """Float64, one row at a time, keys repeated for the grouped heads."""
    batch, heads, _, dim = query.shape
    group = heads // key.shape[1]
    out = []
    for b in range(batch):
        n = int(counts[b])
        k = key[b, :, :n].double().repeat_interleave(group, 0)
        v = value[b, :, :n].double().repeat_interleave(group, 0)
        weights = (query[b].double() @ k.transpose(-1, -2) * scale).softmax(-1)
        out.append(weights @ v)
    return torch.stack(out)


@pytest.fixture(autouse=True)
def fresh_kernel():
    kernels.decode_attention_kernel.cache_clear()
    yield
    kernels.decode_attention_kernel.cache_clear()


# dim 64 with groups of 3 is SmolLM2's shape (the AVX512-BF16 path where the CPU has it); dim 48 and one
# head per group take the generic loops.
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 48)])
def test_decode_attention_matches_reference(dtype, tolerance, heads, kv_heads, dim, processes):
    gen = torch.Generator().manual_seed(0)
    batch, columns = 5, 70
    query = torch.randn(batch, heads, 1, dim, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, columns, dim, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, columns, dim, generator=gen).to(dtype)
    # Garbage past each row's count must not be read.
    counts = torch.tensor([1, 9, 70, 33, 64])
    for b, n in enumerate(counts.tolist()):
        key[b, :, n:] = float("nan")
        value[b, :, n:] = float("nan")
    out = kernels.decode_attention(query, key, value, counts, dim**-0.5)
    assert out is not None and out.dtype == dtype and out.shape == query.shape
    expected = reference_attention(query, key, value, counts, dim**-0.5)
    assert torch.allclose(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_slot_attention_kernel_and_matmuls_agree(monkeypatch, processes):
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, 9, 1, 64, generator=gen)
    key, value = torch.randn(4, 3, 32, 64, generator=gen), torch.randn(4, 3, 32, 64, generator=gen)
    lengths = torch.tensor([0, 5, 31, 17])
    mask = (torch.arange(32) <= lengths[:, None])[:, None, None, :]
    with_kernel, _ = slot_attention(None, query, key, value, mask, scaling=0.125)
    monkeypatch.setenv("SEDIR_NO_KERNELS", "1")
    kernels.decode_attention_kernel.cache_clear()
    with_matmuls, _ = slot_attention(None, query, key, value, mask, scaling=0.125)
    assert kernels.decode_attention_kernel() is None
    assert torch.allclose(with_kernel, with_matmuls, atol=1e-5)


def test_build_reuses_its_library_and_fails_in_one_line(tmp_path, monkeypatch, processes):
    first = kernels.build(tmp_path)
    assert first.is_file() and list(tmp_path.iterdir()) == [first]  # no temporary left behind
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt an existing library"))
    assert kernels.build(tmp_path) == first
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"^false failed on decode_attention\.c: no message$"):
        kernels.build(tmp_path / "other", compiler="false")
    assert not any((tmp_path / "other").iterdir())


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    def no_compiler(out_dir):
        raise RuntimeError("no C compiler found (set CC)")

    monkeypatch.setattr(kernels, "build", no_compiler)
    with pytest.warns(UserWarning, match="decode attention kernel unavailable, using torch's matmuls: no C compiler"):
        assert kernels.decode_attention_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, kv = torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 4, 8)
        assert kernels.decode_attention(q, kv, kv, torch.tensor([4]), 1.0) is None  # said once, not again


class Tagged(torch.nn.Linear):
    """Stands for a subclass of nn.Linear (a LoRA or quantised layer): packing must leave it alone."""


def _small_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), Tagged(32, 8, bias=False), torch.nn.Linear(8, 4, bias=False)
    ).to(dtype)
    return model, torch.randn(3, 5, 16, dtype=dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.0), (torch.float32, 1e-5)])
def test_packed_linears_match_and_are_restored(dtype, tolerance):
    if dtype == torch.bfloat16 and not models.onednn_bf16():
        pytest.skip("oneDNN computes no bf16 on this CPU, so nothing is packed in bf16 (the next test poses that)")
    model, x = _small_model(dtype)
    with torch.inference_mode():
        plain = model(x)
        with packed_linears(model):
            assert "forward" in vars(model[0]) and "forward" in vars(model[3])
            assert "forward" not in vars(model[2])
            packed = model(x)
        assert all("forward" not in vars(m) for m in model)
        again = model(x)
    assert torch.allclose(packed.float(), plain.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(again, plain)


def test_bf16_linears_stay_plain_where_onednn_has_no_bf16(monkeypatch):
    monkeypatch.setattr(models, "onednn_bf16", lambda: False)
    scoped.packing_problem.cache_clear()
    model, x = _small_model(torch.bfloat16)
    try:
        assert scoped.packing_problem(torch.bfloat16) == "oneDNN has no bf16 on this CPU"
        with torch.inference_mode():
            plain = model(x)
            with packed_linears(model):
                assert not any("forward" in vars(m) for m in model)
                assert torch.equal(model(x), plain)
    finally:
        scoped.packing_problem.cache_clear()


def test_slot_cache_fit_keeps_rows_and_shrinks_late():
    cache = slot_cache_type()(num_layers=1, slots=2, device="cpu", step=4)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(2, 1, 1, 3), torch.zeros(2, 1, 1, 3))
    layer.keys[:, :, :4] = torch.arange(24.0).reshape(2, 1, 4, 3)
    before = layer.keys.clone()
    cache.fit(10)  # grows to the next multiple of the step, rows kept
    assert cache.columns == 12 and layer.keys.shape == (2, 1, 12, 3) and layer.keys.is_contiguous()
    assert torch.equal(layer.keys[:, :, :4], before) and not layer.keys[:, :, 4:].any()
    cache.fit(8)  # one step narrower: kept, so a finishing row does not re-lay everything out
    assert cache.columns == 12
    cache.fit(3)  # two steps narrower: shrinks
    assert cache.columns == 4 and torch.equal(layer.keys, before)


def test_loading_the_kernel_leaves_the_processes_denormal_mode_alone(processes):
    """A library linked with -ffast-math by GCC < 13 turns on flush-to-zero for the thread that loads it
    (crtfastmath's constructor), silently changing every later float computation of the process."""
    import subprocess
    import sys

    script = (
        "import torch, sedir_utils.engine.cpu_engine.kernels as k\n"
        "x = torch.full((4,), 1e-39)\n"
        "torch.set_num_threads(1)\n"
        "assert k.decode_attention_kernel() is not None\n"
        "print(bool((x * 1.0).ne(0).all()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # denormals survive: the caller's mode is unchanged


def _denormal_prone_attention(dtype):
    """One row whose second column's softmax weight is ~e^-96 (a denormal float32, or zero if flushed),
    times a value near float's top: the output reads 0 or ~5e-4 by the denormal mode alone."""
    dim, rows = 64, 6
    query = torch.full((rows, 3, 1, dim), 4.0)
    key = torch.zeros(rows, 1, 2, dim)
    key[:, :, 0], key[:, :, 1] = 4.0, 1.0
    value = torch.zeros(rows, 1, 2, dim)
    value[:, :, 1] = 3.0e38
    return query.to(dtype), key.to(dtype), value.to(dtype), torch.full((rows,), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_results_do_not_depend_on_the_callers_denormal_mode_or_threads(dtype, processes):
    """The kernel sets its own floating-point mode in every thread it runs on (and restores it), so which
    thread takes a row, and what the caller set, cannot change a bit of its output."""
    query, key, value, counts = _denormal_prone_attention(dtype)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for flush in (False, True):
            for n in (1, 2):
                torch.set_flush_denormal(flush)
                torch.set_num_threads(n)
                outputs.append(kernels.decode_attention(query, key, value, counts, 0.125))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert all(o is not None and torch.equal(o, outputs[0]) for o in outputs)
    assert not outputs[0].isnan().any()
