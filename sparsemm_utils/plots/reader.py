"""Figures of notebook 00 (the tiny reader): sample questions, training curves, accuracy per task.

Each function returns a matplotlib ``Figure``; the notebook saves them as ``fig_samples.png``,
``fig_training.png`` and ``fig_accuracy.png`` in its step folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .style import cmap_for

__all__ = ["plot_questions", "plot_training", "plot_accuracy"]

_EVIDENCE = "#d62728"


def plot_questions(items: Sequence[Mapping[str, Any]], *, ncols: int = 3) -> Figure:
    """One panel per item: the page with its 28 px token grid, the evidence boxes in red, and
    the prompt, expected answer and (if given) the model's prediction as the title.

    ``items``: mappings with ``image`` (PIL), ``prompt``, ``answer``, ``evidence`` (boxes
    ``(x0, y0, x1, y1)``) and optionally ``prediction``."""
    if not items:
        raise ValueError("plot_questions needs at least one item")
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = item["image"]
        ax.imshow(image, cmap=cmap_for("image"))
        w, h = image.size
        for x in range(28, w, 28):
            ax.axvline(x - 0.5, color="#9ecae1", lw=0.5)
        for y in range(28, h, 28):
            ax.axhline(y - 0.5, color="#9ecae1", lw=0.5)
        for x0, y0, x1, y1 in item["evidence"]:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=_EVIDENCE, lw=1.5))
        title = f"{item['prompt']}\nanswer: {item['answer']!r}"
        if "prediction" in item:
            mark = "ok" if item["prediction"] == item["answer"] else "WRONG"
            title += f"\nread: {item['prediction']!r} ({mark})"
        ax.set_title(title, fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_training(log: pd.DataFrame, validation: pd.DataFrame | None = None, *, smooth: int = 50) -> Figure:
    """Training curves from ``training_log.csv``: answer loss per task (rolling mean over
    ``smooth`` steps of that task), the auxiliary glyph accuracy (and the position and answer
    pointer accuracies when the log has a non-zero ``pos_acc``, ``ptr_acc``, and the key pointer's
    ``key_acc`` over the value steps, the only ones it sees), the learning rate and the share
    of easy pages; and, from ``validation_log.csv``, teacher-forced exact match per task on the
    validation pages (equal to greedy exact match). With a ``stage`` column (several training
    stages, :func:`sparsemm_utils.tiny_reader.training.training_logs`), dotted lines mark where a stage starts."""
    panels = 3 if validation is not None and len(validation) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6))
    starts = log.groupby("stage")["step"].min().iloc[1:].tolist() if "stage" in log else []
    ax = axes[0]
    for task, rows in log.groupby("task", sort=False):
        ax.plot(rows["step"], rows["lm_loss"].rolling(smooth, min_periods=1).mean(), label=f"{task} answer loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("answer loss per task")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(log["step"], log["aux_acc"].rolling(smooth, min_periods=1).mean(), label="glyph accuracy (aux head)")
    if "pos_acc" in log and log["pos_acc"].any():  # readers trained with the auxiliary position head
        ax.plot(log["step"], log["pos_acc"].rolling(smooth, min_periods=1).mean(), label="row & column accuracy (aux head)")
    if "ptr_acc" in log and log["ptr_acc"].any():  # readers trained with the auxiliary pointer head
        ax.plot(log["step"], log["ptr_acc"].rolling(smooth, min_periods=1).mean(), label="answer pointer accuracy (aux head)")
    if "key_acc" in log and log["key_acc"].any():  # readers trained with the auxiliary key pointer head
        value = log[log["task"] == "value"]
        ax.plot(value["step"], value["key_acc"].rolling(smooth, min_periods=1).mean(), label="key pointer accuracy (aux head)")
    ax.plot(log["step"], log["token_acc"].rolling(smooth, min_periods=1).mean(), label="answer token accuracy")
    ax.plot(log["step"], log["p_easy"], ls="--", color="grey", label="share of easy pages")
    ax.plot(log["step"], log["lr"] / log["lr"].max(), ls=":", color="black", label="learning rate / peak")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("accuracies and schedules")
    ax.legend(fontsize=8)
    if panels == 3:
        ax = axes[2]
        for col in [c for c in validation.columns if c.endswith("_exact")]:
            ax.plot(validation["step"], validation[col], marker="o", ms=3, label=col.removesuffix("_exact"))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("exact match")
        ax.set_title("validation pages (teacher-forced = greedy)")
        ax.legend(fontsize=8)
    for ax in axes:
        for x in starts:
            ax.axvline(x, color="purple", ls=":", lw=1)
    if starts:
        axes[0].text(starts[0], axes[0].get_ylim()[1], " stage 2", color="purple", fontsize=8, va="top")
    fig.tight_layout()
    return fig


def plot_accuracy(summaries: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Figure:
    """Grouped bars of exact match and character accuracy per task for one or more evaluations
    (``{"label": evaluate_reader(...)["summary"], ...}``)."""
    rows = [
        {"evaluation": label, "task": task, "metric": metric, "value": s[key]}
        for label, summary in summaries.items()
        for task, s in summary.items()
        for metric, key in (("exact match", "exact_match"), ("character accuracy", "char_accuracy"))
    ]
    df = pd.DataFrame(rows)
    g = sns.catplot(data=df, x="task", y="value", hue="evaluation", col="metric", kind="bar", height=3.4, aspect=1.2)
    for ax in g.axes.flat:
        ax.set_ylim(0, 1.05)
        ax.axhline(1.0, color="grey", lw=0.5)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3f", fontsize=7)
    return g.figure
