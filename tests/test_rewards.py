import math

import pytest
import torch

from sedir_utils.core.params import RewardParams
from sedir_utils.engine.scorers import score_rows as score_responses
from sedir_utils.engine.scorers.combine import combine_scores
from sedir_utils.engine.scorers.judge import candidate_token_ids, expected_score, judge_scores
from sedir_utils.engine.scorers.majority_vote import extract_final_answer, majority_vote_scores
from sedir_utils.engine.scorers.reward_model import reward_model_scores
from sedir_utils.engine.scorers.self_certainty import self_certainty_from_logits, self_certainty_scores
from sedir_utils.stages.pairs import build_preference_pairs, dpo_rows, sft_rows
from sedir_utils.stages.scoring.monitoring import collapse_share, reward_metrics


def test_expected_score_from_constructed_probabilities():
    candidates = [10, 11, 12]  # token ids standing for scores 0, 1, 2
    logits = torch.full((2, 20), -1e9)
    logits[0, [10, 12]] = 0.0  # half on "0", half on "2"
    logits[1, 11] = 0.0
    logits[1, 5] = 0.0  # half the mass on a token that is no score at all
    scores, mass = expected_score(logits, candidates, values=(0, 1, 2))
    assert scores == pytest.approx([1.0, 1.0])
    assert mass == pytest.approx([1.0, 0.5])


def test_judge_reads_each_digit_as_one_token(tokenizer):
    prefill, ids = candidate_token_ids(tokenizer, "Score:", [str(d) for d in range(10)])
    assert prefill == "Score: "  # SmolLM2 writes the space and the digit as two tokens
    assert [tokenizer.decode([i]) for i in ids] == [str(d) for d in range(10)]


def test_policy_as_judge_gives_scores_on_its_scale(tokenizer, model_fp32):
    rows = [
        {"question": "What is 2 + 3?", "response": "2 + 3 = 5. Final answer: 5"},
        {"question": "What is 2 + 3?", "response": "Bananas are yellow."},
    ]
    scores, stats = judge_scores(model_fp32, tokenizer, rows, batch_size=2, max_length=512)
    assert all(0 <= s["score"] <= 9 and 0 < s["judge_mass"] <= 1 for s in scores)
    alone, _ = judge_scores(model_fp32, tokenizer, rows[1:], batch_size=1, max_length=512)
    assert alone[0]["score"] == pytest.approx(scores[1]["score"], abs=1e-3)  # padding does not change a score
    long = [{"question": "Why?", "response": "because " * 400}]
    _, stats = judge_scores(model_fp32, tokenizer, long, batch_size=1, max_length=256)
    assert stats["truncated"] == 1


