"""A run's evaluations read together: the accuracy table per iteration and arm, beside the paper's figures,
the paired comparisons between iterations and arms, and the verdict (did the paper's arm beat its controls)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sedir_utils.core.declarations import PAPER, RULES
from sedir_utils.core.eval_tasks import CIRCULAR, CIRCULAR_TASK, LOCAL_TASK
from sedir_utils.core.io import collect_metrics, read_json, read_jsonl, write_text
from sedir_utils.core.paths import RunPaths
from sedir_utils.core.stats import mcnemar_exact, paired_difference
from sedir_utils.share.plots import plot_scores_by_iteration

# Paper, Table 1: GPQA accuracy (%) of Qwen2.5-1.5B-Instruct after iterations 0-4.
PAPER_GPQA = {0: 16.41, 1: 28.03, 2: 30.05, 3: 32.32, 4: 34.09}


def run_arms(run_dir: str | Path) -> list[str]:
    """The arms a run has files for: the paper's, then the control arms in ``declarations.RULES`` order."""
    found = {p.name for p in (Path(run_dir) / "arms").glob("*") if p.is_dir()}
    return [PAPER] + [arm for arm in RULES if arm in found and arm != PAPER]


def collect_results(run_dir: str | Path):
    """Every arm's and iteration's ``eval.json`` under ``run_dir`` as one table, a row per arm, iteration,
    task and metric (iteration 0, the base model, starts every arm)."""
    import pandas as pd

    rows = []
    for arm in run_arms(run_dir):
        run = RunPaths(run_dir, 0, arm)
        for path in (run.of(k).eval for k in run.iterations()):
            if not path.is_file():
                continue
            report = read_json(path)
            for task, metrics in report["tasks"].items():
                for metric, m in metrics.items():
                    low, high = m["ci"]
                    letters = m.get("letters") or {}
                    rows.append(
                        {
                            "arm": arm,
                            "iteration": report["iteration"],
                            "task": task,
                            "metric": metric,
                            "value": m["value"],
                            "ci_low": low,
                            "ci_high": high,
                            "n": m["n"],
                            "no_answer_share": m["no_answer_share"],
                            "letter_distance": letters.get("distance"),
                        }
                    )
    columns = ["arm", "iteration", "task", "metric", "value", "ci_low", "ci_high", "n", "no_answer_share"]
    return pd.DataFrame(rows, columns=[*columns, "letter_distance"])


def beside_paper(table):
    """The paper arm's results as one row per iteration: the paper's Table 1 GPQA (%), then each task and
    scorer here (%) with its 95% interval."""
    import pandas as pd

    rows = {}
    for r in table[table["arm"] == "reward"].itertuples():
        column = f"{r.task} {r.metric}"
        rows.setdefault(r.iteration, {})[column] = (
            f"{100 * r.value:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
            if r.ci_low == r.ci_low
            else f"{100 * r.value:.1f}"
        )
    iterations = sorted(set(rows) | set(PAPER_GPQA))
    frame = pd.DataFrame(
        [{"paper GPQA (Table 1)": PAPER_GPQA.get(k), **rows.get(k, {})} for k in iterations],
        index=pd.Index(iterations, name="iteration"),
    )
    return frame


