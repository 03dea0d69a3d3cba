"""The run report: one self-contained HTML page per run (``<run_dir>/report.html``) that a researcher can send.

It holds the summary plot, the verdict, the scores beside the paper's, question diversity and reward
monitoring by iteration, sample questions with their best and worst answers per iteration, and the manifest
(versions, device, each stage's time, the params). Images are inlined (PNG as data URIs): the page is one file.
The runner writes it after the summary; ``sedir report RUN_DIR`` writes it again for any run folder.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import yaml

from sedir_utils.core.io import collect_metrics, read_json, read_jsonl, write_text
from sedir_utils.core.paths import RunPaths
from sedir_utils.share.plots import plot_balance, plot_grpo_runs, plot_question_diversity, plot_reward_monitor
from sedir_utils.share.summary import beside_paper, collect_results, read_verdict

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } img { max-width: 100%; }
.qa { border-left: 3px solid #9ab; padding: 0.2em 0.8em; margin: 0.8em 0; white-space: pre-wrap; }
.muted { color: #666; } .wide { overflow-x: auto; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
"""


def _png(fig) -> str:
    """A matplotlib figure as an inline <img> (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _img(buffer.getvalue(), "figure")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(frame, index: bool = False) -> str:
    if frame is None or frame.empty:
        return '<p class="muted">none yet</p>'
    table = frame.to_html(index=index, border=0, float_format=lambda v: f"{v:.3f}", na_rep="")
    return f'<div class="wide">{table}</div>'  # a table wider than the page scrolls, the page does not


def _text(value) -> str:
    if isinstance(value, list):  # chat messages
        value = "\n".join(m.get("content", "") for m in value if isinstance(m, dict))
    return html.escape(str(value))


def sample_pairs(run_dir: str | Path, iteration: int, limit: int = 3) -> list[dict]:
    """The first ``limit`` pairs of an iteration (question, best answer and score, worst answer and score)."""
    paths = RunPaths(run_dir, iteration)
    return read_jsonl(paths.pairs)[:limit] if paths.pairs.is_file() else []


def _samples_section(run_dir: Path) -> str:
    parts = []
    for k in [k for k in RunPaths(run_dir, 0).iterations() if k > 0]:
        pairs = sample_pairs(run_dir, k)
        if not pairs:
            continue
        parts.append(f"<h3>Iteration {k}</h3>")
        for p in pairs:
            parts.append(
                f'<div class="qa"><b>Question</b> ({html.escape(p["question_id"])}): {_text(p["prompt"])}\n\n'
                f"<b>Best answer</b> (score {p['chosen_score']:.3f}): {_text(p['chosen'])}\n\n"
                f"<b>Worst answer</b> (score {p['rejected_score']:.3f}): {_text(p['rejected'])}</div>"
            )
    return "".join(parts) or '<p class="muted">no iteration has sampled yet</p>'


def _stages_table(manifest: dict):
    import pandas as pd

    columns = ["iteration", "arm", "stage", "status", "seconds", "rows"]
    return pd.DataFrame(manifest.get("stages", []), columns=columns)


def grpo_rows(run_dir: Path) -> list[dict]:
    """Per arm and iteration of a GRPO run (``finetune.json``): the reward it trained on, the self-reward over the
    first and last quarter of its steps, the dead groups, the last KL, and the collapse watch's probe."""
    manifest = RunPaths(run_dir, 0).manifest
    params = (read_json(manifest).get("params") or {}) if manifest.is_file() else {}
    rows = []
    for arm in params.get("arms", {}).get("names", []):
        paths = RunPaths(run_dir, 0, arm, params["arms"]["own_samples"])
        for k in paths.iterations():
            info_path = paths.of(k).finetune_info
            info = read_json(info_path) if k > 0 and info_path.is_file() else {}
            if info.get("method") != "grpo":
                continue
            watch = info.get("collapse") or {}
            rows.append(
                {
                    "iteration": k,
                    "arm": arm,
                    "reward": ", ".join(info.get("reward") or []),
                    "steps": info.get("steps"),
                    "self-reward first": info.get("reward_first"),
                    "self-reward last": info.get("reward_last"),
                    "dead groups": info.get("dead_group_share"),
                    "kl last": info.get("kl_last"),
                    "probe before": (watch.get("before") or {}).get("policy_accuracy"),
                    "probe after": (watch.get("after") or {}).get("policy_accuracy"),
                    "collapse warning": watch.get("warning"),
                }
            )
    return rows


