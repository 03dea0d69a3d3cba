"""The figures the notebooks show: reward histograms, training loss, scores across iterations."""

from __future__ import annotations

import math


def _figure(width=6.0, height=3.5, ncols=1):
    import matplotlib.pyplot as plt  # headless, matplotlib picks Agg by itself

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)


def plot_reward_histogram(rewards: list[float], pairs: list[dict], scorer: str):
    """Left: every response's reward. Right: chosen vs rejected scores of the pairs kept."""
    fig, axes = _figure(ncols=2)
    finite = [r for r in rewards if r is not None and not math.isnan(r)]
    ax = axes[0][0]
    ax.hist(finite, bins=20, color="tab:blue")
    ax.set(title=f"rewards of all responses ({scorer})", xlabel="reward", ylabel="responses")
    ax = axes[0][1]
    if pairs:
        import numpy as np

        chosen, rejected = [p["chosen_score"] for p in pairs], [p["rejected_score"] for p in pairs]
        bins = np.histogram_bin_edges(chosen + rejected, bins=20)  # shared bins, so the two compare
        ax.hist(chosen, bins=bins, alpha=0.6, label="chosen", color="tab:green")
        ax.hist(rejected, bins=bins, alpha=0.6, label="rejected", color="tab:red")
        ax.legend()
    ax.set(title=f"{len(pairs)} preference pairs", xlabel="reward", ylabel="pairs")
    fig.tight_layout()
    return fig


def plot_scores_per_scorer(rows: list[dict]):
    """One histogram per scorer (the raw scores before combining)."""
    names = list(rows[0]["scores"]) if rows else []
    fig, axes = _figure(width=4, ncols=max(len(names), 1))
    for ax, name in zip(axes[0], names):
        values = [r["scores"][name] for r in rows if r["scores"][name] is not None]
        ax.hist(values, bins=20, color="tab:purple")
        ax.set(title=name, xlabel="score", ylabel="responses")
    fig.tight_layout()
    return fig


