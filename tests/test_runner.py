"""The runner's stage cache, resume inside a stage after kill -9, manifest pieces and one-line errors."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sedir_utils.config import load_params
from sedir_utils.io import RunPaths, StageError, check_free_space, read_jsonl, write_jsonl
from sedir_utils.runner import Fingerprints, main, parse_start

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

    from sedir_utils.finetune import save_model

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


# --- resume inside a stage -------------------------------------------------------------------------------

STAGE = """
import sys
from sedir_utils.config import load_params
from sedir_utils.io import RunPaths
from sedir_utils import responses
params = load_params(sys.argv[1], ["responses.chunk_size=32"])  # the embedded sizes, in two chunks
responses.run(params, RunPaths(sys.argv[2], 1))
"""


def _stage(run_dir):
    return subprocess.Popen(
        [sys.executable, "-c", STAGE, str(PARAMS), str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_stage_killed_mid_generation_resumes_to_the_same_file(tmp_path, processes):
    """At the embedded params' sizes (16 questions x 4 answers of up to 256 tokens, batch 64), in chunks of
    32 prompts: killed while the second chunk samples, resumed, the file equals an uninterrupted run's."""
    questions = [
        {"id": f"q{i}", "question": q}
        for i, q in enumerate(
            [
                "What is 7 times 8?",
                "Name a mammal that can fly.",
                "Why do we have seasons?",
                "What is the boiling point of water at sea level?",
                "Spell 'cat' backwards.",
                "Is 91 prime?",
                "How many legs does a spider have?",
                "What gas do plants take in?",
                "What is 15% of 80?",
                "Which planet is closest to the sun?",
                "What is the square root of 144?",
                "Who wrote Hamlet?",
                "How many minutes are in a day?",
                "What is H2O?",
                "Convert 3 km to metres.",
                "Is zero even?",
            ]
        )
    ]
    assert len(questions) == load_params(PARAMS).questions.num_questions
    runs = {}
    for name in ("interrupted", "straight"):
        runs[name] = tmp_path / name
        write_jsonl(RunPaths(runs[name], 1).questions, questions)

    # 64 answers in chunks of 32: kill -9 once the first chunk is on disk.
    proc = _stage(runs["interrupted"])
    partial = RunPaths(runs["interrupted"], 1).partial("responses")
    deadline = time.time() + 300
    while not list(partial.glob("chunk-00000-*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not RunPaths(runs["interrupted"], 1).responses.exists()

    resumed = _stage(runs["interrupted"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "[1/2]" not in err and "[2/2]" in err  # only the missing chunk was sampled
    straight = _stage(runs["straight"])
    _, err2 = straight.communicate(timeout=300)
    assert straight.returncode == 0, err2[-2000:]

    a = RunPaths(runs["interrupted"], 1).responses.read_bytes()
    b = RunPaths(runs["straight"], 1).responses.read_bytes()
    assert a == b and len(read_jsonl(RunPaths(runs["straight"], 1).responses)) == 64
    assert not partial.exists()  # chunks are cleared once the stage's file is written