def _grpo_section(run_dir: Path) -> str:
    import pandas as pd

    rows = grpo_rows(run_dir)
    if not rows:
        return ""
    logs = {}
    for row in rows:  # the training log is the arm's own file (own_samples moves only the sampling stages')
        paths = RunPaths(run_dir, row["iteration"], row["arm"])
        if paths.training_log.is_file():
            logs[(row["arm"], row["iteration"])] = read_jsonl(paths.training_log)
    figure = _png(plot_grpo_runs(logs)) if logs else ""
    return (
        "<h2>GRPO: self-reward, dead groups and the collapse watch</h2>"
        '<p class="muted">Per step, TRL\'s logged reward and the share of groups whose answers all scored the same;'
        " per fine-tune, the audit probe's accuracy before and after (TTRL's rise-then-fall).</p>"
        f"{figure}{_table(pd.DataFrame(rows))}"
    )


def _figures(run_dir: Path) -> list[tuple[str, str]]:
    """(heading, <img>) for each plot by iteration the run has data for."""
    found = []
    questions = collect_metrics(run_dir, "questions")
    if questions:
        found.append(("Question diversity by iteration", _png(plot_question_diversity(questions))))
    reward = [(k, m) for k, m in collect_metrics(run_dir, "reward") if "reward" in m]
    if reward:
        found.append(("Reward monitoring by iteration", _png(plot_reward_monitor(reward))))
    balance = collect_metrics(run_dir, "balance")
    if balance:
        found.append(("B-STaR balancing by iteration", _png(plot_balance(balance))))
    return found


def render(run_dir: str | Path) -> str:
    """The report's HTML, from the run's files."""
    run_dir = Path(run_dir)
    run = RunPaths(run_dir, 0)
    manifest = read_json(run.manifest) if run.manifest.is_file() else {}
    params = manifest.get("params") or {}
    name = params.get("run_name", run_dir.name)
    device = manifest.get("device") or {}
    model = params.get("model", {}).get("name", "?")
    head = (
        f"model <b>{html.escape(str(model))}</b> | commit {html.escape(str(manifest.get('git_commit')))} | "
        f"device {html.escape(str(device.get('name', '?')))} ({html.escape(str(device.get('kind', '?')))})"
    )
    summary = _img(run.summary_plot.read_bytes(), "summary") if run.summary_plot.is_file() else ""
    figures = "".join(f"<h2>{html.escape(t)}</h2>{img}" for t, img in _figures(run_dir))
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SeDiR run {html.escape(name)}</title>
<style>{STYLE}</style></head><body>
<h1>SeDiR run {html.escape(name)}</h1>
<p class="muted">{head}</p>
<h2>GPQA by iteration, beside the paper</h2>
{summary}
{_table(beside_paper(collect_results(run_dir)), index=True)}
<h2>The verdict</h2>
<p class="muted">The paper arm's gain over the base model beside the control arms, each with its 95% interval.</p>
{_table(read_verdict(run_dir))}
{figures}
{_grpo_section(run_dir)}
<h2>Sample questions and answers</h2>
<p class="muted">The first pairs of each iteration: the question the model wrote, its best- and worst-scored
answers.</p>
{_samples_section(run_dir)}
<h2>Manifest</h2>
<p class="muted">{html.escape(versions)}</p>
{_table(_stages_table(manifest))}
<details><summary>params</summary><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre></details>
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html``; returns its path."""
    path = Path(run_dir) / "report.html"
    write_text(path, render(run_dir))
    return path
