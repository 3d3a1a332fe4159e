"""``selection_dtype``: the attention a rule reads, in float32 (the default) or in the model's dtype
as the original SparseMM code computes it (docs/deviations.md "Selection scores").

SnapKV-style selection (SparseMM, random, SnapKV, PyramidKV, AdaKV; docs/method.md §5) and the hit
rule's attention rows (docs/method.md §4) are compared on bf16 inputs with line-for-line
transliterations of the original's code (CR400AF-A/SparseMM at f52655b: ``calcul_attn_sore`` and
``SnapKVCluster.update_kv`` in ``sparsemm/sparsemm_utils.py``; the eager attention of
``visual_head/LLaVA-NeXT/llava/model/language_model/modeling_llama.py`` and ``hit_score`` in
``visual_head/llava_visual_head.py``). Also here: the n = B edge of the whole-prompt skip and
PyramidKV's caps per prompt (docs/deviations.md "Compression skip rule", "PyramidKV caps per prompt").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from sparsemm_utils.allocation import InvalidParameterError, ModelShape
from sparsemm_utils.attention_capture import CaptureSpec, RowRecorder, last_query_attention
from sparsemm_utils.compression import (
    AdaKVPress,
    PrefillDecisions,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    SparseMMPress,
    snapkv_scores,
    snapkv_window_scores,
    topk_positions,
)
from sparsemm_utils.evaluation import EvaluationError, press_for
from sparsemm_utils.head_scoring_rule import HeadScoringConfigError
from sparsemm_utils.steps import eval as step05
from sparsemm_utils.steps import head_scoring as step03

SHAPE = ModelShape(layers=3, query_heads=4, kv_heads=2)
CASES = range(24)


# ------------------------------------------------------------------ the original, transliterated


def original_window_scores(query_states, key_states, window_size, num_key_value_groups, kernel_size=5):
    """``calcul_attn_sore`` (gqa_func "mean", pooling "avgpool"); ``key_states`` already
    ``repeat_kv``'d, as ``update_kv`` passes them. Returns (1, H_kv, n - w) in the inputs' dtype."""
    bsz, num_heads, q_len, head_dim = query_states.shape
    attn_weights = torch.matmul(query_states[..., -window_size:, :], key_states.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((window_size, window_size), torch.finfo(attn_weights.dtype).min, device=attn_weights.device)
    mask_cond = torch.arange(mask.size(-1), device=attn_weights.device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    attn_weights[:, :, -window_size:, -window_size:] += mask[None, None, :, :]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    mean = attn_weights[:, :, -window_size:, :-window_size].mean(dim=-2)
    mean = mean.view(mean.shape[0], num_heads // num_key_value_groups, num_key_value_groups, -1).mean(dim=-2)
    return F.avg_pool1d(mean, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)


def original_kept(scores, caps, ranking):
    """The positions before the window each KV head keeps: SnapKV / PyramidKV ``attn_cache.topk(cap)``,
    SparseMM / AdaKV the first cap of ``attn_score.sort(dim=-1, descending=True)``."""
    if ranking == "topk":
        return [set(scores[0, h].topk(int(cap)).indices.tolist()) for h, cap in enumerate(caps)]
    order = scores.sort(dim=-1, descending=True).indices[0]
    return [set(order[h, : int(cap)].tolist()) for h, cap in enumerate(caps)]


def original_adakv_caps(attn_score, base_capacity, floor_ratio):
    """``AdaKVCluster.update_kv``'s capacities (normalize=True, skip=0) from its (1, H_kv, n - w) scores."""
    sorted_attn_score, _ = attn_score.sort(dim=-1, descending=True)
    bsz, num_kv_heads, length = sorted_attn_score.shape
    floor_capacity = int(base_capacity * floor_ratio)
    ratio_weight = sorted_attn_score[..., :base_capacity].sum(dim=-1, keepdim=True) / sorted_attn_score.sum(dim=-1, keepdim=True)
    adaptive_attn_score = (sorted_attn_score * ratio_weight).reshape(bsz, length * num_kv_heads)
    sorted_indices = torch.topk(adaptive_attn_score, k=num_kv_heads * base_capacity, dim=-1).indices // length
    head_adaptive_capacity = torch.zeros((bsz, num_kv_heads), dtype=sorted_indices.dtype)
    head_adaptive_capacity.scatter_add_(-1, sorted_indices, torch.ones_like(sorted_indices))
    return torch.round(head_adaptive_capacity * (1 - floor_ratio) + floor_capacity).int()[0].numpy()