def plot_reward_monitor(history: list[tuple[int, dict]]):
    """The reward stage across iterations: reward mean and spread, tie share, margins."""
    fig, axes = _figure(width=4.2, ncols=3)
    its = [k for k, _ in history]
    reward = [m["reward"] for _, m in history]
    nan = float("nan")

    def val(d, key):
        return nan if d.get(key) is None else d[key]

    ax = axes[0][0]
    ax.errorbar(
        its,
        [val(r, "mean") for r in reward],
        yerr=[val(r, "std") for r in reward],
        marker="o",
        capsize=3,
        label="mean ± std",
    )
    ax.plot(its, [val(r, "within_question_spread") for r in reward], marker="s", label="within-question spread")
    ax.set(title="reward", xlabel="iteration")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(its, [val(r, "tie_share") for r in reward], marker="o", color="tab:red")
    ax.set(title="tie share (questions without a pair)", xlabel="iteration", ylim=(0, 1))
    ax = axes[0][2]
    ax.plot(its, [val(r, "margin_median") for r in reward], marker="o", label="median")
    ax.fill_between(
        its, [val(r, "margin_p10") for r in reward], [val(r, "margin_p90") for r in reward], alpha=0.3, label="10-90%"
    )
    ax.set(title="pair margin (chosen - rejected)", xlabel="iteration")
    ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def plot_training_log(history: list[dict]):
    """Training loss and learning rate by step; for DPO also the chosen-minus-rejected reward margin, for OPSD
    the per-token divergence between the student and the teacher on the student's own answers; for GRPO the
    collapse watch's curves (``plot_grpo_log``)."""
    steps = [h for h in history if "loss" in h]
    if any("frac_reward_zero_std" in h for h in steps):
        return plot_grpo_log(history)
    dpo = any("rewards/margins" in h for h in steps)
    opsd = any("sdft/distillation_loss" in h for h in steps)
    fig, axes = _figure(width=4.5, ncols=3 if dpo or opsd else 2)
    x = [h["step"] for h in steps]
    axes[0][0].plot(x, [h["loss"] for h in steps], marker="o")
    axes[0][0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[0][1].plot(x, [h.get("learning_rate") for h in steps], color="tab:orange")
    axes[0][1].set(title="learning rate", xlabel="step")
    if dpo:
        axes[0][2].plot(x, [h.get("rewards/margins") for h in steps], marker="o", color="tab:green")
        axes[0][2].set(title="DPO reward margin (chosen - rejected)", xlabel="step")
    if opsd:
        axes[0][2].plot(x, [h.get("sdft/distillation_loss") for h in steps], marker="o", color="tab:purple")
        axes[0][2].set(title="OPSD: divergence to the teacher, per token", xlabel="step")
    fig.tight_layout()
    return fig


def plot_grpo_log(history: list[dict]):
    """GRPO by step, as TRL logs it: the self-reward (mean, and its spread within groups), the share of groups
    whose completions all scored the same (dead: nothing to learn), the KL to the start model (with
    finetune.beta above 0), and the completions' mean length with the share cut at max_completion_length."""
    steps = [h for h in history if h.get("reward") is not None]  # TRL logs None for a step with no scorable answer
    x = [h["step"] for h in steps]
    fig, axes = _figure(width=3.6, ncols=4)
    ax = axes[0][0]
    mean = [h["reward"] for h in steps]
    spread = [h.get("reward_std") or 0.0 for h in steps]
    ax.plot(x, mean, marker="o", label="reward (TRL's, combined)")
    ax.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], alpha=0.25)
    if any("self_reward" in h for h in steps) and any("scores/" in k for h in steps for k in h):
        # several scorers: the combined reward is centred or ranked; the scorers' own units show the trend
        ax.plot(x, [h.get("self_reward") for h in steps], marker="s", color="tab:orange", label="self-reward (scorers)")
        ax.legend(fontsize=7)
    ax.set(title="self-reward (mean +- std)", xlabel="step")
    ax = axes[0][1]
    ax.plot(x, [h.get("frac_reward_zero_std") for h in steps], marker="o", color="tab:red")
    ax.set(title="dead groups (no reward spread)", xlabel="step", ylim=(-0.05, 1.05))
    ax = axes[0][2]
    if any("kl" in h for h in steps):
        ax.plot(x, [h.get("kl") for h in steps], marker="o", color="tab:purple")
        ax.set(title="KL to the start model", xlabel="step")
    else:
        ax.set(title="KL: not logged (finetune.beta 0)", xlabel="step")
    ax = axes[0][3]
    ax.plot(x, [h.get("completions/mean_length") for h in steps], marker="o", color="tab:green", label="mean length")
    ax.set(title="completion length (tokens)", xlabel="step")
    clipped = ax.twinx()
    clipped.plot(x, [h.get("completions/clipped_ratio") for h in steps], ls="--", color="tab:gray", label="cut off")
    clipped.set(ylim=(-0.05, 1.05), ylabel="share cut at max_completion_length")
    fig.tight_layout()
    return fig


def plot_grpo_runs(logs: dict[tuple[str, int], list[dict]]):
    """GRPO across a run: the self-reward and the share of dead groups by step, every iteration's steps one after
    the other, one line style per arm (``logs``: (arm, iteration) -> its training log)."""
    fig, axes = _figure(width=5.0, ncols=2)
    for arm in dict.fromkeys(arm for arm, _ in logs):
        offset, xs, reward, dead = 0, [], [], []
        for (a, _), history in sorted(logs.items(), key=lambda item: item[0][1]):
            if a != arm:
                continue
            steps = [h for h in history if h.get("reward") is not None]
            xs += [offset + h["step"] for h in steps]
            reward += [h.get("self_reward", h["reward"]) for h in steps]
            dead += [h.get("frac_reward_zero_std") for h in steps]
            offset += len(steps)
        style = ARM_STYLES.get(arm, "-")
        axes[0][0].plot(xs, reward, ls=style, marker="o", ms=3, label=arm)
        axes[0][1].plot(xs, dead, ls=style, marker="o", ms=3, label=arm)
    axes[0][0].set(title="self-reward by step (iterations in turn)", xlabel="step")
    axes[0][1].set(title="dead groups (no reward spread)", xlabel="step", ylim=(-0.05, 1.05))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


