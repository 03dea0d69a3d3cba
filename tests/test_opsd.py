"""finetune.method: opsd: the teacher's privileged contexts, TRL's SDFT trainer on the CPU, no leak."""

import pytest

from sedir_utils.core.io import read_jsonl
from sedir_utils.core.params import FinetuneParams, OpsdParams, ParamsError
from sedir_utils.run.params import load_params
from sedir_utils.stages.finetune.opsd import distillation_probe, opsd_rows, teacher_answers, teacher_prompt

PROMPT = "Think step by step. Then give your final answer on the last line, starting with 'Final answer:'."


def _answer(q: int, r: int, text: str, reward: float, finished: bool = True) -> dict:
    return {
        "id": f"q{q}-r{r}",
        "question_id": f"q{q}",
        "prompt": [{"role": "user", "content": f"Question {q}?\n\n{PROMPT}"}],
        "response": text,
        "reward": reward,
        "finished": finished,
        "scorer": "llm_judge",
        "iteration": 1,
    }


REWARDS = [
    _answer(0, 0, "2 and 2 make 4. Final answer: 4", 0.9),
    _answer(0, 1, "Maybe five. Final answer: 5", 0.2),
    _answer(0, 2, "Two twos: 4. Final answer: 4.", 0.1),
    _answer(1, 0, "Long thought with no end", 0.8, finished=False),
    _answer(1, 1, "I think so.", 0.5),  # no final answer anywhere for q1
    _answer(2, 0, "Cut off", 0.7, finished=False),  # q2: nothing finished, no pair
    _answer(2, 1, "Also cut off", 0.1, finished=False),
]


def _pair(chosen: dict, rejected: dict) -> dict:
    from sedir_utils.stages.pairs import preference_pair

    return preference_pair(chosen["question_id"], chosen, rejected)


SELECTED = [_pair(REWARDS[0], REWARDS[2]), _pair(REWARDS[4], REWARDS[3])]


def test_each_context_mode_gives_the_teacher_what_it_says_and_counts_what_it_skips():
    best, stats = opsd_rows(SELECTED, REWARDS, "best")
    assert [r["privileged_context"] for r in best] == [REWARDS[0]["response"], REWARDS[4]["response"]]
    assert stats == {"context": "best", "questions": 3, "rows": 2, "skipped_no_finished": 1}
    assert all(r["prompt"] == REWARDS[0]["prompt"] for r in best[:1]) and best[0]["chosen_id"] == "q0-r0"

    majority, stats = opsd_rows(SELECTED, REWARDS, "majority")
    # q0: "4" twice (r0 first), "5" once; q1: no final answer in its finished answers -> skipped, counted
    assert [r["privileged_context"] for r in majority] == [REWARDS[0]["response"]]
    assert stats["skipped_no_majority"] == 1 and stats["skipped_no_finished"] == 1 and stats["rows"] == 1

    both, _ = opsd_rows(SELECTED[:1], REWARDS, "both")
    assert both[0]["privileged_context"].startswith(REWARDS[0]["response"])
    assert both[0]["privileged_context"].endswith("agree on: 4") and "(2 of 3)" in both[0]["privileged_context"]


def test_the_teacher_prompt_is_trls_composition_and_the_student_prompt_is_the_question():
    row = opsd_rows(SELECTED[:1], REWARDS, "best")[0][0]
    composed = teacher_prompt(row["prompt"], row["privileged_context"], OpsdParams().teacher_prompt_template)
    assert row["privileged_context"] in composed[-1]["content"] and composed[-1]["role"] == "user"
    assert composed[-1]["content"].startswith(row["prompt"][-1]["content"])
    assert row["privileged_context"] not in str(row["prompt"])


