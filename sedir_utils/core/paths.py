"""Where a run keeps its files: ``RunPaths`` names every file and folder of an iteration and an arm."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sedir_utils.core.declarations import PAPER, trains


@dataclass(frozen=True)
class RunPaths:
    """Where iteration ``k`` of a run keeps its files: ``<run_dir>/iter_<k>/...`` for the paper's arm,
    ``<run_dir>/arms/<arm>/iter_<k>/...`` for a control arm (sedir_utils/core/declarations.py). Iteration 0, the base
    model, is every arm's: its files are the paper arm's. A control arm that shares the paper arm's samples
    (``own_samples`` false) reads the sampling stages' files from the paper arm's folder."""

    run_dir: Path
    iteration: int
    arm: str = "reward"
    own_samples: bool = False

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    @property
    def paper_arm(self) -> bool:
        return self.arm == PAPER

    @property
    def arm_dir(self) -> Path:
        """The folder of this arm's iterations."""
        return self.run_dir if self.paper_arm else self.run_dir / "arms" / self.arm

    @property
    def iter_dir(self) -> Path:
        return (self.run_dir if self.iteration == 0 else self.arm_dir) / f"iter_{self.iteration}"

    @property
    def samples_dir(self) -> Path:
        """Where the sampling stages' files (questions, responses, scores, pairs) this arm uses are."""
        return self.iter_dir if self.own_samples else self.run_dir / f"iter_{self.iteration}"

    def of(self, iteration: int) -> RunPaths:
        return dataclasses.replace(self, iteration=iteration)

    def iterations(self) -> list[int]:
        """The iterations that have a folder in this arm (0, the base model's, in the run's), in order."""
        found = [p.name[len("iter_") :] for p in self.arm_dir.glob("iter_*") if p.is_dir()]
        if not self.paper_arm and (self.run_dir / "iter_0").is_dir():
            found.append("0")
        return sorted(int(k) for k in found if k.isdigit())

    # The sampling stages' files (questions, responses, scores, pairs), in samples_dir: the control arms share
    # them unless arms.own_samples. The stage writing each is declared in sedir_utils/core/declarations.py.
    @property
    def question_stats(self) -> Path:
        return self.samples_dir / "question_filters.json"

    @property
    def questions(self) -> Path:
        return self.samples_dir / "questions.jsonl"

    @property
    def balance_samples(self) -> Path:
        return self.samples_dir / "balance_samples.jsonl"

    @property
    def balance(self) -> Path:
        return self.samples_dir / "balance.json"

    @property
    def responses(self) -> Path:
        return self.samples_dir / "responses.jsonl"

    @property
    def audit(self) -> Path:
        return self.samples_dir / "audit.jsonl"

    @property
    def rewards(self) -> Path:
        return self.samples_dir / "rewards.jsonl"

    @property
    def pair_stats(self) -> Path:
        return self.samples_dir / "pair_stats.json"

    @property
    def pairs(self) -> Path:
        return self.samples_dir / "pairs.jsonl"

    # The arm's own files of the iteration: training data and model, evaluation, metrics.
    @property
    def sft(self) -> Path:
        return self.iter_dir / "sft.jsonl"

    @property
    def dpo(self) -> Path:
        return self.iter_dir / "dpo.jsonl"

    @property
    def opsd(self) -> Path:
        return self.iter_dir / "opsd.jsonl"

    @property
    def grpo(self) -> Path:
        return self.iter_dir / "grpo.jsonl"

    @property
    def selection(self) -> Path:
        return self.iter_dir / "selection.json"

    @property
    def dataset(self) -> Path:
        """The iteration's rows as Hugging Face datasets with a card (sedir_utils/share/publish.py)."""
        return self.iter_dir / "dataset"

    @property
    def training_log(self) -> Path:
        return self.iter_dir / "training_log.jsonl"

    @property
    def finetune_info(self) -> Path:
        return self.iter_dir / "finetune.json"

    @property
    def model(self) -> Path:
        return self.iter_dir / "model"

    @property
    def eval_samples(self) -> Path:
        return self.iter_dir / "eval_samples.jsonl"

    @property
    def eval(self) -> Path:
        return self.iter_dir / "eval.json"

    @property
    def metrics(self) -> Path:
        return self.iter_dir / "metrics.json"

    @property
    def fingerprints(self) -> Path:
        return self.iter_dir / "stage_fingerprints.json"

    @property
    def notebooks(self) -> Path:
        return self.iter_dir / "notebooks"

    # The run's files.
    @property
    def summary_csv(self) -> Path:
        return self.run_dir / "summary.csv"

    @property
    def summary_plot(self) -> Path:
        return self.run_dir / "summary.png"

    @property
    def verdict_csv(self) -> Path:
        return self.run_dir / "verdict.csv"

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def tasks_dir(self) -> Path:
        return self.run_dir / "lm_eval_tasks"

    def partial(self, stage: str) -> Path:
        """Finished chunks of a stage still running (removed once its output is written)."""
        return self.iter_dir / ".partial" / stage

    def clear_partial(self, stage: str) -> None:
        import shutil

        shutil.rmtree(self.partial(stage), ignore_errors=True)

    def policy_model(self, base: str | Path) -> str:
        """The model that samples and scores in this iteration: the previous iteration's (paper: "latest")."""
        return self.model_after(self.iteration - 1, base)

    def _trained(self, iteration: int) -> bool:
        return iteration > 0 and trains(self.arm)  # an arm that does not train carries the base model

    def model_label(self, iteration: int, base_name: str) -> str:
        """A machine-independent name for ``model_after(iteration)``, for provenance."""
        if not self._trained(iteration):
            return base_name
        return self.of(iteration).model.relative_to(self.run_dir).as_posix()

    def model_after(self, iteration: int, base: str | Path) -> str:
        """The model as it stands after ``iteration`` in this arm (0 = the base model)."""
        if not self._trained(iteration):
            return str(base)
        return str(self.of(iteration).model)