def compare_records(before: list[dict], after: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per task and metric, two models on the same questions (two iterations, or two arms): the accuracy
    difference (after - before) with a paired bootstrap interval over questions, McNemar's exact test on
    per-question correctness, and how many questions only one side has (left out of both)."""

    def index(records):
        return {(r["task"], r["metric"], str(r["doc_id"])): r["correct"] for r in records}

    old, new = index(before), index(after)
    out: dict[str, dict] = defaultdict(dict)
    for task, metric in sorted({k[:2] for k in old} | {k[:2] for k in new}):
        keys = sorted(k for k in old if k[:2] == (task, metric) and k in new)
        a, b = [bool(old[k]) for k in keys], [bool(new[k]) for k in keys]
        unpaired = sum(1 for k in {**old, **new} if k[:2] == (task, metric) and not (k in old and k in new))
        out[task][metric] = {**paired_difference(a, b, n_boot, seed), **mcnemar_exact(a, b), "unpaired": unpaired}
    return dict(out)


def _samples(run_dir, iteration: int, arm: str) -> list[dict]:
    return read_jsonl(RunPaths(run_dir, iteration, arm).eval_samples)


def _interval(c: dict) -> str:
    return f"{c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"


def _reading(c: dict) -> str:
    low, high = c["ci"]
    return "gain outside noise" if low > 0 else "loss outside noise" if high < 0 else "within noise"


def comparison_table(
    run_dir: str | Path,
    before: int,
    after: int,
    n_boot: int = 1000,
    seed: int = 0,
    arm_before: str = "reward",
    arm_after: str = "reward",
):
    """``compare_records`` of two models' eval samples (two iterations, or two arms) as a table, with a
    reading per row: a difference is outside noise when its paired interval excludes 0."""
    import pandas as pd

    found = compare_records(_samples(run_dir, before, arm_before), _samples(run_dir, after, arm_after), n_boot, seed)
    label = f"{after} - {before}" if arm_before == arm_after else f"{arm_after} {after} - {arm_before} {before}"
    rows = []
    for task, metrics in found.items():
        for metric, c in metrics.items():
            low, high = c["ci"]
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    label: c["difference"],
                    "95% CI": f"{low:+.3f} to {high:+.3f}",
                    "gained": c["gained"],
                    "lost": c["lost"],
                    "McNemar p": c["p"],
                    "n": c["n"],
                    "reading": _reading(c),
                }
            )
    return pd.DataFrame(rows)


def arm_comparisons(run_dir: str | Path, iteration: int, arm: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """``comparison_table`` of ``arm`` against every other arm evaluated at ``iteration`` so far (the runner
    evaluates the control arms first and the paper's arm last: ``declarations.schedule``), by the other arm's name."""
    return {
        other: comparison_table(run_dir, iteration, iteration, n_boot, seed, other, arm)
        for other in run_arms(run_dir)
        if other != arm and RunPaths(run_dir, iteration, other).eval_samples.is_file()
    }


def _share(value) -> str:
    """A figure of the verdict table; "n/a" where it is undefined (no letter shown, or none picked)."""
    return "n/a" if value is None or value != value else f"{value:.2f}"


def _verdict_reading(gain: dict, controls: dict[str, dict], against: dict[str, dict]) -> str:
    """One line for one task and metric at one iteration: the paper arm's gain against iteration 0, read
    beside the control arms' own gains and the paper arm's difference from each."""
    low, high = gain["ci"]
    if high < 0:
        return "loss outside noise"
    if low <= 0:
        return "gain within noise"
    also = [arm for arm, c in controls.items() if arm != "none" and c["ci"][0] > 0]
    if also:
        return f"gain also in the {' and '.join(also)} arm: selection not shown to matter"
    tied = [arm for arm, c in against.items() if arm != "none" and c["ci"][0] <= 0]
    if tied:
        return f"gain outside noise, but not above the {' and '.join(tied)} arm: selection not shown to matter"
    return "gain outside noise, and above every control arm" if against else "gain outside noise (no control arm)"


def verdict(run_dir: str | Path, n_boot: int = 1000, seed: int = 0, table=None):
    """Per iteration, task and metric: the paper arm's gain over the base model (paired 95% interval), each
    control arm's, the paper arm minus each control arm at that iteration, the format share (answers in
    the required format) and the letter-bias distance at iteration 0 and now, and a one-line reading.

    ``table``: ``collect_results(run_dir)`` where the caller already has it (read here otherwise)."""
    import pandas as pd

    arms = run_arms(run_dir)
    base = _samples(run_dir, 0, "reward") if RunPaths(run_dir, 0).eval_samples.is_file() else []
    table = collect_results(run_dir) if table is None else table
    summary = table.set_index(["arm", "iteration", "task", "metric"])
    rows = []
    for k in RunPaths(run_dir, 0).iterations():
        if k == 0 or not RunPaths(run_dir, k).eval_samples.is_file():
            continue
        paper = _samples(run_dir, k, "reward")
        gains = {
            arm: compare_records(base, paper if arm == "reward" else _samples(run_dir, k, arm), n_boot, seed)
            for arm in arms
            if RunPaths(run_dir, k, arm).eval_samples.is_file()
        }
        against = {
            arm: compare_records(_samples(run_dir, k, arm), paper, n_boot, seed) for arm in gains if arm != "reward"
        }
        for task, metrics in gains["reward"].items():
            for metric, gain in metrics.items():
                if not {("reward", k, task, metric), ("reward", 0, task, metric)} <= set(summary.index):
                    continue  # one of the two did not measure it (eval.tasks changed in between): nothing to compare
                now, then = summary.loc[("reward", k, task, metric)], summary.loc[("reward", 0, task, metric)]
                controls = {arm: gains[arm][task][metric] for arm in gains if arm != "reward" and task in gains[arm]}
                versus = {arm: against[arm][task][metric] for arm in against if task in against[arm]}
                row = {"iteration": k, "task": task, "metric": metric}
                row.update({f"gain ({arm})": _interval(c) for arm, c in {"reward": gain, **controls}.items()})
                row.update({f"reward - {arm}": _interval(c) for arm, c in versus.items()})
                row["format share"] = f"{1 - then.no_answer_share:.2f} -> {1 - now.no_answer_share:.2f}"
                row["letter bias (TV)"] = f"{_share(then.letter_distance)} -> {_share(now.letter_distance)}"
                row["reading"] = _verdict_reading(gain, controls, versus)
                if (task, metric) == (LOCAL_TASK, "acc") and gain["ci"][0] > 0:
                    circular = gains["reward"].get(CIRCULAR_TASK, {}).get(CIRCULAR)
                    if circular is not None and circular["ci"][0] <= 0:
                        row["reading"] += "; gain in letter accuracy only, not in circular"
                rows.append(row)
    return pd.DataFrame(rows)


def changed_answers(run_dir: str | Path, before: int, after: int, limit: int = 5, arm: str = "reward") -> list[dict]:
    """Questions whose extracted answer changed between two iterations of ``arm`` (generative metrics first)."""

    def load(k):
        return {(r["task"], r["metric"], r["doc_id"]): r for r in _samples(run_dir, k, arm)}

    old, new = load(before), load(after)
    keys = sorted(
        (k for k in new if k in old and old[k]["extracted"] != new[k]["extracted"]), key=lambda k: ("[" not in k[1], k)
    )
    return [
        {
            "task": k[0],
            "metric": k[1],
            "question": new[k]["question"],
            "target": new[k]["target"],
            "before": old[k]["extracted"],
            "after": new[k]["extracted"],
            "response_after": new[k]["response"],
        }
        for k in keys[:limit]
    ]


def read_verdict(run_dir: str | Path):
    """The run's ``verdict.csv`` as ``write_summary`` wrote it (empty when there is none yet)."""
    import pandas as pd

    path = RunPaths(run_dir, 0).verdict_csv
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def write_summary(run_dir: str | Path, n_boot: int = 1000, seed: int = 0):
    """Write ``summary.csv`` (every arm, iteration, task and metric), ``summary.png`` (the arms side by side
    by task, the paper's Table 1 beside them, the audit, the letter bias) and ``verdict.csv`` (``verdict``)."""
    run = RunPaths(run_dir, 0)
    table = collect_results(run_dir)
    write_text(run.summary_csv, table.to_csv(index=False))
    write_text(run.verdict_csv, verdict(run_dir, n_boot, seed, table).to_csv(index=False))
    fig = plot_scores_by_iteration(table, PAPER_GPQA, collect_metrics(run_dir, "audit"))
    fig.savefig(run.summary_plot, dpi=120, bbox_inches="tight")
    return table, fig
