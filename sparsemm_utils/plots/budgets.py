"""Figures of step 04 (docs/method.md §5): per-head budgets, saturated heads, KV bytes against FullKV.

Every function takes a table of :mod:`sparsemm_utils.budget_report` and returns a matplotlib
``Figure``; the notebook saves them as ``fig_budget_heatmaps.png``, ``fig_saturation.png``,
``fig_cache_bytes.png`` and ``fig_head_masks.png``. Colours come from
:mod:`sparsemm_utils.plots.style`: one colour and line style per method, tokens per KV head in the
``kv_tokens`` colormap, visual scores in ``visual_score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .style import cmap_for, method_color, method_style

__all__ = ["METHOD_LABELS", "plot_budget_heatmaps", "plot_saturation", "plot_cache_bytes", "plot_head_masks"]

METHOD_LABELS: Mapping[str, str] = {
    "sparsemm": "SparseMM",
    "random": "Random alloc.",
    "snapkv": "SnapKV",
    "pyramidkv": "PyramidKV",
    "adakv": "AdaKV",
    "streamingllm": "StreamingLLM",
    "fullkv": "FullKV",
}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Label -> the method's colour, for seaborn's ``hue="label"``."""
    return {_label(m): method_color(m) for m in methods}


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; it needs {list(columns)} (see sparsemm_utils.budget_report)")
    if frame.empty:
        raise ValueError(f"{what} is empty: nothing to plot")


