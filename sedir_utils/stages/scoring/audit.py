"""The reward audit (part of stage 3): can the scorer tell right answers from wrong ones?

SeDiR trusts its scorer completely; nothing in the paper checks it. Every iteration the current model
answers probe questions with known answers (sampled exactly as in the responses stage), every
configured scorer scores those answers, and we measure per scorer: AUROC against correctness (with a
bootstrap interval over questions), best-of-n accuracy beside a random pick and the oracle, the share of
answers without a final answer, the collapse share, and the correlation of score with length (B-STaR's
lesson: watch whether the reward still discriminates).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from sedir_utils.core.stats import auroc, bootstrap_ci, pearson
from sedir_utils.engine.scorers import REGISTRY
from sedir_utils.stages.probe import probe_answers
from sedir_utils.stages.scoring.monitoring import collapse_share


def scorer_report(
    scores: list[float], rows: list[dict], scale: float | None, band: float, n_boot: int, seed: int
) -> dict:
    """AUROC (+ interval), best-of-n vs random vs oracle, collapse share and length correlation of one scorer."""
    labels = [r["correct"] for r in rows]
    groups = [r["question_id"] for r in rows]
    finite = [i for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    finite_set = set(finite)

    def stat(idx):
        idx = [i for i in idx if i in finite_set]
        return auroc([scores[i] for i in idx], [labels[i] for i in idx])

    value = stat(range(len(rows)))
    low, high = bootstrap_ci(stat, groups, n_boot=n_boot, seed=seed)
    answered = [i for i in finite if rows[i]["has_answer"]]
    by_q: dict[str, list[int]] = defaultdict(list)
    for i in finite:
        by_q[groups[i]].append(i)
    best = [labels[max(idx, key=lambda i: scores[i])] for idx in by_q.values()]
    report = {
        "auroc": value,
        "auroc_ci": [low, high],
        # The same, among answers that state a final answer at all (is the scorer more than a format check?).
        "auroc_answered": auroc([scores[i] for i in answered], [labels[i] for i in answered]),
        "best_of_n": sum(best) / len(best) if best else math.nan,
        "length_corr": pearson([scores[i] for i in finite], [rows[i]["num_tokens"] for i in finite]),
        "collapse_share": collapse_share(scores, band * scale) if scale is not None else None,
    }
    return report


def baselines(rows: list[dict]) -> tuple[float, float]:
    """What best-of-n is judged against: a random pick's expected accuracy, and the oracle's (any answer right)."""
    by_q: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_q[r["question_id"]].append(r["correct"])
    return (sum(sum(v) / len(v) for v in by_q.values()) / len(by_q), sum(any(v) for v in by_q.values()) / len(by_q))


def verdict(report: dict, collapse_limit: float) -> list[str]:
    """Why the scorer cannot be trusted this iteration (empty: it can)."""
    reasons = []
    low, high = report["auroc_ci"]
    if report["auroc"] is None or math.isnan(report["auroc"]):
        reasons.append("AUROC undefined: the probe answers are all right or all wrong, so nothing was tested")
    elif low is None or math.isnan(low) or low <= 0.5:
        reasons.append(f"AUROC {report['auroc']:.2f} (95% CI {low:.2f}-{high:.2f}) does not exclude 0.5")
    if report.get("collapse_share") is not None and report["collapse_share"] >= collapse_limit:
        reasons.append(f"collapsed: {report['collapse_share']:.0%} of scores at the median")
    return reasons


def headline(report: dict) -> str:
    """One line: probe size, the policy's accuracy, the pick baselines."""
    return (
        f"{report['questions']} probe questions x {report['answers'] // report['questions']} answers: "
        f"accuracy {report['accuracy']:.2f}, no final answer {report['no_answer_share']:.0%}, "
        f"random pick {report['random_pick']:.2f}, oracle {report['oracle']:.2f}"
    )


def scorer_table(report: dict):
    """Each scorer's figures on the probe, a row per scorer (a pandas DataFrame)."""
    import pandas as pd

    table = pd.DataFrame(report["scorers"]).T
    table["auroc_ci"] = table["auroc_ci"].map(lambda ci: f"{ci[0]:.2f}-{ci[1]:.2f}" if ci[0] is not None else "n/a")
    return table[["auroc", "auroc_ci", "auroc_answered", "best_of_n", "collapse_share", "length_corr"]]


def verdict_text(report: dict, iteration: int | None = None) -> str:
    """The verdict as the runner and notebook 03 print it: a line when the active scorer passes, a block
    that cannot be missed when it fails."""
    if report.get("ok", True):
        return f"reward audit: active scorer {report['active_scorer']} passes"
    bar = "!" * 100
    where = f"[iter {iteration}] " if iteration is not None else ""
    return (
        f"{bar}\n{where}REWARD AUDIT FAILED for {report['active_scorer']}: {'; '.join(report['reasons'])}\n"
        f"  action: {report['action']} (params audit.on_fail)\n{bar}"
    )


def run_audit(
    params, paths, policy_path: str, models: dict | None = None, answers: list[dict] | None = None
) -> tuple[list[dict], dict]:
    """Sample, grade and score probe answers with the current policy; returns (rows, report).

    ``answers``: probe answers already sampled and scored this iteration (the balancing sweep's, at the
    temperature it chose), measured instead of sampling the probe a second time.
    """
    section = params.audit
    scored = answers
    if scored is None:
        scored = probe_answers(
            params,
            policy_path,
            models,
            params.responses,
            seed=params.seed_for(paths.iteration) + 7,
            checkpoint=paths.partial("reward") / "audit",
        )
    reward = params.reward
    seed = params.seed_for(paths.iteration)
    scorers = {
        name: scorer_report(
            [r["scores"][name] for r in scored],
            scored,
            REGISTRY[name].scale,
            reward.collapse_band,
            section.bootstrap,
            seed,
        )
        for name in reward.scorers
    }
    active_name = scored[0]["scorer"]
    active = (
        scorers[active_name]
        if active_name in scorers
        else scorer_report([r["reward"] for r in scored], scored, None, reward.collapse_band, section.bootstrap, seed)
    )
    random_pick, oracle = baselines(scored)
    reasons = verdict(active, reward.collapse_share)
    report = {
        "probe_file": Path(section.probe_file).name,
        "questions": len({r["question_id"] for r in scored}),
        "sampled_by": "balance" if answers is not None else "audit",
        "answers": len(scored),
        "accuracy": sum(r["correct"] for r in scored) / len(scored),
        "no_answer_share": sum(not r["has_answer"] for r in scored) / len(scored),
        "random_pick": random_pick,
        "oracle": oracle,
        "scorers": scorers,
        "active_scorer": active_name,
        "active": active,
        "ok": not reasons,
        "reasons": reasons,
        "action": "none"
        if not reasons
        else (f"fallback:{section.fallback}" if section.on_fail == "fallback" else section.on_fail),
    }
    return scored, report
