"""Compressed generation through ``model.generate`` on tiny models of every supported class
(Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, Qwen3-VL, LLaVA-OneVision, InternVL).

- every budget >= the prompt length: token-identical to the uncompressed model;
- a real compression equals a simple reference: the FULL cache plus a per-head mask that hides
  the prompt tokens a head evicted (same logits at every decode step);
- the positions the model sees while decoding are those of the uncompressed model (M-RoPE);
- the tokens kept are SnapKV's rule recomputed from eager attention weights;
- the bytes reported are sum(kept) x head_dim x 2 x dtype size;
- the model's attention implementation is restored; bad input fails before any forward pass.
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.allocation import ScoreShapeError
from sparsemm_utils.compression import (
    AdaKVPress,
    FullKVPress,
    HeadMaskAblation,
    InvalidGenerationInputError,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    SparseMMPress,
    StreamingLLMPress,
    compressed_generate,
    model_shape,
)
from sparsemm_utils.kv_cache import PerHeadKVCache, UnsupportedBatchError, analytic_kv_bytes
from sparsemm_utils.models import (
    load_model,
    register_text_attention,
    set_text_attention,
    text_attention_implementation,
    vision_attention_implementation,
)
from sparsemm_utils.prompts import OCR_PROMPT, QWEN_SYSTEM_PROMPT, VICUNA_SYSTEM_PROMPT, build_inputs

pytestmark = pytest.mark.slow

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl", "llava_onevision", "internvl")
#: Families whose anyres image is 1000+ tokens: most of their tests run on the text prompt.
TEXT_ONLY = ("llava_next", "llava_onevision")
NEW_TOKENS = 8
WINDOW = 8


def _inputs(loaded, with_image=True):
    """The OCR prompt of a small blank image (Qwen: 136 tokens; InternVL: a square image, one
    256-token tile). LLaVA-NeXT's and LLaVA-OneVision's anyres turn any image into 1000+ tokens, so
    most of their tests use the text part of the prompt only (the language model and its cache run
    the same code); :func:`test_anyres_with_an_image` covers the image."""
    if with_image:
        size = (90, 90) if loaded.model_type == "internvl" else (120, 90)
        return build_inputs(loaded, Image.new("RGB", size, "white"))
    if loaded.model_type == "llava_next":
        text = f"{VICUNA_SYSTEM_PROMPT} USER: {OCR_PROMPT} ASSISTANT:"
    else:  # ChatML (LLaVA-OneVision's Qwen2)
        text = (f"<|im_start|>system\n{QWEN_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{OCR_PROMPT}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return dict(loaded.tokenizer(text, return_tensors="pt"))


@functools.lru_cache(maxsize=None)
def _setup(model_type):
    loaded = load_model(f"tiny-random/{model_type}", seed=1)
    inputs = _inputs(loaded, with_image=model_type not in TEXT_ONLY)
    shape = model_shape(loaded)
    scores = np.random.default_rng(7).random((shape.layers, shape.query_heads)) ** 3
    return loaded, inputs, scores


@pytest.fixture(scope="module", params=MODEL_TYPES)
def setup(request):
    return _setup(request.param)


def _generate(loaded, inputs, **kwargs):
    return loaded.model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def _prompt_len(inputs):
    return int(inputs["input_ids"].shape[1])


# ------------------------------------------------------------------- budgets >= the prompt: identity


def test_every_budget_above_the_prompt_is_token_identical(setup):
    loaded, inputs, scores = setup
    n = _prompt_len(inputs)
    reference = _generate(loaded, inputs)
    presses = [
        SparseMMPress(budget=n + 1, window=WINDOW, head_scores=scores),  # n < B: the original's skip
        SparseMMPress(budget=n, window=WINDOW, head_scores=scores, ratio=1.0),  # every cap = n - w: per-head path
        RandomPress(budget=n + 1, window=WINDOW),
        SnapKVPress(budget=n, window=WINDOW),
        PyramidKVPress(budget=n, window=WINDOW),
        AdaKVPress(budget=n + 1, window=WINDOW),  # at B = n AdaKV's floor rounding may drop a token (original)
        StreamingLLMPress(budget=n, window=WINDOW),
    ]
    if loaded.model_type != "qwen2_vl":  # the methods are model-independent: the three cache paths suffice
        presses = presses[:2] + [presses[3]]
    for press in presses:
        result = compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     return_dict_in_generate=True, output_logits=True)
        assert torch.equal(result.sequences, reference.sequences), press
        for got, want in zip(result.output.logits, reference.logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        kept = result.cache.kept_prompt_tokens()
        np.testing.assert_array_equal(kept, np.full_like(kept, n))


# --------------------------------------------------------- compressed == full cache + per-head mask


REFERENCE = "test_full_cache_with_head_masks"
_KEEP: dict[int, torch.Tensor] = {}


def _masked_full_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The reference: FULL keys; at decode, query head h sees the prompt positions its KV head kept
    plus every generated token (a boolean mask), nothing else changes."""
    if query.shape[2] > 1:  # the prefill attends to everything (as the compressed prefill does)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    keep = _KEEP[module.layer_idx]  # (H_kv, n) bool
    visible = torch.ones(keep.shape[0], key.shape[2], dtype=torch.bool)
    visible[:, : keep.shape[1]] = keep
    visible = visible.repeat_interleave(module.num_key_value_groups, dim=0)  # (H, kv_len)
    return sdpa_attention_forward(module, query, key, value, visible[None, :, None, :], dropout=dropout, scaling=scaling)


