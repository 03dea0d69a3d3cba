"""The difficulty band (R-Zero, ScPO): a question is paired only when the share of its answers that agree with its
majority final answer lies in [reward.consistency_low, reward.consistency_high]; the counts say what was dropped."""

from pathlib import Path

import pytest

from sedir_utils.core.io import read_json, read_jsonl, write_jsonl
from sedir_utils.core.params import ParamsError
from sedir_utils.core.paths import RunPaths
from sedir_utils.engine.scorers.majority_vote import agreement_by_question, extract_final_answer
from sedir_utils.run.fingerprints import Fingerprints
from sedir_utils.run.params import load_params
from sedir_utils.stages.scoring import stage as rewards
from sedir_utils.stages.scoring.band import difficulty_band

PARAMS = Path(__file__).resolve().parent.parent / "params" / "embedded.yaml"
# Four answers per question: "easy" all agree (1.0), "mid" 2 of 4 (0.5), "split" 3 different with one silent
# (0.25), "silent" no final answer at all (0.0, no majority).
ANSWERS = {
    "easy": ["Final answer: 4", "final answer: 4.", "Final answer: 4", "Final answer is 4"],
    "mid": ["Final answer: 7", "Final answer: 7", "Final answer: 8", "I am not sure"],
    "split": ["Final answer: a", "Final answer: b", "Final answer: c", "Final answer:"],
    "silent": ["maybe 3", "no idea", "Final answer is", "hmm"],
}
ROWS = [
    {"id": f"{q}-{i}", "question_id": q, "prompt": [], "response": text, "finished": True}
    for q, texts in ANSWERS.items()
    for i, text in enumerate(texts)
]


@pytest.mark.parametrize("text", ["Final answer:", "Final answer is", "final answer -", "Final answer: \n"])
def test_a_final_answer_marker_with_nothing_after_it_is_no_answer(text):
    assert extract_final_answer(text) is None


def test_a_final_answer_may_start_with_a_minus():
    assert extract_final_answer("Final answer: -3") == "-3"


def test_agreement_is_the_majority_answers_share_of_all_answers():
    assert agreement_by_question(ROWS) == {
        "easy": ("4", 1.0),
        "mid": ("7", 0.5),
        "split": ("a", 0.25),  # a three-way tie goes to the answer given first
        "silent": (None, 0.0),
    }


def test_the_band_keeps_the_questions_inside_it_and_counts_the_rest():
    kept, share, stats = difficulty_band(ROWS, 0.3, 0.7)
    assert kept == {"mid"} and share["split"] == 0.25
    assert stats == {
        "band_questions": 4,
        "band_kept": 1,
        "band_too_hard": 2,
        "band_no_final_answer": 1,
        "band_too_easy": 1,
    }
    assert difficulty_band(ROWS, 0.0, 1.0)[0] == set(ANSWERS)  # the default keeps every question


def test_the_reward_stage_pairs_only_questions_in_the_band(tmp_path, monkeypatch, weightless_model):
    model = {"model.name": weightless_model}  # named as the policy, never loaded: the scorer is scripted
    params = load_params(PARAMS, {**model, "reward.consistency_low": 0.25, "reward.consistency_high": 0.5})
    paths = RunPaths(tmp_path, 1)
    write_jsonl(paths.responses, ROWS)

    def score_rows(rows, section, **kw):  # a scorer that ranks answers by their index: every question pairs
        scored = [{**r, "reward": float(r["id"][-1]), "scores": {"llm_judge": float(r["id"][-1])}} for r in rows]
        return [{**r, "scorer": "llm_judge"} for r in scored], {}

    monkeypatch.setattr(rewards, "score_rows", score_rows)
    monkeypatch.setattr(rewards, "audit_and_choose", lambda params, paths, policy, models: (params.reward, False, None))
    _, pairs, stats = rewards.run(params, paths)
    assert sorted(p["question_id"] for p in pairs) == ["mid", "split"]
    assert (stats["band_kept"], stats["band_too_hard"], stats["band_too_easy"]) == (2, 1, 1)
    assert read_json(paths.pair_stats)["band_no_final_answer"] == 1
    assert {r["question_id"]: r["agreement"] for r in read_jsonl(paths.rewards)}["easy"] == 1.0
    assert read_json(paths.metrics)["reward"]["difficulty"]["band"] == [0.25, 0.5]
    # The band off: no agreement on the rows, no band counts (the files of runs from before it).
    _, pairs, stats = rewards.run(load_params(PARAMS, model), paths)
    assert len(pairs) == 4 and "band_kept" not in stats and "agreement" not in read_jsonl(paths.rewards)[0]


def test_the_band_is_checked_at_load_and_is_in_the_reward_fingerprint_only_when_on(tmp_path):
    with pytest.raises(ParamsError, match=r"reward.consistency_low: must not exceed reward.consistency_high$"):
        load_params(PARAMS, {"reward.consistency_low": 0.8, "reward.consistency_high": 0.2})
    with pytest.raises(ParamsError, match=r"reward.consistency_high: .*in \[0, 1\]"):
        load_params(PARAMS, {"reward.consistency_high": 1.5})
    default = Fingerprints(load_params(PARAMS), tmp_path).stage(1, "reward")
    said = load_params(PARAMS, {"reward.consistency_low": 0.0, "reward.consistency_high": 1.0})
    assert Fingerprints(said, tmp_path).stage(1, "reward") == default
    on = load_params(PARAMS, {"reward.consistency_low": 0.3})
    assert Fingerprints(on, tmp_path).stage(1, "reward") != default
