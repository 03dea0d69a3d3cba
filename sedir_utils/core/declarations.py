"""What the loop is made of, each declared once: the control arms and the stages.

**Arms**: chains of models that share the paper arm's questions and answers and differ only in which answer
each question contributes to training.

- ``reward`` (the paper): the best-scored finished answer per question (and, for DPO, the worst as rejected);
- ``random``: a finished answer drawn at random per question (seeded by the run's seed, the iteration and
  the question), so selection by the reward is replaced by chance at the same budget;
- ``worst``: the lowest-scored finished answer (DPO: worst chosen, best rejected);
- ``none``: no fine-tuning; the base model is evaluated again at every iteration (eval noise).

Every training arm trains on the same questions, those the reward arm kept (its pairs, capped at
``finetune.max_samples`` by the same ranking), so the arms differ in the answer chosen and in nothing else.
With ``arms.own_samples`` an arm instead samples its own questions and answers with its own latest model.
The selection itself is the fine-tune stage's first step (sedir_utils/stages/finetune/selection.py).

**Stages**: each with its notebook, the module that does its work (``stages.<package>.stage``, with
``run(params, paths)``), the params sections it reads, the files it reads and writes (``RunPaths`` names,
sedir_utils/core/paths.py), and what it depends on. The runner, the fingerprints, the row counts and the
manifest read these declarations. Adding a stage: docs/developers.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PAPER = "reward"
RULES = ("reward", "random", "worst", "none")
TRAINS = ("reward", "random", "worst")


def trains(arm: str) -> bool:
    return arm in TRAINS


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str  # in notebooks/
    module: str  # sedir_utils.<module>.run(params, paths) does the work: stages.<package>.stage
    # params sections it reads (part of its fingerprint), a function of the params where they choose
    params: tuple[str, ...] | Callable[[dict], tuple[str, ...]]
    # The RunPaths names of its files (sedir_utils/core/paths.py), in the order written; the last marks it done.
    writes: tuple[str, ...]
    # The files of its iteration it reads (hashed into its fingerprint); a function of the params where the
    # params choose.
    reads: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = ()
    # The model it runs: "policy" (the previous iteration's, which samples and scores) or "own" (this
    # iteration's, which the evaluation scores).
    model: str = "policy"
    # Stages it depends on, as (iteration offset or "earlier", stage name), a function of the params where
    # they choose.
    after: tuple[tuple[int, str], ...] | Callable[[dict], tuple] = ()
    rows: str | None = None  # the RunPaths name of the JSONL whose lines count as its rows
    rows_key: str | None = None  # or: the key of its last written JSON file that holds the count
    # Sampling stages, which the control arms share (run once, by the paper's arm) unless arms.own_samples.
    shared: bool = False

    @property
    def output(self) -> str:
        """The RunPaths name of the file that marks the stage done (written last)."""
        return self.writes[-1]

    def sections(self, params: dict) -> tuple[str, ...]:
        return self.params(params) if callable(self.params) else self.params

    def inputs(self, params: dict) -> tuple[str, ...]:
        return self.reads(params) if callable(self.reads) else self.reads

    def depends_on(self, params: dict, iteration: int) -> list[tuple[int, str]]:
        """(iteration, stage) pairs whose fingerprints are part of this stage's."""
        declared = self.after(params) if callable(self.after) else self.after
        out = []
        for offset, name in declared:
            if offset == "earlier":
                out += [(j, name) for j in range(1, iteration)]
            else:
                out.append((iteration + offset, name))
        return out


def _responses_params(params: dict) -> tuple:
    # Balancing samples and scores the probe before the responses: then the probe and the scorers count too
    # (off, the responses' fingerprint is what it was before balancing existed).
    return ("model", "responses") + (("balance", "reward", "audit") if params["balance"]["enabled"] else ())


