import pytest

from sedir_utils.core.io import DataError, atomic_dir, read_jsonl, write_jsonl
from sedir_utils.core.paths import RunPaths


def test_jsonl_round_trip(tmp_path):
    rows = [{"a": 1, "text": "é\nline"}, {"a": 2}]
    assert write_jsonl(tmp_path / "x.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "x.jsonl") == rows
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]  # no temporary file left behind


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "none.jsonl")


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while saving")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_run_paths_chain_models_through_iterations(tmp_path):
    paths = RunPaths(tmp_path, 2)
    assert paths.questions == tmp_path / "iter_2" / "questions.jsonl"
    assert paths.policy_model("BASE") == str(tmp_path / "iter_1" / "model")
    assert RunPaths(tmp_path, 1).policy_model("BASE") == "BASE"
    assert paths.model_after(0, "BASE") == "BASE"
    assert paths.model_label(0, "embedded") == "embedded"
    assert paths.model_label(1, "embedded") == "iter_1/model"
