import math

import pytest
import torch

from sedir_utils.rewards import (build_preference_pairs, candidate_token_ids, expected_score, judge_scores,
                                 reward_model_scores, sft_rows)


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
    rows = [{"question": "What is 2 + 3?", "response": "2 + 3 = 5. Final answer: 5"},
            {"question": "What is 2 + 3?", "response": "Bananas are yellow."}]
    scores, stats = judge_scores(model_fp32, tokenizer, rows, batch_size=2, max_length=512)
    assert all(0 <= s["reward"] <= 9 and 0 < s["judge_mass"] <= 1 for s in scores)
    alone, _ = judge_scores(model_fp32, tokenizer, rows[1:], batch_size=1, max_length=512)
    assert alone[0]["reward"] == pytest.approx(scores[1]["reward"], abs=1e-3)  # padding does not change a score
    long = [{"question": "Why?", "response": "because " * 400}]
    _, stats = judge_scores(model_fp32, tokenizer, long, batch_size=1, max_length=256)
    assert stats["truncated"] == 1


@pytest.fixture(scope="module")
def tiny_reward_model(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_backend_on_a_tiny_random_classifier(tokenizer, tiny_reward_model):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    rows = [{"question": "What is 2 + 3?", "response": "Step 1: add. Final answer: 5"},
            {"question": "Name a prime.", "response": "7"},
            {"question": "Why is the sky blue?", "response": "Rayleigh scattering " * 50}]
    batched, stats = reward_model_scores(tiny_reward_model, tok, rows, batch_size=3, max_length=64)
    alone = [reward_model_scores(tiny_reward_model, tok, [r], batch_size=1, max_length=64)[0][0] for r in rows]
    assert stats["truncated"] == 1
    assert [b["reward"] for b in batched] == pytest.approx([a["reward"] for a in alone], abs=1e-5)
    assert len({round(b["reward"], 6) for b in batched}) == 3


def rows_for(question_id, rewards, finished=None):
    finished = finished or [True] * len(rewards)
    return [{"id": f"{question_id}-r{i}", "question_id": question_id, "prompt": [{"role": "user", "content": "q"}],
             "response": f"answer {i}", "reward": r, "finished": f, "scorer": "test", "iteration": 1}
            for i, (r, f) in enumerate(zip(rewards, finished))]


def test_the_chosen_response_outscores_the_rejected_one():
    pairs, stats = build_preference_pairs(rows_for("a", [0.2, 0.9, 0.5]) + rows_for("b", [3.0, 1.0]))
    assert stats["pairs"] == 2
    a = pairs[0]
    assert (a["chosen_id"], a["rejected_id"]) == ("a-r1", "a-r0")
    assert all(p["chosen_score"] > p["rejected_score"] and p["margin"] > 0 for p in pairs)
    assert a["chosen"] == [{"role": "assistant", "content": "answer 1"}] and a["scorer"] == "test"


def test_pairs_skip_and_count_single_answers_ties_nans_and_small_margins():
    rows = (rows_for("single", [1.0]) + rows_for("tie", [2.0, 2.0, 2.0]) + rows_for("nan", [math.nan, 1.0])
            + rows_for("close", [1.0, 1.05]) + rows_for("ok", [0.0, 1.0]))
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
