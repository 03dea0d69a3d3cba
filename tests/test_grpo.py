"""finetune.method: grpo: the scorers as one TRL reward function over groups, the arms' rewards, the params and
their checks, the collapse watch; and (slow tier) TRL's GRPOTrainer on the CPU with each self-reward."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_run import make_run

from sedir_utils.core.declarations import stage as declaration
from sedir_utils.core.io import read_json, read_jsonl
from sedir_utils.core.params import FinetuneParams, GrpoParams, ParamsError, ResponseParams, RewardParams
from sedir_utils.core.paths import RunPaths
from sedir_utils.engine import scorers
from sedir_utils.engine.group_reward import GroupReward
from sedir_utils.engine.sampling import response_messages
from sedir_utils.engine.scorers.base import Scorer
from sedir_utils.run.fingerprints import Fingerprints
from sedir_utils.run.params import load_params
from sedir_utils.stages.finetune import grpo

PARAMS = Path(__file__).resolve().parent.parent / "params" / "embedded.yaml"
EOS = 2


def _batch(groups: list[tuple[str, list[str]]], finished: bool = True) -> dict:
    """TRL's keyword arguments for one generation batch: each (question id, completions) is one group."""
    prompts, completions, ids, qids, questions = [], [], [], [], []
    for qid, texts in groups:
        for text in texts:
            prompts.append(response_messages(f"question {qid}", "Think."))
            completions.append([{"role": "assistant", "content": text}])
            ids.append([5, 6, EOS] if finished else [5, 6, 7])
            qids.append(qid)
            questions.append(f"question {qid}")
    return dict(prompts=prompts, completions=completions, completion_ids=ids, question_id=qids, question=questions)


def _reward(scorer_names, num_generations=4, combine="weighted_sum", weights=None) -> GroupReward:
    section = RewardParams(scorers=list(scorer_names), combine=combine, weights=weights)
    reward = GroupReward(
        section, num_generations=num_generations, seed=0, iteration=1, policy_path="base", dtype="float32", device="cpu"
    )
    reward.eos_ids = {EOS}
    return reward


def test_group_majority_is_computed_within_each_group_not_across_groups():
    # The same question twice in one batch (two groups): 3 of 4 say 4 in the first, 3 of 4 say 5 in the second.
    batch = _batch(
        [
            ("q1", ["Final answer: 4", "Final answer: 4", "Final answer: 4", "Final answer: 5"]),
            ("q1", ["Final answer: 5", "Final answer: 5", "Final answer: 5", "Final answer: 4"]),
        ]
    )
    state = SimpleNamespace(global_step=3)
    assert _reward(["majority_vote"])(**batch, trainer_state=state) == [0.75, 0.75, 0.75, 0.25] * 2
    rows = _reward(["majority_vote"]).rows(
        batch["prompts"], batch["completions"], batch["completion_ids"], batch["question_id"], batch["question"], 3
    )
    assert [r["question_id"] for r in rows] == ["q1/s3/g0"] * 4 + ["q1/s3/g1"] * 4
    assert rows[5]["id"] == "q1/s3/g1-1" and rows[0]["prompt"] == batch["prompts"][0] and rows[0]["finished"]


def test_a_batch_not_in_groups_of_num_generations_is_refused():
    batch = _batch([("q1", ["a", "b"]), ("q2", ["c", "d"])])
    with pytest.raises(ValueError, match=r"not in groups of finetune\.grpo\.num_generations \(4\): completion 2"):
        _reward(["format"])(**batch)
    with pytest.raises(ValueError, match="batch of 4 completions is not in groups of 3"):
        _reward(["format"], num_generations=3)(**batch)


def test_a_reward_call_without_the_question_columns_or_token_ids_says_what_is_missing():
    batch = _batch([("q1", ["Final answer: 4", "no", "Final answer: 4", "no"])])
    with pytest.raises(ValueError, match="question_id and question columns did not reach the reward function"):
        _reward(["format"])(prompts=batch["prompts"], completions=batch["completions"])
    del batch["completion_ids"]  # a trainer that passes none: finished is unknown, the text decides
    assert _reward(["format"])(**batch) == [1.0, 0.0, 1.0, 0.0]


