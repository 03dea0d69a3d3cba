"""Datasets with cards, the run export (and its hub push up to the upload), model cards."""

import re

import pytest
from fake_run import make_run

from sedir_utils.core.io import read_json, read_jsonl
from sedir_utils.core.paths import RunPaths


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    return run_dir, make_run(run_dir)


def _ids(rows):
    return [r.get("id") or r.get("question_id") for r in rows]


def test_an_iteration_is_saved_as_a_dataset_with_every_row_and_a_card_that_counts_them(run):
    from datasets import load_from_disk
    from huggingface_hub import DatasetCard

    from sedir_utils.share.publish import SPLITS, save_iteration

    run_dir, params = run
    paths = RunPaths(run_dir, 1)
    folder = save_iteration(params, paths)
    data = load_from_disk(str(folder))
    assert sorted(data) == sorted(SPLITS)
    for split, attr in SPLITS.items():
        rows = read_jsonl(getattr(paths, attr))
        assert data[split].num_rows == len(rows) and _ids(data[split].to_list()) == _ids(rows), split
    assert data["responses"][0]["reward"] == read_jsonl(paths.rewards)[0]["reward"]  # responses with their rewards
    card = DatasetCard.load(folder / "README.md")
    facts = card.data.sedir["iterations"][0]
    assert facts["rows"] == {split: data[split].num_rows for split in SPLITS}
    assert card.data.license == "apache-2.0" and "sedir" in card.data.tags
    assert facts["sampling"]["questions"]["temperature"] == 0.7 and facts["sampling"]["responses"]["temperature"] == 0.8
    assert facts["filters"]["questions_dropped"] == {"truncated": 2, "too_short": 1}  # counts the filters wrote
    assert facts["audit"]["ok"] is False and facts["scorer"] == "llm_judge"
    assert "FAILS: AUROC does not exclude 0.5" in card.text and "apache-2.0" in card.text


def test_a_control_arm_saves_only_its_own_training_sets(run):
    from datasets import load_from_disk

    from sedir_utils.share.publish import save_iteration

    run_dir, params = run
    paths = RunPaths(run_dir, 1, "random")
    data = load_from_disk(str(save_iteration(params, paths)))
    assert sorted(data) == ["dpo", "grpo", "opsd", "sft"]
    assert data["sft"].num_rows == len(read_jsonl(paths.sft)) == 2


