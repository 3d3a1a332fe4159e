"""Image-only processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL) and the
SparseMM pixel bounds (docs/method.md §3).

Why this module exists (docs/design.md, "transformers 5.x facts"): ``Qwen2VLProcessor``,
``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``, ``LlavaOnevisionProcessor`` and ``InternVLProcessor``
require a video processor, and every video processor of transformers 5.x needs torchvision, which
has no CPU build on these machines (installing it replaces the CPU torch with a multi-GB CUDA
build). The study only feeds still images, so the subclasses below drop the video processor and
keep everything else of the original classes: the expansion of the image placeholder (Qwen:
``image_grid_thw.prod() // merge_size**2`` copies of ``<|image_pad|>``; LLaVA-OneVision: base grid
+ unpadded crop grid + newlines of ``<image>``; InternVL: ``<img>`` + 256 ``<IMG_CONTEXT>`` per
tile + ``</img>``), ``mm_token_type_ids`` (needed by M-RoPE), decoding, chat templates.

Every class is registered with ``AutoProcessor`` on import, so
``AutoProcessor.from_pretrained(folder)`` on a folder they saved returns the same class (not just
the tokenizer, which is what ``AutoProcessor`` silently falls back to for an unknown class).
The registration also maps each model's config class to its image-only processor for
``AutoProcessor``'s last-resort lookup by config. A real checkpoint's ``processor_config.json``
names the original class (``Qwen2VLProcessor``, ...); :func:`sparsemm_utils.models.load_model`
therefore loads these processors through the image-only classes explicitly (see
:func:`image_only_processor_class`).

LLaVA-NeXT needs nothing here: ``LlavaNextProcessor`` has no video processor and works as is with
``LlavaNextImageProcessorPil``.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import (
    AutoProcessor,
    InternVLConfig,
    InternVLProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.image_utils import SizeDict
from transformers.processing_utils import ProcessorMixin

from sparsemm_utils.validate import check_int

__all__ = [
    "SPARSEMM_MIN_PIXELS",
    "SPARSEMM_MAX_PIXELS",
    "SPARSEMM_MIN_TOKENS",
    "SPARSEMM_MAX_TOKENS",
    "sparsemm_pixel_bounds",
    "VideoInputNotSupportedError",
    "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor",
    "Qwen3VLImageOnlyProcessor",
    "LlavaOnevisionImageOnlyProcessor",
    "InternVLImageOnlyProcessor",
    "QWEN_PROCESSOR_TYPES",
    "image_only_processor_class",
    "set_qwen_pixel_bounds",
]

#: SparseMM's Qwen pixel bounds (docs/method.md §3; ``min_pixels`` / ``max_pixels`` in the original's
#: ``qwen_visual_head.py``): the image is resized to multiples of 28 px with an area in
#: [32 * 28^2, 16384 * 28^2], i.e. between 32 and 16384 visual tokens.
SPARSEMM_MIN_PIXELS: int = 32 * 28 * 28
SPARSEMM_MAX_PIXELS: int = 16384 * 28 * 28
#: The same bounds counted in merged visual tokens, whatever a token's size in pixels.
SPARSEMM_MIN_TOKENS: int = 32
SPARSEMM_MAX_TOKENS: int = 16384


def sparsemm_pixel_bounds(token_size: int) -> tuple[int, int]:
    """SparseMM's ``(min_pixels, max_pixels)`` for a Qwen image processor whose merged token covers
    ``token_size`` x ``token_size`` pixels (``patch_size * merge_size``): 32 and 16384 tokens' worth
    of pixels (docs/method.md §3). Qwen2-VL / Qwen2.5-VL (28 px): :data:`SPARSEMM_MIN_PIXELS`,
    :data:`SPARSEMM_MAX_PIXELS`; Qwen3-VL (32 px): 32768 and 16777216, the latter being Qwen3-VL's
    own ``longest_edge``."""
    token_size = check_int("token_size (patch_size * merge_size)", token_size, 1)
    return SPARSEMM_MIN_TOKENS * token_size**2, SPARSEMM_MAX_TOKENS * token_size**2


class VideoInputNotSupportedError(ValueError):
    """A video was given to an image-only processor."""


def _require_tokenizer(processor: ProcessorMixin, tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """An image-only processor takes no other argument than its own, and needs a tokenizer."""
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for {type(processor).__name__}")
    if tokenizer is None:
        raise TypeError(
            f"{type(processor).__name__} needs a tokenizer (got None): pass tokenizer=... or load it with "
            f"{type(processor).__name__}.from_pretrained(folder)."
        )


def _token_id(tokenizer: Any, attribute: str, token: str) -> int:
    """``tokenizer.<attribute>_id`` when the tokenizer declares it, else the id of ``token``."""
    return getattr(tokenizer, f"{attribute}_id", None) or tokenizer.convert_tokens_to_ids(token)


def _init_image_only(processor: ProcessorMixin, image_processor: Any, tokenizer: Any, chat_template: Any) -> None:
    """What ``Qwen2VLProcessor.__init__`` does, minus the video processor."""
    processor.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    processor.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    processor.image_token_id = _token_id(tokenizer, "image_token", processor.image_token)
    processor.video_token_id = _token_id(tokenizer, "video_token", processor.video_token)
    ProcessorMixin.__init__(processor, image_processor, tokenizer, chat_template=chat_template)


def _reject_videos(processor: ProcessorMixin, videos: Any) -> None:
    if videos is not None:
        raise VideoInputNotSupportedError(
            f"{type(processor).__name__} is image-only (its video processor would need torchvision, which "
            "has no CPU build here): pass images=..., not videos=..."
        )


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (image processor + tokenizer + chat template).

    Calling it with ``images=[img]`` and a text holding one ``<|image_pad|>`` returns ``input_ids``
    (1, n) in which the pad is expanded to ``grid_t * grid_h * grid_w // 4`` copies, ``pixel_values``
    (grid_t * grid_h * grid_w, 3 * 2 * 14 * 14), ``image_grid_thw`` (1, 3) and ``mm_token_type_ids``
    (1, n), exactly as the original class does.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _require_tokenizer(self, tokenizer, kwargs)
        _init_image_only(self, image_processor, tokenizer, chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor; same outputs as
    :class:`Qwen2VLImageOnlyProcessor` for images (Qwen2.5-VL uses the same image processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _require_tokenizer(self, tokenizer, kwargs)
        _init_image_only(self, image_processor, tokenizer, chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor. For images it is the Qwen2-VL layout with
    16 px patches: ``<|vision_start|>`` + ``grid_t * grid_h * grid_w // 4`` copies of
    ``<|image_pad|>`` + ``<|vision_end|>``, ``pixel_values`` (patches, 3 * 2 * 16 * 16),
    ``image_grid_thw`` (1, 3) and ``mm_token_type_ids`` (1, n). The frame timestamps
    (``<t seconds>``) Qwen3-VL writes before each frame belong to videos only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _require_tokenizer(self, tokenizer, kwargs)
        _init_image_only(self, image_processor, tokenizer, chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = _token_id(tokenizer, "vision_start_token", self.vision_start_token)
        self.vision_end_token_id = _token_id(tokenizer, "vision_end_token", self.vision_end_token)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor (docs/method.md §3).

    One image becomes ``num_image_tokens`` base tokens (27 x 27 = 729 for SigLIP 384/14, no CLS
    with ``vision_feature_select_strategy="full"``) followed by the unpadded crop grid, shrunk by
    the anyres-max rule when it holds more than ``max_num_patches`` crops' worth of tokens, with one
    newline token per row; all of them carry the ``<image>`` id. ``pixel_values`` is (1, crops + 1,
    3, 384, 384), ``image_sizes`` (1, 2) as (height, width)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        _require_tokenizer(self, tokenizer, kwargs)
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = _token_id(tokenizer, "image_token", self.image_token)
        self.video_token_id = _token_id(tokenizer, "video_token", self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """``InternVLProcessor`` without the video processor (docs/method.md §3).

    One image is cut into 448 px tiles (plus a 448 px thumbnail when there is more than one tile);
    each tile becomes ``image_seq_length`` (256) ``<IMG_CONTEXT>`` tokens after the vision tower's
    pixel shuffle, and the whole block is wrapped in ``<img>`` ... ``</img>``. ``pixel_values`` is
    (tiles, 3, 448, 448). The tokenizer must declare ``start_image_token``, ``end_image_token``,
    ``context_image_token`` and ``video_token`` (as the InternVL ``-hf`` tokenizers do)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        _require_tokenizer(self, tokenizer, kwargs)
        missing = [
            name
            for name in ("start_image_token", "end_image_token", "context_image_token", "video_token")
            if getattr(tokenizer, name, None) is None
        ]
        if missing:
            raise TypeError(
                f"{type(self).__name__} needs a tokenizer that declares {missing} (extra_special_tokens of an "
                "InternVL -hf tokenizer_config.json); this tokenizer does not"
            )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


