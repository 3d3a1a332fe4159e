"""Image-only processors for Qwen2-VL and Qwen2.5-VL, and the SparseMM pixel bounds (docs/method.md §3).

Why this module exists (docs/design.md, "transformers 5.x facts"): ``Qwen2VLProcessor`` and
``Qwen2_5_VLProcessor`` require a video processor, and every video processor of transformers 5.x
needs torchvision, which has no CPU build on these machines (installing it replaces the CPU torch
with a multi-GB CUDA build). The study only feeds still images, so the two subclasses below drop
the video processor and keep everything else of the original classes: the ``<|image_pad|>``
expansion (``image_grid_thw.prod() // merge_size**2`` tokens per image), ``mm_token_type_ids``
(needed by M-RoPE), decoding, chat templates.

Both classes are registered with ``AutoProcessor`` on import, so
``AutoProcessor.from_pretrained(folder)`` on a folder they saved returns the same class (not just
the tokenizer, which is what ``AutoProcessor`` silently falls back to for an unknown class).
The registration also maps ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` to them for
``AutoProcessor``'s last-resort lookup by config. A real checkpoint's ``processor_config.json``
names ``Qwen2VLProcessor``; :func:`sparsemm_utils.models.load_model` therefore loads Qwen
processors through these classes explicitly (see :func:`image_only_processor_class`).

LLaVA-NeXT needs nothing here: ``LlavaNextProcessor`` has no video processor and works as is with
``LlavaNextImageProcessorPil``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.image_utils import SizeDict
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "SPARSEMM_MIN_PIXELS",
    "SPARSEMM_MAX_PIXELS",
    "VideoInputNotSupportedError",
    "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor",
    "image_only_processor_class",
    "set_qwen_pixel_bounds",
]

#: SparseMM's Qwen pixel bounds (docs/method.md §3; ``min_pixels`` / ``max_pixels`` in the original's
#: ``qwen_visual_head.py``): the image is resized to multiples of 28 px with an area in
#: [32 * 28^2, 16384 * 28^2], i.e. between 32 and 16384 visual tokens.
SPARSEMM_MIN_PIXELS: int = 32 * 28 * 28
SPARSEMM_MAX_PIXELS: int = 16384 * 28 * 28


class VideoInputNotSupportedError(ValueError):
    """A video was given to an image-only processor."""


def _init_image_only(processor: ProcessorMixin, image_processor: Any, tokenizer: Any, chat_template: Any) -> None:
    """What ``Qwen2VLProcessor.__init__`` does, minus the video processor."""
    if tokenizer is None:
        raise TypeError(
            f"{type(processor).__name__} needs a tokenizer (got None): pass tokenizer=... or load it with "
            f"{type(processor).__name__}.from_pretrained(folder)."
        )
    processor.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    processor.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    processor.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
        processor.image_token
    )
    processor.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
        processor.video_token
    )
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
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for {type(self).__name__}")
        _init_image_only(self, image_processor, tokenizer, chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor; same outputs as
    :class:`Qwen2VLImageOnlyProcessor` for images (Qwen2.5-VL uses the same image processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for {type(self).__name__}")
        _init_image_only(self, image_processor, tokenizer, chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _reject_videos(self, videos)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


_IMAGE_ONLY_CLASSES: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
}


def image_only_processor_class(model_type: str) -> type[ProcessorMixin] | None:
    """The image-only processor class for ``model_type`` ("qwen2_vl", "qwen2_5_vl"), or None when
    the model family's own processor works without torchvision (``llava_next``)."""
    return _IMAGE_ONLY_CLASSES.get(model_type)


def set_qwen_pixel_bounds(processor: ProcessorMixin, min_pixels: int, max_pixels: int) -> None:
    """Set the resize bounds of a Qwen image processor in place (docs/method.md §3).

    The resized image has height and width multiples of 28 and an area in [min_pixels,
    max_pixels] (``smart_resize``); 5.x stores them as ``size = {"shortest_edge": min_pixels,
    "longest_edge": max_pixels}``.
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
            "only apply to Qwen2-VL / Qwen2.5-VL"
        )
    image_processor.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))


AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
