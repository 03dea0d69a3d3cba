"""A run folder as the runner leaves it, written without any model: the files' shapes are the stages' own
(rows with provenance, filter and pair counts, the audit, eval reports with intervals, a manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sedir_utils.core.io import write_json, write_jsonl, write_text
from sedir_utils.core.paths import RunPaths
from sedir_utils.run.params import load_params

ROOT = Path(__file__).resolve().parent.parent
SAMPLING = {"max_new_tokens": 64, "min_p": 0.0, "temperature": 0.7, "top_k": 0, "top_p": 1.0}


def _messages(role: str, text: str) -> list[dict]:
    return [{"content": text, "role": role}]


def _eval(paths: RunPaths, k: int, arm_shift: int) -> None:
    from sedir_utils.stages.evaluation.stage import summarise

    correct = [(d + k + arm_shift) % 3 == 0 for d in range(12)]
    rows = [
        {"task": "gpqa_local", "metric": "acc", "doc_id": d, "domain": None, "correct": float(c), "no_answer": False}
        for d, c in enumerate(correct)
    ]
    write_jsonl(paths.eval_samples, rows)
    write_json(paths.eval, {"iteration": k, "tasks": summarise(rows, 100, 0)})


def _samples(paths: RunPaths, k: int, questions: int, answers: int) -> None:
    q_rows, r_rows, pairs = [], [], []
    for q in range(questions):
        qid = f"it{k}-q{q:04d}"
        text = f"Iteration {k}, question {q}: why does ice float on water?"
        q_rows.append({"id": qid, "iteration": k, "model": "embedded", "question": text, "sampling": SAMPLING})
        scored = []
        for a in range(answers):
            reward = round(0.1 * a + 0.01 * q, 3)
            row = {
                "id": f"{qid}-r{a}",
                "question_id": qid,
                "iteration": k,
                "question": text,
                "prompt": _messages("user", text),
                "response": f"Answer {a}: ice is less dense than water. Final answer: density",
                "finished": True,
                "reward": reward,
                "scores": {"llm_judge": reward},
                "scorer": "llm_judge",
                "sampling": {**SAMPLING, "temperature": 0.8},
                "seed": 1000 * k + q,
            }
            r_rows.append(row)
            scored.append(row)
        best, worst = scored[-1], scored[0]
        pairs.append(
            {
                "question_id": qid,
                "iteration": k,
                "prompt": best["prompt"],
                "chosen": _messages("assistant", best["response"]),
                "rejected": _messages("assistant", worst["response"]),
                "chosen_id": best["id"],
                "rejected_id": worst["id"],
                "chosen_score": best["reward"],
                "rejected_score": worst["reward"],
                "margin": best["reward"] - worst["reward"],
                "scorer": "llm_judge",
            }
        )
    write_jsonl(paths.questions, q_rows)
    write_jsonl(paths.responses, [{k2: v for k2, v in r.items() if k2 not in ("reward", "scores")} for r in r_rows])
    write_jsonl(paths.rewards, r_rows)
    write_jsonl(paths.pairs, pairs)
    write_json(
        paths.question_stats,
        {"generated": questions + 3, "kept": questions, "dropped": {"truncated": 2, "too_short": 1, "duplicate": 0}},
    )
    write_json(
        paths.pair_stats,
        {"pairs": questions, "questions": questions, "scored": questions * answers, "scorer": "llm_judge", "nan": 0},
    )
    write_json(
        paths.metrics,
        {
            "questions": {
                "distinct_1": 0.5,
                "distinct_2": 0.8 + 0.01 * k,
                "duplicate_rate": 0.0,
                "questions": questions,
            },
            "reward": {
                "reward": {"mean": 0.2 + 0.1 * k, "std": 0.1, "tie_share": 0.0, "pairs": questions, "margin_mean": 0.3},
                "scorer": "llm_judge",
            },
            "audit": {
                "ok": False,
                "active_scorer": "llm_judge",
                "active": {"auroc": 0.5 + 0.05 * k, "auroc_ci": [0.2, 0.8]},
                "scorers": {"llm_judge": {"auroc": 0.5 + 0.05 * k, "auroc_ci": [0.2, 0.8]}},
                "reasons": ["AUROC does not exclude 0.5"],
                "action": "continue",
            },
        },
    )


def _training(paths: RunPaths) -> None:
    pairs = [json.loads(line) for line in open(paths.pairs, encoding="utf-8")]
    picked = pairs if paths.paper_arm else pairs[::2]
    sft = [{**{x: p[x] for x in ("question_id", "iteration", "prompt")}, "completion": p["chosen"]} for p in picked]
    write_jsonl(paths.sft, sft)
    write_jsonl(
        paths.dpo, [{x: p[x] for x in ("question_id", "iteration", "prompt", "chosen", "rejected")} for p in picked]
    )
    write_jsonl(paths.opsd, [{"prompt": p["prompt"], "privileged_context": p["chosen"][0]["content"]} for p in picked])
    questions = [{"prompt": p["prompt"], "question_id": p["question_id"], "question": "q"} for p in picked]
    write_jsonl(paths.grpo, questions)  # what a grpo run writes (every split present)
    write_json(paths.selection, {"arm": paths.arm, "samples": len(picked), "same_as_reward_arm": len(picked)})
    info = {"backend": "trl", "method": "sft", "samples": len(picked), "steps": 2, "first_loss": 1.5, "last_loss": 1.2}
    write_json(paths.finetune_info, {**info, "base_model": "embedded", "start_from": "latest"})
    write_json(paths.model / "config.json", {"model_type": "llama"})


def make_run(run_dir: Path, iterations: int = 2, arms=("reward", "random"), questions: int = 4, answers: int = 3):
    """Write a finished run of ``iterations`` into ``run_dir``; returns the resolved params dict."""
    params = load_params(ROOT / "params" / "embedded.yaml", {"arms.names": list(arms), "iterations": iterations})
    resolved = params.to_dict()
    write_text(run_dir / "params.yaml", yaml.safe_dump(resolved, sort_keys=False))
    stages = []
    for k in range(iterations + 1):
        if k > 0:
            _samples(RunPaths(run_dir, k), k, questions, answers)
        for shift, arm in enumerate(arms):
            paths = RunPaths(run_dir, k, arm)
            if k > 0:
                _training(paths)
            if k > 0 or arm == "reward":
                _eval(paths, k, shift)
            stages.append({"iteration": k, "arm": arm, "stage": "eval", "status": "ran", "seconds": 1.5, "rows": 12})
    write_json(
        RunPaths(run_dir, 0).manifest,
        {"params": resolved, "versions": {"sedir": "0.1.0"}, "git_commit": "abc", "device": {}, "stages": stages},
    )
    return resolved