def test_opsd_params_are_checked_when_loaded(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("finetune:\n  method: opsd\n  opsd:\n    teacher_prompt_template: 'no placeholders'\n")
    with pytest.raises(ParamsError, match=r"finetune\.opsd\.teacher_prompt_template: .*\{privileged_context\}"):
        load_params(str(path))
    path.write_text("finetune:\n  method: opsd\n  per_device_train_batch_size: 3\n  opsd:\n    num_generations: 2\n")
    with pytest.raises(ParamsError, match=r"finetune\.opsd\.num_generations: 2 does not divide"):
        load_params(str(path))
    path.write_text("finetune:\n  opsd:\n    privileged_context: oracle\n")
    with pytest.raises(ParamsError, match=r"finetune\.opsd\.privileged_context"):
        load_params(str(path))


def test_sdft_settings_that_trl_does_not_have_are_refused_before_training():
    from sedir_utils.stages.finetune.methods import trainer_args_problems

    args = {"max_new_tokens": 64, "weight_decay": 0.01, "teacher_model_kind": "ema"}
    section = FinetuneParams(method="opsd", trainer_args=args)
    assert trainer_args_problems(section) == [
        "finetune.trainer_args.max_new_tokens: not a setting of TRL's SDFTConfig (finetune.method: opsd)",
        "finetune.trainer_args.teacher_model_kind: set finetune.opsd.teacher_model_kind instead"
        " (the suite's own field)",
    ]


QUESTIONS = [f"What is {a} times {b}?" for a, b in [(3, 4), (6, 7), (5, 9), (8, 2)]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_path):
    """Two epochs of OPSD on four questions, a known answer as each one's privileged context; a callback
    records what the student and the teacher were given on every batch."""
    from transformers import TrainerCallback

    from sedir_utils.stages.finetune import stage as ft

    seen = []

    class Spy(TrainerCallback):
        def on_self_distillation_batch_prepared(self, *, processing_class, prompt_ids, teacher_input_ids, **_):
            decode = processing_class.batch_decode
            seen.append((decode(prompt_ids, skip_special_tokens=True), decode(teacher_input_ids)))

    rows = [
        {
            "question_id": f"q{i}",
            "chosen_score": 1.0,
            "prompt": [{"role": "user", "content": q}],
            "privileged_context": f"The product is {a * b}. Final answer: {a * b}",
        }
        for i, (q, (a, b)) in enumerate(zip(QUESTIONS, [(3, 4), (6, 7), (5, 9), (8, 2)]))
    ]
    section = FinetuneParams(
        backend="trl",
        method="opsd",
        per_device_train_batch_size=2,
        num_train_epochs=2,
        learning_rate=1e-3,
        opsd=OpsdParams(num_generations=2, max_completion_length=24, distillation_mode="full_logits"),
    )
    out = tmp_path_factory.mktemp("opsd")
    info = ft.finetune(
        embedded_path, rows, section, out_dir=out / "model", log_path=out / "log.jsonl", seed=0, callbacks=[Spy()]
    )
    return rows, section, out, info, seen


def test_the_privileged_context_reaches_the_teacher_and_never_the_student(trained):
    rows, _, _, _, seen = trained
    assert seen, "the trainer prepared no batch"
    contexts = [r["privileged_context"] for r in rows]
    for student, teacher in seen:
        assert not any(c in s for c in contexts for s in student)
        assert all(any(c in t for c in contexts) for t in teacher)
        assert all(any(q in s for q in QUESTIONS) for s in student)


def test_opsd_trains_on_the_cpu_and_the_student_moves_towards_the_teacher(trained, embedded_path, tokenizer):
    from sedir_utils.core.models import load_causal_lm

    rows, section, out, info, _ = trained
    assert info["method"] == "opsd" and info["steps"] == 8 and info["samples"] == 4
    log = [h for h in read_jsonl(out / "log.jsonl") if "sdft/distillation_loss" in h]
    assert len(log) == 8
    base = load_causal_lm(embedded_path, "float32", "cpu")
    tuned = load_causal_lm(str(out / "model"), "float32", "cpu")
    answers = teacher_answers(base, tokenizer, rows, section.opsd, seed=0)
    before = distillation_probe(base, base, tokenizer, rows, answers, section.opsd)
    after = distillation_probe(tuned, base, tokenizer, rows, answers, section.opsd)
    assert before["tokens"] == after["tokens"] > 0
    assert after["divergence"] < before["divergence"], (before, after)
    assert after["student_nll"] < before["student_nll"], (before, after)
