"""Tiny random-weight models of the real classes, built offline (docs/design.md, "The offline world").

Every real-model path of the project (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision,
InternVL) is tested on tiny models of the SAME transformers classes. What is tiny: the widths and
depths (a few layers of width 128, a 2-layer vision tower of width 32) and the vocabulary (one
token per printable ASCII character plus the family's special tokens). What is real: the classes,
the attention layout (GQA for the Qwen-based models, MHA for LLaVA-NeXT-Vicuna), the RoPE variant
(M-RoPE; Qwen3-VL's interleaved M-RoPE and QK-norm), Qwen3-VL's deepstack, and the
image-processor geometry, so the number and layout of visual tokens for an image is exactly what
the real model sees (docs/method.md §3):

- Qwen2-VL / Qwen2.5-VL: 14 px patches, 2x2 merge, temporal patch 2, the image resized to
  multiples of 28 px with an area in [min_pixels, max_pixels]. The tiny default is SparseMM's
  own bounds (32*28^2 .. 16384*28^2): the tiny vision tower is cheap, so nothing forces smaller
  images, and token counts then match what the real study sees for the same image.
- Qwen3-VL: 16 px patches, 2x2 merge (32 px tokens), the same resize rule with SparseMM's bounds
  counted in tokens (32 .. 16384 tokens of 32 px, :func:`~sparsemm_utils.processors.sparsemm_pixel_bounds`);
  deepstack merges of the first vision blocks added to the first decoder layers' hidden states.
- LLaVA-NeXT: CLIP 336 px with 14 px patches (24x24 = 576 base tokens), llava-v1.6's
  ``image_grid_pinpoints``, ``vision_feature_select_strategy="default"`` (CLS dropped),
  ``vision_feature_layer=-2``.
- LLaVA-OneVision: SigLIP 384 px with 14 px patches (27x27 = 729 base tokens, no CLS,
  ``vision_feature_select_strategy="full"``, ``vision_feature_layer=-1``), the 36 pinpoints
  384..2304 px, ``anyres_max_9``, a Qwen2 language model.
- InternVL: 448 px tiles with 14 px patches, 1..12 tiles plus a thumbnail, pixel shuffle 0.5
  (256 tokens a tile), CLS dropped, a Qwen2 language model (InternVL3's Qwen2.5).

Builds are deterministic: the same ``seed`` gives identical weights (the global torch RNG is left
untouched), and take well under a second each. ``load_model("tiny-random/<model_type>")``
(:mod:`sparsemm_utils.models`) builds one with :func:`build_tiny`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    InternVLConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from sparsemm_utils.model_types import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from sparsemm_utils.patch_mapping import LLAVA_ONEVISION_PINPOINTS
from sparsemm_utils.processors import (
    InternVLImageOnlyProcessor,
    LlavaOnevisionImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
    sparsemm_pixel_bounds,
)
from sparsemm_utils.validate import is_int

__all__ = [
    "TINY_MODEL_TYPES",
    "InvalidTinySpecError",
    "QWEN_SPECIAL_TOKENS",
    "LLAVA_SPECIAL_TOKENS",
    "QWEN_CHAT_TEMPLATE",
    "LLAVA_VICUNA_CHAT_TEMPLATE",
    "LLAVA_V16_GRID_PINPOINTS",
    "TinySpec",
    "build_char_tokenizer",
    "build_tiny_processor",
    "tiny_config",
    "build_tiny",
    "save_tiny",
    "mrope_section_for",
    "interleaved_mrope_section_for",
    "qwen2_based_vlm_config",
    "qwen3_vl_vlm_config",
    "pixel_bounds_for",
    "QWEN3_VL_CHAT_TEMPLATE",
    "ONEVISION_CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "ONEVISION_SPECIAL_TOKENS",
    "INTERNVL_SPECIAL_TOKENS",
    "QWEN2_VL_TOKEN_PX",
    "QWEN3_VL_TOKEN_PX",
]

#: Model types a tiny model can be built for: every supported type.
TINY_MODEL_TYPES: tuple[str, ...] = tuple(SUPPORTED_MODEL_TYPES)

#: The real Qwen2-VL special tokens the study's prompts use (the real tokenizer has a few more,
#: e.g. ``<|box_start|>``, that no prompt here produces).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: LLaVA-NeXT-Vicuna's special tokens: Llama's ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2 as in
#: Llama), then the image placeholder ``<image>`` and a padding token at the end of the vocabulary.
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

#: Qwen2-VL-Instruct's chat template (ChatML; inserts the default system prompt when the chat has none).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Modelled on llava-hf/llava-v1.6-vicuna-7b-hf's chat template; renders LLaVA's ``vicuna_v1``
#: conversation "<system> USER: <image>\n<text> ASSISTANT:" (the tokenizer adds ``<s>``), and also
#: accepts a plain-string content.
LLAVA_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Qwen3-VL-Instruct's chat template: Qwen2-VL's without the default system prompt (a chat without
#: a system turn gets none).
QWEN3_VL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)

#: The special tokens of the Qwen2 tokenizer behind LLaVA-OneVision: ChatML's, then the image and
#: video placeholders the llava-hf checkpoints add.
ONEVISION_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: The special tokens of InternVL3's Qwen2.5 tokenizer the prompts use: ChatML's, the image block's
#: ``<img>`` / ``</img>`` around the ``<IMG_CONTEXT>`` tokens, and the video placeholder.
INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
#: The tokenizer attributes ``InternVLProcessor`` reads (``extra_special_tokens`` of an InternVL
#: ``-hf`` tokenizer), and their tokens.
INTERNVL_TOKEN_ATTRIBUTES: Mapping[str, str] = MappingProxyType(
    {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
)

#: ChatML with the image placeholder ``image`` on its own line before the text, as LLaVA-OneVision's
#: ``qwen_1_5`` conversation and InternVL's ``internvl2_5`` template write a single-image turn:
#: ``<|im_start|>user\n<image>\n<text><|im_end|>\n``. No default system prompt is inserted
#: (:mod:`sparsemm_utils.prompts` passes the family's).
_CHATML_IMAGE_FIRST_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ 'IMAGE\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Modelled on LLaVA-OneVision's ``qwen_1_5`` conversation (placeholder ``<image>``).
ONEVISION_CHAT_TEMPLATE = _CHATML_IMAGE_FIRST_TEMPLATE.replace("IMAGE", "<image>")
#: Modelled on InternVL's ``internvl2_5`` template; the ``-hf`` processors' placeholder is
#: ``<IMG_CONTEXT>``, which the processor expands to ``<img>`` + 256 per tile + ``</img>``.
INTERNVL_CHAT_TEMPLATE = _CHATML_IMAGE_FIRST_TEMPLATE.replace("IMAGE", "<IMG_CONTEXT>")

#: Pixels per merged visual token along a side: 14 px patches x 2 (Qwen2-VL / Qwen2.5-VL) and
#: 16 px patches x 2 (Qwen3-VL).
QWEN2_VL_TOKEN_PX: int = 28
QWEN3_VL_TOKEN_PX: int = 32

#: llava-v1.6's anyres resolutions, (height, width) in pixels.
LLAVA_V16_GRID_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

#: One token per printable ASCII character (0x20-0x7E) plus newline.
_BASE_CHARS: tuple[str, ...] = tuple(chr(i) for i in range(0x20, 0x7F)) + ("\n",)


class InvalidTinySpecError(ValueError):
    """The sizes asked of a tiny model are inconsistent (e.g. heads do not divide the width)."""


def _check_model_type(model_type: str) -> None:
    if model_type not in TINY_MODEL_TYPES:
        raise UnsupportedModelError(model_type, where="random_models")


@dataclass(frozen=True)
class _TokenizerFamily:
    """How a family's tokenizer looks: ``head`` tokens before the characters (``<unk>`` first),
    ``tail`` after them, the chat template, eos / pad / bos, and the attributes the family's
    processor reads (``extra_special_tokens``)."""

    head: tuple[str, ...]
    tail: tuple[str, ...]
    chat_template: str
    eos: str
    pad: str
    bos: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


_TOKENIZERS: Mapping[str, _TokenizerFamily] = MappingProxyType(
    {
        "qwen2_vl": _TokenizerFamily(("<unk>",), QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>"),
        "qwen2_5_vl": _TokenizerFamily(("<unk>",), QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>"),
        "qwen3_vl": _TokenizerFamily(
            ("<unk>",), QWEN_SPECIAL_TOKENS, QWEN3_VL_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>"
        ),
        "llava_next": _TokenizerFamily(
            LLAVA_SPECIAL_TOKENS[:3], LLAVA_SPECIAL_TOKENS[3:], LLAVA_VICUNA_CHAT_TEMPLATE, "</s>", "<pad>", bos="<s>"
        ),
        "llava_onevision": _TokenizerFamily(
            ("<unk>",), ONEVISION_SPECIAL_TOKENS, ONEVISION_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>"
        ),
        "internvl": _TokenizerFamily(
            ("<unk>",),
            INTERNVL_SPECIAL_TOKENS,
            INTERNVL_CHAT_TEMPLATE,
            "<|im_end|>",
            "<|endoftext|>",
            attributes=INTERNVL_TOKEN_ATTRIBUTES,
        ),
    }
)


def _family(model_type: str) -> str:
    """``"llava"`` (LLaVA-NeXT: Llama tokenizer, MHA), ``"qwen"`` (Qwen2-VL / 2.5 / 3: Qwen image
    processor, M-RoPE) or the model type itself for the other families."""
    if model_type == "llava_next":
        return "llava"
    return "qwen" if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") else model_type


def build_char_tokenizer(model_type: str, extra_chars: str = "") -> PreTrainedTokenizerFast:
    """A character-level tokenizer with the model family's special tokens and chat template.

    Vocabulary (ids in this order):
    - Qwen (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): ``<unk>`` (0), the 96 base characters
      (printable ASCII and ``\\n``), then ``extra_chars`` (deduplicated, in order), then
      :data:`QWEN_SPECIAL_TOKENS`. eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no BOS (as the
      real Qwen tokenizers).
    - LLaVA-NeXT: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), the characters, then ``<image>`` and
      ``<pad>``. A ``<s>`` is prepended to every encoding (as Llama/Vicuna's tokenizer does).
    - LLaVA-OneVision / InternVL (Qwen2 tokenizers): as Qwen, with :data:`ONEVISION_SPECIAL_TOKENS`
      / :data:`INTERNVL_SPECIAL_TOKENS` after the characters; InternVL's also declares the
      attributes of :data:`INTERNVL_TOKEN_ATTRIBUTES` (``tokenizer.start_image_token_id``, ...).

    Every character is its own token, so ``decode([id])`` of a generated token is one character
    (the tiny analogue of a real tokenizer's subword, docs/method.md §4). Characters outside the
    vocabulary encode to ``<unk>``. ``extra_chars`` lets a trained tiny reader extend the alphabet.
    """
    _check_model_type(model_type)
    family = _TOKENIZERS[model_type]
    chars: list[str] = list(dict.fromkeys(_BASE_CHARS + tuple(extra_chars)))
    head, tail = list(family.head), list(family.tail)
    vocab = {tok: i for i, tok in enumerate(head + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character (newlines included); the WordLevel model maps each to its id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head + tail])
    if family.bos is not None:
        bos_id = vocab[family.bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    optional = {"bos_token": family.bos} if family.bos is not None else {}
    if family.attributes:
        optional["extra_special_tokens"] = dict(family.attributes)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=family.eos,
        unk_token="<unk>",
        pad_token=family.pad,
        chat_template=family.chat_template,
        **optional,
    )


def mrope_section_for(head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) for a head of ``head_dim`` channels.

    They must sum to ``head_dim // 2`` (one rotary frequency per channel pair). The real models
    use [16, 24, 24] for head_dim 128, i.e. 1/4 temporal and 3/8 each spatial; the same split
    here: head_dim 16 -> 8 pairs -> [2, 3, 3].
    """
    if head_dim % 2 or head_dim < 8:
        raise InvalidTinySpecError(f"head_dim must be even and >= 8 for M-RoPE, got {head_dim}")
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def interleaved_mrope_section_for(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved M-RoPE sections (temporal, height, width) for ``head_dim`` channels.

    Qwen3-VL spreads the three axes over the rotary frequencies in turn (frequency ``3i + 1`` is
    height, ``3i + 2`` width, up to ``3 * section`` each; the rest temporal) instead of in three
    blocks. The real models use [24, 20, 20] for head_dim 128, i.e. 5/16 of the pairs per spatial
    axis; the same split here: head_dim 16 -> 8 pairs -> height = width = 8 * 5 // 16 = 2,
    temporal 4 -> [4, 2, 2].
    """
    if head_dim % 2 or head_dim < 8:
        raise InvalidTinySpecError(f"head_dim must be even and >= 8 for M-RoPE, got {head_dim}")
    half = head_dim // 2
    spatial = half * 5 // 16
    return [half - 2 * spatial, spatial, spatial]


def pixel_bounds_for(model_type: str) -> tuple[int, int]:
    """SparseMM's ``(min_pixels, max_pixels)`` for a Qwen model type (32 .. 16384 tokens of 28 px
    for Qwen2-VL / Qwen2.5-VL, of 32 px for Qwen3-VL; docs/method.md §3)."""
    return sparsemm_pixel_bounds(QWEN3_VL_TOKEN_PX if model_type == "qwen3_vl" else QWEN2_VL_TOKEN_PX)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model (the defaults are what ``build_tiny`` uses).

    Text model: ``text_layers`` decoder layers of width ``text_hidden``, ``text_heads`` query heads
    and ``text_kv_heads`` KV heads (None: 2, i.e. GQA groups of 4 as the real Qwen2-VL, for every
    family but LLaVA-NeXT; ``text_heads`` for LLaVA-NeXT, MHA as Vicuna). head_dim = text_hidden /
    text_heads.
    Vision tower: ``vision_layers`` blocks of width ``vision_hidden`` with ``vision_heads`` heads
    (LLaVA-NeXT's CLIP needs >= 2 layers because it reads the second-to-last one).
    ``min_pixels`` / ``max_pixels`` only apply to the Qwen family (docs/method.md §3); None:
    SparseMM's bounds for the model type (:func:`pixel_bounds_for`).
    ``extra_chars`` extends the character vocabulary (see :func:`build_char_tokenizer`).
    """

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int | None = None
    text_intermediate: int = 256
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    min_pixels: int | None = None
    max_pixels: int | None = None
    extra_chars: str = ""

    def __post_init__(self) -> None:
        positive = {
            k: getattr(self, k)
            for k in (
                "text_hidden",
                "text_layers",
                "text_heads",
                "text_intermediate",
                "vision_hidden",
                "vision_layers",
                "vision_heads",
                "vision_intermediate",
                "min_pixels",
                "max_pixels",
            )
            if getattr(self, k) is not None
        }
        bad = {k: v for k, v in positive.items() if not is_int(v) or v <= 0}
        if bad:
            raise InvalidTinySpecError(f"these sizes must be positive integers: {bad}")
        for k, v in positive.items():  # numpy integers become ints (configs are saved as JSON)
            object.__setattr__(self, k, int(v))
        if self.text_hidden % self.text_heads:
            raise InvalidTinySpecError(
                f"text_heads={self.text_heads} must divide text_hidden={self.text_hidden} (head_dim = hidden / heads)"
            )
        if self.text_kv_heads is not None and (
            not is_int(self.text_kv_heads) or self.text_kv_heads <= 0 or self.text_heads % self.text_kv_heads
        ):
            raise InvalidTinySpecError(
                f"text_kv_heads={self.text_kv_heads} must be a positive divisor of text_heads={self.text_heads} (GQA)"
            )
        if self.text_kv_heads is not None:
            object.__setattr__(self, "text_kv_heads", int(self.text_kv_heads))
        if self.vision_hidden % self.vision_heads or (self.vision_hidden // self.vision_heads) % 2:
            raise InvalidTinySpecError(
                f"vision_heads={self.vision_heads} must divide vision_hidden={self.vision_hidden} into an even "
                "head_dim (2D rotary embedding in the Qwen vision tower)"
            )
        if (self.min_pixels is None) != (self.max_pixels is None):
            raise InvalidTinySpecError(
                f"give both min_pixels and max_pixels or neither (got {self.min_pixels}, {self.max_pixels})"
            )
        if self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise InvalidTinySpecError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    def pixel_bounds(self, model_type: str) -> tuple[int, int]:
        """``(min_pixels, max_pixels)``: the spec's, or SparseMM's for ``model_type``."""
        if self.min_pixels is not None:
            return self.min_pixels, self.max_pixels  # type: ignore[return-value]
        return pixel_bounds_for(model_type)

    def kv_heads_for(self, model_type: str) -> int:
        """KV heads of the text model: ``text_kv_heads``, or the family default (LLaVA-NeXT MHA, else 2)."""
        if self.text_kv_heads is not None:
            return self.text_kv_heads
        if _family(model_type) == "llava":
            return self.text_heads
        return 2 if self.text_heads % 2 == 0 else 1

    @classmethod
    def from_overrides(cls, **overrides: Any) -> "TinySpec":
        """A spec with some defaults replaced; unknown keys get an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise InvalidTinySpecError(f"unknown tiny-model options {unknown}; valid options: {', '.join(names)}")
        return cls(**overrides)


def tiny_config(model_type: str, tokenizer: PreTrainedTokenizerFast, spec: TinySpec | None = None):
    """The config of a tiny ``model_type`` model whose vocabulary and special ids are the tokenizer's."""
    _check_model_type(model_type)
    spec = spec or TinySpec()
    ids = lambda tok: tokenizer.convert_tokens_to_ids(tok)  # noqa: E731
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.kv_heads_for(model_type),
        tie_word_embeddings=False,
    )
    if model_type == "llava_next":
        if spec.vision_layers < 2:
            raise InvalidTinySpecError(
                f"LLaVA-NeXT reads the second-to-last vision layer (vision_feature_layer=-2): vision_layers must be "
                f">= 2, got {spec.vision_layers}"
            )
        text.update(
            model_type="llama",
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            bos_token_id=ids("<s>"),
            eos_token_id=ids("</s>"),
            pad_token_id=ids("<pad>"),
        )
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=336,
            patch_size=14,
            projection_dim=spec.vision_hidden,
            hidden_act="quick_gelu",
        )
        return LlavaNextConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=ids("<image>"),
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_grid_pinpoints=[list(p) for p in LLAVA_V16_GRID_PINPOINTS],
            image_seq_length=576,
            multimodal_projector_bias=True,
            tie_word_embeddings=False,
        )
    if model_type in ("llava_onevision", "internvl"):
        return _qwen2_based_config(model_type, text, ids, spec)
    if model_type == "qwen3_vl":
        return _qwen3_vl_config(text, ids, spec)
    text.update(
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": mrope_section_for(spec.head_dim),
        },
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    special = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    if model_type == "qwen2_vl":
        vision = dict(
            depth=spec.vision_layers,
            embed_dim=spec.vision_hidden,
            hidden_size=spec.text_hidden,  # the merger's output width = the text width
            mlp_ratio=max(spec.vision_intermediate // spec.vision_hidden, 1),
            num_heads=spec.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        out_hidden_size=spec.text_hidden,
        num_heads=spec.vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[spec.vision_layers - 1],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def _chatml_ids(ids: Any) -> dict[str, Any]:
    """The Qwen tokenizers' end and padding ids as text-config fields (no BOS)."""
    return dict(bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))


def qwen2_based_vlm_config(
    model_type: str,
    text: dict[str, Any],
    vision: dict[str, Any],
    *,
    rope_theta: float,
    image_token_id: int,
    video_token_id: int,
    tie_word_embeddings: bool,
) -> LlavaOnevisionConfig | InternVLConfig:
    """LLaVA-OneVision / InternVL: a Qwen2 language model (1D RoPE, GQA) behind a SigLIP 384/14
    tower (anyres_max_9, no CLS, last layer) or an InternViT 448/14 tower (CLS dropped, pixel
    shuffle 0.5, 256 tokens a tile). ``text``: the Qwen2 text-config fields (widths, heads, ids);
    ``vision``: the tower's ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``. Shared by the tiny models and :mod:`sparsemm_utils.real_shapes`."""
    text = dict(
        text, model_type="qwen2", use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": rope_theta}
    )
    vision = dict(vision, patch_size=14)
    if model_type == "llava_onevision":
        return LlavaOnevisionConfig(
            text_config=text,
            vision_config=dict(vision, model_type="siglip_vision_model", image_size=384, vision_use_head=False),
            image_token_index=image_token_id,
            video_token_index=video_token_id,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[list(p) for p in LLAVA_ONEVISION_PINPOINTS],
            vision_aspect_ratio="anyres_max_9",
            multimodal_projector_bias=True,
            tie_word_embeddings=tie_word_embeddings,
        )
    return InternVLConfig(
        text_config=text,
        vision_config=dict(vision, image_size=448),
        image_token_id=image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )


def qwen3_vl_vlm_config(
    text: dict[str, Any],
    vision: dict[str, Any],
    *,
    rope_theta: float,
    token_ids: Mapping[str, int],
    tie_word_embeddings: bool,
) -> Qwen3VLConfig:
    """Qwen3-VL: QK-norm, an explicit ``head_dim`` (a field of ``text``), interleaved M-RoPE; a
    16 px / merge 2 vision tower (``vision``: ``depth``, ``hidden_size``, ``intermediate_size``,
    ``num_heads``, ``out_hidden_size``) whose first blocks (up to two) also feed deepstack merges,
    added to the first decoder layers' outputs. ``token_ids``: ``image``, ``video``,
    ``vision_start``, ``vision_end``. Shared by the tiny models and :mod:`sparsemm_utils.real_shapes`."""
    text = dict(
        text,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": interleaved_mrope_section_for(text["head_dim"]),
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        vision,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=list(range(min(2, vision["depth"]))),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["image"],
        video_token_id=token_ids["video"],
        vision_start_token_id=token_ids["vision_start"],
        vision_end_token_id=token_ids["vision_end"],
        tie_word_embeddings=tie_word_embeddings,
    )


def _qwen2_based_config(model_type: str, text: dict[str, Any], ids: Any, spec: TinySpec):
    """A tiny LLaVA-OneVision / InternVL (:func:`qwen2_based_vlm_config`)."""
    text.update(max_position_embeddings=32768, rms_norm_eps=1e-6, **_chatml_ids(ids))
    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
    )
    image = "<image>" if model_type == "llava_onevision" else "<IMG_CONTEXT>"
    return qwen2_based_vlm_config(
        model_type, text, vision, rope_theta=1_000_000.0, image_token_id=ids(image), video_token_id=ids("<video>"),
        tie_word_embeddings=False,
    )


