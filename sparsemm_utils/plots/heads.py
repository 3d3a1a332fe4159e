"""Figures of step 03 (docs/method.md §4): where the visual heads are, and what they look at.

- :func:`plot_head_heatmap`: the (layer x head) score matrix S, top heads outlined.
- :func:`plot_cumulative_share`: share of the score mass held by the top fraction of heads, with
  the 5% / 10% marks (each curve's shares there in its legend entry) and the paper's reference
  (top 5% ~55%, top 10% ~77% on LLaVA-NeXT-Vicuna-7B).
- :func:`draw_image_attention` / :func:`plot_heads_on_image`: one head's attention over the
  image tokens, drawn on the token cells of the patch mapping (step 02), the token's region
  outlined.
- :func:`plot_token_reasons`: how many generated tokens each matching rule scored or skipped.
- :func:`plot_image_mass_vs_score`: a head's visual score against the attention mass it puts on
  the image at all.
- :func:`plot_visual_vs_copy_heads`: a head's visual score against its text-copy score (the
  language model's own copy heads, :mod:`sparsemm_utils.text_heads`), with both heatmaps.

Colours come from :mod:`sparsemm_utils.plots.style`: S in the ``visual_score`` colormap, attention
weights in ``attention``, layers in ``layer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..head_comparison import top_overlap
from ..head_scoring_rule import MATCHED, PAPER_TOP_SHARE, SKIP_REASONS, cumulative_share, top_heads, validate_head_scores
from ..patch_mapping import LlavaNextPatchMapper, PatchMapper
from .style import cmap_for

__all__ = [
    "plot_head_heatmap",
    "plot_cumulative_share",
    "drawable_positions",
    "draw_image_attention",
    "plot_heads_on_image",
    "plot_token_reasons",
    "plot_image_mass_vs_score",
    "plot_visual_vs_copy_heads",
]


def plot_head_heatmap(
    scores: np.ndarray,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    annotate_top: int = 5,
    label: str = "visual score S (mean over samples)",
) -> Figure:
    """Heatmap of S (L, H): layers as rows, query heads as columns; the ``annotate_top`` best
    heads outlined in red with their rank; ``label`` names the colour bar."""
    scores = validate_head_scores(scores)
    layers, heads = scores.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(2 + 0.35 * heads, 14), min(1.5 + 0.3 * layers, 10)))
    sns.heatmap(scores, ax=ax, cmap=cmap_for("visual_score"), vmin=0, cbar_kws={"label": label}, square=False)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    if scores.sum() > 0:
        for rank, (layer, head, _) in enumerate(top_heads(scores, annotate_top), start=1):
            ax.add_patch(Rectangle((head, layer), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            ax.text(head + 0.5, layer + 0.5, str(rank), color="red", ha="center", va="center", fontsize=8)
    else:
        ax.text(heads / 2, layers / 2, "all scores are zero", color="white", ha="center", va="center")
    ax.set_title(title or f"visual head scores ({layers} layers x {heads} heads)", fontsize=10)
    return ax.figure


def plot_cumulative_share(
    scores: np.ndarray | Mapping[str, np.ndarray],
    *,
    marks: Sequence[float] = (0.05, 0.10),
    reference: Mapping[float, float] | None = PAPER_TOP_SHARE,
    reference_label: str = "paper: LLaVA-NeXT-Vicuna-7B",
    ax: Axes | None = None,
) -> Figure:
    """Cumulative share of the score mass against the fraction of heads (heads sorted by score).

    ``scores``: one (L, H) matrix or label -> matrix (several variants on one plot). Vertical
    lines at ``marks`` (labelled above the axes), each curve's shares there dotted on the curve and
    written in its legend entry (with several curves, numbers printed at the marks would pile up);
    ``reference``: fraction -> share points (the paper's). A curve whose scores are all zero is
    listed in the legend as such.
    """
    curves = {"scores": scores} if not isinstance(scores, Mapping) else dict(scores)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="all heads equal")
    for label, matrix in curves.items():
        matrix = validate_head_scores(matrix)
        if not matrix.sum() > 0:
            ax.plot([], [], label=f"{label} (all scores zero)")
            continue
        fractions, shares = cumulative_share(matrix)
        at = [float(np.interp(f, fractions, shares)) for f in marks]
        text = ", ".join(f"top {f:.0%}: {share:.0%}" for f, share in zip(marks, at))
        (line,) = ax.plot(fractions, shares, linewidth=1.6, label=f"{label} ({text})" if marks else label)
        ax.plot(list(marks), at, "o", color=line.get_color(), markersize=4)
    for f in marks:
        ax.axvline(f, color="black", linewidth=0.6, alpha=0.4)
    if marks:
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(marks), [f"{f:.0%}" for f in marks], fontsize=7)
        top.tick_params(length=2, pad=1)
    if reference:
        xs, ys = zip(*sorted(reference.items()))
        ax.plot(xs, ys, "kx", markersize=8, mew=2, label=f"{reference_label} ({', '.join(f'{y:.0%}' for y in ys)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of heads (sorted by score, descending)")
    ax.set_ylabel("share of total score mass")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("how concentrated are the visual scores?", fontsize=10)
    return ax.figure


def drawable_positions(mapper: PatchMapper, width: int, height: int) -> np.ndarray:
    """Relative image-token positions that cover pixels and are drawn: every token for Qwen; the
    crop grid without newline tokens for LLaVA-NeXT (the grid regions live on; the base grid
    would overlap it)."""
    n = mapper.num_tokens(width, height)
    if not isinstance(mapper, LlavaNextPatchMapper):
        return np.arange(n)
    base = mapper.geometry.base_tokens
    return np.setdiff1d(np.arange(base, n), mapper.newline_positions(width, height))


def _cells(boxes: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = boxes.T
    return np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x1, y1], -1), np.stack([x0, y1], -1)], 1)


def draw_image_attention(
    ax: Axes,
    image: Image.Image,
    mapper: PatchMapper,
    weights: np.ndarray,
    *,
    region: Sequence[int] | np.ndarray = (),
    title: str | None = None,
    cmap: str | None = None,
) -> Axes:
    """One head's attention over the image: each drawn token cell filled by its weight.

    ``weights`` (n_img,): the head's attention on each image token (relative positions, e.g. a
    slice of ``CapturedAttention.image_attention``); colour and opacity are scaled from the
    smallest to the largest drawn weight, so a head that puts little mass on the image still
    shows WHERE it looks most, and a uniform head leaves the image visible (the mass itself is
    printed by the callers' titles). ``region``: relative positions outlined in cyan. ``cmap``:
    the ``attention`` colormap of :mod:`sparsemm_utils.plots.style` unless given, its lower 80%
    (the lightest end would vanish on the page).
    """
    width, height = image.size
    weights = np.asarray(weights, dtype=np.float64)
    n = mapper.num_tokens(width, height)
    if weights.shape != (n,):
        raise ValueError(f"weights must have one value per image token ({n}), got shape {weights.shape}")
    cells = mapper.token_boxes(width, height)
    drawn = drawable_positions(mapper, width, height)
    ax.imshow(image.convert("L"), cmap=cmap_for("image"), extent=(0, width, height, 0), vmin=0, vmax=255)
    w = weights[drawn]
    spread = float(w.max() - w.min()) if w.size else 0.0
    scaled = (w - w.min()) / spread if spread > 0 else np.zeros_like(w)
    # the colormap's lightest end would vanish on a white page: the strongest cell gets its 80% colour
    colours = plt.get_cmap(cmap or cmap_for("attention"))(0.8 * scaled)
    colours[:, 3] = 0.05 + 0.6 * scaled
    ax.add_collection(PolyCollection(_cells(cells[drawn]), facecolors=colours, edgecolors="none"))
    lit = np.intersect1d(np.asarray(region, dtype=np.int64), drawn)
    if lit.size:
        ax.add_collection(PolyCollection(_cells(cells[lit]), facecolors="none", edgecolors="cyan", linewidths=1.2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def plot_heads_on_image(
    image: Image.Image,
    mapper: PatchMapper,
    weights_by_label: Mapping[str, np.ndarray],
    *,
    region: Sequence[int] | np.ndarray = (),
    suptitle: str | None = None,
    panel_size: float = 3.6,
) -> Figure:
    """One panel per head (label -> weights (n_img,)), side by side, same region outlined; the
    title of each panel gives the head's total attention mass on the image."""
    width, height = image.size
    labels = list(weights_by_label)
    fig, axes = plt.subplots(
        1, len(labels), figsize=(panel_size * len(labels), panel_size * height / width + 0.9), squeeze=False
    )
    for ax, label in zip(axes[0], labels):
        weights = np.asarray(weights_by_label[label], dtype=np.float64)
        draw_image_attention(ax, image, mapper, weights, region=region, title=f"{label}\nmass on image {weights.sum():.2f}")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_token_reasons(reason_counts: Mapping[str, Mapping[str, int]]) -> Figure:
    """Stacked bars: for each variant (label -> {reason: count}), the generated tokens that were
    scored (``matched``) or skipped, by reason."""
    order = [MATCHED, *SKIP_REASONS]
    frame = pd.DataFrame(
        [{"variant": v, "reason": r, "tokens": counts.get(r, 0)} for v, counts in reason_counts.items() for r in order]
    )
    table = frame.pivot(index="variant", columns="reason", values="tokens")[order]
    table = table.loc[:, (table.sum(axis=0) > 0) | (table.columns == MATCHED)]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(table)))
    palette = dict(zip(order, sns.color_palette("tab10", len(order))))
    table.plot.barh(stacked=True, ax=ax, color=[palette[c] for c in table.columns], width=0.7)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title("which tokens were scored, per matching rule", fontsize=10)
    fig.tight_layout()
    return fig


