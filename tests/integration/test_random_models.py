"""Tiny random-weight models of the six real classes (sparsemm_utils.random_models): build, run, count
visual tokens, save/load, attention steering."""

from __future__ import annotations

from pathlib import Path
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from transformers import AttentionInterface, AutoProcessor, LlavaNextProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.models import (
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    load_model,
    register_text_attention,
    set_text_attention,
    text_attention_implementation,
    vision_attention_implementation,
)
from sparsemm_utils.processors import (
    InternVLImageOnlyProcessor,
    LlavaOnevisionImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
    VideoInputNotSupportedError,
    set_qwen_pixel_bounds,
)
from sparsemm_utils.prompts import OCR_PROMPT, build_inputs, image_token_span
from sparsemm_utils.random_models import (
    LLAVA_V16_GRID_PINPOINTS,
    InvalidTinySpecError,
    TinySpec,
    build_char_tokenizer,
    build_tiny,
    build_tiny_processor,
    mrope_section_for,
    save_tiny,
)

MODEL_TYPES = list(SUPPORTED_MODEL_TYPES)
TEXT_ATTENTION_CLASSES = {
    "qwen2_vl": "Qwen2VLAttention",
    "qwen2_5_vl": "Qwen2_5_VLAttention",
    "llava_next": "LlamaAttention",
    "qwen3_vl": "Qwen3VLTextAttention",
    "llava_onevision": "Qwen2Attention",
    "internvl": "Qwen2Attention",
}
PROCESSOR_CLASSES = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "llava_next": LlavaNextProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
    "llava_onevision": LlavaOnevisionImageOnlyProcessor,
    "internvl": InternVLImageOnlyProcessor,
}


