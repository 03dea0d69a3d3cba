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
import re
from collections import defaultdict
from pathlib import Path

from .generation import sample_answers
from .gpqa import read_gpqa_file, shuffled_choices
from .io import DataError, iter_jsonl_lines
from .monitoring import collapse_share
from .scorers import REGISTRY, score_rows
from .scorers.majority_vote import extract_final_answer
from .stats import auroc, bootstrap_ci, pearson

LETTERS = "ABCDEFGH"


def load_probe(path: str | Path, limit: int | None = None) -> list[dict]:
    """Probe questions as ``{id, question, answer, kind}``; kind is ``number`` or ``choice``.

    JSONL rows: ``question`` and ``answer`` (a number), or ``question``, ``choices`` and ``answer`` (a
    letter or the correct choice's text). A ``.csv`` is read in GPQA's columns as 4-option choice questions.
    """
    path = Path(path)
    if path.suffix == ".csv":
        items = []
        for i, row in enumerate(read_gpqa_file(path, "audit.probe_file")):
            choices, answer = shuffled_choices(row)
            items.append(_choice_item(f"probe{i:03d}", str(row["Question"]).strip(), choices, answer))
        return items[:limit]
    items = []
    for lineno, row in iter_jsonl_lines(path, "audit.probe_file"):
        if "question" not in row or "answer" not in row:
            raise DataError(f"audit.probe_file: {path}:{lineno}: expected a JSON object with 'question' and 'answer'")
        question, answer = str(row["question"]), str(row["answer"]).strip()
        pid = str(row.get("id", f"probe{lineno:03d}"))
        if "choices" in row:
            choices = [str(c) for c in row["choices"]]
            index = (
                LETTERS.index(answer.upper())
                if len(answer) == 1 and answer.upper() in LETTERS
                else (choices.index(answer) if answer in choices else -1)
            )
            if not 0 <= index < len(choices):
                raise DataError(
                    f"audit.probe_file: {path}:{lineno}: answer {answer!r} is not a letter or one of the choices"
                )
            items.append(_choice_item(pid, question, choices, index))
        else:
            if _number(answer) is None:
                raise DataError(f"audit.probe_file: {path}:{lineno}: answer {answer!r} is not a number (add 'choices')")
            items.append({"id": pid, "question": question, "answer": answer, "kind": "number"})
    if not items:
        raise DataError(f"audit.probe_file: {path}: no probe questions")
    return items[:limit]


def _choice_item(pid: str, question: str, choices: list[str], index: int) -> dict:
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return {
        "id": pid,
        "question": f"{question}\n\nOptions:\n{options}\n\nGive the letter of the correct option.",
        "answer": LETTERS[index],
        "choice_text": choices[index],
        "kind": "choice",
    }


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if not match:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def grade(response: str, item: dict) -> tuple[bool, bool]:
    """(an answer could be extracted, it is right) for one response to a probe item.

    The text after the last "Final answer:" is read first; without one, as lm-eval's "flexible-extract",
    the last option letter "(X)" (choice items) or the last number (number items) in the response.
    """
    final = extract_final_answer(response)
    if item["kind"] == "number":
        value = _number(final) if final is not None else _last_number(response)
        target = float(item["answer"])
        return value is not None, value is not None and abs(value - target) <= 1e-6 * max(1.0, abs(target))
    if final is None:
        letters = re.findall(r"\(([A-H])\)", response)
        return bool(letters), bool(letters) and letters[-1] == item["answer"]
    letter = re.match(r"^\(?([a-h])\)?(?:$|[\s.):,])", final)
    if letter:
        return True, letter.group(1).upper() == item["answer"]
    return True, final == item["choice_text"].strip().rstrip(".").lower()


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


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


def probe_answers(
    params, policy_path: str, models: dict | None, sampling, *, seed: int, checkpoint, desc: str = "audit answers"
) -> list[dict]:
    """``audit.num_samples`` answers to each of the probe's first ``audit.num_questions`` questions, sampled as
    the responses stage samples (``sampling``: that section, perhaps at another temperature), graded
    (``has_answer``, ``correct``) and scored by every scorer of ``params.reward``.

    ``models`` is the stage's dict of loaded models (``models.load_cached``), shared with the scorers. The
    audit and B-STaR's balancing sweep (sedir_utils/balance.py) both measure these rows.
    """
    from functools import partial

    from .backends import generator_args, load_generator
    from .generation import generate
    from .models import load_tokenizer

    section = params.audit
    items = load_probe(section.probe_file, section.num_questions)
    # the responses stage's sampler (its backend, its workers); a transformers model is the scorers' policy too
    model, backend = load_generator(policy_path, **generator_args(params.model), cache=models)
    answers = sample_answers(
        model,
        load_tokenizer(policy_path),
        items,
        sampling,
        section.num_samples,
        seed=seed,
        desc=desc,
        id_tag="a",
        checkpoint=checkpoint,
        generate_fn=partial(generate, backend=backend),
    )
    rows = []
    for row, item in zip(answers, (item for item in items for _ in range(section.num_samples))):
        has_answer, correct = grade(row["response"], item)
        rows.append({**row, "has_answer": has_answer, "correct": correct, "target": item["answer"]})
    scored, _ = score_rows(
        rows,
        params.reward,
        policy_path=policy_path,
        dtype=params.model.dtype,
        models=models,
        checkpoint=checkpoint,
        replicas=params.model.data_parallel_size,
    )
    return scored


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
