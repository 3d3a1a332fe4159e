"""The one-call decode paths inside ``model.generate`` (sparsemm_utils.varlen_attention).

On CPU: the padded path gives the reference path's tokens and logits on tiny Qwen2-VL (GQA) and
LLaVA-NeXT (MHA), on the random-weight real shapes, and leaves the model's attention as it was.
Where CUDA exists (skipped elsewhere): torch's varlen flash kernel equals the reference path on a
random cache and inside generation, in bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemm_utils.compression import FullKVPress, SnapKVPress, SparseMMPress, compressed_generate
from sparsemm_utils.kv_cache import PerHeadKVLayer
from sparsemm_utils.models import load_model, text_attention_implementation
from sparsemm_utils.real_shapes import build_random_model, random_prompt
from sparsemm_utils.varlen_attention import (
    compressed_generate_with,
    compression_with_backend,
    flash_decode,
    packed_segments,
)

pytestmark = pytest.mark.slow
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA GPU")


def _prompt(loaded, n: int = 72, seed: int = 0):
    vocab = loaded.text_config.vocab_size
    ids = torch.randint(0, min(vocab - 8, 95), (1, n), generator=torch.Generator().manual_seed(seed)) + 3
    return {"input_ids": ids.to(loaded.device), "attention_mask": torch.ones_like(ids).to(loaded.device)}


def _scores(loaded, seed=0):
    return np.random.default_rng(seed).random((loaded.num_layers, loaded.num_heads)) ** 4 + 1e-3


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava_next"])
def test_padded_path_generates_what_the_reference_path_generates(model_type):
    loaded = load_model(f"tiny-random/{model_type}")
    inputs = _prompt(loaded)
    press = SparseMMPress(budget=24, window=8, head_scores=_scores(loaded))
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = compressed_generate(loaded, press, inputs, **kwargs)
    padded = compressed_generate_with(loaded, press, inputs, backend="padded", **kwargs)
    assert padded.session.decode_backend == "padded"
    assert torch.equal(padded.sequences, reference.sequences)
    for a, b in zip(padded.output.logits, reference.output.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(padded.cache.stored_tokens(), reference.cache.stored_tokens())
    assert text_attention_implementation(loaded.model) == "sdpa"  # restored


def test_backend_context_leaves_fullkv_alone_and_restores_after_an_error():
    loaded = load_model("tiny-random/qwen2_vl")
    with compression_with_backend(loaded, FullKVPress(), backend="padded") as session:
        assert session.decode_backend is None and text_attention_implementation(loaded.model) == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with compression_with_backend(loaded, SnapKVPress(budget=24, window=8), backend="padded"):
            assert text_attention_implementation(loaded.model) == "sparsemm_per_head_padded"
            raise RuntimeError("boom")
    assert text_attention_implementation(loaded.model) == "sdpa"


def test_padded_path_on_a_random_weight_real_shape():
    """Two layers of Qwen2-VL-2B's language model (12 query heads, 2 KV heads, head_dim 128)."""
    loaded = build_random_model("qwen2-vl-2b", layers=2, vocab_size=512)
    inputs = random_prompt(loaded, 96, seed=1)
    press = SparseMMPress(budget=48, window=8, head_scores=_scores(loaded))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = compressed_generate(loaded, press, inputs, **kwargs)
    padded = compressed_generate_with(loaded, press, inputs, backend="padded", **kwargs)
    assert torch.equal(padded.sequences, reference.sequences)
    torch.testing.assert_close(padded.output.logits[-1], reference.output.logits[-1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ GPU


@cuda
@pytest.mark.parametrize("group", [1, 7])
def test_flash_kernel_equals_the_reference_on_a_random_cache(group):  # pragma: no cover - GPU machines
    g = torch.Generator().manual_seed(0)
    kv_heads, n, dim = 4, 300, 128
    layer = PerHeadKVLayer(decode_reserve=5)
    keys = torch.randn(1, kv_heads, n, dim, generator=g).to("cuda", torch.bfloat16)
    values = torch.randn(1, kv_heads, n, dim, generator=g).to("cuda", torch.bfloat16)
    layer.update(keys, values)
    keep = [torch.arange(0, n, step, device="cuda") for step in (1, 3, 17, 60)]
    layer.compress(keep)
    for step in range(8):  # past the reserve: one re-pack
        new = torch.randn(1, kv_heads, 1, dim, generator=g).to("cuda", torch.bfloat16)
        layer.update(new, new)
        query = torch.randn(1, kv_heads * group, 1, dim, generator=g).to("cuda", torch.bfloat16)
        flash = flash_decode(packed_segments(layer), query, dim**-0.5)
        torch.testing.assert_close(flash.float(), layer.attend(query, dim**-0.5).float(), atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("shape", ["qwen2-vl-2b", "llava-next-vicuna-7b"])
def test_flash_path_inside_generate_on_a_gpu(shape):  # pragma: no cover - GPU machines
    loaded = build_random_model(shape, layers=2, vocab_size=1024, dtype=torch.bfloat16, device="cuda")
    inputs = random_prompt(loaded, 600, seed=2)
    press = SparseMMPress(budget=128, window=32, head_scores=_scores(loaded))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = compressed_generate(loaded, press, inputs, **kwargs)
    flash = compressed_generate_with(loaded, press, inputs, backend="flash", **kwargs)
    assert flash.session.decode_backend == "flash"
    # bf16 kernels differ in summation order: compare the first decode step's logits, then agreement
    torch.testing.assert_close(flash.output.logits[1].float(), reference.output.logits[1].float(), atol=5e-2, rtol=5e-2)
    agree = (flash.sequences == reference.sequences).float().mean().item()
    assert agree > 0.9