def test_the_format_reward_needs_a_final_answer_and_a_finished_completion():
    batch = _batch([("q1", ["Final answer: 4", "no answer", "Final answer:", "so final answer is 7"])])
    assert _reward(["format"])(**batch) == [1.0, 0.0, 0.0, 1.0]
    assert _reward(["format"])(**_batch([("q1", ["Final answer: 4"] * 4)], finished=False)) == [0.0] * 4


def test_the_random_reward_is_seeded_per_completion_and_ignores_the_text():
    one = _batch([("q1", ["a", "b", "c", "d"])])
    other = _batch([("q1", ["w", "x", "y", "z"])])
    state = SimpleNamespace(global_step=0)
    first = _reward(["random"])(**one, trainer_state=state)
    assert first == _reward(["random"])(**other, trainer_state=state)  # the text plays no part
    assert len(set(first)) == 4 and all(0 <= v < 1 for v in first)
    assert first != _reward(["random"])(**one, trainer_state=SimpleNamespace(global_step=1))  # nor twice the same


def test_several_scorers_combine_as_the_reward_stage_combines_them():
    texts = ["Final answer: 4", "Final answer: 4", "Final answer: 5", "no answer"]
    batch = _batch([("q1", texts), ("q2", texts[::-1])])
    logged = {}
    for combine in ("weighted_sum", "borda"):
        reward = _reward(["majority_vote", "format"], combine=combine, weights={"format": 2.0})
        got = reward(**batch, log_metric=logged.__setitem__)
        rows = reward.rows(
            batch["prompts"], batch["completions"], batch["completion_ids"], batch["question_id"], batch["question"], 0
        )
        expected, _ = scorers.score_rows(rows, reward.section, policy_path="base", dtype="float32", iteration=1)
        assert got == pytest.approx([r["reward"] for r in expected])
    # the self-reward the watch follows: the scorers' own units, weighted (the combined reward is z-scores or ranks)
    assert logged == {"scores/majority_vote/mean": 0.3125, "scores/format/mean": 0.75, "self_reward": 1.8125}
    assert reward.__name__ == "borda(majority_vote,format)"


class PolicyProbe(Scorer):
    """Records what a model scorer is given: the model it loads for the policy, and the chunk folder."""

    name = "policy_probe"
    seen: list = []

    def score(self, rows, ctx):
        model, tokenizer = ctx.causal_lm(ctx.policy_path)
        PolicyProbe.seen.append((model, tokenizer, ctx.checkpoint))
        return [{"score": float("nan") if r["response"] == "nan" else 1.0} for r in rows], {}


def test_model_scorers_score_with_the_bound_live_policy_and_no_chunk_cache():
    scorers.register(PolicyProbe)
    try:
        reward = _reward(["policy_probe"], num_generations=2)
        live, tokenizer = object(), SimpleNamespace(eos_token_id=9)
        reward.bind(live, tokenizer)
        assert reward(**_batch([("q1", ["a", "nan"])])) == [1.0, None]  # NaN: TRL's "unscorable"
        assert PolicyProbe.seen == [(live, tokenizer, None)] and reward.eos_ids == {9}
    finally:
        scorers.REGISTRY.pop("policy_probe")


def test_grpo_params_are_checked_when_loaded(tmp_path):
    path = tmp_path / "p.yaml"
    cases = {
        "finetune: {method: grpo, grpo: {num_generations: 1}}": r"finetune\.grpo\.num_generations: must be at least 2",
        "finetune: {method: grpo, per_device_train_batch_size: 6}": r"num_generations: 4 does not divide the 6",
        "finetune: {method: grpo}\narms: {names: [reward, worst]}": r"arms\.names: 'worst' has no meaning",
        "finetune: {method: grpo, grpo: {scale_rewards: sometimes}}": r"finetune\.grpo\.scale_rewards",
        "finetune: {method: grpo, grpo: {temperature: 0}}": r"finetune\.grpo\.temperature: must be above 0",
        "finetune: {method: grpo, trainer_args: {num_generations: 8}}": (
            r"trainer_args\.num_generations: set finetune\.grpo\.num_generations instead"
        ),
        "finetune: {method: opsd, trainer_args: {num_generations: 8}}": r"set finetune\.opsd\.num_generations",
        "finetune: {method: grpo, trainer_args: {reward_weights: [1]}}": r"reward_weights: set reward\.weights",
        "finetune: {method: grpo, trainer_args: {steps_per_generation: 2}}": r"a GRPO step is finetune\.per_device",
    }
    for text, message in cases.items():
        path.write_text(text + "\n")
        with pytest.raises(ParamsError, match=message):
            load_params(str(path))


