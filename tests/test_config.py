from pathlib import Path

import pytest

from sedir_utils.core.config import parse_override
from sedir_utils.core.params import PAPER_SYSTEM_PROMPT, ParamsError
from sedir_utils.run.params import load_params

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_params_file_is_valid(path):
    params = load_params(path)
    assert params.run_name


def test_paper_params_follow_the_paper():
    p = load_params(ROOT / "params" / "qwen2.5-1.5b-instruct.yaml")
    assert p.model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (p.iterations, p.finetune.max_samples, p.questions.temperature) == (4, 600, 1.0)
    assert p.questions.system_prompt == PAPER_SYSTEM_PROMPT
    assert any(t.startswith("gpqa") for t in p.eval.tasks)


def test_colab_params_are_the_paper_setup_in_smaller_batches():
    paper = load_params(ROOT / "params" / "qwen2.5-1.5b-instruct.yaml")
    t4 = load_params(ROOT / "params" / "colab-t4.yaml")
    assert (t4.model, t4.iterations, t4.finetune.max_samples) == (paper.model, paper.iterations, 600)
    assert t4.finetune.load_in_4bit and t4.finetune.gradient_checkpointing and t4.model.dtype == "auto"
    assert t4.finetune.per_device_train_batch_size * t4.finetune.gradient_accumulation_steps == 16


