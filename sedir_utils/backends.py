"""Sampling backends: one interface, chosen in one place (``choose``) by device and params.

- ``cpu-engine``: the suite's own continuous-batching sampler (``sedir_utils.cpu_engine``), CPU only.
- ``vllm``: a ``vllm.LLM`` (CUDA with vllm installed; unverified here, see the README).
- ``transformers``: transformers' ``generate``, in length-sorted batches: a GPU without vLLM, or asked for.

Every backend keeps one contract (``Backend.sample``): rendered prompts in, one ``Generation`` per prompt
out, in order, text cut before the end-of-turn token, ``finished`` False where the budget ran out, and the
same prompts, batch size and seed give the same texts. ``auto`` takes the first registered backend, by
``priority``, that can run here. A new backend is a ``Backend`` subclass and ``register``: config,
preflight and the stages read this registry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import closing

from .generation import Generation, SamplingParams, end_of_turn_ids, length_sorted_batches

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
    needs: tuple[str, ...] = ()  # packages it imports
    transformers_model = True  # load() gives a transformers model (the policy embedder can reuse it)

    def problem(self, device: str, installed: Callable[[str], bool]) -> str | None:
        missing = [package for package in self.needs if not installed(package)]
        return f"{', '.join(missing)} is not installed" if missing else None

    def load(self, path: str, dtype: str, tensor_parallel_size: int = 1):
        from .models import load_causal_lm

        if tensor_parallel_size > 1:
            raise ValueError(f"the {self.name} backend has no tensor parallelism (vllm has)")
        return load_causal_lm(path, dtype)

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

        from .cpu_engine import Decoding, stream
        from .progress import bar as progress_bar

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

        from .progress import bar as progress_bar

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
    """A ``vllm.LLM`` with per-prompt seeds (``vllm.SamplingParams(seed=...)``), stopping at end of turn."""

    name, priority, needs, transformers_model = "vllm", 0, ("vllm",), False

    def problem(self, device, installed):
        if device != "cuda":
            return "no CUDA device"
        missing = super().problem(device, installed)
        return f"{missing} (pip install -e '.[vllm]')" if missing else None

    def load(self, path, dtype, tensor_parallel_size=1):
        from vllm import LLM

        return LLM(**vllm_engine_args(path, dtype, tensor_parallel_size=tensor_parallel_size))

    def sample(self, model, tokenizer, prompts, sampling, batch_size, seed, first_index, desc):
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        stop_ids = end_of_turn_ids(tokenizer)
        requests = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        settings = [
            VllmSampling(**vllm_sampling_kwargs(sampling, stop_ids, prompt_seed(seed, first_index + i)))
            for i in range(len(prompts))
        ]
        results = []
        for out in model.generate(requests, settings, use_tqdm=True):
            completion = out.outputs[0]
            tokens = [t for t in completion.token_ids if t not in stop_ids]
            results.append(Generation(_decode(tokenizer, tokens), len(tokens), completion.finish_reason == "stop"))
        return results


def vllm_engine_args(
    path: str, dtype: str, *, seed: int = 0, gpu_memory_utilization: float = 0.6, tensor_parallel_size: int = 1
) -> dict:
    """``vllm.LLM`` arguments for sampling from ``path``: the dtype resolved for this GPU (vLLM raises on
    bf16 without native support), prefix caching (n answers share a question's prompt), vLLM's own tensor
    parallelism over the GPUs this process sees (``model.tensor_parallel_size``)."""
    from .models import resolve_dtype

    return dict(
        model=path,
        dtype=resolve_dtype(dtype, "cuda"),
        seed=seed,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=True,
        tensor_parallel_size=tensor_parallel_size,
    )


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


def names() -> list[str]:
    return list(REGISTRY)


def choose(
    requested: str = "auto", device: str | None = None, *, installed: Callable[[str], bool] | None = None
) -> tuple[Backend, str]:
    """The backend that samples on ``device`` (default: CUDA if present, else the CPU), and why.

    ``requested`` is params ``model.generation_backend``: a registered name, or ``auto``. A name that
    cannot run here is a one-line error naming the field and the reason.
    """
    from .io import StageError
    from .models import pick_device

    device = device or pick_device()
    installed = installed or (lambda package: importlib.util.find_spec(package) is not None)
    if requested != "auto":
        if requested not in REGISTRY:
            raise StageError(f"{FIELD}: expected auto or one of {', '.join(REGISTRY)}, got {requested!r}")
        problem = REGISTRY[requested].problem(device, installed)
        if problem:
            raise StageError(f"{FIELD}: '{requested}' was asked for, but {problem}")
        return REGISTRY[requested], "params ask for it"
    skipped = []
    for backend in sorted(REGISTRY.values(), key=lambda b: b.priority):
        problem = backend.problem(device, installed)
        if problem is None:
            return backend, f"device {device}" + (f"; {'; '.join(skipped)}" if skipped else "")
        if backend.priority < 100:
            skipped.append(f"{backend.name} skipped: {problem}")
    raise StageError(f"{FIELD}: no sampling backend can run on {device}")


def for_model(model) -> Backend:
    """The backend that samples from an already loaded model: vLLM's for a ``vllm.LLM``, the CPU engine for
    a transformers model on the CPU, transformers' ``generate`` for one on a GPU; the one named by a
    ``parallel.Replicas``."""
    from .parallel import Replicas

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
    path: str, dtype: str, requested: str = "auto", data_parallel_size: int = 1, tensor_parallel_size: int = 1
):
    """The model that samples questions and answers, and its backend (chosen by ``choose``).

    With ``data_parallel_size`` above 1 nothing is loaded here: the model is a ``parallel.Replicas``, which
    ``generation.generate`` hands to that many worker processes (each with ``tensor_parallel_size`` GPUs).
    """
    from .models import pick_device
    from .parallel import Replicas

    backend, why = choose(requested)
    layout = f"; {data_parallel_size} processes" if data_parallel_size > 1 else ""
    layout += f"; tensor parallel over {tensor_parallel_size} GPUs" if tensor_parallel_size > 1 else ""
    print(f"generation backend: {backend.name} ({why}{layout})")
    if data_parallel_size > 1:
        return Replicas(path, dtype, backend.name, data_parallel_size, tensor_parallel_size, pick_device()), backend
    # a registered backend's load may take no tensor_parallel_size (only vllm has it)
    extra = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else {}
    return backend.load(path, dtype, **extra), backend