def test_grpo_settings_trl_does_not_have_are_refused_before_training():
    from sedir_utils.stages.finetune.methods import trainer_args_problems, trainer_config_problems

    section = FinetuneParams(method="grpo", trainer_args={"max_prompt_length": 256, "epsilon_high": 0.28})
    assert trainer_args_problems(section) == [
        "finetune.trainer_args.max_prompt_length: not a setting of TRL's GRPOConfig (finetune.method: grpo)"
    ]
    # TRL's own check of the values, as preflight runs it (the suite's load check says the same first)
    (problem,) = trainer_config_problems(FinetuneParams(method="grpo", grpo=GrpoParams(num_generations=3)))
    assert problem.startswith("finetune: TRL's GRPOConfig rejected it:") and "num_generations (3)" in problem


def test_the_grpo_config_carries_trls_names_and_keeps_the_question_ids(tmp_path):
    from sedir_utils.stages.finetune.methods import trainer_config

    section = FinetuneParams(method="grpo", beta=0.04, grpo=GrpoParams(num_generations=2, max_completion_length=64))
    args = trainer_config(section, tmp_path, 0, cuda=False, bf16=False)
    assert (args.num_generations, args.max_completion_length, args.beta) == (2, 64, 0.04)
    assert args.remove_unused_columns is False and args.logging_steps == 1 and args.use_cpu


def test_only_a_grpo_run_fingerprints_the_grpo_section_and_the_reward(tmp_path):
    def finetune_print(overrides):
        return Fingerprints(load_params(str(PARAMS), overrides), tmp_path).stage(1, "finetune")

    sft = finetune_print({})
    assert finetune_print({"finetune.grpo.num_generations": 2}) == sft  # not a grpo run: its cache stays
    grpo_run = finetune_print({"finetune.method": "grpo"})
    assert grpo_run != sft
    assert finetune_print({"finetune.method": "grpo", "finetune.grpo.num_generations": 2}) != grpo_run
    # GRPO scores during training and probes after it: the reward, sampling and probe settings are its own
    declared = declaration("finetune")
    assert declared.sections(load_params(str(PARAMS)).to_dict()) == ("model", "finetune")
    grpo_params = load_params(str(PARAMS), {"finetune.method": "grpo"}).to_dict()
    assert declared.sections(grpo_params) == ("model", "finetune", "reward", "responses", "audit")


def test_each_arm_trains_with_its_reward():
    section = RewardParams(scorers=["majority_vote", "self_certainty"], weights={"majority_vote": 2.0})
    assert grpo.arm_reward("reward", section) is section
    assert grpo.arm_reward("random", section).scorers == ["random"]
    assert grpo.arm_reward("random", section).weights is None
    # the audit's action, as the reward stage took it: only a fallback to a scorer changes the reward
    assert grpo.arm_reward("reward", section, {"ok": False, "action": "fallback:format"}).scorers == ["format"]
    assert grpo.arm_reward("reward", section, {"ok": False, "action": "continue"}) is section
    assert grpo.arm_reward("reward", section, {"ok": False, "action": "fallback:require_final_answer"}) is section
    assert grpo.arm_reward("reward", section, {"ok": True, "action": "none"}) is section
    with pytest.raises(ValueError, match="arm 'worst' has no GRPO reward"):
        grpo.arm_reward("worst", section)


def test_the_prompts_are_the_questions_asked_as_the_responses_stage_asked_them(tmp_path):
    from sedir_utils.stages.finetune.selection import write_training_data

    run_dir = tmp_path / "run"
    make_run(run_dir)
    params = load_params(str(PARAMS), {"finetune.method": "grpo", "finetune.max_samples": 3})
    for arm in ("reward", "random"):
        paths = RunPaths(run_dir, 1, arm)
        write_training_data(params, paths)
        rows = read_jsonl(paths.grpo)
        pairs = sorted(read_jsonl(paths.pairs), key=lambda p: (-p["chosen_score"], p["question_id"]))[:3]
        responses = {r["question_id"]: r for r in read_jsonl(paths.rewards)}
        assert [r["question_id"] for r in rows] == [p["question_id"] for p in pairs]  # every arm: the same
        for row in rows:
            answer = responses[row["question_id"]]
            assert row["prompt"] == answer["prompt"] and row["question"] == answer["question"]