def original_last_row(query, key):
    """The eager attention's weights (softmax in float32, cast back) of the last query, (1, H, N)."""
    keys = repeat_kv(key, query.shape[1] // key.shape[1])
    weights = torch.matmul(query, keys.transpose(2, 3)) / math.sqrt(query.shape[-1])
    return F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)[:, :, -1, :]


def bf16_states(case, n=None, heads=4, kv_heads=2, dim=16):
    """Random bf16 post-RoPE (query, key) of a prompt of n tokens (drawn when None)."""
    g = torch.Generator().manual_seed(case)
    n = int(torch.randint(48, 200, (1,), generator=g)) if n is None else n
    query = (torch.randn(1, heads, n, dim, generator=g) * 1.5).bfloat16()
    key = (torch.randn(1, kv_heads, n, dim, generator=g) * 1.5).bfloat16()
    return query, key


def _kept(positions, n, w):
    return [set(p[p < n - w].tolist()) for p in positions]


# -------------------------------------------------------------------------- selection scores


@pytest.mark.parametrize("window, kernel", [(8, 5), (4, 1), (16, 7)])
def test_model_dtype_scores_are_the_originals_bit_for_bit(window, kernel):
    for case in CASES:
        query, key = bf16_states(case)
        expected = original_window_scores(query, repeat_kv(key, 2), window, 2, kernel)[0]
        got = snapkv_scores(query, key, window, None, kernel, selection_dtype="model")
        assert got.dtype == torch.float32
        assert torch.equal(got, expected.float()), f"case {case}"


def test_float32_scores_are_unchanged_by_the_option():
    # the default computes nothing in the model's dtype: bf16 inputs score as their float32 copies
    for case in range(6):
        query, key = bf16_states(case)
        default = snapkv_window_scores(query[:, :, -8:], key)
        assert torch.equal(default, snapkv_window_scores(query[:, :, -8:], key, None, 5, "float32"))
        assert torch.equal(default, snapkv_window_scores(query[:, :, -8:].float(), key.float()))
    # on float32 inputs the two dtypes agree up to float32 rounding (a division against a product)
    query, key = bf16_states(0)
    torch.testing.assert_close(
        snapkv_scores(query.float(), key.float(), 8, selection_dtype="model"), snapkv_scores(query.float(), key.float(), 8)
    )


