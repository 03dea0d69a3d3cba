"""Stage 3: score each response *with its reasoning*, then pair the best and worst (paper, section 3.3).

Scorers (params ``reward.scorers``; several combine into one reward):
- ``llm_judge`` (self-rewarding): a model, the policy by default, reads a rubric, the question and the whole
  response; the score is the expected value of the 0-9 digit it would write, from its next-token
  probabilities (no regex over sampled text).
- ``reward_model``: a sequence-classification reward model reads the conversation through its own chat
  template; the score is its first logit.
- ``self_certainty`` (Kang et al. 2025, reward-free best-of-N): the mean over response tokens of
  KL(uniform || p), from the policy's full next-token distributions. Confident answers score high.
- ``majority_vote`` (Crescent): the share of the question's responses whose final answer agrees with
  this one's; a response with no final answer scores 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from .generation import length_sorted_batches
from .stats import midranks, quantile

SCALES = {"llm_judge": 9.0, "majority_vote": 1.0}  # nominal score ranges, for the collapse check

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
    out: list[dict] = [{}] * len(prompts)
    device = next(model.parameters()).device
    for idx in tqdm(length_sorted_batches([len(p) for p in prompts], batch_size), desc="judging", unit="batch"):
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, -1, :]  # left padding: the last position is every row's next token
        scores, mass = expected_score(logits, cand)
        for i, s, m in zip(idx, scores, mass):
            out[i] = {"score": s, "judge_mass": m}
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
    out: list[dict] = [{}] * len(texts)
    device = next(model.parameters()).device
    for idx in tqdm(length_sorted_batches(lengths, batch_size), desc="reward model", unit="batch"):
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, add_special_tokens=False).to(device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, 0].float()
        for i, s in zip(idx, logits.tolist()):
            out[i] = {"score": s}
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


def self_certainty_from_logits(logits) -> float:
    """Mean over positions of KL(uniform || softmax(logits)) = -log V - mean_j log p_j; ``logits`` is [T, V]."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -math.log(logits.shape[-1]) - logp.mean(dim=-1)
    return per_token.mean().item()


def self_certainty_scores(model, tokenizer, rows: list[dict], batch_size: int, max_length: int) -> tuple[list[dict], dict]:
    """Self-certainty of each response under ``model``, given the prompt it answered (``row['prompt']``)."""
    import torch
    from tqdm import tqdm

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
    for idx in tqdm(length_sorted_batches([len(s) for s in seqs], batch_size), desc="self-certainty", unit="batch"):
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


_FINAL = re.compile(r"final answer\s*(?:is)?\s*[:\-]?\s*(.+)", re.IGNORECASE)


def extract_final_answer(response: str) -> str | None:
    """The text after the last 'Final answer:' (first line of it), normalised for comparison; None if absent."""
    matches = _FINAL.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip().splitlines()[0] if matches[-1].strip() else ""
    answer = re.sub(r"\\boxed\{|[*_`$\\}]", "", answer).strip().rstrip(".").strip().lower()
    answer = re.sub(r"\s+", " ", answer)
    return answer or None


def majority_vote_scores(rows: list[dict]) -> tuple[list[dict], dict]:
    """Each response's score: the share of its question's responses that give the same final answer."""
    answers = [extract_final_answer(r["response"]) for r in rows]
    by_question: dict[str, Counter] = defaultdict(Counter)
    sizes: Counter = Counter()
    for row, answer in zip(rows, answers):
        sizes[row["question_id"]] += 1
        if answer is not None:
            by_question[row["question_id"]][answer] += 1
    out = [{"score": (by_question[r["question_id"]][a] / sizes[r["question_id"]]) if a is not None else 0.0,
            "final_answer": a} for r, a in zip(rows, answers)]
    return out, {"no_final_answer": sum(a is None for a in answers)}


def _zscores(values: list[float]) -> list[float]:
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else 0.0
    return [math.nan if math.isnan(v) else ((v - mean) / std if std > 0 else 0.0) for v in values]


def combine_scores(per_scorer: dict[str, list[float]], question_ids: list[str], method: str = "weighted_sum",
                   weights: dict[str, float] | None = None) -> list[float]:
    """One reward per response from several scorers; a single scorer's scores pass through unchanged.

    ``weighted_sum``: sum of weight x z-score (each scorer normalised over all responses).
    ``borda``: within each question, sum of weight x rank (0 = worst). A NaN from any scorer gives NaN.
    """
    names = list(per_scorer)
    n = len(question_ids)
    if len(names) == 1:
        return list(per_scorer[names[0]])
    weights = {name: (weights or {}).get(name, 1.0) for name in names}
    nan_rows = {i for name in names for i, v in enumerate(per_scorer[name]) if math.isnan(v)}
    total = [0.0] * n
    if method == "weighted_sum":
        for name in names:
            for i, z in enumerate(_zscores(per_scorer[name])):
                if i not in nan_rows:
                    total[i] += weights[name] * z
    elif method == "borda":
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(question_ids):
            if i not in nan_rows:
                groups[q].append(i)
        for name in names:
            for idx in groups.values():
                for i, rank in zip(idx, midranks([per_scorer[name][i] for i in idx])):
                    total[i] += weights[name] * rank
    else:
        raise ValueError(f"reward.combine: unknown method {method!r}")
    return [math.nan if i in nan_rows else total[i] for i in range(n)]


