"""The one-call decode paths over a per-head variable-length cache (sparsemm_utils.varlen_attention),
against the per-head reference loop of kv_cache, on CPU. The flash kernel itself needs CUDA; here
its ARGUMENTS are checked through a plain-torch emulation of ``varlen_attn``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.kv_cache import CacheStateError, PerHeadKVLayer
from sparsemm_utils.varlen_attention import (
    BackendUnavailableError,
    UnknownBackendError,
    attention_name,
    decode_attend,
    flash_decode,
    flash_unavailable_reason,
    flash_varlen_arguments,
    packed_segments,
    padded_decode,
    resolve_backend,
    varlen_attn_emulation,
)


def _layer(keep: list[list[int]], n: int, dim: int, reserve: int, seed: int = 0, dtype=torch.float32) -> PerHeadKVLayer:
    g = torch.Generator().manual_seed(seed)
    layer = PerHeadKVLayer(decode_reserve=reserve, layer_idx=0)
    kv_heads = len(keep)
    keys = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype)
    values = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype)
    layer.update(keys, values)
    layer.compress([torch.tensor(k, dtype=torch.long) for k in keep])
    return layer


def _append(layer: PerHeadKVLayer, tokens: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (1, layer.num_kv_heads, tokens, layer.head_dim)
    layer.update(torch.randn(shape, generator=g, dtype=layer.dtype), torch.randn(shape, generator=g, dtype=layer.dtype))


def test_hand_computed_single_head():
    """One KV head storing keys [1, 0], [0, 1] and values [1, 2], [3, 4]; query [ln 3, 0], scale 1:
    logits [ln 3, 0] -> weights [3/4, 1/4] -> output [3/4 + 3/4, 6/4 + 4/4] = [1.5, 2.5]."""
    layer = PerHeadKVLayer(decode_reserve=2)
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    values = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    layer.update(keys, values)
    layer.keep_all()
    query = torch.tensor([[[[torch.log(torch.tensor(3.0)).item(), 0.0]]]])
    expected = torch.tensor([1.5, 2.5])
    segments = packed_segments(layer)
    torch.testing.assert_close(padded_decode(segments, query, 1.0)[0, 0, 0], expected)
    torch.testing.assert_close(flash_decode(segments, query, 1.0, kernel=varlen_attn_emulation)[0, 0, 0], expected)
    torch.testing.assert_close(layer.attend(query, 1.0)[0, 0, 0], expected)


def test_packed_segments_are_the_layers_own_storage():
    # head 0 keeps 3 prompt tokens, head 1 keeps 8; reserve 3 -> rooms 6 and 11, starts 0 and 6;
    # one decode step appends a token to each: lengths 4 and 9
    layer = _layer([[0, 3, 9], [1, 2, 4, 5, 6, 7, 8, 9]], n=10, dim=8, reserve=3)
    _append(layer, 1)
    seg = packed_segments(layer)
    assert (seg.starts, seg.lengths, seg.rooms, seg.capacity) == ((0, 6), (4, 9), (6, 11), 17)
    for h in range(2):
        start = seg.starts[h]
        assert seg.keys[start : start + seg.lengths[h]].data_ptr() == layer.head_keys(h).data_ptr()
        torch.testing.assert_close(seg.values[start : start + seg.lengths[h]], layer.head_values(h))
    # the segments tile the buffer: start[h + 1] = start[h] + room[h]
    assert all(seg.starts[h] + seg.rooms[h] == seg.starts[h + 1] for h in range(1))


def test_flash_arguments_by_hand():
    layer = _layer([[0, 3, 9], [1, 2, 4, 5, 6, 7, 8, 9]], n=10, dim=8, reserve=3)
    _append(layer, 1)
    query = torch.randn(1, 6, 1, 8)  # 6 query heads over 2 KV heads: groups of G = 3
    args = flash_varlen_arguments(packed_segments(layer), query)
    assert args.cu_seq_q.tolist() == [0, 1, 2] and args.cu_seq_k.tolist() == [0, 6, 17]
    assert args.seqused_k.tolist() == [4, 9] and (args.max_q, args.max_k) == (1, 11)
    assert args.cu_seq_q.dtype == args.cu_seq_k.dtype == args.seqused_k.dtype == torch.int32
    assert args.query.shape == (2, 3, 8) and args.key.shape == (17, 1, 8) and args.enable_gqa
    # sequence 1's query heads are query heads 3, 4, 5
    torch.testing.assert_close(args.query[1], query[0, 3:6, 0])
    with pytest.raises(ValueError, match="single-token steps"):
        flash_varlen_arguments(packed_segments(layer), torch.randn(1, 6, 2, 8))


@settings(max_examples=80, deadline=None)
@given(
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 3]),
    n=st.integers(2, 40),
    reserve=st.integers(0, 4),
    steps=st.integers(0, 6),
    new=st.integers(1, 3),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_one_call_paths_equal_the_per_head_reference(kv_heads, group, n, reserve, steps, new, seed, data):
    """Whatever each head keeps, however full its reserve (re-packs included), the padded path and
    the flash path's arguments (through the emulation) give the reference output; q > 1 is causal."""
    keep = [
        sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n), label=f"head {h}"))
        for h in range(kv_heads)
    ]
    layer = _layer(keep, n=n, dim=8, reserve=reserve, seed=seed)
    for step in range(steps):
        _append(layer, 1, seed=seed + step + 1)
    _append(layer, new, seed=seed + 99)
    heads = kv_heads * group
    query = torch.randn(1, heads, new, 8, generator=torch.Generator().manual_seed(seed + 7))
    reference = layer.attend(query, 0.3)
    torch.testing.assert_close(padded_decode(packed_segments(layer), query, 0.3), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attend(layer, query, 0.3, "padded"), reference, atol=1e-5, rtol=1e-5)
    if new == 1:
        flash = flash_decode(packed_segments(layer), query, 0.3, kernel=varlen_attn_emulation)
        torch.testing.assert_close(flash, reference, atol=1e-5, rtol=1e-5)