@pytest.fixture(scope="module")
def tiny_reward_model(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_backend_on_a_tiny_random_classifier(tokenizer, tiny_reward_model):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    rows = [
        {"question": "What is 2 + 3?", "response": "Step 1: add. Final answer: 5"},
        {"question": "Name a prime.", "response": "7"},
        {"question": "Why is the sky blue?", "response": "Rayleigh scattering " * 50},
    ]
    batched, stats = reward_model_scores(tiny_reward_model, tok, rows, batch_size=3, max_length=64)
    alone = [reward_model_scores(tiny_reward_model, tok, [r], batch_size=1, max_length=64)[0][0] for r in rows]
    assert stats["truncated"] == 1
    assert [b["score"] for b in batched] == pytest.approx([a["score"] for a in alone], abs=1e-5)
    assert len({round(b["score"], 6) for b in batched}) == 3


def rows_for(question_id, rewards, finished=None):
    finished = finished or [True] * len(rewards)
    return [
        {
            "id": f"{question_id}-r{i}",
            "question_id": question_id,
            "prompt": [{"role": "user", "content": "q"}],
            "response": f"answer {i}",
            "reward": r,
            "finished": f,
            "scorer": "test",
            "iteration": 1,
        }
        for i, (r, f) in enumerate(zip(rewards, finished))
    ]


def test_the_chosen_response_outscores_the_rejected_one():
    pairs, stats = build_preference_pairs(rows_for("a", [0.2, 0.9, 0.5]) + rows_for("b", [3.0, 1.0]))
    assert stats["pairs"] == 2
    a = pairs[0]
    assert (a["chosen_id"], a["rejected_id"]) == ("a-r1", "a-r0")
    assert all(p["chosen_score"] > p["rejected_score"] and p["margin"] > 0 for p in pairs)
    assert a["chosen"] == [{"role": "assistant", "content": "answer 1"}] and a["scorer"] == "test"


def test_pairs_skip_and_count_single_answers_ties_nans_and_small_margins():
    rows = (
        rows_for("single", [1.0])
        + rows_for("tie", [2.0, 2.0, 2.0])
        + rows_for("nan", [math.nan, 1.0])
        + rows_for("close", [1.0, 1.05])
        + rows_for("ok", [0.0, 1.0])
    )
    pairs, stats = build_preference_pairs(rows, min_margin=0.1)
    assert [p["question_id"] for p in pairs] == ["ok"]
    assert stats["too_few"] == 2  # "single", and "nan" with one scored answer left
    assert stats["nan"] == 1
    assert stats["margin_too_small"] == 2  # "tie" and "close"


def test_unfinished_answers_can_be_rejected_never_chosen():
    pairs, stats = build_preference_pairs(rows_for("a", [5.0, 1.0, 3.0], finished=[False, False, True]))
    assert (pairs[0]["chosen_id"], pairs[0]["rejected_id"]) == ("a-r2", "a-r1")
    pairs, stats = build_preference_pairs(rows_for("b", [5.0, 1.0], finished=[False, False]))
    assert pairs == [] and stats["no_finished"] == 1


def test_sft_rows_are_trl_prompt_completion():
    pairs, _ = build_preference_pairs(rows_for("a", [0.0, 1.0]))
    (row,) = sft_rows(pairs)
    assert row["prompt"] == [{"role": "user", "content": "q"}]
    assert row["completion"] == [{"role": "assistant", "content": "answer 1"}]


def test_self_certainty_matches_hand_computed_values():
    uniform = torch.zeros(3, 4)
    assert self_certainty_from_logits(uniform) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    by_hand = -math.log(4) - (math.log(0.7) + 3 * math.log(0.1)) / 4  # KL(U || p)
    logits = torch.stack([p.log(), torch.zeros(4)])  # a confident position and a uniform one
    assert self_certainty_from_logits(logits) == pytest.approx(by_hand / 2, rel=1e-5)


def test_self_certainty_reads_the_response_positions(tokenizer, model_fp32):
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "response": "2 + 3 = 5."},
        {
            "prompt": [{"role": "user", "content": "Name a colour of the sky on a clear day, please."}],
            "response": "Blue.",
        },
    ]
    batched, _ = self_certainty_scores(model_fp32, tokenizer, rows, batch_size=2, max_length=512)
    row = rows[0]
    prefix = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model_fp32(input_ids=torch.tensor([p_ids + r_ids])).logits[0]
    by_hand = self_certainty_from_logits(logits[len(p_ids) - 1 : len(p_ids) + len(r_ids) - 1])
    assert batched[0]["score"] == pytest.approx(by_hand, rel=1e-4)
    alone, _ = self_certainty_scores(model_fp32, tokenizer, rows[1:], batch_size=1, max_length=512)
    assert alone[0]["score"] == pytest.approx(batched[1]["score"], rel=1e-4)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Step 1 ... Final answer: 42", "42"),
        ("final answer is **B**.", "b"),
        ("Final Answer: $\\boxed{7}$\nmore text", "7"),
        ("Final answer: 3\n... wait. Final answer: 4.", "4"),
        ("I think it is 5", None),
    ],
)
def test_final_answer_extraction(text, answer):
    assert extract_final_answer(text) == answer


def test_majority_vote_on_constructed_answers():
    texts = ["Final answer: 4", "final answer: 4.", "Final answer: 5", "no answer here"]
    rows = [{"question_id": "q", "response": t} for t in texts] + [
        {"question_id": "other", "response": "Final answer: 4"}
    ]
    out, stats = majority_vote_scores(rows)
    assert [o["score"] for o in out] == [0.5, 0.5, 0.25, 0.0, 1.0]
    assert stats["no_final_answer"] == 1


def test_combining_scorers():
    q = ["a", "a", "a", "b", "b"]
    single = {"llm_judge": [1.0, 2.0, 3.0, 4.0, 5.0]}
    assert combine_scores(single, q) == [1.0, 2.0, 3.0, 4.0, 5.0]  # one scorer passes through
    two = {"x": [1.0, 2.0, 3.0, 1.0, 1.0], "y": [30.0, 20.0, 10.0, 0.0, 0.0]}
    borda = combine_scores(two, q, "borda", weights={"x": 2.0})
    # question a: x ranks 0,1,2 (x2) and y ranks 2,1,0 -> 2, 3, 4; question b: ties share rank 0.5
    assert borda == [2.0, 3.0, 4.0, 1.5, 1.5]
    nan = combine_scores({"x": [1.0, math.nan], "y": [1.0, 2.0]}, ["a", "a"], "weighted_sum")
    assert math.isnan(nan[1]) and not math.isnan(nan[0])


