"""The streamed layer statistics of step 07 against the eager reference, on tiny models: the
chunked recorder must give the numbers that eager attention (output_attentions) gives, and must
not change what the model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils import category_attention as ca
from sparsemm_utils import layer_stats_capture as lsc
from sparsemm_utils import token_categories as tc
from sparsemm_utils.attention_hooks import text_attention
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs

pytestmark = pytest.mark.slow


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


ANYRES = ("llava_next", "llava_onevision")
#: Image size per family: Qwen 280 x 224; anyres a small 64 x 48 (still ~1,300 tokens); InternVL a
#: square page (one 256-token tile; a 280 x 224 page would be 12 tiles and a thumbnail).
SIZES = {"llava_next": (64, 48), "llava_onevision": (64, 48), "internvl": (224, 224)}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl", "llava_onevision", "internvl"])
def sample(request):
    loaded = load_model(f"tiny-random/{request.param}", seed=0)
    size = SIZES.get(request.param, (280, 224))
    inputs = build_inputs(loaded, _image(*size, seed=1))
    # small chunks (the rows of one layer come in many pieces); anyres (~1,300 tokens): one piece
    chunk = 2048 if request.param in ANYRES else 37
    generated, stats = lsc.analyse_sample(loaded, inputs, max_new_tokens=6, chunk_size=chunk)
    return loaded, inputs, generated, stats


def _eager_attentions(loaded, inputs, generated):
    sequence = torch.cat([inputs["input_ids"], torch.as_tensor(generated)[None]], dim=1)
    with text_attention(loaded.model, "eager"), torch.no_grad():
        out = loaded.model(**lsc.forward_inputs_with_response(inputs, sequence), output_attentions=True, use_cache=False)
    return sequence, [a[0].double() for a in out.attentions]  # L x (H, N, N)


def test_streamed_statistics_equal_the_eager_reference(sample):
    loaded, inputs, generated, stats = sample
    sequence, attentions = _eager_attentions(loaded, inputs, generated)
    labels = tc.token_categories(sequence[0], loaded.image_token_id, inputs["input_ids"].shape[1])
    np.testing.assert_array_equal(stats.labels, labels)
    assert stats.mass.shape == (loaded.num_layers, sequence.shape[1], 3)
    eq4 = stats.category_attention()
    ent = stats.category_entropy()
    for layer, attn in enumerate(attentions):
        np.testing.assert_allclose(eq4[layer], ca.category_attention(attn, labels), atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(ent[layer], ca.category_entropy(attn, labels), atol=1e-5, equal_nan=True)
        # per head, rows that generated the answer: prompt_len - 1 .. N - 2
        rows = np.arange(inputs["input_ids"].shape[1] - 1, sequence.shape[1] - 1)
        reference = ca.category_mass(attn, labels)[:, rows, tc.VISION].mean(dim=1).numpy()
        np.testing.assert_allclose(stats.head_share(tc.VISION)[layer], reference, atol=1e-6)


def test_response_rows_split_their_attention_over_three_categories(sample):
    # every response row sees instruction, vision and response keys: Eq. 4 counts all of them for
    # each source, so Attn(response -> .) sums to 1 in every layer
    _, _, _, stats = sample
    np.testing.assert_allclose(stats.category_attention()[:, tc.RESPONSE].sum(axis=1), 1.0, atol=1e-6)
    # instruction rows never see the response: undefined
    assert np.isnan(stats.category_attention()[:, tc.INSTRUCTION, tc.RESPONSE]).all()


def test_recording_does_not_change_the_model_output(sample):
    loaded, inputs, generated, _ = sample
    sequence = torch.cat([inputs["input_ids"], torch.as_tensor(generated)[None]], dim=1)
    forward = lsc.forward_inputs_with_response(inputs, sequence)
    with torch.no_grad():
        plain = loaded.model(**forward, use_cache=False).logits
        recorder = lsc.LayerStatsRecorder(
            tc.token_categories(sequence[0], loaded.image_token_id, inputs["input_ids"].shape[1]),
            inputs["input_ids"].shape[1], loaded.num_layers, loaded.num_heads,
        )
        with text_attention(loaded.model, lsc.register_layer_stats()), lsc.recording_layer_stats(recorder):
            recorded = loaded.model(**forward, use_cache=False).logits
    assert torch.equal(plain, recorded)
    # the generated answer is the model's own greedy answer
    again = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(again[0, inputs["input_ids"].shape[1]:].numpy(), generated)


def test_the_recorder_refuses_a_partial_pass():
    loaded = load_model("tiny-random/qwen2_vl", seed=0)
    inputs = build_inputs(loaded, _image(280, 224, seed=2))
    labels = tc.token_categories(inputs["input_ids"][0], loaded.image_token_id)
    short = lsc.LayerStatsRecorder(labels[:-1], labels.size - 1, loaded.num_layers, loaded.num_heads)
    with pytest.raises(tc.AttentionShapeError, match="ONE forward pass"):
        with text_attention(loaded.model, lsc.register_layer_stats()), lsc.recording_layer_stats(short), torch.no_grad():
            loaded.model(**inputs, use_cache=False)
    unused = lsc.LayerStatsRecorder(labels, labels.size, loaded.num_layers, loaded.num_heads)
    with pytest.raises(tc.LayerAnalysisError, match="never recorded"):
        unused.finish()