def test_a_file_extends_its_base_section_by_section(tmp_path):
    """``base:`` takes another params file's keys; the file's own replace them, section by section (a list whole),
    and a relative path in the base stays relative to the base's folder."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "probe.jsonl").write_text("")
    (tmp_path / "shared" / "base.yaml").write_text(
        "run_name: base\nquestions:\n  num_questions: 7\n  temperature: 0.9\n"
        "eval:\n  tasks: [gpqa_local, gpqa_local_cot]\naudit:\n  probe_file: probe.jsonl\n"
        "reward:\n  scorers: [llm_judge, self_certainty]\n  weights: {llm_judge: 1.0, self_certainty: 2.0}\n"
    )
    child = load_params(
        write(
            tmp_path,
            "base: shared/base.yaml\nrun_name: child\nquestions:\n  temperature: 0.5\neval:\n  tasks: [gpqa_local]\n"
            "reward:\n  scorers: [llm_judge, majority_vote]\n  weights: {llm_judge: 1.0, majority_vote: 3.0}\n",
        )
    )
    assert (child.run_name, child.questions.num_questions, child.questions.temperature) == ("child", 7, 0.5)
    assert child.eval.tasks == ["gpqa_local"]
    assert child.reward.weights == {"llm_judge": 1.0, "majority_vote": 3.0}  # a mapping value replaces the base's
    assert child.audit.probe_file == str((tmp_path / "shared" / "probe.jsonl").resolve())


def test_the_gpu_params_are_the_paper_params_and_a_few_keys():
    paper = load_params(ROOT / "params" / "qwen2.5-1.5b-instruct.yaml").to_dict()
    expected = {
        "colab-t4.yaml": {"questions.batch_size", "responses.batch_size", "reward.batch_size", "eval.batch_size"}
        | {"finetune.per_device_train_batch_size", "finetune.gradient_accumulation_steps", "finetune.max_length"}
        | {"arms.names"},
        "consumer-24gb.yaml": {"finetune.max_length", "finetune.load_in_4bit"},
    }
    for name, keys in expected.items():
        params = load_params(ROOT / "params" / name).to_dict()
        differ = {
            f"{s}.{k}" for s in paper if isinstance(paper[s], dict) for k in paper[s] if paper[s][k] != params[s][k]
        }
        assert differ == keys, name


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: missing.yaml\n", r"missing.yaml: params file not found"),
        ("base: 3\n", r"exp.yaml: base: expected the path of a params file"),
        ("base: exp.yaml\n", r"exp.yaml: base: exp.yaml extends itself \(exp.yaml -> exp.yaml\)"),
    ],
)
def test_a_bad_base_is_a_one_line_error(tmp_path, text, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write(tmp_path, text))


def test_an_unknown_key_in_a_base_is_named_in_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("questions:\n  temprature: 0.7\n")
    with pytest.raises(ParamsError, match=r"base.yaml: unknown key 'questions.temprature'"):
        load_params(write(tmp_path, "base: base.yaml\n"))


def test_unknown_key_is_named_with_its_section(tmp_path):
    path = write(tmp_path, "questions:\n  temprature: 0.7\n")
    with pytest.raises(ParamsError, match=r"exp.yaml: unknown key 'questions.temprature'"):
        load_params(path)


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key 'finetune.lora.rank'"):
        load_params(write(tmp_path, "finetune:\n  lora:\n    rank: 8\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("questions:\n  num_questions: many\n", r"questions.num_questions: expected an integer, got 'many'"),
        ("questions:\n  temperature: hot\n", r"questions.temperature: expected a number"),
        ("model:\n  dtype: fp8\n", r"model.dtype: expected one of 'float32'"),
        ("eval:\n  tasks: gpqa_local\n", r"eval.tasks: expected a list of a string"),
        ("eval:\n  apply_chat_template: 1\n", r"eval.apply_chat_template: expected true or false"),
        ("questions: 3\n", r"questions: expected a mapping"),
        ("questions:\n  top_p: 0\n", r"questions.top_p: must be in \(0, 1\]"),
        ("responses:\n  num_responses: 0\n", r"responses.num_responses: must be at least 1"),
        ("reward:\n  scorers: [reward_model]\n", r"reward.reward_model: the reward_model scorer needs"),
        ("reward:\n  scorers: [vibes]\n", r"reward.scorers\[0\]: expected one of 'llm_judge'"),
        ("reward:\n  weights: {llm_judge: high}\n", r"reward.weights.llm_judge: expected a number"),
        ("reward:\n  weights: {majority_vote: 1}\n", r"reward.weights.majority_vote: not one of reward.scorers"),
    ],
)
def test_wrong_values_are_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError, match=message) as info:
        load_params(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ParamsError, match=r"exp.yaml:2: not valid YAML"):
        load_params(write(tmp_path, "seed: 1\nquestions: a: b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    p = load_params(path, ["questions.temperature=0.5", "eval.tasks=[gpqa_local, arc_easy]", "eval.local_file=x.csv"])
    assert p.questions.temperature == 0.5
    assert p.eval.tasks == ["gpqa_local", "arc_easy"]
    with pytest.raises(ParamsError, match="unknown key 'questions.temp'"):
        load_params(path, {"questions.temp": 0.5})


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=some text") == ("a", "some text")
    with pytest.raises(ParamsError, match="expected key=value"):
        parse_override("novalue")


def test_relative_paths_resolve_from_the_params_folder(tmp_path):
    p = load_params(write(tmp_path, "eval:\n  local_file: data/q.csv\n"))
    assert p.eval.local_file == str(tmp_path / "data" / "q.csv")


def test_a_minimal_file_gets_runnable_defaults(tmp_path):
    p = load_params(write(tmp_path, "seed: 1\n"))
    assert p.model.name == "embedded" and Path(p.eval.local_file).is_file()


def test_seeds_differ_per_iteration(tmp_path):
    p = load_params(write(tmp_path, "seed: 7\n"))
    assert p.seed_for(0) == 7 and len({p.seed_for(k) for k in range(5)}) == 5


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "finetune:\n  batch_size: 2\n",
            r"exp.yaml: finetune.batch_size is now finetune.per_device_train_batch_size \(TRL's name\)",
        ),
        ("finetune:\n  num_epochs: 2\n", r"finetune.num_epochs is now finetune.num_train_epochs \(TRL's name\)"),
        ("finetune:\n  dpo_loss: ipo\n", r"finetune.dpo_loss is now finetune.loss_type"),
        ("finetune:\n  lora:\n    alpha: 8\n", r"finetune.lora.alpha is now finetune.lora.lora_alpha \(PEFT's name\)"),
    ],
)
def test_old_training_names_say_the_new_one(tmp_path, text, message):
    with pytest.raises(ParamsError, match=message) as info:
        load_params(write(tmp_path, text))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key, message",
    [
        ("seed", r"finetune.trainer_args.seed: set by the suite itself"),
        ("report_to", r"finetune.trainer_args.report_to: set tracking.backend and tracking.project instead"),
        ("learning_rate", r"finetune.trainer_args.learning_rate: set finetune.learning_rate instead"),
    ],
)
def test_trainer_args_may_not_set_what_the_suite_sets(tmp_path, key, message):
    with pytest.raises(ParamsError, match="exp.yaml: " + message):
        load_params(write(tmp_path, f"finetune:\n  trainer_args:\n    {key}: 1\n"))


def test_trainer_args_names_are_trls(tmp_path):
    from sedir_utils.stages.finetune.methods import trainer_args_problems

    p = load_params(write(tmp_path, "finetune:\n  trainer_args: {weight_decay: 0.01, lr_sheduler_type: cosine}\n"))
    assert p.finetune.trainer_args == {"weight_decay": 0.01, "lr_sheduler_type": "cosine"}  # any YAML value
    assert trainer_args_problems(p.finetune) == [
        "finetune.trainer_args.lr_sheduler_type: not a setting of TRL's SFTConfig (finetune.method: sft)"
    ]
    dpo = load_params(write(tmp_path, "seed: 1\n"), ["finetune.method=dpo", "finetune.trainer_args.packing=true"])
    assert trainer_args_problems(dpo.finetune) == [  # SFT's, not DPO's
        "finetune.trainer_args.packing: not a setting of TRL's DPOConfig (finetune.method: dpo)"
    ]


def test_unknown_trainer_args_stop_finetune_before_any_model_loads(tmp_path):
    from sedir_utils.core.io import StageError
    from sedir_utils.stages.finetune.stage import finetune

    p = load_params(write(tmp_path, "finetune:\n  trainer_args: {lr_sheduler_type: cosine}\n"))
    with pytest.raises(StageError, match=r"exp.yaml: finetune.trainer_args.lr_sheduler_type: not a setting"):
        finetune(
            "/no/such/model",
            [],
            p.finetune,
            out_dir=tmp_path / "m",
            log_path=tmp_path / "l.jsonl",
            seed=0,
            where=str(tmp_path / "exp.yaml"),
        )


def test_trainer_args_reach_trls_config_and_bad_values_are_one_line(tmp_path):
    from sedir_utils.core.io import StageError
    from sedir_utils.stages.finetune.methods import trainer_config

    p = load_params(
        write(
            tmp_path,
            "finetune:\n  warmup_steps: 0.1\n  trainer_args: {lr_scheduler_type: cosine, weight_decay: 0.01}\n",
        )
    )
    config = trainer_config(p.finetune, tmp_path, 3, cuda=False, bf16=True)
    assert (config.lr_scheduler_type, config.weight_decay, config.warmup_steps) == ("cosine", 0.01, 0.1)
    assert config.per_device_train_batch_size == 4 and config.seed == 3 and config.completion_only_loss
    p.finetune.trainer_args["lr_scheduler_type"] = "nonsense"
    message = r"^exp.yaml: finetune.trainer_args: TRL's SFTConfig rejected it: .*nonsense"
    with pytest.raises(StageError, match=message) as info:
        trainer_config(p.finetune, tmp_path, 3, cuda=False, bf16=True, where="exp.yaml")
    assert "\n" not in str(info.value)


def test_preflight_has_trls_config_check_the_values_before_any_work(tmp_path):
    """A value TRL's config class rejects stops the run in preflight, as one line naming the key, for the method's
    own config class; the names the suite sets itself are refused at load already."""
    from sedir_utils.stages.finetune.methods import trainer_config_problems

    p = load_params(write(tmp_path, "finetune:\n  trainer_args: {lr_scheduler_type: nonsense}\n"))
    (problem,) = trainer_config_problems(p.finetune, where="exp.yaml")
    assert problem.startswith("exp.yaml: finetune.trainer_args: TRL's SFTConfig rejected it:") and "nonsense" in problem
    dpo = load_params(write(tmp_path, "seed: 1\n"), ["finetune.method=dpo", "finetune.trainer_args.optim=no_such"])
    (problem,) = trainer_config_problems(dpo.finetune)
    assert problem.startswith("finetune.trainer_args: TRL's DPOConfig rejected it:") and "no_such" in problem
    assert trainer_config_problems(load_params(ROOT / "params" / "embedded.yaml").finetune) == []
