"""compress_prefill (sparsemm_utils.shared_prefill) without a model: on hand-built prefill states,
every method decides exactly what the batch-1 CompressionSession decides from the full queries,
although the shared prefill keeps only the last queries; SnapKV scores from the window queries
equal snapkv_scores; misuse names the fix."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, StoppingCriteriaList

from sparsemm_utils import compression as comp
from sparsemm_utils.allocation import ModelShape, ScoreShapeError
from sparsemm_utils.compression import (
    CompressionSession,
    FullKVPress,
    HeadMaskAblation,
    SnapKVPress,
    make_press,
    per_head_attention,
    snapkv_scores,
    snapkv_window_scores,
)
from sparsemm_utils.kv_cache import PerHeadKVCache
from sparsemm_utils.shared_prefill import (
    LayerPrefill,
    PrefillNotShareableError,
    SharedPrefill,
    SharedPrefillError,
    check_shareable,
    compress_prefill,
)

SHAPE = ModelShape(layers=3, query_heads=4, kv_heads=2)
DIM = 4
PROPERTY = settings(max_examples=60, deadline=None)


def _random_states(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SHAPE.layers):
        query = torch.randn(1, SHAPE.query_heads, n, DIM, generator=g)
        key = torch.randn(1, SHAPE.kv_heads, n, DIM, generator=g)
        value = torch.randn(1, SHAPE.kv_heads, n, DIM, generator=g)
        out.append((query, key, value))
    return out


def _batch_one(press, states):
    """The batch-1 path: the per-head attention function driven as a model's layers would."""
    session = CompressionSession(press, SHAPE, PerHeadKVCache(SHAPE.layers, decode_reserve=0))
    with comp.COMPRESSION_HOOK.activate(session):
        for layer_idx, (query, key, value) in enumerate(states):
            module = SimpleNamespace(layer_idx=layer_idx, num_key_value_groups=SHAPE.group_size, is_causal=True)
            key_out, value_out = session.cache.update(key, value, layer_idx)
            per_head_attention(module, query, key_out, value_out, None, scaling=DIM**-0.5)
    return session


def _prefill(states, query_window):
    n = states[0][1].shape[2]
    layers = tuple(
        LayerPrefill(key, value, query[:, :, max(n - query_window, 0) :].clone(), DIM**-0.5) for query, key, value in states
    )
    return SharedPrefill(
        input_ids=torch.zeros(1, n, dtype=torch.long),
        layers=layers,
        shape=SHAPE,
        query_window=query_window,
        first_logits=torch.zeros(5),
        first_token=0,
        last_position_ids=None,
        max_new_tokens=1,
        logits_processor=LogitsProcessorList(),
        stopping_criteria=StoppingCriteriaList(),
    )


def test_window_scores_equal_snapkv_scores_of_the_full_queries():
    query, key, _ = _random_states(12, seed=0)[0]
    for window, kernel in ((1, 1), (3, 5), (11, 3)):
        full = snapkv_scores(query, key, window, 0.5, kernel)
        torch.testing.assert_close(snapkv_window_scores(query[:, :, 12 - window :], key, 0.5, kernel), full, rtol=0, atol=0)
    with pytest.raises(comp.InvalidParameterError, match="window w=12 must be < the prompt length n=12"):
        snapkv_window_scores(query, key)
    with pytest.raises(ValueError, match="do not match"):
        snapkv_window_scores(query[:, :3], key)  # 3 query heads for 2 KV heads


@PROPERTY
@given(
    method=st.sampled_from(["sparsemm", "random", "snapkv", "pyramidkv", "adakv", "streamingllm"]),
    budget=st.integers(5, 40),
    window=st.integers(1, 4),
    extra=st.integers(0, 3),
    n=st.integers(1, 48),
    seed=st.integers(0, 1000),
)
def test_shared_prefill_decides_what_the_batch_one_session_decides(method, budget, window, extra, n, seed):
    # Invariant: from the keys and only the last (window + extra) queries, every method assigns the
    # same caps, skips the same layers and keeps the same positions as the batch-1 path with all n queries.
    kwargs = {"budget": budget, "window": window}
    if method == "sparsemm":
        kwargs["head_scores"] = np.random.default_rng(seed).random((SHAPE.layers, SHAPE.query_heads))
    if method == "streamingllm":
        kwargs["sink"] = min(2, budget - window)
    press = make_press(method, **kwargs)
    states = _random_states(n, seed)
    session = _batch_one(press, states)
    row = compress_prefill(_prefill(states, window + extra), press)
    np.testing.assert_array_equal(row.decisions.assigned, session.assigned)
    assert row.decisions.skipped_layers == session.skipped_layers
    assert row.decisions.prompt_len == session.prompt_len == n
    np.testing.assert_array_equal(row.decisions.saturated(), session.saturated())
    for layer_idx, positions in enumerate(row.positions):
        expected = session.cache.layers[layer_idx].prompt_positions()
        if positions is None:  # keeps everything
            assert all(p.tolist() == list(range(n)) for p in expected)
        else:
            assert [p.tolist() for p in positions] == [p.tolist() for p in expected]


def test_methods_sharing_a_window_score_each_layer_once():
    states = _random_states(30, seed=1)
    prefill = _prefill(states, 8)
    for press in (SnapKVPress(budget=12, window=8), make_press("adakv", budget=16, window=8), SnapKVPress(budget=12, window=4)):
        compress_prefill(prefill, press)
    assert sorted(prefill.layers[0]._scores) == [(4, 5), (8, 5)]


def test_fullkv_keeps_everything_and_assigns_nothing_as_its_batch_one_session():
    row = compress_prefill(_prefill(_random_states(10, seed=2), 4), FullKVPress())
    assert row.positions == (None, None, None)
    assert (row.decisions.assigned == -1).all() and row.decisions.skipped_layers == [] and row.decisions.prompt_len == 10


def test_misuse_is_refused_with_the_fix():
    prefill = _prefill(_random_states(20, seed=3), 4)
    with pytest.raises(SharedPrefillError, match=r"recorded 4: call shared_prefill\(\.\.\., query_window=8\)"):
        compress_prefill(prefill, SnapKVPress(budget=12, window=8))
    with pytest.raises(PrefillNotShareableError, match="head-mask ablation"):
        check_shareable(HeadMaskAblation(selection="random"))
    with pytest.raises(PrefillNotShareableError, match="press must be one of"):
        check_shareable(object())
    wrong = make_press("sparsemm", budget=12, window=4, head_scores=np.ones((4, 4)))
    with pytest.raises(ScoreShapeError, match=r"the model needs \(layers, query_heads\) = \(3, 4\)"):
        compress_prefill(prefill, wrong)
