"""The whole loop, through papermill, on the embedded model with tiny sizes (~9 minutes on a 2-core AVX2 CPU)."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sedir_utils.core.io import read_json, read_jsonl
from sedir_utils.core.models import cpu_bf16

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "questions.num_questions=4",
    "questions.max_new_tokens=64",
    "responses.num_responses=3",
    "responses.max_new_tokens=192",
    "eval.limit=4",
    "eval.max_gen_toks=64",
    "reward.scorers=[llm_judge, self_certainty, majority_vote]",  # every offline scorer, combined
    "audit.num_questions=3",
    "audit.num_samples=2",
    "audit.bootstrap=200",
    "responses.chunk_size=4",  # 12 answers in 3 chunks: a kill mid-stage leaves finished chunks to resume from
    "arms.names=[reward, random]",  # the embedded params' arms, said here so the tests below can rely on them
]
# What a run wrote, by content, and a copy of it, as soon as the module's run finished (later tests rerun parts).
FIRST_RUN: dict[str, str] = {}
SNAPSHOT: list[Path] = []


def data_files(run_dir: Path) -> dict[str, str]:
    """Every file of a run by sha256, timings aside: executed notebooks, the manifest, the report (it shows the
    manifest), plots and the tracking backend's event files hold times."""
    import hashlib

    found = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        timed = ("manifest.json", "00_reproduce.ipynb", "report.html")
        if "/notebooks/" in f"/{rel}" or rel.startswith("tracking/") or rel in timed or rel.endswith(".png"):
            continue
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def sedir(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "sedir_utils", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, processes):
    run_dir = tmp_path_factory.mktemp("run")
    args = ["--params", "params/embedded.yaml", "--iterations", "1", "--run-dir", str(run_dir)]
    for s in TINY:
        args += ["--set", s]
    result = sedir(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    FIRST_RUN.update(data_files(run_dir))
    SNAPSHOT.append(tmp_path_factory.mktemp("snapshot") / "run")
    shutil.copytree(run_dir, SNAPSHOT[0])
    return run_dir, args, result


def test_a_run_killed_mid_sampling_and_resumed_writes_the_same_bytes(run, tmp_path):
    """The suite's one kill-and-resume loop. A copy of the run, in a folder of another length, loses iteration 1's
    answers, their scores and the paper arm's fine-tune; the runner, in a separate process, is killed (-9, runner
    and notebook kernel) while it samples the answers again, and resumed: it reads back the finished chunk,
    samples the rest, scores and trains again, and every later stage finds its inputs unchanged (cached). Every
    data file and the weights equal the first run's, byte for byte."""
    import os
    import signal
    import time

    first_dir, args, _ = run
    second = tmp_path / "second-run-dir-of-another-length"
    shutil.copytree(SNAPSHOT[0], second)
    for name in ("responses.jsonl", "pairs.jsonl", "finetune.json"):  # what marks each of the three stages done
        (second / "iter_1" / name).unlink()
    args = [a if a != str(first_dir) else str(second) for a in args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sedir_utils", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = second / "iter_1" / ".partial" / "responses"
    deadline = time.time() + 900
    while not list(partial.glob("chunk-00000-*.json")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (second / "iter_1" / "responses.jsonl").exists()
    result = sedir(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [line.split(":")[0] for line in result.stdout.splitlines() if ": running," in line]
    assert ran == ["[iter 1] responses", "[iter 1] reward", "[iter 1] finetune"], result.stdout[-2000:]  # rest: cached
    assert "responses [1/3]" not in result.stderr  # the first chunk was read back, not sampled again
    files = data_files(second)
    assert sorted(files) == sorted(FIRST_RUN)
    differ = [f for f in FIRST_RUN if files[f] != FIRST_RUN[f]]
    assert not differ, f"{len(differ)} of {len(files)} files differ: {differ[:8]}"
    assert "iter_1/model/model.safetensors" in files and "iter_1/responses.jsonl" in files


def test_every_stage_leaves_its_files(run):
    run_dir, _, _ = run
    assert (run_dir / "iter_0" / "eval.json").is_file()
    it = run_dir / "iter_1"
    for name in [
        "questions.jsonl",
        "question_filters.json",
        "responses.jsonl",
        "rewards.jsonl",
        "pairs.jsonl",
        "sft.jsonl",
        "dpo.jsonl",
        "pair_stats.json",
        "metrics.json",
        "model/config.json",
        "training_log.jsonl",
        "finetune.json",
        "eval.json",
        "dataset/dataset_dict.json",
        "dataset/README.md",
        "model/README.md",
    ]:
        assert (it / name).exists(), name
    assert (run_dir / "summary.csv").is_file() and (run_dir / "summary.png").is_file()
    assert (run_dir / "report.html").is_file()


def test_the_iteration_leaves_datasets_cards_and_tracked_scalars(run):
    from datasets import load_from_disk
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = run
    it = run_dir / "iter_1"
    data = load_from_disk(str(it / "dataset"))
    assert data["questions"].num_rows == 4 and data["responses"].num_rows == 12
    assert data["sft"].num_rows == len(read_jsonl(it / "sft.jsonl"))
    card = ModelCard.load(it / "model" / "README.md").data
    assert card.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.sedir["samples"] == data["sft"].num_rows
    assert (
        card.sedir["eval"]["gpqa_local/acc"]["value"]
        == read_json(it / "eval.json")["tasks"]["gpqa_local"]["acc"]["value"]
    )
    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard" / "iterations"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/reward/gpqa_local/acc/value")] == [0, 1]
    assert {"audit/ok", "questions/distinct_2", "reward/reward/mean", "time/reward/responses_s"} <= set(
        events.Tags()["scalars"]
    )  # (the audit's AUROC too, where it is defined: not on the tiny probe here)
    trl = EventAccumulator(str(run_dir / "tracking" / "tensorboard" / "finetune-iter1-reward"))
    trl.Reload()
    assert len(trl.Scalars("train/loss")) == read_json(it / "finetune.json")["steps"]  # TRL's own report_to


def test_the_runner_prints_no_warning_a_user_cannot_act_on(run):
    """The kernel's unencrypted-TCP notice, tqdm's missing-widgets notice and the tokenizer clean-up notice
    said nothing a user could change; the reward audit's failure (which they can act on) is still there."""
    _, _, result = run
    out = result.stdout + result.stderr
    for noise in ("running over TCP", "IProgress not found", "clean_up_tokenization_spaces", "TqdmWarning"):
        assert noise not in out, noise
    # The suite's own warning that a scorer collapsed names the scorer to change: a user can act on it.
    warnings = [line for line in out.splitlines() if "warning" in line.lower() and "has collapsed" not in line]
    assert not warnings, warnings[:5]


def test_the_random_arm_shares_the_samples_and_trains_on_its_own_picks(run):
    run_dir, _, result = run
    arm = run_dir / "arms" / "random" / "iter_1"
    assert sorted(p.name for p in (arm / "notebooks").glob("*.ipynb")) == ["04_finetune_unsloth.ipynb", "05_eval.ipynb"]
    for name in ("questions.jsonl", "responses.jsonl", "rewards.jsonl", "pairs.jsonl"):
        assert not (arm / name).exists(), name  # sampled and scored once, by the reward arm
    assert "[iter 1, arm random] finetune: running" in result.stdout
    assert "arm random] questions" not in result.stdout and "arm random] responses" not in result.stdout
    finished = {r["id"]: r for r in read_jsonl(run_dir / "iter_1" / "responses.jsonl") if r["finished"]}
    paper, random = read_jsonl(run_dir / "iter_1" / "sft.jsonl"), read_jsonl(arm / "sft.jsonl")
    assert [r["question_id"] for r in random] == [r["question_id"] for r in paper]  # the same questions
    for row in random:  # a finished answer to its own question, as it was written
        answer = finished[row["chosen_id"]]
        assert answer["question_id"] == row["question_id"]
        assert row["completion"][0]["content"] == answer["response"]
    selection = read_json(arm / "selection.json")
    assert selection["arm"] == "random" and selection["samples"] == len(random)
    assert read_json(arm / "finetune.json")["base_model"] == "embedded" and (arm / "model" / "config.json").is_file()
    summary = (run_dir / "summary.csv").read_text()
    assert "\nrandom,1,gpqa_local_circular,circular," in summary and "\nreward,1,gpqa_local_cloze,acc," in summary
    verdict = (run_dir / "verdict.csv").read_text().splitlines()
    assert verdict[0].startswith("iteration,task,metric,gain (reward),gain (random),reward - random,format share")
    assert "verdict (paper arm vs the base model" in result.stdout


def test_executed_notebooks_are_saved_without_errors(run):
    run_dir, _, _ = run
    executed = sorted(p.name for p in (run_dir / "iter_1" / "notebooks").glob("*.ipynb"))
    assert executed == [
        "01_questions.ipynb",
        "02_responses.ipynb",
        "03_reward.ipynb",
        "04_finetune_unsloth.ipynb",
        "05_eval.ipynb",
    ]
    for path in (run_dir / "iter_1" / "notebooks").glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        assert not book.metadata.papermill.exception
        assert any(c.get("outputs") for c in book.cells if c.cell_type == "code")


def test_questions_are_real_text_with_provenance(run):
    run_dir, _, _ = run
    rows = read_jsonl(run_dir / "iter_1" / "questions.jsonl")
    assert len(rows) == 4
    for r in rows:
        assert r["question"].strip() and "<|im_start|>" not in r["question"] and "<|im_end|>" not in r["question"]
        assert r["model"] == "embedded" and r["iteration"] == 1
        assert r["sampling"]["temperature"] == 0.7 and "seed" in r


def test_every_pair_prefers_the_higher_reward(run):
    run_dir, _, _ = run
    pairs = read_jsonl(run_dir / "iter_1" / "pairs.jsonl")
    assert pairs, "the tiny run should keep at least one pair"
    assert all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    assert all(p["scorer"] == "weighted_sum(llm_judge,self_certainty,majority_vote)" for p in pairs)
    assert (
        len(read_jsonl(run_dir / "iter_1" / "sft.jsonl"))
        == len(read_jsonl(run_dir / "iter_1" / "dpo.jsonl"))
        == len(pairs)
    )
    rewards = read_jsonl(run_dir / "iter_1" / "rewards.jsonl")
    assert all(set(r["scores"]) == {"llm_judge", "self_certainty", "majority_vote"} for r in rewards)
    monitor = read_json(run_dir / "iter_1" / "metrics.json")["reward"]
    assert set(monitor["scorers"]) == {"llm_judge", "self_certainty", "majority_vote"}
    assert monitor["reward"]["pairs"] == len(pairs)


def test_the_reward_audit_ran_and_is_reported(run):
    run_dir, _, result = run
    audit = read_json(run_dir / "iter_1" / "metrics.json")["audit"]
    assert audit["questions"] == 3 and audit["answers"] == 6
    assert set(audit["scorers"]) == {"llm_judge", "self_certainty", "majority_vote"}
    assert audit["ok"] or "REWARD AUDIT FAILED" in result.stdout  # the runner says so loudly
    assert len(read_jsonl(run_dir / "iter_1" / "audit.jsonl")) == 6
    book = nbformat.read(run_dir / "iter_1" / "notebooks" / "03_reward.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert "probe questions" in text


def test_the_saved_model_reloads_and_generates(run, tokenizer):
    from sedir_utils.core.models import load_causal_lm, load_tokenizer
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams

    path = str(run[0] / "iter_1" / "model")
    tok, model = load_tokenizer(path), load_causal_lm(path, "float32", "cpu")
    assert tok.chat_template == tokenizer.chat_template and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    out = generate(model, tok, [prompt], SamplingParams(temperature=0.0, max_new_tokens=64), 1, seed=0)[0]
    assert out.num_tokens > 0 and out.text.strip()
    info = read_json(run[0] / "iter_1" / "finetune.json")
    assert info["backend"] == "trl" and info["steps"] >= 1 and info["base_model"] == "embedded"


def test_eval_scores_are_accuracies(run):
    run_dir, _, _ = run
    for k in (0, 1):
        report = read_json(run_dir / f"iter_{k}" / "eval.json")
        for task, metrics in (
            ("gpqa_local", ["acc", "acc_norm"]),
            ("gpqa_local_cot", ["exact_match[strict-match]", "exact_match[flexible-extract]"]),
        ):
            for metric in metrics:
                m = report["tasks"][task][metric]
                assert 0.0 <= m["ci"][0] <= m["value"] <= m["ci"][1] <= 1.0 and m["n"] == 4
                assert 0.0 <= m["no_answer_share"] <= 1.0
    assert read_json(run_dir / "iter_1" / "eval.json")["model"] == "iter_1/model"


def test_a_rerun_skips_every_finished_stage(run):
    run_dir, args, _ = run
    result = sedir(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("cached (same params and inputs), skipped") == 8  # 6 + the random arm's 2
    manifest = read_json(run_dir / "manifest.json")
    assert [s["status"] for s in manifest["stages"]] == ["cached"] * 8
    assert manifest["stages"][1]["rows"] == 4 and manifest["stages"][2]["rows"] == 12  # questions, answers


def test_the_manifest_records_what_ran(run):
    run_dir, _, _ = run
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["params"]["questions"]["num_questions"] == 4
    assert {"python", "torch", "transformers", "trl", "papermill"} <= set(manifest["versions"])
    assert manifest["device"]["kind"] == "cpu" and "git_commit" in manifest
    determinism = manifest["determinism"]
    assert determinism["torch_threads"] >= 1 and determinism["cpu_bf16"] is cpu_bf16()
    assert determinism["dtypes"]["sampling_and_scoring"] == ("bfloat16" if cpu_bf16() else "float32")  # auto
    kernel = determinism["decode_kernel"]
    assert kernel["kernel"].startswith("decode_attention-") or kernel["why"], kernel


def test_bad_params_are_one_line_errors(tmp_path, processes):
    bad = tmp_path / "bad.yaml"
    bad.write_text("questions:\n  temprature: 0.7\n")
    result = sedir("--params", str(bad), "--run-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: unknown key 'questions.temprature'")


def test_the_reproduce_notebook_resumes_the_run_and_shows_it_beside_the_paper(run):
    """00_reproduce (Run All) over a run that is already complete, as after a Colab disconnect: every stage is
    found finished, and the notebook ends with summary.png and the table beside the paper's Table 1."""
    import papermill as pm

    from sedir_utils.core.config import parse_override

    run_dir, _, _ = run
    out = run_dir / "00_reproduce.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "00_reproduce.ipynb"),
        str(out),
        cwd=str(ROOT / "notebooks"),
        parameters={
            "params_file": "../params/embedded.yaml",
            "run_dir": str(run_dir),
            "iterations": 1,
            "overrides": dict(parse_override(s) for s in TINY),
        },
        kernel_name="python3",
        progress_bar=False,
    )
    book = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    # Nothing starts over: every stage is cached (the test that changes a param runs after this one).
    assert text.count("cached (same params and inputs), skipped") == 8 and ": running," not in text
    last = next(c for c in book.cells if c.get("id") == "cell-06").outputs  # the summary beside the paper
    assert any("image/png" in o.get("data", {}) for o in last)
    table = next(
        o["data"]["text/plain"]
        for o in last
        if "text/plain" in o.get("data", {}) and "paper" in o["data"]["text/plain"]
    )
    assert "paper GPQA (Table 1)" in table and "16.41" in table and "gpqa_local acc" in table
    verdict_cell = next(c for c in book.cells if c.get("id") == "cell-08")
    verdict = "".join(o.get("data", {}).get("text/plain", "") for o in verdict_cell.outputs)
    assert "gain (random)" in verdict and "reading" in verdict
    shared = "".join(o.get("text", "") for o in next(c for c in book.cells if c.get("id") == "cell-10").outputs)
    assert "one DatasetDict in" in shared and "'questions': 4" in shared


def test_a_changed_param_reruns_only_the_stages_that_read_it(run):
    """The module's last test: it changes the run (a smaller eval.limit, so the three evaluations rerun fast)."""
    run_dir, args, _ = run
    before = (run_dir / "iter_1" / "pairs.jsonl").stat().st_mtime_ns
    result = sedir(*args, "--set", "eval.limit=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("params or inputs changed") == 3  # the evaluations: base, reward and random arms
    assert result.stdout.count("cached (same params and inputs)") == 5
    assert (run_dir / "iter_1" / "pairs.jsonl").stat().st_mtime_ns == before
    assert read_json(run_dir / "iter_1" / "eval.json")["limit"] == 2
