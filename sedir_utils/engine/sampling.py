"""What sampling takes and gives, whichever backend samples: ``SamplingParams``, ``Generation``, the chat
messages of an answer, the end-of-turn tokens, and batches of similar length."""

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
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_section(cls, section) -> SamplingParams:
        return cls(
            section.temperature, section.top_p, section.top_k, section.max_new_tokens, getattr(section, "min_p", 0.0)
        )


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
