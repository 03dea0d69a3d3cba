"""Each stage is declared once (sedir_utils/core/declarations.py); the runner, fingerprints, row counts and RunPaths
read that declaration, and what a stage is fingerprinted on is what it reads."""

import importlib
import json
from pathlib import Path

import pytest

from sedir_utils.core import declarations as stages
from sedir_utils.core.io import write_json, write_jsonl
from sedir_utils.core.params import Params
from sedir_utils.core.paths import RunPaths
from sedir_utils.run.cli import parse_start
from sedir_utils.run.fingerprints import Fingerprints
from sedir_utils.run.params import load_params
from sedir_utils.run.runner import stage_rows

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params" / "embedded.yaml"


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_a_declaration_names_what_exists(stage):
    assert stage.notebook is None or (ROOT / "notebooks" / stage.notebook).is_file()
    assert callable(importlib.import_module(f"sedir_utils.{stage.module}").run)
    sections = {f.name for f in Params.__dataclass_fields__.values()}
    for balanced in (False, True):  # the responses' sections depend on balance.enabled
        declared = Params().to_dict()
        declared["balance"]["enabled"] = balanced
        assert set(stage.sections(declared)) <= sections
    paths = RunPaths("/run", 3)
    for name in stage.writes:  # a shared stage's files are in the folder the arms share (samples_dir)
        where = RunPaths("/run", 3, "random", own_samples=False)
        assert getattr(where, name).parent == (where.samples_dir if stage.shared else where.iter_dir)
        assert getattr(paths, name).parent == Path("/run/iter_3")
    params = load_params(PARAMS).to_dict()
    readable = {n for s in stages.STAGES for n in s.writes}
    assert set(stage.inputs(params)) <= readable
    assert all(name in stages.BY_NAME for _, name in stage.depends_on(params, 3))


def test_the_notebook_calls_its_stage_module():
    for stage in (s for s in stages.STAGES if s.notebook):
        code = "".join(
            "".join(c["source"])
            for c in json.loads((ROOT / "notebooks" / stage.notebook).read_text())["cells"]
            if c["cell_type"] == "code"
        )
        package, _, leaf = stage.module.rpartition(".")  # stages.<package>.stage
        assert f"from sedir_utils.{package} import {leaf} as " in code, stage.notebook
        alias = code.split(f"from sedir_utils.{package} import {leaf} as ", 1)[1].split()[0]
        assert f"{alias}.run(params, paths" in code, stage.notebook
        assert "params, paths = notebook.setup(params_file, overrides, run_dir, iteration, arm)" in code, stage.notebook


def test_the_finetune_is_fingerprinted_on_the_scores_it_selects_from(tmp_path):
    """It selects its training data from pairs.jsonl and rewards.jsonl: an edit to either reruns it."""
    paths = RunPaths(tmp_path, 1)
    write_jsonl(paths.pairs, [{"question_id": "q"}])
    write_jsonl(paths.rewards, [{"question_id": "q"}])
    params = load_params(PARAMS)
    before = Fingerprints(params, tmp_path).stage(1, "finetune")
    write_jsonl(paths.sft, [{"prompt": [], "completion": []}])  # its own output: not an input
    assert Fingerprints(params, tmp_path).stage(1, "finetune") == before
    for own in (paths.pairs, paths.rewards):
        own.write_text(own.read_text() + "\n")
        assert Fingerprints(params, tmp_path).stage(1, "finetune") != before
        before = Fingerprints(params, tmp_path).stage(1, "finetune")


def test_start_from_base_depends_on_every_earlier_selection():
    params = load_params(PARAMS, {"finetune.start_from": "base"}).to_dict()
    assert stages.stage("finetune").depends_on(params, 3) == [(3, "reward"), (1, "finetune"), (2, "finetune")]
    latest = load_params(PARAMS).to_dict()
    assert stages.stage("finetune").depends_on(latest, 3) == [(3, "reward")]


def test_rows_are_counted_from_the_declared_output(tmp_path):
    paths = RunPaths(tmp_path, 1)
    assert stage_rows(paths, "responses") is None
    write_jsonl(paths.responses, [{"id": i} for i in range(5)])
    write_json(paths.finetune_info, {"samples": 7})
    assert stage_rows(paths, "responses") == 5 and stage_rows(paths, "finetune") == 7


def test_iteration_zero_evaluates_only_and_from_takes_declared_names():
    assert [s.name for s in stages.stages_for(0)] == ["eval"]
    assert [s.name for s in stages.stages_for(1)] == ["questions", "responses", "reward", "finetune", "eval"]
    assert parse_start("1:finetune") == (1, 3)
    with pytest.raises(KeyError, match="unknown stage 'judge'"):
        stages.stage("judge")


def test_run_paths_lists_its_iterations(tmp_path):
    for k in (0, 2, 10):
        RunPaths(tmp_path, k).iter_dir.mkdir(parents=True)
    (tmp_path / "iter_x").mkdir()
    assert RunPaths(tmp_path, 0).iterations() == [0, 2, 10]


def test_control_arms_run_their_own_selection_training_and_eval_only():
    assert stages.stages_for(0, "random") == ()  # the base model is evaluated once, for every arm
    assert [s.name for s in stages.stages_for(1, "random")] == ["finetune", "eval"]
    assert [s.name for s in stages.stages_for(1, "none")] == ["eval"]
    own = [s.name for s in stages.stages_for(1, "worst", own_samples=True)]
    assert own == ["questions", "responses", "reward", "finetune", "eval"]


