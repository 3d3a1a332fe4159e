"""FastV (step 07, the token-level peer for step 05): its arithmetic by hand, and on tiny models:
R = 0 and K = L are the unmodified model, the kept image tokens are the ones the eager attention of
layer K-1 ranks highest, the cache stores what the rule says, and decoding over the pruned cache
agrees with a full forward pass that hides the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils import fastv as fv
from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.attention_hooks import register_text_attention, text_attention, text_attention_implementation
from sparsemm_utils.kv_cache import analytic_kv_bytes
from sparsemm_utils.layer_stats_capture import forward_inputs_with_response
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs, image_token_span
from sparsemm_utils.vision_drop import masked_sdpa

GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


# ------------------------------------------------------------------------------------ arithmetic


def test_kept_and_dropped_counts_by_hand():
    # FastV keeps round(n_img * (1 - R)) image tokens (Python's round, half to even)
    assert fv.FastVPress(ratio=0.5).num_kept_image_tokens(577) == 288  # 288.5 -> 288 (even)
    assert fv.FastVPress(ratio=0.5).num_kept_image_tokens(575) == 288  # 287.5 -> 288 (even)
    assert fv.FastVPress(ratio=0.75).num_dropped(100) == 75
    assert fv.FastVPress(ratio=0.0).num_dropped(100) == 0
    assert fv.FastVPress(ratio=1.0).num_kept_image_tokens(100) == 0


def test_stored_tokens_by_hand():
    # 4 layers, 2 KV heads, prompt of 100 tokens with 60 image tokens, K = 2, R = 0.5:
    # layers 0-1 store 100, layers 2-3 store 100 - 30 = 70 -> 2 * (200 + 140) = 680 tokens;
    # bytes with head_dim 16 in float32: 680 * 16 * 2 * 4 = 87040
    shape = ModelShape(layers=4, query_heads=8, kv_heads=2)
    press = fv.FastVPress(k=2, ratio=0.5)
    np.testing.assert_array_equal(press.stored_prompt_tokens(shape, 100, 60), [[100, 100], [100, 100], [70, 70], [70, 70]])
    assert press.kv_bytes(shape, 100, 60, 16, torch.float32) == 87040


def test_ratio_for_a_budget_by_hand():
    # target 640 tokens: d = ceil((4 * 100 - 640 / 2) / (4 - 2)) = ceil(40) = 40, R = 40 / 60,
    # stored 2 * (400 - 2 * 40) = 640
    shape = ModelShape(layers=4, query_heads=8, kv_heads=2)
    match = fv.fastv_ratio_for_budget(shape, 100, 60, 2, 640)
    assert (match.dropped, match.stored_tokens, match.reachable) == (40, 640, True)
    assert match.ratio == pytest.approx(40 / 60)
    # 641 tokens: d = ceil(39.75) = 40 as well (never above the target)
    assert fv.fastv_ratio_for_budget(shape, 100, 60, 2, 641).stored_tokens == 640
    # a target below what dropping every image token reaches: R = 1, flagged unreachable
    low = fv.fastv_ratio_for_budget(shape, 100, 60, 2, 100)
    assert (low.ratio, low.dropped, low.stored_tokens, low.reachable) == (1.0, 60, 2 * (400 - 120), False)
    # a target above the full cache: nothing dropped
    assert fv.fastv_ratio_for_budget(shape, 100, 60, 2, 10_000).ratio == 0.0


def test_bad_parameters_are_refused():
    with pytest.raises(fv.InvalidFastVParameterError, match="k must be"):
        fv.FastVPress(k=0)
    with pytest.raises(fv.InvalidFastVParameterError, match="ratio"):
        fv.FastVPress(ratio=1.5)
    with pytest.raises(fv.InvalidFastVParameterError, match="ratio"):
        fv.FastVPress(ratio=float("nan"))
    with pytest.raises(fv.InvalidFastVParameterError, match="exceeds"):
        fv.FastVPress(k=5).validate_for(ModelShape(layers=4, query_heads=8, kv_heads=2))


# ------------------------------------------------------------------------------------ tiny model


#: The families whose image fits a short prompt (the anyres ones have their own test below).
TINY_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")


def _tiny(model_type):
    """A tiny model and the OCR prompt of a random 280 x 224 page (InternVL: 224 x 224, one tile)."""
    loaded = load_model(f"tiny-random/{model_type}", seed=0)
    rng = np.random.default_rng(3)
    shape = (224, 224, 3) if model_type == "internvl" else (224, 280, 3)
    image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
    return loaded, build_inputs(loaded, image)


@pytest.fixture(scope="module")
def qwen():
    return _tiny("qwen2_vl")


@pytest.fixture(scope="module", params=TINY_TYPES)
def tiny(request, qwen):
    return qwen if request.param == "qwen2_vl" else _tiny(request.param)


def _same_generation(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.slow
def test_ratio_zero_is_the_unmodified_model(tiny):
    loaded, inputs = tiny
    plain = loaded.model.generate(**inputs, **GREEDY)
    result = fv.fastv_generate(loaded, fv.FastVPress(k=2, ratio=0.0), inputs, **GREEDY)
    _same_generation(plain, result.output)
    assert result.session.dropped.numel() == 0
    n = inputs["input_ids"].shape[1]
    assert (result.stored_prompt_tokens == n).all()
    assert text_attention_implementation(loaded.model) == "sdpa"


@pytest.mark.slow
def test_k_equal_to_the_layers_drops_nothing(tiny):
    loaded, inputs = tiny
    plain = loaded.model.generate(**inputs, **GREEDY)
    result = fv.fastv_generate(loaded, fv.FastVPress(k=loaded.num_layers, ratio=0.9), inputs, **GREEDY)
    _same_generation(plain, result.output)
    assert (result.stored_prompt_tokens == inputs["input_ids"].shape[1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_kept_tokens_are_the_eager_ranking(tiny, k):
    loaded, inputs = tiny
    press = fv.FastVPress(k=k, ratio=0.5)
    result = fv.fastv_generate(loaded, press, inputs, max_new_tokens=2, do_sample=False)
    # reference: eager attention of layer k-1, last prompt row, mean over heads, image slice, top-kept
    with text_attention(loaded.model, "eager"), torch.no_grad():
        attentions = loaded.model(**inputs, output_attentions=True).attentions
    start, count = image_token_span(inputs["input_ids"], loaded.image_token_id)
    row = attentions[k - 1][0, :, -1, start : start + count].float().mean(dim=0)
    keep = press.num_kept_image_tokens(count)
    expected = (torch.topk(row, keep).indices + start).sort().values
    assert torch.equal(result.session.kept, expected)
    assert result.session.dropped.numel() == count - keep
    assert not set(result.session.kept.tolist()) & set(result.session.dropped.tolist())
    # what the cache stores is what the rule says, in every KV head
    n = inputs["input_ids"].shape[1]
    shape = ModelShape(loaded.num_layers, loaded.num_heads, loaded.num_kv_heads)
    np.testing.assert_array_equal(result.stored_prompt_tokens, press.stored_prompt_tokens(shape, n, count))
    generated = result.sequences.shape[1] - n
    stored = press.stored_prompt_tokens(shape, n, count) + generated - 1  # the last token is never fed back
    assert result.kv_bytes == analytic_kv_bytes(stored, loaded.head_dim, loaded.dtype)


@pytest.mark.slow
def test_decoding_over_the_pruned_cache_equals_a_masked_full_pass(tiny):
    loaded, inputs = tiny
    press = fv.FastVPress(k=2, ratio=0.75)
    result = fv.fastv_generate(loaded, press, inputs, **GREEDY)
    hidden_prompt = result.session.hidden
    sequence = result.sequences
    n, total = inputs["input_ids"].shape[1], sequence.shape[1]
    hidden = torch.zeros(total, dtype=torch.bool)
    hidden[:n] = hidden_prompt

    def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # the same tokens hidden from every query of layers >= k, in ONE pass over prompt + answer
        keys = hidden if module.layer_idx >= press.k else torch.zeros_like(hidden)
        return masked_sdpa(module, query, key, value, attention_mask, keys, None, scaling=scaling, dropout=dropout, **kwargs), None

    register_text_attention("test_fastv_reference", reference, mask="sdpa")
    with text_attention(loaded.model, "test_fastv_reference"), torch.no_grad():
        logits = loaded.model(**forward_inputs_with_response(inputs, sequence), use_cache=False).logits[0]
    # logits[n - 1 + t] predicts generated token t: equal to FastV's decode-step logits
    for t, step in enumerate(result.output.logits):
        torch.testing.assert_close(step[0], logits[n - 1 + t], atol=1e-4, rtol=0)
    # and pruning changed something: the unmodified model's logits differ
    plain = loaded.model.generate(**inputs, **GREEDY)
    assert not torch.allclose(plain.logits[0], result.output.logits[0])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision"])
def test_anyres_models_run_and_prune(model_type):
    loaded = load_model(f"tiny-random/{model_type}", seed=0)
    rng = np.random.default_rng(4)
    inputs = build_inputs(loaded, Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    result = fv.fastv_generate(loaded, fv.FastVPress(k=2, ratio=0.5), inputs, max_new_tokens=3, do_sample=False)
    count = int((inputs["input_ids"] == loaded.image_token_id).sum())
    n = inputs["input_ids"].shape[1]
    assert result.stored_prompt_tokens[0, 0] == n
    assert result.stored_prompt_tokens[-1, 0] == n - (count - round(count * 0.5))


def test_generation_input_errors(qwen):
    loaded, inputs = qwen
    press = fv.FastVPress()
    with pytest.raises(fv.FastVInputError, match="past_key_values"):
        fv.fastv_generate(loaded, press, inputs, past_key_values=object(), max_new_tokens=1)
    with pytest.raises(fv.FastVInputError, match="num_beams"):
        fv.fastv_generate(loaded, press, inputs, num_beams=2, max_new_tokens=1)
    with pytest.raises(fv.FastVInputError, match="padding"):
        fv.fastv_generate(loaded, press, {**inputs, "attention_mask": torch.zeros_like(inputs["attention_mask"])})
    with pytest.raises(fv.FastVInputError, match=r"\(1, n\)"):
        fv.fastv_generate(loaded, press, {"input_ids": inputs["input_ids"][0]})
    with pytest.raises(fv.FastVError, match="FastVPress"):
        with fv.fastv(loaded, "fastv", inputs["input_ids"]):
            pass
    fv.register_fastv()
    with text_attention(loaded.model, fv.FASTV_ATTENTION), torch.no_grad():
        with pytest.raises(fv.NoActiveFastVError, match="outside a FastV context"):
            loaded.model(**inputs)


def test_evaluate_fastv_table(qwen):
    loaded, _ = qwen
    from sparsemm_utils.reader_tasks import ReaderDocSpec

    docs = [ReaderDocSpec().render(10_000, 0)]
    table = fv.evaluate_fastv(loaded, docs, [fv.FastVPress(k=2, ratio=0.0), fv.FastVPress(k=2, ratio=1.0)],
                              tasks=("line",), max_new_tokens=2, progress=False)
    assert list(table.columns) == [
        "method", "k", "ratio", "task", "exact_match", "char_accuracy", "mean_char_accuracy", "n",
        "prompt_kv_bytes", "full_prompt_kv_bytes", "kv_fraction",
    ]
    assert set(table.task) == {"line", "all"}
    full = table[table.ratio == 0.0].iloc[0]
    assert full.kv_fraction == pytest.approx(1.0)
    # R = 1 drops every image token from layers 2 and 3: 2 of 4 layers lose n_img tokens
    doc_inputs = build_inputs(loaded, docs[0]["image"], "Read line 1.")
    n = doc_inputs["input_ids"].shape[1]
    n_img = int((doc_inputs["input_ids"] == loaded.image_token_id).sum())
    pruned = table[table.ratio == 1.0].iloc[0]
    assert pruned.kv_fraction == pytest.approx((4 * n - 2 * n_img) / (4 * n))


# ------------------------------------------------------------------ FastV as a method of step 05


def test_fastv_at_budget_by_hand():
    # the FastVAtBudget docstring's example: L = 4, H_kv = 2, k = 1, n = 80 with 45 image tokens
    shape = ModelShape(layers=4, query_heads=8, kv_heads=2)
    method = fv.FastVAtBudget(budget=64, k=1)
    assert method.target_tokens(shape, 80) == 512
    press, match = method.press_for(shape, 80, 45)
    assert (match.dropped, match.stored_tokens, match.reachable) == (22, 508, True)
    assert press.num_dropped(45) == 22 and press.k == 1
    low = fv.FastVAtBudget(budget=16, k=1).match(shape, 80, 45)
    assert (low.ratio, low.dropped, low.stored_tokens, low.target_tokens, low.reachable) == (1.0, 45, 370, 128, False)
    # a budget above the prompt: the target is the whole prompt, nothing dropped
    assert fv.FastVAtBudget(budget=500, k=1).match(shape, 80, 45).ratio == 0.0
    # no image token: nothing to drop; reachable only when the whole prompt fits
    none = fv.FastVAtBudget(budget=16, k=1).match(shape, 80, 0)
    assert (none.ratio, none.stored_tokens, none.reachable) == (0.0, 640, False)
    with pytest.raises(fv.InvalidFastVParameterError, match="budget"):
        fv.FastVAtBudget(budget=0)
    with pytest.raises(fv.InvalidFastVParameterError, match="k must be"):
        fv.FastVAtBudget(budget=16, k=0)


@pytest.mark.parametrize("budget, reachable", [(24, False), (130, True), (4096, True)])
def test_fastv_in_the_sweep_stores_at_most_the_budgets_bytes(qwen, budget, reachable):
    """Through step 05's generator: FastV's prompt KV bytes never exceed a uniform head-level
    method's at the same budget when the target is reachable, and the record says what was chosen."""
    from sparsemm_utils.benchmarks import BENCHMARKS, load_benchmark, make_reader_benchmark
    from sparsemm_utils.evaluation import ModelGenerator

    loaded, _ = qwen
    sample = load_benchmark("reader_docqa", source=make_reader_benchmark(1, seed=7))[0]
    gen = ModelGenerator(loaded, {"window": 8, "fastv_k": 1}, max_new_tokens=1)
    spec = BENCHMARKS["reader_docqa"]
    fast = gen(sample, spec, "fastv", budget)
    snap = gen(sample, spec, "snapkv", budget)
    details = fast.details
    n = fast.prompt_tokens
    assert details["fastv_k"] == 1 and details["target_tokens"] == loaded.num_layers * loaded.num_kv_heads * min(budget, n)
    # max_new_tokens=1: generate runs the prefill only, so the cache holds exactly the kept prompt tokens
    per_token = loaded.head_dim * 2 * 4
    assert fast.kv_bytes == details["stored_tokens"] * per_token
    assert snap.kv_bytes == details["target_tokens"] * per_token
    assert details["reachable"] == reachable  # this prompt: 151 tokens, 50 of them image tokens
    if reachable:
        assert fast.kv_bytes <= snap.kv_bytes
    else:
        assert details["ratio"] == 1.0 and fast.kv_bytes > snap.kv_bytes
    if budget >= n:
        assert details["ratio"] == 0.0 and fast.text == gen(sample, spec, "fullkv", None).text
    elif reachable:  # 4 * 2 * 130 = 1040 tokens: ceil((4 * 151 - 520) / 3) = 28 image tokens dropped
        assert (details["dropped"], details["stored_tokens"]) == (28, 2 * (4 * 151 - 3 * 28))
