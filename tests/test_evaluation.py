import json
from pathlib import Path

import pytest

from sedir_utils.config import SAMPLE_EVAL_FILE
from sedir_utils.evaluation import (GPQA_COLUMNS, check_gpqa_file, collect_results, shuffled_choices,
                                    write_local_task, write_summary)
from sedir_utils.io import DataError, write_json


def test_option_order_is_fixed_by_the_question():
    doc = {"Question": "Q?", "Correct Answer": "right", "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
           "Incorrect Answer 3": "w3"}
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


def test_summary_from_fake_iterations(tmp_path):
    for k, acc in enumerate([0.25, 0.375, 0.5]):
        write_json(tmp_path / f"iter_{k}" / "eval.json", {
            "iteration": k, "tasks": {"gpqa_local": {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc, "n": 24}}})
    table = collect_results(tmp_path)
    assert list(table.columns) == ["iteration", "task", "metric", "value", "stderr", "n"]
    assert len(table) == 6 and sorted(table["metric"].unique()) == ["acc", "acc_norm"]
    write_summary(tmp_path)
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "iteration,task,metric,value,stderr,n"
