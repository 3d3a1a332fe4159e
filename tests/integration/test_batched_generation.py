"""Batched compressed generation (sparsemm_utils.shared_prefill.shared_generate_batch): several
prompts of different lengths in ONE left-padded prefill through ``model.generate`` and one decode
whose per-head cache holds every (prompt, method) row with its own per-(row, KV head) lengths.

On tiny Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT and the trained tiny reader, for FullKV and every
compressing method: each (prompt, method) gives the tokens and KV bytes of batch-1
``compressed_generate`` of that prompt and method, and the batched cache stores no padding.
"""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils.benchmarks import load_benchmark, make_reader_benchmark
from sparsemm_utils.compression import (
    AdaKVPress,
    FullKVPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    SparseMMPress,
    StreamingLLMPress,
    compressed_generate,
    model_shape,
)
from sparsemm_utils.kv_cache import BatchedPerHeadKVCache, analytic_kv_bytes
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import OCR_PROMPT, VICUNA_SYSTEM_PROMPT, batch_inputs, build_inputs
from sparsemm_utils.shared_prefill import (
    SharedPrefillError,
    _left_pads,
    compress_prefill,
    decode_batch,
    prefill_batch,
    shared_generate_batch,
)

pytestmark = pytest.mark.slow

MODELS = ("tiny-random/qwen2_vl", "tiny-random/qwen2_5_vl", "tiny-random/llava_next", "data/tiny_reader")
NEW_TOKENS = 6
WINDOW = 8


@functools.lru_cache(maxsize=None)
def _setup(model_id):
    """The model and three prompts of different lengths: Qwen the OCR prompt of blank images of
    three sizes, LLaVA-NeXT (anyres: 1500+ image tokens) three text prompts, the tiny reader three
    questions of its offline benchmark."""
    loaded = load_model(model_id, seed=1) if model_id.startswith("tiny-random/") else load_model(model_id)
    if model_id == "data/tiny_reader":
        samples = list(load_benchmark("reader_docqa", source=make_reader_benchmark(2)))[:3]
        prompts = [build_inputs(loaded, s.image, s.question) for s in samples]
    elif loaded.model_type == "llava_next":
        texts = [f"{VICUNA_SYSTEM_PROMPT} USER: {OCR_PROMPT} ASSISTANT:", "Read the page: 12 apples.", "USER: Hi ASSISTANT:"]
        prompts = [dict(loaded.tokenizer(t, return_tensors="pt")) for t in texts]
    else:
        prompts = [build_inputs(loaded, Image.new("RGB", size, "white")) for size in ((120, 90), (56, 56), (90, 150))]
    shape = model_shape(loaded)
    scores = np.random.default_rng(7).random((shape.layers, shape.query_heads)) ** 3
    return loaded, prompts, scores


def _presses(scores, n):
    return [
        FullKVPress(),
        SparseMMPress(budget=16, window=WINDOW, head_scores=scores),
        SparseMMPress(budget=n + 1, window=WINDOW, head_scores=scores),  # n < B: the original's skip
        AdaKVPress(budget=24, window=WINDOW),
        SnapKVPress(budget=24, window=WINDOW),
        PyramidKVPress(budget=16, window=WINDOW),
        RandomPress(budget=16, window=WINDOW, seed=3),
        StreamingLLMPress(budget=16, window=WINDOW, sink=2),
    ]


@pytest.mark.parametrize("model_id", MODELS)
def test_every_prompt_and_method_equals_batch_one_compressed_generate(model_id):
    loaded, prompts, scores = _setup(model_id)
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # the batch is padded
    presses = [_presses(scores, n) for n in lengths]
    presses[1] = presses[1][:3]  # prompts may have different methods
    batched = shared_generate_batch(loaded, presses, prompts, max_new_tokens=NEW_TOKENS)
    assert [len(rows) for rows in batched] == [len(own) for own in presses]
    for b, (inputs, own, rows) in enumerate(zip(prompts, presses, batched)):
        for press, row in zip(own, rows):
            alone = compressed_generate(loaded, press, inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            label = (model_id, b, press.name, getattr(press, "budget", None))
            assert torch.equal(row.sequences, alone.sequences), label
            assert row.kv_bytes == alone.kv_bytes, label
            assert row.prompt_len == lengths[b]


def test_the_batched_cache_stores_no_padding():
    loaded, prompts, scores = _setup("tiny-random/qwen2_vl")
    batch = prefill_batch(loaded, prompts, max_new_tokens=3, query_window=WINDOW)
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    assert batch.pads == tuple(max(lengths) - n for n in lengths)
    assert [p.prompt_len for p in batch.prompts] == lengths
    assert batch.input_ids.shape == (3, max(lengths))
    for prefill, inputs in zip(batch.prompts, prompts):
        assert torch.equal(prefill.input_ids, inputs["input_ids"])  # the padding is gone
    presses = [[FullKVPress(), SnapKVPress(budget=24, window=WINDOW)], [FullKVPress()], [SparseMMPress(budget=16, window=WINDOW, head_scores=scores)]]
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
    loaded, prompts, scores = _setup("tiny-random/qwen2_vl")
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
