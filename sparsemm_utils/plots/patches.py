"""Figures of step 02 (docs/method.md §3): an image with its visual-token grid and one region lit.

Each panel draws the image (in grey levels, the ``"image"`` colormap of
:mod:`sparsemm_utils.plots.style`), the cell of every image token under the mapping's own rule
(``mapper.token_boxes``: Qwen's 28 px blocks scaled back to the original image; LLaVA-NeXT's
crop-grid cells of ``p_w x p_h`` px, or the 24 x 24 base grid), fills the cells of the region
(the positions a box maps to) and outlines the box itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..patch_mapping import Box, InternVLPatchMapper, LlavaNextPatchMapper, PatchMapper
from .documents import CHAR_COLOR, CHUNK_COLOR
from .style import cmap_for

__all__ = ["draw_token_grid", "plot_token_grids", "plot_region_sizes"]

Block = Literal["image", "crop", "base"]


def _block_indices(mapper: PatchMapper, width: int, height: int, block: Block) -> np.ndarray:
    """Relative positions of the tokens drawn in a panel (newline tokens never; InternVL's tiles,
    never its thumbnail), shape ``(n,)``."""
    n = mapper.num_tokens(width, height)
    if isinstance(mapper, InternVLPatchMapper):  # the tiles; the thumbnail's coarser cells would cover them
        rows, cols = mapper.geometry.tile_grid(height, width)
        return np.arange(rows * cols * mapper.geometry.tokens_per_tile)
    if not isinstance(mapper, LlavaNextPatchMapper):
        return np.arange(n)
    base = mapper.geometry.base_tokens
    if block == "base":
        return np.arange(base)
    keep = np.setdiff1d(np.arange(base, n), mapper.newline_positions(width, height))
    return keep


def _cells(boxes: np.ndarray) -> np.ndarray:
    """``(n, 4)`` boxes ``x0, y0, x1, y1`` -> ``(n, 4, 2)`` polygons for a PolyCollection."""
    x0, y0, x1, y1 = boxes.T
    return np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x1, y1], -1), np.stack([x0, y1], -1)], 1)


def draw_token_grid(
    ax: Axes,
    image: Image.Image,
    mapper: PatchMapper,
    positions: Sequence[int] | np.ndarray = (),
    *,
    block: Block = "image",
    box: Any = None,
    title: str | None = None,
    grid_color: str = "#1f77b4",
    lit_color: str = "#ff7f0e",
) -> Axes:
    """Draw ``image`` with the token cells of one block and the ``positions`` of that block lit.

    ``block``: ``"image"`` (Qwen: all tokens), ``"crop"`` (LLaVA-NeXT crop grid) or ``"base"``
    (LLaVA-NeXT base grid). ``positions`` are relative to the first image token (as returned by
    ``mapper.map_box``); those outside the block are ignored. ``box``: the OCR box to outline.
    """
    width, height = image.size
    cells = mapper.token_boxes(width, height)
    drawn = _block_indices(mapper, width, height, block)
    ax.imshow(image.convert("L"), cmap=cmap_for("image"), vmin=0, vmax=255, extent=(0, width, height, 0))
    ax.add_collection(
        PolyCollection(_cells(cells[drawn]), facecolors="none", edgecolors=grid_color, linewidths=0.4, alpha=0.6)
    )
    lit = np.intersect1d(np.asarray(positions, dtype=np.int64), drawn)
    if lit.size:
        ax.add_collection(
            PolyCollection(_cells(cells[lit]), facecolors=lit_color, edgecolors=lit_color, linewidths=0.6, alpha=0.45)
        )
    if box is not None:
        b = Box.parse(box)
        ax.add_patch(Rectangle((b.x0, b.y0), b.x1 - b.x0, b.y1 - b.y0, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def _panel_title(label: str, mapper: PatchMapper, width: int, height: int, block: Block, n_lit: int) -> str:
    d = mapper.describe(width, height)
    if block == "base":
        grid = f"base {d['base_grid']}x{d['base_grid']}"
    elif block == "crop":
        grid = f"crop {d['grid_h']}x{d['grid_w']} (+newline), p={d['pixels_per_token_w']}x{d['pixels_per_token_h']}px"
    else:
        grid = f"{d['grid_h']}x{d['grid_w']} tokens"
    return f"{label}: {grid}\n{n_lit} tokens lit of {mapper.num_tokens(width, height)}"


def plot_token_grids(
    image: Image.Image,
    mappers: Mapping[str, PatchMapper],
    box: Any,
    *,
    chunk: str | None = None,
    panel_size: float = 4.0,
) -> Figure:
    """One panel per architecture: the token grid over ``image`` and the tokens of ``box`` lit.

    ``mappers``: label -> mapper (e.g. ``{"qwen2_vl": ..., "llava_next": ...}``). A LLaVA-NeXT
    mapper gets a crop-grid panel and, in the ``base_and_crop`` variant, a base-grid panel too.
    """
    width, height = image.size
    panels: list[tuple[str, PatchMapper, Block]] = []
    for label, mapper in mappers.items():
        if isinstance(mapper, LlavaNextPatchMapper):
            panels.append((label, mapper, "crop"))
            if mapper.include_base_grid:
                panels.append((f"{label} ({mapper.variant})", mapper, "base"))
        else:
            panels.append((label, mapper, "image"))
    aspect = height / width
    fig, axes = plt.subplots(
        1, len(panels), figsize=(panel_size * len(panels), panel_size * aspect + 0.9), squeeze=False
    )
    for ax, (label, mapper, block) in zip(axes[0], panels):
        positions = mapper.map_box(box, width=width, height=height)
        drawn = _block_indices(mapper, width, height, block)
        n_lit = int(np.isin(positions, drawn).sum())
        draw_token_grid(
            ax, image, mapper, positions, block=block, box=box,
            title=_panel_title(label, mapper, width, height, block, n_lit),
        )
    if chunk is not None:
        fig.suptitle(f"region of chunk {chunk!r} ({width}x{height} px image)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_region_sizes(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Histogram of tokens per region over ``regions.jsonl`` records: chunks (:data:`CHUNK_COLOR`)
    and characters (:data:`CHAR_COLOR`), each normalised to 100 % on its own (there are many more
    characters than chunks)."""
    rows = [
        {"kind": kind, "tokens": len(entry["positions"]), "model_type": r["model_type"]}
        for r in records
        for kind, key in (("chunk", "chunks"), ("char", "chars"))
        for entry in r[key]
        if entry["positions"]
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not rows:
        ax.text(0.5, 0.5, "no mapped regions", ha="center", va="center", transform=ax.transAxes)
        return fig
    frame = pd.DataFrame(rows)
    sns.histplot(
        data=frame, x="tokens", hue="kind", log_scale=(True, False), element="step",
        stat="percent", common_norm=False, palette={"chunk": CHUNK_COLOR, "char": CHAR_COLOR}, ax=ax,
    )
    ax.set_xlabel("visual tokens per region (|R|, log scale)")
    ax.set_title(f"region sizes ({', '.join(sorted(frame['model_type'].unique()))})", fontsize=10)
    fig.tight_layout()
    return fig
