"""Stage 4: fine-tune the latest model on its own winning responses (paper, section 3.4).

Unsloth (LoRA on a 4- or 16-bit base, in a worker process) when CUDA and unsloth are present, TRL + PEFT
LoRA otherwise; SFT on the winners (the paper) or DPO on the pairs (``finetune.method``). Either way the
adapter is merged and the result saved as a plain model folder, which the next iteration, lm-eval and any
other loader read without knowing how it was trained.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from sedir_utils.core.io import StageError, read_json, read_jsonl, update_metrics, write_json, write_jsonl
from sedir_utils.core.models import load_causal_lm, load_tokenizer, resolve_model
from sedir_utils.engine.backends import release
from sedir_utils.share.cards import write_model_card
from sedir_utils.share.publish import save_iteration
from sedir_utils.share.tracking import trainer_environment, trainer_report
from sedir_utils.stages.finetune import grpo, launch
from sedir_utils.stages.finetune.launch import launch_command, train_in_worker
from sedir_utils.stages.finetune.methods import trainer_args_problems, training_dataset
from sedir_utils.stages.finetune.opsd import before_after
from sedir_utils.stages.finetune.selection import select_samples, write_training_data
from sedir_utils.stages.finetune.trl_backend import merge_adapter, train_trl
from sedir_utils.stages.probe import probe_answers

# Timings differ run to run; they stay out of the training log so the same seed gives the same file.
_TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time")


def training_layout(section) -> str | None:
    """The accelerate config several training processes use (None: one process)."""
    return section.distributed if section.num_processes > 1 else None


def select_backend(
    requested: str, *, cuda: bool | None = None, unsloth: bool | None = None, distributed: str | None = None
) -> tuple[str, str]:
    """Pick ``unsloth`` or ``trl`` (TRL + PEFT LoRA) and say why; ``requested`` is params ``finetune.backend``,
    ``distributed`` the accelerate config when several processes train (Unsloth's documented path is ddp)."""
    if distributed not in (None, "ddp") and requested == "auto":
        return "trl", f"finetune.distributed {distributed}: TRL (Unsloth's documented multi-GPU path is ddp)"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if unsloth is None:
        unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "trl":
        return "trl", "params ask for trl"
    if cuda and unsloth:
        return "unsloth", "CUDA and unsloth are both present"
    why = "no CUDA device" if not cuda else "unsloth is not installed (pip install -e '.[gpu]')"
    if requested == "unsloth":
        raise StageError(f"finetune.backend: 'unsloth' was asked for, but {why}")
    return "trl", f"unsloth skipped: {why}; using trl"


def finetune(
    base_path: str,
    rows: list[dict],
    section,
    *,
    out_dir: str | Path,
    log_path: str | Path,
    seed: int,
    where: str | None = None,
    backend: tuple[str, str] | None = None,
    callbacks: list | None = None,
    report: dict | None = None,
    rewards: dict | None = None,
) -> dict:
    """Train on ``rows`` (SFT: prompt/completion; DPO: prompt/chosen/rejected; OPSD: prompt/privileged_context;
    GRPO: prompt/question_id/question), save the merged model. ``callbacks``: transformers ``TrainerCallback``s for
    TRL's trainer (TRL backend); ``report``: TRL's tracking settings (``tracking.trainer_report``); ``rewards``:
    GRPO's reward function (``grpo.reward_spec``).

    Returns a summary: backend and why, samples, steps, first and last logged loss (no timings: the same
    params and seed give the same file; the run manifest records each stage's time). ``where``: the params
    file, for errors. ``backend``: (name, why) when already chosen (``plan``), else chosen here.
    """
    problems = trainer_args_problems(section)  # before any model loads
    if problems:
        raise StageError(f"{where + ': ' if where else ''}{problems[0]}")
    if section.method == "grpo" and rewards is None:
        raise ValueError("finetune: method grpo needs its reward (grpo.reward_spec)")
    backend, reason = backend or select_backend(section.backend, distributed=training_layout(section))
    layout = f", {section.num_processes} processes ({section.distributed})" if section.num_processes > 1 else ""
    print(f"fine-tuning: {section.method.upper()} with {backend} ({reason}){layout}")
    if section.method == "grpo":
        rows = grpo.whole_steps(rows, section)
    dataset = training_dataset(rows, section.method)
    out_dir = Path(out_dir)
    work_dir = out_dir.parent / ".trainer"
    start = time.time()
    if section.num_processes > 1:
        import torch

        target = launch.UNSLOTH_TRAINER if backend == "unsloth" else launch.TRL_TRAINER
        launcher = launch_command(section, cuda=torch.cuda.is_available())
        history, memory = train_in_worker(
            base_path, rows, section, work_dir, seed, out_dir, report, target=target, launcher=launcher
        )
        if backend == "trl":
            merge_adapter(base_path, work_dir / "adapter", out_dir)
    elif backend == "unsloth":
        history, memory = train_in_worker(base_path, rows, section, work_dir, seed, out_dir, report, rewards=rewards)
    else:
        history, memory = train_trl(
            base_path, dataset, section, work_dir, seed, out_dir, where, callbacks, report, rewards=rewards
        )
    print(f"trained in {time.time() - start:.1f} s")  # timings stay out of the files (the manifest has each stage's)
    history = [{k: v for k, v in h.items() if k not in _TIMING_KEYS} for h in history]
    write_jsonl(log_path, history)
    steps = [h for h in history if "loss" in h]
    summary = {
        "backend": backend,
        "reason": reason,
        "method": section.method,
        "samples": len(rows),
        "steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        **memory,
    }
    if section.num_processes > 1:
        summary.update(processes=section.num_processes, distributed=section.distributed)
    if section.method == "dpo" and steps:
        summary.update(first_margin=steps[0].get("rewards/margins"), last_margin=steps[-1].get("rewards/margins"))
    if section.method == "opsd" and steps:  # per-token divergence between student and teacher, as TRL logs it
        key = "sdft/distillation_loss"
        summary.update(first_divergence=steps[0].get(key), last_divergence=steps[-1].get(key))
    if section.method == "grpo":
        summary.update(reward=rewards["section"]["scorers"], **grpo.training_summary(history))
    return summary


def completion_loss(model, tokenizer, rows: list[dict], max_length: int = 1024) -> float:
    """Mean negative log-likelihood of the completions given their prompts (the SFT objective)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in rows:
        prefix = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) <= len(p_ids):
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logp = torch.log_softmax(logits[len(p_ids) - 1 : len(ids) - 1], dim=-1)
        targets = torch.tensor(ids[len(p_ids) :], device=device)
        total += -logp.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return total / max(count, 1)


def loss_before_after(
    start_path: str, model, tokenizer, rows: list[dict], dtype: str, limit: int = 16
) -> tuple[float, float]:
    """Mean completion loss on (up to ``limit`` of) the winners: under the start model, and under ``model``."""
    sample = rows[:limit]
    before = completion_loss(load_causal_lm(start_path, dtype), load_tokenizer(start_path), sample)
    return before, completion_loss(model, tokenizer, sample)


def training_rows(params, paths) -> tuple[str, list[dict], str]:
    """What this iteration trains: (start model, rows, label of the start model).

    ``start_from: latest`` (the paper): iteration k-1's model on iteration k's winners.
    ``start_from: base`` (ReST-EM-style ablation): the base model on the winners of iterations 1..k.
    """
    section = params.finetune
    base = resolve_model(params.model.name)

    def rows_of(k):
        rows = read_jsonl(getattr(paths.of(k), section.method))
        # GRPO's prompts were capped when written (the pairs' questions); the others keep the best-scored samples
        return rows if section.method == "grpo" else select_samples(rows, section.max_samples)

    if section.start_from == "base":
        rows = [row for k in range(1, paths.iteration + 1) for row in rows_of(k)]
        return base, rows, params.model.name
    return paths.policy_model(base), rows_of(paths.iteration), paths.model_label(paths.iteration - 1, params.model.name)


@dataclass
class Plan:
    """What this iteration's fine-tune will do, decided once (notebook 04 shows it, ``run`` carries it out)."""

    method: str
    backend: str
    reason: str
    start: str  # the model trained from
    start_label: str
    rows: list[dict]

    def __str__(self) -> str:
        return (
            f"{self.method.upper()} with {self.backend} ({self.reason}), from {self.start_label}, "
            f"on {len(self.rows)} samples"
        )


def plan(params, paths) -> Plan:
    """Select this iteration's training data by the arm's rule (writes ``sft.jsonl``, ``dpo.jsonl``,
    ``opsd.jsonl``, ``selection.json``: sedir_utils/stages/finetune/selection.py) and save the iteration's rows as
    datasets (``dataset/``: sedir_utils/share/publish.py), then decide the start model and the backend."""
    write_training_data(params, paths)
    save_iteration(params.to_dict(), paths)  # the iteration's rows as datasets, with a card
    start, rows, label = training_rows(params, paths)
    backend, reason = select_backend(params.finetune.backend, distributed=training_layout(params.finetune))
    return Plan(params.finetune.method, backend, reason, start, label, rows)


def collapse_watch(params, paths, start: str, info: dict) -> dict:
    """GRPO's watch after training: the audit's probe answered by the trained model (and by the start model,
    where no earlier measurement of it exists), reported as ``grpo.collapse_report``; a warning is printed and, in
    the reward arm, ``audit.on_fail: stop`` stops the stage before it is marked done."""

    def probe(model: str, label: str, iteration: int) -> dict:
        models: dict = {}  # the sampler (a vLLM engine on a GPU) and the scorers' models, released after
        try:
            rows = probe_answers(
                params,
                model,
                models,
                params.responses,
                seed=params.seed_for(iteration) + 7,  # the audit's seed: iteration k+1's audit probes with the same
                checkpoint=paths.partial("finetune") / f"probe-{label}",
                desc=f"collapse probe ({label})",
            )
        finally:
            release(models)
        return grpo.probe_accuracy(rows, params.reward.weights)

    before = grpo.earlier_probe(params, paths) or probe(start, "before", paths.iteration)
    after = probe(str(paths.model), "after", paths.iteration + 1)
    report = grpo.collapse_report(info, before, after, params.finetune.grpo.collapse_tolerance)
    update_metrics(paths.metrics, "collapse", report)
    text = grpo.collapse_text(report, paths.iteration, paths.arm, info, params.audit.probe_file, params.audit.on_fail)
    if text:
        print(text)
        if grpo.stops(params.audit.on_fail, paths.arm):
            raise StageError(f"finetune: collapse watch fired (audit.on_fail: stop): {text.splitlines()[1]}")
    else:

        def share(value):
            return "n/a" if value is None else f"{value:.3f}"

        print(
            f"collapse watch: probe accuracy {share(before['policy_accuracy'])} -> {share(after['policy_accuracy'])}, "
            f"majority pseudo-label {share(before['majority_accuracy'])} -> {share(after['majority_accuracy'])}"
        )
    return report


def run(params, paths, planned: Plan | None = None) -> dict:
    """The stage as the notebook runs it: train, save ``model/`` (with its card), ``training_log.jsonl``,
    ``finetune.json``."""
    planned = planned or plan(params, paths)
    rewards = None
    if params.finetune.method == "grpo":
        audit = read_json(paths.metrics).get("audit") if paths.metrics.is_file() else None
        section = grpo.arm_reward(paths.arm, params.reward, audit)
        rewards = grpo.reward_spec(params, paths, section)
        print(f"GRPO reward for arm {paths.arm}: {', '.join(section.scorers)}")
    with trainer_environment(params, paths):
        info = finetune(
            planned.start,
            planned.rows,
            params.finetune,
            out_dir=paths.model,
            log_path=paths.training_log,
            seed=params.seed_for(paths.iteration),
            where=params.source,
            backend=(planned.backend, planned.reason),
            report=trainer_report(params, paths),
            rewards=rewards,
        )
    info.update(base_model=planned.start_label, start_from=params.finetune.start_from)
    if params.finetune.method == "grpo" and params.finetune.grpo.collapse_probe and params.audit.enabled:
        info["collapse"] = collapse_watch(params, paths, planned.start, info)
    if params.finetune.method == "opsd":
        info["opsd_probe"] = before_after(
            planned.start, str(paths.model), planned.rows, params.finetune.opsd, params.model.dtype, params.seed
        )
    write_model_card(params.to_dict(), paths, info)  # the eval stage adds its scores
    write_json(paths.finetune_info, info)  # last: its presence marks the stage done
    paths.clear_partial("finetune")  # the collapse probe's chunks
    return info