def _assert_equals_masked_reference(loaded, inputs, press):
    n = _prompt_len(inputs)
    result = compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
    assert result.cache.kept_prompt_tokens().max() < n  # it really compressed
    _KEEP.clear()
    for layer_idx, layer in enumerate(result.cache.layers):
        keep = torch.zeros(len(layer.prompt_positions()), n, dtype=torch.bool)
        for head, positions in enumerate(layer.prompt_positions()):
            keep[head, positions] = True
        _KEEP[layer_idx] = keep
    register_text_attention(REFERENCE, _masked_full_cache_attention, mask="sdpa")
    set_text_attention(loaded.model, REFERENCE)
    try:
        reference = _generate(loaded, inputs)
    finally:
        set_text_attention(loaded.model, "sdpa")
    assert torch.equal(result.sequences, reference.sequences)
    for got, want in zip(result.output.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return result


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("qwen2_vl", m) for m in ("sparsemm", "snapkv", "adakv", "pyramidkv", "streamingllm")]
    + [("qwen2_5_vl", "sparsemm"), ("llava_next", "sparsemm"), ("llava_next", "adakv")]
    + [(model_type, "sparsemm") for model_type in ("qwen3_vl", "llava_onevision", "internvl")],
)
def test_compressed_path_equals_full_cache_with_a_per_head_mask(model_type, method):
    loaded, inputs, scores = _setup(model_type)
    budget = 24
    press = {
        "sparsemm": SparseMMPress(budget=budget, window=WINDOW, head_scores=scores),
        "snapkv": SnapKVPress(budget=budget, window=WINDOW),
        "adakv": AdaKVPress(budget=budget, window=WINDOW),
        "pyramidkv": PyramidKVPress(budget=budget, window=WINDOW),
        "streamingllm": StreamingLLMPress(budget=budget, window=WINDOW),
    }[method]
    _assert_equals_masked_reference(loaded, inputs, press)


