"""The OCR prompt and model inputs for each model family (docs/method.md §2).

The original scoring scripts build one chat per image: the image first, then the text
"Provide all the OCR results of this image.", with a generation prompt after it.

- Qwen2-VL / Qwen2.5-VL (``qwen_visual_head.py``): an explicit system message
  "You are a helpful assistant." then the user turn [image, text], through the processor's chat
  template (ChatML): ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|>
  <|image_pad|><|vision_end|>Provide ...<|im_end|>\\n<|im_start|>assistant\\n``.
- LLaVA-NeXT (``llava_visual_head*.py``, LLaVA's ``vicuna_v1`` conversation):
  ``"<system> USER: <image>\\nProvide ... ASSISTANT:"`` with Vicuna's system prompt
  :data:`VICUNA_SYSTEM_PROMPT`. The HF chat template of llava-v1.6-vicuna renders a system
  message followed by a user turn to exactly this string; the tokenizer prepends ``<s>``.

The original has no script for the newer models; they get the same chat (system turn, image,
OCR prompt) with their own template and system prompt (docs/models.md):

- Qwen3-VL: the Qwen protocol above (ChatML, :data:`QWEN_SYSTEM_PROMPT`, ``<|vision_start|>``
  ``<|image_pad|>`` ``<|vision_end|>``); Qwen3-VL's template inserts no system prompt by itself.
- LLaVA-OneVision (``qwen_1_5`` conversation): ChatML with :data:`QWEN_SYSTEM_PROMPT` and
  ``<image>\\n`` before the text.
- InternVL3 (``internvl2_5`` template): ChatML with :data:`INTERNVL_SYSTEM_PROMPT` and the
  placeholder ``<IMG_CONTEXT>\\n`` before the text, which the processor expands to ``<img>``
  + 256 ``<IMG_CONTEXT>`` per tile + ``</img>``.

The processor then expands the single image placeholder into one token per visual feature, all
with the image token id and contiguous: Qwen ``grid_t * grid_h * grid_w / 4`` copies of
``<|image_pad|>``; LLaVA-NeXT ``576`` base tokens + ``H' * (W' + 1)`` unpadded crop-grid tokens
(newline tokens included) of ``<image>``; LLaVA-OneVision 729 base tokens + its (anyres-max)
crop grid with newlines of ``<image>``; InternVL 256 ``<IMG_CONTEXT>`` per tile (the ``<img>`` /
``</img>`` around them are not image tokens) (checked on transformers 5.23).
:func:`image_token_span` finds that block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import InternVLProcessor, LlavaNextProcessor, LlavaOnevisionProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "OCR_PROMPT",
    "QWEN_SYSTEM_PROMPT",
    "VICUNA_SYSTEM_PROMPT",
    "INTERNVL_SYSTEM_PROMPT",
    "DEFAULT_SYSTEM_PROMPT",
    "ImageTokenSpanError",
    "NoImageTokensError",
    "NonContiguousImageTokensError",
    "ModelTypeMismatchError",
    "build_messages",
    "resolve_system_prompt",
    "build_inputs",
    "batch_inputs",
    "image_token_span",
]

OCR_PROMPT = "Provide all the OCR results of this image."
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
#: InternVL's own system message (the ``internvl2_5`` conversation template of InternVL 2.5 and 3).
INTERNVL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
#: Sentinel for "the family's own system prompt" (Qwen, LLaVA-OneVision: QWEN_SYSTEM_PROMPT;
#: LLaVA-NeXT: VICUNA_SYSTEM_PROMPT; InternVL: INTERNVL_SYSTEM_PROMPT).
DEFAULT_SYSTEM_PROMPT = "default"

_FAMILY_SYSTEM_PROMPT = {
    "qwen2_vl": QWEN_SYSTEM_PROMPT,
    "qwen2_5_vl": QWEN_SYSTEM_PROMPT,
    "llava_next": VICUNA_SYSTEM_PROMPT,
    "qwen3_vl": QWEN_SYSTEM_PROMPT,
    "llava_onevision": QWEN_SYSTEM_PROMPT,
    "internvl": INTERNVL_SYSTEM_PROMPT,
}
#: The processor class of each model type (image-only subclasses count as their parents).
_PROCESSOR_CLASSES: tuple[tuple[type, str], ...] = (
    (Qwen2_5_VLProcessor, "qwen2_5_vl"),
    (Qwen2VLProcessor, "qwen2_vl"),
    (Qwen3VLProcessor, "qwen3_vl"),
    (LlavaNextProcessor, "llava_next"),
    (LlavaOnevisionProcessor, "llava_onevision"),
    (InternVLProcessor, "internvl"),
)


class ImageTokenSpanError(ValueError):
    """The image tokens of a prompt cannot be located as one block."""


class NoImageTokensError(ImageTokenSpanError):
    """The prompt holds no image token."""


class NonContiguousImageTokensError(ImageTokenSpanError):
    """The image tokens of the prompt do not form one contiguous block (several images?)."""


class ModelTypeMismatchError(ValueError):
    """The model type given does not match the processor or is not supported."""


def _infer_model_type(processor: ProcessorMixin) -> str | None:
    """The family of a processor from its class (the image-only subclasses count as their parents)."""
    for cls, model_type in _PROCESSOR_CLASSES:
        if isinstance(processor, cls):
            return model_type
    return None


def _resolve(loaded_or_processor: Any, model_type: str | None) -> tuple[ProcessorMixin, str, Any]:
    """(processor, model_type, model or None) from a LoadedModel or a processor."""
    model = None
    if hasattr(loaded_or_processor, "processor") and hasattr(loaded_or_processor, "model_type"):
        processor, model = loaded_or_processor.processor, loaded_or_processor.model
        inferred = loaded_or_processor.model_type
    elif isinstance(loaded_or_processor, ProcessorMixin):
        processor, inferred = loaded_or_processor, _infer_model_type(loaded_or_processor)
    else:
        raise TypeError(
            "build_inputs needs a LoadedModel (from load_model) or a processor, "
            f"got {type(loaded_or_processor).__name__}"
        )
    if model_type is None:
        model_type = inferred
    if model_type not in _FAMILY_SYSTEM_PROMPT:
        raise ModelTypeMismatchError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(_FAMILY_SYSTEM_PROMPT)}); pass "
            "model_type= explicitly when the processor class does not tell"
        )
    if inferred is not None and inferred != model_type:
        raise ModelTypeMismatchError(
            f"model_type {model_type!r} does not match the processor ({type(processor).__name__} is for {inferred!r})"
        )
    return processor, model_type, model


def build_messages(
    text: str, model_type: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, *, image: bool = True
) -> list[dict]:
    """The chat for one image and one text (docs/method.md §2): optional system turn, then the user
    turn ``[image, text]`` (``[text]`` when ``image=False``, e.g. the text-copy chat of
    :mod:`sparsemm_utils.text_heads`). ``system_prompt``: the family default (``"default"``), a
    string, or None for no system turn (Qwen's template then still inserts its default system prompt)."""
    if model_type not in _FAMILY_SYSTEM_PROMPT:
        raise ModelTypeMismatchError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(_FAMILY_SYSTEM_PROMPT)})"
        )
    if system_prompt == DEFAULT_SYSTEM_PROMPT:
        system_prompt = _FAMILY_SYSTEM_PROMPT[model_type]
    messages: list[dict] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content = [{"type": "image"}] if image else []
    messages.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
    return messages