_IMAGE_ONLY_CLASSES: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
    "llava_onevision": LlavaOnevisionImageOnlyProcessor,
    "internvl": InternVLImageOnlyProcessor,
}

#: Model types whose image processor is Qwen2-VL's (``smart_resize`` within min/max pixels).
QWEN_PROCESSOR_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def image_only_processor_class(model_type: str) -> type[ProcessorMixin] | None:
    """The image-only processor class for ``model_type`` (every supported type but ``llava_next``),
    or None when the model family's own processor works without torchvision (``llava_next``)."""
    return _IMAGE_ONLY_CLASSES.get(model_type)


def set_qwen_pixel_bounds(processor: ProcessorMixin, min_pixels: int, max_pixels: int) -> None:
    """Set the resize bounds of a Qwen image processor in place (docs/method.md §3).

    The resized image has height and width multiples of ``patch_size * merge_size`` (28, or 32
    for Qwen3-VL) and an area in [min_pixels, max_pixels] (``smart_resize``); 5.x stores them as
    ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
    """
    if not (0 < min_pixels <= max_pixels):
        raise ValueError(
            f"pixel bounds must satisfy 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
            f"max_pixels={max_pixels} (SparseMM uses {SPARSEMM_MIN_PIXELS} and {SPARSEMM_MAX_PIXELS})"
        )
    image_processor = processor.image_processor
    if not hasattr(image_processor, "merge_size"):
        raise TypeError(
            f"{type(image_processor).__name__} is not a Qwen2-VL image processor (no merge_size): pixel bounds "
            "only apply to Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
        )
    image_processor.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))


for _config, _processor in (
    (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    (Qwen3VLConfig, Qwen3VLImageOnlyProcessor),
    (LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor),
    (InternVLConfig, InternVLImageOnlyProcessor),
):
    AutoProcessor.register(_config, _processor, exist_ok=True)
