"""``llm_judge`` (self-rewarding): a model, the policy by default, reads a rubric, the question and the whole
response; the score is the expected value of the 0-9 digit it would write, from its next-token
probabilities (no regex over sampled text)."""

from __future__ import annotations

from sedir_utils.core.models import resolve_model
from sedir_utils.core.progress import bar
from sedir_utils.engine.sampling import length_sorted_batches
from sedir_utils.engine.scorers.base import Scorer

JUDGE_RUBRIC = (
    "Please act as an impartial judge of the response below to the user's question. Judge whether the "
    "reasoning is sound, whether each step follows from the last, and whether the final answer is correct "
    "and clearly stated.\n\n"
    "[Question]\n{question}\n\n[Response]\n{response}\n\n"
    "Rate the response from 0 (wrong or no reasoning) to 9 (correct, with sound and clear reasoning). "
    "Reply with the digit only."
)

JUDGE_PREFILL = "Score:"

JUDGE_VALUES = tuple(range(10))


def candidate_token_ids(tokenizer, prefix: str, candidates: list[str]) -> tuple[str, list[int]]:
    """How the judge's answer starts and which single token each candidate is after it.

    Tokenizers differ: SmolLM2 and Qwen write a space token and then the digit, others fold the space
    into the digit's token. Returns the prefill text (``'Score: '`` or ``'Score:'``) and the ids.
    """
    for head, spelling in ((prefix + " ", "{}"), (prefix, " {}")):
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = []
        for c in candidates:
            full = tokenizer(head + spelling.format(c), add_special_tokens=False)["input_ids"]
            if full[: len(head_ids)] != head_ids or len(full) != len(head_ids) + 1:
                break
            ids.append(full[-1])
        if len(ids) == len(candidates) and len(set(ids)) == len(ids):
            return head, ids
    raise ValueError(f"the judge's tokenizer does not write each of {candidates} as one token after {prefix!r}")


def expected_score(logits, candidate_ids: list[int], values=JUDGE_VALUES) -> tuple[list[float], list[float]]:
    """Expected value over the candidate tokens' renormalised probabilities, per row of ``logits``.

    Also returns the probability mass the judge put on the candidates at all (low mass: it wanted to
    write something else, so the score means little).
    """
    import torch

    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)[:, candidate_ids]
    mass = probs.sum(-1)
    weights = probs / mass.unsqueeze(-1)
    scores = (weights * torch.tensor(values, dtype=weights.dtype)).sum(-1)
    return scores.tolist(), mass.tolist()


def judge_prompt(tokenizer, question: str, response: str, prefill: str = JUDGE_PREFILL) -> str:
    """The rubric as a user turn, then the opening of the judge's answer (``prefill``)."""
    messages = [{"role": "user", "content": JUDGE_RUBRIC.format(question=question, response=response)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def _fit_response(tokenizer, question: str, response: str, max_length: int) -> tuple[str, bool]:
    """Cut the response (not the rubric) so the judge prompt fits ``max_length`` tokens."""
    overhead = len(tokenizer(judge_prompt(tokenizer, question, ""), add_special_tokens=False)["input_ids"])
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    budget = max(max_length - overhead, 0)
    if len(ids) <= budget:
        return response, False
    return tokenizer.decode(ids[:budget], clean_up_tokenization_spaces=False), True


def judge_scores(model, tokenizer, rows: list[dict], batch_size: int, max_length: int) -> tuple[list[dict], dict]:
    """Score rows (``question``, ``response``) with an LLM judge; returns per-row score dicts and stats."""
    import torch

    prefill, cand = candidate_token_ids(tokenizer, JUDGE_PREFILL, [str(v) for v in JUDGE_VALUES])
    prompts, truncated = [], 0
    for row in rows:
        response, cut = _fit_response(tokenizer, row["question"], row["response"], max_length)
        truncated += cut
        prompts.append(judge_prompt(tokenizer, row["question"], response, prefill))
    out: list[dict] = [{}] * len(prompts)
    device = next(model.parameters()).device
    for idx in bar(length_sorted_batches([len(p) for p in prompts], batch_size), desc="judging", unit="batch"):
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        with torch.inference_mode():
            logits = model(**batch).logits[:, -1, :]  # left padding: the last position is every row's next token
        scores, mass = expected_score(logits, cand)
        for i, s, m in zip(idx, scores, mass):
            out[i] = {"score": s, "judge_mass": m}
    return out, {"truncated": truncated}


class LLMJudge(Scorer):
    name = "llm_judge"
    scale = 9.0  # digits 0-9

    def models(self, section) -> dict[str, str]:
        return {"reward.judge_model": section.judge_model} if section.judge_model else {}

    def score(self, rows, ctx):
        judge = resolve_model(ctx.section.judge_model) if ctx.section.judge_model else ctx.policy_path
        return ctx.in_chunks(self.name, judge_scores, rows, model=judge)
