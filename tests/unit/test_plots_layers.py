"""Step 07's and step 00's figures take their colours from plots.style: attention shares in the
attention colormap, visual scores in the visual-score one, hue by layer in the layer one, FastV in
its method colour, page images in the image colormap."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_rgb
from PIL import Image

from sparsemm_utils.plots import layers, reader
from sparsemm_utils.plots.style import cmap_for, method_color


def test_head_vision_share_uses_the_quantity_colormaps():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                          "vision_share": [0.1, 0.2, 0.3, 0.4], "visual_score": [0.2, 0.1, 0.3, 0.4]})
    fig = layers.plot_head_vision_share(table)
    share, score, scatter = fig.axes[:3]
    assert share.collections[0].get_cmap().name == cmap_for("attention")
    assert score.collections[0].get_cmap().name == cmap_for("visual_score")
    # hue by layer: layer 0 and layer 1 take the first and last colour of the layer palette
    palette = sns.color_palette(cmap_for("layer"), 2)
    colours = [tuple(np.round(c[:3], 3)) for c in scatter.collections[0].get_facecolors()]
    assert colours[0] == tuple(np.round(palette[0], 3)) and colours[-1] == tuple(np.round(palette[1], 3))
    plt.close(fig)


def test_fastv_is_drawn_in_its_method_colour():
    table = pd.DataFrame({"k": 2, "ratio": [0.0, 0.5] * 2, "task": ["ocr", "ocr", "all", "all"],
                          "kv_fraction": [1.0, 0.9] * 2, "char_accuracy": [0.9, 0.6, 0.95, 0.7]})
    fig = layers.plot_fastv(table)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["ocr", "all"]
    assert all(to_rgb(line.get_color()) == to_rgb(method_color("fastv")) for line in lines)
    assert lines[1].get_linewidth() > lines[0].get_linewidth()  # all tasks together drawn in full
    assert [t.get_text() for t in fig.axes[0].texts] == ["R=0.50", "R=0.00"]  # ratios labelled once
    plt.close(fig)


def test_reader_pages_use_the_image_colormap():
    item = {"image": Image.new("L", (56, 28), 255), "prompt": "Read line 1.", "answer": "A", "evidence": [(0, 0, 28, 28)]}
    fig = reader.plot_questions([item])
    assert fig.axes[0].images[0].get_cmap().name == cmap_for("image")
    plt.close(fig)
