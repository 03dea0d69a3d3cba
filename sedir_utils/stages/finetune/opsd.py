"""On-policy self-distillation (``finetune.method: opsd``) with TRL's SDFT trainer.

OPSD ("Self-Distilled Reasoner: On-Policy Self-Distillation"; TRL: ``trl.experimental.sdft``) trains one
model as both teacher and student: the student sees the question and samples its own answers; the teacher,
the same model with a privileged context in its prompt, scores the student's tokens; training lowers the
per-token divergence between the two on the student's own samples. SeDiR has no verified solution to offer
as the context, but it has the answer the arm's rule chose (for the paper arm, the reward's best) and the
final answer most of the question's attempts agree on: ``finetune.opsd.privileged_context`` picks ``best``,
``majority`` or ``both``.

The context goes only into the teacher's prompt: TRL builds it from ``teacher_prompt_template`` (this module
never writes a teacher prompt into the training rows), and the student's prompt is the row's ``prompt``,
the question exactly as it was asked when the answers were sampled. A question with no finished answer has
no context and is skipped, counted (``skipped_no_finished``); with ``majority``, a question whose answers
give no final answer is skipped too (``skipped_no_majority``).
"""

from __future__ import annotations

from types import SimpleNamespace

from sedir_utils.core.models import load_causal_lm, load_tokenizer
from sedir_utils.engine import generation
from sedir_utils.engine.sampling import SamplingParams
from sedir_utils.engine.scorers.majority_vote import extract_final_answer, majority_answer
from sedir_utils.stages.pairs import PROVENANCE

CONTEXTS = ("best", "majority", "both")


def privileged_context(mode: str, chosen: str, answers: list[dict]) -> str | None:
    """The teacher's context for one question: the chosen answer's text (``best``), the majority answer's text
    (``majority``), or both with the agreed final answer named (``both``). None where there is none.

    ``chosen``: the text of the answer the arm's rule chose; ``answers``: the question's scored answers."""
    if mode not in CONTEXTS:
        raise ValueError(f"finetune.opsd.privileged_context: {mode!r} is not one of {', '.join(CONTEXTS)}")
    if mode == "best":
        return chosen
    answers = [a for a in answers if a.get("finished", True)]
    majority = majority_answer(answers)
    if majority is None:
        return None
    final, answer = majority
    if mode == "majority":
        return answer["response"]
    agreed = sum(extract_final_answer(a["response"]) == final for a in answers)
    return f"{chosen}\n\nThe final answer most attempts ({agreed} of {len(answers)}) agree on: {final}"


def opsd_rows(selected: list[dict], rewards: list[dict], mode: str) -> tuple[list[dict], dict]:
    """TRL's SDFT rows (``prompt``, ``privileged_context``) for the arm's selected pairs, and what was skipped.

    ``selected``: the arm's pairs (``selection.select``; the chosen answer is the ``best`` context); ``rewards``:
    every scored answer of the iteration (``rewards.jsonl``), for the majority answer and for counting the
    questions whose answers all failed to finish.
    """
    by_question: dict[str, list[dict]] = {}
    for row in rewards:
        by_question.setdefault(row["question_id"], []).append(row)
    # A question whose answers all failed to finish has no context (and no pair: pairing never chooses one).
    no_finished = sum(not any(r.get("finished", True) for r in g) for g in by_question.values())
    stats = {"context": mode, "questions": len(by_question), "rows": 0, "skipped_no_finished": no_finished}
    if mode != "best":
        stats["skipped_no_majority"] = 0
    rows = []
    for pair in selected:  # a pair's chosen answer finished its turn (pairing and the arms' rules keep it so)
        chosen = pair["chosen"][-1]["content"]
        context = privileged_context(mode, chosen, by_question.get(pair["question_id"], []))
        if context is None:
            stats["skipped_no_majority"] += 1
            continue
        rows.append({"prompt": pair["prompt"], "privileged_context": context, **{k: pair[k] for k in PROVENANCE}})
    stats["rows"] = len(rows)
    return rows, stats


def trl_sdft():
    """TRL's ``trl.experimental.sdft`` (SDFTTrainer, SDFTConfig), without its "experimental API" warning on
    every import: the version is pinned (pyproject.toml) and the tests exercise what the suite uses."""
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return importlib.import_module("trl.experimental.sdft")


def teacher_prompt(prompt, context: str, template: str):
    """The teacher's prompt as TRL's SDFT trainer composes it (its own builder, given only the template)."""
    trl_sdft()
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    builder = DemonstrationTeacherContextBuilder(
        SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template))
    )
    return builder._compose_teacher_prompt(prompt, context)


def _completion_logits(model, tokenizer, prompt, completion_ids: list[int]):
    """Logits that predict ``completion_ids`` after the chat-rendered ``prompt``."""
    import torch

    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([prefix_ids + completion_ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prefix_ids) - 1 : len(prefix_ids) + len(completion_ids) - 1]


def distillation_probe(student, teacher, tokenizer, rows: list[dict], completions: list[str], section) -> dict:
    """How far the student (question only) is from the teacher (question and privileged context) on fixed
    completions: the mean per-token divergence (TRL's ``compute_divergence``, the trained ``distillation_alpha``
    over the full vocabulary) and the student's mean negative log-likelihood of the completion tokens.

    ``completions``: one text per row, e.g. the teacher's own greedy answers (the teacher-preferred tokens).
    ``section``: params ``finetune.opsd``. Call it with the start model and then the trained one as the student.
    """
    import torch

    trl_sdft()
    from trl.experimental.sdft.loss_utils import compute_divergence

    divergence = nll = 0.0
    tokens = 0
    for row, text in zip(rows, completions, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: section.max_completion_length]
        if not ids:
            continue
        s = torch.log_softmax(_completion_logits(student, tokenizer, row["prompt"], ids), dim=-1)
        t_prompt = teacher_prompt(row["prompt"], row["privileged_context"], section.teacher_prompt_template)
        t = torch.log_softmax(_completion_logits(teacher, tokenizer, t_prompt, ids), dim=-1)
        divergence += compute_divergence(s, t, section.distillation_alpha).sum().item()
        nll += -s.gather(1, torch.tensor(ids, device=s.device)[:, None]).sum().item()
        tokens += len(ids)
    return {"divergence": divergence / max(tokens, 1), "student_nll": nll / max(tokens, 1), "tokens": tokens}


def teacher_answers(teacher, tokenizer, rows: list[dict], section, seed: int) -> list[str]:
    """The teacher's greedy answers (question and privileged context): the tokens it prefers."""
    prompts = [
        tokenizer.apply_chat_template(
            teacher_prompt(r["prompt"], r["privileged_context"], section.teacher_prompt_template),
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in rows
    ]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=section.max_completion_length)
    return [
        g.text for g in generation.generate(teacher, tokenizer, prompts, sampling, len(prompts), seed, desc="teacher")
    ]


def before_after(start_path: str, trained_path: str, rows: list[dict], section, dtype: str, seed: int, limit: int = 8):
    """``distillation_probe`` on (up to ``limit`` of) the training rows, the start model as the teacher (what
    TRL's ``base`` teacher is): with the start model as the student, then with the trained one."""
    sample = rows[:limit]
    tokenizer = load_tokenizer(start_path)
    start = load_causal_lm(start_path, dtype)
    answers = teacher_answers(start, tokenizer, sample, section, seed)
    before = distillation_probe(start, start, tokenizer, sample, answers, section)
    after = distillation_probe(load_causal_lm(trained_path, dtype), start, tokenizer, sample, answers, section)
    return {"before": before, "after": after}