def resolve_system_prompt(loaded_or_processor: Any, model_type: str, system_prompt: str | None) -> str | None:
    """The system prompt a chat gets: ``system_prompt`` unless it is :data:`DEFAULT_SYSTEM_PROMPT`;
    then the model's own default when its config declares one (``default_system_prompt`` in
    ``config.json``; ``None`` = no system turn, e.g. the study model, trained without one), else
    the family's (Qwen and LLaVA-OneVision: :data:`QWEN_SYSTEM_PROMPT`, LLaVA-NeXT:
    :data:`VICUNA_SYSTEM_PROMPT`, InternVL: :data:`INTERNVL_SYSTEM_PROMPT`)."""
    if system_prompt != DEFAULT_SYSTEM_PROMPT:
        return system_prompt
    config = getattr(getattr(loaded_or_processor, "model", None), "config", None)
    if config is not None and "default_system_prompt" in config.to_dict():
        return config.default_system_prompt
    if model_type not in _FAMILY_SYSTEM_PROMPT:
        raise ModelTypeMismatchError(f"model_type {model_type!r} is not supported (supported: {', '.join(_FAMILY_SYSTEM_PROMPT)})")
    return _FAMILY_SYSTEM_PROMPT[model_type]


def build_inputs(
    loaded_or_processor: Any,
    image: Image.Image,
    text: str = OCR_PROMPT,
    model_type: str | None = None,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> BatchFeature:
    """Model inputs for one image and one prompt, batch size 1 (docs/method.md §2).

    ``loaded_or_processor``: a :class:`~sparsemm_utils.models.LoadedModel` (tensors are then moved
    to its model's device, floating ones cast to its dtype) or a processor (``model_type``
    inferred from its class when not given). Returns the processor's BatchFeature:
    Qwen: ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` (1, n), ``pixel_values``
    (patches, 1176; 1536 for Qwen3-VL's 16 px patches), ``image_grid_thw`` (1, 3); LLaVA-NeXT:
    ``input_ids`` / ``attention_mask`` (1, n), ``pixel_values`` (1, crops + 1, 3, 336, 336),
    ``image_sizes`` (1, 2) as (height, width); LLaVA-OneVision: the same with 384 px crops and
    ``batch_num_images`` (1,); InternVL: ``input_ids`` / ``attention_mask`` (1, n),
    ``pixel_values`` (tiles, 3, 448, 448).
    """
    processor, model_type, model = _resolve(loaded_or_processor, model_type)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__} (open it with PIL.Image.open)")
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    messages = build_messages(text, model_type, resolve_system_prompt(loaded_or_processor, model_type, system_prompt))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")
    if model is not None:
        inputs = inputs.to(model.device)
        inputs = inputs.to(model.dtype)
    return inputs


