"""Step 04's tables from real prefills on a tiny Qwen2-VL (sparsemm_utils.budget_report)."""

import numpy as np
import pytest
from PIL import Image

from sparsemm_utils.budget_report import measure_prompts
from sparsemm_utils.compression import model_shape
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.steps.allocation import Config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tables():
    loaded = load_model("tiny-random/qwen2_vl", seed=0)
    inputs = build_inputs(loaded, Image.new("RGB", (120, 90), "white"))
    assert inputs["input_ids"].shape[1] == 136  # the numbers below are worked out for n = 136
    shape = model_shape(loaded)
    assert (shape.layers, shape.query_heads, shape.kv_heads, loaded.head_dim) == (4, 8, 2, 16)
    scores = np.random.default_rng(0).random((shape.layers, shape.query_heads))
    cfg = Config(window=8, budgets=[16, 140], n_prompts=1)
    return measure_prompts(loaded, cfg, [("doc-0", inputs)], scores, progress=False)


def _row(frame, method, budget):
    rows = frame[(frame.method == method) & (frame.budget == budget)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_budgets_table_holds_every_head_of_every_method(tables):
    budgets = tables.budgets
    assert len(budgets) == 6 * 2 * 4 * 2  # methods x budgets x layers x KV heads
    snap = budgets[(budgets.method == "snapkv") & (budgets.budget == 16)]
    assert (snap.selected == 8).all() and (snap.stored == 16).all()  # b = 16 - 8 on every head
    # PyramidKV at B = 16, n = 136: base 8, min 0, max 16, steps 16 // 3 = 5 -> layers select 16, 11, 6, 1
    pyramid = budgets[(budgets.method == "pyramidkv") & (budgets.budget == 16)]
    assert pyramid.groupby("layer").selected.first().tolist() == [16, 11, 6, 1]
    sparse = budgets[(budgets.method == "sparsemm") & (budgets.budget == 16)]
    assert (sparse.stored == sparse.selected + 8).all()


def test_bytes_by_hand(tables):
    # FullKV: 136 tokens x 4 layers x 2 KV heads x 16 x 2 x 4 bytes = 139264
    snap = _row(tables.cache_bytes, "snapkv", 16)
    assert snap.fullkv_bytes == 136 * 4 * 2 * 16 * 2 * 4 == 139264
    # SnapKV B = 16: 16 tokens in each of the 8 KV heads: 128 tokens, 128 x 16 x 2 x 4 = 16384 bytes
    assert (snap.kept_tokens, snap.kv_bytes) == (128, 16384)


def test_a_budget_above_the_prompt_saturates_or_skips(tables):
    sat, kv = tables.saturation, tables.cache_bytes
    # B = 140 > n = 136: SnapKV, SparseMM, random and AdaKV leave every layer uncompressed (the original's skip)
    for method in ("snapkv", "sparsemm", "random", "adakv"):
        row = _row(sat, method, 140)
        assert (row.skipped_layers, row.uncompressed) == (4, 8)
        assert _row(kv, method, 140).kv_bytes == _row(kv, method, 140).fullkv_bytes
    # SnapKV's cap b = 132 exceeds n - w = 128 in all 8 heads: 4 tokens lost each
    assert (_row(sat, "snapkv", 140).saturated, _row(sat, "snapkv", 140).lost_tokens) == (8, 32)
    # StreamingLLM has no whole-prompt skip but every head saturates the same way
    stream = _row(sat, "streamingllm", 140)
    assert (stream.skipped_layers, stream.saturated, stream.uncompressed) == (0, 8, 8)
    # at B = 16 nobody saturates
    assert (sat[sat.budget == 16].saturated == 0).all()
