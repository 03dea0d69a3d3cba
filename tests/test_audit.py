import math

import pytest

from sedir_utils.core.io import DataError
from sedir_utils.core.params import SAMPLE_EVAL_FILE, SAMPLE_PROBE_FILE
from sedir_utils.core.stats import auroc, bootstrap_ci, pearson
from sedir_utils.run.params import load_params
from sedir_utils.stages.probe import grade, load_probe
from sedir_utils.stages.scoring.audit import baselines, scorer_report, verdict


def test_auroc_equals_hand_computed_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1, 2, 3], [False, True, True]) == 1.0
    assert auroc([1, 1, 1, 1], [False, True, False, True]) == 0.5  # all ties: chance
    assert math.isnan(auroc([1, 2], [True, True]))


def test_bootstrap_resamples_whole_questions():
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]
    labels = [True, False, True, False, True, False]
    groups = ["a", "a", "b", "b", "c", "c"]

    def stat(idx):
        return auroc([scores[i] for i in idx], [labels[i] for i in idx])

    assert bootstrap_ci(stat, groups, n_boot=200, seed=1) == (1.0, 1.0)  # perfect in every resample
    noisy = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5]

    def noisy_stat(idx):
        return auroc([noisy[i] for i in idx], [labels[i] for i in idx])

    low, high = bootstrap_ci(noisy_stat, groups, n_boot=500, seed=1)
    assert low < 0.5 < high
    assert bootstrap_ci(noisy_stat, groups, n_boot=500, seed=1) == (low, high)  # seeded


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def rows(correct, has_answer=None, tokens=None, per_question=2):
    has_answer = has_answer or [True] * len(correct)
    tokens = tokens or [10] * len(correct)
    return [
        {"question_id": f"q{i // per_question}", "correct": c, "has_answer": h, "num_tokens": t}
        for i, (c, h, t) in enumerate(zip(correct, has_answer, tokens))
    ]


def test_best_of_n_random_and_oracle_on_constructed_scores():
    r = rows([True, False, False, True, False, False], per_question=2)
    # q0: best (0.9) is right; q1: best (0.6) is wrong; q2: no right answer
    report = scorer_report([0.9, 0.2, 0.6, 0.5, 0.3, 0.1], r, scale=None, band=0.05, n_boot=100, seed=0)
    assert report["best_of_n"] == pytest.approx(1 / 3)
    assert report["auroc"] == pytest.approx(auroc([0.9, 0.2, 0.6, 0.5, 0.3, 0.1], [c["correct"] for c in r]))
    assert report["collapse_share"] is None
    assert baselines(r) == (pytest.approx(1 / 3), pytest.approx(2 / 3))  # q0 1/2, q1 1/2, q2 0; oracle 2 of 3


def test_collapse_share_and_length_correlation():
    r = rows([True, False, True, False], tokens=[10, 20, 30, 40])
    report = scorer_report([5.0, 5.0, 5.0, 5.1], r, scale=9.0, band=0.05, n_boot=50, seed=0)
    assert report["collapse_share"] == 1.0  # all within 0.45 of the median
    assert report["length_corr"] == pytest.approx(pearson([5.0, 5.0, 5.0, 5.1], [10, 20, 30, 40]))


def test_answered_only_auroc_sets_missing_answers_aside():
    r = rows([True, False, False, False], has_answer=[True, True, False, False])
    report = scorer_report([0.2, 0.1, 0.9, 0.8], r, scale=None, band=0.05, n_boot=50, seed=0)
    assert report["auroc_answered"] == 1.0 and report["auroc"] < 0.5


def test_the_rule_fires_when_the_interval_includes_chance_or_the_scorer_collapsed():
    good = {"auroc": 0.8, "auroc_ci": [0.62, 0.93], "collapse_share": 0.3}
    assert verdict(good, collapse_limit=0.9) == []
    chance = {"auroc": 0.55, "auroc_ci": [0.41, 0.68], "collapse_share": None}
    assert "does not exclude 0.5" in verdict(chance, 0.9)[0]
    untested = {"auroc": math.nan, "auroc_ci": [math.nan, math.nan], "collapse_share": None}
    assert "all right or all wrong" in verdict(untested, 0.9)[0]
    collapsed = {"auroc": 0.8, "auroc_ci": [0.62, 0.93], "collapse_share": 0.95}
    assert "collapsed" in verdict(collapsed, 0.9)[0]


@pytest.mark.parametrize(
    "response, item, expected",
    [
        ("3 x 7 = 21, 50 - 21 = 29. Final answer: 29", {"kind": "number", "answer": "29"}, (True, True)),
        ("Final answer: $1,200.00", {"kind": "number", "answer": "1200"}, (True, True)),
        ("Final answer: 28", {"kind": "number", "answer": "29"}, (True, False)),
        ("So 50 - 21 leaves 29 dollars", {"kind": "number", "answer": "29"}, (True, True)),  # last number
        ("I cannot tell.", {"kind": "number", "answer": "29"}, (False, False)),
        ("It must be (A), no wait, (B) 6 A.", {"kind": "choice", "answer": "B", "choice_text": "6 A"}, (True, True)),
        ("Probably the second one.", {"kind": "choice", "answer": "B", "choice_text": "6 A"}, (False, False)),
        ("Final answer: (B) 6 A", {"kind": "choice", "answer": "B", "choice_text": "6 A"}, (True, True)),
        ("Final answer: 6 A", {"kind": "choice", "answer": "B", "choice_text": "6 A"}, (True, True)),
        ("Final answer: C.", {"kind": "choice", "answer": "B", "choice_text": "6 A"}, (True, False)),
    ],
)
def test_grading(response, item, expected):
    assert grade(response, item) == expected