def test_a_grpo_stage_trains_each_arm_with_its_reward_and_records_the_watch(tmp_path, monkeypatch):
    from sedir_utils.stages.finetune import stage

    run_dir = tmp_path / "run"
    make_run(run_dir)
    overrides = {"finetune.method": "grpo", "finetune.backend": "trl", "reward.scorers": ["majority_vote"]}
    params = load_params(str(PARAMS), overrides)
    seen = {}

    def trained(base_path, rows, section, *, out_dir, rewards, **_):
        seen["random" if "random" in str(out_dir) else "reward"] = (rows, rewards)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"method": "grpo", "samples": len(rows), "reward_first": 0.2, "reward_last": 0.6}

    probes = iter(
        [{"policy_accuracy": 0.4, "majority_accuracy": 0.5}, {"policy_accuracy": 0.2, "majority_accuracy": 0.25}]
    )
    monkeypatch.setattr(stage, "finetune", trained)
    monkeypatch.setattr(stage, "resolve_model", lambda name: "base")
    monkeypatch.setattr(grpo, "earlier_probe", lambda params, paths: None)
    monkeypatch.setattr(stage, "probe_answers", lambda *a, **k: [])
    monkeypatch.setattr(grpo, "probe_accuracy", lambda rows, weights: next(probes))
    monkeypatch.setattr(stage, "write_model_card", lambda *a: None)
    for arm in ("random", "reward"):
        paths = RunPaths(run_dir, 1, arm)
        paths.finetune_info.unlink()
        if arm == "reward":  # the reward arm probes; the warning fires and audit.on_fail stop stops the stage
            params.audit.on_fail = "stop"
            with pytest.raises(Exception, match="collapse watch fired"):
                stage.run(params, paths)
            assert not paths.finetune_info.is_file() and read_json(paths.metrics)["collapse"]["warning"]
        else:
            params.finetune.grpo.collapse_probe = False
            stage.run(params, paths)
            params.finetune.grpo.collapse_probe = True
    assert seen["random"][1]["section"]["scorers"] == ["random"]
    assert seen["reward"][1]["section"]["scorers"] == ["majority_vote"]
    assert seen["random"][0] == seen["reward"][0] == read_jsonl(RunPaths(run_dir, 1).grpo)


def test_the_watch_reads_the_start_models_probe_where_it_was_already_measured(tmp_path):
    from sedir_utils.core.io import write_json, write_jsonl

    run_dir = tmp_path / "run"
    make_run(run_dir)
    audit = [
        {"question_id": "p1", "response": "Final answer: A", "correct": True, "has_answer": True},
        {"question_id": "p1", "response": "Final answer: B", "correct": False, "has_answer": True},
    ]
    write_jsonl(RunPaths(run_dir, 1).audit, audit)
    params = load_params(str(PARAMS), {"finetune.method": "grpo"})
    for arm in ("reward", "random"):  # iteration 1: both arms start from the base model the audit probed
        assert grpo.earlier_probe(params, RunPaths(run_dir, 1, arm))["policy_accuracy"] == 0.5
    after = {"policy_accuracy": 0.75}
    write_json(RunPaths(run_dir, 1, "random").finetune_info, {"collapse": {"after": after}})
    assert grpo.earlier_probe(params, RunPaths(run_dir, 2, "random")) == after  # its own previous watch
    write_json(RunPaths(run_dir, 1).finetune_info, {})  # no watch then: the reward arm's audit probed its start
    write_jsonl(RunPaths(run_dir, 2).audit, audit[:1])
    assert grpo.earlier_probe(params, RunPaths(run_dir, 2))["policy_accuracy"] == 1.0
    write_json(RunPaths(run_dir, 1, "random").finetune_info, {})
    assert grpo.earlier_probe(params, RunPaths(run_dir, 2, "random")) is None  # nothing measured: probe it
    params.balance.enabled = True  # balancing sampled the audit's answers at another temperature
    assert grpo.earlier_probe(params, RunPaths(run_dir, 1)) is None


def test_only_the_reward_arms_watch_stops_a_run():
    assert grpo.stops("stop", "reward") and not grpo.stops("stop", "random") and not grpo.stops("continue", "reward")
    report = {"warning": True, "before": {"policy_accuracy": 0.5, "majority_accuracy": 0.5}}
    report["after"] = {"policy_accuracy": 0.1, "majority_accuracy": 0.1}
    summary = {"reward_first": 0.1, "reward_last": 0.9}
    assert "action: continue (a control arm" in grpo.collapse_text(report, 1, "random", summary, "p", "stop")
    assert "action: continue (a fallback scorer" in grpo.collapse_text(report, 1, "reward", summary, "p", "fallback")


