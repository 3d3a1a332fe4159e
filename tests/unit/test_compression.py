"""Compression methods (sparsemm_utils.compression): SnapKV selection by hand, the prefill's
decisions against the allocation rules, the same decisions from a shared prefill
(sparsemm_utils.shared_prefill.compress_prefill), head masks, and bad input. No model here (see
tests/integration/test_compressed_generation.py for generate)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, StoppingCriteriaList

from sparsemm_utils.allocation import (
    InvalidBudgetError,
    InvalidParameterError,
    MissingAllocationInputError,
    ModelShape,
    ScoreShapeError,
    effective_kept,
)
from sparsemm_utils.compression import (
    COMPRESSION_METHODS,
    AdaKVPress,
    CompressionSession,
    FullKVPress,
    HeadMaskAblation,
    NoActiveCompressionError,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    SparseMMPress,
    StreamingLLMPress,
    UnknownCompressionMethodError,
    make_press,
    per_head_attention,
    snapkv_scores,
    snapkv_window_scores,
    topk_positions,
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

PROPERTY = settings(max_examples=50, deadline=None)
LN3 = math.log(3.0)


# --------------------------------------------------------------------- SnapKV selection, by hand


def _hand_example():
    """n = 8 prompt tokens, window w = 2, d = 2, scale 1. One KV head read by two query heads (GQA).

    Keys k_j = (a_j, b_j): a = ln 3 at j = 1, b = ln 3 at j = 4, 0 elsewhere. Query head A looks
    along a (q = (1, 0)), query head B along b (q = (0, 1)), at both window positions 6 and 7.
    """
    keys = torch.zeros(1, 1, 8, 2)
    keys[0, 0, 1, 0] = LN3
    keys[0, 0, 4, 1] = LN3
    query = torch.zeros(1, 2, 8, 2)
    query[0, 0, :, 0] = 1.0  # head A
    query[0, 1, :, 1] = 1.0  # head B
    return query, keys


def test_snapkv_scores_by_hand_before_pooling():
    # Head A: exp(logits) = [1, 3, 1, 1, 1, 1, 1, 1].
    #   window query at position 6 sees keys 0..6 (causal inside the window): sum 9 -> [1,3,1,1,1,1,1,0]/9
    #   window query at position 7 sees keys 0..7: sum 10 -> [1,3,1,1,1,1,1,1]/10
    #   mean over the two: key 0: (1/9 + 1/10)/2 = 19/180; key 1: 3 x 19/180 = 57/180.
    # Head B: the same with the peak at key 4. Columns 0..n-w-1 = 0..5 kept.
    # GQA mean of A and B, in units of 1/180: [19, (57+19)/2, 19, 19, (19+57)/2, 19] = [19, 38, 19, 19, 38, 19].
    # (Without the causal mask inside the window both rows would be /10: key 0 would get 1/10 = 18/180.)
    query, keys = _hand_example()
    scores = snapkv_scores(query, keys, window=2, scaling=1.0, kernel_size=1)
    assert scores.dtype == torch.float32 and scores.shape == (1, 6)
    torch.testing.assert_close(scores[0], torch.tensor([19, 38, 19, 19, 38, 19]) / 180.0)


def test_snapkv_scores_by_hand_with_the_kernel_5_pool():
    # avg_pool1d(kernel 5, padding 2), zero padding counted (divide by 5), on [19, 38, 19, 19, 38, 19]/180,
    # in units of 1/900:  key 0: 0+0+19+38+19 = 76;   key 1: 0+19+38+19+19 = 95;   key 2: 19+38+19+19+38 = 133;
    #                     key 3: 38+19+19+38+19 = 133; key 4: 19+19+38+19+0 = 95;  key 5: 19+38+19+0+0 = 76.
    query, keys = _hand_example()
    scores = snapkv_scores(query, keys, window=2, scaling=1.0, kernel_size=5)
    torch.testing.assert_close(scores[0], torch.tensor([76, 95, 133, 133, 95, 76]) / 900.0)
    # cap 2: the raw peaks are keys 1 and 4, but pooling moves the choice to their shared neighbourhood,
    # keys 2 and 3; then the window 6, 7 is appended.
    positions = topk_positions(scores, [2], prompt_len=8, window=2)
    assert positions[0].tolist() == [2, 3, 6, 7]


def test_snapkv_scores_default_scaling_is_the_inverse_sqrt_of_head_dim():
    query, keys = _hand_example()
    explicit = snapkv_scores(query, keys, window=2, scaling=2**-0.5)
    default = snapkv_scores(query, keys, window=2)
    torch.testing.assert_close(explicit, default)


def test_topk_positions_saturation_and_empty_caps():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.4, 0.3, 0.2, 0.1]])
    # n = 6, w = 2: 4 keys before the window. Head 0 cap 4 >= n - w: keeps all 6. Head 1 cap 0: the window only.
    positions = topk_positions(scores, [4, 0], prompt_len=6, window=2)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert positions[1].tolist() == [4, 5]
    # cap 2 on head 0: keys 3 (0.9) and 1 (0.5), sorted, then the window
    assert topk_positions(scores, [2, 1], 6, 2)[0].tolist() == [1, 3, 4, 5]
    assert topk_positions(scores, [2, 1], 6, 2)[1].tolist() == [0, 4, 5]
    with pytest.raises(ValueError, match=r"scores must be \(H_kv, n - w\) = \(2, 5\)"):
        topk_positions(scores, [1, 1], prompt_len=7, window=2)


def test_snapkv_scores_errors():
    query, keys = _hand_example()
    with pytest.raises(InvalidParameterError, match="window w=8 must be < the prompt length n=8"):
        snapkv_scores(query, keys, window=8)
    with pytest.raises(InvalidParameterError, match="kernel_size must be odd"):
        snapkv_scores(query, keys, window=2, kernel_size=4)
    with pytest.raises(ValueError, match="do not match"):
        snapkv_scores(query[:, :, :7], keys, window=2)


# ------------------------------------------------------------------- the prefill, without a model

SHAPE = ModelShape(layers=3, query_heads=4, kv_heads=2)


def _prefill_states(n, shape=SHAPE, dim=4, seed=0):
    """Random post-RoPE (query, key, value) of an n-token prompt, per layer."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(shape.layers):
        query = torch.randn(1, shape.query_heads, n, dim, generator=g)
        key = torch.randn(1, shape.kv_heads, n, dim, generator=g)
        states.append((query, key, torch.randn(1, shape.kv_heads, n, dim, generator=g)))
    return states