def test_probe_files_load_as_numbers_or_choices(tmp_path):
    numbers = load_probe(SAMPLE_PROBE_FILE)
    assert len(numbers) == 16 and all(i["kind"] == "number" for i in numbers)
    general = load_probe(SAMPLE_PROBE_FILE.parent / "probe_general_mc.jsonl")
    assert len(general) == 16 and {i["answer"] for i in general} == set("ABCD")
    choices = load_probe(SAMPLE_EVAL_FILE, limit=3)  # a GPQA-format CSV works as a probe too
    assert len(choices) == 3 and "(D)" in choices[0]["question"] and choices[0]["answer"] in "ABCD"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "4"}\n{"question": "Pick", "choices": ["x"], "answer": "Q"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: answer 'Q' is not a letter"):
        load_probe(bad)
    bad.write_text('{"question": "2+2?"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: expected a JSON object with 'question' and 'answer'"):
        load_probe(bad)


def test_fallback_params_are_checked(tmp_path):
    from sedir_utils.core.params import ParamsError

    path = tmp_path / "p.yaml"
    path.write_text("audit:\n  on_fail: fallback\n")
    with pytest.raises(ParamsError, match="audit.fallback: audit.on_fail is 'fallback' but no fallback"):
        load_params(path)
    path.write_text("audit:\n  on_fail: fallback\n  fallback: vibes\n")
    with pytest.raises(ParamsError, match="audit.fallback: expected one of"):
        load_params(path)


def test_the_stage_applies_the_fallback(tmp_path, monkeypatch, embedded_path):
    """A failing audit with on_fail=fallback switches scorer; with stop it ends the stage naming the numbers."""
    from sedir_utils.core.io import StageError
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.stages.scoring import audit as audit_module
    from sedir_utils.stages.scoring import stage as rewards

    report = {
        "ok": False,
        "reasons": ["AUROC 0.50 (95% CI 0.30-0.70) does not exclude 0.5"],
        "active_scorer": "llm_judge",
        "probe_file": "probe.jsonl",
    }
    monkeypatch.setattr(
        audit_module, "run_audit", lambda params, paths, policy, models=None, answers=None: ([], dict(report))
    )
    path = tmp_path / "p.yaml"
    path.write_text("audit:\n  on_fail: fallback\n  fallback: majority_vote\n")
    section, require_answer, _ = rewards.audit_and_choose(load_params(path), RunPaths(tmp_path, 1), embedded_path)
    assert section.scorers == ["majority_vote"] and not require_answer
    path.write_text("audit:\n  on_fail: fallback\n  fallback: require_final_answer\n")
    section, require_answer, _ = rewards.audit_and_choose(load_params(path), RunPaths(tmp_path, 1), embedded_path)
    assert section.scorers == ["llm_judge"] and require_answer
    path.write_text("audit:\n  on_fail: stop\n")
    with pytest.raises(StageError, match=r"scorer llm_judge cannot be trusted .*CI 0.30-0.70.*on_fail: stop"):
        rewards.audit_and_choose(load_params(path), RunPaths(tmp_path, 1), embedded_path)
    path.write_text("audit:\n  on_fail: continue\n")
    section, require_answer, _ = rewards.audit_and_choose(load_params(path), RunPaths(tmp_path, 1), embedded_path)
    assert section.scorers == ["llm_judge"] and not require_answer


def test_the_verdict_reads_the_same_in_the_runner_and_the_notebook(tmp_path, capsys):
    from sedir_utils.core.io import write_json
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.run.runner import warn_about_audit
    from sedir_utils.stages.scoring.audit import verdict_text

    passed = {"ok": True, "active_scorer": "llm_judge", "reasons": [], "action": "none"}
    failed = {
        "ok": False,
        "active_scorer": "llm_judge",
        "reasons": ["AUROC 0.50 (95% CI 0.30-0.70) does not exclude 0.5"],
        "action": "stop",
    }
    assert verdict_text(passed) == "reward audit: active scorer llm_judge passes"
    paths = RunPaths(tmp_path, 2)
    for report in (passed, failed):
        write_json(paths.metrics, {"audit": report})
        warn_about_audit(paths)
    out = capsys.readouterr().out
    assert out.strip() == verdict_text(failed, 2).strip()  # the runner says only the failure, in the same words
    assert "[iter 2] REWARD AUDIT FAILED for llm_judge: AUROC 0.50" in out and "action: stop" in out