def plot_image_mass_vs_score(scores: np.ndarray, image_mass: np.ndarray, *, annotate_top: int = 5) -> Figure:
    """Scatter: each head's visual score S (y) against its mean attention mass on the image (x);
    ``image_mass`` (L, H). A head can look at the image a lot without landing on the right place.

    The ``annotate_top`` best heads are named in a column right of the axes, in rank order, each
    joined to its point by a thin line (heads of near-equal score and mass sit on one spot, where
    labels at the points would print over each other)."""
    scores = validate_head_scores(scores)
    image_mass = np.asarray(image_mass, dtype=np.float64)
    if image_mass.shape != scores.shape:
        raise ValueError(f"image_mass must have the scores' shape {scores.shape}, got {image_mass.shape}")
    layers, heads = scores.shape
    frame = pd.DataFrame(
        {
            "mean attention mass on the image": image_mass.ravel(),
            "visual score S": scores.ravel(),
            "layer": np.repeat(np.arange(layers), heads),
        }
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.scatterplot(data=frame, x="mean attention mass on the image", y="visual score S", hue="layer",
                    palette=cmap_for("layer"), ax=ax, s=30)
    if scores.sum() > 0:
        best = top_heads(scores, annotate_top)
        _label_column(ax, [(image_mass[l, h], s) for l, h, s in best],
                      [f"#{rank + 1} L{l}H{h}" for rank, (l, h, _) in enumerate(best)])  # fmt: skip
    ax.set_title("looking at the image vs landing on the text being read", fontsize=10)
    fig.tight_layout()
    return fig


def _label_column(ax: Axes, points: Sequence[tuple[float, float]], labels: Sequence[str]) -> None:
    """Name ``points`` (data coordinates) in a column right of the axes, in the given order, each
    joined to its point by a thin line: heads of near-equal values sit on one spot, where labels
    at the points would print over each other."""
    step = min(0.12, 0.9 / max(len(labels), 1))
    for i, ((x, y), text) in enumerate(zip(points, labels)):
        ax.annotate(
            text, (x, y), xycoords="data", xytext=(1.03, 0.95 - i * step), textcoords="axes fraction", fontsize=8,
            va="center", arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3},
        )  # fmt: skip