def batch_inputs(loaded: Any, prompts: Sequence[Any], *, pad_token_id: int | None = None) -> BatchFeature:
    """B prompts of :func:`build_inputs` (each batch 1, unpadded) as ONE left-padded batch.

    Per-token tensors (``input_ids``, ``attention_mask``, Qwen's ``mm_token_type_ids``: shape
    ``(1, n_b)``) become ``(B, n_max)``, each prompt right-aligned after ``n_max - n_b`` padding
    positions (``pad_token_id`` in ``input_ids``, default the tokenizer's pad token, else the
    model's end-of-sequence token; 0 elsewhere, so ``attention_mask`` is 0 exactly on padding).
    Image tensors concatenate along dim 0 in prompt order: Qwen's ``pixel_values``
    ``(patches_1 + ... + patches_B, 1176)`` and ``image_grid_thw`` ``(B, 3)``; LLaVA-NeXT's
    ``pixel_values`` ``(B, crops_max + 1, 3, 336, 336)`` (fewer crops zero-padded at the end, which
    the model drops by ``image_sizes``) and ``image_sizes`` ``(B, 2)``. One prompt comes back as it
    is. ``model.generate`` positions a left-padded batch from its attention mask, M-RoPE
    included, so each prompt sees the positions it has alone."""
    if not prompts:
        raise ValueError("batch_inputs needs at least one prompt")
    keys = list(prompts[0].keys())
    for b, prompt in enumerate(prompts):
        ids = prompt.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt {b}: input_ids must be (1, n) (one prompt of build_inputs), got {getattr(ids, 'shape', ids)}")
        if list(prompt.keys()) != keys:
            raise ValueError(f"prompt {b} has inputs {list(prompt.keys())}, prompt 0 has {keys}: batch prompts of one kind")
        mask = prompt.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
            raise ValueError(f"prompt {b}: its attention_mask holds padding already; give unpadded prompts")
    if len(prompts) == 1:
        return prompts[0]
    if pad_token_id is None:
        tokenizer = getattr(loaded, "tokenizer", None)
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            eos = loaded.model.generation_config.eos_token_id
            pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    if pad_token_id is None:
        raise ValueError("no pad token: pass pad_token_id= (any id: padding is masked out)")
    longest = max(int(p["input_ids"].shape[1]) for p in prompts)
    out = {}
    for key in keys:
        tensors = [p[key] for p in prompts]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ValueError(f"input {key!r} is not a tensor in every prompt; cannot batch it")
        if all(t.shape == p["input_ids"].shape for t, p in zip(tensors, prompts)):  # per token: pad on the left
            fill = int(pad_token_id) if key == "input_ids" else 0
            out[key] = torch.cat([F.pad(t, (longest - t.shape[1], 0), value=fill) for t in tensors])
            continue
        if len({t.shape[2:] for t in tensors}) > 1 or len({t.ndim for t in tensors}) > 1:
            raise ValueError(f"input {key!r} has shapes {[tuple(t.shape) for t in tensors]}: cannot batch them")
        if tensors[0].ndim >= 3:  # (1, crops, ...): pad the crops to the most
            most = max(t.shape[1] for t in tensors)
            tensors = [torch.cat([t, t.new_zeros((1, most - t.shape[1], *t.shape[2:]))], dim=1) for t in tensors]
        out[key] = torch.cat(tensors)
    return BatchFeature(out)


def image_token_span(input_ids: torch.Tensor | np.ndarray | Sequence[int], image_token_id: int) -> tuple[int, int]:
    """(absolute position of the first image token, number of image tokens) of one prompt.

    ``input_ids``: shape (n,) or (1, n). Raises :class:`NoImageTokensError` when the prompt holds
    no ``image_token_id`` and :class:`NonContiguousImageTokensError` when the image tokens are not
    one block (docs/method.md §3: absolute position = first image token + offset inside the block).
    """
    ids = torch.as_tensor(np.asarray(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"image_token_span takes one prompt: input_ids of shape (1, n) or (n,), got {tuple(ids.shape)}"
            )
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"input_ids must have shape (n,) or (1, n), got {tuple(ids.shape)}")
    positions = torch.nonzero(ids == int(image_token_id)).flatten()
    if positions.numel() == 0:
        raise NoImageTokensError(
            f"no image token (id {image_token_id}) in the {ids.numel()} input ids: build the inputs with an image "
            "(prompts.build_inputs) and pass the model's image token id (LoadedModel.image_token_id)"
        )
    start, count = int(positions[0]), int(positions.numel())
    last = int(positions[-1])
    if last - start + 1 != count:
        gaps = torch.nonzero(positions.diff() != 1).flatten()
        first_gap = int(positions[int(gaps[0])]) + 1
        raise NonContiguousImageTokensError(
            f"the {count} image tokens (id {image_token_id}) span positions {start}..{last} with a gap after "
            f"position {first_gap - 1}: one image per prompt is expected (docs/method.md §3)"
        )
    return start, count