def test_emulation_checks_what_the_kernel_requires():
    q, k = torch.randn(2, 1, 4), torch.randn(6, 1, 4)
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 6], dtype=torch.int32)
    varlen_attn_emulation(q, k, k, cu_q, cu_k, 1, 3)
    with pytest.raises(ValueError, match="int32"):
        varlen_attn_emulation(q, k, k, cu_q.long(), cu_k, 1, 3)
    with pytest.raises(ValueError, match="exceed max_q/max_k or the slot"):
        varlen_attn_emulation(q, k, k, cu_q, cu_k, 1, 2)
    with pytest.raises(ValueError, match="exceed max_q/max_k or the slot"):
        varlen_attn_emulation(q, k, k, cu_q, cu_k, 1, 3, seqused_k=torch.tensor([4, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="enable_gqa"):
        varlen_attn_emulation(torch.randn(2, 2, 4), k, k, cu_q, cu_k, 1, 3)


def test_backend_resolution_on_this_machine():
    assert resolve_backend("reference", "cpu", torch.float32) == "reference"
    assert resolve_backend("padded", "cpu", torch.float32) == "padded"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "reference"
    assert "CUDA device" in flash_unavailable_reason("cpu", torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="cannot run here: it needs a CUDA device.*'padded'"):
        resolve_backend("flash", "cpu", torch.bfloat16)
    with pytest.raises(UnknownBackendError, match="backend must be one of 'auto', 'reference', 'padded', 'flash', got 'triton'"):
        resolve_backend("triton", "cpu", torch.float32)
    with pytest.raises(UnknownBackendError):
        attention_name("auto")
    assert attention_name("padded") == "sparsemm_per_head_padded"


def test_decode_paths_refuse_a_layer_without_prefill_or_a_bad_query():
    with pytest.raises(CacheStateError, match="compressed prefill"):
        packed_segments(PerHeadKVLayer())
    layer = _layer([[0, 1], [2]], n=3, dim=8, reserve=1)
    with pytest.raises(ValueError, match="not a multiple"):
        padded_decode(packed_segments(layer), torch.randn(1, 3, 1, 8), None)
    with pytest.raises(CacheStateError, match="must run before the attention"):
        padded_decode(packed_segments(layer), torch.randn(1, 2, 2, 8), None)  # head 1 stores 1 token, 2 new
    with pytest.raises(UnknownBackendError):
        decode_attend(layer, torch.randn(1, 2, 1, 8), None, "auto")
