"""Batched, seeded sampling that stops at the model's end-of-turn token."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Tokens that close a turn in common chat templates; whichever the vocabulary has also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k (transformers would otherwise default to 50)
    max_new_tokens: int = 128

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_section(cls, section) -> "SamplingParams":
        return cls(section.temperature, section.top_p, section.top_k, section.max_new_tokens)


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
             desc: str = "generating") -> list[Generation]:
    """Sample one completion per prompt (prompts are rendered chat text, special tokens included).

    Prompts are sorted by length so each batch pads little; batch ``b`` is seeded with ``seed + b``,
    so the same prompts, batch size and seed give the same texts.
    """
    import torch
    from tqdm import tqdm

    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a tokenizer loaded with padding_side='left'")
    stop_ids = end_of_turn_ids(tokenizer, model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    results: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sample = sampling.temperature > 0
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sample, eos_token_id=stop_ids, pad_token_id=pad_id)
    if sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stop_set = set(stop_ids)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    for b, idx in enumerate(tqdm(batches, desc=desc, unit="batch")):
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        torch.manual_seed(seed + b)
        with torch.inference_mode():
            out = model.generate(**batch, **kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(idx, new_tokens):
            end = next((j for j, t in enumerate(tokens) if t in stop_set), None)
            kept = tokens if end is None else tokens[:end]
            results[i] = Generation(
                text=tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                num_tokens=len(kept),
                finished=end is not None,
            )
    return results  # type: ignore[return-value]
