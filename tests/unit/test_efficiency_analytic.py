"""Analytic KV bytes (docs/method.md §7) and the synthetic head scores step 06 times SparseMM with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.efficiency import (
    ANALYTIC_COLUMNS,
    EfficiencyProtocol,
    InvalidEfficiencyConfigError,
    analytic_kv_table,
    analytic_method_kv_bytes,
    make_method,
    synthetic_head_scores,
)

VICUNA = ModelShape(32, 32, 32)
QWEN7 = ModelShape(28, 28, 4)


def _config(**kwargs) -> EfficiencyProtocol:
    return EfficiencyProtocol(device="cpu", **kwargs)


def test_fullkv_bytes_by_hand():
    # Vicuna at 32K in bf16: 32 layers x 32 KV heads x 32768 tokens x 128 x 2 (K, V) x 2 bytes
    assert analytic_method_kv_bytes("fullkv", _config(), VICUNA, 128, 32768, torch.bfloat16) == 17_179_869_184
    # Qwen2-VL-7B at 32K in bf16: 28 x 4 x 32768 x 128 x 2 x 2 = 1,879,048,192
    assert analytic_method_kv_bytes("fullkv", _config(), QWEN7, 128, 32768, torch.bfloat16) == 1_879_048_192
    # 2 of Qwen2-VL-7B's layers at 2048 tokens in float32: 2 x 4 x 2048 x 128 x 2 x 4 = 16,777,216
    assert analytic_method_kv_bytes("fullkv", _config(), ModelShape(2, 28, 4), 128, 2048, torch.float32) == 16_777_216


def test_sparsemm_with_uniform_scores_stores_b_tokens_per_head():
    # b = 256 - 32 = 224, m = floor(0.1 * 224) = 22, P = (224 - 22) * 1024 = 206,848;
    # sigma = 1/1024 per (MHA) KV head -> cap = round(206848 / 1024 + 22) = 224; stored = 224 + 32 = 256
    # total 1024 heads x 256 tokens x 128 x 2 x 2 bytes = 134,217,728
    config = _config(head_scores="uniform")
    assert analytic_method_kv_bytes("sparsemm", config, VICUNA, 128, 32768, torch.bfloat16) == 134_217_728
    # a prompt shorter than B is not compressed (the original's skip): 200 tokens in every head
    assert analytic_method_kv_bytes("sparsemm", config, VICUNA, 128, 200, torch.bfloat16) == 1024 * 200 * 128 * 4


def test_adakv_has_no_analytic_value():
    assert analytic_method_kv_bytes("adakv", _config(), VICUNA, 128, 4096, torch.bfloat16) is None


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 7]),
    budget=st.integers(40, 300),
    seed=st.integers(0, 10_000),
)
def test_sparsemm_bytes_stop_growing_once_no_head_saturates(layers, kv_heads, group, budget, seed):
    """Invariant behind the flat decode latency: for n beyond every head's cap + w the stored
    tokens no longer depend on n; FullKV's grow by L x H_kv per token. Total stored never exceeds
    L x H_kv x B plus the caps' rounding (half a token per head)."""
    shape = ModelShape(layers, kv_heads * group, kv_heads)
    config = _config(budget=budget, window=32, seed=seed)
    press = make_method("sparsemm", config, shape)
    caps = press.capacities(shape, 10**6).selected
    n0 = int(caps.max()) + 32 + 1
    one = analytic_method_kv_bytes("sparsemm", config, shape, 16, n0, torch.float32)
    two = analytic_method_kv_bytes("sparsemm", config, shape, 16, 2 * n0, torch.float32)
    assert one == two
    per_token = 16 * 2 * 4
    assert one // per_token <= layers * kv_heads * budget + (layers * kv_heads + 1) // 2
    full_one = analytic_method_kv_bytes("fullkv", config, shape, 16, n0, torch.float32)
    full_two = analytic_method_kv_bytes("fullkv", config, shape, 16, 2 * n0, torch.float32)
    assert full_two - full_one == layers * kv_heads * n0 * per_token


def test_table_covers_full_depth_shapes():
    config = _config(models=["llava-next-vicuna-7b", "qwen2-vl-7b"], methods=["fullkv", "sparsemm", "adakv"],
                     contexts=[2048, 32768], head_scores="uniform")
    table = analytic_kv_table(config)
    assert list(table.columns) == list(ANALYTIC_COLUMNS)
    assert len(table) == 2 * 3 * 2
    vicuna_full = table[(table["shape"] == "llava-next-vicuna-7b") & (table["method"] == "fullkv")]
    assert vicuna_full["kv_bytes"].tolist() == [1024 * 2048 * 512, 17_179_869_184]
    assert set(vicuna_full["layers"]) == {32} and set(table["dtype"]) == {"bfloat16"}
    assert table[table["method"] == "adakv"]["kv_bytes"].isna().all()
    assert table[table["method"] == "fullkv"]["budget"].isna().all()
    # uniform SparseMM: 256 tokens per KV head at both lengths (2048 > B)
    qwen_sparse = table[(table["shape"] == "qwen2-vl-7b") & (table["method"] == "sparsemm")]
    assert qwen_sparse["stored_tokens"].tolist() == [28 * 4 * 256] * 2


def test_synthetic_scores():
    shape = ModelShape(4, 8, 2)
    skewed = synthetic_head_scores(shape, "skewed", seed=3)
    assert skewed.shape == (4, 8)
    np.testing.assert_array_equal(skewed, np.random.default_rng(3).random((4, 8)) ** 13)
    # the reduced-depth scores are the first rows of the full-depth ones
    np.testing.assert_array_equal(synthetic_head_scores(ModelShape(2, 8, 2), "skewed", seed=3), skewed[:2])
    np.testing.assert_array_equal(synthetic_head_scores(shape, "skewed", seed=3, power=8), np.random.default_rng(3).random((4, 8)) ** 8)
    np.testing.assert_array_equal(synthetic_head_scores(shape, "uniform"), np.ones((4, 8)))
    with pytest.raises(InvalidEfficiencyConfigError, match="'skewed' or 'uniform'"):
        synthetic_head_scores(shape, "zipf")


def test_skewed_scores_are_about_as_concentrated_as_spec_section_4():
    # 1 - 0.95^14 = 0.512 in the top 5%, 1 - 0.9^14 = 0.771 in the top 10% (docs/method.md §4: 55%, 77%)
    scores = np.sort(synthetic_head_scores(ModelShape(320, 32, 32), "skewed", seed=0).ravel())[::-1]
    total = scores.sum()
    assert abs(scores[: len(scores) // 20].sum() / total - (1 - 0.95**14)) < 0.03
    assert abs(scores[: len(scores) // 10].sum() / total - (1 - 0.9**14)) < 0.03
