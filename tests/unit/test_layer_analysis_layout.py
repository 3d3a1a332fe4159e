"""Token categories on real tiny prompts (docs/method.md §8): system and user text are instruction,
image tokens vision, generated tokens response, and the chat template's own tokens instruction
(documented in sparsemm_utils.token_categories). Processors only, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils import token_categories as tc
from sparsemm_utils.prompts import OCR_PROMPT, QWEN_SYSTEM_PROMPT, VICUNA_SYSTEM_PROMPT, build_inputs
from sparsemm_utils.random_models import build_tiny_processor

IMAGE = Image.new("RGB", (280, 224), "white")  # Qwen: 10 x 8 = 80 visual tokens


@pytest.fixture(scope="module")
def qwen():
    processor = build_tiny_processor("qwen2_vl")
    return processor, build_inputs(processor, IMAGE)["input_ids"][0]


def _text(processor, ids, layout, role):
    return processor.tokenizer.decode(ids[layout.roles == tc.ROLES.index(role)])


def test_qwen_roles_of_a_real_prompt(qwen):
    processor, ids = qwen
    layout = tc.prompt_layout(processor, ids)
    # ChatML: "<|im_start|>system\n" (8 tokens: 1 special + 6 letters + newline), the system prompt
    # (28 characters), "<|im_end|>\n<|im_start|>user\n<|vision_start|>" (9), 80 image pads,
    # "<|vision_end|>" (1), the OCR prompt (42 characters), "<|im_end|>\n<|im_start|>assistant\n" (13)
    assert layout.counts() == {"template": 8 + 9 + 1 + 13, "system": 28, "user": 42, "vision": 80, "response": 0}
    assert _text(processor, ids, layout, "system") == QWEN_SYSTEM_PROMPT
    assert _text(processor, ids, layout, "user") == OCR_PROMPT
    assert [r for r, _, _ in layout.spans()] == ["template", "system", "template", "vision", "template", "user", "template"]
    assert layout.image_start == 8 + 28 + 9
    # the template tokens, incl. <|vision_start|>/<|vision_end|>, are instruction; image pads are vision
    cats = layout.categories
    np.testing.assert_array_equal(cats, tc.token_categories(ids, processor.image_token_id))
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cats[int((ids == vision_start).nonzero()[0])] == tc.INSTRUCTION
    assert (cats[ids.numpy() == processor.image_token_id] == tc.VISION).all()


def test_generated_tokens_are_response(qwen):
    processor, ids = qwen
    answer = processor.tokenizer("ABC", add_special_tokens=False)["input_ids"]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequence = torch.cat([ids, torch.tensor(answer + [im_end])])
    layout = tc.prompt_layout(processor, sequence, prompt_len=ids.numel())
    assert layout.counts()["response"] == 4
    np.testing.assert_array_equal(layout.categories[ids.numel():], [tc.RESPONSE] * 4)
    np.testing.assert_array_equal(
        layout.categories, tc.token_categories(sequence, processor.image_token_id, prompt_len=ids.numel())
    )


def test_llava_next_roles_of_a_real_prompt():
    processor = build_tiny_processor("llava_next")
    ids = build_inputs(processor, IMAGE)["input_ids"][0]
    layout = tc.prompt_layout(processor, ids)
    # Vicuna: "<s>" + system prompt + " USER: " + image tokens (base 576 + crop grid with newlines)
    # + "\n" + OCR prompt + " ASSISTANT:" (the template's space after the text joins the role name)
    assert _text(processor, ids, layout, "system") == VICUNA_SYSTEM_PROMPT
    assert _text(processor, ids, layout, "user") == OCR_PROMPT
    assert processor.tokenizer.decode(ids[layout.roles == tc.ROLES.index("template")]) == "<s> USER: \n ASSISTANT:"
    assert layout.num_image_tokens == int((ids == processor.image_token_id).sum()) > 576


def test_layout_with_another_text_or_no_system_prompt():
    processor = build_tiny_processor("qwen2_vl")
    ids = build_inputs(processor, IMAGE, "Read line 2.", system_prompt=None)["input_ids"][0]
    layout = tc.prompt_layout(processor, ids, "Read line 2.", system_prompt=None)
    # Qwen's template inserts its default system prompt; without a system turn asked for, those
    # tokens are not the caller's system prompt and count as template
    assert layout.counts()["system"] == 0
    assert _text(processor, ids, layout, "user") == "Read line 2."


def test_layout_mismatch_is_reported(qwen):
    processor, ids = qwen
    with pytest.raises(tc.PromptLayoutError, match="does not reproduce"):
        tc.prompt_layout(processor, ids, "Read line 1.")
    with pytest.raises(tc.CategoryLabelError, match="prompt_len"):
        tc.prompt_layout(processor, ids, prompt_len=ids.numel() + 1)


@pytest.mark.parametrize("model_type", ["llava_onevision", "internvl"])
def test_chatml_image_first_roles_of_a_real_prompt(model_type):
    # ChatML with the placeholder before the text; InternVL wraps its 256 <IMG_CONTEXT> of the one tile a
    # square image makes in <img> ... </img>, which are template tokens (instruction), not vision
    processor = build_tiny_processor(model_type)
    ids = build_inputs(processor, Image.new("RGB", (224, 224), "white"), system_prompt="Be brief.")["input_ids"][0]
    layout = tc.prompt_layout(processor, ids, system_prompt="Be brief.")
    assert _text(processor, ids, layout, "system") == "Be brief."
    assert _text(processor, ids, layout, "user") == OCR_PROMPT
    wrap = ("<img>", "</img>") if model_type == "internvl" else ("", "")
    assert processor.tokenizer.decode(ids[layout.roles == tc.ROLES.index("template")]) == (
        f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{wrap[0]}{wrap[1]}\n<|im_end|>\n<|im_start|>assistant\n"
    )
    np.testing.assert_array_equal(layout.categories, tc.token_categories(ids, processor.image_token_id))
    if model_type == "internvl":
        assert layout.num_image_tokens == 256
