"""Seeded sampling that stops at the model's end-of-turn token.

Transformers models go through ``engine.stream`` (continuous batching, no decoding past the end of a
turn); a ``vllm.LLM`` goes through vLLM with the same settings (CUDA only; unverified here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# Tokens that close a turn in common chat templates; whichever the vocabulary has also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k (transformers would otherwise default to 50)
    max_new_tokens: int = 128
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_section(cls, section) -> "SamplingParams":
        return cls(section.temperature, section.top_p, section.top_k, section.max_new_tokens,
                   getattr(section, "min_p", 0.0))


@dataclass
class Generation:
    text: str  # up to, not including, the end-of-turn token
    num_tokens: int
    finished: bool  # False: hit max_new_tokens before ending its turn


def response_messages(question: str, instruction: str) -> list[dict]:
    """The conversation the policy answers: the question, then the reasoning instruction."""
    content = f"{question}\n\n{instruction}" if instruction else question
    return [{"role": "user", "content": content}]


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a turn: the generation config's eos, the tokenizer's eos, known turn closers."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(value)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(set(ids))


def length_sorted_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first, so each batch pads little (ties keep order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + size] for start in range(0, len(order), size)]


def generate(model, tokenizer, prompts: list[str], sampling: SamplingParams, batch_size: int, seed: int,
             desc: str = "generating", checkpoint: str | Path | None = None,
             chunk_size: int | None = None) -> list[Generation]:
    """Sample one completion per prompt (prompts are rendered chat text, special tokens included).

    ``batch_size`` is the number of sequences decoded together. Prompt ``i`` samples from its own
    generator seeded from ``seed`` and ``i``: the same prompts, batch size and seed give the same texts.

    With ``checkpoint`` (a folder), prompts run in chunks of ``chunk_size`` (default 4 x batch size) and
    each finished chunk is written there atomically under a key of everything that determines it; a
    rerun after a crash reads finished chunks back and samples only the rest, to the same result.
    """
    from .io import chunked, digest, model_identity

    size = chunk_size or 4 * batch_size
    starts = list(range(0, len(prompts), size)) if checkpoint is not None else [0]
    parts = [prompts[start : start + size] for start in starts] if checkpoint is not None else [prompts]
    identity = model_identity(model) if checkpoint is not None else None

    def compute(c, part):
        label = f"{desc} [{c + 1}/{len(parts)}]" if len(parts) > 1 else desc
        return [asdict(g) for g in _generate(model, tokenizer, part, sampling, batch_size, seed, label,
                                             first_index=starts[c])]

    key = lambda c, part: digest(part, sampling.as_dict(), batch_size, seed, starts[c], identity)  # noqa: E731
    return [Generation(**row) for rows in chunked(checkpoint, "chunk", parts, key, compute) for row in rows]


def _generate(model, tokenizer, prompts: list[str], sampling: SamplingParams, batch_size: int, seed: int,
              desc: str, first_index: int = 0) -> list[Generation]:
    if is_vllm(model):
        return vllm_generate(model, tokenizer, prompts, sampling, seed, first_index)
    import torch
    from tqdm import tqdm

    from .engine import Decoding, stream

    stop_ids = end_of_turn_ids(tokenizer, model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    decoding = Decoding(sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
    results: list[Generation | None] = [None] * len(prompts)
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="seq") as bar:
        for done in stream(model, encoded, decoding, sampling.max_new_tokens, stop_ids, batch_size, seed,
                           pad_id=pad_id, first_index=first_index):
            results[done.index] = Generation(
                text=tokenizer.decode(done.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                num_tokens=len(done.tokens),
                finished=done.finished,
            )
            bar.update(1)
    return results  # type: ignore[return-value]


def is_vllm(model) -> bool:
    return type(model).__module__.split(".")[0] == "vllm"


def vllm_sampling_kwargs(sampling: SamplingParams, stop_ids: list[int], seed: int) -> dict:
    """``vllm.SamplingParams`` arguments equal to ``sampling`` (vLLM disables top-k with -1)."""
    return dict(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
                min_p=sampling.min_p, max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=stop_ids,
                skip_special_tokens=False)


def vllm_generate(llm, tokenizer, prompts: list[str], sampling: SamplingParams, seed: int,
                  first_index: int = 0) -> list[Generation]:
    """The same contract through vLLM: per-prompt seeds, stop at end of turn (CUDA only; unverified here)."""
    from vllm import SamplingParams as VllmSampling
    from vllm.inputs import TokensPrompt

    stop_ids = end_of_turn_ids(tokenizer)
    requests = [TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    settings = [VllmSampling(**vllm_sampling_kwargs(sampling, stop_ids, seed * 1_000_003 + first_index + i))
                for i in range(len(prompts))]
    outputs = llm.generate(requests, settings, use_tqdm=True)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = [t for t in completion.token_ids if t not in stop_ids]
        results.append(Generation(
            text=tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            num_tokens=len(tokens), finished=completion.finish_reason == "stop"))
    return results
