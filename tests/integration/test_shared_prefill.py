"""One shared prefill + batched decode (sparsemm_utils.shared_prefill) against batch-1 ``compressed_generate``.

On tiny Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT and the trained tiny reader, for FullKV and every
compressing method at budgets that bind and that do not (the n < B skip, AdaKV's data-dependent
caps, saturated heads): each row's tokens, KV bytes, caps, skipped layers and kept tokens equal
those of ``compressed_generate`` for that method alone; the batched cache's bytes are the analytic
sum; decoding positions are the batch-1 ones; methods that change the prefill are refused.
"""

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils.benchmarks import load_benchmark, make_reader_benchmark
from sparsemm_utils.compression import (
    AdaKVPress,
    FullKVPress,
    HeadMaskAblation,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    SparseMMPress,
    StreamingLLMPress,
    compressed_generate,
    model_shape,
)
from sparsemm_utils.fastv import FastVAtBudget
from sparsemm_utils.kv_cache import BatchedPerHeadKVCache, UnsupportedBatchError, analytic_kv_bytes
from sparsemm_utils.models import load_model, set_text_attention, text_attention_implementation
from sparsemm_utils.prompts import OCR_PROMPT, VICUNA_SYSTEM_PROMPT, build_inputs
from sparsemm_utils.shared_prefill import (
    PrefillNotShareableError,
    SharedPrefillError,
    compress_prefill,
    decode_rows,
    shared_generate,
    shared_prefill,
)

pytestmark = pytest.mark.slow

MODELS = ("tiny-random/qwen2_vl", "tiny-random/qwen2_5_vl", "tiny-random/llava_next", "data/tiny_reader")
NEW_TOKENS = 8
WINDOW = 8


@functools.lru_cache(maxsize=None)
def _setup(model_id):
    """The model and two prompts: the tiny random models get the OCR prompt of a blank image
    (LLaVA-NeXT its text part: anyres makes 1500+ image tokens) and a shorter text prompt; the
    tiny reader gets two questions of its offline benchmark."""
    loaded = load_model(model_id, seed=1) if model_id.startswith("tiny-random/") else load_model(model_id)
    if model_id == "data/tiny_reader":
        samples = list(load_benchmark("reader_docqa", source=make_reader_benchmark(1)))[:2]
        prompts = [build_inputs(loaded, s.image, s.question) for s in samples]
    else:
        text = f"{VICUNA_SYSTEM_PROMPT} USER: {OCR_PROMPT} ASSISTANT:" if loaded.model_type == "llava_next" else None
        first = dict(loaded.tokenizer(text, return_tensors="pt")) if text else build_inputs(loaded, Image.new("RGB", (120, 90), "white"))
        prompts = [first, dict(loaded.tokenizer("Read the page: 12 apples.", return_tensors="pt"))]
    shape = model_shape(loaded)
    scores = np.random.default_rng(7).random((shape.layers, shape.query_heads)) ** 3
    return loaded, prompts, scores


def _presses(n, scores):
    """FullKV and every compressing method, at budgets that bind (16, 24, 40) and that do not."""
    presses = [FullKVPress()]
    for budget in (16, 24, 40):
        presses += [
            SparseMMPress(budget=budget, window=WINDOW, head_scores=scores),
            RandomPress(budget=budget, window=WINDOW, seed=3),
            SnapKVPress(budget=budget, window=WINDOW),
            PyramidKVPress(budget=budget, window=WINDOW),
            AdaKVPress(budget=budget, window=WINDOW),
            StreamingLLMPress(budget=budget, window=WINDOW, sink=2),
        ]
    presses += [
        SparseMMPress(budget=n + 1, window=WINDOW, head_scores=scores),  # n < B: the original's skip
        SparseMMPress(budget=n, window=WINDOW, head_scores=scores, ratio=1.0),  # every cap = n - w
        SnapKVPress(budget=n + 3, window=WINDOW),
        AdaKVPress(budget=n + 1, window=WINDOW),  # AdaKV skips every layer
        PyramidKVPress(budget=n, window=WINDOW),  # the top layers saturate
        StreamingLLMPress(budget=n, window=WINDOW),
        SnapKVPress(budget=24, window=4),  # a smaller window than the others
    ]
    return presses


