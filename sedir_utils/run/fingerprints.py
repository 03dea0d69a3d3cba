"""Stage fingerprints: a digest of everything a stage's files depend on (its params sections, seed, input
files, the stages upstream). A stage whose recorded fingerprint matches is cached; any other reruns."""

from __future__ import annotations

from pathlib import Path

from sedir_utils.core import models
from sedir_utils.core.declarations import PAPER, trains
from sedir_utils.core.declarations import stage as declaration
from sedir_utils.core.io import digest, file_sha256, read_json, write_json
from sedir_utils.core.params import EXECUTION_ONLY, INERT_AT
from sedir_utils.core.paths import RunPaths


class Fingerprints:
    """Stage fingerprints of one run, computed from the params and the files on disk."""

    def __init__(self, params, run_path: Path):
        self.params, self.run_path, self.memo = params.to_dict(), run_path, {}
        for section, keys in EXECUTION_ONLY.items():  # how the work runs is no part of what it gives
            self.params[section] = {k: v for k, v in self.params[section].items() if k not in keys}
        for section, inert in INERT_AT.items():  # one training process: no layout to speak of
            values = self.params[section]
            if all(values[k] == v for k, v in inert.items() if v is not None):
                self.params[section] = {k: v for k, v in values.items() if k not in inert}
        if self.params["finetune"]["method"] != "grpo":  # runs from before GRPO existed keep their cache
            self.params["finetune"].pop("grpo")
        self.own_samples = self.params["arms"]["own_samples"]
        # What the hardware makes of the dtype counts, not its name: `auto` is bf16 on one CPU and fp32 on another
        # (a run resumed on the other kind reruns its stages), and `bfloat16` and `auto` are one thing where both
        # are bf16. Training's autocast is decided the same way.
        device = models.pick_device()
        for section in ("model", "reward"):
            if self.params[section]["dtype"]:
                self.params[section]["dtype"] = models.dtype_decision(self.params[section]["dtype"], device)[0]
        self.params["finetune"]["autocast"] = models.training_autocast(device)[0]

    def model(self, iteration: int, arm: str = PAPER) -> str:
        """The model after ``iteration`` in ``arm``: the base model's params, or the fine-tune that made it."""
        if iteration <= 0 or not trains(arm):
            return digest({"model": self.params["model"]})
        return self.stage(iteration, "finetune", arm)

    def stage(self, iteration: int, name: str, arm: str = PAPER) -> str:
        declared = declaration(name)
        if iteration == 0 or (declared.shared and not self.own_samples):
            arm = PAPER  # the base model's eval, and the shared samples, are the paper arm's
        key = (iteration, name, arm)
        if key not in self.memo:
            paths = RunPaths(self.run_path, iteration, arm, self.own_samples)
            upstream = [self.model(iteration if declared.model == "own" else iteration - 1, arm)]
            upstream += [self.stage(k, s, arm) for k, s in declared.depends_on(self.params, iteration)]
            self.memo[key] = digest(
                {
                    "stage": name,
                    "seed": self.params["seed"],
                    "iteration": iteration,
                    "upstream": upstream,
                    "params": {section: self.params[section] for section in declared.sections(self.params)},
                    "inputs": {f: file_sha256(getattr(paths, f)) for f in declared.inputs(self.params)},
                    "param_files": self._param_files(declared.sections(self.params)),
                    # questions are decontaminated against the evaluation set: its questions are an input
                    "eval_questions": self._eval_questions() if name == "questions" else None,
                    **({} if arm == PAPER else {"arm": arm}),
                }
            )
        return self.memo[key]

    def _param_files(self, sections: tuple[str, ...]) -> dict:
        """Files the params name (eval file, probe file, an accelerate config of one's own): their content
        counts, not only their path."""
        found = {}
        for section in sections:
            for key, value in self.params[section].items():
                if (
                    isinstance(value, str)
                    and value.endswith((".csv", ".jsonl", ".json", ".yaml", ".yml"))
                    and Path(value).is_file()
                ):
                    found[f"{section}.{key}"] = file_sha256(Path(value))
        return found

    def _eval_questions(self):
        if not self.params["questions"]["decontaminate"]:
            return None
        local = self.params["eval"]["local_file"]
        return [self.params["eval"]["tasks"], file_sha256(Path(local)) if local else None]


def recorded_fingerprint(paths: RunPaths, stage: str) -> str | None:
    return (read_json(paths.fingerprints) if paths.fingerprints.is_file() else {}).get(stage)


def record_fingerprint(paths: RunPaths, stage: str, fingerprint: str) -> None:
    data = read_json(paths.fingerprints) if paths.fingerprints.is_file() else {}
    data[stage] = fingerprint
    write_json(paths.fingerprints, data)
