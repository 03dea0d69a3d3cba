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