def test_the_two_dtypes_keep_different_tokens_on_bf16_models():
    # the same caps, the same ranking: float32 scores keep other tokens than the original in some cases,
    # the model's dtype in none
    differ = 0
    for case in CASES:
        query, key = bf16_states(case)
        n, w = query.shape[2], 8
        caps = [(n - w) // 3, (n - w) // 4]
        original = original_kept(original_window_scores(query, repeat_kv(key, 2), w, 2), caps, "topk")
        model = _kept(topk_positions(snapkv_scores(query, key, w, selection_dtype="model"), caps, n, w), n, w)
        float32 = _kept(topk_positions(snapkv_scores(query, key, w), caps, n, w), n, w)
        assert model == original, f"case {case}"
        differ += float32 != original
    assert differ >= 3, f"float32 and the original kept the same tokens in {len(CASES) - differ} of {len(CASES)} cases"


def test_adakv_caps_follow_the_originals_bf16_arithmetic():
    # the top-b mass ratio and the scaled scores rounded to bf16, ranked by torch.topk: the float64
    # rule (adakv_caps) gives other caps in some cases, the model's dtype in none
    float64_differs = 0
    for case in range(40):
        query, key = bf16_states(case, heads=8, kv_heads=4)
        press = AdaKVPress(budget=32, window=8, selection_dtype="model")
        expected = original_adakv_caps(original_window_scores(query, repeat_kv(key, 2), 8, 2), 24, 0.2)
        scores = snapkv_scores(query, key, 8, selection_dtype="model")
        np.testing.assert_array_equal(press.layer_capacities(scores, torch.bfloat16), expected, err_msg=f"case {case}")
        float64_differs += not np.array_equal(press.layer_capacities(scores), expected)
    assert float64_differs >= 3


def _press(method, selection_dtype):
    kwargs = {"budget": 24, "window": 8, "selection_dtype": selection_dtype}
    if method is SparseMMPress:
        kwargs["head_scores"] = np.random.default_rng(0).random((SHAPE.layers, SHAPE.query_heads))
    return method(**kwargs)


@pytest.mark.parametrize(
    "method, ranking",
    [(SparseMMPress, "sort"), (RandomPress, "sort"), (AdaKVPress, "sort"), (SnapKVPress, "topk"), (PyramidKVPress, "topk")],
)
def test_each_method_selects_as_the_original_in_the_models_dtype(method, ranking):
    # the whole selection of one layer (caps, scores, ranking) against the original's, on bf16 states
    press = _press(method, "model")
    assert press.ranking == ranking and _press(method, "float32").ranking == "topk"
    for case in range(8):
        query, key = bf16_states(case, n=120)
        decisions = PrefillDecisions(press, SHAPE)
        positions = decisions.select(0, query, key, None)
        caps = decisions.assigned[0]
        scores = original_window_scores(query, repeat_kv(key, 2), 8, 2)
        assert _kept(positions, 120, 8) == original_kept(scores, caps, ranking), f"case {case}"


def test_a_bad_selection_dtype_is_refused_everywhere():
    with pytest.raises(InvalidParameterError, match=r"selection_dtype must be one of .*'float32', 'model'"):
        SnapKVPress(budget=24, window=8, selection_dtype="bf16")
    query, key = bf16_states(0)
    with pytest.raises(InvalidParameterError, match="selection_dtype"):
        snapkv_scores(query, key, 8, selection_dtype="bfloat16")
    with pytest.raises(ValueError, match="selection_dtype"):
        CaptureSpec(selection_dtype="half")
    with pytest.raises(HeadScoringConfigError, match="selection_dtype"):
        step03.Config(selection_dtype="bf16")
    with pytest.raises(EvaluationError, match="selection_dtype"):
        step05.Config(selection_dtype="fp32")


def test_the_configs_pass_it_on_and_record_it():
    cfg = step05.Config(methods=["fullkv", "sparsemm", "snapkv", "mask"], selection_dtype="model")
    settings = cfg.press_settings(np.ones((SHAPE.layers, SHAPE.query_heads)))
    assert press_for("sparsemm", 32, **settings).selection_dtype == "model"
    assert press_for("snapkv", 32, **settings).selection_dtype == "model"
    assert press_for("fullkv", None, **settings).name == "fullkv"  # methods without scores ignore it
    assert press_for("mask", None, **settings).name == "head_mask"
    assert cfg.sweep_settings()["selection_dtype"] == "model"
    # the default is the press's own, and float32 sweeps keep the identity they had
    assert press_for("adakv", 32, window=8).selection_dtype == "float32"
    assert "selection_dtype" not in step05.Config().sweep_settings()
    # step 03 records it in scoring_report.json's config and hands it to the capture
    assert step03.Config(selection_dtype="model").to_dict()["selection_dtype"] == "model"
    assert step03.Config().selection_dtype == "float32"


# ------------------------------------------------------------------------ the hit rule's rows


def test_model_dtype_rows_are_the_original_eager_weights():
    for case in range(12):
        query, key = bf16_states(case, n=300)
        decode_query = query[:, :, -1:]  # a decode step: one query over every key
        assert torch.equal(last_query_attention(decode_query, key, selection_dtype="model"), original_last_row(decode_query, key))
        # the prefill's last row (no mask needed: the last query sees every key)
        assert torch.equal(last_query_attention(query, key, selection_dtype="model"), original_last_row(query, key))
        default = last_query_attention(decode_query, key)
        assert default.dtype == torch.float32
        assert torch.equal(default, last_query_attention(decode_query, key, selection_dtype="float32"))


def test_the_hit_rules_argmax_is_the_originals_topk_1_in_the_models_dtype():
    differ = 0
    for case in range(40):
        query, key = bf16_states(case, n=400)
        query, key = (query[:, :, -1:].float() / 6).bfloat16(), (key.float() / 6).bfloat16()  # flat rows: bf16 ties
        rows = {}
        for dtype in ("float32", "model"):
            recorder = RowRecorder(1, 4, CaptureSpec(selection_dtype=dtype))
            recorder.add(0, last_query_attention(query, key, selection_dtype=dtype))
            rows[dtype] = recorder.finish().argmax[0, 0]
        original = original_last_row(query, key)[0]
        expected = [int(original[h].topk(1).indices[0]) for h in range(4)]  # hit_score: row.topk(topk=1)
        assert rows["model"].tolist() == expected, f"case {case}"
        differ += rows["float32"].tolist() != expected
    assert differ >= 1


# ------------------------------------------------------------------ the whole-prompt skip at n = B


@pytest.mark.parametrize("method", [SparseMMPress, RandomPress, SnapKVPress, AdaKVPress])
def test_a_prompt_as_long_as_the_budget_is_compressed_and_a_shorter_one_is_not(method):
    # the original skips when n < B (SnapKV: q_len < max_capacity_prompt; SparseMM, AdaKV: b > n - w),
    # so n = B - 1 keeps everything in every layer and n = B = 24 compresses
    # (SnapKV and AdaKV then select b = B - w = n - w of n - w keys: everything; SparseMM's and
    # random's heads with cap < b drop tokens)
    press = _press(method, "float32")
    for n, skipped in ((23, [0]), (24, [])):
        query, key = bf16_states(1, n=n)
        decisions = PrefillDecisions(press, SHAPE)
        positions = decisions.select(0, query.float(), key.float(), None)
        assert decisions.skipped_layers == skipped
        if skipped:
            assert positions is None
        elif method in (SparseMMPress, RandomPress):
            assert min(len(p) for p in positions) < n


# --------------------------------------------------------------------- PyramidKV, per prompt


def test_pyramidkv_recomputes_its_caps_for_every_prompt():
    # B = 12, w = 4, L = 3: base 8, min 8 // 20 = 0, max 2 x 8 - 0 = 16.
    #   n = 40: n - w = 36 > 16, steps (16 - 0) // 2 = 8 -> caps 16, 8, 0.
    #   n = 16: n - w = 12 <= 16 -> max 12, min 16 - 12 = 4, steps (12 - 4) // 2 = 4 -> caps 12, 8, 4.
    # The original sets them once per layer (pyram_init) and would keep 16, 8, 0 for the second prompt.
    press = PyramidKVPress(budget=12, window=4)
    caps = {}
    for n in (40, 16):
        decisions = PrefillDecisions(press, SHAPE)
        for layer in range(SHAPE.layers):
            query, key = bf16_states(layer, n=n)
            decisions.select(layer, query.float(), key.float(), None)
        caps[n] = decisions.assigned.tolist()
    assert caps[40] == [[16, 16], [8, 8], [0, 0]]
    assert caps[16] == [[12, 12], [8, 8], [4, 4]]
