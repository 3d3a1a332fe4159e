"""The per-head KV cache (sparsemm_utils.kv_cache): storage, byte accounting, appends, attention, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, Qwen2VLConfig
from transformers.integrations.sdpa_attention import repeat_kv

from sparsemm_utils.kv_cache import (
    DECODE_BLOCK,
    CacheStateError,
    InvalidPositionsError,
    KVCacheError,
    PerHeadKVCache,
    PerHeadKVLayer,
    UnsupportedBatchError,
    UnsupportedCacheOperationError,
    analytic_kv_bytes,
    cache_kv_bytes,
    decode_reserve_for,
)

PROPERTY = settings(max_examples=60, deadline=None)


def _states(kv_heads=2, n=6, dim=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, n, dim, generator=g).to(dtype)
    values = torch.randn(1, kv_heads, n, dim, generator=g).to(dtype)
    return keys, values


def _prefilled(positions, n=6, dim=4, reserve=2, dtype=torch.float32, seed=0):
    layer = PerHeadKVLayer(decode_reserve=reserve, layer_idx=0)
    keys, values = _states(len(positions), n, dim, seed, dtype)
    returned = layer.update(keys, values)
    assert returned[0] is keys and returned[1] is values  # the prefill's attention gets the full keys
    layer.compress([torch.tensor(p, dtype=torch.int64) for p in positions])
    return layer, keys, values


# ------------------------------------------------------------------------------- bytes, by hand


def test_bytes_by_hand():
    # 2 KV heads keep 3 and 5 of 6 prompt tokens, head_dim 4, float32 (4 bytes):
    # kv_bytes = (3 + 5) tokens x 4 x 2 (K and V) x 4 = 256.
    # Buffers: each head also reserves 2 decode rows: (3 + 2 + 5 + 2) = 12 rows x 4 x 4 bytes x 2 = 384.
    layer, _, _ = _prefilled([[0, 2, 5], [1, 2, 3, 4, 5]], reserve=2)
    assert layer.lengths() == [3, 5]
    assert layer.kv_bytes() == 256
    assert layer.allocated_bytes() == 384
    assert layer.slack_bytes() == 128
    # bfloat16 halves everything
    layer16, _, _ = _prefilled([[0, 2, 5], [1, 2, 3, 4, 5]], reserve=2, dtype=torch.bfloat16)
    assert (layer16.kv_bytes(), layer16.allocated_bytes()) == (128, 192)


def test_analytic_kv_bytes_by_hand():
    # [[3, 5], [4, 4]] = 16 tokens x head_dim 16 x 2 x 4 bytes (float32) = 2048; x 2 bytes (bf16) = 1024
    assert analytic_kv_bytes(np.array([[3, 5], [4, 4]]), 16, torch.float32) == 2048
    assert analytic_kv_bytes(np.array([[3, 5], [4, 4]]), 16, torch.bfloat16) == 1024
    with pytest.raises(ValueError, match="non-negative integers"):
        analytic_kv_bytes(np.array([1.5]), 16, torch.float32)


def test_pending_prefill_counts_the_full_tensors():
    layer = PerHeadKVLayer(decode_reserve=2)
    keys, values = _states(2, 6, 4)
    layer.update(keys, values)
    assert layer.has_pending_prefill and not layer.is_compressed
    assert layer.kv_bytes() == 2 * 6 * 4 * 2 * 4 == layer.allocated_bytes()


def test_compress_stores_exactly_the_selected_rows():
    layer, keys, values = _prefilled([[0, 2, 5], [1, 2, 3, 4, 5]])
    for h, pos in enumerate([[0, 2, 5], [1, 2, 3, 4, 5]]):
        torch.testing.assert_close(layer.head_keys(h), keys[0, h, pos], rtol=0, atol=0)
        torch.testing.assert_close(layer.head_values(h), values[0, h, pos], rtol=0, atol=0)
        assert layer.prompt_positions()[h].tolist() == pos
    assert not layer.has_pending_prefill


def test_keep_all_keeps_every_token():
    layer = PerHeadKVLayer(decode_reserve=0)
    keys, values = _states(3, 5, 4)
    layer.update(keys, values)
    layer.keep_all()
    assert layer.lengths() == [5, 5, 5] and layer.slack_bytes() == 0
    for h in range(3):
        torch.testing.assert_close(layer.head_keys(h), keys[0, h], rtol=0, atol=0)


def test_a_head_may_keep_nothing():
    layer, _, _ = _prefilled([[], [4, 5]])
    assert layer.lengths() == [0, 2]
    assert layer.kv_bytes() == 2 * 4 * 2 * 4


# ------------------------------------------------------------------------------------ decoding


def test_decode_appends_in_place_and_positions_stay_logical():
    layer, _, _ = _prefilled([[0, 2, 5], [1, 2, 3, 4, 5]], reserve=2)
    buffer = layer._k.data_ptr()
    new_k, new_v = _states(2, 1, 4, seed=1)
    returned = layer.update(new_k, new_v)
    assert returned[0] is new_k  # only the new token comes back
    assert layer.lengths() == [4, 6]
    assert layer.get_seq_length() == 7  # tokens SEEN: 6 prompt + 1, not 4 or 6 kept
    assert layer.get_mask_sizes(1) == (8, 0)
    assert layer._k.data_ptr() == buffer and layer.repacks == 0  # no re-allocation within the reserve
    for h in range(2):
        torch.testing.assert_close(layer.head_keys(h)[-1], new_k[0, h, 0], rtol=0, atol=0)
        torch.testing.assert_close(layer.head_values(h)[-1], new_v[0, h, 0], rtol=0, atol=0)


def test_repacking_grants_one_block_and_keeps_the_data():
    # block 2: appends 1..2 fit; append 3 finds no room -> repack with 2 free rows per head (1 left
    # after the write); append 4 fits; append 5 -> repack; append 6 fits. Two repacks for six appends.
    layer, keys, _ = _prefilled([[0, 1], [3]], reserve=2)
    appended = []
    for step in range(6):
        k, v = _states(2, 1, 4, seed=10 + step)
        appended.append(k)
        layer.update(k, v)
        assert layer.repacks == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}[step]
        # after an even step 1 free row per head (1 row x 2 heads x 4 dims x 2 (K, V) x 4 bytes), after an odd one none
        assert layer.slack_bytes() == (1 - step % 2) * 1 * 2 * 4 * 2 * 4
    expected0 = torch.cat([keys[0, 0, [0, 1]]] + [k[0, 0] for k in appended])
    torch.testing.assert_close(layer.head_keys(0), expected0, rtol=0, atol=0)
    assert layer.lengths() == [8, 7]


@PROPERTY
@given(steps=st.integers(1, 200), reserve=st.integers(0, 8))
def test_repacks_once_per_block(steps, reserve):
    layer, _, _ = _prefilled([[0], [1, 2]], n=3, dim=2, reserve=reserve)
    token = torch.zeros(1, 2, 1, 2)
    for _ in range(steps):
        layer.update(token, token)
    # the first block covers `reserve` appends, each repack max(reserve, 1) more
    assert layer.repacks == math.ceil(max(steps - reserve, 0) / max(reserve, 1))
    assert layer.lengths() == [1 + steps, 2 + steps]


@PROPERTY
@given(
    appends=st.lists(st.integers(1, 5), min_size=1, max_size=40),
    block=st.integers(0, 6),
    rows=st.integers(1, 3),
    drop=st.booleans(),
)
def test_reserved_unused_rows_never_exceed_the_block_per_head(appends, block, rows, drop):
    # Invariant: after every update of t tokens, each (row, KV head) holds at most max(block, t)
    # free rows (block when t <= block), and the bytes in use stay the analytic sum.
    kv_heads, n, dim = 2, 5, 2
    keys, values = _states(kv_heads, n, dim, seed=rows)
    layer = PerHeadKVLayer(decode_reserve=block)
    layer.load_rows(keys, values, [[torch.arange(r % n + 1)] * kv_heads for r in range(rows)])
    assert all(room - length == block for room, length in zip(layer._rooms, layer._lengths))
    for i, t in enumerate(appends):
        k = torch.randn(layer.rows, kv_heads, t, dim)
        layer.update(k, k)
        free = [room - length for room, length in zip(layer._rooms, layer._lengths)]
        assert max(free) <= max(block, t)
        if t <= block:
            assert max(free) <= block
        assert layer.slack_bytes() == sum(free) * dim * 2 * 4
        assert layer.kv_bytes() == analytic_kv_bytes(layer.row_lengths(), dim, torch.float32)
        if drop and i == len(appends) // 2 and layer.rows > 1:
            layer.select_rows([0])  # compaction keeps each head's free rows, never adds any
            assert max(room - length for room, length in zip(layer._rooms, layer._lengths)) <= max(block, t)


def test_decode_reserve_for_caps_the_generation_at_one_block():
    assert decode_reserve_for(10) == 9  # 9 appends: no repack
    assert decode_reserve_for(512) == DECODE_BLOCK == 64  # the paper's 512 new tokens: 7 repacks
    assert decode_reserve_for(512, block=128) == 128
    assert decode_reserve_for(1) == decode_reserve_for(0) == 0
    with pytest.raises(ValueError, match="block"):
        decode_reserve_for(10, block=-1)


def test_multi_token_update_appends_every_token_to_every_head():
    layer, _, _ = _prefilled([[0, 2], [1]], reserve=1)
    k, v = _states(2, 3, 4, seed=3)
    layer.update(k, v)
    assert layer.lengths() == [5, 4]
    torch.testing.assert_close(layer.head_keys(1)[-3:], k[0, 1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ attention


def _manual_attention(query, keys_per_head, values_per_head, group, scale, causal_new=0):
    """softmax(q K^T * scale) V per query head over its KV head's rows, written out with matmuls."""
    heads, q_len = query.shape[1], query.shape[2]
    out = torch.empty(1, q_len, heads, query.shape[-1])
    for h in range(heads):
        k, v = keys_per_head[h // group], values_per_head[h // group]
        logits = query[0, h] @ k.T * scale  # (q, len)
        if causal_new:
            length = k.shape[0]
            for i in range(q_len):
                logits[i, length - q_len + i + 1 :] = float("-inf")
        out[0, :, h] = torch.softmax(logits, dim=-1) @ v
    return out


@pytest.mark.parametrize("q_len", [1, 3])
def test_attend_matches_manual_attention_over_each_heads_tokens(q_len):
    # 4 query heads read 2 KV heads (G = 2) that store different numbers of tokens.
    layer, _, _ = _prefilled([[0, 2, 5], [1, 2, 3, 4, 5]], reserve=4)
    new_k, new_v = _states(2, q_len, 4, seed=7)
    layer.update(new_k, new_v)
    query = torch.randn(1, 4, q_len, 4, generator=torch.Generator().manual_seed(5))
    got = layer.attend(query, scaling=0.5)
    keys = [layer.head_keys(h) for h in range(2)]
    values = [layer.head_values(h) for h in range(2)]
    expected = _manual_attention(query, keys, values, group=2, scale=0.5, causal_new=q_len > 1)
    assert got.shape == (1, q_len, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_attend_with_everything_kept_equals_full_sdpa():
    layer = PerHeadKVLayer(decode_reserve=1)
    keys, values = _states(2, 7, 8)
    layer.update(keys, values)
    layer.keep_all()
    new_k, new_v = _states(2, 1, 8, seed=2)
    layer.update(new_k, new_v)
    query = torch.randn(1, 6, 1, 8, generator=torch.Generator().manual_seed(3))
    full_k = repeat_kv(torch.cat([keys, new_k], dim=2), 3)
    full_v = repeat_kv(torch.cat([values, new_v], dim=2), 3)
    expected = F.scaled_dot_product_attention(query, full_k, full_v).transpose(1, 2)
    torch.testing.assert_close(layer.attend(query), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ property: storage


@PROPERTY
@given(
    data=st.data(),
    kv_heads=st.integers(1, 4),
    n=st.integers(1, 24),
    steps=st.integers(0, 12),
    reserve=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_bytes_equal_kept_tokens_times_head_dim_times_two_times_dtype(data, kv_heads, n, steps, reserve, dtype):
    dim = 4
    positions = [
        sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n), label=f"head {h}")) for h in range(kv_heads)
    ]
    layer, keys, _ = _prefilled(positions, n=n, dim=dim, reserve=reserve, dtype=dtype)
    appended = []
    for step in range(steps):
        k, v = _states(kv_heads, 1, dim, seed=100 + step, dtype=dtype)
        layer.update(k, v)
        appended.append(k)
    kept = [len(p) + steps for p in positions]
    assert layer.lengths() == kept
    element = torch.empty((), dtype=dtype).element_size()
    assert layer.kv_bytes() == sum(kept) * dim * 2 * element
    assert layer.kv_bytes() == analytic_kv_bytes(np.array(kept), dim, dtype)
    assert layer.allocated_bytes() >= layer.kv_bytes() and layer.slack_bytes() >= 0
    assert layer.get_seq_length() == n + steps
    for h, pos in enumerate(positions):
        expected = torch.cat([keys[0, h, pos]] + [k[0, h] for k in appended]) if (pos or appended) else None
        if expected is not None:
            torch.testing.assert_close(layer.head_keys(h), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- the Cache


def test_cache_reports_per_layer_per_head_tokens_and_sums_bytes():
    cache = PerHeadKVCache(2, decode_reserve=0)
    for layer_idx, positions in enumerate([[[0, 1], [2]], [[0, 1, 2], [0, 1, 2]]]):
        keys, values = _states(2, 3, 4, seed=layer_idx)
        cache.update(keys, values, layer_idx)
        cache.layers[layer_idx].compress([torch.tensor(p) for p in positions])
    np.testing.assert_array_equal(cache.stored_tokens(), [[2, 1], [3, 3]])
    np.testing.assert_array_equal(cache.kept_prompt_tokens(), [[2, 1], [3, 3]])
    assert cache.kv_bytes() == 9 * 4 * 2 * 4 == cache_kv_bytes(cache)
    assert cache.slack_bytes() == 0 and cache.get_seq_length() == 3


def test_cache_from_a_multimodal_config_has_one_layer_per_text_layer():
    config = Qwen2VLConfig(text_config={"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4})
    assert len(PerHeadKVCache.from_config(config).layers) == 3


def test_cache_kv_bytes_of_a_dynamic_cache_is_the_full_cache():
    cache = DynamicCache()
    keys, values = _states(2, 5, 4)
    cache.update(keys, values, 0)
    assert cache_kv_bytes(cache) == 5 * 2 * 4 * 2 * 4


# --------------------------------------------------------------------------------------- errors


def test_batch_larger_than_one_is_rejected():
    layer = PerHeadKVLayer()
    keys = torch.zeros(2, 2, 3, 4)
    with pytest.raises(UnsupportedBatchError, match="batch size 2"):
        layer.update(keys, keys)


def test_decoding_before_compressing_names_the_fix():
    layer = PerHeadKVLayer(layer_idx=3)
    keys, values = _states()
    layer.update(keys, values)
    with pytest.raises(CacheStateError, match="layer 3: the prefill's keys were never compressed.*compressed_generate"):
        layer.update(keys[:, :, :1], values[:, :, :1])


def test_compress_protocol_errors():
    layer = PerHeadKVLayer()
    with pytest.raises(CacheStateError, match="nothing to compress"):
        layer.compress([torch.tensor([0])])
    with pytest.raises(CacheStateError, match="needs a compressed prefill"):
        layer.attend(torch.zeros(1, 2, 1, 4))
    keys, values = _states(2, 6, 4)
    layer.update(keys, values)
    with pytest.raises(InvalidPositionsError, match="positions for 1 KV heads, the layer has 2"):
        layer.compress([torch.tensor([0])])
    with pytest.raises(InvalidPositionsError, match=r"must lie in \[0, 6\)"):
        layer.compress([torch.tensor([0]), torch.tensor([6])])
    with pytest.raises(InvalidPositionsError, match="strictly increasing"):
        layer.compress([torch.tensor([2, 1]), torch.tensor([0])])
    with pytest.raises(InvalidPositionsError, match="strictly increasing"):
        layer.compress([torch.tensor([1, 1]), torch.tensor([0])])
    with pytest.raises(InvalidPositionsError, match="1-D integer tensor"):
        layer.compress([torch.tensor([0.0]), torch.tensor([0])])
    layer.compress([torch.tensor([0]), torch.tensor([1])])
    with pytest.raises(CacheStateError, match="compress\\(\\) runs once"):
        layer.compress([torch.tensor([0]), torch.tensor([1])])


def test_shape_changes_are_rejected():
    layer, _, _ = _prefilled([[0], [1]])
    with pytest.raises(ValueError, match="got 3 KV heads of dim 4"):
        layer.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(ValueError, match=r"\(batch, kv_heads, tokens, head_dim\)"):
        layer.update(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


def test_unsupported_generate_operations_say_why():
    layer, _, _ = _prefilled([[0], [1]])
    with pytest.raises(UnsupportedCacheOperationError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(UnsupportedCacheOperationError, match="cannot be cropped"):
        layer.crop(-1)
    with pytest.raises(UnsupportedCacheOperationError, match="num_return_sequences"):
        layer.batch_repeat_interleave(2)
    layer.crop(0)
    layer.batch_repeat_interleave(1)  # no-ops
    assert isinstance(UnsupportedCacheOperationError("x"), KVCacheError)


def test_reset_empties_the_layer():
    layer, _, _ = _prefilled([[0], [1]])
    layer.reset()
    assert not layer.is_initialized and layer.get_seq_length() == 0 and layer.kv_bytes() == 0
    keys, values = _states(2, 4, 4)
    layer.update(keys, values)  # a fresh prefill
    assert layer.has_pending_prefill


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="decode_reserve must be an int >= 0"):
        PerHeadKVLayer(decode_reserve=-1)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        PerHeadKVCache(0)
    with pytest.raises(CacheStateError, match=r"layers \[0, 1\] hold nothing yet"):
        PerHeadKVCache(2).stored_tokens()
