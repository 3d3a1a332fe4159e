"""The real models' language-model shapes (docs/method.md §1) and their configs (no weights built)."""

from __future__ import annotations

import dataclasses

import pytest

from sparsemm_utils.models import SUPPORTED_MODEL_TYPES
from sparsemm_utils.real_shapes import (
    PAPER_MEMORY_CONTEXT,
    REAL_SHAPES,
    RESERVED_TOKEN_IDS,
    InvalidShapeOptionError,
    UnknownRealShapeError,
    depth_scaled_vocab,
    get_real_shape,
    gpu_memory,
    image_tokens,
    models_table,
    real_config,
)
from sparsemm_utils.runs import repo_root

# docs/method.md §1: text layers, query heads, KV heads
SPEC_TABLE = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": (32, 32, 32),
    "llava-hf/llava-v1.6-mistral-7b-hf": (32, 32, 8),
    "Qwen/Qwen2-VL-7B-Instruct": (28, 28, 4),
    "Qwen/Qwen2-VL-2B-Instruct": (28, 12, 2),
    "Qwen/Qwen2.5-VL-3B-Instruct": (36, 16, 2),
    "Qwen/Qwen2.5-VL-7B-Instruct": (28, 28, 4),
}
#: The newer families (docs/models.md), from their checkpoints' config.json: layers, heads, KV heads, head_dim.
NEWER_TABLE = {
    "Qwen/Qwen3-VL-2B-Instruct": (28, 16, 8, 128),
    "Qwen/Qwen3-VL-4B-Instruct": (36, 32, 8, 128),  # hidden 2560: head_dim is the checkpoint's, not 2560 / 32
    "Qwen/Qwen3-VL-8B-Instruct": (36, 32, 8, 128),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": (24, 14, 2, 64),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": (28, 28, 4, 128),
    "OpenGVLab/InternVL3-1B-hf": (24, 14, 2, 64),
    "OpenGVLab/InternVL3-2B-hf": (28, 12, 2, 128),
    "OpenGVLab/InternVL3-8B-hf": (28, 28, 4, 128),
    "OpenGVLab/InternVL3-14B-hf": (48, 40, 8, 128),
    "OpenGVLab/InternVL3-38B-hf": (64, 40, 8, 128),
    "OpenGVLab/InternVL3-78B-hf": (80, 64, 8, 128),
}


@pytest.mark.parametrize("hub_id", SPEC_TABLE)
def test_shapes_match_spec_section_1(hub_id):
    shape = get_real_shape(hub_id)
    assert (shape.layers, shape.query_heads, shape.kv_heads) == SPEC_TABLE[hub_id]
    assert shape.head_dim == 128  # every model of the table: hidden / heads = 128
    assert shape.model_type in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("hub_id", NEWER_TABLE)
def test_shapes_of_the_newer_families(hub_id):
    shape = get_real_shape(hub_id)
    assert (shape.layers, shape.query_heads, shape.kv_heads, shape.head_dim) == NEWER_TABLE[hub_id]
    assert shape.model_type in SUPPORTED_MODEL_TYPES


def test_every_supported_model_type_has_a_real_shape():
    assert {s.model_type for s in REAL_SHAPES.values()} == set(SUPPORTED_MODEL_TYPES)


def test_lookup_by_short_name_hub_id_or_folder_case_insensitive():
    assert get_real_shape("qwen2-vl-7b").hub_id == "Qwen/Qwen2-VL-7B-Instruct"
    assert get_real_shape("QWEN/QWEN2-VL-7B-INSTRUCT").name == "qwen2-vl-7b"
    assert get_real_shape("/models/llava-v1.6-vicuna-7b-hf/").name == "llava-next-vicuna-7b"
    with pytest.raises(UnknownRealShapeError, match="unknown real model 'tiny-random/qwen2_vl': known shapes are"):
        get_real_shape("tiny-random/qwen2_vl")
    with pytest.raises(UnknownRealShapeError):
        get_real_shape("")


def test_depth_scaled_vocab_by_hand():
    # Vicuna: ceil(32064 * 2 / 32) = 2004; Qwen2-VL-7B: ceil(152064 * 2 / 28) = ceil(10861.7) = 10862
    assert depth_scaled_vocab(REAL_SHAPES["llava-next-vicuna-7b"], 2) == 2004
    assert depth_scaled_vocab(REAL_SHAPES["qwen2-vl-7b"], 2) == 10862
    assert depth_scaled_vocab(REAL_SHAPES["qwen2-vl-7b"], None) == 152064


