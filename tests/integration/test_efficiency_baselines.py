"""The two full-cache baselines of step 06 (docs/method.md §7): transformers' ``DynamicCache``
(``fullkv``) and the preallocated ``StaticCache`` (``fullkv_static``) hold the same tokens and
give the same greedy tokens; only the cost of appending differs."""

from __future__ import annotations

import pytest
import torch

from sparsemm_utils.efficiency import (
    BASELINES,
    STATIC_FULLKV,
    EfficiencyProtocol,
    InvalidEfficiencyConfigError,
    baseline_cache,
    measure,
)
from sparsemm_utils.kv_cache import cache_kv_bytes
from sparsemm_utils.real_shapes import build_random_model, random_prompt

pytestmark = pytest.mark.slow

NEW_TOKENS = 12


@pytest.mark.parametrize("shape", ["qwen2-vl-2b", "llava-next-mistral-7b"])
def test_static_cache_gives_the_dynamic_cache_tokens(shape):
    """Greedy generation with the StaticCache baseline = with DynamicCache, token for token, on a
    Qwen2-VL (M-RoPE) and a LLaVA-NeXT (Mistral, GQA 4:1) shape at 1 layer."""
    loaded = build_random_model(shape, layers=1, vocab_size=512, seed=3)
    inputs = random_prompt(loaded, 80, seed=5)
    generated = {}
    for method in BASELINES:
        cache = baseline_cache(method, loaded.text_config, 80 + NEW_TOKENS)
        with torch.inference_mode():
            out = loaded.model.generate(
                **inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        generated[method] = out[0, 80:].tolist()
        # DynamicCache holds the 80 + 11 tokens it was given; StaticCache its 92 preallocated rows
        rows = 80 + NEW_TOKENS - 1 if method == "fullkv" else 80 + NEW_TOKENS
        assert cache_kv_bytes(cache) == rows * loaded.num_kv_heads * loaded.head_dim * 2 * 4
    assert len(generated["fullkv"]) == NEW_TOKENS
    assert generated[STATIC_FULLKV] == generated["fullkv"]


def test_static_measurement_reports_its_preallocated_bytes():
    protocol = EfficiencyProtocol(
        models=["qwen2-vl-2b"], methods=["fullkv", STATIC_FULLKV], contexts=[64], layers=1, vocab="depth_scaled",
        decode_steps=2, decode_warmup=1, generate_tokens=4, threads=1, device="cpu",
    )
    row = measure(protocol, "qwen2-vl-2b", STATIC_FULLKV, 64)
    # 1 layer x 2 KV heads x (64 + 4 new tokens) rows x 128 x 2 x 4 bytes, allocated before the first step
    assert row["kv_bytes"] == row["kv_bytes_analytic"] == row["kv_bytes_final"] == 2 * 68 * 128 * 2 * 4
    assert row["decode_attention"] == "sdpa (StaticCache)" and row["budget"] is None
    with pytest.raises(InvalidEfficiencyConfigError, match="baseline"):
        baseline_cache("sparsemm", None, 10)
