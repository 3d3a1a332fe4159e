"""Rows in the per-head KV cache (sparsemm_utils.kv_cache): R compressions of one prompt side by side.

Hand-built tensors, no model: load_rows packs (row, KV head) segments with their own lengths,
decode appends one token per row to every head of that row, attention of each row equals a batch-1
layer holding that row alone, select_rows drops rows, bytes are the analytic sum.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.kv_cache import (
    BatchedPerHeadKVCache,
    CacheStateError,
    InvalidPositionsError,
    PerHeadKVLayer,
    UnsupportedBatchError,
    analytic_kv_bytes,
    cache_kv_bytes,
)
from sparsemm_utils.varlen_attention import (
    PADDED_BUCKET_MIN_SEGMENTS,
    decode_attend,
    flash_decode,
    packed_segments,
    varlen_attn_emulation,
)

PROPERTY = settings(max_examples=40, deadline=None)


def _states(kv_heads=2, n=6, dim=4, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, kv_heads, n, dim, generator=g), torch.randn(batch, kv_heads, n, dim, generator=g)


def _t(positions):
    return [torch.tensor(p, dtype=torch.int64) for p in positions]


# two rows of a prompt of 6 tokens, 2 KV heads: row 0 keeps 3 and 5 tokens, row 1 keeps 1 and 6 (everything)
ROWS = [[[0, 2, 5], [1, 2, 3, 4, 5]], [[5], [0, 1, 2, 3, 4, 5]]]


def _loaded(rows=ROWS, reserve=2, n=6, dim=4, kv_heads=2):
    keys, values = _states(kv_heads, n, dim)
    layer = PerHeadKVLayer(decode_reserve=reserve, layer_idx=0)
    layer.load_rows(keys, values, [_t(r) if r is not None else None for r in rows])
    return layer, keys, values


def test_rows_are_packed_per_row_and_head_by_hand():
    layer, keys, values = _loaded()
    assert layer.rows == 2 and layer.get_seq_length() == 6
    np.testing.assert_array_equal(layer.row_lengths(), [[3, 5], [1, 6]])
    assert layer.lengths() == [3, 5, 1, 6]
    # bytes: (3 + 5 + 1 + 6) tokens x 4 x 2 x 4 bytes = 480; rows 256 and 224. Buffers hold 2 reserve rows per segment.
    assert layer.kv_bytes() == 480 and layer.row_kv_bytes().tolist() == [256, 224]
    assert layer.allocated_bytes() == (15 + 4 * 2) * 4 * 2 * 4
    for r, row in enumerate(ROWS):
        for h, pos in enumerate(row):
            torch.testing.assert_close(layer.head_keys(h, r), keys[0, h, pos], rtol=0, atol=0)
            torch.testing.assert_close(layer.head_values(h, r), values[0, h, pos], rtol=0, atol=0)
            assert layer.prompt_positions(r)[h].tolist() == pos
    # None keeps every position of every head
    full, _, _ = _loaded([None, ROWS[0]])
    np.testing.assert_array_equal(full.row_lengths(), [[6, 6], [3, 5]])


def test_a_decode_step_appends_each_rows_token_to_every_head_of_that_row():
    layer, keys, _ = _loaded()
    new_k, new_v = _states(2, 1, 4, seed=5, batch=2)  # (rows, H_kv, 1, d): one token per row
    returned = layer.update(new_k, new_v)
    assert returned[0] is new_k
    np.testing.assert_array_equal(layer.row_lengths(), [[4, 6], [2, 7]])
    assert layer.get_seq_length() == 7 and layer.repacks == 0
    for r in range(2):
        for h in range(2):
            torch.testing.assert_close(layer.head_keys(h, r)[-1], new_k[r, h, 0], rtol=0, atol=0)
            torch.testing.assert_close(layer.head_values(h, r)[-1], new_v[r, h, 0], rtol=0, atol=0)
            torch.testing.assert_close(layer.head_keys(h, r)[:-1], keys[0, h, ROWS[r][h]], rtol=0, atol=0)
    # three more steps: the reserve of 2 runs out once, the layer re-packs and keeps everything
    for step in range(3):
        layer.update(*_states(2, 1, 4, seed=6 + step, batch=2))
    np.testing.assert_array_equal(layer.row_lengths(), [[7, 9], [5, 10]])
    assert layer.repacks == 1
    torch.testing.assert_close(layer.head_keys(0, 0)[3], new_k[0, 0, 0], rtol=0, atol=0)


def _one_row_layer(keys, values, positions, reserve=2):
    layer = PerHeadKVLayer(decode_reserve=reserve)
    layer.update(keys, values)
    layer.compress(_t(positions))
    return layer


@pytest.mark.parametrize("q_len", [1, 3])
def test_attention_of_each_row_equals_a_batch_one_layer_holding_that_row(q_len):
    layer, keys, values = _loaded(reserve=4)
    singles = [_one_row_layer(keys, values, row, reserve=4) for row in ROWS]
    new_k, new_v = _states(2, q_len, 4, seed=9, batch=2)
    layer.update(new_k, new_v)
    query = torch.randn(2, 6, q_len, 4, generator=torch.Generator().manual_seed(3))  # H = 6: G = 3
    got = layer.attend(query, scaling=0.5)
    assert got.shape == (2, q_len, 6, 4)
    for r, single in enumerate(singles):
        single.update(new_k[r : r + 1], new_v[r : r + 1])
        expected = single.attend(query[r : r + 1], scaling=0.5)
        torch.testing.assert_close(got[r : r + 1], expected, rtol=0, atol=0)  # the same sdpa calls
        for backend in ("padded", "reference"):
            torch.testing.assert_close(decode_attend(layer, query, 0.5, backend)[r : r + 1], expected, rtol=1e-5, atol=1e-6)


def test_the_flash_arguments_cover_every_row():
    # the flash path's arguments, checked on CPU with the plain-torch emulation of varlen_attn
    layer, _, _ = _loaded(reserve=3)
    layer.update(*_states(2, 1, 4, seed=2, batch=2))
    query = torch.randn(2, 4, 1, 4, generator=torch.Generator().manual_seed(4))
    expected = layer.attend(query, scaling=0.7)
    flat = flash_decode(packed_segments(layer), query.reshape(1, 8, 1, 4), 0.7, kernel=varlen_attn_emulation)
    torch.testing.assert_close(flat.view(1, 2, 4, 4).transpose(0, 1), expected, rtol=1e-5, atol=1e-6)


def test_select_rows_drops_rows_and_their_bytes():
    layer, keys, _ = _loaded([ROWS[0], ROWS[1], [[1, 3], [2]]], reserve=2)
    layer.update(*_states(2, 1, 4, seed=1, batch=3))
    before = layer.row_kv_bytes()
    kept_keys = [[layer.head_keys(h, r).clone() for h in range(2)] for r in range(3)]
    allocated = layer.allocated_bytes()
    layer.select_rows([2, 0])  # row 1 finished; the others swap places
    assert layer.rows == 2
    np.testing.assert_array_equal(layer.row_kv_bytes(), before[[2, 0]])
    assert layer.kv_bytes() == int(before[[2, 0]].sum())
    assert layer.allocated_bytes() < allocated and layer.slack_bytes() == 2 * 2 * 1 * 4 * 2 * 4  # 1 free row each
    for new, old in enumerate([2, 0]):
        for h in range(2):
            torch.testing.assert_close(layer.head_keys(h, new), kept_keys[old][h], rtol=0, atol=0)
        assert [p.tolist() for p in layer.prompt_positions(new)] == ([[1, 3], [2]] if old == 2 else ROWS[0])
    token_k, token_v = _states(2, 1, 4, seed=8, batch=2)
    layer.update(token_k, token_v)  # the next step feeds the two remaining rows
    torch.testing.assert_close(layer.head_keys(1, 1)[-1], token_k[1, 1, 0], rtol=0, atol=0)
    np.testing.assert_array_equal(layer.row_lengths(), [[4, 3], [5, 7]])
    layer.batch_select_indices(torch.tensor([1]))  # transformers' name for the same
    np.testing.assert_array_equal(layer.row_lengths(), [[5, 7]])


def test_row_errors_name_the_row_and_the_fix():
    layer, _, _ = _loaded()
    with pytest.raises(UnsupportedBatchError, match="batch size 1, but the cache holds 2 row"):
        layer.update(*_states(2, 1, 4))
    with pytest.raises(UnsupportedBatchError, match=r"query must be \(2, heads, q, head_dim\)"):
        layer.attend(torch.zeros(1, 4, 1, 4))
    with pytest.raises(CacheStateError, match="fills an empty layer"):
        layer.load_rows(*_states(), [_t(ROWS[0])])
    with pytest.raises(ValueError, match=r"row indices must be distinct, in \[0, 2\)"):
        layer.select_rows([0, 0])
    with pytest.raises(ValueError, match=r"row indices must be distinct, in \[0, 2\)"):
        layer.select_rows([2])
    with pytest.raises(IndexError, match="no KV head 0 of row 2"):
        layer.head_keys(0, 2)
    fresh = PerHeadKVLayer(layer_idx=4)
    with pytest.raises(InvalidPositionsError, match=r"layer 4, row 1, KV head 0: positions must lie in \[0, 6\)"):
        fresh.load_rows(*_states(), [_t(ROWS[0]), _t([[6], [0]])])
    with pytest.raises(InvalidPositionsError, match="layer 4, row 0, KV head 1: positions must be strictly increasing"):
        PerHeadKVLayer(layer_idx=4).load_rows(*_states(), [_t([[0], [3, 3]])])
    with pytest.raises(InvalidPositionsError, match="at least one row"):
        PerHeadKVLayer().load_rows(*_states(), [])
    with pytest.raises(UnsupportedBatchError, match="prefills one prompt"):
        PerHeadKVLayer().load_rows(*_states(batch=2), [_t(ROWS[0])])


# ------------------------------------------------------------------------------------ the cache


def test_batched_cache_reports_rows_layers_heads_and_sums_bytes():
    states = [_states(2, 5, 4, seed=s) for s in range(3)]
    rows = [
        [_t([[0, 1], [4]]), None, _t([[0], [0]])],
        [None, _t([[2, 3], [1, 2, 3]]), _t([[1, 2, 3, 4], [4]])],
    ]
    cache = BatchedPerHeadKVCache.from_prefill(states, rows, decode_reserve=1)
    assert cache.rows == 2
    expected = np.array([[[2, 1], [5, 5], [1, 1]], [[5, 5], [2, 3], [4, 1]]])
    np.testing.assert_array_equal(cache.stored_tokens(), expected)
    np.testing.assert_array_equal(cache.kept_prompt_tokens(), expected)
    assert cache.kv_bytes() == analytic_kv_bytes(expected, 4, torch.float32) == cache_kv_bytes(cache)
    np.testing.assert_array_equal(cache.row_kv_bytes(), [15 * 32, 20 * 32])
    for layer_idx in range(3):
        cache.update(*_states(2, 1, 4, seed=10 + layer_idx, batch=2), layer_idx)
    np.testing.assert_array_equal(cache.stored_tokens(), expected + 1)
    assert cache.get_seq_length() == 6
    cache.select_rows([1])
    np.testing.assert_array_equal(cache.stored_tokens(), expected[1:] + 1)
    assert cache.kv_bytes() == analytic_kv_bytes(expected[1] + 1, 4, torch.float32)
    with pytest.raises(InvalidPositionsError, match="row 0 gives positions for 2 layers, the prompt has 3"):
        BatchedPerHeadKVCache.from_prefill(states, [[None, None]])
    with pytest.raises(InvalidPositionsError, match="at least one row"):
        BatchedPerHeadKVCache.from_prefill(states, [])


@PROPERTY
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    kv_heads=st.integers(1, 3),
    n=st.integers(1, 12),
    steps=st.integers(0, 6),
    reserve=st.integers(0, 3),
)
def test_bytes_and_contents_of_every_row_after_decoding(data, rows, kv_heads, n, steps, reserve):
    # Invariant: row r, head h stores its kept prompt positions then the r-th token of every step;
    # kv_bytes is the analytic sum over rows; dropping a row removes exactly its bytes.
    dim = 2
    positions = [
        [sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n), label=f"row {r} head {h}")) for h in range(kv_heads)]
        for r in range(rows)
    ]
    keys, values = _states(kv_heads, n, dim, seed=n)
    layer = PerHeadKVLayer(decode_reserve=reserve)
    layer.load_rows(keys, values, [_t(p) for p in positions])
    appended = []
    for step in range(steps):
        k, v = _states(kv_heads, 1, dim, seed=100 + step, batch=rows)
        layer.update(k, v)
        appended.append(k)
    lengths = np.array([[len(p) + steps for p in row] for row in positions])
    np.testing.assert_array_equal(layer.row_lengths(), lengths)
    assert layer.kv_bytes() == analytic_kv_bytes(lengths, dim, torch.float32)
    for r in range(rows):
        for h in range(kv_heads):
            expected = torch.cat([keys[0, h, positions[r][h]]] + [k[r, h] for k in appended])
            torch.testing.assert_close(layer.head_keys(h, r), expected, rtol=0, atol=0)
    drop = data.draw(st.integers(0, rows - 1), label="dropped row")
    layer.select_rows([r for r in range(rows) if r != drop])
    assert layer.kv_bytes() == analytic_kv_bytes(np.delete(lengths, drop, axis=0), dim, torch.float32)


def test_dropping_rows_without_compaction_keeps_the_buffers_until_they_are_mostly_dead():
    rows = [ROWS[0], ROWS[1], [[1, 3], [2]], [[0], [5]]]
    layer, _, _ = _loaded(rows, reserve=1)
    layer.update(*_states(2, 1, 4, seed=1, batch=4))
    kept_keys = [[layer.head_keys(h, r).clone() for h in range(2)] for r in range(4)]
    before, buffer = layer.row_kv_bytes(), layer._k.data_ptr()
    layer.select_rows([0, 2, 3], compact=False)  # rows 0, 2, 3 in place: no copy
    assert layer._k.data_ptr() == buffer and not layer.is_contiguous
    np.testing.assert_array_equal(layer.row_kv_bytes(), before[[0, 2, 3]])
    assert layer.slack_bytes() == layer.allocated_bytes() - layer.kv_bytes() > 0  # the dropped row's bytes are still held
    query = torch.randn(3, 4, 1, 4, generator=torch.Generator().manual_seed(4))
    expected = layer.attend(query, scaling=0.7)
    torch.testing.assert_close(decode_attend(layer, query, 0.7, "padded"), expected, rtol=1e-5, atol=1e-6)
    layer.update(*_states(2, 1, 4, seed=2, batch=3))  # the reserve of 1 ran out: the re-pack compacts
    assert layer.is_contiguous and layer.repacks == 1
    for new, old in enumerate([0, 2, 3]):
        for h in range(2):
            torch.testing.assert_close(layer.head_keys(h, new)[:-1], kept_keys[old][h], rtol=0, atol=0)
    layer.select_rows([1], compact=False)  # 1 of 3 rows left: the dead rows outnumber the kept ones -> compacted
    assert layer.is_contiguous and layer.slack_bytes() == 0  # the re-pack's free row was used by the write
    layer.select_rows([0], compact=False)
    with pytest.raises(ValueError, match="row indices must be distinct"):
        layer.select_rows([0, 0], compact=False)


def test_unsorted_rows_are_compacted_and_compact_is_idempotent():
    layer, _, _ = _loaded([ROWS[0], ROWS[1], [[1, 3], [2]]], reserve=2)
    layer.select_rows([2, 0], compact=False)  # a new order needs new buffers
    assert layer.is_contiguous
    buffer = layer._k.data_ptr()
    layer.compact()
    assert layer._k.data_ptr() == buffer


def test_the_padded_path_over_many_skewed_segments_equals_the_per_head_loop():
    # 40 rows x 2 KV heads = 80 segments >= PADDED_BUCKET_MIN_SEGMENTS: padded by length bucket
    g = torch.Generator().manual_seed(9)
    rows = [[sorted(torch.randperm(6, generator=g)[: 1 + (r * 7 + h) % 6].tolist()) for h in range(2)] for r in range(40)]
    layer, _, _ = _loaded(rows, reserve=2)
    assert layer.rows * layer.num_kv_heads >= PADDED_BUCKET_MIN_SEGMENTS
    layer.update(*_states(2, 1, 4, seed=3, batch=40))
    query = torch.randn(40, 4, 1, 4, generator=g)
    torch.testing.assert_close(decode_attend(layer, query, 0.5, "padded"), layer.attend(query, 0.5), rtol=1e-5, atol=1e-6)


def test_a_left_padded_prefill_batch_packs_each_prompt_without_its_padding():
    # prompt 0 has 6 tokens, prompt 1 has 4 (2 padding positions first); head 0 of prompt 1 keeps its own tokens 1, 3
    keys, values = _states(2, 6, 4, seed=5, batch=2)
    layer = PerHeadKVLayer(decode_reserve=1, prefill_batch=2)
    with pytest.raises(UnsupportedBatchError, match="made for 2 prompts"):
        layer.update(keys[:1], values[:1])
    assert layer.update(keys, values)[0] is keys  # the prefill's attention gets the padded batch unchanged
    layer.compress_batch([_t([[0, 5], [2]]), _t([[1, 3], [0, 1, 2, 3]])], pads=[0, 2])
    assert layer.rows == 2 and layer.get_seq_length() == 6
    np.testing.assert_array_equal(layer.row_lengths(), [[2, 1], [2, 4]])  # no padding stored
    torch.testing.assert_close(layer.head_keys(0, 1), keys[1, 0, [3, 5]], rtol=0, atol=0)
    torch.testing.assert_close(layer.head_values(1, 1), values[1, 1, 2:], rtol=0, atol=0)
    assert layer.kv_bytes() == analytic_kv_bytes(np.array([[2, 1], [2, 4]]), 4, torch.float32)
    other = PerHeadKVLayer(prefill_batch=2)
    other.update(keys, values)
    with pytest.raises(InvalidPositionsError, match=r"prompt 1, KV head 0: positions must lie in \[0, 4\)"):
        other.compress_batch([_t([[0], [1]]), _t([[4], [0]])], pads=[0, 2])