@pytest.mark.parametrize(
    "summary, after, warns",
    [
        ({"reward_first": 0.2, "reward_last": 0.6}, 0.30, True),  # rose, fell beyond the tolerance
        ({"reward_first": 0.2, "reward_last": 0.6}, 0.36, False),  # fell within the tolerance
        ({"reward_first": 0.6, "reward_last": 0.2}, 0.10, False),  # fell, but so did the reward
        ({"reward_first": 0.2, "reward_last": 0.6}, 0.50, False),  # rose together
    ],
)
def test_the_collapse_watch_warns_when_probe_accuracy_falls_while_the_self_reward_rises(summary, after, warns):
    before = {"policy_accuracy": 0.40, "majority_accuracy": 0.5}
    report = grpo.collapse_report(summary, before, {"policy_accuracy": after, "majority_accuracy": 0.25}, 0.05)
    assert report["warning"] is warns
    text = grpo.collapse_text(report, 2, "reward", summary, "probe.jsonl", "continue")
    assert ("COLLAPSE WATCH" in text) is warns
    if warns:
        assert "0.400 -> 0.300" in text and "0.200 -> 0.600" in text and "action: continue" in text


def test_probe_accuracy_counts_the_policy_and_the_majority_pseudo_label():
    def row(q, text, correct, has=True):
        scores = {"majority_vote": float(correct), "format": float(has)}  # reward: a weighted_sum's z-score
        return {
            "question_id": q,
            "response": text,
            "correct": correct,
            "has_answer": has,
            "reward": 0.0,
            "scores": scores,
        }

    rows = [
        row("a", "Final answer: 4", True),
        row("a", "Final answer: 4", True),
        row("a", "Final answer: 5", False),
        row("b", "Final answer: 7", False),
        row("b", "Final answer: 7", False),
        row("b", "Final answer: 6", True),
        row("c", "nothing", False, has=False),
    ]
    got = grpo.probe_accuracy(rows, {"format": 0.5})
    assert got["policy_accuracy"] == pytest.approx(3 / 7) and got["majority_accuracy"] == pytest.approx(1 / 3)
    assert got["questions"] == 3 and got["no_answer_share"] == pytest.approx(1 / 7)
    assert got["self_reward"] == pytest.approx(3 / 7 + 0.5 * 6 / 7)  # as training logs it, not the mean z-score
    assert grpo.probe_accuracy([{k: v for k, v in r.items() if k != "scores"} for r in rows])["self_reward"] is None


def test_the_training_summary_reads_the_steps_of_trls_log():
    log = [
        {"reward": r, "frac_reward_zero_std": d, "kl": 0.01 * i, "completions/mean_length": 10.0}
        for i, (r, d) in enumerate([(0.1, 1.0), (0.2, 0.5), (0.3, 0.5), (0.5, 0.0)])
    ] + [{"train_loss": 0.0}]
    got = grpo.training_summary(log)
    assert got == {
        "reward_first": 0.1,
        "reward_last": 0.5,
        "dead_group_share": 0.5,
        "kl_last": 0.03,
        "completion_length_mean": 10.0,
    }
    assert math.isclose(grpo.training_summary(log[:1])["reward_last"], 0.1)
    # several scorers: the watch follows the self-reward in the scorers' units, not TRL's centred combination
    mixed = [{**h, "reward": 0.0, "self_reward": 0.2 * (i + 1)} for i, h in enumerate(log[:4])]
    assert grpo.training_summary(mixed)["reward_first"] == 0.2 and grpo.training_summary(mixed)["reward_last"] == 0.8


def test_the_grpo_log_plot_draws_the_watchs_four_curves():
    from sedir_utils.share.plots import plot_training_log

    log = [
        {"step": i, "loss": 0.1, "reward": 0.1 * i, "reward_std": 0.05, "frac_reward_zero_std": 0.5, "kl": 0.01 * i}
        | {"completions/mean_length": 40.0 + i, "completions/clipped_ratio": 0.25}
        for i in range(1, 5)
    ]
    fig = plot_training_log(log)  # the GRPO log is recognised and drawn as such
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == [
        "self-reward (mean +- std)",
        "dead groups (no reward spread)",
        "KL to the start model",
        "completion length (tokens)",
    ]
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.5] * 4


