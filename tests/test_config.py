from pathlib import Path

import pytest

from sedir_utils.config import PAPER_SYSTEM_PROMPT, ParamsError, load_params, parse_override

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
    assert t4.finetune.batch_size * t4.finetune.gradient_accumulation_steps == 16


def test_unknown_key_is_named_with_its_section(tmp_path):
    path = write(tmp_path, "questions:\n  temprature: 0.7\n")
    with pytest.raises(ParamsError, match=r"exp.yaml: unknown key 'questions.temprature'"):
        load_params(path)


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key 'finetune.lora.rank'"):
        load_params(write(tmp_path, "finetune:\n  lora:\n    rank: 8\n"))


@pytest.mark.parametrize("text, message", [
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
])
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
