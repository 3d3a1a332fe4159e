"""Figures of step 07 (docs/method.md §8): where the model looks, layer by layer.

- :func:`plot_token_layout`: the role of every position of one prompt (LLaVA-Mini Eq. 1).
- :func:`plot_category_attention`: Attn(target -> source) per layer (LLaVA-Mini Fig. 2).
- :func:`plot_category_entropy`: attention entropy per layer (LLaVA-Mini Fig. 3).
- :func:`plot_head_vision_share`: each head's share of attention on vision tokens beside its
  SparseMM visual score (heatmaps and a scatter with Spearman's rho).
- :func:`plot_vision_drop`: reader accuracy with the vision tokens dropped in a range of layers,
  both readings (LLaVA-Mini Fig. 5).
- :func:`plot_fastv`: FastV's accuracy against the KV bytes it keeps.

Every function takes the step's tables (the CSV files' columns) and returns a Figure. Colours come
from :mod:`sparsemm_utils.plots.style`: attention shares in the attention colormap, visual scores in
the visual-score one, hue by layer in the layer one, FastV and the unmodified model in their method
colours.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..category_attention import spearman
from ..token_categories import CATEGORIES, ROLES, PromptLayout
from .style import cmap_for, method_color, method_style

__all__ = [
    "ROLE_COLORS",
    "CATEGORY_COLORS",
    "plot_token_layout",
    "plot_category_attention",
    "plot_category_entropy",
    "plot_head_vision_share",
    "plot_vision_drop",
    "plot_fastv",
]

ROLE_COLORS: Mapping[str, str] = {
    "template": "#bdbdbd",
    "system": "#9ecae1",
    "user": "#3182bd",
    "vision": "#fd8d3c",
    "response": "#31a354",
}
CATEGORY_COLORS: Mapping[str, str] = {"instruction": "#3182bd", "vision": "#fd8d3c", "response": "#31a354"}


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs the columns {list(columns)}; missing {missing}")


def plot_token_layout(layout: PromptLayout, *, title: str | None = None) -> Figure:
    """One strip, one cell per position, coloured by role (template, system, user, vision,
    response); the role spans are labelled with their lengths."""
    roles = layout.roles
    fig, ax = plt.subplots(figsize=(10, 2.1))
    cmap = ListedColormap([ROLE_COLORS[r] for r in ROLES])
    ax.imshow(roles[None, :], aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(ROLES) - 0.5, interpolation="nearest")
    for role, start, stop in layout.spans():
        if stop - start >= max(3, roles.size // 25):  # label the spans wide enough to hold it
            ax.text((start + stop - 1) / 2, 0, f"{role}\n{stop - start}", ha="center", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("position")
    handles = [Patch(color=ROLE_COLORS[r], label=f"{r} ({'instruction' if r in ('template', 'system', 'user') else r})") for r in ROLES]
    fig.legend(handles=handles, fontsize=7, ncol=5, loc="lower center", frameon=False)
    ax.set_title(title or f"token roles of one prompt ({layout.prompt_len} prompt tokens)", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.98, top=0.82, bottom=0.42)
    return fig


def _per_target_lines(frame: pd.DataFrame, value: str, ylabel: str, ceiling: str | None = None) -> Figure:
    targets = [t for t in CATEGORIES if t in set(frame["target"])]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        part = frame[frame["target"] == target]
        for source in CATEGORIES:
            line = part[part["source"] == source].sort_values("layer")
            if line[value].isna().all():
                continue
            color = CATEGORY_COLORS[source]
            ax.plot(line["layer"], line[value], marker="o", ms=3, color=color, label=f"{target}→{source}")
            if "std" in line:
                ax.fill_between(line["layer"], line[value] - line["std"], line[value] + line["std"], color=color, alpha=0.15)
            if ceiling is not None and ceiling in line:
                ax.plot(line["layer"], line[ceiling], ls="--", lw=0.8, color=color)
        ax.set_title(f"target: {target}", fontsize=10)
        ax.set_xlabel("layer (0-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_category_attention(table: pd.DataFrame) -> Figure:
    """LLaVA-Mini Fig. 2: Attn(target -> source) (Eq. 4) against the layer, one panel per target,
    one line per source (band: +-1 std over samples). ``table``: ``category_attention.csv``."""
    _require(table, ("layer", "target", "source", "attention"), "plot_category_attention")
    fig = _per_target_lines(table, "attention", "Attn(target → source), Eq. 4")
    fig.suptitle("attention by token category, layer by layer", fontsize=11, y=1.02)
    return fig


def plot_category_entropy(table: pd.DataFrame) -> Figure:
    """LLaVA-Mini Fig. 3: entropy (nats) of the attention renormalised over each source category;
    dashed: the entropy of uniform attention over the keys seen. ``table``: ``entropy.csv``."""
    _require(table, ("layer", "target", "source", "entropy"), "plot_category_entropy")
    fig = _per_target_lines(table, "entropy", "entropy (nats)", ceiling="max_entropy")
    fig.suptitle("attention entropy within each category (dashed: uniform)", fontsize=11, y=1.02)
    return fig


def plot_head_vision_share(table: pd.DataFrame, *, annotate_top: int = 5) -> Figure:
    """Left: each head's share of attention on vision tokens (layers x heads). Middle: its SparseMM
    visual score. Right: one against the other, Spearman's rho in the title; the ``annotate_top``
    best-scored heads labelled. ``table``: ``head_vision_share.csv``."""
    _require(table, ("layer", "head", "vision_share", "visual_score"), "plot_head_vision_share")
    layers = int(table["layer"].max()) + 1
    heads = int(table["head"].max()) + 1
    share = table.pivot(index="layer", columns="head", values="vision_share").to_numpy()
    score = table.pivot(index="layer", columns="head", values="visual_score").to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * layers + 2.4), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    sns.heatmap(share, ax=axes[0], cmap=cmap_for("attention"), cbar_kws={"label": "share on vision"})
    axes[0].set_title("attention share on vision tokens", fontsize=10)
    if np.isnan(score).all():
        axes[1].text(0.5, 0.5, "no visual scores\n(step 03 missing)", ha="center", va="center")
        axes[1].set_axis_off()
    else:
        sns.heatmap(score, ax=axes[1], cmap=cmap_for("visual_score"), cbar_kws={"label": "visual score S"})
        axes[1].set_title("SparseMM visual score (step 03)", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
    rho = spearman(table["vision_share"], table["visual_score"])
    sns.scatterplot(data=table, x="vision_share", y="visual_score", hue="layer", palette=cmap_for("layer"), ax=axes[2], s=30)
    if np.nanmax(np.nan_to_num(score, nan=0.0)) > 0:  # label the best-scored heads (none when all scores are 0)
        top = table.sort_values("visual_score", ascending=False, kind="stable").head(annotate_top)
        for _, r in top.iterrows():
            axes[2].annotate(f"L{int(r['layer'])}H{int(r['head'])}", (r["vision_share"], r["visual_score"]),
                             fontsize=8, textcoords="offset points", xytext=(3, 3))
    axes[2].set_xlabel("share of attention on vision tokens")
    axes[2].set_ylabel("visual score S")
    axes[2].set_title(f"looking vs reading: Spearman rho = {rho:.2f} ({layers * heads} heads)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_vision_drop(table: pd.DataFrame, *, metric: str = "char_accuracy") -> Figure:
    """LLaVA-Mini Fig. 5: accuracy with the vision tokens dropped in each layer range, one bar
    per reading, one panel per task; dashed: the unmodified model. ``table``: ``vision_drop.csv``."""
    _require(table, ("reading", "layer_range", "first_layer", "task", metric), "plot_vision_drop")
    tasks = list(dict.fromkeys(table["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.4), sharey=True, squeeze=False)
    dropped = table[table["reading"] != "none"].sort_values(["first_layer", "reading"])
    order = list(dict.fromkeys(dropped["layer_range"]))
    for ax, task in zip(axes[0], tasks):
        part = dropped[dropped["task"] == task]
        sns.barplot(data=part, x="layer_range", y=metric, hue="reading", order=order, ax=ax,
                    palette={"inside": "#6baed6", "from": "#08519c"})
        base = table[(table["reading"] == "none") & (table["task"] == task)][metric]
        if len(base):
            ax.axhline(float(base.iloc[0]), ls="--", color=method_color("fullkv"), lw=1, label="no drop")
        ax.set_title(f"task: {task}", fontsize=10)
        ax.set_xlabel("dropped layer range (0-based)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    fig.suptitle("reading with the vision tokens dropped ('inside': only in the range; 'from': range to last layer)",
                 fontsize=10, y=1.02)
    fig.tight_layout()
    return fig


def plot_fastv(table: pd.DataFrame, *, metric: str = "char_accuracy") -> Figure:
    """FastV: accuracy against the share of the prompt's KV bytes kept, one line per task in
    FastV's method colour (all tasks together drawn in its full style, each task lighter with its
    own marker), each point of the all-tasks line labelled with its ratio R. ``table``:
    :func:`sparsemm_utils.fastv.evaluate_fastv`."""
    _require(table, ("ratio", "task", "kv_fraction", metric), "plot_fastv")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    markers = iter(("^", "v", "D", "P", "X", "*"))
    for task, part in table.groupby("task", sort=False):
        part = part.sort_values("kv_fraction")
        style = method_style("fastv")
        if task != "all":
            style.update(marker=next(markers, "o"), linestyle=":", linewidth=1.0, alpha=0.75)
        ax.plot(part["kv_fraction"], part[metric], color=method_color("fastv"), label=task, **style)
        if task != "all" and "all" in set(table["task"]):
            continue  # the ratios are labelled once, on the line of all tasks
        for _, r in part.iterrows():
            ax.annotate(f"R={r['ratio']:.2f}", (r["kv_fraction"], r[metric]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("prompt KV bytes kept (fraction of the full cache)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    k = sorted(set(table["k"])) if "k" in table else []
    ax.set_title(f"FastV (K = {', '.join(map(str, k))}): accuracy vs KV bytes", fontsize=10)
    fig.tight_layout()
    return fig
