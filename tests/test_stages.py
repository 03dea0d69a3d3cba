"""Each stage is declared once (sedir_utils/stages.py); the runner, fingerprints, row counts and RunPaths
read that declaration, and what a stage is fingerprinted on is what it reads."""

import importlib
import json
from pathlib import Path

import pytest

from sedir_utils import stages
from sedir_utils.config import Params, load_params
from sedir_utils.io import RunPaths, write_json, write_jsonl
from sedir_utils.runner import Fingerprints, parse_start, stage_rows

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params" / "embedded.yaml"


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_a_declaration_names_what_exists(stage):
    assert (ROOT / "notebooks" / stage.notebook).is_file()
    assert callable(importlib.import_module(f"sedir_utils.{stage.module}").run)
    sections = {f.name for f in Params.__dataclass_fields__.values()}
    assert set(stage.params) <= sections
    paths = RunPaths("/run", 3)
    for name, file in stage.writes.items():
        assert getattr(paths, name) == Path("/run/iter_3") / file
    params = load_params(PARAMS).to_dict()
    readable = {n for s in stages.STAGES for n in s.writes}
    assert set(stage.inputs(params)) <= readable
    assert all(name in stages.BY_NAME for _, name in stage.depends_on(params, 3))


def test_the_notebook_calls_its_stage_module():
    for stage in stages.STAGES:
        code = "".join(
            "".join(c["source"])
            for c in json.loads((ROOT / "notebooks" / stage.notebook).read_text())["cells"]
            if c["cell_type"] == "code"
        )
        assert f"{stage.module}.run(params, paths" in code, stage.notebook
        assert "params, paths = notebook.setup(params_file, overrides, run_dir, iteration)" in code, stage.notebook


def test_the_finetune_is_fingerprinted_on_the_file_its_method_trains_from(tmp_path):
    """SFT trains from sft.jsonl, DPO from dpo.jsonl: an edit to the other file changes nothing."""
    paths = RunPaths(tmp_path, 1)
    write_jsonl(paths.sft, [{"prompt": [], "completion": []}])
    write_jsonl(paths.dpo, [{"prompt": [], "chosen": [], "rejected": []}])
    for method, own, other in (("sft", paths.sft, paths.dpo), ("dpo", paths.dpo, paths.sft)):
        params = load_params(PARAMS, {"finetune.method": method})
        before = Fingerprints(params, tmp_path).stage(1, "finetune")
        other.write_text(other.read_text() + "\n")
        assert Fingerprints(params, tmp_path).stage(1, "finetune") == before
        own.write_text(own.read_text() + "\n")
        assert Fingerprints(params, tmp_path).stage(1, "finetune") != before


def test_start_from_base_depends_on_every_earlier_reward_stage():
    params = load_params(PARAMS, {"finetune.start_from": "base"}).to_dict()
    assert stages.stage("finetune").depends_on(params, 3) == [(3, "reward"), (1, "reward"), (2, "reward")]
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