def test_a_grpo_model_card_says_what_it_was_rewarded_by_and_what_the_watch_saw(tmp_path):
    from huggingface_hub import ModelCard

    from sedir_utils.share.cards import write_model_card

    run_dir = tmp_path / "run"
    params = make_run(run_dir)
    params["finetune"] = {**params["finetune"], "method": "grpo", "beta": 0.04}
    paths = RunPaths(run_dir, 1, "random")
    watch = {"before": {"policy_accuracy": 0.5}, "after": {"policy_accuracy": 0.25}, "warning": True}
    info = {**read_json(paths.finetune_info), "method": "grpo", "reward": ["random"], "collapse": watch}
    info |= {"reward_first": 0.4, "reward_last": 0.6, "dead_group_share": 0.0}
    card = ModelCard.load(write_model_card(params, paths, info))
    training = card.data.sedir["training"]
    assert training["reward"] == ["random"] and training["beta"] == 0.04 and training["grpo"]["num_generations"] == 4
    assert training["collapse_watch"] == {"probe_accuracy": [0.5, 0.25], "warning": True}
    assert "answered 4 times a step and rewarded by `random` within each group" in card.text


# ---- slow tier: TRL's GRPOTrainer on the CPU ----


class Recording(Scorer):
    """A reward of the text alone, recording every (completion, value) it gave."""

    name = "recording"
    seen: list = []

    def score(self, rows, ctx):
        out = []
        for r in rows:
            value = (sum(map(ord, r["response"])) % 997) / 1000
            Recording.seen.append((r["response"], value))
            out.append({"score": value})
        return out, {}


def _train(base: str, out: Path, scorer: str, *, steps: int = 1, completion: int = 16, seed: int = 0, **trainer):
    """GRPO with one scorer as the reward: ``steps`` steps of one question and 4 completions each."""
    import dataclasses

    from sedir_utils.stages.finetune.stage import finetune

    questions = ["What is 6 times 7?", "Name a prime number above 10.", "What is 9 minus 4?"][:steps]
    rows = [
        {"prompt": response_messages(q, ResponseParams().instruction), "question_id": f"q{i}", "question": q}
        for i, q in enumerate(questions)
    ]
    section = FinetuneParams(
        method="grpo",
        backend="trl",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        beta=0.04,
        grpo=GrpoParams(num_generations=4, max_completion_length=completion),
        trainer_args=trainer,
    )
    spec = {
        "section": dataclasses.asdict(RewardParams(scorers=[scorer])),
        "seed": seed,
        "iteration": 1,
        "dtype": "float32",
    }
    info = finetune(base, rows, section, out_dir=out / "model", log_path=out / "log.jsonl", seed=seed, rewards=spec)
    return info, read_jsonl(out / "log.jsonl")


def test_each_completion_receives_the_recording_scorers_value_for_that_completion(tiny_policy, tmp_path):
    import pandas as pd

    scorers.register(Recording)
    Recording.seen.clear()
    try:
        info, log = _train(tiny_policy, tmp_path, "recording", steps=2, log_completions=True)
    finally:
        scorers.REGISTRY.pop("recording")
    given = dict(Recording.seen)
    files = sorted((tmp_path / ".trainer" / "completions").glob("completions_*.parquet"))
    assert len(files) == 2 and info["steps"] == 2
    for file in files:
        table = pd.read_parquet(file)
        assert len(table) == 4
        for text, reward in zip(table["completion"], table["recording"]):
            assert reward == pytest.approx(given[text.strip()])  # that completion's own value
        # TRL's advantages: each consecutive block of num_generations is one group, normalised on its own
        rewards, advantages = list(table["recording"]), list(table["advantage"])
        mean = sum(rewards) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
        assert advantages == pytest.approx([(r - mean) / (std + 1e-4) for r in rewards], abs=1e-4)
    assert [h["reward"] for h in log if "reward" in h] == pytest.approx(
        [pd.read_parquet(f)["recording"].mean() for f in files]
    )