def test_an_arm_reads_the_shared_samples_and_writes_its_own_files(tmp_path):
    paper, arm = RunPaths(tmp_path, 2), RunPaths(tmp_path, 2, "random")
    for name in ("questions", "responses", "rewards", "pairs"):
        assert getattr(arm, name) == getattr(paper, name) == tmp_path / "iter_2" / getattr(paper, name).name
    for name in ("sft", "dpo", "model", "eval", "fingerprints"):
        assert getattr(arm, name).parent == tmp_path / "arms" / "random" / "iter_2"
    own = RunPaths(tmp_path, 2, "random", own_samples=True)
    assert own.responses == tmp_path / "arms" / "random" / "iter_2" / "responses.jsonl"
    assert arm.of(0).eval == paper.of(0).eval  # iteration 0 is the base model's, shared
    assert arm.policy_model("BASE") == str(tmp_path / "arms" / "random" / "iter_1" / "model")
    assert arm.model_label(1, "base") == "arms/random/iter_1/model"
    none = RunPaths(tmp_path, 2, "none")
    assert none.model_after(2, "BASE") == "BASE" and none.model_label(2, "base") == "base"
    for k in (1, 3):
        RunPaths(tmp_path, k, "random").iter_dir.mkdir(parents=True)
    (tmp_path / "iter_0").mkdir()
    assert arm.iterations() == [0, 1, 3]


def test_arms_share_the_sampling_fingerprints_and_chain_their_own_models(tmp_path):
    params = load_params(PARAMS, {"arms.names": ["reward", "random", "none"]})
    fp = Fingerprints(params, tmp_path)
    for name in ("questions", "responses", "reward"):
        assert fp.stage(2, name, "random") == fp.stage(2, name)
    assert fp.stage(0, "eval", "random") == fp.stage(0, "eval")
    for name in ("finetune", "eval"):
        assert fp.stage(1, name, "random") != fp.stage(1, name)
    assert fp.model(2, "none") == fp.model(0) != fp.model(2)
    assert fp.stage(1, "eval", "none") != fp.stage(2, "eval", "none")  # evaluated again each iteration
    # The paper arm's fingerprints do not depend on which control arms run beside it.
    alone = Fingerprints(load_params(PARAMS), tmp_path)
    assert all(alone.stage(2, s) == fp.stage(2, s) for s in ("questions", "reward", "finetune", "eval"))
    own = Fingerprints(load_params(PARAMS, {"arms.names": ["reward", "random"], "arms.own_samples": True}), tmp_path)
    assert own.stage(2, "questions", "random") != own.stage(2, "questions")  # sampled by the arm's own model


def test_the_paper_arm_samples_first_and_evaluates_last():
    from sedir_utils.core.declarations import schedule

    order = [(arm, s.name) for arm, s in schedule(1, ["random", "reward", "none"])]
    assert order == [
        ("reward", "questions"),
        ("reward", "responses"),
        ("reward", "reward"),
        ("random", "finetune"),
        ("random", "eval"),
        ("none", "eval"),
        ("reward", "finetune"),
        ("reward", "eval"),  # its notebook compares it with every arm of the iteration
    ]
    assert [(a, s.name) for a, s in schedule(0, ["reward", "random"])] == [("reward", "eval")]
    own = [(arm, s.name) for arm, s in schedule(1, ["reward", "random"], own_samples=True)]
    assert own[3:8] == [("random", n) for n in ("questions", "responses", "reward", "finetune", "eval")]


def test_a_runs_file_names_stay_what_runs_on_disk_have():
    """File names are data: renaming one makes every existing run lose that stage's cache. A shared stage's
    files sit in the paper arm's folder, the arm's own in its folder."""
    names = {
        "question_stats": "question_filters.json",
        "questions": "questions.jsonl",
        "balance_samples": "balance_samples.jsonl",
        "balance": "balance.json",
        "responses": "responses.jsonl",
        "audit": "audit.jsonl",
        "rewards": "rewards.jsonl",
        "pair_stats": "pair_stats.json",
        "pairs": "pairs.jsonl",
        "sft": "sft.jsonl",
        "dpo": "dpo.jsonl",
        "opsd": "opsd.jsonl",
        "selection": "selection.json",
        "dataset": "dataset",
        "training_log": "training_log.jsonl",
        "finetune_info": "finetune.json",
        "eval_samples": "eval_samples.jsonl",
        "eval": "eval.json",
        "model": "model",
        "metrics": "metrics.json",
        "fingerprints": "stage_fingerprints.json",
        "notebooks": "notebooks",
    }
    run_files = {
        "summary_csv": "summary.csv",
        "summary_plot": "summary.png",
        "verdict_csv": "verdict.csv",
        "manifest": "manifest.json",
        "tasks_dir": "lm_eval_tasks",
    }
    paths = RunPaths("/run", 2, "random")
    shared = {n for s in stages.STAGES if s.shared for n in s.writes}
    got = {n: getattr(paths, n).relative_to("/run").as_posix() for n in names}
    want = {n: ("iter_2/" if n in shared else "arms/random/iter_2/") + f for n, f in names.items()}
    assert got == want
    assert {n: getattr(paths, n).relative_to("/run").as_posix() for n in run_files} == run_files
    declared = {n for s in stages.STAGES for n in s.writes} | set(run_files) | {"metrics", "fingerprints", "model"}
    properties = {n for n, v in vars(RunPaths).items() if isinstance(v, property)}
    assert properties - {"paper_arm", "arm_dir", "iter_dir", "samples_dir"} == declared | {"notebooks"}