def _run_prefill(press, n, shape=SHAPE, dim=4, seed=0):
    """Drive the per-head attention function as a model's layers would, on random states."""
    from sparsemm_utils import compression as comp

    session = CompressionSession(press, shape, PerHeadKVCache(shape.layers, decode_reserve=0))
    with comp.COMPRESSION_HOOK.activate(session):
        for layer_idx, (query, key, value) in enumerate(_prefill_states(n, shape, dim, seed)):
            module = SimpleNamespace(layer_idx=layer_idx, num_key_value_groups=shape.group_size, is_causal=True)
            key_out, value_out = session.cache.update(key, value, layer_idx)
            output, _ = per_head_attention(module, query, key_out, value_out, None, scaling=dim**-0.5)
            assert output.shape == (1, n, shape.query_heads, dim)
    return session


def test_sparsemm_prefill_keeps_cap_plus_window_per_head_by_hand():
    # Scores put everything on query heads 0-1 (KV group 0) of layer 0. B = 14, w = 4: b = 10,
    # m = floor(0.1 x 10) = 1, P = 9 x 3 x 2 = 54. cap[0, 0] = round(1 x 54 + 1) = 55, every other cap = 1.
    # n = 20: n - w = 16 -> head (0, 0) saturates and keeps all 20; the others keep 1 + 4 = 5.
    scores = np.zeros((3, 4))
    scores[0, :2] = 1.0
    session = _run_prefill(SparseMMPress(budget=14, window=4, head_scores=scores), n=20)
    np.testing.assert_array_equal(session.assigned, [[55, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(session.cache.stored_tokens(), [[20, 5], [5, 5], [5, 5]])
    np.testing.assert_array_equal(session.saturated(), [[True, False], [False, False], [False, False]])
    for layer in session.cache.layers:  # every head ends with the window 16..19
        for positions in layer.prompt_positions():
            assert positions[-4:].tolist() == [16, 17, 18, 19]


def test_a_prompt_shorter_than_the_budget_is_not_compressed():
    # SnapKV B = 24 > n = 20: the original returns the cache uncompressed (every layer, every head).
    session = _run_prefill(SnapKVPress(budget=24, window=4), n=20)
    np.testing.assert_array_equal(session.cache.stored_tokens(), np.full((3, 2), 20))
    assert session.skipped_layers == [0, 1, 2]
    # at n = B = 24 it compresses: 20 selected + 4
    session = _run_prefill(SnapKVPress(budget=24, window=4), n=24)
    np.testing.assert_array_equal(session.cache.stored_tokens(), np.full((3, 2), 24))
    assert session.skipped_layers == []


def test_streamingllm_keeps_sinks_and_recent_tokens():
    # B = 10, w = 4, sink 2: b = 6 -> sinks 0, 1 + the 4 tokens before the window (16..19 of n - w = 20) + window.
    session = _run_prefill(StreamingLLMPress(budget=10, window=4, sink=2), n=24)
    for layer in session.cache.layers:
        for positions in layer.prompt_positions():
            assert positions.tolist() == [0, 1, 16, 17, 18, 19, 20, 21, 22, 23]


def test_pyramidkv_prefill_follows_the_layer_schedule():
    # B = 12, w = 4, n = 40, L = 3: base 8, min 8 // 20 = 0, max 16 (< n - w = 36), steps (16 - 0) // 2 = 8:
    # layers select 16, 8, 0 tokens (+ the window).
    session = _run_prefill(PyramidKVPress(budget=12, window=4), n=40)
    np.testing.assert_array_equal(session.cache.stored_tokens(), [[20, 20], [12, 12], [4, 4]])


def test_adakv_prefill_uses_each_layers_scores():
    session = _run_prefill(AdaKVPress(budget=12, window=4), n=40)
    # per layer: caps from that layer's pooled scores; the floor floor(0.2 x 8) = 1 and the layer total
    # (rounding aside) 2 x 8 = 16
    assert (session.assigned >= 1).all()
    assert np.abs(session.assigned.sum(axis=1) - 16).max() <= 1
    np.testing.assert_array_equal(session.cache.stored_tokens(), np.minimum(session.assigned, 36) + 4)


def _property_press(method, budget, window, seed):
    kwargs = {"budget": budget, "window": window}
    if method == "sparsemm":
        kwargs["head_scores"] = np.random.default_rng(seed).random((SHAPE.layers, SHAPE.query_heads))
    if method == "streamingllm":
        kwargs["sink"] = min(2, budget - window)
    return make_press(method, **kwargs)


@PROPERTY
@given(
    method=st.sampled_from(["sparsemm", "random", "snapkv", "pyramidkv", "streamingllm"]),
    budget=st.integers(5, 40),
    window=st.integers(1, 4),
    n=st.integers(1, 48),
    seed=st.integers(0, 1000),
)
def test_the_cache_stores_what_the_allocation_assigns(method, budget, window, n, seed):
    # Invariant: after the prefill, KV head (l, g) stores exactly HeadCapacities.stored(n)[l, g]:
    # min(cap, n - w) + min(w, n), or all n where the original skips the prompt (n < B).
    # So the total is the allocation's total after the n - w limit, and every head holds at least
    # its floor (min(m, n - w) + w for SparseMM / random).
    press = _property_press(method, budget, window, seed)
    session = _run_prefill(press, n=n, seed=seed)
    expected = press.capacities(SHAPE, n).stored(n)
    np.testing.assert_array_equal(session.cache.stored_tokens(), expected)
    if method in ("sparsemm", "random"):
        floor = press.allocation.floor_capacity
        assert (session.cache.stored_tokens() >= min(floor, max(n - window, 0)) + min(window, n)).all()
        caps = press.capacities(SHAPE, n)
        assert session.cache.stored_tokens().sum() == (effective_kept(caps.selected, n, window, budget=budget) + min(window, n)).sum()


# ------------------------------------------------------------------ a shared prefill, without a model


def _shared_prefill(states, query_window):
    """A :class:`SharedPrefill` of hand-made states keeping the last ``query_window`` queries."""
    n = states[0][1].shape[2]
    layers = tuple(
        LayerPrefill(key, value, query[:, :, max(n - query_window, 0) :].clone(), 4**-0.5) for query, key, value in states
    )
    return SharedPrefill(
        input_ids=torch.zeros(1, n, dtype=torch.long), layers=layers, shape=SHAPE, query_window=query_window,
        first_logits=torch.zeros(5), first_token=0, last_position_ids=None, max_new_tokens=1,
        logits_processor=LogitsProcessorList(), stopping_criteria=StoppingCriteriaList(),
    )  # fmt: skip


def test_window_scores_equal_snapkv_scores_of_the_full_queries():
    query, key, _ = _prefill_states(12)[0]
    for window, kernel in ((1, 1), (3, 5), (11, 3)):
        full = snapkv_scores(query, key, window, 0.5, kernel)
        torch.testing.assert_close(snapkv_window_scores(query[:, :, 12 - window :], key, 0.5, kernel), full, rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="window w=12 must be < the prompt length n=12"):
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
def test_a_shared_prefill_decides_what_the_batch_one_session_decides(method, budget, window, extra, n, seed):
    # Invariant: from the keys and only the last (window + extra) queries, every method assigns the same
    # caps, skips the same layers and keeps the same positions as the batch-1 path with all n queries.
    press = _property_press(method, budget, window, seed)
    session = _run_prefill(press, n=n, seed=seed)
    row = compress_prefill(_shared_prefill(_prefill_states(n, seed=seed), window + extra), press)
    np.testing.assert_array_equal(row.decisions.assigned, session.assigned)
    assert row.decisions.skipped_layers == session.skipped_layers
    assert row.decisions.prompt_len == session.prompt_len == n
    np.testing.assert_array_equal(row.decisions.saturated(), session.saturated())
    for layer_idx, positions in enumerate(row.positions):
        expected = [p.tolist() for p in session.cache.layers[layer_idx].prompt_positions()]
        assert (positions is None and expected == [list(range(n))] * SHAPE.kv_heads) or (
            positions is not None and [p.tolist() for p in positions] == expected
        )


def test_methods_sharing_a_window_score_each_layer_once():
    prefill = _shared_prefill(_prefill_states(30, seed=1), 8)
    for press in (SnapKVPress(budget=12, window=8), AdaKVPress(budget=16, window=8), SnapKVPress(budget=12, window=4)):
        compress_prefill(prefill, press)
    assert sorted(prefill.layers[0]._scores) == [(4, 5, "float32"), (8, 5, "float32")]
    # the original's rounding is scored apart, once
    for press in (SnapKVPress(budget=12, window=8, selection_dtype="model"), AdaKVPress(budget=16, window=8, selection_dtype="model")):
        compress_prefill(prefill, press)
    assert sorted(prefill.layers[0]._scores) == [(4, 5, "float32"), (8, 5, "float32"), (8, 5, "model")]


def test_fullkv_keeps_everything_and_assigns_nothing_as_its_batch_one_session():
    row = compress_prefill(_shared_prefill(_prefill_states(10, seed=2), 4), FullKVPress())
    assert row.positions == (None, None, None)
    assert (row.decisions.assigned == -1).all() and row.decisions.skipped_layers == [] and row.decisions.prompt_len == 10


def test_a_shared_prefill_refuses_misuse_with_the_fix():
    prefill = _shared_prefill(_prefill_states(20, seed=3), 4)
    with pytest.raises(SharedPrefillError, match=r"recorded 4: call shared_prefill\(\.\.\., query_window=8\)"):
        compress_prefill(prefill, SnapKVPress(budget=12, window=8))
    with pytest.raises(PrefillNotShareableError, match="head-mask ablation"):
        check_shareable(HeadMaskAblation(selection="random"))
    with pytest.raises(PrefillNotShareableError, match="press must be one of"):
        check_shareable(object())
    wrong = SparseMMPress(budget=12, window=4, head_scores=np.ones((4, 4)))
    with pytest.raises(ScoreShapeError, match=r"the model needs \(layers, query_heads\) = \(3, 4\)"):
        compress_prefill(prefill, wrong)


# --------------------------------------------------------------------------------- head masks


def test_top_head_mask_by_hand():
    # L = 2, H = 5: 10 heads; fraction 0.2 -> k = 2: the two highest scores, 0.9 at (1, 3) and 0.8 at (0, 1).
    scores = np.array([[0.1, 0.8, 0.0, 0.3, 0.2], [0.0, 0.5, 0.4, 0.9, 0.0]])
    shape = ModelShape(2, 5, 5)
    mask = HeadMaskAblation(selection="top", fraction=0.2, head_scores=scores).masked_heads(shape)
    assert sorted(zip(*np.nonzero(mask))) == [(0, 1), (1, 3)]


def test_random_head_mask_is_seeded_and_of_the_same_size():
    shape = ModelShape(4, 8, 2)
    a = HeadMaskAblation(selection="random", fraction=0.1, seed=3).masked_heads(shape)
    b = HeadMaskAblation(selection="random", fraction=0.1, seed=3).masked_heads(shape)
    c = HeadMaskAblation(selection="random", fraction=0.1, seed=4).masked_heads(shape)
    assert a.sum() == round(0.1 * 32) == 3
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_head_mask_attention_is_uniform_for_masked_heads():
    from sparsemm_utils import compression as comp

    shape = ModelShape(1, 2, 1)
    press = HeadMaskAblation(selection="top", fraction=0.5, head_scores=np.array([[0.0, 1.0]]))
    session = CompressionSession(press, shape, cache=None, head_mask=press.masked_heads(shape))
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 3, 4, generator=g)
    key = torch.randn(1, 1, 3, 4, generator=g)
    value = torch.randn(1, 1, 3, 4, generator=g)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True)
    with comp.COMPRESSION_HOOK.activate(session):
        out, _ = comp.head_mask_attention(module, query, key, value, None, scaling=0.5)
    # head 1 masked: query i averages values 0..i uniformly (causal); head 0 untouched
    uniform = torch.cumsum(value[0, 0], dim=0) / torch.arange(1, 4)[:, None]
    torch.testing.assert_close(out[0, :, 1], uniform)
    normal = torch.softmax((query[0, 0] @ key[0, 0].T * 0.5).masked_fill(torch.ones(3, 3).triu(1).bool(), -1e9), -1)
    torch.testing.assert_close(out[0, :, 0], normal @ value[0, 0])


# --------------------------------------------------------------------------------------- errors


def test_every_method_is_registered_and_built_by_name():
    assert set(COMPRESSION_METHODS) == {
        "fullkv", "sparsemm", "random", "snapkv", "pyramidkv", "adakv", "streamingllm", "head_mask"
    }
    assert isinstance(make_press("SnapKV", budget=64), SnapKVPress)
    assert isinstance(make_press("fullkv"), FullKVPress)
    assert isinstance(make_press("random", budget=64, seed=2), RandomPress)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UnknownCompressionMethodError, match="unknown compression method 'h2o'; known methods: adakv"):
        make_press("h2o", budget=64)
    with pytest.raises(InvalidParameterError, match="SnapKVPress does not take ratio; its parameters are: budget"):
        make_press("snapkv", budget=64, ratio=0.1)


