"""The OCR prompt of each family (docs/method.md §2) and locating the image-token block (docs/method.md §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils.prompts import (
    OCR_PROMPT,
    INTERNVL_SYSTEM_PROMPT,
    QWEN_SYSTEM_PROMPT,
    VICUNA_SYSTEM_PROMPT,
    ModelTypeMismatchError,
    NoImageTokensError,
    NonContiguousImageTokensError,
    build_inputs,
    build_messages,
    image_token_span,
)
from sparsemm_utils.model_types import SUPPORTED_MODEL_TYPES
from sparsemm_utils.random_models import build_tiny_processor

QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "Provide all the OCR results of this image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: The newer families' single-image chat: ChatML, the placeholder on its own line before the text.
CHATML_IMAGE_FIRST = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{image}\n"
    "Provide all the OCR results of this image.<|im_end|>\n<|im_start|>assistant\n"
)
VICUNA_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n"
    "Provide all the OCR results of this image. ASSISTANT:"
)


@pytest.fixture(scope="module")
def processors():
    return {model_type: build_tiny_processor(model_type) for model_type in SUPPORTED_MODEL_TYPES}


# ---------------------------------------------------------------- image_token_span, pure


def test_span_hand_cases():
    # ids 5 [9 9 9] 7: the block starts at index 1 and holds 3 tokens
    assert image_token_span([5, 9, 9, 9, 7], 9) == (1, 3)
    assert image_token_span(torch.tensor([[9, 9, 1]]), 9) == (0, 2)  # (1, n) accepted
    assert image_token_span(np.array([1, 2, 9]), 9) == (2, 1)


def test_span_errors():
    with pytest.raises(NoImageTokensError, match="no image token"):
        image_token_span([1, 2, 3], 9)
    with pytest.raises(NonContiguousImageTokensError, match="gap after position 1"):
        image_token_span([9, 9, 4, 9], 9)  # positions 0, 1, 3
    with pytest.raises(ValueError, match="one prompt"):
        image_token_span(torch.full((2, 4), 9), 9)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(1, n\)"):
        image_token_span(torch.full((1, 2, 2), 9), 9)


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 50), max_size=30),
    count=st.integers(1, 40),
    suffix=st.lists(st.integers(0, 50), max_size=30),
)
def test_span_recovers_any_block(prefix, count, suffix):
    image_id = 77  # never drawn for the text around the block
    ids = prefix + [image_id] * count + suffix
    assert image_token_span(ids, image_id) == (len(prefix), count)
    if suffix:
        with pytest.raises(NonContiguousImageTokensError):
            image_token_span(ids + [image_id], image_id)


# ---------------------------------------------------------------- chats of each family


def test_messages_image_first_then_text():
    messages = build_messages(OCR_PROMPT, "qwen2_vl")
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": QWEN_SYSTEM_PROMPT}]}
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]
    assert build_messages("q", "llava_next")[0]["content"][0]["text"] == VICUNA_SYSTEM_PROMPT
    assert [m["role"] for m in build_messages("q", "llava_next", system_prompt=None)] == ["user"]
    with pytest.raises(ModelTypeMismatchError, match="supported"):
        build_messages("q", "llama")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_prompt_text(processors, model_type):
    processor = processors[model_type]
    messages = build_messages(OCR_PROMPT, model_type)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == QWEN_PROMPT
    # without a system turn the template inserts the same default system prompt
    no_system = build_messages(OCR_PROMPT, model_type, system_prompt=None)
    assert processor.apply_chat_template(no_system, add_generation_prompt=True, tokenize=False) == QWEN_PROMPT


@pytest.mark.slow
def test_newer_families_prompt_text_and_expansion(processors):
    # Qwen3-VL: Qwen's chat, but its template adds no system turn of its own
    qwen3 = processors["qwen3_vl"]
    assert qwen3.apply_chat_template(build_messages(OCR_PROMPT, "qwen3_vl"), add_generation_prompt=True, tokenize=False) == QWEN_PROMPT
    bare = qwen3.apply_chat_template(build_messages(OCR_PROMPT, "qwen3_vl", system_prompt=None), add_generation_prompt=True, tokenize=False)
    assert bare == QWEN_PROMPT[QWEN_PROMPT.index("<|im_start|>user"):]
    # 280 x 140 on 32 px tokens: round(140/32) = 4 rows x round(280/32) = 9 columns = 36 tokens (>= 32);
    # 45 tokens before them, as for Qwen2-VL below
    inputs = build_inputs(qwen3, Image.new("RGB", (280, 140), "white"), OCR_PROMPT, "qwen3_vl")
    assert image_token_span(inputs["input_ids"], qwen3.image_token_id) == (45, 36)
    # LLaVA-OneVision and InternVL: ChatML with the placeholder before the text
    for model_type, system, image in (("llava_onevision", QWEN_SYSTEM_PROMPT, "<image>"),
                                      ("internvl", INTERNVL_SYSTEM_PROMPT, "<IMG_CONTEXT>")):
        processor = processors[model_type]
        prompt = processor.apply_chat_template(build_messages(OCR_PROMPT, model_type), add_generation_prompt=True, tokenize=False)
        assert prompt == CHATML_IMAGE_FIRST.format(system=system, image=image)
    # InternVL: one 448 px tile for a square image, 256 <IMG_CONTEXT> between <img> and </img>
    internvl = processors["internvl"]
    inputs = build_inputs(internvl, Image.new("RGB", (300, 300), "white"), OCR_PROMPT, "internvl")
    decoded = internvl.tokenizer.decode(inputs["input_ids"][0])
    expected = CHATML_IMAGE_FIRST.format(system=INTERNVL_SYSTEM_PROMPT, image="<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
    user = expected.index("<|im_start|>user")  # the tiny vocabulary is ASCII: the Chinese system prompt decodes to <unk>
    assert decoded[decoded.index("<|im_start|>user"):] == expected[user:]
    # LLaVA-OneVision: 384 x 384 -> one crop, 729 base + 27 x (27 + 1) crop-grid tokens, all <image>
    onevision = processors["llava_onevision"]
    inputs = build_inputs(onevision, Image.new("RGB", (384, 384), "white"), OCR_PROMPT, "llava_onevision")
    assert image_token_span(inputs["input_ids"], onevision.image_token_id)[1] == 729 + 27 * 28


def test_vicuna_prompt_text(processors):
    processor = processors["llava_next"]
    messages = build_messages(OCR_PROMPT, "llava_next")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == VICUNA_PROMPT


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_inputs_decode_to_the_prompt_with_expanded_pads(processors, model_type):
    processor = processors[model_type]
    inputs = build_inputs(processor, Image.new("RGB", (280, 140), "white"), OCR_PROMPT, model_type)
    start, count = image_token_span(inputs["input_ids"], processor.image_token_id)
    # the text before the block, one token per character or special token:
    # <|im_start|> + "system\n" (7) + 28 chars of the system prompt + <|im_end|> + "\n" + <|im_start|>
    # + "user\n" (5) + <|vision_start|> = 1 + 7 + 28 + 1 + 1 + 1 + 5 + 1 = 45
    assert len(QWEN_SYSTEM_PROMPT) == 28
    assert start == 45
    assert count == 50  # 280 x 140 -> 20 x 10 patches -> 50 tokens (see test_random_models)
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    assert decoded == QWEN_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * count)
    assert inputs["mm_token_type_ids"][0].tolist() == [0] * start + [1] * count + [0] * (
        inputs["input_ids"].shape[1] - start - count
    )


@pytest.mark.slow
def test_llava_inputs_decode_to_the_prompt_with_expanded_image(processors):
    processor = processors["llava_next"]
    inputs = build_inputs(processor, Image.new("RGB", (672, 336), "white"))  # model_type inferred
    start, count = image_token_span(inputs["input_ids"], processor.image_token_id)
    # <s> + the system prompt + " USER: " (7 characters) come before <image>
    assert start == 1 + len(VICUNA_SYSTEM_PROMPT) + 7
    assert count == 1752  # 576 + 24 x (48 + 1), see test_random_models
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    assert decoded == "<s>" + VICUNA_PROMPT.replace("<image>", "<image>" * count)


@pytest.mark.slow
def test_build_inputs_with_a_loaded_model_matches_the_processor():
    from sparsemm_utils.models import load_model

    loaded = load_model("tiny-random/qwen2_5_vl")
    image = Image.new("RGB", (300, 200), "gray")
    via_model, via_processor = build_inputs(loaded, image), build_inputs(loaded.processor, image)
    assert all(torch.equal(via_model[k], via_processor[k]) for k in via_processor)


def test_custom_system_prompt(processors):
    processor = processors["llava_next"]
    inputs = build_inputs(processor, Image.new("RGB", (336, 336)), "Read it.", system_prompt="Be brief.")
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    assert decoded.startswith("<s>Be brief. USER: <image>") and decoded.endswith("\nRead it. ASSISTANT:")


def test_build_inputs_errors(processors):
    image = Image.new("RGB", (56, 56))
    with pytest.raises(ModelTypeMismatchError, match="does not match"):
        build_inputs(processors["qwen2_vl"], image, OCR_PROMPT, "llava_next")
    with pytest.raises(ModelTypeMismatchError, match="does not match"):
        build_inputs(processors["qwen2_5_vl"], image, OCR_PROMPT, "qwen2_vl")
    with pytest.raises(ModelTypeMismatchError, match="not supported"):
        build_inputs(processors["qwen2_vl"], image, OCR_PROMPT, "llama")
    with pytest.raises(TypeError, match="PIL"):
        build_inputs(processors["qwen2_vl"], np.zeros((56, 56, 3)), OCR_PROMPT)
    with pytest.raises(ValueError, match="non-empty"):
        build_inputs(processors["qwen2_vl"], image, "")
    with pytest.raises(TypeError, match="LoadedModel"):
        build_inputs(processors["qwen2_vl"].tokenizer, image)