def document_image(width: int = 336, height: int = 280) -> Image.Image:
    """A small white page with two lines of black text (a real PIL image, not a blank tensor)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 20), "Invoice 2024", fill="black")
    draw.text((12, 60), "Total: 42.00", fill="black")
    return image


# ---------------------------------------------------------------- fast checks (no model built)


def test_mrope_section_hand_cases():
    # head_dim 128 -> 64 pairs -> 64 // 4 = 16 temporal, (64 - 16) // 2 = 24 height, 24 width:
    # exactly the real Qwen2-VL's [16, 24, 24].
    assert mrope_section_for(128) == [16, 24, 24]
    # head_dim 16 (the tiny default 128 / 8) -> 8 pairs -> [2, 3, 3]
    assert mrope_section_for(16) == [2, 3, 3]


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=4, max_value=256).map(lambda k: 2 * k))
def test_mrope_section_sums_to_half_head_dim(head_dim):
    sections = mrope_section_for(head_dim)
    assert sum(sections) == head_dim // 2
    assert all(s > 0 for s in sections)


def test_mrope_section_rejects_odd_head_dim():
    with pytest.raises(InvalidTinySpecError, match="even"):
        mrope_section_for(15)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"text_heads": 3}, "must divide text_hidden"),
        ({"text_kv_heads": 3}, "divisor of text_heads"),
        ({"text_layers": 0}, "positive integers"),
        ({"text_layers": True}, "positive integers"),  # a bool is not a size
        ({"text_hidden": 128.0}, "positive integers"),
        ({"text_kv_heads": 2.0}, "divisor of text_heads"),
        ({"vision_heads": 3}, "even"),
        ({"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
        ({"hidden": 64}, "unknown tiny-model options"),
    ],
)
def test_tiny_spec_validation(overrides, fragment):
    with pytest.raises(InvalidTinySpecError, match=fragment):
        TinySpec.from_overrides(**overrides)


def test_llava_needs_two_vision_layers():
    with pytest.raises(InvalidTinySpecError, match="second-to-last"):
        build_tiny("llava_next", vision_layers=1)


def test_tiny_spec_takes_numpy_integers_as_ints():
    spec = TinySpec.from_overrides(text_layers=np.int64(2), text_kv_heads=np.int32(4))
    assert (spec.text_layers, spec.text_kv_heads) == (2, 4)
    assert type(spec.text_layers) is int and type(spec.text_kv_heads) is int


def test_tiny_spec_family_defaults():
    spec = TinySpec()
    assert spec.head_dim == 16
    assert spec.kv_heads_for("qwen2_vl") == 2  # GQA, 4 query heads per KV head
    assert spec.kv_heads_for("llava_next") == 8  # MHA, as Vicuna
    assert TinySpec(text_kv_heads=4).kv_heads_for("llava_next") == 4


def test_char_tokenizer_qwen():
    tok = build_char_tokenizer("qwen2_vl")
    ids = tok("Hi!\n")["input_ids"]
    assert len(ids) == 4 and tok.convert_ids_to_tokens(ids) == ["H", "i", "!", "\n"]
    special = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    assert tok.convert_ids_to_tokens(tok(special)["input_ids"]) == [
        "<|vision_start|>",
        "<|image_pad|>",
        "<|image_pad|>",
        "<|vision_end|>",
    ]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.decode(tok("Total: 42.00")["input_ids"]) == "Total: 42.00"
    # outside the alphabet -> <unk>
    assert tok.convert_ids_to_tokens(tok("é")["input_ids"]) == ["<unk>"]
    # 1 unk + 96 characters (95 printable ASCII + newline) + 7 specials
    assert len(tok) == 1 + 96 + 7


def test_char_tokenizer_llava_and_extra_chars():
    tok = build_char_tokenizer("llava_next", extra_chars="éé€")
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]  # Llama's ids
    ids = tok("aé€")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "a", "é", "€"]  # <s> prepended, extra chars known
    assert len(tok) == 3 + 96 + 2 + 2  # "é" counted once
    assert tok.decode(ids, skip_special_tokens=True) == "aé€"


def test_char_tokenizer_unknown_type():
    from sparsemm_utils.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="qwen2_vl"):
        build_char_tokenizer("mllama")


def test_processor_geometry():
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        ip = build_tiny_processor(model_type).image_processor
        assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
        assert (ip.size.shortest_edge, ip.size.longest_edge) == (32 * 28 * 28, 16384 * 28 * 28)
    llava = build_tiny_processor("llava_next")
    ip = llava.image_processor
    assert ip.size.shortest_edge == 336 and (ip.crop_size.height, ip.crop_size.width) == (336, 336)
    assert [tuple(p) for p in ip.image_grid_pinpoints] == list(LLAVA_V16_GRID_PINPOINTS)
    assert (llava.patch_size, llava.vision_feature_select_strategy, llava.num_additional_image_tokens) == (
        14,
        "default",
        1,
    )


def test_qwen_image_token_counts_by_hand():
    processor = build_tiny_processor("qwen2_vl")
    # 280 x 140 (w x h): already multiples of 28, area 39200 in [25088, 12845056] -> resized
    # 280 x 140 -> 20 x 10 patches of 14 px -> 200 patches / (2 x 2 merge) = 50 tokens.
    inputs = build_inputs(processor, Image.new("RGB", (280, 140), "white"))
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 20]]
    assert image_token_span(inputs["input_ids"], processor.image_token_id)[1] == 50
    # 56 x 56: area 3136 < min 25088 -> scale by sqrt(25088 / 3136) = sqrt(8) ~ 2.83 ->
    # ceil(56 * 2.83 / 28) * 28 = 6 * 28 = 168 -> 168 x 168 -> 12 x 12 patches -> 36 tokens (>= 32).
    inputs = build_inputs(processor, Image.new("RGB", (56, 56), "white"))
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 12]]
    assert image_token_span(inputs["input_ids"], processor.image_token_id)[1] == 36
    # tighter bounds: max 16 tokens (16 * 784 px) for a 280 x 140 image -> beta = sqrt(39200 / 12544)
    # = 1.77 -> h = floor(140 / 1.77 / 28) * 28 = 56, w = floor(280 / 1.77 / 28) * 28 = 140 ->
    # 4 x 10 patches -> 10 tokens.
    set_qwen_pixel_bounds(processor, 4 * 28 * 28, 16 * 28 * 28)
    inputs = build_inputs(processor, Image.new("RGB", (280, 140), "white"))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 10]]


def test_llava_image_token_count_by_hand():
    processor = build_tiny_processor("llava_next")
    # 672 x 336 (w x h) = the pinpoint (336, 672) exactly: base 336 px image -> 24 x 24 = 576
    # tokens; high-res grid 1 x 2 crops -> 24 x 48 patch tokens, same aspect ratio so nothing is
    # unpadded, one newline per row -> 24 x (48 + 1) = 1176; total 576 + 1176 = 1752.
    inputs = build_inputs(processor, Image.new("RGB", (672, 336), "white"))
    assert inputs["image_sizes"].tolist() == [[336, 672]]
    assert inputs["pixel_values"].shape == (1, 3, 3, 336, 336)  # base + 2 crops
    assert image_token_span(inputs["input_ids"], processor.image_token_id)[1] == 1752


def test_qwen_pixel_bounds_errors():
    qwen = build_tiny_processor("qwen2_vl")
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        set_qwen_pixel_bounds(qwen, 100, 10)
    with pytest.raises(TypeError, match="not a Qwen2-VL image processor"):
        set_qwen_pixel_bounds(build_tiny_processor("llava_next"), 10, 100)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_image_only_processor_rejects_videos(model_type):
    processor = build_tiny_processor(model_type)
    with pytest.raises(VideoInputNotSupportedError, match="image-only"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[[Image.new("RGB", (56, 56))] * 2])
    with pytest.raises(TypeError, match="tokenizer"):
        type(processor)(image_processor=processor.image_processor, tokenizer=None)


# ---------------------------------------------------------------- tiny models (slow)


@pytest.fixture(scope="module")
def tiny():
    """One tiny model + processor per type, built once for the module."""
    return {model_type: build_tiny(model_type) for model_type in MODEL_TYPES}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_and_generate_on_a_real_image(tiny, model_type):
    model, processor = tiny[model_type]
    assert type(model) is SUPPORTED_MODEL_TYPES[model_type]
    inputs = build_inputs(processor, document_image(), OCR_PROMPT, model_type)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, n, len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert generated.shape[1] <= n + 3 and generated.shape[1] > n  # stops early only at EOS
    assert torch.equal(generated[0, :n], inputs["input_ids"][0])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_image_token_count_matches_the_vision_tower(tiny, model_type):
    model, processor = tiny[model_type]
    inputs = build_inputs(processor, document_image(width=500, height=300), OCR_PROMPT, model_type)
    start, count = image_token_span(inputs["input_ids"], model.config.image_token_id)
    with torch.no_grad():
        if model_type == "llava_next":
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            ).pooler_output
            produced = sum(f.shape[0] for f in features)
            # base 24 x 24 + crop grid with newlines, counted by the processor's own formula
            height, width = inputs["image_sizes"][0].tolist()
            expected = processor._get_number_of_features(height, width, 336, 336) - 1
        elif model_type == "llava_onevision":
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"],
            ).pooler_output
            produced = sum(f.shape[0] for f in features)
            # 729 base + the anyres-max crop grid with newlines, counted by the processor's own formula ("full": no CLS)
            height, width = inputs["image_sizes"][0].tolist()
            expected = processor._get_number_of_features(height, width, 384, 384)
        elif model_type == "internvl":
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            produced = features.shape[0] * features.shape[1]  # (tiles, 256, hidden)
            expected = inputs["pixel_values"].shape[0] * 256
        else:
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            produced = sum(f.shape[0] for f in features)
            expected = int(inputs["image_grid_thw"].prod()) // 4
    assert count == expected == produced
    assert start > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_same_seed_same_weights(tiny, model_type):
    state = torch.get_rng_state()
    again, _ = build_tiny(model_type, seed=0)
    other, _ = build_tiny(model_type, seed=1)
    assert torch.equal(torch.get_rng_state(), state), "build_tiny must not move the global RNG"
    reference = tiny[model_type][0].state_dict()
    assert reference.keys() == again.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    assert any(not torch.equal(reference[k], v) for k, v in other.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shapes_of_the_language_model(model_type):
    loaded = load_model(f"tiny-random/{model_type}")
    assert isinstance(loaded, LoadedModel) and loaded.model_type == model_type
    assert (loaded.num_layers, loaded.num_heads, loaded.head_dim) == (4, 8, 16)
    assert loaded.num_kv_heads == (8 if model_type == "llava_next" else 2)
    assert loaded.image_token_id == loaded.processor.image_token_id
    assert len(loaded.language_model.layers) == loaded.num_layers
    assert not loaded.model.training and loaded.dtype == torch.float32
    assert text_attention_implementation(loaded.model) == "sdpa"
    assert vision_attention_implementation(loaded.model) == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_and_load_round_trip(tiny, model_type, tmp_path):
    folder = save_tiny(model_type, tmp_path / model_type, seed=0)
    auto = AutoProcessor.from_pretrained(folder)
    expected_class = PROCESSOR_CLASSES[model_type]
    assert type(auto) is expected_class  # not just the tokenizer
    loaded = load_model(folder)
    assert type(loaded.processor) is expected_class
    model, processor = tiny[model_type]
    image = document_image()
    fresh, reloaded = build_inputs(processor, image), build_inputs(loaded, image)
    assert fresh.keys() == reloaded.keys()
    assert all(torch.equal(fresh[k], reloaded[k]) for k in fresh)
    with torch.no_grad():
        assert torch.equal(model(**fresh).logits, loaded.model(**reloaded).logits)


@pytest.mark.slow
def test_hub_id_found_in_a_local_cache(tmp_path, monkeypatch):
    """A hub id is served from the HF cache (layout models--org--name/snapshots/<rev>) offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2-vl"
    save_tiny("qwen2_vl", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = load_model("tiny-org/tiny-qwen2-vl", cache_dir=tmp_path / "hub")
    assert loaded.model_type == "qwen2_vl" and loaded.name_or_path == "tiny-org/tiny-qwen2-vl"
    assert type(loaded.processor) is Qwen2VLImageOnlyProcessor
    shutil.rmtree(tmp_path / "hub")


@pytest.mark.slow
def test_load_model_pixel_bounds_and_dtype():
    loaded = load_model("tiny-random/qwen2_vl", min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    inputs = build_inputs(loaded, Image.new("RGB", (280, 140), "white"))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 10]]  # worked out in test_qwen_image_token_counts_by_hand
    assert inputs["pixel_values"].dtype == torch.bfloat16  # build_inputs casts to the model's dtype