def plot_budget_heatmaps(
    budgets: pd.DataFrame,
    budget_values: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    *,
    annotate: bool | None = None,
) -> Figure:
    """One layer x KV-head heatmap per (method, budget): the tokens each head is given, cap + window.

    Rows: methods; columns: budgets (``budget_values``, default all). Colour scale shared within a
    column (one budget), so the methods of a budget compare directly. Cells are annotated with
    the number when the grid is small (``annotate`` None: when L x H_kv <= 64).
    """
    _require(budgets, ("method", "budget", "layer", "kv_head", "selected", "window"), "the budgets table")
    budget_values = list(budget_values) if budget_values is not None else sorted(budgets.budget.unique())
    methods = list(methods) if methods is not None else list(dict.fromkeys(budgets.method))
    layers = int(budgets.layer.max()) + 1
    kv_heads = int(budgets.kv_head.max()) + 1
    if annotate is None:
        annotate = layers * kv_heads <= 64
    width = max(2.2, 0.45 * kv_heads + 1.2)
    height = max(1.6, 0.18 * layers + 0.9)
    fig, axes = plt.subplots(
        len(methods) + 1,
        len(budget_values),
        figsize=(width * len(budget_values), height * len(methods) + 0.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [1.0] * len(methods) + [0.07]},
    )
    given = budgets.assign(given=budgets.selected + budgets.window)
    for col, budget in enumerate(budget_values):
        column = given[given.budget == budget]
        vmax = float(column.given.max()) if not column.empty else 1.0
        colorbar_ax = axes[-1, col]
        for row, method in enumerate(methods):
            ax = axes[row, col]
            cells = column[column.method == method]
            grid = np.full((layers, kv_heads), np.nan)
            grid[cells.layer.to_numpy(), cells.kv_head.to_numpy()] = cells.given.to_numpy()
            sns.heatmap(
                grid, ax=ax, cmap=cmap_for("kv_tokens"), vmin=0, vmax=vmax, annot=annotate, fmt=".0f", annot_kws={"fontsize": 7},
                cbar=row == 0, cbar_ax=colorbar_ax if row == 0 else None,
                cbar_kws={"orientation": "horizontal", "label": "tokens (cap + window)"} if row == 0 else None,
            )
            if row == 0:
                ax.set_title(f"B = {budget}", fontsize=10)
            ax.set_ylabel(f"{_label(method)}\nlayer" if col == 0 else "", fontsize=9)
            ax.set_xlabel("KV head" if row == len(methods) - 1 else "", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("Tokens per KV head (layer x KV head; uniform = B everywhere)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_saturation(saturation: pd.DataFrame) -> Figure:
    """Share of KV heads that store the whole prompt, per method and budget, over the prompts.

    Left: heads whose cap reaches n - w (saturated: the rest of their cap is lost); right: heads
    storing the whole prompt for any reason (saturated, or a layer the original leaves
    uncompressed because n < B). Bars: mean over prompts; ticks: 95% interval."""
    _require(saturation, ("method", "budget", "kv_heads", "saturated", "uncompressed"), "the saturation table")
    frame = saturation.assign(
        saturated_share=saturation.saturated / saturation.kv_heads,
        uncompressed_share=saturation.uncompressed / saturation.kv_heads,
        label=saturation.method.map(_label),
    )
    methods = list(dict.fromkeys(saturation.method))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, column, title in (
        (axes[0], "saturated_share", "cap >= n - w (surplus lost)"),
        (axes[1], "uncompressed_share", "stores the whole prompt"),
    ):
        sns.barplot(frame, x="budget", y=column, hue="label", hue_order=[_label(m) for m in methods],
                    palette=_palette(methods), ax=ax, errorbar=("ci", 95), err_kws={"linewidth": 1})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("budget B (tokens per KV head)")
        ax.set_ylabel("share of KV heads")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, title=None)
    prompt = saturation.prompt_len
    fig.suptitle(f"Heads that saturate on the run's prompts (n = {prompt.min()}..{prompt.max()} tokens)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_cache_bytes(cache_bytes: pd.DataFrame) -> Figure:
    """KV bytes of each method relative to FullKV (same prompt) against the budget; one point per
    prompt, the line through the means. The dotted line is B / n for the mean prompt length n
    (what a cache holding exactly B tokens per head would take)."""
    _require(cache_bytes, ("method", "budget", "prompt_len", "kv_bytes", "fullkv_bytes"), "the cache_bytes table")
    frame = cache_bytes.assign(kv_fraction=cache_bytes.kv_bytes / cache_bytes.fullkv_bytes)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, rows in frame.groupby("method", sort=False):
        colour = method_color(method)
        ax.scatter(rows.budget, rows.kv_fraction, color=colour, alpha=0.3, s=9, linewidths=0)
        means = rows.groupby("budget").kv_fraction.mean()
        ax.plot(means.index, means.to_numpy(), color=colour, label=_label(method), **method_style(method))
    budgets = np.sort(frame.budget.unique())
    mean_n = float(frame.prompt_len.mean())
    ax.plot(budgets, np.minimum(budgets / mean_n, 1.0), ":", color="grey", label=f"B / n (n = {mean_n:.0f})")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget B (tokens per KV head)")
    ax.set_ylabel("KV bytes / FullKV bytes")
    ax.set_ylim(0, 1.05)
    ax.set_title("KV cache size against FullKV, per prompt", fontsize=11)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_head_masks(head_scores: np.ndarray, masks: Mapping[str, np.ndarray]) -> Figure:
    """The visual head scores (layer x query head) beside each ablation's masked heads."""
    scores = np.asarray(head_scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"head_scores must be (layers, query_heads), got shape {scores.shape}")
    for name, mask in masks.items():
        if np.shape(mask) != scores.shape:
            raise ValueError(f"mask {name!r} has shape {np.shape(mask)}, the scores {scores.shape}")
    layers, heads = scores.shape
    fig, axes = plt.subplots(1, 1 + len(masks), figsize=((1 + len(masks)) * max(2.5, 0.3 * heads + 1.2), max(2.2, 0.2 * layers + 1)), squeeze=False)
    sns.heatmap(scores, ax=axes[0, 0], cmap=cmap_for("visual_score"), vmin=0, cbar_kws={"label": "visual score S"})
    axes[0, 0].set_title("visual head scores (step 03)", fontsize=10)
    for ax, (name, mask) in zip(axes[0, 1:], masks.items()):
        sns.heatmap(np.asarray(mask, dtype=float), ax=ax, cmap="Greys", vmin=0, vmax=1, cbar=False, linewidths=0.3, linecolor="lightgrey")
        ax.set_title(f"{name}: {int(np.sum(mask))} masked", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
