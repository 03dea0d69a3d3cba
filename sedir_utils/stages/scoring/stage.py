"""Stage 3: score each response *with its reasoning*, then pair the best and worst (paper, section 3.3).

The scorers (params ``reward.scorers``; several combine into one reward) live in ``sedir_utils.engine.scorers``;
pairing and the training files in ``stages.pairs``; what is measured of the scores in ``monitoring``; the
reward audit, run first, in ``audit``. This module is the stage: audit, score, pair, write.
"""

from __future__ import annotations

from sedir_utils.core.io import StageError, read_json, read_jsonl, update_metrics, write_json, write_jsonl
from sedir_utils.core.models import resolve_model
from sedir_utils.engine.backends import release
from sedir_utils.engine.scorers import score_rows
from sedir_utils.engine.scorers.majority_vote import extract_final_answer
from sedir_utils.stages.pairs import build_preference_pairs, dpo_rows, sft_rows
from sedir_utils.stages.scoring import audit
from sedir_utils.stages.scoring.band import difficulty_band
from sedir_utils.stages.scoring.monitoring import reward_metrics


def balance_choice(params, paths) -> dict | None:
    """This iteration's choice (``balance.json``), or None when balancing is off."""
    return read_json(paths.balance) if params.balance.enabled else None


def balanced_probe_answers(params, paths) -> list[dict] | None:
    """The sweep's probe answers at the chosen temperature, for the audit (None when balancing is off)."""
    choice = balance_choice(params, paths)
    if choice is None:
        return None
    return [r for r in read_jsonl(paths.balance_samples) if r["temperature"] == choice["temperature"]]


def audit_and_choose(params, paths, policy: str, models: dict | None = None):
    """Run the reward audit (if enabled) and apply ``audit.on_fail``; returns (reward section, filter, report)."""
    import dataclasses

    if not params.audit.enabled:
        return params.reward, False, None

    rows, report = audit.run_audit(params, paths, policy, models=models, answers=balanced_probe_answers(params, paths))
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
    responses = read_jsonl(paths.responses)
    if not responses:
        raise StageError(f"reward: {paths.responses} has no responses")
    policy = paths.policy_model(resolve_model(params.model.name))
    models: dict = {}  # the policy, loaded once for the audit, the judge and self-certainty
    try:
        section, require_answer, _ = audit_and_choose(params, paths, policy, models)
    finally:  # a vLLM engine sampled the audit's answers; the scorers read a transformers model
        release(models)
    scored, score_stats = score_rows(
        responses,
        section,
        policy_path=policy,
        dtype=params.model.dtype,
        models=models,
        checkpoint=paths.partial("reward"),
        replicas=params.model.data_parallel_size,
        seed=params.seed,
        iteration=paths.iteration,
    )
    candidates = scored
    band = (section.consistency_low, section.consistency_high)
    band_stats: dict = {}
    if band != (0.0, 1.0):  # the difficulty band: only questions whose answers agree neither too little nor too much
        kept, agreement, band_stats = difficulty_band(scored, *band)
        scored = [{**r, "agreement": agreement[r["question_id"]]} for r in scored]
        candidates = [r for r in scored if r["question_id"] in kept]
        print(f"difficulty band [{band[0]}, {band[1]}]: kept {len(kept)} of {band_stats['band_questions']} questions")
    if require_answer:
        candidates = [r for r in candidates if extract_final_answer(r["response"]) is not None]
        score_stats["dropped_no_final_answer"] = sum(extract_final_answer(r["response"]) is None for r in scored)

    # B-STaR's threshold, chosen on the probe before the responses, in the scores of params.reward's scorers:
    # not applied when a failed audit switched to its fallback scorer.
    balance = balance_choice(params, paths)
    same_scorers = section.scorers == params.reward.scorers
    min_score = balance["threshold"] if balance and same_scorers else section.min_score
    pairs, pair_stats = build_preference_pairs(candidates, section.min_margin, min_score)
    stats = {**pair_stats, **score_stats, **band_stats}
    metrics = reward_metrics(candidates, pairs, pair_stats, section)
    if band_stats:
        metrics["difficulty"] = {"band": list(band), **band_stats}
    write_jsonl(paths.rewards, scored)
    write_jsonl(paths.sft, sft_rows(pairs))
    write_jsonl(paths.dpo, dpo_rows(pairs))
    write_json(paths.pair_stats, stats)
    update_metrics(paths.metrics, "reward", metrics)
    write_jsonl(paths.pairs, pairs)  # last: its presence marks the stage done
    paths.clear_partial("reward")
    return scored, pairs, stats