def _qwen3_vl_config(text: dict[str, Any], ids: Any, spec: TinySpec) -> Qwen3VLConfig:
    """A tiny Qwen3-VL (:func:`qwen3_vl_vlm_config`)."""
    text.update(head_dim=spec.head_dim, max_position_embeddings=32768, rms_norm_eps=1e-6, **_chatml_ids(ids))
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.text_hidden,
    )
    token_ids = {name: ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    token_ids.update(image=ids("<|image_pad|>"), video=ids("<|video_pad|>"))
    return qwen3_vl_vlm_config(text, vision, rope_theta=5_000_000.0, token_ids=token_ids, tie_word_embeddings=False)


def build_tiny_processor(
    model_type: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessorMixin:
    """The processor of a tiny model: the real family's image-processor geometry + the char tokenizer.

    Qwen: :class:`~sparsemm_utils.processors.Qwen2VLImageOnlyProcessor` (or the 2.5 one) over a
    ``Qwen2VLImageProcessorPil`` (patch 14, merge 2, temporal patch 2, ``min_pixels`` /
    ``max_pixels``). LLaVA-NeXT: ``LlavaNextProcessor`` over a ``LlavaNextImageProcessorPil`` as
    llava-v1.6's (shortest edge 336, 336x336 crops, CLIP mean/std, bicubic, the v1.6 pinpoints),
    patch 14, strategy "default", one extra CLS token from the tower (``num_additional_image_tokens=1``).
    Qwen3-VL: :class:`~sparsemm_utils.processors.Qwen3VLImageOnlyProcessor` over a
    ``Qwen2VLImageProcessorPil`` with 16 px patches and mean/std 0.5. LLaVA-OneVision:
    :class:`~sparsemm_utils.processors.LlavaOnevisionImageOnlyProcessor` over a
    ``LlavaOnevisionImageProcessorPil`` (384 x 384, the 36 pinpoints, padding), 729 base tokens,
    strategy "full", ``anyres_max_9``. InternVL:
    :class:`~sparsemm_utils.processors.InternVLImageOnlyProcessor` over a ``GotOcr2ImageProcessorPil``
    (448 px tiles, 1..12 of them plus a thumbnail, ImageNet mean/std), 256 tokens a tile.
    ``min_pixels`` / ``max_pixels`` (Qwen only; None: :func:`pixel_bounds_for`).
    """
    _check_model_type(model_type)
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer(model_type)
    if model_type == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[list(p) for p in LLAVA_V16_GRID_PINPOINTS],
            do_resize=True,
            do_center_crop=True,
            do_pad=True,
            resample=PILImageResampling.BICUBIC,
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            chat_template=LLAVA_VICUNA_CHAT_TEMPLATE,
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    if model_type == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=[list(p) for p in LLAVA_ONEVISION_PINPOINTS],
            do_resize=True,
            do_pad=True,
            resample=PILImageResampling.BICUBIC,
            image_mean=list(IMAGENET_STANDARD_MEAN),
            image_std=list(IMAGENET_STANDARD_STD),
        )
        return LlavaOnevisionImageOnlyProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(384 // 14) ** 2,
            vision_feature_select_strategy="full",
            chat_template=ONEVISION_CHAT_TEMPLATE,
            vision_aspect_ratio="anyres_max_9",
        )
    if model_type == "internvl":
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448},
            crop_to_patches=True,
            min_patches=1,
            max_patches=12,
            resample=PILImageResampling.BICUBIC,
            image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
        )
        return InternVLImageOnlyProcessor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=256, chat_template=INTERNVL_CHAT_TEMPLATE
        )
    if min_pixels is None and max_pixels is None:
        min_pixels, max_pixels = pixel_bounds_for(model_type)
    if min_pixels is None or max_pixels is None or not (0 < min_pixels <= max_pixels):
        raise InvalidTinySpecError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    qwen3 = model_type == "qwen3_vl"
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=16 if qwen3 else 14,
        merge_size=2,
        temporal_patch_size=2,
        **(dict(image_mean=list(IMAGENET_STANDARD_MEAN), image_std=list(IMAGENET_STANDARD_STD)) if qwen3 else {}),
    )
    cls = {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor}.get(
        model_type, Qwen3VLImageOnlyProcessor
    )
    template = QWEN3_VL_CHAT_TEMPLATE if qwen3 else QWEN_CHAT_TEMPLATE
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _generation_config(model_type: str, tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding that stops at the family's end tokens (docs/method.md §2)."""
    ids = tokenizer.convert_tokens_to_ids
    if model_type == "llava_next":
        return GenerationConfig(
            bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"), do_sample=False
        )
    # Qwen2-VL-Instruct's generation_config stops at <|im_end|> and <|endoftext|>; so do the Qwen-based
    # Qwen3-VL, LLaVA-OneVision and InternVL3 (ChatML tokenizers)
    return GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"), do_sample=False
    )


def build_tiny(model_type: str, *, seed: int = 0, **overrides: Any) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny random-weight ``model_type`` model (eval mode, float32, sdpa) and its processor.

    ``overrides`` are :class:`TinySpec` fields (e.g. ``text_layers=2``, ``min_pixels=...``).
    The same ``seed`` and overrides give identical weights; the global torch RNG state is restored
    afterwards.
    """
    _check_model_type(model_type)
    spec = TinySpec.from_overrides(**overrides)
    tokenizer = build_char_tokenizer(model_type, extra_chars=spec.extra_chars)
    min_pixels, max_pixels = spec.pixel_bounds(model_type)
    processor = build_tiny_processor(model_type, tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    config = tiny_config(model_type, tokenizer, spec)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SUPPORTED_MODEL_TYPES[model_type](config)
    model.set_attn_implementation("sdpa")
    model.generation_config = _generation_config(model_type, tokenizer)
    model.to(torch.float32).eval()
    return model, processor


def save_tiny(model_type: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny model (see :func:`build_tiny`) and save model + processor into ``path``, loadable
    with ``load_model(path)`` or ``from_pretrained``. Returns the folder."""
    model, processor = build_tiny(model_type, seed=seed, **overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
