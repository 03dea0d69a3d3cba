"""Scorers are a registry: a fifth scorer is one class and its registration, here in a test file, with no
module of the suite edited; the params, the stage's scoring, its monitoring and preflight all take it."""

from pathlib import Path

import pytest

from sedir_utils.core.params import ParamsError, RewardParams
from sedir_utils.engine import scorers
from sedir_utils.engine.scorers import base
from sedir_utils.run import preflight
from sedir_utils.run.params import load_params
from sedir_utils.stages.pairs import build_preference_pairs
from sedir_utils.stages.scoring.monitoring import reward_metrics

PARAMS = Path(__file__).resolve().parent.parent / "params" / "embedded.yaml"


class AnswerLength(base.Scorer):
    """Longer answers score higher (a bad reward; it only has to be a different one)."""

    name = "answer_length"

    def check(self, section):
        return "reward.max_length: answer_length needs at least 64" if section.max_length < 64 else None

    def score(self, rows, ctx):
        return [{"score": float(len(r["response"])), "length_seen": len(r["response"])} for r in rows], {
            "rows": len(rows)
        }


@pytest.fixture
def registered():
    scorers.register(AnswerLength)
    yield
    scorers.REGISTRY.pop("answer_length")


def test_a_registered_scorer_is_named_in_params_scored_combined_and_monitored(registered, tmp_path):
    params = load_params(PARAMS, {"reward.scorers": ["answer_length", "majority_vote"]})
    rows = [
        {
            "question_id": "q",
            "question": "2+2?",
            "response": text,
            "finished": True,
            "id": f"r{i}",
            "prompt": [],
            "iteration": 1,
        }
        for i, text in enumerate(["Final answer: 4", "It is four.\nFinal answer: 4", "No idea"])
    ]
    scored, stats = scorers.score_rows(rows, params.reward, policy_path="unused", dtype="float32")
    assert [r["scores"]["answer_length"] for r in scored] == [15.0, 27.0, 7.0]
    assert [r["length_seen"] for r in scored] == [15, 27, 7] and stats["answer_length_rows"] == 3
    assert stats["scorer"] == "weighted_sum(answer_length,majority_vote)"
    pairs, pair_stats = build_preference_pairs(scored)
    assert pairs[0]["chosen_id"] == "r1" and pairs[0]["rejected_id"] == "r2"
    metrics = reward_metrics(scored, pairs, pair_stats, params.reward)
    assert "collapse_share" not in metrics["scorers"]["answer_length"]  # no nominal scale declared
    assert preflight.used_models(params) == [("model.name", "embedded")]


def test_a_registered_scorers_own_params_check_and_unknown_names(registered):
    with pytest.raises(ParamsError, match=r"reward.max_length: answer_length needs at least 64$"):
        load_params(PARAMS, {"reward.scorers": ["answer_length"], "reward.max_length": 32})
    load_params(PARAMS, {"audit.on_fail": "fallback", "audit.fallback": "answer_length"})
    with pytest.raises(ParamsError, match=r"reward.scorers\[0\]: expected one of .*'answer_length', got 'vibes'"):
        load_params(PARAMS, {"reward.scorers": ["vibes"]})


def test_registration_refuses_a_nameless_class_and_a_taken_name():
    class Nameless(base.Scorer):
        pass

    class Judge(base.Scorer):
        name = "llm_judge"

    with pytest.raises(TypeError, match="Nameless: a scorer needs a name"):
        scorers.register(Nameless)
    with pytest.raises(TypeError, match="scorer 'llm_judge' is already registered"):
        scorers.register(Judge)
    assert scorers.REGISTRY["llm_judge"].__name__ == "LLMJudge"


def test_a_scorer_returning_the_wrong_number_of_rows_fails_in_one_line(registered, monkeypatch):
    monkeypatch.setattr(AnswerLength, "score", lambda self, rows, ctx: ([{"score": 1.0}], {}))
    section = RewardParams(scorers=["answer_length"])
    rows = [
        {"question_id": "q", "question": "?", "response": "a"},
        {"question_id": "q", "question": "?", "response": "b"},
    ]
    with pytest.raises(RuntimeError, match="^scorer answer_length returned 1 scores for 2 rows$"):
        scorers.score_rows(rows, section, policy_path="unused", dtype="float32")


def _answers(texts, question="q", finished=True):
    return [
        {"question_id": question, "question": "2+2?", "response": t, "finished": finished, "id": f"{question}-{i}"}
        for i, t in enumerate(texts)
    ]


def test_the_random_reward_is_seeded_by_run_iteration_and_answer_never_by_its_text():
    """Spurious Rewards' control: uniform in [0, 1), the same for the same seed, iteration and answer id,
    another for another of them, and blind to what the answer says."""
    section = RewardParams(scorers=["random"])

    def scores(rows, seed=0, iteration=1):
        scored, _ = scorers.score_rows(
            rows, section, policy_path="unused", dtype="float32", seed=seed, iteration=iteration
        )
        return [r["reward"] for r in scored]

    rows = _answers(["Final answer: 4", "Final answer: 5", "no idea"])
    first = scores(rows)
    assert first == scores(rows) and len(set(first)) == 3
    assert scores(_answers(["other", "texts", "entirely"])) == first  # the text plays no part
    assert scores(rows, seed=1) != first and scores(rows, iteration=2) != first
    assert scores(_answers(["x"] * 3, question="p")) != first
    many = scores(_answers(["x"] * 4000))
    assert all(0.0 <= s < 1.0 for s in many) and abs(sum(many) / len(many) - 0.5) < 0.02
    assert sum(s < 0.25 for s in many) / len(many) == pytest.approx(0.25, abs=0.03)  # uniform, not bunched


def test_the_format_reward_is_one_for_a_finished_readable_final_answer():
    rows = _answers(
        ["Let me see.\nFinal answer: 4", "The answer is four.", "I think it is 4.", "**Final answer: (B)**"]
    )
    rows.append({**_answers(["Final answer: 4"])[0], "id": "q-cut", "finished": False})  # cut off at the limit
    scored, stats = scorers.score_rows(rows, RewardParams(scorers=["format"]), policy_path="unused", dtype="float32")
    assert [r["reward"] for r in scored] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert stats["format_with_final_answer"] == 2


def test_the_self_rewards_are_params_values_and_fallbacks():
    load_params(PARAMS, {"reward.scorers": ["random"]})
    load_params(PARAMS, {"reward.scorers": ["majority_vote", "format"], "reward.weights": {"format": 0.5}})
    load_params(PARAMS, {"audit.on_fail": "fallback", "audit.fallback": "format"})
    assert [name for name in scorers.names() if name in ("format", "random")] == ["format", "random"]
