"""The training loop's faster data path gives the very same tensors as the stock code.

``sparsemm_utils.tiny_reader.fast_pixels`` (pixels by table lookup) and ``reader_tasks.memoized_document_lines``
are speed-ups only: a reader trained before them must be reproduced bit for bit after them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils.random_models import build_tiny_processor
from sparsemm_utils.reader_tasks import ReaderDocSpec, _document_lines, document_lines, memoized_document_lines
from sparsemm_utils.tiny_reader.batches import StepBatches, char_classes, collate
from sparsemm_utils.tiny_reader.config import TrainConfig
from sparsemm_utils.tiny_reader.curriculum import step_samples, step_task
from sparsemm_utils.tiny_reader.fast_pixels import LookupQwen2VLImageProcessor, with_lookup_pixels
from sparsemm_utils.tiny_reader.model import build_reader


@pytest.fixture(scope="module")
def processor():
    """The reader's processor (its model is built and dropped: only the processor is used)."""
    return build_reader(seed=0)[1]


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_lookup_table_by_hand(processor):
    fast = with_lookup_pixels(processor).image_processor
    ip = processor.image_processor
    table = fast._lookup_table(ip.rescale_factor, ip.image_mean, ip.image_std)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    # byte v of channel c: float32(v / 255 computed in float64), then (x - mean[c]) / std[c] in float32
    for c in range(3):
        mean, std = np.float32(ip.image_mean[c]), np.float32(ip.image_std[c])
        for v in (0, 1, 128, 255):
            x = np.float32(np.float64(v) * ip.rescale_factor)
            assert table[c, v] == (x - mean) / std
    # black on the CLIP mean/std: (0 - 0.48145466) / 0.26862954 = -1.79226...
    assert table[0, 0] == pytest.approx(-1.7922625, abs=1e-6)


def test_reader_pages_give_the_stock_pixels(processor):
    spec = ReaderDocSpec()
    pages = [spec.render(seed=3, index=i)["image"] for i in range(12)]
    stock = processor.image_processor(pages, return_tensors="pt")
    fast = with_lookup_pixels(processor).image_processor(pages, return_tensors="pt")
    assert _same(stock, fast) and stock["pixel_values"].dtype == torch.float32


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16)), min_size=1, max_size=3),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_any_image_gives_the_stock_pixels(processor, sizes, seed, aligned):
    """Pages of whole 28 px cells take the lookup; other sizes (resized by the processor) fall
    back to the stock code; a batch that mixes them falls back as a whole. Same numbers always."""
    rng = np.random.default_rng(seed)
    images = []
    for k, (a, b) in enumerate(sizes):
        h, w = (a * 28, b * 28) if aligned and k % 2 == 0 else (a * 9 + 5, b * 11 + 3)
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    stock = processor.image_processor(images, return_tensors="pt")
    fast = with_lookup_pixels(processor).image_processor(images, return_tensors="pt")
    assert _same(stock, fast)


def test_with_lookup_pixels_leaves_the_original_alone(processor):
    fast = with_lookup_pixels(processor)
    assert type(fast.image_processor) is LookupQwen2VLImageProcessor
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # what save_reader writes
    assert fast.tokenizer is processor.tokenizer
    assert fast.image_processor.to_dict() == {**processor.image_processor.to_dict(), "image_processor_type": "LookupQwen2VLImageProcessor"}
    llava = build_tiny_processor("llava_next")
    assert with_lookup_pixels(llava) is llava  # other processors are returned as they are


def test_memoized_document_lines_work_each_page_out_once(monkeypatch):
    doc = ReaderDocSpec().layout(seed=0, index=5).row(draw=False)
    other = ReaderDocSpec().layout(seed=0, index=6).row(draw=False)
    calls = []
    monkeypatch.setattr("sparsemm_utils.reader_tasks._document_lines", lambda d: calls.append(id(d)) or _document_lines(d))
    plain = document_lines(doc)
    with memoized_document_lines():
        with memoized_document_lines():  # nested blocks share one memo
            assert document_lines(doc) == plain
        assert document_lines(doc) == plain and document_lines(other) == document_lines(other)
        document_lines(doc).clear()  # callers get their own list
        assert document_lines(doc) == plain
    assert calls == [id(doc), id(doc), id(other)]
    # after the block a changed document is read afresh
    doc["2_coord"] = doc["2_coord"][:1]
    assert len(document_lines(doc)) == 1 and len(calls) == 4


def test_step_batches_equal_the_stock_collate(processor):
    """The training loop's batches (lookup pixels, one mapper, memoized lines) are exactly what
    collate gives with the stock processor, for every task."""
    cfg = TrainConfig(steps=30, batch_size=4, validate_every=0, checkpoint_every=0)
    batches = StepBatches(cfg, processor, char_classes())
    seen = set()
    for step in range(30):
        task = step_task(cfg, step)
        if task in seen:
            continue
        seen.add(task)
        stock = collate(processor, step_samples(cfg, step), classes=char_classes(), pointers=True, pointer_blanks=True, key_pointers=True)
        assert _same(batches[step], stock), (step, task)
    assert seen == {"ocr", "line", "value"}
