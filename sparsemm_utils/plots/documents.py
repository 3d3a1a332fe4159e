"""Figures of step 01: documents with their chunk and character boxes, and dataset statistics.

Both functions take a step-01 dataset (:data:`sparsemm_utils.document_dataset.FEATURES`) and return a
matplotlib ``Figure``; the notebook saves them as ``fig_samples.png`` and ``fig_statistics.png``.
Pages are drawn in grey levels (the ``"image"`` colormap of :mod:`sparsemm_utils.plots.style`); chunk
boxes in :data:`CHUNK_COLOR`, character boxes in :data:`CHAR_COLOR`, here and in step 02's figures.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image as PILImage

import datasets

from ..document_dataset import char_statistics, chunk_statistics, document_statistics, image_bytes
from .style import cmap_for

__all__ = ["plot_samples", "plot_statistics", "CHUNK_COLOR", "CHAR_COLOR"]

CHUNK_COLOR = "#d62728"
CHAR_COLOR = "#1f77b4"


def _box(ax, coord, color: str, lw: float, alpha: float = 1.0) -> None:
    (x0, y0), (x1, y1) = coord
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=lw, alpha=alpha))


def plot_samples(
    ds: datasets.Dataset,
    indices: Sequence[int] | None = None,
    *,
    n: int = 4,
    ncols: int = 2,
    show_chars: bool = True,
    label_chunks: bool = True,
) -> Figure:
    """Draw documents with their chunk boxes (red, labelled with the chunk's index) and
    character boxes (blue). ``indices`` (positions in ``ds``) default to the first ``n``."""
    if indices is None:
        indices = list(range(min(n, len(ds))))
    if not indices:
        raise ValueError("plot_samples needs at least one document (the dataset is empty?)")
    raw = ds.cast_column("image", datasets.Image(decode=False))
    nrows = math.ceil(len(indices) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(indices):]:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        row = raw[int(i)]
        with PILImage.open(io.BytesIO(image_bytes(row["image"]))) as image:
            ax.imshow(image.convert("L"), cmap=cmap_for("image"), vmin=0, vmax=255)
            width, height = image.size
        if show_chars:
            for c in row["char_coord"]:
                _box(ax, c["coord"], CHAR_COLOR, 0.6, 0.8)
        for j, c in enumerate(row["2_coord"]):
            _box(ax, c["coord"], CHUNK_COLOR, 1.2)
            if label_chunks:
                (x0, y0), _ = c["coord"]
                ax.text(x0, y0 - 1, str(j), color=CHUNK_COLOR, fontsize=7, va="bottom")
        ax.set_title(
            f"doc {row['doc_id']} ({row['source']}, {width}x{height}): "
            f"{len(row['2_coord'])} chunks, {len(row['char_coord'])} char boxes",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Documents with chunk boxes (red) and character boxes (blue)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_statistics(ds: datasets.Dataset) -> Figure:
    """Four panels: chunks per document, characters per chunk, box width vs height (chunks and
    character boxes), and image sizes."""
    docs = document_statistics(ds)
    chunks = chunk_statistics(ds)
    chars = char_statistics(ds)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    sns.histplot(docs, x="n_chunks", discrete=True, ax=axes[0, 0], color=CHUNK_COLOR)
    axes[0, 0].set(title="Chunks per document", xlabel="chunks", ylabel="documents")
    if len(chunks):
        sns.histplot(chunks, x="n_characters", discrete=True, ax=axes[0, 1], color=CHUNK_COLOR)
    axes[0, 1].set(title="Characters per chunk (whitespace excluded)", xlabel="characters", ylabel="chunks")
    ax = axes[1, 0]
    if len(chunks):
        sns.scatterplot(chunks, x="width", y="height", ax=ax, s=12, color=CHUNK_COLOR, label="chunk boxes", alpha=0.6)
    if len(chars):
        sns.scatterplot(chars, x="width", y="height", ax=ax, s=8, color=CHAR_COLOR, label="character boxes", alpha=0.4)
    ax.set(title="Box sizes (px)", xlabel="width", ylabel="height", xscale="log")
    sns.scatterplot(docs, x="width", y="height", hue="source", ax=axes[1, 1], s=25)
    axes[1, 1].set(title="Image sizes (px)", xlabel="width", ylabel="height")
    fig.suptitle(f"{len(docs)} documents, {len(chunks)} chunks, {len(chars)} character boxes", fontsize=11)
    fig.tight_layout()
    return fig