def test_weighted_sum_uses_z_scores():
    two = {"x": [0.0, 10.0], "y": [0.0, 1000.0]}
    assert combine_scores(two, ["a", "b"], "weighted_sum", {"x": 1.0, "y": 0.5}) == pytest.approx([-1.5, 1.5])


def test_collapse_share():
    assert collapse_share([5.0, 5.0, 5.1, 9.0], band=0.2) == 0.75
    assert collapse_share([1.0, 2.0, 3.0, 4.0], band=0.1) == 0.0  # the median, 2.5, is no score at all
    assert collapse_share([1.0, 2.0, 3.0], band=0.1) == pytest.approx(1 / 3)


def test_metrics_report_spread_margins_and_ties():
    rows = rows_for("a", [1.0, 3.0]) + rows_for("b", [2.0, 2.0]) + rows_for("c", [0.0, 4.0])
    for r in rows:
        r["scores"] = {"llm_judge": r["reward"]}
    pairs, stats = build_preference_pairs(rows)
    m = reward_metrics(rows, pairs, stats, RewardParams())
    assert m["reward"]["tie_share"] == pytest.approx(1 / 3)
    assert m["reward"]["margin_mean"] == pytest.approx(3.0)
    assert m["scorers"]["llm_judge"]["within_question_spread"] == pytest.approx(2.0)
    assert m["reward"]["collapsed"] is False


def test_every_offline_scorer_scores_the_embedded_model(embedded_path):
    rows = rows_for("a", [0, 0]) + rows_for("b", [0, 0])
    for r, text in zip(rows, ["2 + 2 = 4. Final answer: 4", "Final answer: 5", "Final answer: 4", "I am unsure."]):
        r["response"], r["question"] = text, "What is 2 + 2?"
        r.pop("reward")
    for scorers in (["llm_judge"], ["self_certainty"], ["majority_vote"], ["llm_judge", "self_certainty"]):
        section = RewardParams(scorers=scorers, batch_size=4, max_length=256)
        scored, stats = score_responses(rows, section, policy_path=embedded_path, dtype="float32")
        assert all(set(r["scores"]) == set(scorers) and not math.isnan(r["reward"]) for r in scored)
        assert stats["scorer"] == (scorers[0] if len(scorers) == 1 else f"weighted_sum({','.join(scorers)})")


def test_dpo_rows_hold_trls_columns_and_what_sample_selection_reads():
    """DPO trains from dpo.jsonl (as SFT from sft.jsonl): TRL's columns, then the provenance the fine-tune's
    sample selection ranks by."""
    pairs, _ = build_preference_pairs(rows_for("a", [0.0, 1.0]))
    row = dpo_rows(pairs)[0]
    assert list(row)[:3] == ["prompt", "chosen", "rejected"]
    assert row["chosen_score"] == 1.0 and row["question_id"] == "a" and row["rejected_id"] != row["chosen_id"]


def test_scoring_resumes_after_a_crash_from_saved_chunks(tmp_path, embedded_path, monkeypatch):
    import sedir_utils.engine.scorers as scorers
    import sedir_utils.engine.scorers.base as base
    import sedir_utils.engine.scorers.judge as judge_module

    rows = [
        {"question_id": f"q{i // 2}", "question": f"What is {i} + 1?", "response": f"It is {i + 1}."}
        for i in range(base.SCORE_CHUNK + 6)
    ]  # two chunks
    section = RewardParams(scorers=["llm_judge"], batch_size=8)
    calls = []

    def judge(model, tokenizer, part, batch_size, max_length):
        calls.append(len(part))
        if crash and len(calls) == 2:
            raise RuntimeError("killed")
        return [{"score": float(len(r["response"])), "judge_mass": 1.0} for r in part], {"truncated": 1}

    monkeypatch.setattr(judge_module, "judge_scores", judge)
    models = {}
    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        scorers.score_rows(
            rows, section, policy_path=embedded_path, dtype="float32", models=models, checkpoint=tmp_path
        )
    assert len(list(tmp_path.glob("llm_judge-00000-*.json"))) == 1
    crash, calls[:] = False, []
    resumed, stats = scorers.score_rows(
        rows, section, policy_path=embedded_path, dtype="float32", models=models, checkpoint=tmp_path
    )
    assert calls == [6]  # only the unfinished chunk was scored again
    straight, _ = scorers.score_rows(rows, section, policy_path=embedded_path, dtype="float32", models=models)
    assert [r["reward"] for r in resumed] == [r["reward"] for r in straight]
    assert stats["llm_judge_truncated"] == 2