# ---------------------------------------------------------------- attention on the language model only


class Recorder:
    """An attention function that records what it sees and delegates to sdpa."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append(
            {
                "cls": type(module).__name__,
                "layer_idx": module.layer_idx,
                "query": query.detach().clone(),
                "mask": attention_mask,
                "kv_len": key.shape[2],
            }
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_custom_text_attention_sees_only_language_layers(model_type):
    loaded = load_model(f"tiny-random/{model_type}")
    model = loaded.model
    inputs = build_inputs(loaded, document_image())
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)

    recorder = Recorder()
    name = f"sparsemm_test_recorder_{model_type}"
    register_text_attention(name, recorder)
    set_text_attention(model, name)
    assert text_attention_implementation(model) == name
    assert vision_attention_implementation(model) == "sdpa"

    # pre-RoPE queries of layer 0, captured from q_proj during the prefill
    pre_rope: list[torch.Tensor] = []
    attn = loaded.language_model.layers[0].self_attn
    q_before_rope = attn.q_norm if model_type == "qwen3_vl" else attn.q_proj  # Qwen3-VL: QK-norm, then RoPE
    handle = q_before_rope.register_forward_hook(lambda mod, args, out: pre_rope.append(out.detach().clone()))
    try:
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()

    assert torch.equal(generated, reference), "delegating to sdpa must not change the tokens"
    assert {c["cls"] for c in recorder.calls} == {TEXT_ATTENTION_CLASSES[model_type]}  # no vision layer
    steps = generated.shape[1] - n  # prefill + (steps - 1) decode steps
    assert [c["layer_idx"] for c in recorder.calls] == list(range(loaded.num_layers)) * steps
    prefill = recorder.calls[0]
    assert prefill["query"].shape == (1, loaded.num_heads, n, loaded.head_dim)
    assert prefill["mask"] is not None and prefill["mask"].shape[-2:] == (n, n)  # the eager mask, materialised
    assert recorder.calls[loaded.num_layers]["kv_len"] == n + 1  # first decode step sees the cache

    # post-RoPE: RoPE rotates channel pairs, so per (head, position) norms are kept while the
    # vectors change; at position 0 every rotation angle is 0 (M-RoPE ids (0, 0, 0)) -> unchanged.
    pre = pre_rope[0].reshape(1, n, loaded.num_heads, loaded.head_dim).transpose(1, 2)
    post = prefill["query"]
    torch.testing.assert_close(post.norm(dim=-1), pre.norm(dim=-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post[:, :, 0], pre[:, :, 0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(post[:, :, 1:], pre[:, :, 1:], atol=1e-3)

    set_text_attention(model, "sdpa")
    assert text_attention_implementation(model) == "sdpa"


@pytest.mark.slow
def test_attention_without_mask_registration_gets_no_mask():
    """Why register_text_attention registers a mask too (docs/design.md): without it, transformers passes
    attention_mask=None to a custom attention function."""
    loaded = load_model("tiny-random/qwen2_vl")
    recorder = Recorder()
    name = "sparsemm_test_recorder_without_mask"
    AttentionInterface.register(name, recorder)
    set_text_attention(loaded.model, name, allow_missing_mask=True)
    with torch.no_grad():
        loaded.model(**build_inputs(loaded, document_image()))
    assert recorder.calls and all(c["mask"] is None for c in recorder.calls)



def test_relative_local_path_is_found_from_any_working_directory(tmp_path, monkeypatch):
    # JupyterLab starts kernels in notebooks/, papermill in the repo root: "data/tiny_reader" must load from both.
    from sparsemm_utils.models import _local_path
    from sparsemm_utils.runs import repo_root

    monkeypatch.chdir(tmp_path)
    assert _local_path("data/tiny_reader") == repo_root() / "data" / "tiny_reader"
    assert _local_path("no/such/folder") == Path("no/such/folder")
    (tmp_path / "mine").mkdir()
    assert _local_path("mine") == Path("mine")