@pytest.mark.parametrize("budget", [64.0, 64.5, "64", None])
def test_non_integer_budgets_are_rejected(budget):
    with pytest.raises(InvalidBudgetError, match="budget must be an int"):
        SnapKVPress(budget=budget)


@pytest.mark.parametrize("cls", [SnapKVPress, PyramidKVPress, AdaKVPress, StreamingLLMPress, RandomPress])
def test_a_budget_not_above_the_window_is_rejected(cls):
    with pytest.raises(InvalidBudgetError, match="budget B=32 must exceed the window w=32"):
        cls(budget=32)
    with pytest.raises(InvalidBudgetError, match="B=8 must exceed the window w=16"):
        cls(budget=8, window=16)


def test_scores_missing_or_of_the_wrong_shape():
    with pytest.raises(MissingAllocationInputError, match="head_scores=... is required"):
        SparseMMPress(budget=64)
    with pytest.raises(MissingAllocationInputError, match="head_scores=... is required"):
        HeadMaskAblation(selection="top")
    press = SparseMMPress(budget=64, head_scores=np.ones((3, 2)))  # per-KV-head scores by mistake
    with pytest.raises(ScoreShapeError, match=r"shape \(3, 2\) but the model needs \(layers, query_heads\) = \(3, 4\)"):
        press.validate_for(SHAPE)
    with pytest.raises(ScoreShapeError, match=r"\(5, 4\)"):
        HeadMaskAblation(head_scores=np.ones((5, 4))).validate_for(SHAPE)


