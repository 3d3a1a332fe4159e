"""The streamed row capture on hand-built tensors: the last query's attention row per QUERY head
(GQA without copying keys), masks, the recorder's reductions, and the prefill-cache check
(the original's issue #10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils import attention_capture as ac


def gqa_tensors():
    """4 query heads on 2 KV heads, head_dim = 6 keys: KV head 0's key j is 10 e_j, KV head 1's
    key j is 10 e_{(j + 3) % 6}; query head h is e_{target_h}, so logit(h, j) = 10 [key j points
    along target_h]."""
    eye = torch.eye(6)
    k0 = 10 * eye  # key j = 10 e_j
    k1 = 10 * eye[[(j + 3) % 6 for j in range(6)]]  # key j = 10 e_{(j+3)%6}
    key = torch.stack([k0, k1])[None]  # (1, 2, 6, 6)
    targets = [2, 4, 2, 0]
    query = eye[targets][None, :, None, :]  # (1, 4, 1, 6)
    return query, key


def test_gqa_row_by_hand():
    query, key = gqa_tensors()
    row = ac.last_query_attention(query, key, scaling=1.0)[0]
    # heads 0, 1 read KV head 0: argmax at key 2 and key 4. Heads 2, 3 read KV head 1, where
    # key j points along e_{(j+3)%6}: e_2 -> j = 5, e_0 -> j = 3.
    assert row.argmax(-1).tolist() == [2, 4, 5, 3]
    # softmax of 10 at one key and 0 at five others: e^10 / (e^10 + 5) = 0.999773...
    peak = math.exp(10) / (math.exp(10) + 5)
    torch.testing.assert_close(row.max(-1).values, torch.full((4,), peak))
    torch.testing.assert_close(row.sum(-1), torch.ones(4))


def eager_rows(query, key, mask, scaling):
    """What eager_attention_forward computes (repeat_kv, QK^T * scaling + mask, softmax fp32),
    last query only."""
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)
    weights = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if mask is not None:
        weights = weights + mask
    return torch.softmax(weights.float(), dim=-1)[:, :, -1, :]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3)]),
    st.integers(1, 5),
    st.integers(5, 20),
    st.integers(0, 2**16),
)
def test_row_equals_eager_reference(heads, q_len, n_keys, seed):
    h, h_kv = heads
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, h, q_len, 8, generator=gen)
    key = torch.randn(1, h_kv, n_keys, 8, generator=gen)
    # additive causal mask for the q_len queries at the end of n_keys positions
    pos_q = torch.arange(n_keys - q_len, n_keys)[:, None]
    additive = torch.where(torch.arange(n_keys)[None] <= pos_q, 0.0, torch.finfo(torch.float32).min)[None, None]
    expected = eager_rows(query, key, additive, 0.3)
    torch.testing.assert_close(ac.last_query_attention(query, key, additive, scaling=0.3), expected)
    torch.testing.assert_close(ac.last_query_attention(query, key, additive >= 0, scaling=0.3), expected)
    torch.testing.assert_close(ac.last_query_attention(query, key, None, scaling=0.3), expected)


def test_boolean_mask_removes_a_key():
    query, key = gqa_tensors()
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    mask[..., 2] = False  # hide key 2: heads 0 lose their target
    row = ac.last_query_attention(query, key, mask, scaling=1.0)[0]
    assert row[:, 2].eq(0).all() and row.argmax(-1)[0].item() != 2


def test_shape_errors_are_explained():
    with pytest.raises(ac.CaptureShapeError, match="multiple of KV heads"):
        ac.last_query_attention(torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 5, 4))
    with pytest.raises(ac.CaptureShapeError, match="batch, heads, seq, head_dim"):
        ac.last_query_attention(torch.zeros(3, 1, 4), torch.zeros(1, 2, 5, 4))


# --------------------------------------------------------------------------- recorder


def test_recorder_reduces_rows_by_hand():
    spec = ac.CaptureSpec(top_k=2, image_span=(1, 2), image_steps=1, keep_rows=True)
    rec = ac.RowRecorder(num_layers=2, num_heads=1, spec=spec)
    # step 0 (prefill, 4 keys) then step 1 (decode, 5 keys); layer order within a step does not matter
    rec.add(1, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    rec.add(0, torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    rec.add(0, torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]]))  # a tie: argmax is the first maximum
    rec.add(1, torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.6]]))
    cap = rec.finish()
    assert cap.argmax.tolist() == [[[0], [3]], [[1], [4]]]
    assert cap.top_positions[0, 0, 0].tolist() == [0, 1] and cap.top_positions[0, 1, 0].tolist() == [3, 2]
    assert cap.key_lengths.tolist() == [4, 5]
    # image = keys 1..2: mass 0.3 + 0.2, 0.2 + 0.3, 0.5 + 0.5, 0.1 + 0.1
    np.testing.assert_allclose(cap.image_mass[..., 0], [[0.5, 0.5], [1.0, 0.2]], rtol=1e-6)
    assert cap.image_attention.shape == (1, 2, 1, 2) and cap.image_attention.dtype == np.float16
    assert [r.shape for r in cap.rows] == [(2, 1, 4), (2, 1, 5)]
    cap.check_key_lengths(prompt_len=4)


def test_recorder_pads_topk_beyond_the_row():
    rec = ac.RowRecorder(1, 1, ac.CaptureSpec(top_k=3))
    rec.add(0, torch.tensor([[0.25, 0.75]]))
    assert rec.finish().top_positions.ravel().tolist() == [1, 0, -1]


def test_recorder_rejects_batches_and_uneven_layers():
    rec = ac.RowRecorder(2, 2)
    with pytest.raises(ac.CaptureShapeError, match="batch size 1"):
        rec.add(0, torch.ones(2, 2, 5))
    with pytest.raises(ac.CaptureShapeError, match=r"\(2, N\)"):
        rec.add(0, torch.ones(3, 5))
    rec.add(0, torch.ones(2, 5) / 5)
    with pytest.raises(ac.CaptureShapeError, match="different numbers of steps"):
        rec.finish()


def test_batch_recorder_drops_padding_keys_and_steps_after_the_end_by_hand():
    # prompt 0: 3 keys, no padding; prompt 1: 2 keys after 1 padding key (weight 0, masked)
    first = ac.RowRecorder(1, 1, ac.CaptureSpec(top_k=2, image_span=(0, 2)))
    second = ac.RowRecorder(1, 1, ac.CaptureSpec(top_k=2, image_span=(0, 1)))
    batch = ac.BatchRowRecorder([first, second], pads=[0, 1])
    batch.add(0, torch.tensor([[[0.2, 0.5, 0.3]], [[0.0, 0.1, 0.9]]]))  # step 0: the prefill's last query
    batch.add(0, torch.tensor([[[0.1, 0.1, 0.7, 0.1]], [[0.0, 0.6, 0.2, 0.2]]]))  # step 1: prompt 1 had ended
    a, b = first.finish(), second.finish(steps=1)
    assert a.argmax.ravel().tolist() == [1, 2] and a.key_lengths.tolist() == [3, 4]
    assert b.argmax.ravel().tolist() == [1] and b.key_lengths.tolist() == [2]  # position 1 of prompt 1 alone
    assert b.top_positions.ravel().tolist() == [1, 0]
    np.testing.assert_allclose(b.image_mass.ravel(), [0.1])
    b.check_key_lengths(prompt_len=2)
    with pytest.raises(ac.CaptureShapeError, match=r"\(2, H, N\)"):
        batch.add(0, torch.ones(1, 1, 4))
    with pytest.raises(ac.CaptureShapeError, match="cannot keep 3 steps"):
        first.finish(steps=3)
    with pytest.raises(ac.CaptureShapeError, match="one pad per recorder"):
        ac.BatchRowRecorder([first], pads=[0, 1])
    with pytest.raises(ac.CaptureShapeError, match="one selection_dtype"):
        ac.BatchRowRecorder([first, ac.RowRecorder(1, 1, ac.CaptureSpec(selection_dtype="model"))], pads=[0, 0])


def test_image_span_beyond_the_keys_is_an_error():
    rec = ac.RowRecorder(1, 1, ac.CaptureSpec(image_span=(3, 4)))
    with pytest.raises(ac.CaptureShapeError, match="beyond"):
        rec.add(0, torch.ones(1, 5) / 5)


def test_capture_spec_validation():
    with pytest.raises(ValueError, match="top_k"):
        ac.CaptureSpec(top_k=0)
    with pytest.raises(ValueError, match="image_span"):
        ac.CaptureSpec(image_steps=3)
    with pytest.raises(ValueError, match="start >= 0"):
        ac.CaptureSpec(image_span=(-1, 3))


def test_decoding_without_the_prefill_cache_is_rejected():
    # The original's issue #10: decode steps run without past_key_values attend only to themselves.
    rec = ac.RowRecorder(1, 1)
    rec.add(0, torch.ones(1, 10) / 10)  # prefill of 10 tokens -> token 0
    rec.add(0, torch.ones(1, 1))  # decode step without the cache: 1 key instead of 11
    with pytest.raises(ac.MissingPrefillCacheError, match="issue #10"):
        rec.finish().check_key_lengths(prompt_len=10)


def test_recording_context_is_scoped():
    rec = ac.RowRecorder(1, 1)
    assert ac.active_recorder() is None
    with ac.recording(rec):
        assert ac.active_recorder() is rec
    assert ac.active_recorder() is None
