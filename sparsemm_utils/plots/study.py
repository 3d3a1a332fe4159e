"""Figures of notebook 00_study_model: the alignment of glyph cells with the language model's
character embeddings, and the two training stages."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .style import cmap_for

__all__ = ["plot_alignment", "plot_study_training"]


def plot_alignment(similarity: np.ndarray, cell_labels: Sequence[str], vocab_labels: Sequence[str], *, title: str | None = None) -> Figure:
    """Cosine similarity (cells, characters) between each glyph cell's projected feature (rows, the
    character drawn there) and the language model's input embedding of each character (columns):
    after alignment, each row peaks at its own character."""
    similarity = np.asarray(similarity, dtype=float)
    if similarity.shape != (len(cell_labels), len(vocab_labels)):
        raise ValueError(f"similarity is {similarity.shape}, labels give ({len(cell_labels)}, {len(vocab_labels)})")
    fig, ax = plt.subplots(figsize=(0.32 * len(vocab_labels) + 2.5, 0.3 * len(cell_labels) + 1.5))
    sns.heatmap(similarity, ax=ax, cmap=cmap_for("attention"), vmin=-1, vmax=1, xticklabels=list(vocab_labels),
                yticklabels=list(cell_labels), cbar_kws={"label": "cosine similarity"})  # fmt: skip
    ax.set_xlabel("the language model's input embedding of ...")
    ax.set_ylabel("a glyph cell showing ...")
    ax.set_title(title or "projected glyph cells against the LLM's character embeddings")
    return fig


def plot_study_training(log: pd.DataFrame) -> Figure:
    """The alignment stage (glyph accuracy and relative error per step) and the task stage (answer
    loss and token accuracy per step, each task its own colour, smoothed over 20 steps)."""
    needed = {"stage", "step"}
    if not needed <= set(log.columns):
        raise ValueError(f"log lacks {sorted(needed - set(log.columns))}: pass data/study_model/training_log.csv")
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    align = log[log["stage"] == "align"]
    if not align.empty:
        axes[0].plot(align["step"], align["glyph_accuracy"], label="glyph accuracy (nearest character)")
        axes[0].plot(align["step"], align["glyph_rel_error"], label="relative error of glyph cells")
        axes[0].set_title("1. alignment: cells -> the LLM's embeddings")
        axes[0].set_xlabel("step")
        axes[0].legend(fontsize=8)
        axes[0].grid(True, alpha=0.3)
    tasks = log[log["stage"] == "tasks"]
    palette = dict(zip(sorted(tasks["task"].dropna().unique()), sns.color_palette("colorblind", 3)))
    for task, rows in tasks.groupby("task"):
        axes[1].plot(rows["step"], rows["answer_loss"].rolling(20, min_periods=1).mean(), color=palette[task], label=task)
        axes[2].plot(rows["step"], rows["token_accuracy"].rolling(20, min_periods=1).mean(), color=palette[task], label=task)
    axes[1].set_title("2. tasks: answer loss (20-step mean)")
    axes[2].set_title("2. tasks: answer token accuracy (20-step mean)")
    for ax in axes[1:]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[2].set_ylim(0, 1)
    fig.tight_layout()
    return fig