@pytest.mark.parametrize("model_id", MODELS)
def test_every_row_equals_batch_one_compressed_generate(model_id):
    loaded, prompts, scores = _setup(model_id)
    shape = model_shape(loaded)
    lengths = set()
    for inputs in prompts:
        n = int(inputs["input_ids"].shape[1])
        presses = _presses(n, scores)
        rows = shared_generate(loaded, presses, inputs, max_new_tokens=NEW_TOKENS)
        assert len(rows) == len(presses)
        skipped_somewhere = False
        for press, row in zip(presses, rows):
            alone = compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            label = (model_id, n, press.name, getattr(press, "budget", None))
            assert torch.equal(row.sequences, alone.sequences), label
            assert row.kv_bytes == alone.kv_bytes, label
            lengths.add(int(row.new_tokens.numel()))
            if isinstance(press, FullKVPress):
                np.testing.assert_array_equal(row.stored_tokens, np.full(shape.kv_grid, alone.sequences.shape[1] - 1))
                continue
            np.testing.assert_array_equal(row.assigned, alone.session.assigned, err_msg=str(label))
            assert row.skipped_layers == alone.session.skipped_layers, label
            np.testing.assert_array_equal(row.saturated(), alone.session.saturated())
            np.testing.assert_array_equal(row.kept_prompt_tokens, alone.cache.kept_prompt_tokens())
            np.testing.assert_array_equal(row.stored_tokens, alone.cache.stored_tokens())
            skipped_somewhere |= bool(row.skipped_layers)
            assert row.kv_bytes == analytic_kv_bytes(row.stored_tokens, loaded.head_dim, loaded.model.dtype)
        assert skipped_somewhere  # the n < B skip was exercised
    if model_id == "data/tiny_reader":
        assert len(lengths) > 1  # rows ended at different steps: finished rows left the batch



def test_llava_next_with_an_image():
    # anyres: 1500+ prompt tokens, the image features entering at the prefill only (the study model's class)
    loaded, _, scores = _setup("tiny-random/llava_next")
    inputs = build_inputs(loaded, Image.new("RGB", (120, 90), "white"))
    n = int(inputs["input_ids"].shape[1])
    assert n > 1000
    presses = [
        FullKVPress(),
        SparseMMPress(budget=64, window=WINDOW, head_scores=scores),
        AdaKVPress(budget=64, window=WINDOW),
        SnapKVPress(budget=n + 1, window=WINDOW),
    ]
    for press, row in zip(presses, shared_generate(loaded, presses, inputs, max_new_tokens=4)):
        alone = compressed_generate(loaded, press, inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(row.sequences, alone.sequences) and row.kv_bytes == alone.kv_bytes, press.name

def test_the_batched_cache_holds_the_analytic_bytes_of_its_rows():
    loaded, prompts, scores = _setup("tiny-random/qwen2_vl")
    inputs = prompts[0]
    n = int(inputs["input_ids"].shape[1])
    presses = [FullKVPress(), SnapKVPress(budget=24, window=WINDOW), SparseMMPress(budget=16, window=WINDOW, head_scores=scores)]
    prefill = shared_prefill(loaded, inputs, max_new_tokens=4, query_window=WINDOW)
    assert prefill.prompt_len == n and len(prefill.layers) == loaded.num_layers
    assert prefill.layers[0].window_query.shape[2] == WINDOW
    rows = [compress_prefill(prefill, p) for p in presses]
    cache = BatchedPerHeadKVCache.from_prefill(prefill.states(), [r.positions for r in rows], decode_reserve=3)
    stored = cache.stored_tokens()  # (rows, layers, kv_heads), right after the prefill
    shape = model_shape(loaded)
    assert stored.shape == (3, shape.layers, shape.kv_heads)
    np.testing.assert_array_equal(stored[0], np.full(shape.kv_grid, n))
    np.testing.assert_array_equal(stored[1], np.full(shape.kv_grid, 24))  # SnapKV B = 24: 16 selected + the window
    np.testing.assert_array_equal(stored[2], presses[2].capacities(shape, n).stored(n))
    assert cache.kv_bytes() == analytic_kv_bytes(stored, loaded.head_dim, torch.float32)
    np.testing.assert_array_equal(
        cache.row_kv_bytes(), [analytic_kv_bytes(s, loaded.head_dim, torch.float32) for s in stored]
    )
    # the full row stores n tokens per head: FullKV's DynamicCache bytes after its prefill
    assert cache.row_kv_bytes()[0] == n * shape.layers * shape.kv_heads * loaded.head_dim * 2 * 4


@pytest.mark.parametrize("model_id", ["tiny-random/qwen2_vl", "tiny-random/llava_next"])
def test_decoding_positions_are_those_of_batch_one(model_id):
    loaded, prompts, scores = _setup(model_id)
    inputs = prompts[0]
    press = SparseMMPress(budget=24, window=WINDOW, head_scores=scores)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    hook = loaded.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        alone = list(seen)
        seen.clear()
        shared_generate(loaded, [press, FullKVPress(), SnapKVPress(budget=16, window=WINDOW)], inputs, max_new_tokens=NEW_TOKENS)
    finally:
        hook.remove()
    assert len(seen) == len(alone) == NEW_TOKENS  # the prefill, then NEW_TOKENS - 1 decode steps
    for got, want in zip(seen, alone):  # M-RoPE (4, rows, t) for Qwen, (rows, t) for LLaVA-NeXT
        for row in range(got.shape[-2]):
            torch.testing.assert_close(got[..., row : row + 1, :], want, rtol=0, atol=0)


def test_methods_that_change_the_prefill_are_refused_before_any_forward_pass():
    loaded, prompts, scores = _setup("tiny-random/qwen2_vl")
    inputs = prompts[0]
    calls = []
    hook = loaded.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PrefillNotShareableError, match="head-mask ablation zeroes the query"):
            shared_generate(loaded, [FullKVPress(), HeadMaskAblation(selection="random")], inputs, max_new_tokens=2)
        with pytest.raises(PrefillNotShareableError, match="FastV drops image tokens INSIDE the prefill"):
            shared_generate(loaded, [FastVAtBudget(budget=24, k=1)], inputs, max_new_tokens=2)
        with pytest.raises(PrefillNotShareableError, match="press must be one of the KV-compression methods"):
            shared_generate(loaded, ["snapkv"], inputs, max_new_tokens=2)
        with pytest.raises(SharedPrefillError, match="presses is empty"):
            shared_generate(loaded, [], inputs, max_new_tokens=2)
        two = dict(inputs)
        two["input_ids"] = inputs["input_ids"].repeat(2, 1)
        with pytest.raises(UnsupportedBatchError, match="batch size 2"):
            shared_generate(loaded, [FullKVPress()], two, max_new_tokens=2)
        with pytest.raises(SharedPrefillError, match="max_new_tokens"):
            shared_prefill(loaded, inputs, max_new_tokens=0)
    finally:
        hook.remove()
    assert calls == []