def test_the_same_rows_give_the_same_bytes(tmp_path):
    from sedir_utils.share.publish import save_iteration

    files = []
    for name in ("a", "b"):
        params = make_run(tmp_path / name)
        folder = save_iteration(params, RunPaths(tmp_path / name, 2))
        files.append({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    assert files[0] == files[1] and "responses/state.json" in files[0]


def test_the_export_gathers_every_iteration_and_arm_into_one_datasetdict_whose_card_matches_the_files(run, tmp_path):
    from datasets import load_from_disk
    from huggingface_hub import DatasetCard

    from sedir_utils.share.publish import SPLITS, export

    run_dir, _ = run
    folder, counts = export(run_dir, tmp_path / "out")
    data = load_from_disk(str(folder))
    expected = {split: 0 for split in SPLITS}
    for arm in ("reward", "random"):
        for k in (1, 2):
            paths = RunPaths(run_dir, k, arm)
            for split, attr in SPLITS.items():
                if arm == "reward" or split in ("sft", "dpo", "opsd", "grpo"):
                    rows = read_jsonl(getattr(paths, attr))
                    expected[split] += len(rows)
                    mine = [r for r in data[split].to_list() if r["iteration"] == k and r["arm"] == arm]
                    assert _ids(mine) == _ids(rows), (split, k, arm)
    assert counts == expected and {s: data[s].num_rows for s in data} == expected
    assert "eval" not in " ".join(data)  # the evaluation questions never leave the run
    card = DatasetCard.load(folder / "README.md")
    facts = {(f["iteration"], f["arm"]): f for f in card.data.sedir["iterations"]}
    assert sorted(facts) == [(1, "random"), (1, "reward"), (2, "random"), (2, "reward")]
    assert facts[(2, "reward")]["rows"]["responses"] == len(read_jsonl(RunPaths(run_dir, 2).rewards))
    assert facts[(1, "random")]["rows"] == {"sft": 2, "dpo": 2, "opsd": 2, "grpo": 2}
    assert "GPQA asks that its questions not be published" in card.text


def test_the_hub_push_sends_the_card_then_each_split_as_a_config_of_iterations(run, monkeypatch):
    """Offline, up to the upload: the repo is made private, the card goes first, and each config's
    DatasetDict passes the checks datasets' push_to_hub makes before it uploads anything."""
    from datasets import DatasetDict
    from datasets.dataset_dict import _split_re
    from huggingface_hub import DatasetCard, HfApi

    from sedir_utils.share.publish import push

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)) or "url")
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", str(self))))

    def upload(self, repo_id, config_name="default", **kw):
        self._check_values_features()
        assert all(re.match(_split_re, split) for split in self)
        calls.append(("config", config_name, {split: d.num_rows for split, d in self.items()}, kw["private"]))

    monkeypatch.setattr(DatasetDict, "push_to_hub", upload)
    run_dir, _ = run
    push(run_dir, "someone/sedir-run")
    assert calls[0] == ("repo", "someone/sedir-run", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[1][0] == "card" and "license: apache-2.0" in calls[1][1]
    configs = {c[1]: c[2] for c in calls[2:]}
    assert sorted(configs) == ["dpo", "grpo", "opsd", "pairs", "questions", "responses", "sft"]
    assert configs["questions"] == {"iter_1": 4, "iter_2": 4}
    assert configs["sft"] == {"iter_1": 4 + 2, "iter_2": 4 + 2}  # both arms, told apart by their arm column
    assert all(c[3] is True for c in calls[2:])


def test_the_export_command_writes_the_folder_and_refuses_a_folder_that_is_not_a_run(run, tmp_path, capsys):
    from sedir_utils.run.cli import main

    run_dir, _ = run
    assert main(["export", str(run_dir), "--to", str(tmp_path / "ds")]) == 0
    assert (tmp_path / "ds" / "dataset_dict.json").is_file() and str(tmp_path / "ds") in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "params.yaml: not found" in err and "\n" not in err


def test_a_model_card_states_the_training_and_after_the_eval_its_scores_with_intervals(run):
    from huggingface_hub import ModelCard

    from sedir_utils.share.cards import write_model_card

    run_dir, params = run
    paths = RunPaths(run_dir, 2)
    eval_report = read_json(paths.eval)
    paths.eval.rename(paths.eval.with_suffix(".later"))
    card = ModelCard.load(write_model_card(params, paths))
    facts = card.data.sedir
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert (facts["iteration"], facts["arm"], facts["samples"], facts["steps"]) == (2, "reward", 4, 2)
    assert facts["training"]["method"] == "sft" and facts["training"]["lora"]["r"] == params["finetune"]["lora"]["r"]
    assert facts["eval"] == {} and "Not evaluated yet" in card.text
    assert facts["audit"]["ok"] is False and facts["audit"]["auroc"] == pytest.approx(0.6)
    paths.eval.with_suffix(".later").rename(paths.eval)
    card = ModelCard.load(write_model_card(params, paths))
    acc = eval_report["tasks"]["gpqa_local"]["acc"]
    assert card.data.sedir["eval"]["gpqa_local/acc"] == {"value": acc["value"], "ci": acc["ci"], "n": 12}
    assert card.data.eval_results[0].metric_value == acc["value"]
    assert f"{acc['ci'][0]:.3f}-{acc['ci'][1]:.3f}" in card.text


def test_a_model_of_unknown_licence_says_so(run):
    from sedir_utils.share.cards import licence_note

    _, params = run
    params = {**params, "model": {**params["model"], "name": "/models/mine"}}
    assert "does not know" in licence_note(params) and "cards.license" in licence_note(params)
    params["cards"] = {**params["cards"], "license": "mit"}
    assert "(mit)" in licence_note(params)