def _finetune_params(params: dict) -> tuple:
    # GRPO scores its own completions with params reward during training, and probes the trained model with the
    # audit's labelled questions, sampled as the responses are (the collapse watch).
    grpo = params["finetune"]["method"] == "grpo"
    return ("model", "finetune") + (("reward", "responses", "audit") if grpo else ())


def _finetune_after(params: dict) -> tuple:
    # start_from: base trains the base model on what every iteration so far selected (their sft/dpo/opsd files).
    return ((0, "reward"),) + ((("earlier", "finetune"),) if params["finetune"]["start_from"] == "base" else ())


STAGES = (
    Stage(
        "questions",
        "01_questions.ipynb",
        "stages.questions.stage",
        params=("model", "questions"),
        writes=("question_stats", "questions"),
        rows="questions",
        shared=True,
    ),
    Stage(
        "responses",
        "02_responses.ipynb",
        "stages.responses.stage",
        params=_responses_params,
        reads=("questions",),
        after=((0, "questions"),),
        # With balance.enabled it first sweeps temperatures and thresholds on the probe
        # (sedir_utils/stages/responses/balance.py).
        writes=("balance_samples", "balance", "responses"),
        rows="responses",
        shared=True,
    ),
    Stage(
        "reward",
        "03_reward.ipynb",
        "stages.scoring.stage",
        params=("model", "responses", "reward", "audit"),  # balancing's choice: in the responses' fingerprint
        reads=("responses",),
        after=((0, "responses"),),
        writes=(
            "audit",
            "rewards",
            "pair_stats",
            "pairs",
        ),
        rows="pairs",
        shared=True,
    ),
    Stage(
        "finetune",
        "04_finetune_unsloth.ipynb",
        "stages.finetune.stage",
        params=_finetune_params,
        # It first selects the arm's training data from the scored answers, then trains
        # (sedir_utils/stages/finetune/selection.py).
        reads=("pairs", "rewards"),
        after=_finetune_after,
        writes=(
            "sft",
            "dpo",
            "opsd",
            "grpo",  # the questions GRPO trains on (stages/finetune/grpo.py)
            "selection",
            "dataset",  # the iteration's rows as Hugging Face datasets with a card (publish.py)
            "training_log",
            "finetune_info",
        ),
        rows_key="samples",
    ),
    Stage(
        "eval",
        "05_eval.ipynb",
        "stages.evaluation.stage",
        params=("model", "eval"),
        model="own",
        writes=("eval_samples", "eval"),
        rows="eval_samples",
    ),
)
BY_NAME = {s.name: s for s in STAGES}


def stages_for(iteration: int, arm: str = "reward", own_samples: bool = False) -> tuple[Stage, ...]:
    """Iteration 0 only evaluates the base model (once, for every arm); iterations 1..K run every stage in
    the paper's arm; a control arm runs the sampling stages only with ``own_samples``, and the arm that
    does not train (``none``) only evaluates."""
    evaluate = tuple(s for s in STAGES if s.model == "own")
    if iteration == 0:
        return evaluate if arm == PAPER else ()
    if not trains(arm):
        return evaluate
    return tuple(s for s in STAGES if not s.shared or arm == PAPER or own_samples)


def schedule(iteration: int, arms: list[str], own_samples: bool = False) -> list[tuple[str, Stage]]:
    """One iteration's (arm, stage) order: the paper arm's sampling stages first (the other arms share them),
    then each control arm's stages, the paper arm's own last, so that its evaluation notebook (and the
    summary it writes) sees every arm's model of the iteration."""
    paper = [s for s in stages_for(iteration, PAPER, own_samples)] if PAPER in arms else []
    order = [(PAPER, s) for s in paper if s.shared]
    for arm in arms:
        if arm != PAPER:
            order += [(arm, s) for s in stages_for(iteration, arm, own_samples)]
    return order + [(PAPER, s) for s in paper if not s.shared]


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (stages: {', '.join(BY_NAME)})") from None