def test_misuse_of_a_prefill_says_what_to_do():
    loaded, prompts, scores = _setup("tiny-random/qwen2_vl")
    prefill = shared_prefill(loaded, prompts[0], max_new_tokens=2, query_window=4)
    with pytest.raises(SharedPrefillError, match=r"recorded 4: call shared_prefill\(\.\.\., query_window=8\)"):
        compress_prefill(prefill, SnapKVPress(budget=24, window=8))
    other = shared_prefill(loaded, prompts[1], max_new_tokens=2, query_window=4)
    row = compress_prefill(other, SnapKVPress(budget=16, window=4))
    with pytest.raises(SharedPrefillError, match="must be compress_prefill\\(prefill, press\\) of THIS prefill"):
        decode_rows(loaded, prefill, [row])
    with pytest.raises(SharedPrefillError, match="at least one compressed prefill"):
        decode_rows(loaded, prefill, [])
    set_text_attention(loaded.model, "eager")
    try:
        with pytest.raises(SharedPrefillError, match="uses 'eager' attention"):
            shared_prefill(loaded, prompts[0], max_new_tokens=2)
    finally:
        set_text_attention(loaded.model, "sdpa")
    assert text_attention_implementation(loaded.model) == "sdpa"


def test_backends_give_the_same_tokens():
    loaded, prompts, scores = _setup("data/tiny_reader")
    inputs = prompts[0]
    n = int(inputs["input_ids"].shape[1])
    presses = _presses(n, scores)[:13]
    reference = shared_generate(loaded, presses, inputs, max_new_tokens=NEW_TOKENS, backend="reference")
    padded = shared_generate(loaded, presses, inputs, max_new_tokens=NEW_TOKENS, backend="padded")
    for a, b in zip(reference, padded):
        assert torch.equal(a.sequences, b.sequences) and a.kv_bytes == b.kv_bytes
    assert text_attention_implementation(loaded.model) == "sdpa"


def test_the_speed_benchmark_runs_and_finds_every_cell_identical(capsys):
    """benchmarks/shared_prefill_speed.py on one question (timings are printed, never asserted)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "shared_prefill_speed.py"
    spec = importlib.util.spec_from_file_location("shared_prefill_speed", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["shared_prefill_speed"] = bench
    spec.loader.exec_module(bench)
    cells, _ = bench.step05_cells(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert ("fullkv", None) in cells and ("sparsemm", 16) in cells and not any(m == "fastv" for m, _ in cells)
    assert bench.main(["--questions", "1"]) == 0  # 1 when a cell's tokens or bytes differ between the paths
    out = capsys.readouterr().out
    assert "per cell" in out and "shared (auto)" in out and "yes" in out
