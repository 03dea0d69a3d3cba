"""Datasets: what each iteration made, as Hugging Face datasets with a card, and a whole run gathered to share.

The finetune stage saves ``iter_<k>/dataset/``: a ``DatasetDict`` (Arrow on disk, read with ``load_from_disk``)
of the iteration's questions, responses with their rewards, pairs and the sft/dpo/opsd training sets (a control
arm's folder holds its own training sets only: it shares the paper arm's samples), with a dataset card.

``sedir export RUN_DIR`` gathers every iteration and arm into one ``DatasetDict`` whose rows carry ``iteration``
and ``arm``, with a card, saved to a folder (``--to``) or pushed to the hub (``--push-to-hub``). On the hub each
split becomes a config and each iteration a split of it: the hub wants one schema per config.

Evaluation samples are never included (GPQA asks that its questions not be published).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from sedir_utils.core.config import load_params
from sedir_utils.core.io import DataError, atomic_dir, read_jsonl
from sedir_utils.core.paths import RunPaths
from sedir_utils.share.cards import dataset_card, iteration_facts

# split -> the RunPaths file it is read from (responses: the reward stage's rows, i.e. answers with their scores)
SPLITS = {
    "questions": "questions",
    "responses": "rewards",
    "pairs": "pairs",
    "sft": "sft",
    "dpo": "dpo",
    "opsd": "opsd",
    "grpo": "grpo",
}
SHARED = ("questions", "responses", "pairs")  # the sampling stages' files: the paper arm's, unless own_samples


@contextlib.contextmanager
def _quiet():
    """datasets' "Saving the dataset" bars say nothing the card does not."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def to_dataset(rows: list[dict]):
    """A ``Dataset`` of ``rows`` whose fingerprint follows from its content (datasets draws a random one for
    in-memory data; saved, it would make two identical runs' files differ)."""
    from datasets import Dataset

    table = Dataset.from_list(rows)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return Dataset(table.data, info=table.info, fingerprint=digest)


def iteration_rows(paths: RunPaths) -> dict[str, list[dict]]:
    """The iteration's rows by split (the shared splits only where this arm's folder holds them)."""
    own = paths.paper_arm or paths.own_samples
    found = {}
    for split, attr in SPLITS.items():
        path = getattr(paths, attr)
        if (split in SHARED and not own) or not path.is_file():
            continue
        found[split] = read_jsonl(path)
    return found


def _save(rows_by_split: dict[str, list[dict]], card, folder: Path) -> Path:
    """Save the non-empty splits and the card atomically (an empty split cannot be loaded back: the card
    counts it as 0 rows)."""
    from datasets import DatasetDict

    data = DatasetDict({split: to_dataset(rows) for split, rows in rows_by_split.items() if rows})
    with atomic_dir(folder) as tmp, _quiet():
        data.save_to_disk(str(tmp))
        card.save(tmp / "README.md")
    return folder


def save_iteration(params: dict, paths: RunPaths) -> Path:
    """Write ``<iteration>/dataset/`` (the iteration's splits and their card); ``params``: the resolved dict."""
    where = f"iteration {paths.iteration}" + ("" if paths.paper_arm else f", arm {paths.arm}")
    rows = iteration_rows(paths)
    card = dataset_card(
        params,
        [iteration_facts(params, paths, {split: len(r) for split, r in rows.items()})],
        title=f"SeDiR {params['run_name']}: {where}",
        note="What one iteration of the SeDiR loop made, as the suite wrote it (one split per file).",
    )
    return _save(rows, card, paths.dataset)


def run_params(run_dir: Path) -> dict:
    """The resolved params a runner run recorded (``params.yaml``). Checked as any params file but for the backend and
    scorer registries (sedir_utils/run/params.py): the run checked them when it ran, and export needs neither."""
    path = Path(run_dir) / "params.yaml"
    if not path.is_file():
        raise DataError(f"{path}: not found (a run made by `sedir --params ...` records its params there)")
    return load_params(path, checks=()).to_dict()


def gather(run_dir: str | Path) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Every iteration's and arm's rows by split (each row with ``iteration`` and ``arm``), the card's facts
    per iteration and arm, and the run's params."""
    run_dir = Path(run_dir)
    params = run_params(run_dir)
    own = params["arms"]["own_samples"]
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    facts = []
    for arm in params["arms"]["names"]:
        paths = RunPaths(run_dir, 0, arm, own)
        for k in [k for k in paths.iterations() if k > 0]:
            found = iteration_rows(paths.of(k))
            if not found:
                continue
            facts.append(iteration_facts(params, paths.of(k), {split: len(r) for split, r in found.items()}))
            for split, split_rows in found.items():
                rows[split] += [{**r, "iteration": k, "arm": arm} for r in split_rows]
    if not facts:
        raise DataError(f"{run_dir}: no iteration with samples yet (iteration 0 only evaluates the base model)")
    return rows, facts, params


def export(run_dir: str | Path, to: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Save the whole run as one ``DatasetDict`` with its card; returns (folder, rows per split)."""
    rows, facts, params = gather(run_dir)
    folder = Path(to) if to else Path(run_dir) / "export"
    card = dataset_card(params, facts, title=f"SeDiR {params['run_name']}", note=_export_note(rows))
    _save(rows, card, folder)
    return folder, {split: len(r) for split, r in rows.items() if r}


def _export_note(rows: dict[str, list[dict]]) -> str:
    counts = ", ".join(f"{split} {len(r)}" for split, r in rows.items() if r)
    return (
        f"Every iteration and arm of one SeDiR run, one split per kind of row ({counts}); each row records its "
        "`iteration` and `arm` besides its own provenance."
    )


def hub_configs(rows: dict[str, list[dict]]) -> dict:
    """What ``push`` uploads: split -> a ``DatasetDict`` of that split's rows by iteration (``iter_<k>``)."""
    from datasets import DatasetDict

    configs = {}
    for split, split_rows in rows.items():
        by_iteration: dict[int, list[dict]] = {}
        for r in split_rows:
            by_iteration.setdefault(r["iteration"], []).append(r)
        if by_iteration:
            configs[split] = DatasetDict({f"iter_{k}": to_dataset(v) for k, v in sorted(by_iteration.items())})
    return configs


def push(run_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Push the run to the hub as dataset ``repo_id``: the card first, then each split as a config (datasets
    merges its config list into the card's header). Private unless told otherwise; returns the repo's URL."""
    from huggingface_hub import HfApi

    rows, facts, params = gather(run_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    card = dataset_card(params, facts, title=f"SeDiR {params['run_name']}", note=_export_note(rows))
    card.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="SeDiR run: dataset card")
    for split, data in hub_configs(rows).items():
        data.push_to_hub(repo_id, config_name=split, private=private, token=token, commit_message=f"SeDiR: {split}")
    return str(url)