def test_same_params_and_seed_give_the_same_grpo_weights_and_log(tiny_policy, tmp_path):
    runs = [_train(tiny_policy, tmp_path / name, "random", steps=2) for name in ("a", "b")]
    assert runs[0][1] == runs[1][1]  # the training log, timings left out
    weights = [(tmp_path / name / "model" / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    other = _train(tiny_policy, tmp_path / "c", "random", steps=2, seed=1)
    assert (tmp_path / "c" / "model" / "model.safetensors").read_bytes() != weights[0] and other[1] != runs[0][1]


@pytest.fixture(scope="module")
def trained_embedded(tmp_path_factory, embedded_path):
    """The embedded model, two GRPO steps with each self-reward."""
    out = tmp_path_factory.mktemp("grpo")
    scorers = ("majority_vote", "self_certainty", "format", "random")
    return {s: (_train(embedded_path, out / s, s, steps=2), out / s) for s in scorers}


@pytest.mark.parametrize("scorer", ["majority_vote", "self_certainty", "format", "random"])
def test_the_embedded_model_trains_grpo_steps_with_each_self_reward(trained_embedded, scorer):
    (info, log), _ = trained_embedded[scorer]
    steps = [h for h in log if "reward" in h]
    assert len(steps) == 2
    for step in steps:
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl"):
            assert math.isfinite(step[key]), key
        assert f"rewards/{scorer}/mean" in step
        assert "step_time" not in step  # a timing: out of the log, which same seeds keep the same
    assert info["method"] == "grpo" and info["steps"] == 2 and info["reward"] == [scorer]
    assert (info["reward_first"], info["reward_last"]) == (steps[0]["self_reward"], steps[1]["self_reward"])
    assert [h["self_reward"] for h in steps] == pytest.approx([h["reward"] for h in steps], abs=1e-6)  # one scorer
    dead = [s["frac_reward_zero_std"] for s in steps]
    assert info["dead_group_share"] == pytest.approx(sum(dead) / 2)
    if scorer in ("random", "self_certainty"):  # a continuous reward: every group has spread, and learns
        assert dead == [0, 0] and all(s["grad_norm"] > 0 for s in steps) and steps[1]["kl"] > 0


def test_the_grpo_model_reloads_and_stops_at_end_of_turn(trained_embedded, tokenizer):
    import torch

    from sedir_utils.core.models import load_causal_lm

    _, out = trained_embedded["format"]
    model = load_causal_lm(str(out / "model"), "float32", "cpu")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        new = model.generate(**ids, max_new_tokens=64, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert new[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.decode(new)


def test_the_report_shows_each_grpo_fine_tunes_self_reward_and_watch(tmp_path):
    from sedir_utils.core.io import write_json, write_jsonl
    from sedir_utils.share.report import grpo_rows, render

    make_run(tmp_path)
    for k in (1, 2):
        for arm in ("reward", "random"):
            paths = RunPaths(tmp_path, k, arm)
            watch = {"before": {"policy_accuracy": 0.5}, "after": {"policy_accuracy": 0.25 * k}, "warning": k == 1}
            info = {
                **read_json(paths.finetune_info),
                "method": "grpo",
                "reward": [arm if arm == "random" else "format"],
            }
            write_json(paths.finetune_info, {**info, "reward_first": 0.1, "reward_last": 0.2 * k, "collapse": watch})
            write_jsonl(
                paths.training_log, [{"step": s, "reward": 0.1 * s, "frac_reward_zero_std": 0.5} for s in (1, 2)]
            )
    rows = grpo_rows(tmp_path)
    assert [(r["iteration"], r["arm"]) for r in rows] == [(1, "reward"), (2, "reward"), (1, "random"), (2, "random")]
    assert rows[1]["self-reward last"] == 0.4 and rows[2]["reward"] == "random" and rows[0]["collapse warning"] is True
    page = render(tmp_path)
    assert "GRPO: self-reward, dead groups and the collapse watch" in page and page.count("data:image/png") >= 2


def test_grpo_trains_whole_steps_and_says_what_it_left_out(capsys):
    section = FinetuneParams(method="grpo", per_device_train_batch_size=8)  # 2 questions a step
    rows = [{"question_id": f"q{i}"} for i in range(7)]
    assert grpo.whole_steps(rows, section) == rows[:6]
    assert "1 of 7 questions left out (steps take 2 questions each)" in capsys.readouterr().out
    assert grpo.whole_steps(rows[:6], section) == rows[:6]
    with pytest.raises(Exception, match="1 question\\(s\\) to train on, fewer than the 2 a GRPO step takes"):
        grpo.whole_steps(rows[:1], section)
