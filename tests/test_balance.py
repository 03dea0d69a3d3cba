"""B-STaR's balancing: the balance score by hand, the sweep's choice on a scripted sampler and scorer, the
audit measuring the sweep's answers, and the choice reaching the responses and the pairing."""

import dataclasses

import pytest

from sedir_utils.stages.responses.balance import balance_score, sweep, thresholds


def _a(q: str, text: str, reward: float, correct: bool, finished: bool = True) -> dict:
    return {"question_id": q, "response": text, "reward": reward, "correct": correct, "finished": finished}


ANSWERS = [
    _a("q1", "right A", 0.9, True),
    _a("q1", "right A", 0.8, True),  # the same text: one distinct answer
    _a("q1", "right B", 0.4, True),
    _a("q1", "wrong", 0.6, False),
    _a("q2", "wrong 1", 0.7, False),
    _a("q2", "wrong 2", 0.2, False),
    _a("q2", "right cut off", 0.95, True, finished=False),  # never selected, never explored
]


def test_the_balance_score_matches_hand_computed_values():
    # No threshold: q1 selects {right A, right B, wrong}: min(2/2, 1) * 2/3; q2 selects 2 wrong: 0.
    everything = balance_score(ANSWERS, None, n_star=2)
    assert everything["balance"] == pytest.approx((2 / 3 + 0) / 2)
    assert everything["exploration"] == pytest.approx((2 + 0) / 2)
    assert everything["exploitation"] == pytest.approx(2 / 5) and everything["selected"] == pytest.approx(5 / 2)
    # Threshold 0.65: q1 selects {right A}: min(1/2, 1) * 1/1 = 0.5; q2 selects {wrong 1}: 0.
    assert balance_score(ANSWERS, 0.65, n_star=2)["balance"] == pytest.approx(0.25)
    assert balance_score(ANSWERS, 0.65, n_star=1)["balance"] == pytest.approx(0.5)
    # Above every score: nothing selected anywhere counts 0 (B-STaR's code would drop those questions).
    assert balance_score(ANSWERS, 2.0, n_star=2) == {
        "balance": 0.0,
        "exploration": 1.0,
        "exploitation": 0.0,
        "selected": 0.0,
    }


def test_thresholds_are_quantiles_of_the_scores():
    assert thresholds(ANSWERS, [0.0, 0.5, 0.99]) == [None, 0.7, 0.9]


def test_the_sweep_picks_the_setting_with_the_best_balance_score():
    cold = [_a(q, "same right", 0.5, True) for q in ("q1", "q2") for _ in range(3)]  # explores one answer
    hot = [_a("q1", f"right {i}", 0.9, True) for i in range(2)] + [_a("q1", "wrong", 0.1, False)]
    hot += [_a("q2", "right", 0.8, True), _a("q2", "wrong a", 0.3, False), _a("q2", "wrong b", 0.2, False)]
    table, best = sweep({0.5: cold, 1.1: hot}, [0.0, 0.5], n_star=2)
    scores = {(r["temperature"], r["quantile"]): r["balance"] for r in table}
    # cold: one distinct right answer per question: 0.5 at any threshold
    assert scores[(0.5, 0.0)] == scores[(0.5, 0.5)] == pytest.approx(0.5)
    # hot, no threshold: q1 min(2/2,1)*2/3, q2 min(1/2,1)*1/3; threshold at the median (0.3): q1 2/2*2/2 = 1,
    # q2 selects {right, wrong a}: 1/2 * 1/2
    assert scores[(1.1, 0.0)] == pytest.approx((2 / 3 + 1 / 6) / 2)
    assert scores[(1.1, 0.5)] == pytest.approx((1 + 1 / 4) / 2)
    assert (best["temperature"], best["threshold"]) == (1.1, 0.3)
    _, tie = sweep({0.5: cold, 0.7: cold}, [0.0], n_star=2)
    assert tie["temperature"] == 0.5  # ties: the setting listed first