def collapse_share(scores: list[float], band: float) -> float:
    """Share of the finite scores within ``band`` of their median (1.0: every score the same)."""
    finite = sorted(v for v in scores if not math.isnan(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    median = finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2
    return sum(abs(v - median) <= band for v in finite) / len(finite)


def reward_metrics(rows: list[dict], pairs: list[dict], pair_stats: dict, section) -> dict:
    """B-STaR's "exploitation" view of one iteration: does the reward still tell answers apart?

    Per scorer: mean, std, mean within-question spread (max - min), collapse share (where the scorer has a
    nominal scale). For the combined reward: the same, plus the margin distribution and the tie share.
    """
    def describe(values: list[float], question_ids: list[str], scale: float | None) -> dict:
        finite = [v for v in values if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)) if finite else math.nan
        groups: dict[str, list[float]] = defaultdict(list)
        for v, q in zip(values, question_ids):
            if not math.isnan(v):
                groups[q].append(v)
        spreads = [max(g) - min(g) for g in groups.values() if len(g) > 1]
        out = {"mean": mean, "std": std, "within_question_spread": sum(spreads) / len(spreads) if spreads else math.nan}
        if scale is not None:
            share = collapse_share(values, section.collapse_band * scale)
            out.update(collapse_share=share, collapsed=bool(share >= section.collapse_share))
        return out

    qids = [r["question_id"] for r in rows]
    per_scorer = {name: describe([r["scores"][name] for r in rows], qids, SCALES.get(name))
                  for name in section.scorers}
    margins = sorted(p["margin"] for p in pairs)
    combined = describe([r["reward"] for r in rows], qids, SCALES.get(section.scorers[0]) if len(section.scorers) == 1 else None)
    questions = max(pair_stats["questions"], 1)
    combined.update({
        "pairs": len(pairs),
        "tie_share": pair_stats["margin_too_small"] / questions,
        "margin_mean": sum(margins) / len(margins) if margins else math.nan,
        "margin_p10": quantile(margins, 0.1),
        "margin_median": quantile(margins, 0.5),
        "margin_p90": quantile(margins, 0.9),
    })
    return {"scorers": per_scorer, "reward": combined, "scorer": _scorer_name(section)}


def _scorer_name(section) -> str:
    if len(section.scorers) == 1:
        return section.scorers[0]
    return f"{section.combine}({','.join(section.scorers)})"


SCORE_CHUNK = 64  # answers per saved chunk of a model scorer's work


def score_responses(rows: list[dict], section, *, policy_path: str, dtype: str,
                    models: dict | None = None, checkpoint=None) -> tuple[list[dict], dict]:
    """Score every response with each scorer in ``section.scorers``, then combine into ``reward``.

    Adds to each row: ``scores`` (scorer -> value), ``reward`` and ``scorer``; the judge's probability mass
    on its digits (``judge_mass``) and majority vote's ``final_answer`` where those scorers ran.
    ``models`` (see ``models.load_cached``) keeps models the stage already loaded: the policy serves as
    judge, for self-certainty and for the audit's answers, and is loaded once. With ``checkpoint`` (a
    folder), model scorers save each chunk of ``SCORE_CHUNK`` answers, and a rerun resumes after them.
    """
    from .io import chunked, digest, model_identity
    from .models import load_cached, pick_device, resolve_model

    device = pick_device() if section.device == "auto" else section.device
    dtype = section.dtype or dtype
    models = {} if models is None else models

    def causal_lm(path):
        return load_cached(models, path, dtype, device)

    def in_chunks(name, score_fn, model, tokenizer):
        parts = [rows[i : i + SCORE_CHUNK] for i in range(0, len(rows), SCORE_CHUNK)]
        identity = model_identity(model)

        def compute(c, part):
            out, st = score_fn(model, tokenizer, part, section.batch_size, section.max_length)
            return {"rows": out, "stats": st}

        def key(c, part):
            return digest(name, [(r["question"], r["response"]) for r in part], section.batch_size,
                          section.max_length, identity)

        done = chunked(checkpoint, name, parts, key, compute)
        stats = {k: sum(d["stats"][k] for d in done) for k in (done[0]["stats"] if done else {})}
        out = [o for d in done for o in d["rows"]]
        for o in out:  # a saved chunk stores NaN as null
            o["score"] = float("nan") if o["score"] is None else o["score"]
        return out, stats

    per_scorer: dict[str, list[float]] = {}
    extras: list[dict] = [{} for _ in rows]
    stats: dict = {}
    for name in section.scorers:
        if name == "llm_judge":
            judge = resolve_model(section.judge_model) if section.judge_model else policy_path
            out, st = in_chunks(name, judge_scores, *causal_lm(judge))
        elif name == "self_certainty":
            out, st = in_chunks(name, self_certainty_scores, *causal_lm(policy_path))
        elif name == "majority_vote":
            out, st = majority_vote_scores(rows)
        else:
            out, st = in_chunks(name, reward_model_scores,
                                *load_reward_model(resolve_model(section.reward_model), dtype, device))
        per_scorer[name] = [o.pop("score") for o in out]
        for extra, o in zip(extras, out):
            extra.update(o)
        stats[name] = st
    combined = combine_scores(per_scorer, [r["question_id"] for r in rows], section.combine, section.weights)
    scorer = _scorer_name(section)
    scored = [{**row, **extra, "scores": {n: per_scorer[n][i] for n in per_scorer}, "reward": combined[i],
               "scorer": scorer} for i, (row, extra) in enumerate(zip(rows, extras))]
    return scored, {"scorer": scorer, "scored": len(scored), **{f"{n}_{k}": v for n, st in stats.items() for k, v in st.items()}}


def dpo_rows(pairs: list[dict]) -> list[dict]:
    """Pairs in TRL's conversational preference format, nothing else (prompt/chosen/rejected)."""
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


def audit_and_choose(params, paths, policy: str, models: dict | None = None):
    """Run the reward audit (if enabled) and apply ``audit.on_fail``; returns (reward section, filter, report)."""
    import dataclasses

    from .io import StageError, update_metrics, write_jsonl

    if not params.audit.enabled:
        return params.reward, False, None
    from .audit import run_audit

    rows, report = run_audit(params, paths, policy, models=models)
    write_jsonl(paths.audit, rows)
    update_metrics(paths.metrics, "audit", report)
    if report["ok"]:
        return params.reward, False, report
    why = "; ".join(report["reasons"])
    # The notebook and the runner show the failure from metrics.json; here only the action taken is said.
    message = f"reward audit: scorer {report['active_scorer']} cannot be trusted on {report['probe_file']}: {why}"
    if params.audit.on_fail == "stop":
        raise StageError(f"{message} (audit.on_fail: stop)")
    if params.audit.on_fail == "fallback":
        if params.audit.fallback == "require_final_answer":
            print("fallback: answers without a final answer are dropped before pairing")
            return params.reward, True, report
        print(f"fallback: scoring with {params.audit.fallback} instead")
        return dataclasses.replace(params.reward, scorers=[params.audit.fallback], weights=None), False, report
    return params.reward, False, report


def run(params, paths) -> tuple[list[dict], list[dict], dict]:
    """The stage as the notebook runs it: audit the scorer, score, pair, write the files and the metrics."""
    from .io import StageError, read_jsonl, update_metrics, write_json, write_jsonl
    from .models import resolve_model

    responses = read_jsonl(paths.responses)
    if not responses:
        raise StageError(f"reward: {paths.responses} has no responses")
    policy = paths.policy_model(resolve_model(params.model.name))
    models: dict = {}  # the policy, loaded once for the audit, the judge and self-certainty
    section, require_answer, _ = audit_and_choose(params, paths, policy, models)
    scored, score_stats = score_responses(responses, section, policy_path=policy, dtype=params.model.dtype,
                                          models=models, checkpoint=paths.partial("reward"))
    candidates = scored
    if require_answer:
        candidates = [r for r in scored if extract_final_answer(r["response"]) is not None]
        score_stats["dropped_no_final_answer"] = len(scored) - len(candidates)
    pairs, pair_stats = build_preference_pairs(candidates, section.min_margin)
    stats = {**pair_stats, **score_stats}
    metrics = reward_metrics(candidates, pairs, pair_stats, section)
    write_jsonl(paths.rewards, scored)
    write_jsonl(paths.sft, sft_rows(pairs))
    write_jsonl(paths.dpo, dpo_rows(pairs))
    write_json(paths.pair_stats, stats)
    update_metrics(paths.metrics, "reward", metrics)
    write_jsonl(paths.pairs, pairs)  # last: its presence marks the stage done
    paths.clear_partial("reward")
    return scored, pairs, stats
