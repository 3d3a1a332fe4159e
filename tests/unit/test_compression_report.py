"""Step 04's presses, tables and figures (sparsemm_utils.budget_report, sparsemm_utils.plots.budgets),
without a model (tests/integration/test_compressed_generation_report.py prefills real prompts)."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.budget_report import (
    BUDGETS_COLUMNS,
    CACHE_BYTES_COLUMNS,
    SATURATION_COLUMNS,
    AllocationTables,
    KVBytesMismatchError,
    _check_bytes,
    build_press,
)
from sparsemm_utils.compression import (
    PyramidKVPress,
    RandomPress,
    SparseMMPress,
    UnknownCompressionMethodError,
)
from sparsemm_utils.plots.budgets import plot_budget_heatmaps, plot_cache_bytes, plot_head_masks, plot_saturation
from sparsemm_utils.steps.allocation import Config

SHAPE = ModelShape(2, 4, 2)


def test_build_press_passes_the_configs_settings():
    cfg = Config(window=8, budgets=[16, 64], ratio=0.2, seed=5)
    scores = np.ones((2, 4))
    sparse = build_press("sparsemm", 16, cfg, scores)
    assert isinstance(sparse, SparseMMPress) and (sparse.budget, sparse.window, sparse.ratio) == (16, 8, 0.2)
    random = build_press("random", 64, cfg)
    assert isinstance(random, RandomPress) and (random.seed, random.ratio) == (5, 0.2)
    assert isinstance(build_press("pyramidkv", 16, cfg), PyramidKVPress)
    # StreamingLLM keeps 4 sinks, fewer when b = B - w is smaller: B = 10, w = 8 -> b = 2 -> 2 sinks
    assert build_press("streamingllm", 64, cfg).sink == 4
    assert build_press("streamingllm", 10, Config(window=8, budgets=[10]), None).sink == 2
    with pytest.raises(UnknownCompressionMethodError, match="unknown budgeted method 'fullkv'"):
        build_press("fullkv", 16, cfg)


def test_bytes_check_names_both_numbers():
    loaded = SimpleNamespace(head_dim=16, dtype=torch.float32)
    stored = np.array([[3, 5], [4, 4]])  # 16 tokens x 16 x 2 x 4 = 2048 bytes
    _check_bytes(2048, stored, loaded, "ok")
    with pytest.raises(KVBytesMismatchError, match="reports 2049 bytes but .* = 2048"):
        _check_bytes(2049, stored, loaded, "snapkv B=16")


# ------------------------------------------------------------------------- tables and figures


def _tables():
    """Hand-made tables for 2 methods x 2 budgets, L = 2, H_kv = 2, two prompts of 40 and 60 tokens."""
    budgets, saturation, cache_bytes = [], [], []
    for method in ("sparsemm", "snapkv"):
        for budget in (16, 48):
            for layer in range(2):
                for head in range(2):
                    selected = budget - 8 + (4 if (method == "sparsemm" and head == 0) else -4 if method == "sparsemm" else 0)
                    budgets.append(dict(method=method, budget=budget, layer=layer, kv_head=head, selected=selected,
                                        window=8, prompt_len=40, stored=min(selected + 8, 40)))
            for doc_id, n in ((0, 40), (1, 60)):
                saturated = 2 if (budget == 48 and n == 40) else 0
                saturation.append(dict(method=method, budget=budget, doc_id=doc_id, prompt_len=n, kv_heads=4,
                                       saturated=saturated, uncompressed=saturated, skipped_layers=0,
                                       lost_tokens=8 * saturated))
                kept = min(budget, n) * 4
                cache_bytes.append(dict(method=method, budget=budget, prompt_len=n, kept_tokens=kept,
                                        kv_bytes=kept * 16 * 2 * 4, fullkv_bytes=n * 4 * 16 * 2 * 4, doc_id=doc_id))
    return AllocationTables(
        budgets=pd.DataFrame(budgets, columns=list(BUDGETS_COLUMNS)),
        saturation=pd.DataFrame(saturation, columns=list(SATURATION_COLUMNS)),
        cache_bytes=pd.DataFrame(cache_bytes, columns=list(CACHE_BYTES_COLUMNS)),
    )


def test_summary_by_hand():
    summary = _tables().summary().set_index(["method", "budget"])
    # snapkv B = 16: kept 16 of 40 and 16 of 60 -> mean(0.4, 0.2667) = 0.3333; no uncompressed heads
    assert summary.loc[("snapkv", 16), "kv_fraction"] == pytest.approx((16 / 40 + 16 / 60) / 2)
    # B = 48: the 40-token prompt keeps 40 (1.0), the 60-token one 48 (0.8); 2 of 4 heads uncompressed on one prompt
    assert summary.loc[("snapkv", 48), "kv_fraction"] == pytest.approx(0.9)
    assert summary.loc[("snapkv", 48), "uncompressed_share"] == pytest.approx(0.25)


def test_figures_have_one_panel_per_method_and_budget():
    tables = _tables()
    fig = plot_budget_heatmaps(tables.budgets, [16, 48], ["sparsemm", "snapkv"])
    assert len(fig.axes) == 2 * 2 + 2  # four heatmaps + one colour bar per budget
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["B = 16", "B = 48"]
    # the cell text is cap + window: snapkv at B = 16 gives 16 everywhere
    snap16 = fig.axes[2]  # row 1 (snapkv), column 0
    assert {t.get_text() for t in snap16.texts} == {"16"}
    plt.close(fig)
    for fig in (plot_saturation(tables.saturation), plot_cache_bytes(tables.cache_bytes)):
        assert fig.axes
        plt.close(fig)
    fig = plot_head_masks(np.random.default_rng(0).random((2, 4)), {"top": np.eye(2, 4, dtype=bool)})
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["visual head scores (step 03)", "top: 2 masked"]
    plt.close(fig)


def test_figures_reject_wrong_tables():
    with pytest.raises(ValueError, match=r"lacks the columns \['selected'"):
        plot_budget_heatmaps(pd.DataFrame({"method": ["a"], "budget": [1], "layer": [0], "kv_head": [0], "window": [1]}))
    with pytest.raises(ValueError, match="is empty"):
        plot_cache_bytes(pd.DataFrame(columns=list(CACHE_BYTES_COLUMNS)))
    with pytest.raises(ValueError, match="mask 'top' has shape"):
        plot_head_masks(np.ones((2, 4)), {"top": np.ones((4, 2))})
