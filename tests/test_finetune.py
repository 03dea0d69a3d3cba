import pytest

from sedir_utils.finetune import select_backend, select_samples
from sedir_utils.io import StageError


@pytest.mark.parametrize("cuda, unsloth, expected", [
    (True, True, "unsloth"), (False, True, "trl"), (True, False, "trl"), (False, False, "trl"),
])
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
    from sedir_utils.config import FinetuneParams
    from sedir_utils.finetune import finetune
    from sedir_utils.io import read_jsonl
    from sedir_utils.models import load_tokenizer

    rows = [{"question_id": f"q{i}", "chosen_score": 1.0,
             "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "completion": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}. Final answer: {2 * i}"}]}
            for i in range(4)]
    section = FinetuneParams(backend="trl", batch_size=2, max_length=64)
    for run in ("a", "b"):
        info = finetune(embedded_path, rows, section, out_dir=tmp_path / run / "model",
                        log_path=tmp_path / run / "log.jsonl", seed=5)
        assert info["backend"] == "trl" and info["steps"] == 2 and info["samples"] == 4
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    assert read_jsonl(tmp_path / "a" / "log.jsonl") == read_jsonl(tmp_path / "b" / "log.jsonl")
    saved = load_tokenizer(str(tmp_path / "a" / "model"))
    assert saved.chat_template == tokenizer.chat_template and saved.eos_token == "<|im_end|>"
