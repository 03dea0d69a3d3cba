"""Experiment tracking: every stage's numbers at step = iteration, read back from TensorBoard and trackio."""

import sys
import types

import pytest
from fake_run import make_run

from sedir_utils.core.io import read_json
from sedir_utils.core.paths import RunPaths
from sedir_utils.run.params import load_params
from sedir_utils.share.tracking import iteration_scalars, log_iterations, trainer_report

SECONDS = {(k, "reward", "eval"): 10.0 + k for k in range(3)}


def _params(backend, **more):
    from fake_run import ROOT

    overrides = {"tracking.backend": backend, "arms.names": ["reward", "random"], **more}
    return load_params(ROOT / "params" / "embedded.yaml", overrides)


def _expected(run_dir, k, arm="reward"):
    acc = read_json(RunPaths(run_dir, k, arm).eval)["tasks"]["gpqa_local"]["acc"]
    return acc["value"], acc["ci"]


def test_an_iteration_logs_diversity_reward_audit_eval_with_intervals_training_and_times(tmp_path):
    make_run(tmp_path)
    scalars = iteration_scalars(tmp_path, 1, ["reward", "random"], False, {("reward", "eval"): 11.0})
    value, ci = _expected(tmp_path, 1, "random")
    assert scalars["eval/random/gpqa_local/acc/value"] == value
    assert (scalars["eval/random/gpqa_local/acc/ci_low"], scalars["eval/random/gpqa_local/acc/ci_high"]) == tuple(ci)
    assert scalars["questions/distinct_2"] == pytest.approx(0.81)
    assert scalars["reward/reward/mean"] == pytest.approx(0.3) and scalars["reward/reward/tie_share"] == 0.0
    assert scalars["audit/active/auroc"] == pytest.approx(0.55) and scalars["audit/active/auroc_ci_low"] == 0.2
    assert scalars["audit/ok"] == 0.0
    assert scalars["finetune/random/last_loss"] == 1.2 and scalars["time/reward/eval_s"] == 11.0
    assert not any(key.startswith("random/") for key in scalars)  # the control arm shares the samples' metrics


