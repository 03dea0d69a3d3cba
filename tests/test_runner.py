"""The runner's stage cache, manifest pieces and one-line errors (the kill-and-resume loop: test_end_to_end.py)."""

import errno
from pathlib import Path

import pytest

from sedir_utils.core.io import StageError, check_free_space, write_jsonl
from sedir_utils.core.paths import RunPaths
from sedir_utils.run.cli import main, parse_start
from sedir_utils.run.fingerprints import Fingerprints
from sedir_utils.run.params import load_params

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params" / "embedded.yaml"


def all_prints(params, run_dir, iterations=2):
    fp = Fingerprints(params, run_dir)
    return {
        (k, s): fp.stage(k, s)
        for k in range(iterations + 1)
        for s in (("eval",) if k == 0 else ("questions", "responses", "reward", "finetune", "eval"))
    }


def changed(a, b):
    return sorted(key for key in a if a[key] != b[key])


def test_a_param_change_reaches_its_stage_and_what_depends_on_it(tmp_path):
    base = all_prints(load_params(PARAMS), tmp_path)
    assert base == all_prints(load_params(PARAMS), tmp_path)  # stable
    # Evaluation settings touch only the evaluations.
    assert changed(base, all_prints(load_params(PARAMS, {"eval.limit": 5}), tmp_path)) == [
        (0, "eval"),
        (1, "eval"),
        (2, "eval"),
    ]
    # A response setting: that iteration's responses onward, and everything of later iterations.
    later = changed(base, all_prints(load_params(PARAMS, {"responses.temperature": 0.5}), tmp_path))
    assert (1, "questions") not in later and (0, "eval") not in later
    assert {k for k in later if k[0] == 1} == {(1, "responses"), (1, "reward"), (1, "finetune"), (1, "eval")}
    assert {k for k in later if k[0] == 2} == {(2, s) for s in ("questions", "responses", "reward", "finetune", "eval")}
    # Questions are decontaminated against the eval set: a different eval file reaches them too.
    other = tmp_path / "other.csv"
    other.write_text((ROOT / "sedir_utils" / "data" / "sedir_science_mc.csv").read_text() + "\n")
    other_file = changed(base, all_prints(load_params(PARAMS, {"eval.local_file": str(other)}), tmp_path))
    assert (1, "questions") in other_file and (0, "eval") in other_file
    # The number of iterations is not a stage's input.
    assert base == all_prints(load_params(PARAMS, {"iterations": 5}), tmp_path)


def test_input_files_count_by_content(tmp_path):
    params = load_params(PARAMS)
    before = Fingerprints(params, tmp_path).stage(1, "responses")
    write_jsonl(RunPaths(tmp_path, 1).questions, [{"id": "q", "question": "Why?"}])
    edited = Fingerprints(params, tmp_path).stage(1, "responses")
    assert edited != before
    assert Fingerprints(params, tmp_path).stage(1, "questions") == Fingerprints(params, tmp_path).stage(1, "questions")


def test_start_option():
    assert parse_start("2") == (2, 0)
    assert parse_start("1:reward") == (1, 2)
    with pytest.raises(Exception, match="unknown stage 'rewards'"):
        parse_start("1:rewards")


def test_no_disk_space_is_one_line(tmp_path, monkeypatch):
    import shutil

    from sedir_utils.stages.finetune.methods import save_model

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100 << 20))
    with pytest.raises(StageError, match=r"not enough disk space in .*: needs about 1,126 MB, 100 MB free"):
        check_free_space(tmp_path, 1126 << 20, "finetune: saving the model")
    monkeypatch.undo()

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StageError, match="no space left on the device") as info:
        save_model(tmp_path / "model", 1000, full)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.*"))  # nothing half-written


def test_missing_model_is_one_line(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(f"model:\n  name: {tmp_path / 'nowhere'}\n")
    assert main(["--params", str(params), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: model.name: {tmp_path / 'nowhere'}: no such model folder (no config.json)"]
