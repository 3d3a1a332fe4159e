"""Budget allocation rules (docs/method.md §5) on hand-worked numbers, invariants, and errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.allocation import (
    ALLOCATION_METHODS,
    AdaKVAllocation,
    AllocationError,
    FullKV,
    HeadCapacities,
    HeadGroupingError,
    InvalidBudgetError,
    InvalidParameterError,
    InvalidScoresError,
    MissingAllocationInputError,
    ModelShape,
    PyramidKVAllocation,
    RandomAllocation,
    ScoreShapeError,
    SnapKVAllocation,
    SparseMMAllocation,
    StreamingLLMAllocation,
    UnknownAllocationMethodError,
    adakv_caps,
    effective_kept,
    kv_group_sum,
    make_allocation,
    normalise_head_scores,
    pyramidkv_caps,
    redistribute_saturated,
    sparsemm_caps,
    streaming_llm_positions,
    uniform_floor,
    validate_head_scores,
)

PROPERTY = settings(max_examples=80, deadline=None)

# The running example: L=2 layers, H=4 query heads, H_kv=2 KV heads (query heads 0,1 -> KV head 0;
# 2,3 -> KV head 1). B=42, w=32 -> b=10; r=0.1 -> m=floor(1.0)=1; P=(10-1)*2*2=36.
SHAPE = ModelShape(layers=2, query_heads=4, kv_heads=2)
# sum(S) = 8, so every s~ is a multiple of 1/8 (exact in binary floating point).
DYADIC = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 3.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------ SparseMM, by hand


def test_sparsemm_budget_terms_by_hand():
    alloc = SparseMMAllocation(budget=42)
    assert (alloc.window, alloc.ratio, alloc.saturation) == (32, 0.1, "fidelity")  # docs/method.md §5 defaults
    assert alloc.selected_budget == 10  # b = 42 - 32
    assert alloc.floor_capacity == 1  # m = floor(0.1 * 10)
    assert alloc.pool(SHAPE) == 36  # (10 - 1) * 2 layers * 2 KV heads
    assert alloc.total_budget(SHAPE) == 42 * 2 * 2  # B counts the window


def test_sparsemm_caps_with_half_to_even_ties_by_hand():
    # s~ = S / 8. GQA sums: layer 0: g0 = (1 + 0)/8 = 1/8, g1 = (2 + 1)/8 = 3/8;
    #                       layer 1: g0 = (0 + 3)/8 = 3/8, g1 = (1 + 0)/8 = 1/8.
    # caps: 1/8 * 36 + 1 = 5.5 -> 6 (half to even); 3/8 * 36 + 1 = 14.5 -> 14 (half to even).
    # Total 6 + 14 + 14 + 6 = 40 = b * L * H_kv.
    sigma = kv_group_sum(normalise_head_scores(DYADIC), 2)
    np.testing.assert_array_equal(sigma, [[0.125, 0.375], [0.375, 0.125]])
    caps = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=DYADIC)
    assert isinstance(caps, HeadCapacities)
    assert caps.selected.dtype == np.int64 and caps.window == 32 and caps.method == "sparsemm"
    np.testing.assert_array_equal(caps.selected, [[6, 14], [14, 6]])
    assert caps.total_selected == 40
    np.testing.assert_array_equal(caps.stored(10_000), [[38, 46], [46, 38]])  # + the 32-token window


def test_sparsemm_caps_non_dyadic_by_hand():
    # S = [[1,1,1,0],[0,0,0,0]], sum 3 -> sigma = [[2/3, 1/3], [0, 0]].
    # caps: 2/3*36 + 1 = 25; 1/3*36 + 1 = 13; 0*36 + 1 = 1 (the floor m); total 40.
    scores = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    caps = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=scores).selected
    np.testing.assert_array_equal(caps, [[25, 13], [1, 1]])


def test_sparsemm_accepts_torch_tensors_of_any_float_dtype():
    expected = [[6, 14], [14, 6]]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tensor = torch.tensor(DYADIC, dtype=dtype)  # small integers: exact in bfloat16 too
        caps = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=tensor).selected
        np.testing.assert_array_equal(caps, expected)


def test_uniform_floor_uses_the_float_product_like_the_original():
    assert uniform_floor(10, 0.1) == 1
    assert uniform_floor(224, 0.1) == 22  # B = 256, w = 32: floor(22.4)
    # 0.29 * 100 == 28.999999999999996 in binary floating point; int() of it (the original) is 28.
    assert uniform_floor(100, 0.29) == 28
    assert uniform_floor(100, 0.0) == 0 and uniform_floor(100, 1.0) == 100


def test_ratio_one_is_snapkv():
    # r = 1: m = b, P = 0, every cap = round(0 + b) = b, whatever the scores.
    caps = SparseMMAllocation(budget=42, ratio=1.0).capacities(SHAPE, head_scores=DYADIC).selected
    snap = SnapKVAllocation(budget=42).capacities(SHAPE).selected
    np.testing.assert_array_equal(caps, snap)
    np.testing.assert_array_equal(snap, np.full((2, 2), 10))


def test_groups_are_consecutive_query_heads():
    # H=4, H_kv=2: heads 0,1 -> KV head 0. All the score on query head 1 -> all of P to KV head 0.
    scores = np.array([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    caps = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=scores).selected
    np.testing.assert_array_equal(caps, [[37, 1], [1, 1]])  # 1 * 36 + 1 = 37; the others get m = 1


def _original_sparsemm_caps(flat_scores, layers, heads, groups, budget, window, ratio):
    """A line-by-line transliteration of the original SparseMM.__init__ (torch), as an oracle."""
    base_capacity = budget - window
    head_score_list = torch.tensor(np.array(flat_scores) / sum(flat_scores))
    score = head_score_list.view(layers, heads // groups, groups).sum(dim=-1)
    min_cache = int(base_capacity * ratio)
    remain_capacity = (base_capacity - min_cache) * layers * heads // groups
    return torch.round(score * remain_capacity + min_cache).int().numpy()


@PROPERTY
@given(
    layers=st.integers(1, 6),
    kv_heads=st.integers(1, 4),
    group=st.integers(1, 4),
    budget=st.integers(33, 2048),
    ratio=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.29, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_sparsemm_matches_a_transliteration_of_the_original(layers, kv_heads, group, budget, ratio, seed):
    heads = kv_heads * group
    scores = np.random.default_rng(seed).random((layers, heads)) * (np.arange(heads) % 3)
    if not scores.any():
        scores[0, 0] = 1.0
    ours = SparseMMAllocation(budget=budget, ratio=ratio).capacities(
        (layers, heads, kv_heads), head_scores=scores
    ).selected
    oracle = _original_sparsemm_caps(scores.ravel().tolist(), layers, heads, group, budget, 32, ratio)
    np.testing.assert_array_equal(ours, oracle)


@PROPERTY
@given(
    layers=st.integers(1, 8),
    kv_heads=st.integers(1, 8),
    group=st.integers(1, 4),
    budget=st.integers(33, 4096),
    window=st.integers(1, 32),
    ratio=st.floats(0.0, 1.0),
    scores=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=256),
)
def test_fidelity_caps_sum_to_the_budget_within_rounding_and_respect_the_floor(
    layers, kv_heads, group, budget, window, ratio, scores
):
    heads = kv_heads * group
    grid = np.resize(np.array(scores), (layers, heads))
    if not grid.any():
        grid[0, 0] = 1.0
    alloc = SparseMMAllocation(budget=budget, window=window, ratio=ratio)
    caps = alloc.capacities((layers, heads, kv_heads), head_scores=grid).selected
    n_heads = layers * kv_heads
    b = budget - window
    # sum of the unrounded caps sigma*P + m is exactly P + n_heads*m = n_heads*b; each rounding moves one
    # cap by at most 0.5, so |sum(caps) - n_heads*b| <= n_heads/2, i.e. <= n_heads // 2 (an integer).
    assert abs(int(caps.sum()) - n_heads * b) <= n_heads // 2
    assert (caps >= alloc.floor_capacity).all()  # sigma >= 0, so every head keeps at least m
    # only the globally normalised scores matter (x4 is exact in binary floating point)
    scaled = alloc.capacities((layers, heads, kv_heads), head_scores=grid * 4.0).selected
    np.testing.assert_array_equal(caps, scaled)


# --------------------------------------------------------------------------- saturation, by hand


def test_short_prompt_fidelity_loses_the_surplus_and_redistribute_hands_it_on():
    # L=1, H=H_kv=4, B=42, w=32: b=10, m=1, P=9*4=36. S=[5,3,1,0], sum 9 -> sigma=[5/9,3/9,1/9,0].
    # caps: 20+1=21, 12+1=13, 4+1=5, 0+1=1 (total 40).
    shape = ModelShape(1, 4, 4)
    scores = np.array([[5.0, 3.0, 1.0, 0.0]])
    fidelity = SparseMMAllocation(budget=42).capacities(shape, head_scores=scores)
    np.testing.assert_array_equal(fidelity.selected, [[21, 13, 5, 1]])
    # Prompt n=46 -> n - w = 14 selectable tokens. Fidelity: head 0 keeps 14, its 7 extra are lost.
    np.testing.assert_array_equal(fidelity.kept(46), [[14, 13, 5, 1]])  # total 33 of 40
    # Redistribute, round 1: surplus 21-14 = 7 to heads 1,2,3 by sigma 3:1:0 -> shares 5.25, 1.75, 0
    #   -> floors 5, 1, 0 and the one left over to the largest fraction (.75, head 2): 5, 2, 0
    #   -> [14, 18, 7, 1]. Round 2: head 1 saturates (18 > 14), surplus 4 to heads 2,3 by 1:0
    #   -> [14, 14, 11, 1]. Total 40, kept.
    redistributed = SparseMMAllocation(budget=42, saturation="redistribute").capacities(
        shape, head_scores=scores, prompt_len=46
    )
    np.testing.assert_array_equal(redistributed.selected, [[14, 14, 11, 1]])
    np.testing.assert_array_equal(redistributed.kept(46), [[14, 14, 11, 1]])


def test_redistribute_with_gqa_by_hand():
    # The running example, caps [[6,14],[14,6]]; n = 44 -> n - w = 12: the two 14s saturate,
    # surplus 2 + 2 = 4 to the two 6s by sigma 1/8 : 1/8 -> 2 each -> [[8,12],[12,8]] (total 40).
    alloc = SparseMMAllocation(budget=42, saturation="redistribute")
    caps = alloc.capacities(SHAPE, head_scores=DYADIC, prompt_len=44).selected
    np.testing.assert_array_equal(caps, [[8, 12], [12, 8]])
    fidelity = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=DYADIC)
    np.testing.assert_array_equal(fidelity.kept(44), [[6, 12], [12, 6]])  # total 36: 4 lost


def test_redistribute_splits_equally_when_the_open_heads_have_no_score():
    # S=[1,0,0,0] -> caps [37,1,1,1]; n - w = 14: surplus 23 to three heads of score 0 -> equal shares
    # 23/3 = 7.67 each -> floors 7,7,7, the 2 left to the largest fractions (all equal: lowest index)
    # -> [14, 9, 9, 8].
    caps = redistribute_saturated(np.array([[37, 1, 1, 1]]), np.array([[1.0, 0.0, 0.0, 0.0]]), 14)
    np.testing.assert_array_equal(caps, [[14, 9, 9, 8]])


def test_redistribute_rounds_by_largest_remainder():
    # available 10: head 0 gives up 3; heads 1, 2 share it 3:1 -> 2.25, 0.75 -> floors 2, 0; the one
    # left goes to the largest fraction (0.75, head 2) -> [10, 4, 3], not [10, 5, 2].
    caps = redistribute_saturated(np.array([13, 2, 2]), np.array([1.0, 3.0, 1.0]), 10)
    np.testing.assert_array_equal(caps, [10, 4, 3])


def test_redistribute_loses_only_what_no_head_can_hold():
    # Every head saturated: total kept = 4 heads * 3 available tokens.
    caps = redistribute_saturated(np.array([[21, 13, 5, 1]]), np.array([[5.0, 3.0, 1.0, 0.0]]), 3)
    np.testing.assert_array_equal(caps, [[3, 3, 3, 3]])


@PROPERTY
@given(
    layers=st.integers(1, 5),
    kv_heads=st.integers(1, 6),
    group=st.integers(1, 3),
    budget=st.integers(33, 600),
    prompt_len=st.integers(1, 800),
    seed=st.integers(0, 2**31),
    sparsity=st.floats(0.0, 0.9),
)
def test_redistribute_keeps_min_of_budget_and_available(layers, kv_heads, group, budget, prompt_len, seed, sparsity):
    heads = kv_heads * group
    rng = np.random.default_rng(seed)
    scores = rng.random((layers, heads)) ** 4 * (rng.random((layers, heads)) > sparsity)
    if not scores.any():
        scores[-1, -1] = 1.0
    shape = (layers, heads, kv_heads)
    fidelity = SparseMMAllocation(budget=budget).capacities(shape, head_scores=scores)
    redistributed = SparseMMAllocation(budget=budget, saturation="redistribute").capacities(
        shape, head_scores=scores, prompt_len=prompt_len
    )
    available = max(prompt_len - 32, 0)
    caps = redistributed.selected
    assert caps.sum() == min(fidelity.total_selected, available * layers * kv_heads)
    assert (caps <= available).all()
    assert (caps >= np.minimum(fidelity.selected, available)).all()  # nobody loses by redistribution
    np.testing.assert_array_equal(redistributed.kept(prompt_len), caps)
    # fidelity never keeps more in total than redistribute
    assert fidelity.kept(prompt_len).sum() <= caps.sum()


# ----------------------------------------------------------------------- effective kept, by hand


def test_effective_kept_per_head_and_the_whole_layer_skip():
    caps = np.array([[6, 14], [14, 6]])
    # n = 44, w = 32: 12 selectable; min(cap, 12).
    np.testing.assert_array_equal(effective_kept(caps, 44, 32), [[6, 12], [12, 6]])
    # n = 20 < w: nothing precedes the window.
    np.testing.assert_array_equal(effective_kept(caps, 20, 32), np.zeros((2, 2)))
    # The original skips compression in every layer when n < B (b > n - w): n = 40, B = 42 -> all 8 kept,
    # even by the heads whose cap is 6.
    np.testing.assert_array_equal(effective_kept(caps, 40, 32, budget=42), np.full((2, 2), 8))
    np.testing.assert_array_equal(effective_kept(caps, 40, 32), [[6, 8], [8, 6]])


def test_budget_equal_to_the_prompt_does_not_keep_everything_in_fidelity():
    # B = n = 42: no whole-layer skip (42 < 42 is false), n - w = 10 = b; the heads with cap 6 still drop 4.
    caps = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=DYADIC)
    np.testing.assert_array_equal(caps.kept(42), [[6, 10], [10, 6]])
    # SnapKV and PyramidKV keep everything at B = n.
    np.testing.assert_array_equal(SnapKVAllocation(budget=42).capacities(SHAPE).kept(42), np.full((2, 2), 10))
    pyramid = PyramidKVAllocation(budget=42).capacities(SHAPE, prompt_len=42)
    np.testing.assert_array_equal(pyramid.kept(42), np.full((2, 2), 10))


def _all_methods(budget, seed):
    return [
        SparseMMAllocation(budget=budget),
        SparseMMAllocation(budget=budget, saturation="redistribute"),
        RandomAllocation(budget=budget, seed=seed),
        RandomAllocation(budget=budget, seed=seed, saturation="redistribute"),
        SnapKVAllocation(budget=budget),
        PyramidKVAllocation(budget=budget),
        AdaKVAllocation(budget=budget),
        StreamingLLMAllocation(budget=budget),
        FullKV(),
    ]


@PROPERTY
@given(
    layers=st.integers(2, 5),
    kv_heads=st.integers(1, 4),
    prompt_len=st.integers(1, 300),
    extra=st.integers(1, 300),
    seed=st.integers(0, 1000),
)
def test_a_budget_above_the_prompt_length_keeps_everything(layers, kv_heads, prompt_len, extra, seed):
    budget = max(prompt_len + extra, 40)  # B > n, and b >= StreamingLLM's 4 sinks
    rng = np.random.default_rng(seed)
    shape = ModelShape(layers, 2 * kv_heads, kv_heads)
    inputs = dict(
        head_scores=rng.random((layers, 2 * kv_heads)),
        attention=rng.random((layers, kv_heads, max(prompt_len - 32, 1))),
        prompt_len=prompt_len,
    )
    for alloc in _all_methods(budget, seed):
        if alloc.name == "adakv" and prompt_len <= 32:
            continue  # AdaKV needs at least one key before the window
        caps = alloc.capacities(shape, **{k: v for k, v in inputs.items() if k in alloc.required_inputs})
        window = min(caps.window, prompt_len)
        np.testing.assert_array_equal(caps.stored(prompt_len), np.full(shape.kv_grid, prompt_len), err_msg=alloc.name)
        assert (caps.kept(prompt_len) + window == prompt_len).all()


# ----------------------------------------------------------------------------------- random


def test_random_allocation_is_sparsemm_on_seeded_uniform_scores():
    alloc = RandomAllocation(budget=42, seed=3)
    scores = np.random.default_rng(3).random((2, 4))
    np.testing.assert_array_equal(alloc.random_scores(SHAPE), scores)
    expected = SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=scores).selected
    caps = alloc.capacities(SHAPE, head_scores=np.ones((2, 4)))  # given scores are ignored
    np.testing.assert_array_equal(caps.selected, expected)
    assert caps.method == "random" and alloc.required_inputs == frozenset()


@PROPERTY
@given(seed=st.integers(0, 2**32 - 2), other=st.integers(1, 1000))
def test_random_allocation_is_reproducible_and_seed_dependent(seed, other):
    shape = ModelShape(28, 28, 4)  # Qwen2-VL-7B
    first = RandomAllocation(budget=256, seed=seed).capacities(shape).selected
    again = RandomAllocation(budget=256, seed=seed).capacities(shape).selected
    np.testing.assert_array_equal(first, again)
    different = RandomAllocation(budget=256, seed=seed + other).capacities(shape).selected
    assert not np.array_equal(first, different)


# --------------------------------------------------------------------------------- PyramidKV


def test_pyramidkv_without_the_prompt_length_branch_by_hand():
    # B=132, w=32 -> base=100; min=100//20=5; max=2*100-5=195; n=1000 -> n-w=968 > 195: no branch.
    # steps=(195-5)//(4-1)=190//3=63 -> layers keep 195, 132, 69, 6 (+ the window).
    np.testing.assert_array_equal(pyramidkv_caps(132, 32, 4, 1000), [195, 132, 69, 6])
    caps = PyramidKVAllocation(budget=132).capacities((4, 8, 2), prompt_len=1000)
    np.testing.assert_array_equal(caps.selected, [[195, 195], [132, 132], [69, 69], [6, 6]])
    assert caps.window == 32


def test_pyramidkv_with_the_prompt_length_branch_by_hand():
    # n=200 -> n-w=168 <= max=195: max=168, min=2*100-168=32; steps=(168-32)//3=136//3=45
    # -> 168, 123, 78, 33.
    np.testing.assert_array_equal(pyramidkv_caps(132, 32, 4, 200), [168, 123, 78, 33])
    # n=100 -> n-w=68 < base: max=68, min=200-68=132; steps=(68-132)//3=-64//3=-22 (floor division)
    # -> 68, 90, 112, 134: every layer holds all 68 tokens.
    np.testing.assert_array_equal(pyramidkv_caps(132, 32, 4, 100), [68, 90, 112, 134])
    np.testing.assert_array_equal(
        PyramidKVAllocation(budget=132).capacities((4, 2, 2), prompt_len=100).kept(100), np.full((4, 2), 68)
    )


def test_pyramidkv_beta_changes_the_slope():
    # beta=4: min=100//4=25, max=175, steps=(175-25)//3=50 -> 175, 125, 75, 25.
    np.testing.assert_array_equal(pyramidkv_caps(132, 32, 4, 1000, beta=4), [175, 125, 75, 25])


@PROPERTY
@given(layers=st.integers(2, 40), budget=st.integers(33, 3000), beta=st.integers(1, 40))
def test_pyramidkv_layers_average_at_least_base_on_long_prompts(layers, budget, beta):
    base = budget - 32
    caps = pyramidkv_caps(budget, 32, layers, prompt_len=10 * budget, beta=beta)
    # steps = floor((max - min) / (L - 1)) loses less than 1 per layer gap, so the sum is in
    # [L * base, L * base + L * (L - 1) / 2); the last layer keeps at least min.
    assert layers * base <= caps.sum() < layers * base + layers * (layers - 1) / 2
    assert (np.diff(caps) <= 0).all() and caps[-1] >= base // beta


# ------------------------------------------------------------------------------------- AdaKV

# One layer, H_kv=2, n - w = 6 keys per head, b=4. Sorted scores, both summing to 1:
HEAD0 = [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]  # top-4 mass 0.95
HEAD1 = [0.2, 0.2, 0.2, 0.2, 0.12, 0.08]  # top-4 mass 0.80
# Scaled: head 0 -> .475, .285, .095, .0475, .0285, .019; head 1 -> .16 x4, .096, .064.
# Layer-wide top 8: .475 .285 (h0), .16 x4 (h1), .096 (h1), .095 (h0) -> c = [3, 5].


def test_adakv_caps_by_hand():
    # alpha=0.2: floor(0.2*4)=floor(0.8)=0; caps = round(3*0.8)=round(2.4)=2, round(5*0.8)=4 -> [2, 4]
    # (total 6 < 8: AdaKV's rounding and floor lose budget).
    np.testing.assert_array_equal(adakv_caps(np.array([HEAD0, HEAD1]), 4, 0.2), [2, 4])
    # alpha=0.5: floor(2.0)=2; 3*0.5+2=3.5 -> 4 and 5*0.5+2=4.5 -> 4 (both half to even).
    np.testing.assert_array_equal(adakv_caps(np.array([HEAD0, HEAD1]), 4, 0.5), [4, 4])


def test_adakv_allocation_sorts_each_layer_and_checks_the_prompt_length():
    rng = np.random.default_rng(0)
    layer0 = np.array([rng.permutation(HEAD0), rng.permutation(HEAD1)])
    layer1 = layer0[::-1]  # heads swapped -> caps swapped
    alloc = AdaKVAllocation(budget=36, window=32)  # b = 4, alpha = 0.2
    caps = alloc.capacities((2, 4, 2), attention=np.stack([layer0, layer1]), prompt_len=38)
    np.testing.assert_array_equal(caps.selected, [[2, 4], [4, 2]])
    torch_caps = alloc.capacities((2, 4, 2), attention=torch.tensor(np.stack([layer0, layer1])))
    np.testing.assert_array_equal(torch_caps.selected, caps.selected)
    with pytest.raises(ScoreShapeError, match="prompt_len - window = 40 - 32 = 8"):
        alloc.capacities((2, 4, 2), attention=np.stack([layer0, layer1]), prompt_len=40)


def test_adakv_does_not_compress_when_b_exceeds_the_keys():
    # b = 7 > n - w = 6: the original returns the cache uncompressed, every head keeps 6.
    np.testing.assert_array_equal(adakv_caps(np.array([HEAD0, HEAD1]), 7, 0.2), [6, 6])
    # Without that skip the formula would give round(6*0.1 + floor(0.9*7)) = round(0.6 + 6) = 7 > 6.
    np.testing.assert_array_equal(adakv_caps(np.array([HEAD0, HEAD1]), 7, 0.9), [6, 6])


def test_adakv_at_b_equal_to_the_keys_can_drop_a_token():
    # b = n - w = 5, one head: c = 5; floor(0.5*5)=floor(2.5)=2; 5*0.5+2 = 4.5 -> 4 (half to even) < 5.
    np.testing.assert_array_equal(adakv_caps(np.array([[0.5, 0.4, 0.3, 0.2, 0.1]]), 5, 0.5), [4])


def test_adakv_rounds_in_float32_like_the_original():
    # H_kv=5, n - w = 15, b=3, alpha=0.7: floor(3*0.7)=floor(2.1)=2; layer-wide top 5*3=15 entries.
    # Head 0's scores (>= 0.9, weight top-3/total ~ 0.21 -> scaled >= 0.19) beat every scaled entry
    # of the others (0.01 * 3/15 = 0.002), so c = [15, 0, 0, 0, 0].
    # Head 0: float64 15*0.30000000000000004 + 2 = 6.500000000000001 -> 7, but the original's torch
    # expression (int tensor * Python float) is float32: 15*0.3f = 4.5, + 2 = 6.5 -> 6 (half to even).
    scores = np.vstack([np.linspace(1.0, 0.9, 15), np.full((4, 15), 0.01)])
    expected = torch.round(torch.tensor([15, 0, 0, 0, 0]) * (1 - 0.7) + 2).int().numpy()
    np.testing.assert_array_equal(expected, [6, 2, 2, 2, 2])
    np.testing.assert_array_equal(adakv_caps(scores, 3, 0.7), expected)
    np.testing.assert_array_equal(_original_adakv_caps(scores, 3, 0.7), expected)


def _original_adakv_caps(sorted_scores, base_capacity, floor_ratio):
    """Transliteration of the original AdaKVCluster.update_kv capacity lines (normalize=True), bsz=1."""
    sorted_attn_score = torch.tensor(sorted_scores)[None]
    num_kv_heads, length = sorted_scores.shape
    floor_capacity = int(base_capacity * floor_ratio)
    ratio_weight = sorted_attn_score[..., :base_capacity].sum(dim=-1, keepdim=True) / sorted_attn_score.sum(
        dim=-1, keepdim=True
    )
    adaptive = (sorted_attn_score * ratio_weight).reshape(1, length * num_kv_heads)
    indices = torch.topk(adaptive, k=num_kv_heads * base_capacity, dim=-1).indices // length
    counts = torch.zeros((1, num_kv_heads), dtype=indices.dtype)
    counts.scatter_add_(-1, indices, torch.ones_like(indices))
    return torch.round(counts * (1 - floor_ratio) + floor_capacity).int()[0].numpy()


@PROPERTY
@given(
    kv_heads=st.integers(1, 8),
    n_ctx=st.integers(1, 200),
    budget_frac=st.floats(0.01, 1.0),
    alpha=st.sampled_from([0.0, 0.2, 0.3, 0.55, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_adakv_matches_a_transliteration_of_the_original(kv_heads, n_ctx, budget_frac, alpha, seed):
    b = max(1, int(budget_frac * n_ctx))
    rng = np.random.default_rng(seed)
    raw = rng.random((kv_heads, n_ctx)) ** 3 + 1e-3  # continuous and peaked: ties have probability 0
    sorted_scores = -np.sort(-raw, axis=-1)
    ours = adakv_caps(sorted_scores, b, alpha)
    np.testing.assert_array_equal(ours, _original_adakv_caps(sorted_scores, b, alpha))
    assert (ours >= np.floor(alpha * b)).all() and (ours <= n_ctx).all()


# -------------------------------------------------------------------- StreamingLLM and FullKV


def test_streaming_llm_keeps_sinks_and_the_most_recent_tokens():
    # n=50, w=32 -> 18 positions before the window; b=10 with 4 sinks: 0..3 and the last 6: 12..17.
    np.testing.assert_array_equal(streaming_llm_positions(50, 10, 32, 4), [0, 1, 2, 3, 12, 13, 14, 15, 16, 17])
    np.testing.assert_array_equal(streaming_llm_positions(40, 10, 32, 4), np.arange(8))  # short prompt
    caps = StreamingLLMAllocation(budget=42, sink=4).capacities(SHAPE)
    np.testing.assert_array_equal(caps.selected, np.full((2, 2), 10))


def test_fullkv_stores_the_whole_prompt():
    caps = FullKV().capacities(SHAPE, prompt_len=1234)
    assert caps.window == 0
    np.testing.assert_array_equal(caps.stored(1234), np.full((2, 2), 1234))
    with pytest.raises(MissingAllocationInputError, match="prompt_len"):
        FullKV().capacities(SHAPE)


# -------------------------------------------------------------------------------- model shape


def test_model_shape_from_a_multimodal_config():
    text = SimpleNamespace(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
    config = SimpleNamespace(get_text_config=lambda: text)
    shape = ModelShape.from_config(config)
    assert shape == ModelShape(28, 12, 2) and shape.group_size == 6 and shape.kv_grid == (28, 2)
    mha = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None)
    assert ModelShape.from_config(mha) == ModelShape(2, 4, 4)


# ---------------------------------------------------------------------------------- registry


def test_registry_builds_every_method_by_name():
    assert set(ALLOCATION_METHODS) == {
        "sparsemm", "random", "snapkv", "pyramidkv", "adakv", "streamingllm", "fullkv"
    }
    for name, cls in ALLOCATION_METHODS.items():
        alloc = make_allocation(name) if cls is FullKV else make_allocation(name.upper(), budget=64)
        assert isinstance(alloc, cls) and alloc.name == name
    alloc = make_allocation("sparsemm", budget=256, ratio=0.2, saturation="redistribute")
    assert (alloc.selected_budget, alloc.floor_capacity) == (224, 44)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UnknownAllocationMethodError, match="known methods: adakv, fullkv, pyramidkv, random"):
        make_allocation("h2o", budget=64)


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(InvalidParameterError, match="does not take beta; its parameters are: budget, window"):
        make_allocation("snapkv", budget=64, beta=20)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("cls", [SparseMMAllocation, RandomAllocation, SnapKVAllocation, PyramidKVAllocation,
                                 AdaKVAllocation, StreamingLLMAllocation])
def test_budget_must_exceed_the_window(cls):
    with pytest.raises(InvalidBudgetError, match=r"B=32 must exceed the window w=32.*b = B - w = 0"):
        cls(budget=32)
    with pytest.raises(InvalidBudgetError, match="B=16 must exceed"):
        cls(budget=16)
    extra = {"sink": 1} if cls is StreamingLLMAllocation else {}  # its 4 default sinks need b >= 4
    assert cls(budget=33, **extra).selected_budget == 1  # the smallest valid budget


@pytest.mark.parametrize("budget", [64.0, 64.5, "64", True, None])
def test_budget_must_be_an_int(budget):
    with pytest.raises(InvalidBudgetError, match="budget must be an int"):
        SparseMMAllocation(budget=budget)


def test_other_parameters_are_validated():
    with pytest.raises(InvalidParameterError, match=r"ratio must lie in \[0, 1\], got 1.5"):
        SparseMMAllocation(budget=64, ratio=1.5)
    with pytest.raises(InvalidParameterError, match="saturation must be one of"):
        SparseMMAllocation(budget=64, saturation="clip")
    with pytest.raises(InvalidParameterError, match="window must be an int >= 1"):
        SnapKVAllocation(budget=64, window=0)
    with pytest.raises(InvalidParameterError, match=r"alpha must lie in \[0, 1\]"):
        AdaKVAllocation(budget=64, alpha=-0.1)
    with pytest.raises(InvalidParameterError, match="beta must be an int >= 1"):
        PyramidKVAllocation(budget=64, beta=0)
    with pytest.raises(InvalidParameterError, match="sink=40 exceeds b = B - w = 32"):
        StreamingLLMAllocation(budget=64, sink=40)
    with pytest.raises(InvalidParameterError, match="seed must be an int >= 0"):
        RandomAllocation(budget=64, seed=-1)
    with pytest.raises(InvalidParameterError, match="PyramidKV interpolates between layers"):
        PyramidKVAllocation(budget=64).capacities((1, 4, 4), prompt_len=100)
    with pytest.raises(InvalidParameterError, match="prompt_len must be an int >= 1"):
        SparseMMAllocation(budget=64).capacities(SHAPE, head_scores=DYADIC).kept(0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.nan, r"1 NaN/inf value\(s\), first at \(layer, head\)=\(1, 2\)"),
        (np.inf, r"NaN/inf"),
        (-0.5, r"negative value\(s\), first -0.5 at \(layer, head\)=\(1, 2\)"),
    ],
)
def test_scores_must_be_finite_and_non_negative(bad, message):
    scores = DYADIC.copy()
    scores[1, 2] = bad
    with pytest.raises(InvalidScoresError, match=message):
        SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=scores)


def test_all_zero_scores_are_rejected():
    with pytest.raises(InvalidScoresError, match="all zero"):
        SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=np.zeros((2, 4)))


def test_wrong_score_shape_names_both_shapes():
    with pytest.raises(ScoreShapeError, match=r"shape \(2, 3\) but the model needs \(layers, query_heads\) = \(2, 4\)"):
        SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=np.ones((2, 3)))
    with pytest.raises(ScoreShapeError, match="look like per-KV-head scores"):
        SparseMMAllocation(budget=42).capacities(SHAPE, head_scores=np.ones((2, 2)))
    with pytest.raises(InvalidScoresError, match="must be real numbers"):
        validate_head_scores(np.array([["a", "b", "c", "d"]] * 2), SHAPE)


def test_query_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(HeadGroupingError, match="query_heads=12 is not a multiple of kv_heads=5"):
        ModelShape(28, 12, 5)
    with pytest.raises(HeadGroupingError):
        SnapKVAllocation(budget=64).capacities((2, 6, 4))


def test_missing_inputs_say_what_to_pass():
    with pytest.raises(MissingAllocationInputError, match="head_scores=.*step 03"):
        SparseMMAllocation(budget=42).capacities(SHAPE)
    with pytest.raises(MissingAllocationInputError, match="prompt_len=.*redistribute"):
        SparseMMAllocation(budget=42, saturation="redistribute").capacities(SHAPE, head_scores=DYADIC)
    with pytest.raises(MissingAllocationInputError, match="prompt_len"):
        PyramidKVAllocation(budget=42).capacities(SHAPE)
    with pytest.raises(MissingAllocationInputError, match="attention="):
        AdaKVAllocation(budget=42).capacities(SHAPE)


def test_adakv_input_errors():
    with pytest.raises(InvalidScoresError, match="sorted in descending order"):
        adakv_caps(np.array([[0.1, 0.5, 0.2]]), 2)
    with pytest.raises(ScoreShapeError, match=r"\(layers, kv_heads\) = \(2, 2\)"):
        AdaKVAllocation(budget=36).capacities(SHAPE, attention=np.ones((2, 4, 6)))


def test_sparsemm_caps_requires_normalised_sigma():
    with pytest.raises(InvalidScoresError, match="must sum to 1"):
        sparsemm_caps(np.array([[1.0, 3.0]]), 10, 0.1)


def test_every_error_is_an_allocation_error_and_a_value_error():
    for error in (InvalidBudgetError, InvalidParameterError, InvalidScoresError, ScoreShapeError,
                  HeadGroupingError, MissingAllocationInputError, UnknownAllocationMethodError):
        assert issubclass(error, AllocationError) and issubclass(error, ValueError)