ARM_STYLES = {"reward": "-", "random": "--", "worst": ":", "none": "-."}  # line style per arm


def _by_arm(ax, frame, column: str, color: str, label: str, lower=None, upper=None):
    """One line per arm (its line style), the arms nudged apart on the x axis so their intervals show."""
    for j, (arm, group) in enumerate(frame.groupby("arm", sort=False)):
        group = group.sort_values("iteration")
        x = group["iteration"] + 0.05 * j
        err = None
        if lower is not None:
            err = [
                (group[column] - group[lower]).fillna(0).clip(lower=0),
                (group[upper] - group[column]).fillna(0).clip(lower=0),
            ]
        ax.errorbar(
            x,
            group[column],
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            color=color,
            ls=ARM_STYLES.get(arm, "-"),
            label=f"{label} ({arm})",
        )


def plot_scores_by_iteration(table, paper: dict[int, float] | None = None, audit: list[tuple[int, dict]] | None = None):
    """One panel per task: every metric by iteration, one line per arm (reward solid, random dashed, worst
    dotted, none dash-dot), the paper's GPQA figures (Table 1) as a black dashed reference.

    A panel of the letter bias (total variation distance between the letters picked and the gold letters)
    follows where any metric has one; with ``audit`` (iteration, metrics["audit"]) a last panel shows each
    scorer's AUROC against correctness on the probe set, so gains can be read beside whether the reward
    meant anything.
    """
    import matplotlib.pyplot as plt

    tasks = sorted(table["task"].unique())
    letters = table.dropna(subset=["letter_distance"]) if "letter_distance" in table else table.iloc[:0]
    panels = max(len(tasks), 1) + (not letters.empty) + bool(audit)
    ncols = min(panels, 3)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax, task in zip(flat, tasks or ["no results yet"]):
        sub = table[table["task"] == task]
        for i, metric in enumerate(sorted(sub["metric"].unique())):
            _by_arm(ax, sub[sub["metric"] == metric], "value", f"C{i}", metric, "ci_low", "ci_high")
        if paper:
            its = sorted(paper)
            ax.plot(its, [paper[i] / 100 for i in its], "k--", marker="x", label="paper: Qwen2.5-1.5B, GPQA")
        ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (4 options)")
        ax.set(xlabel="iteration", ylabel="accuracy (95% CI)", ylim=(0, 1), title=task)
        ax.legend(fontsize=7, loc="upper left")
    used = max(len(tasks), 1)
    if not letters.empty:
        ax = flat[used]
        used += 1
        for i, ((task, metric), group) in enumerate(letters.groupby(["task", "metric"], sort=True)):
            _by_arm(ax, group, "letter_distance", f"C{i}", f"{task} {metric}")
        ax.set(
            xlabel="iteration",
            ylabel="total variation distance",
            ylim=(0, 1),
            title="letter bias: letters picked vs gold letters",
        )
        ax.legend(fontsize=7)
    if audit:
        ax = flat[used]
        used += 1
        its = [k for k, _ in audit]
        for name in sorted({n for _, a in audit for n in a["scorers"]}):
            reports = [a["scorers"].get(name, {}) for _, a in audit]
            mid = [r.get("auroc") if r.get("auroc") is not None else float("nan") for r in reports]
            ci = [r.get("auroc_ci") or [float("nan")] * 2 for r in reports]
            err = [
                [m - (c[0] if c[0] is not None else m) for m, c in zip(mid, ci)],
                [(c[1] if c[1] is not None else m) - m for m, c in zip(mid, ci)],
            ]
            ax.errorbar(its, mid, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
        ax.set(xlabel="iteration", ylabel="AUROC (95% CI)", ylim=(0, 1), title="reward audit: scorer vs correctness")
        ax.legend(fontsize=8)
    for ax in flat[:used]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in flat[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_letter_distribution(report_by_iteration: list[tuple[int, dict]]):
    """The letters a model picked at each iteration (stacked), beside the gold letters' shares: a panel for
    every task and scorer of the ``eval.json`` reports (``(iteration, report)``) that records letters."""
    panels = sorted(
        {
            (t, m)
            for _, r in report_by_iteration
            for t, ms in r["tasks"].items()
            for m, v in ms.items()
            if v.get("letters")
        }
    )
    if not panels:
        return None
    fig, axes = _figure(width=5.5, height=3.5, ncols=len(panels))
    for ax, (task, metric) in zip(axes[0], panels):
        rows = [(k, r["tasks"].get(task, {}).get(metric, {}).get("letters")) for k, r in report_by_iteration]
        rows = [(k, m) for k, m in rows if m]
        labels = [f"iter {k}" for k, _ in rows] + ["gold"]
        bottom = [0.0] * len(labels)
        for i, letter in enumerate("ABCD"):
            shares = [m["picks"][letter] / max(sum(m["picks"].values()), 1) for _, m in rows]
            shares.append(rows[-1][1]["gold"][letter] / max(sum(rows[-1][1]["gold"].values()), 1))
            ax.bar(labels, shares, bottom=bottom, color=f"C{i}", label=letter)
            bottom = [b + v for b, v in zip(bottom, shares)]
        ax.set(ylabel="share of picks", ylim=(0, 1), title=f"letters picked: {task}\n{metric}")
        ax.legend(fontsize=8, ncols=4, loc="lower right")
    fig.tight_layout()
    return fig


def plot_question_diversity(history: list[tuple[int, dict]], coords=None, labels: list[int] | None = None):
    """Left: diversity figures by iteration. Right (given ``coords``): the questions on a 2-D map, coloured by
    iteration."""
    fig, axes = _figure(ncols=1 if coords is None else 2)
    ax = axes[0][0]
    iterations = [k for k, _ in history]
    for key in ("distinct_1", "distinct_2", "mean_pairwise_distance", "duplicate_rate"):
        values = [m.get(key) for _, m in history]
        if any(v is not None for v in values):
            ax.plot(iterations, [float("nan") if v is None else v for v in values], marker="o", label=key)
    ax.set(title="question diversity by iteration", xlabel="iteration", ylim=(0, 1.05))
    ax.set_xticks(iterations)
    ax.legend(fontsize=8)
    if coords is None:
        fig.tight_layout()
        return fig
    ax = axes[0][1]
    if len(coords):
        for k in sorted(set(labels)):
            points = [c for c, label in zip(coords, labels) if label == k]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.7, label=f"iteration {k}")
        ax.legend(fontsize=8)
    ax.set(title="questions, first two principal components of their embeddings", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def plot_balance(history: list[tuple[int, dict]]):
    """B-STaR's balancing (``metrics.json`` "balance" by iteration): left, the chosen temperature and its
    balance score by iteration; right, the latest iteration's sweep (balance score by temperature, a line per
    reward-threshold quantile)."""
    fig, axes = _figure(width=5.0, ncols=2)
    ax = axes[0][0]
    iterations = [k for k, _ in history]
    ax.plot(iterations, [b["temperature"] for _, b in history], marker="o", label="chosen temperature")
    ax.plot(iterations, [b["balance"] for _, b in history], marker="s", label="balance score")
    ax.set(title="balancing by iteration", xlabel="iteration")
    ax.set_xticks(iterations)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    if history:
        k, latest = history[-1]
        for q in dict.fromkeys(r["quantile"] for r in latest["table"]):
            rows = [r for r in latest["table"] if r["quantile"] == q]
            label = "no threshold" if q == 0 else f"threshold: score quantile {q:g}"
            ax.plot([r["temperature"] for r in rows], [r["balance"] for r in rows], marker="o", label=label)
        ax.axvline(latest["temperature"], color="grey", ls="--")
        ax.set(title=f"iteration {k}: the sweep", xlabel="sampling temperature", ylabel="balance score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