def test_layers_out_of_range_are_rejected():
    shape = REAL_SHAPES["qwen2-vl-7b"]
    expected = r"layers \(or None for the full depth\) must be an int >= 1 and <= 28, got .*has 28 decoder layers"
    for bad in (0, 29, 2.0, True):
        with pytest.raises(InvalidShapeOptionError, match=expected):
            shape.check_layers(bad)
    with pytest.raises(InvalidShapeOptionError, match="vocab_size must be an int >= 16"):
        real_config(shape, vocab_size=8)


@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_config_has_the_real_text_shape_and_reserved_special_ids(name):
    shape = REAL_SHAPES[name]
    config = real_config(shape, layers=2, vocab_size=1000)
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2, shape.query_heads, shape.kv_heads)
    assert (text.hidden_size, text.intermediate_size, text.vocab_size) == (shape.hidden, shape.intermediate, 1000)
    assert text.max_position_embeddings == shape.max_position_embeddings
    # the special ids are the top RESERVED_TOKEN_IDS ids
    assert 1000 - RESERVED_TOKEN_IDS <= text.eos_token_id < 1000
    image = getattr(config, "image_token_id", None) or getattr(config, "image_token_index")
    assert 1000 - RESERVED_TOKEN_IDS <= image < 1000
    assert (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) == shape.head_dim
    if shape.model_type in ("qwen2_vl", "qwen2_5_vl"):
        # M-RoPE sections sum to head_dim / 2 = 64 (the real [16, 24, 24])
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    elif shape.model_type == "qwen3_vl":
        # interleaved M-RoPE, the real [24, 20, 20]
        assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    else:
        assert text.model_type == shape.text_model_type
        assert "mrope_section" not in text.rope_parameters  # 1D RoPE (Llama, Mistral, Qwen2)


def test_gpu_memory_by_hand():
    # Qwen2-VL-7B, bf16, 32768 + 512 tokens. KV: 28 layers x 4 KV heads x 33280 tokens x 128 x 2 (K, V)
    # x 2 bytes = 1,908,408,320. Weights: embeddings and output layer 152064 x 3584 each (untied);
    # per layer q 3584^2 + 3584 (bias), k and v 3584 x 512 + 512, o 3584^2, MLP 3 x 3584 x 18944,
    # 2 norms of 3584 -> 233,057,792; x 28 + final norm 3584 + 2 x 544,997,376 = 7,615,616,512.
    memory = gpu_memory("qwen2-vl-7b")
    assert memory.context == PAPER_MEMORY_CONTEXT == 33280
    assert memory.full_kv_bytes == 28 * 4 * 33280 * 128 * 2 * 2 == 1_908_408_320
    assert memory.text_parameters == 7_615_616_512
    assert memory.text_weights_bytes == 2 * 7_615_616_512
    assert "14.2 GiB language-model weights (7.62 B parameters) + 1.8 GiB full KV cache = 16.0 GiB" in memory.line()
    # tied embeddings are counted once: Qwen2-VL-2B's output layer is its embedding matrix
    shape = REAL_SHAPES["qwen2-vl-2b"]
    untied = dataclasses.replace(shape, tie_word_embeddings=False)
    assert gpu_memory(untied, context=1).text_parameters - gpu_memory(shape, context=1).text_parameters == 151936 * 1536
    with pytest.raises(InvalidShapeOptionError, match="context must be an int >= 1"):
        gpu_memory("qwen2-vl-7b", context=0)


def test_extended_positions_reach_the_config():
    config = real_config("llava-next-vicuna-7b", layers=1, max_position_embeddings=33280)
    assert config.get_text_config().max_position_embeddings == 33280


def test_models_table_rows_and_image_tokens_by_hand():
    # the 1000 x 700 image of the mapping's hand-worked tests (tests/unit/test_patch_mapping.py)
    expected = {"qwen2_vl": 900, "qwen2_5_vl": 900, "llava_next": 2242, "qwen3_vl": 682, "llava_onevision": 4941, "internvl": 1792}
    assert {t: image_tokens(t, 1000, 700) for t in expected} == expected
    lines = models_table()
    assert len(lines) == 2 + len(REAL_SHAPES) - 1  # header, rule, every shape but the timing-only qwen2-vl-2b
    row = next(line for line in lines if "`Qwen/Qwen3-VL-4B-Instruct`" in line)
    assert "| Qwen3VLForConditionalGeneration | 36 x 32 x 8 | 128 | 682 / " in row
    # docs/models.md shows exactly what the command prints
    assert "\n".join(lines) in (repo_root() / "docs" / "models.md").read_text()
