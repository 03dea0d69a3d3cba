"""Stage 3: score each response *with its reasoning*, then pair the best and worst (paper, section 3.3).

Backends:
- ``llm_judge``: a model (the policy by default) reads a rubric, the question and the full response; the
  score is the expected value of the digit it would write, from its next-token probabilities.
- ``reward_model``: a sequence-classification reward model reads the conversation through its own chat
  template; the score is its first logit.
"""

from __future__ import annotations

import math
from collections import defaultdict

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
    from tqdm import tqdm

    prefill, cand = candidate_token_ids(tokenizer, JUDGE_PREFILL, [str(v) for v in JUDGE_VALUES])
    prompts, truncated = [], 0
    for row in rows:
        response, cut = _fit_response(tokenizer, row["question"], row["response"], max_length)
        truncated += cut
        prompts.append(judge_prompt(tokenizer, row["question"], response, prefill))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[dict] = [{}] * len(prompts)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="judging", unit="batch"):
        idx = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, -1, :]  # left padding: the last position is every row's next token
        scores, mass = expected_score(logits, cand)
        for i, s, m in zip(idx, scores, mass):
            out[i] = {"reward": s, "judge_mass": m}
    return out, {"truncated": truncated}


def reward_model_scores(model, tokenizer, rows: list[dict], batch_size: int, max_length: int) -> tuple[list[dict], dict]:
    """Score rows with a sequence-classification reward model over the full conversation."""
    import torch
    from tqdm import tqdm

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}],
            tokenize=False,
        )
        for r in rows
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    truncated = sum(n > max_length for n in lengths)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[dict] = [{}] * len(texts)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="reward model", unit="batch"):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, add_special_tokens=False).to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, 0].float()
        for i, s in zip(idx, logits.tolist()):
            out[i] = {"reward": s}
    return out, {"truncated": truncated}


def load_reward_model(path: str, dtype: str, device: str):
    """Load a sequence-classification reward model and its tokenizer (right padding for classification)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .models import torch_dtype

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype, device))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def build_preference_pairs(rows: list[dict], min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """Best vs worst response per question; the best must have finished its turn.

    A response cut off at ``max_new_tokens`` may be rejected but is never chosen: training on it would
    teach the model to stop mid-thought. Skipped and counted: NaN scores; questions with no finished
    response or fewer than two scored ones; pairs whose margin is not above ``min_margin`` (ties).
    """
    by_question: dict[str, list[dict]] = defaultdict(list)
    stats = {"questions": 0, "pairs": 0, "responses_unfinished": 0, "nan": 0, "no_finished": 0, "too_few": 0,
             "margin_too_small": 0}
    for row in rows:
        by_question[row["question_id"]].append(row)
    pairs = []
    for qid, group in by_question.items():
        stats["questions"] += 1
        scored = []
        for r in group:
            stats["responses_unfinished"] += not r.get("finished", True)
            if r.get("reward") is None or math.isnan(r["reward"]):
                stats["nan"] += 1
            else:
                scored.append(r)
        finished = [r for r in scored if r.get("finished", True)]
        if len(scored) < 2:
            stats["too_few"] += 1
            continue
        if not finished:
            stats["no_finished"] += 1
            continue
        # Among equal scores the earliest response wins / loses (max and min keep the first).
        best = max(finished, key=lambda r: r["reward"])
        worst = min((r for r in scored if r is not best), key=lambda r: r["reward"])
        margin = best["reward"] - worst["reward"]  # negative when the only finished answer scored lowest
        if margin <= min_margin:
            stats["margin_too_small"] += 1
            continue
        pairs.append({
            "question_id": qid,
            "prompt": best["prompt"],
            "chosen": [{"role": "assistant", "content": best["response"]}],
            "rejected": [{"role": "assistant", "content": worst["response"]}],
            "chosen_id": best["id"],
            "rejected_id": worst["id"],
            "chosen_score": best["reward"],
            "rejected_score": worst["reward"],
            "margin": margin,
            "scorer": best.get("scorer"),
            "iteration": best.get("iteration"),
        })
    stats["pairs"] = len(pairs)
    return pairs, stats


def sft_rows(pairs: list[dict]) -> list[dict]:
    """The winners in TRL's conversational prompt/completion format (loss on the completion only)."""
    keys = ("question_id", "chosen_id", "chosen_score", "scorer", "iteration")
    return [{"prompt": p["prompt"], "completion": p["chosen"], **{k: p[k] for k in keys}} for p in pairs]


def score_responses(rows: list[dict], section, *, policy_path: str, dtype: str) -> tuple[list[dict], dict]:
    """Score every response row with the backend in ``section`` (params ``reward``); adds ``reward``, ``scorer``."""
    from .models import load_causal_lm, load_tokenizer, pick_device, resolve_model

    device = pick_device()
    if section.backend == "llm_judge":
        judge = resolve_model(section.model) if section.model else policy_path
        model, tokenizer = load_causal_lm(judge, dtype, device), load_tokenizer(judge)
        scores, stats = judge_scores(model, tokenizer, rows, section.batch_size, section.max_length)
        scorer = f"llm_judge:{'policy' if not section.model else section.model}"
    else:
        model, tokenizer = load_reward_model(resolve_model(section.model), dtype, device)
        scores, stats = reward_model_scores(model, tokenizer, rows, section.batch_size, section.max_length)
        scorer = f"reward_model:{section.model}"
    scored = [{**row, **score, "scorer": scorer} for row, score in zip(rows, scores)]
    return scored, {**stats, "scorer": scorer, "scored": len(scored)}


def run(params, paths) -> tuple[list[dict], list[dict], dict]:
    """The stage as the notebook runs it: score, pair, write rewards/sft/pairs files."""
    from .io import StageError, read_jsonl, write_json, write_jsonl
    from .models import resolve_model

    responses = read_jsonl(paths.responses)
    if not responses:
        raise StageError(f"reward: {paths.responses} has no responses")
    policy = paths.policy_model(resolve_model(params.model.name))
    scored, score_stats = score_responses(responses, params.reward, policy_path=policy, dtype=params.model.dtype)
    pairs, pair_stats = build_preference_pairs(scored, params.reward.min_margin)
    stats = {**pair_stats, **score_stats}
    write_jsonl(paths.rewards, scored)
    write_jsonl(paths.sft, sft_rows(pairs))
    write_json(paths.pair_stats, stats)
    write_jsonl(paths.pairs, pairs)  # last: its presence marks the stage done
    return scored, pairs, stats