@pytest.mark.parametrize("model_type", TEXT_ONLY)
def test_anyres_with_an_image(model_type):
    # anyres: 576 (OneVision: 729) base tokens + the unpadded crop grid; the vision tower keeps sdpa,
    # the text model compresses
    loaded = load_model(f"tiny-random/{model_type}", seed=1)
    inputs = _inputs(loaded, with_image=True)
    n = _prompt_len(inputs)
    assert n > 1000
    scores = np.random.default_rng(7).random((loaded.num_layers, loaded.num_heads)) ** 3
    reference = _generate(loaded, inputs)
    same = compressed_generate(loaded, SparseMMPress(budget=n + 1, window=WINDOW, head_scores=scores), inputs,
                               max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(same.sequences, reference.sequences)
    result = _assert_equals_masked_reference(loaded, inputs, SparseMMPress(budget=64, window=WINDOW, head_scores=scores))
    assert result.kv_bytes < same.kv_bytes / 10
    assert vision_attention_implementation(loaded.model) == "sdpa"


def test_decoding_positions_are_those_of_the_uncompressed_model(setup):
    loaded, inputs, scores = setup
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    hook = loaded.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _generate(loaded, inputs)
        full = list(seen)
        seen.clear()
        result = compressed_generate(loaded, SparseMMPress(budget=24, window=WINDOW, head_scores=scores), inputs,
                                     max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == len(full) == NEW_TOKENS
    for got, want in zip(seen, full):  # M-RoPE (3 or 4, 1, t) for Qwen, (1, t) for LLaVA-NeXT
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert result.cache.get_seq_length() == _prompt_len(inputs) + NEW_TOKENS - 1  # tokens seen, not kept


def test_kept_tokens_follow_snapkv_recomputed_from_eager_attention(setup):
    loaded, inputs, scores = setup
    n = _prompt_len(inputs)
    press = SparseMMPress(budget=24, window=WINDOW, head_scores=scores)
    result = compressed_generate(loaded, press, inputs, max_new_tokens=1, do_sample=False)
    caps = result.session.assigned
    shape = model_shape(loaded)
    set_text_attention(loaded.model, "eager")
    try:
        with torch.no_grad():
            attentions = loaded.model(**inputs, output_attentions=True).attentions
    finally:
        set_text_attention(loaded.model, "sdpa")
    for layer_idx, attn in enumerate(attentions):  # (1, H, n, n), causal softmax of the prompt
        window_rows = attn[0, :, -WINDOW:, : n - WINDOW].float().mean(dim=1)  # (H, n - w)
        grouped = window_rows.view(shape.kv_heads, shape.group_size, -1).mean(dim=1)
        pooled = F.avg_pool1d(grouped[None], kernel_size=5, stride=1, padding=2)[0]
        for head, positions in enumerate(result.cache.layers[layer_idx].prompt_positions()):
            cap = int(caps[layer_idx, head])
            if cap >= n - WINDOW:
                assert positions.tolist() == list(range(n))
                continue
            expected = sorted(torch.topk(pooled[head], cap).indices.tolist()) + list(range(n - WINDOW, n))
            assert positions.tolist() == expected, (layer_idx, head)


# ---------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_reported_bytes_are_kept_tokens_times_head_dim_times_two_times_dtype(model_type):
    loaded = load_model(f"tiny-random/{model_type}", dtype="bfloat16")
    inputs = _inputs(loaded, with_image=model_type not in TEXT_ONLY)
    n = _prompt_len(inputs)
    shape = model_shape(loaded)
    scores = np.random.default_rng(0).random((shape.layers, shape.query_heads))
    press = SparseMMPress(budget=24, window=WINDOW, head_scores=scores)
    result = compressed_generate(loaded, press, inputs, max_new_tokens=5, do_sample=False)
    stored = result.cache.stored_tokens()
    # after 5 new tokens the cache holds the prompt's kept tokens + the 4 tokens fed back while decoding
    np.testing.assert_array_equal(stored, press.capacities(shape, n).stored(n) + 4)
    assert result.kv_bytes == int(stored.sum()) * loaded.head_dim * 2 * 2  # bfloat16: 2 bytes
    assert result.kv_bytes == analytic_kv_bytes(stored, loaded.head_dim, torch.bfloat16)
    assert result.cache.repacks == 0 and result.cache.slack_bytes() >= 0
    full = compressed_generate(loaded, FullKVPress(), inputs, max_new_tokens=5, do_sample=False)
    assert full.kv_bytes == (n + 4) * shape.layers * shape.kv_heads * loaded.head_dim * 2 * 2
    assert result.kv_bytes < full.kv_bytes


def test_a_reserve_in_blocks_generates_the_same_tokens_and_bytes(setup):
    # decode_block=1 re-packs at every decode step, 3 every third, 64 never (8 new tokens): the
    # tokens, logits and kept bytes are those of a reserve sized to the whole generation (block
    # >= max_new_tokens), only the free rows differ, and never exceed one block per head.
    loaded, inputs, scores = setup
    shape = model_shape(loaded)
    press = SparseMMPress(budget=24, window=WINDOW, head_scores=scores)
    runs = {
        block: compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False, decode_block=block,
                                   return_dict_in_generate=True, output_logits=True)
        for block in (1, 3, NEW_TOKENS)
    }
    whole = runs[NEW_TOKENS]
    assert whole.cache.repacks == 0
    for block, result in runs.items():
        assert torch.equal(result.sequences, whole.sequences), block
        for got, want in zip(result.output.logits, whole.output.logits):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert result.kv_bytes == whole.kv_bytes
        assert result.cache.repacks == {1: NEW_TOKENS - 2, 3: 2, NEW_TOKENS: 0}[block] * shape.layers
        per_row = loaded.head_dim * 2 * loaded.model.dtype.itemsize
        assert result.cache.slack_bytes() <= block * shape.layers * shape.kv_heads * per_row


# ------------------------------------------------------------------------- ablation, restoration


def test_head_mask_ablation_changes_the_logits_and_keeps_the_full_cache(setup):
    loaded, inputs, scores = setup
    reference = _generate(loaded, inputs)
    shape = model_shape(loaded)
    for press in (HeadMaskAblation(selection="top", head_scores=scores), HeadMaskAblation(selection="random", seed=1)):
        result = compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     return_dict_in_generate=True, output_logits=True)
        assert isinstance(result.cache, DynamicCache)
        assert result.session.head_mask.sum() == round(0.1 * shape.layers * shape.query_heads)
        assert not torch.allclose(result.output.logits[0], reference.logits[0], atol=1e-5)
    assert text_attention_implementation(loaded.model) == "sdpa"


