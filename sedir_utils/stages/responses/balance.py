"""B-STaR's balancing of exploration and exploitation (``balance.enabled``; part of stage 2).

B-STaR (Zeng et al., "B-STaR: Monitoring and Balancing Exploration and Exploitation in Self-Taught
Reasoners", ICLR 2025; code: github.com/hkust-nlp/B-STaR, ``cal_modi_acc_soft`` in
``train_code/determine_hyper.py``) finds that self-improvement stalls as sampling explores less (fewer
distinct correct answers) and the reward exploits worse (it selects wrong ones), and re-tunes the sampling
temperature and the reward threshold at every iteration to maximise its balance score. Per query::

    balance_i = min(n_i / n*, 1) * n_i / n'_i

where ``n'_i`` is the number of distinct responses the reward selects (score at or above the threshold)
and ``n_i`` the number of those that are correct; the score is the mean over queries. The first factor
rewards exploration (up to ``n*`` distinct correct answers), the second exploitation (the precision of
the selection). B-STaR's code skips queries with nothing selected and always adds the reference solution
to the selection; here there is no reference solution, so a probe question with nothing selected counts 0
(otherwise a high threshold would look best by discarding the hard questions). Responses are distinct by
their exact text, as in B-STaR's code.

Correctness needs known answers, which SeDiR's own questions lack: the sweep runs on the reward audit's
labelled probe (``audit.probe_file``, ``audit.num_questions`` x ``audit.num_samples`` answers at each of
``balance.temperatures``, scored by the active scorer), and the audit then measures the sweep's answers at
the chosen temperature instead of sampling the probe again. Thresholds are quantiles of the probe answers'
scores at each temperature (``balance.threshold_quantiles``; 0 keeps every answer, i.e. no threshold), so
they do not depend on the scorer's scale. The chosen temperature samples this iteration's responses; the
chosen threshold is the lowest score a question's chosen answer may have to be paired (``reward.min_score``
is replaced for this iteration). Ties go to the setting listed first.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from sedir_utils.core.io import update_metrics, write_json, write_jsonl
from sedir_utils.core.models import resolve_model
from sedir_utils.stages.probe import probe_answers


def balance_score(answers: list[dict], threshold: float | None, n_star: int) -> dict:
    """B-STaR's balance score of probe ``answers`` (``question_id``, ``response``, ``reward``, ``correct``,
    ``finished``) at one reward threshold (None: every scored finished answer is selected).

    Also returned: ``exploration`` (mean distinct correct answers per question, among all finished ones),
    ``exploitation`` (distinct correct among distinct selected, pooled) and ``selected`` (mean per question).
    """
    by_question: dict[str, list[dict]] = defaultdict(list)
    for row in answers:
        by_question[row["question_id"]].append(row)
    scores, explored, picked, right = [], [], 0, 0
    for rows in by_question.values():
        finished = [r for r in rows if r.get("finished", True) and _scored(r)]
        selected = {r["response"] for r in finished if threshold is None or r["reward"] >= threshold}
        correct = {r["response"] for r in finished if r["correct"] and r["response"] in selected}
        explored.append(len({r["response"] for r in finished if r["correct"]}))
        picked, right = picked + len(selected), right + len(correct)
        scores.append(min(len(correct) / n_star, 1.0) * len(correct) / len(selected) if selected else 0.0)
    n = max(len(scores), 1)
    return {
        "balance": sum(scores) / n,
        "exploration": sum(explored) / n,
        "exploitation": right / picked if picked else 0.0,
        "selected": picked / n,
    }


def _scored(row: dict) -> bool:
    return row.get("reward") is not None and not math.isnan(row["reward"])


def thresholds(answers: list[dict], quantiles: list[float]) -> list[float | None]:
    """The score at each quantile of ``answers``' finite rewards (lower interpolation); quantile 0: None."""
    values = sorted(r["reward"] for r in answers if _scored(r))
    out: list[float | None] = []
    for q in quantiles:
        out.append(None if q <= 0 or not values else values[min(int(q * (len(values) - 1)), len(values) - 1)])
    return out


def sweep(answers_at: dict[float, list[dict]], quantiles: list[float], n_star: int) -> tuple[list[dict], dict]:
    """The balance score of every (temperature, threshold quantile) from each temperature's probe answers;
    returns (the table, its best row: the first of the highest balance scores, in the order listed)."""
    table = []
    for temperature, answers in answers_at.items():
        for q, threshold in zip(quantiles, thresholds(answers, quantiles)):
            row = {"temperature": temperature, "quantile": q, "threshold": threshold}
            table.append({**row, **balance_score(answers, threshold, n_star)})
    best = max(table, key=lambda r: r["balance"])  # max keeps the first of equal scores
    return table, best


def run_sweep(params, paths, models: dict | None = None) -> dict:
    """The sweep as stage 2 runs it before sampling: probe answers at each temperature (sampled with this
    iteration's policy, as the responses are; the same seed for every temperature), the table and the
    choice in ``balance.json`` and ``metrics.json``, the answers in ``balance_samples.jsonl``."""
    section = params.balance
    models = {} if models is None else models  # the policy, loaded once for every temperature and the scorers
    policy = paths.policy_model(resolve_model(params.model.name))
    answers_at = {}
    for temperature in section.temperatures:
        sampling = dataclasses.replace(params.responses, temperature=temperature)
        rows = probe_answers(
            params,
            policy,
            models,
            sampling,
            seed=params.seed_for(paths.iteration) + 7,  # the audit's seed: its answers at the chosen temperature
            checkpoint=paths.partial("responses") / f"balance-t{temperature:g}",
            desc=f"balance sweep, T={temperature:g}",
        )
        answers_at[temperature] = [{**r, "temperature": temperature} for r in rows]
    table, best = sweep(answers_at, section.threshold_quantiles, section.n_star)
    report = {
        "temperature": best["temperature"],
        "threshold": best["threshold"],
        "quantile": best["quantile"],
        "balance": best["balance"],
        "exploration": best["exploration"],
        "exploitation": best["exploitation"],
        "n_star": section.n_star,
        "probe_answers": sum(len(a) for a in answers_at.values()),
        "table": table,
    }
    write_jsonl(paths.balance_samples, [r for rows in answers_at.values() for r in rows])
    update_metrics(paths.metrics, "balance", report)
    write_json(paths.balance, report)
    threshold = "none" if best["threshold"] is None else f"{best['threshold']:.3f}"
    print(
        f"balance: temperature {best['temperature']:g}, reward threshold {threshold} (quantile {best['quantile']:g}),"
        f" score {best['balance']:.3f} (exploration {best['exploration']:.2f}, exploitation {best['exploitation']:.2f})"
    )
    return report
