"""``self_certainty`` (Kang et al. 2025, reward-free best-of-N): the mean over response tokens of
KL(uniform || p), from the policy's full next-token distributions. Confident answers score high."""

from __future__ import annotations

import math

from sedir_utils.core.progress import bar
from sedir_utils.engine.sampling import length_sorted_batches
from sedir_utils.engine.scorers.base import Scorer


def self_certainty_from_logits(logits) -> float:
    """Mean over positions of KL(uniform || softmax(logits)) = -log V - mean_j log p_j; ``logits`` is [T, V]."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -math.log(logits.shape[-1]) - logp.mean(dim=-1)
    return per_token.mean().item()


def self_certainty_scores(
    model, tokenizer, rows: list[dict], batch_size: int, max_length: int
) -> tuple[list[dict], dict]:
    """Self-certainty of each response under ``model``, given the prompt it answered (``row['prompt']``)."""
    import torch

    seqs, spans, truncated = [], [], 0
    for row in rows:
        prefix = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        if len(p_ids) + len(r_ids) > max_length:
            truncated += 1
            r_ids = r_ids[: max(max_length - len(p_ids), 0)]
        seqs.append(p_ids + r_ids)
        spans.append((len(p_ids), len(r_ids)))
    out: list[dict] = [{}] * len(rows)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for idx in bar(length_sorted_batches([len(s) for s in seqs], batch_size), desc="self-certainty", unit="batch"):
        width = max(len(seqs[i]) for i in idx)
        # Right padding keeps every row's positions where they were.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[b, : len(seqs[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for b, i in enumerate(idx):
            p_len, r_len = spans[i]
            # The distribution that produced response token t sits at position t - 1.
            value = self_certainty_from_logits(logits[b, p_len - 1 : p_len + r_len - 1]) if r_len else math.nan
            out[i] = {"score": value}
    return out, {"truncated": truncated}


class SelfCertainty(Scorer):
    name = "self_certainty"

    def score(self, rows, ctx):
        return ctx.in_chunks(self.name, self_certainty_scores, rows, model=ctx.policy_path)
