"""Step 01 figures: every box is drawn, statistics count what the dataset holds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Rectangle

from sparsemm_utils.document_dataset import chunk_statistics, document_statistics
from sparsemm_utils.page_generator import DocumentGeneratorConfig, generate_documents
from sparsemm_utils.plots.documents import CHAR_COLOR, CHUNK_COLOR, plot_samples, plot_statistics
from sparsemm_utils.plots.style import cmap_for


@pytest.fixture(scope="module")
def ds():
    cfg = DocumentGeneratorConfig(n_documents=5, page_width_range=(224, 336), page_height_range=(112, 224))
    return generate_documents(cfg, progress=False)


def _rects(ax, color):
    rgba = matplotlib.colors.to_rgba(color)
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == rgba[:3]]


def test_samples_draw_every_chunk_and_character_box(ds):
    fig = plot_samples(ds, [1, 3], ncols=2)
    for ax, i in zip(fig.axes, [1, 3]):
        assert ax.images[0].get_cmap().name == cmap_for("image")  # pages in the study's image colormap
        assert len(_rects(ax, CHUNK_COLOR)) == len(ds[i]["2_coord"])
        assert len(_rects(ax, CHAR_COLOR)) == len(ds[i]["char_coord"])
        (x0, y0), (x1, y1) = ds[i]["2_coord"][0]["coord"]
        first = _rects(ax, CHUNK_COLOR)[0]
        assert (first.get_x(), first.get_y(), first.get_width(), first.get_height()) == (x0, y0, x1 - x0, y1 - y0)
    plt.close(fig)
    fig = plot_samples(ds, [0], ncols=2, show_chars=False)
    assert len(_rects(fig.axes[0], CHAR_COLOR)) == 0 and not fig.axes[1].axison
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one document"):
        plot_samples(ds, [])


def test_statistics_tables_and_figure(ds):
    docs, chunks = document_statistics(ds), chunk_statistics(ds)
    assert list(docs["n_chunks"]) == [len(c) for c in ds["2_coord"]]
    assert list(docs["width"]) == [im.size[0] for im in ds["image"]]
    assert chunks["n_characters"].sum() == docs["text_characters"].sum() == docs["n_char_boxes"].sum()
    assert (chunks["width"] == chunks["x1"] - chunks["x0"]).all()
    fig = plot_statistics(ds)
    assert len(fig.axes) >= 4
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(ds)  # histogram of chunks per document
    assert sum(p.get_height() for p in fig.axes[1].patches) == len(chunks)
    plt.close(fig)
