"""``reward_model``: a sequence-classification reward model reads the conversation through its own chat
template; the score is its first logit."""

from __future__ import annotations

from sedir_utils.core.models import resolve_model
from sedir_utils.core.progress import bar
from sedir_utils.engine.sampling import length_sorted_batches
from sedir_utils.engine.scorers.base import Scorer


def reward_model_scores(
    model, tokenizer, rows: list[dict], batch_size: int, max_length: int
) -> tuple[list[dict], dict]:
    """Score rows with a sequence-classification reward model over the full conversation."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}],
            tokenize=False,
        )
        for r in rows
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    truncated = sum(n > max_length for n in lengths)
    out: list[dict] = [{}] * len(texts)
    device = next(model.parameters()).device
    for idx in bar(length_sorted_batches(lengths, batch_size), desc="reward model", unit="batch"):
        batch = tokenizer(
            [texts[i] for i in idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        ).to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, 0].float()
        for i, s in zip(idx, logits.tolist()):
            out[i] = {"score": s}
    return out, {"truncated": truncated}


class RewardModel(Scorer):
    name = "reward_model"

    def models(self, section) -> dict[str, str]:
        return {"reward.reward_model": section.reward_model} if section.reward_model else {}

    def check(self, section) -> str | None:
        if not section.reward_model:
            return "reward.reward_model: the reward_model scorer needs a model id or folder"
        return None

    def score(self, rows, ctx):
        model = resolve_model(ctx.section.reward_model)
        return ctx.in_chunks(self.name, reward_model_scores, rows, model=model, loader="reward_model")