def plot_visual_vs_copy_heads(
    visual: np.ndarray, copy: np.ndarray, *, annotate_top: int = 3, fraction: float = 0.10
) -> Figure:
    """A head's visual score S (y) against its text-copy score (x), one point per head coloured by
    layer, and the two (L, H) heatmaps side by side below (both in the ``visual_score``
    colormap, each scaled to its own maximum).

    Dashed lines mark each score's top ``fraction`` of heads (the k-th highest score, k =
    :func:`~sparsemm_utils.head_comparison.top_count`): points above and right of both are in both
    top sets. The ``annotate_top`` best heads of each score are named in a column right of the
    scatter (``V#r``: visual rank, ``T#r``: text-copy rank), joined to their points.
    """
    visual = validate_head_scores(visual, source="visual head scores")
    copy = validate_head_scores(copy, visual.shape, source="text-copy head scores")
    layers, heads = visual.shape
    overlap = top_overlap(visual, copy, fraction)
    map_height = min(1.5 + 0.3 * layers, 10)
    fig = plt.figure(figsize=(12, 4.4 + map_height))
    grid = fig.add_gridspec(2, 2, height_ratios=[4.4, map_height])
    ax = fig.add_subplot(grid[0, :])
    frame = pd.DataFrame(
        {
            "text-copy score (hits per document)": copy.ravel(),
            "visual score S": visual.ravel(),
            "layer": np.repeat(np.arange(layers), heads),
        }
    )
    sns.scatterplot(data=frame, x="text-copy score (hits per document)", y="visual score S", hue="layer",
                    palette=cmap_for("layer"), ax=ax, s=30)  # fmt: skip
    k = overlap.k
    ax.axvline(np.sort(copy.ravel())[::-1][k - 1], color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(np.sort(visual.ravel())[::-1][k - 1], color="grey", linestyle="--", linewidth=0.8)
    named: dict[tuple[int, int], list[str]] = {}
    for tag, matrix in (("V", visual), ("T", copy)):
        if matrix.sum() > 0:
            for rank, (l, h, _) in enumerate(top_heads(matrix, annotate_top), start=1):
                named.setdefault((l, h), []).append(f"{tag}#{rank}")
    _label_column(ax, [(copy[l, h], visual[l, h]) for l, h in named],
                  [f"L{l}H{h} ({', '.join(tags)})" for (l, h), tags in named.items()])  # fmt: skip
    handles, names = ax.get_legend_handles_labels()  # below the x label: the points keep the whole axes
    ax.legend(handles, names, title="layer", fontsize=7, title_fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=max(len(names), 1), frameon=False)  # fmt: skip
    ax.set_title(
        f"visual vs text-copy score per head: {len(overlap.shared)} of the top {k} of each are shared "
        f"(top {fraction:.0%} of {visual.size} heads, dashed)",
        fontsize=10,
    )
    plot_head_heatmap(visual, ax=fig.add_subplot(grid[1, 0]), title="visual score S", annotate_top=annotate_top)
    plot_head_heatmap(copy, ax=fig.add_subplot(grid[1, 1]), title="text-copy score", annotate_top=annotate_top,
                      label="text-copy score (hits per document)")  # fmt: skip
    fig.tight_layout()
    return fig
