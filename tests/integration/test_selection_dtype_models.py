"""``selection_dtype="model"`` inside generation on a bf16 tiny model (docs/deviations.md "Selection
scores"): the shared prefill scores each dtype apart and every row equals batch-1
``compressed_generate`` with the same press; the kept prompt tokens are those the original's
bf16 scoring keeps (tests/unit/test_selection_dtype.py holds the transliteration)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils.compression import (
    AdaKVPress,
    CompressionSession,
    SnapKVPress,
    SparseMMPress,
    compressed_generate,
    model_shape,
)
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.shared_prefill import shared_generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the transliterations of the original
from test_selection_dtype import original_kept, original_window_scores  # noqa: E402

pytestmark = pytest.mark.slow

WINDOW = 8


@pytest.fixture(scope="module")
def bf16_model():
    loaded = load_model("tiny-random/qwen2_vl", seed=1, dtype=torch.bfloat16)
    inputs = build_inputs(loaded, Image.new("RGB", (120, 90), "white"))
    shape = model_shape(loaded)
    scores = np.random.default_rng(7).random((shape.layers, shape.query_heads)) ** 3
    return loaded, inputs, scores


def test_model_dtype_rows_equal_batch_one_and_float32_rows_stay_apart(bf16_model):
    loaded, inputs, scores = bf16_model
    assert loaded.model.dtype == torch.bfloat16
    presses = [
        press(budget=24, window=WINDOW, selection_dtype=dtype, **({"head_scores": scores} if press is SparseMMPress else {}))
        for press in (SparseMMPress, SnapKVPress, AdaKVPress)
        for dtype in ("float32", "model")
    ]
    rows = shared_generate(loaded, presses, inputs, max_new_tokens=4)
    for press, row in zip(presses, rows):
        alone = compressed_generate(loaded, press, inputs, max_new_tokens=4, do_sample=False)
        label = (press.name, press.selection_dtype)
        assert torch.equal(row.sequences, alone.sequences), label
        np.testing.assert_array_equal(row.assigned, alone.session.assigned, err_msg=str(label))
        np.testing.assert_array_equal(row.kept_prompt_tokens, alone.cache.kept_prompt_tokens())


def test_the_prefill_keeps_what_the_originals_bf16_scoring_keeps(bf16_model, monkeypatch):
    # record each layer's post-RoPE queries and keys as the per-head attention hands them to the
    # session, then compare the positions the cache kept with the original's selection on those states
    loaded, inputs, scores = bf16_model
    shape = model_shape(loaded)
    press = SparseMMPress(budget=24, window=WINDOW, head_scores=scores, selection_dtype="model")
    seen = {}
    prefill_layer = CompressionSession.prefill_layer

    def recording(self, layer_idx, query, key, scaling):
        seen[layer_idx] = (query.detach().clone(), key.detach().clone())
        return prefill_layer(self, layer_idx, query, key, scaling)

    monkeypatch.setattr(CompressionSession, "prefill_layer", recording)
    result = compressed_generate(loaded, press, inputs, max_new_tokens=1, do_sample=False)
    n = int(inputs["input_ids"].shape[1])
    group = shape.query_heads // shape.kv_heads
    assert sorted(seen) == list(range(shape.layers))
    for layer_idx, (query, key) in seen.items():
        assert query.dtype == torch.bfloat16
        scores_original = original_window_scores(query, key.repeat_interleave(group, dim=1), WINDOW, group)
        expected = original_kept(scores_original, np.minimum(result.session.assigned[layer_idx], n - WINDOW), "sort")
        kept = [set(p[p < n - WINDOW].tolist()) for p in result.cache.layers[layer_idx].prompt_positions()]
        assert kept == expected, layer_idx
    # the float32 default keeps other tokens on this bf16 model (5 of its 8 KV heads when written)
    monkeypatch.undo()
    default = compressed_generate(loaded, SparseMMPress(budget=24, window=WINDOW, head_scores=scores), inputs, max_new_tokens=1)
    differ = sum(
        set(a.tolist()) != set(b.tolist())
        for layer_a, layer_b in zip(result.cache.layers, default.cache.layers)
        for a, b in zip(layer_a.prompt_positions(), layer_b.prompt_positions())
    )
    assert differ >= 1
