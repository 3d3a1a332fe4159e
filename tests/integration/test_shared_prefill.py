"""One shared prefill + batched decode (sparsemm_utils.shared_prefill) against batch-1 ``compressed_generate``.

On tiny Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT and the trained tiny reader, for FullKV and every
compressing method at budgets that bind and that do not (the n < B skip, AdaKV's data-dependent
caps, saturated heads): each row's tokens, KV bytes, caps, skipped layers and kept tokens equal
those of ``compressed_generate`` for that method alone; the batched cache's bytes are the analytic
sum; decoding positions are the batch-1 ones; methods that change the prefill are refused.
Several prompts of different lengths at once (``shared_generate_batch``: one left-padded prefill,
one decode of every (prompt, method) row) give each the tokens and bytes of batch 1.
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
    make_press,
    model_shape,
)
from sparsemm_utils.fastv import FastVAtBudget
from sparsemm_utils.kv_cache import BatchedPerHeadKVCache, UnsupportedBatchError, analytic_kv_bytes
from sparsemm_utils.models import load_model, set_text_attention, text_attention_implementation
from sparsemm_utils.prompts import OCR_PROMPT, VICUNA_SYSTEM_PROMPT, batch_inputs, build_inputs
from sparsemm_utils.shared_prefill import (
    PrefillNotShareableError,
    SharedPrefillError,
    _left_pads,
    compress_prefill,
    compressed_generate_batch,
    decode_batch,
    decode_rows,
    prefill_batch,
    shared_generate,
    shared_generate_batch,
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


def _benchmark_script(name):
    """The module of ``benchmarks/<name>.py``."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_the_speed_benchmark_runs_and_finds_every_cell_identical(capsys):
    """benchmarks/shared_prefill_speed.py on one question (timings are printed, never asserted)."""
    bench = _benchmark_script("shared_prefill_speed")
    cells, _ = bench.step05_cells(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert ("fullkv", None) in cells and ("sparsemm", 16) in cells and not any(m == "fastv" for m, _ in cells)
    assert bench.main(["--questions", "1"]) == 0  # 1 when a cell's tokens or bytes differ between the paths
    out = capsys.readouterr().out
    assert "per cell" in out and "shared (auto)" in out and "yes" in out


BATCH_NEW_TOKENS = 6


# ------------------------------------------------------------------- several prompts at once
# shared_generate_batch: several prompts of different lengths in ONE left-padded prefill through
# model.generate and one decode whose per-head cache holds every (prompt, method) row with its own
# per-(row, KV head) lengths: each (prompt, method) gives batch-1 compressed_generate's tokens and bytes.


@functools.lru_cache(maxsize=None)
def _batch_setup(model_id):
    """The model and three prompts of different lengths: Qwen the OCR prompt of blank images of
    three sizes, LLaVA-NeXT (anyres: 1500+ image tokens) three text prompts, the tiny reader three
    questions of its offline benchmark."""
    loaded, _, scores = _setup(model_id)
    if model_id == "data/tiny_reader":
        samples = list(load_benchmark("reader_docqa", source=make_reader_benchmark(2)))[:3]
        prompts = [build_inputs(loaded, s.image, s.question) for s in samples]
    elif loaded.model_type == "llava_next":
        texts = [f"{VICUNA_SYSTEM_PROMPT} USER: {OCR_PROMPT} ASSISTANT:", "Read the page: 12 apples.", "USER: Hi ASSISTANT:"]
        prompts = [dict(loaded.tokenizer(t, return_tensors="pt")) for t in texts]
    else:
        prompts = [build_inputs(loaded, Image.new("RGB", size, "white")) for size in ((120, 90), (56, 56), (90, 150))]
    return loaded, prompts, scores


def _batch_presses(scores, n):
    """FullKV and every compressing method (SparseMM also where n < B: the original's skip)."""
    cells = [("sparsemm", 16, {"head_scores": scores}), ("sparsemm", n + 1, {"head_scores": scores}), ("adakv", 24, {}),
             ("snapkv", 24, {}), ("pyramidkv", 16, {}), ("random", 16, {"seed": 3}), ("streamingllm", 16, {"sink": 2})]
    return [FullKVPress()] + [make_press(name, budget=b, window=WINDOW, **extra) for name, b, extra in cells]


@pytest.mark.parametrize("model_id", MODELS)
def test_every_prompt_and_method_equals_batch_one_compressed_generate(model_id):
    loaded, prompts, scores = _batch_setup(model_id)
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # the batch is padded
    presses = [_batch_presses(scores, n) for n in lengths]
    presses[1] = presses[1][:3]  # prompts may have different methods
    batched = shared_generate_batch(loaded, presses, prompts, max_new_tokens=BATCH_NEW_TOKENS)
    assert [len(rows) for rows in batched] == [len(own) for own in presses]
    for b, (inputs, own, rows) in enumerate(zip(prompts, presses, batched)):
        for press, row in zip(own, rows):
            alone = compressed_generate(loaded, press, inputs, max_new_tokens=BATCH_NEW_TOKENS, do_sample=False)
            label = (model_id, b, press.name, getattr(press, "budget", None))
            assert torch.equal(row.sequences, alone.sequences), label
            assert row.kv_bytes == alone.kv_bytes, label
            assert row.prompt_len == lengths[b]


@pytest.mark.parametrize("model_id", MODELS)
def test_one_method_on_a_batch_through_generate_equals_batch_one(model_id):
    # compressed_generate_batch: the prompts left-padded through model.generate itself, every method
    loaded, prompts, scores = _batch_setup(model_id)
    shape = model_shape(loaded)
    generated = set()
    for press in _batch_presses(scores, int(prompts[0]["input_ids"].shape[1])):
        batched = compressed_generate_batch(loaded, press, prompts, max_new_tokens=BATCH_NEW_TOKENS, do_sample=False)
        generated |= {int(row.new_tokens.numel()) for row in batched}
        for b, (inputs, row) in enumerate(zip(prompts, batched)):
            alone = compressed_generate(loaded, press, inputs, max_new_tokens=BATCH_NEW_TOKENS, do_sample=False)
            label = (model_id, b, press.name, getattr(press, "budget", None))
            assert torch.equal(row.sequences, alone.sequences), label
            assert row.kv_bytes == alone.kv_bytes, label
            if not isinstance(press, FullKVPress):
                np.testing.assert_array_equal(row.stored_tokens, alone.cache.stored_tokens(), err_msg=str(label))
                np.testing.assert_array_equal(row.assigned, alone.session.assigned, err_msg=str(label))
            else:
                np.testing.assert_array_equal(row.stored_tokens, np.full(shape.kv_grid, alone.sequences.shape[1] - 1))
    if model_id == "data/tiny_reader":
        assert len(generated) > 1  # prompts ended at different steps: generate padded the finished ones


def test_the_batched_cache_stores_no_padding():
    loaded, prompts, scores = _batch_setup("tiny-random/qwen2_vl")
    batch = prefill_batch(loaded, prompts, max_new_tokens=3, query_window=WINDOW)
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    assert batch.pads == tuple(max(lengths) - n for n in lengths)
    assert [p.prompt_len for p in batch.prompts] == lengths
    assert batch.input_ids.shape == (3, max(lengths))
    for prefill, inputs in zip(batch.prompts, prompts):
        assert torch.equal(prefill.input_ids, inputs["input_ids"])  # the padding is gone
    presses = [[FullKVPress(), make_press("snapkv", budget=24, window=WINDOW)], [FullKVPress()],
               [make_press("sparsemm", budget=16, window=WINDOW, head_scores=scores)]]
    rows = [[compress_prefill(prefill, press) for press in own] for prefill, own in zip(batch.prompts, presses)]
    cache = BatchedPerHeadKVCache.from_prefills([(p.states(), [r.positions for r in own]) for p, own in zip(batch.prompts, rows)])
    shape = model_shape(loaded)
    stored = cache.stored_tokens()  # (rows, layers, kv_heads)
    np.testing.assert_array_equal(stored[0], np.full(shape.kv_grid, lengths[0]))  # FullKV: its own n, not the padded one
    np.testing.assert_array_equal(stored[1], np.full(shape.kv_grid, 24))
    np.testing.assert_array_equal(stored[2], np.full(shape.kv_grid, lengths[1]))
    np.testing.assert_array_equal(stored[3], presses[2][0].capacities(shape, lengths[2]).stored(lengths[2]))
    assert cache.kv_bytes() == analytic_kv_bytes(stored, loaded.head_dim, torch.float32)
    generated = decode_batch(loaded, batch, rows)
    assert [len(g) for g in generated] == [2, 1, 1]


def test_batch_inputs_pads_on_the_left_and_misuse_says_what_to_do():
    loaded, prompts, scores = _batch_setup("tiny-random/qwen2_vl")
    pair = sorted(prompts, key=lambda p: -int(p["input_ids"].shape[1]))[:2]
    batch = batch_inputs(loaded, pair)
    n0, n1 = (int(p["input_ids"].shape[1]) for p in pair)
    assert n0 > n1 and batch["input_ids"].shape == (2, n0)
    assert torch.equal(batch["input_ids"][1, n0 - n1 :], pair[1]["input_ids"][0])
    assert batch["attention_mask"][1].tolist() == [0] * (n0 - n1) + [1] * n1
    assert batch["mm_token_type_ids"][1, : n0 - n1].eq(0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([pair[0]["pixel_values"], pair[1]["pixel_values"]]))
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch_inputs(loaded, prompts[:1]) is prompts[0]
    text = dict(loaded.tokenizer("Hello", return_tensors="pt"))
    with pytest.raises(ValueError, match="batch prompts of one kind"):
        batch_inputs(loaded, [prompts[0], text])
    with pytest.raises(SharedPrefillError, match="one list of presses per prompt"):
        shared_generate_batch(loaded, [[FullKVPress()]], prompts[:2], max_new_tokens=2)
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert _left_pads(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])) == (0, 2)
    assert _left_pads(ids, None) == (0, 0)
    for bad in ([[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 1, 1], [0, 1, 0, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]):
        with pytest.raises(SharedPrefillError, match="not a left-padded batch"):
            _left_pads(ids, torch.tensor(bad))


def test_the_batch_benchmark_runs_step_05s_sweep_and_finds_the_same_answers(capsys):
    """benchmarks/batched_eval_speed.py on three questions at batch 1 and 2 (timings printed, never asserted)."""
    bench = _benchmark_script("batched_eval_speed")
    assert bench.main(["--questions", "3", "--batch-sizes", "1", "2"]) == 0  # 1 when an answer differs from batch 1
    out = capsys.readouterr().out
    assert "step 05 sweep" in out and out.count(" yes") == 2