def test_the_attention_implementation_is_restored_even_after_an_error(setup):
    loaded, inputs, scores = setup
    with pytest.raises(ValueError):  # generate rejects an unknown keyword argument mid-way
        compressed_generate(loaded, SnapKVPress(budget=24, window=WINDOW), inputs, max_new_tokens=2, bogus=1)
    assert text_attention_implementation(loaded.model) == "sdpa"
    assert vision_attention_implementation(loaded.model) == "sdpa"
    out = compressed_generate(loaded, SnapKVPress(budget=24, window=WINDOW), inputs, max_new_tokens=2)
    assert isinstance(out.cache, PerHeadKVCache)
    assert text_attention_implementation(loaded.model) == "sdpa"


# --------------------------------------------------------------------------------------- errors


def test_bad_input_fails_before_any_forward_pass(setup):
    loaded, inputs, scores = setup
    press = SnapKVPress(budget=24, window=WINDOW)
    two = dict(inputs)
    two["input_ids"] = inputs["input_ids"].repeat(2, 1)
    with pytest.raises(UnsupportedBatchError, match="batch size 2"):
        compressed_generate(loaded, press, two, max_new_tokens=2)
    padded = dict(inputs)
    padded["attention_mask"] = inputs["attention_mask"].clone()
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(InvalidGenerationInputError, match="padding"):
        compressed_generate(loaded, press, padded, max_new_tokens=2)
    with pytest.raises(InvalidGenerationInputError, match="num_beams=2"):
        compressed_generate(loaded, press, inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(InvalidGenerationInputError, match="past_key_values= is not supported"):
        compressed_generate(loaded, press, inputs, max_new_tokens=2, past_key_values=DynamicCache())
    shape = model_shape(loaded)
    wrong = SparseMMPress(budget=24, window=WINDOW, head_scores=np.ones((shape.layers + 1, shape.query_heads)))
    with pytest.raises(ScoreShapeError, match=f"the model needs \\(layers, query_heads\\) = \\({shape.layers}, {shape.query_heads}\\)"):
        compressed_generate(loaded, wrong, inputs, max_new_tokens=2)
    assert text_attention_implementation(loaded.model) == "sdpa"
