import pytest

from sedir_utils.core.io import StageError, read_jsonl
from sedir_utils.core.params import FinetuneParams
from sedir_utils.stages.finetune.selection import select_samples
from sedir_utils.stages.finetune.stage import completion_loss, finetune, loss_before_after, select_backend

ROWS = [
    {
        "question_id": f"q{i}",
        "chosen_score": 1.0,
        "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
        "completion": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}. Final answer: {2 * i}"}],
        "chosen": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}. Final answer: {2 * i}"}],
        "rejected": [{"role": "assistant", "content": f"I do not know. Final answer: {i * i + 7}"}],
    }
    for i in range(4)
]


@pytest.mark.parametrize(
    "cuda, unsloth, expected",
    [
        (True, True, "unsloth"),
        (False, True, "trl"),
        (True, False, "trl"),
        (False, False, "trl"),
    ],
)
def test_unsloth_only_with_both_cuda_and_unsloth(cuda, unsloth, expected):
    backend, reason = select_backend("auto", cuda=cuda, unsloth=unsloth)
    assert backend == expected
    if expected == "trl":
        assert ("no CUDA device" in reason) if not cuda else ("unsloth is not installed" in reason)


def test_asking_for_unsloth_without_a_gpu_says_why():
    with pytest.raises(StageError, match="finetune.backend: 'unsloth' was asked for, but no CUDA device"):
        select_backend("unsloth", cuda=False, unsloth=True)
    assert select_backend("trl", cuda=True, unsloth=True)[0] == "trl"


def test_the_highest_scoring_winners_are_kept():
    rows = [{"question_id": f"q{i}", "chosen_score": s} for i, s in enumerate([0.1, 0.9, 0.5, 0.9])]
    assert [r["question_id"] for r in select_samples(rows, 3)] == ["q1", "q3", "q2"]


def test_same_seed_trains_the_same_weights_and_keeps_the_chat_template(tmp_path, embedded_path, tokenizer):
    from sedir_utils.core.models import load_tokenizer

    section = FinetuneParams(backend="trl", per_device_train_batch_size=2, max_length=64)
    for run in ("a", "b"):
        info = finetune(
            embedded_path,
            ROWS,
            section,
            out_dir=tmp_path / run / "model",
            log_path=tmp_path / run / "log.jsonl",
            seed=5,
        )
        assert info["backend"] == "trl" and info["steps"] == 2 and info["samples"] == 4
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    assert read_jsonl(tmp_path / "a" / "log.jsonl") == read_jsonl(tmp_path / "b" / "log.jsonl")
    saved = load_tokenizer(str(tmp_path / "a" / "model"))
    assert saved.chat_template == tokenizer.chat_template and saved.eos_token == "<|im_end|>"


def test_sft_lowers_the_loss_on_its_winners_and_the_model_still_stops(tmp_path, embedded_path, model_fp32, tokenizer):
    from sedir_utils.core.models import load_causal_lm
    from sedir_utils.engine.generation import generate
    from sedir_utils.engine.sampling import SamplingParams

    section = FinetuneParams(
        backend="trl", per_device_train_batch_size=2, num_train_epochs=3, learning_rate=1e-3, max_length=64
    )
    info = finetune(embedded_path, ROWS, section, out_dir=tmp_path / "model", log_path=tmp_path / "log.jsonl", seed=0)
    tuned = load_causal_lm(str(tmp_path / "model"), "float32", "cpu")
    before, after = loss_before_after(embedded_path, tuned, tokenizer, ROWS, "float32")
    assert before == pytest.approx(completion_loss(model_fp32, tokenizer, ROWS), rel=1e-5)
    assert after < before - 0.2, (before, after)
    assert info["steps"] == 6
    prompt = tokenizer.apply_chat_template(ROWS[0]["prompt"], tokenize=False, add_generation_prompt=True)
    out = generate(tuned, tokenizer, [prompt], SamplingParams(temperature=0.0, max_new_tokens=48), 1, seed=0)[0]
    assert out.finished, out.text  # the end-of-turn token survived training and saving


def test_dpo_raises_the_implicit_reward_margin(tmp_path, embedded_path):
    section = FinetuneParams(
        backend="trl",
        method="dpo",
        per_device_train_batch_size=2,
        num_train_epochs=3,
        learning_rate=1e-3,
        max_length=64,
        beta=0.1,
    )
    info = finetune(embedded_path, ROWS, section, out_dir=tmp_path / "model", log_path=tmp_path / "log.jsonl", seed=0)
    log = [h for h in read_jsonl(tmp_path / "log.jsonl") if "loss" in h]
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 1
    assert info["last_margin"] > 0.1 and log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "model" / "config.json").is_file()


def test_restart_from_base_trains_on_all_iterations_winners(tmp_path, weightless_model):
    from sedir_utils.core.io import write_jsonl
    from sedir_utils.core.paths import RunPaths
    from sedir_utils.run.params import load_params
    from sedir_utils.stages.finetune.stage import training_rows

    params_file = tmp_path / "p.yaml"
    params_file.write_text(f"model:\n  name: {weightless_model}\nfinetune:\n  max_samples: 2\n")
    for k in (1, 2):
        write_jsonl(RunPaths(tmp_path, k).sft, [{**r, "question_id": f"it{k}-{r['question_id']}"} for r in ROWS])
    latest = training_rows(load_params(params_file), RunPaths(tmp_path, 2))
    assert latest[0] == str(tmp_path / "iter_1" / "model") and len(latest[1]) == 2 and latest[2] == "iter_1/model"
    base = training_rows(load_params(params_file, {"finetune.start_from": "base"}), RunPaths(tmp_path, 2))
    assert base[2] == weightless_model and len(base[1]) == 4
    assert {r["question_id"][:3] for r in base[1]} == {"it1", "it2"}
    # The plan notebook 04 shows is what the stage then runs: the arm's rows, selected from the reward
    # stage's pairs (sedir_utils/stages/finetune/selection.py), the backend chosen once.
    from sedir_utils.core.io import read_jsonl
    from sedir_utils.stages.finetune.stage import plan
    from sedir_utils.stages.pairs import PROVENANCE

    paths = RunPaths(tmp_path, 2)
    pairs = [
        {**r, "chosen_id": f"a{i}", "rejected_id": f"b{i}", "scorer": "s", "iteration": 2} for i, r in enumerate(ROWS)
    ]
    write_jsonl(paths.pairs, pairs)
    write_jsonl(paths.rewards, [])
    planned = plan(load_params(params_file), paths)
    assert read_jsonl(paths.sft)[0] == {k: pairs[0][k] for k in ("prompt", "completion", *PROVENANCE)}
    assert (planned.start, planned.start_label) == latest[::2] and planned.backend == "trl"
    assert planned.rows == read_jsonl(paths.sft)[:2]
    assert str(planned).startswith("SFT with trl (") and str(planned).endswith("from iter_1/model, on 2 samples")