def test_other_parameters_are_validated():
    with pytest.raises(InvalidParameterError, match="kernel_size must be odd"):
        SnapKVPress(budget=64, kernel_size=4)
    with pytest.raises(InvalidParameterError, match="ratio"):
        SparseMMPress(budget=64, head_scores=np.ones((3, 4)), ratio=1.5)
    with pytest.raises(InvalidParameterError, match="sink"):
        StreamingLLMPress(budget=36, sink=5)
    with pytest.raises(InvalidParameterError, match="fraction must be a number in"):
        HeadMaskAblation(selection="random", fraction=0.0)
    with pytest.raises(InvalidParameterError, match="selection must be one of 'top', 'random', got 'bottom'"):
        HeadMaskAblation(selection="bottom")
    with pytest.raises(MissingAllocationInputError, match="AdaKV's caps depend on each layer's attention"):
        AdaKVPress(budget=64).capacities(SHAPE, 100)


def test_the_attention_function_outside_a_context_says_what_to_do():
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=1)
    x = torch.zeros(1, 1, 2, 4)
    with pytest.raises(NoActiveCompressionError, match="compressed_generate"):
        per_head_attention(module, x, x, x, None)


def test_presses_are_frozen():
    press = SnapKVPress(budget=64)
    with pytest.raises(AttributeError):
        press.budget = 128
