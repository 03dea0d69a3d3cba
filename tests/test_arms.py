"""The control arms' selection rules (sedir_utils/stages/finetune/selection.py) on crafted scores."""

import re
from pathlib import Path

import pytest

from sedir_utils.core.params import ParamsError
from sedir_utils.run.params import load_params
from sedir_utils.stages.finetune.selection import select, selection_stats
from sedir_utils.stages.pairs import build_preference_pairs

PARAMS = Path(__file__).resolve().parent.parent / "params" / "embedded.yaml"


def answers():
    """Two questions, four answers each; q1's best-scored answer is unfinished."""
    rows = []
    for q, scores, finished in (("q0", [3, 9, 1, 5], [1, 1, 1, 1]), ("q1", [9, 2, 6, 4], [0, 1, 1, 1])):
        for i, (score, done) in enumerate(zip(scores, finished)):
            rows.append(
                {
                    "id": f"{q}-r{i}",
                    "question_id": q,
                    "prompt": [{"role": "user", "content": q}],
                    "response": f"answer {q}-r{i}",
                    "reward": float(score),
                    "finished": bool(done),
                }
            )
    return rows


def test_each_arm_trains_on_what_its_rule_says():
    rows = answers()
    pairs, _ = build_preference_pairs(rows)
    assert [p["chosen_id"] for p in pairs] == ["q0-r1", "q1-r2"]  # best finished (q1-r0 scored 9, unfinished)
    assert select("reward", pairs, rows, 0, 1) == pairs
    worst = select("worst", pairs, rows, 0, 1)
    assert [p["chosen_id"] for p in worst] == ["q0-r2", "q1-r1"]  # the lowest-scored finished answer
    assert [p["rejected_id"] for p in worst] == ["q0-r1", "q1-r2"]  # DPO: the reward arm's choice, rejected
    assert all(p["chosen"][0]["content"] == f"answer {p['chosen_id']}" for p in worst)
    finished = {r["id"] for r in rows if r["finished"]}
    drawn = [tuple(p["chosen_id"] for p in select("random", pairs, rows, seed, 1)) for seed in range(40)]
    assert all(set(d) <= finished for d in drawn)  # never an unfinished answer
    assert {d[0] for d in drawn} == {"q0-r0", "q0-r1", "q0-r2", "q0-r3"}  # every finished answer can be drawn
    assert select("random", pairs, rows, 7, 1) == select("random", pairs, rows, 7, 1)  # seeded
    for arm in ("random", "worst"):
        chosen = select(arm, pairs, rows, 3, 1)
        assert [p["question_id"] for p in chosen] == [p["question_id"] for p in pairs]  # the same questions
        assert all(p["chosen_id"] != p["rejected_id"] for p in chosen)
    stats = selection_stats("worst", worst, pairs)
    assert stats["same_as_reward_arm"] == 0 and stats["mean_chosen_reward"] == 1.5
    with pytest.raises(ValueError, match="selects no training data"):
        select("none", pairs, rows, 0, 1)


def test_the_worst_arm_with_one_finished_answer_rejects_another():
    rows = [r for r in answers() if r["question_id"] == "q1"]
    for r in rows:
        r["finished"] = r["id"] == "q1-r3"
    pairs, _ = build_preference_pairs(rows)
    (worst,) = select("worst", pairs, rows, 0, 1)
    assert worst["chosen_id"] == "q1-r3" and worst["rejected_id"] == pairs[0]["rejected_id"] != "q1-r3"


@pytest.mark.parametrize(
    "names, message",
    [
        (["random"], "must include 'reward'"),
        (["reward", "best"], "arms.names[1]: expected one of"),
        (["reward", "random", "random"], "list each arm once"),
    ],
)
def test_arm_names_are_checked_at_load(names, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(PARAMS, {"arms.names": names})