def test_the_sweep_samples_once_and_the_audit_measures_its_answers(tmp_path, monkeypatch, weightless_model):
    """A scripted sampler (more distinct right answers when hotter) and scorer (scores right answers high):
    the stage's sweep writes its table and choice, the audit then reuses the chosen temperature's answers
    without sampling, and the pairing drops questions whose best answer scores below the chosen threshold."""
    from sedir_utils.core.io import read_json, read_jsonl, write_jsonl
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.engine.sampling import Generation
    from sedir_utils.run.params import load_params
    from sedir_utils.stages import probe as labelled_probe
    from sedir_utils.stages.responses import balance
    from sedir_utils.stages.scoring import audit
    from sedir_utils.stages.scoring import stage as rewards

    calls = []

    def generate(model, tokenizer, prompts, sampling, batch_size, seed, desc="", **kw):
        calls.append(sampling.temperature)
        # T 0.4: always the same right letter; T 1.0: a different wording each time, right half the time.
        out = []
        for i, _ in enumerate(prompts):
            if sampling.temperature < 0.5:
                out.append(Generation("Final answer: (A)", 3, True))
            else:
                out.append(Generation(f"Try {i}. Final answer: ({'A' if i % 2 == 0 else 'B'})", 5, True))
        return out

    def score_rows(rows, section, **kw):
        scored = [{**r, "reward": 1.0 if r["correct"] else 0.0, "scores": {"llm_judge": 1.0}} for r in rows]
        return [{**r, "scorer": "llm_judge"} for r in scored], {}

    probe = tmp_path / "probe.jsonl"
    write_jsonl(probe, [{"question": f"Pick A ({i})", "answer": "A", "choices": ["yes", "no"]} for i in range(3)])
    monkeypatch.setattr(labelled_probe, "score_rows", score_rows)
    monkeypatch.setattr("sedir_utils.engine.generation.generate", generate)
    monkeypatch.setattr(labelled_probe, "sample_answers", _sample_with(generate))
    monkeypatch.setattr("sedir_utils.core.models.load_cached", lambda models, path, dtype: (None, _Tokenizer()))
    params_file = tmp_path / "p.yaml"
    params_file.write_text(
        f"model:\n  name: {weightless_model}\naudit:\n  probe_file: {probe}\n  num_samples: 4\n"
        "balance:\n  enabled: true\n  temperatures: [0.4, 1.0]\n  threshold_quantiles: [0.0, 0.6]\n  n_star: 2\n"
    )
    params = load_params(params_file)
    paths = RunPaths(tmp_path / "run", 1)
    report = balance.run_sweep(params, paths)
    assert calls == [0.4, 1.0]  # one sampling per temperature
    # T 0.4: one distinct right answer per question: min(1/2, 1) * 1 = 0.5 at any threshold.
    # T 1.0, threshold at the 0.6 quantile of the scores (1.0): the 2 distinct right answers only: 1 * 1 = 1.
    assert (report["temperature"], report["threshold"], report["balance"]) == (1.0, 1.0, 1.0)
    assert read_json(paths.metrics)["balance"]["table"] == report["table"] and len(report["table"]) == 4
    reused = rewards.balanced_probe_answers(params, paths)
    assert len(reused) == 12 and {r["temperature"] for r in reused} == {1.0}
    monkeypatch.setattr(labelled_probe, "sample_answers", _refuse)
    rows, audited = audit.run_audit(params, paths, "policy", answers=reused)
    assert rows == reused and audited["sampled_by"] == "balance" and audited["answers"] == 12
    # The pairing uses the chosen threshold (1.0): y's best answer scores 0.5, below it, and is dropped.
    scores = {"x 0": 1.0, "x 1": 0.0, "y 0": 0.5, "y 1": 0.0}
    responses = [{"id": k, "question_id": k[0], "prompt": [], "response": k, "finished": True} for k in scores]
    write_jsonl(paths.responses, responses)

    def score_responses(rows, section, **kw):
        return [
            {
                **r,
                "reward": scores[r["response"]],
                "scores": dict.fromkeys(["llm_judge", "majority_vote"], scores[r["response"]]),
                "scorer": "llm_judge",
            }
            for r in rows
        ], {}

    monkeypatch.setattr(rewards, "score_rows", score_responses)
    monkeypatch.setattr(rewards, "audit_and_choose", lambda params, paths, policy, models: (params.reward, False, None))
    _, pairs, stats = rewards.run(params, paths)
    assert [p["question_id"] for p in pairs] == ["x"] and stats["below_min_score"] == 1
    # A failed audit that switched to its fallback scorer: the threshold (in the other scorer's units) is not used.
    fallback = dataclasses.replace(params.reward, scorers=["majority_vote"])
    monkeypatch.setattr(rewards, "audit_and_choose", lambda params, paths, policy, models: (fallback, False, None))
    _, pairs, stats = rewards.run(params, paths)
    assert [p["question_id"] for p in pairs] == ["x", "y"] and stats["below_min_score"] == 0
    assert read_jsonl(paths.pairs) == pairs


class _Tokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


def _sample_with(generate):
    from sedir_utils.engine import generation

    def sample(*args, **kwargs):
        return generation.sample_answers(*args, **{**kwargs, "generate_fn": generate})

    return sample


def _refuse(*args, **kwargs):
    raise AssertionError("the audit sampled the probe a second time")


def test_balancing_off_leaves_the_responses_fingerprint_as_it_was(tmp_path):
    from sedir_utils.core.declarations import stage
    from sedir_utils.run.params import load_params

    off, on = tmp_path / "off.yaml", tmp_path / "on.yaml"
    off.write_text("balance:\n  enabled: false\n")
    on.write_text("balance:\n  enabled: true\n")
    assert stage("responses").sections(load_params(off).to_dict()) == ("model", "responses")
    assert stage("responses").sections(load_params(on).to_dict()) == (
        "model",
        "responses",
        "balance",
        "reward",
        "audit",
    )
