"""One colour per method and one colormap per quantity (sparsemm_utils.plots.style)."""

import pytest

from sparsemm_utils.evaluation import EVAL_METHODS
from sparsemm_utils.plots.style import METHOD_COLORS, QUANTITY_CMAPS, cmap_for, method_color, method_style


def test_every_eval_method_has_its_own_colour():
    assert set(EVAL_METHODS) <= set(METHOD_COLORS)
    colours = [METHOD_COLORS[m] for m in EVAL_METHODS]
    assert len(set(colours)) == len(colours)


def test_unknown_methods_are_grey_and_styles_are_copies():
    assert method_color("not-a-method") == (0.5, 0.5, 0.5)
    style = method_style("sparsemm")
    style["linewidth"] = 99
    assert method_style("sparsemm")["linewidth"] == 2.6


def test_a_quantity_has_one_colormap():
    assert cmap_for("visual_score") == QUANTITY_CMAPS["visual_score"]
    with pytest.raises(KeyError, match="known quantities"):
        cmap_for("nonsense")