def test_tensorboard_holds_every_iteration_as_a_step_and_a_rerun_logs_nothing_twice(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_run(tmp_path)
    params = _params("tensorboard")
    assert log_iterations(params, tmp_path, [0, 1, 2], SECONDS) == [0, 1, 2]
    assert log_iterations(params, tmp_path, [0, 1, 2], SECONDS) == []  # resumed: already logged
    events = EventAccumulator(str(tmp_path / "tracking" / "tensorboard" / "iterations"))
    events.Reload()
    read = {e.step: e.value for e in events.Scalars("eval/reward/gpqa_local/acc/value")}
    assert read == pytest.approx({k: _expected(tmp_path, k)[0] for k in range(3)})
    high = {e.step: e.value for e in events.Scalars("eval/reward/gpqa_local/acc/ci_high")}
    assert high == pytest.approx({k: _expected(tmp_path, k)[1][1] for k in range(3)})
    assert [e.step for e in events.Scalars("reward/reward/mean")] == [1, 2]
    assert [e.value for e in events.Scalars("time/reward/eval_s")] == [10.0, 11.0, 12.0]


def test_trackio_holds_every_iteration_in_its_local_store(tmp_path, monkeypatch):
    import trackio.sqlite_storage as storage
    import trackio.utils

    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio")  # its local store, for this test
    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    run_dir = tmp_path / "run-a"
    make_run(run_dir)
    params = _params("trackio", **{"tracking.project": "sedir-test"})
    assert log_iterations(params, run_dir, [0, 1, 2], SECONDS) == [0, 1, 2]
    logs = storage.SQLiteStorage.get_logs("sedir-test", "run-a")
    by_step = {row["step"]: row for row in logs}
    assert sorted(by_step) == [0, 1, 2]
    for k in range(3):
        value, ci = _expected(run_dir, k)
        assert by_step[k]["eval/reward/gpqa_local/acc/value"] == pytest.approx(value)
        assert by_step[k]["eval/reward/gpqa_local/acc/ci_low"] == pytest.approx(ci[0])
    assert by_step[2]["audit/active/auroc"] == pytest.approx(0.6)


def test_wandb_gets_one_resumable_run_with_a_step_per_iteration(tmp_path, monkeypatch):
    """wandb cannot run offline here beyond its offline mode: a stand-in records what the suite asks of it."""
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_run(tmp_path)
    log_iterations(_params("wandb"), tmp_path, [0, 1, 2], SECONDS)
    init = calls[0][1]
    assert init["resume"] == "allow" and init["project"] == "embedded" and init["dir"] == str(tmp_path / "tracking")
    assert [c[1] for c in calls if c[0] == "log"] == [0, 1, 2] and calls[-1] == ("finish",)
    assert calls[2][2]["eval/reward/gpqa_local/acc/value"] == _expected(tmp_path, 1)[0]


def test_wandb_in_offline_mode_takes_the_run_into_the_runs_tracking_folder(tmp_path, monkeypatch, processes):
    """The real wandb, offline: it accepts the suite's calls and writes one run under the run's id. (Its record
    file has no reader outside wandb's own service, so the values are not read back.)"""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_run(tmp_path)
    assert log_iterations(_params("wandb"), tmp_path, [0, 1, 2], SECONDS) == [0, 1, 2]
    runs = list((tmp_path / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(runs[0].name.rsplit("-", 1)[1]) == 16  # the id the run folder gives
    assert next(runs[0].glob("run-*.wandb")).stat().st_size > 0


def test_trl_reports_to_the_chosen_backend_with_a_run_per_fine_tune(tmp_path):
    from sedir_utils.stages.finetune.methods import trainer_config

    params = _params("tensorboard")
    paths = RunPaths(tmp_path / "my-run", 2, "random")
    report = trainer_report(params, paths)
    assert report == {"report_to": ["tensorboard"], "run_name": "my-run-iter2-random", "project": "embedded"}
    args = trainer_config(params.finetune, tmp_path, 0, cuda=False, bf16=False, report=report)
    assert args.report_to == ["tensorboard"] and args.run_name == "my-run-iter2-random"
    none = trainer_config(
        params.finetune, tmp_path, 0, cuda=False, bf16=False, report=trainer_report(_params("none"), paths)
    )
    assert none.report_to == []


def test_a_tracking_backend_that_is_not_installed_is_refused_before_any_work(monkeypatch):
    import importlib.util

    from sedir_utils.run.preflight import tracking_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    problems = tracking_problems(_params("wandb"))
    assert problems == [
        "tracking.backend: wandb is not installed (pip install wandb, or the suite's .[tracking] extra)"
    ]
    assert tracking_problems(_params("tensorboard")) == []


def test_a_grpo_fine_tune_logs_its_self_reward_and_the_collapse_watch(tmp_path):
    from sedir_utils.core.io import write_json

    make_run(tmp_path)
    paths = RunPaths(tmp_path, 1, "random")
    watch = {"before": {"policy_accuracy": 0.5}, "after": {"policy_accuracy": 0.25}, "warning": True}
    info = {**read_json(paths.finetune_info), "reward_first": 0.4, "reward_last": 0.7, "dead_group_share": 0.25}
    write_json(paths.finetune_info, {**info, "kl_last": 0.01, "collapse": watch, "reward": ["random"]})
    scalars = iteration_scalars(tmp_path, 1, ["reward", "random"], False, {})
    assert scalars["finetune/random/reward_last"] == 0.7 and scalars["finetune/random/dead_group_share"] == 0.25
    assert scalars["finetune/random/collapse/after/policy_accuracy"] == 0.25
    assert scalars["finetune/random/collapse/warning"] == 1.0 and scalars["finetune/random/kl_last"] == 0.01
