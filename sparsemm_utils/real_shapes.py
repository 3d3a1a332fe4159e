"""The real models' language-model shapes (docs/method.md §1), built with random weights.

Decode speed and memory depend on a model's shapes, never on its weights' values (docs/method.md §7),
so step 06 times models of the REAL shapes with random weights: the real transformers class
(``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ...), the real
language model (widths, heads, KV heads, head_dim, vocabulary, RoPE), and a tiny vision tower
that a text-only benchmark never runs.

Two reductions make the shapes fit a CPU, each optional and recorded by the caller:

- **depth** (``layers``): keep the first few decoder layers. Every layer costs the same, so time
  and KV bytes per layer scale linearly; ratios FullKV / method are what a reduced-depth run reports.
- **vocabulary** (``vocab_size``): :func:`depth_scaled_vocab` shrinks the vocabulary by the same
  factor as the depth, so the output projection keeps its real share of a decode step (at 2 of
  Vicuna's 32 layers, the real 32064-row output layer would be 25% of the FLOPs instead of 2%).

The last :data:`RESERVED_TOKEN_IDS` ids of the vocabulary are the special tokens (EOS, padding,
the image placeholder, Qwen's vision start/end); :func:`random_prompt` draws text tokens below
them, so a prompt never contains an image token.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.kv_cache import analytic_kv_bytes
from sparsemm_utils.models import SUPPORTED_MODEL_TYPES, LoadedModel
from sparsemm_utils.patch_mapping import (
    PatchMapper,
    QwenVLGeometry,
    QwenVLPatchMapper,
    make_mapper,
)
from sparsemm_utils.processors import sparsemm_pixel_bounds
from sparsemm_utils.random_models import mrope_section_for, qwen2_based_vlm_config, qwen3_vl_vlm_config
from sparsemm_utils.validate import check_int

__all__ = [
    "RESERVED_TOKEN_IDS",
    "RealShape",
    "REAL_SHAPES",
    "UnknownRealShapeError",
    "InvalidShapeOptionError",
    "get_real_shape",
    "depth_scaled_vocab",
    "real_config",
    "build_random_model",
    "random_prompt",
    "weights_bytes",
    "PAPER_MEMORY_CONTEXT",
    "GpuMemory",
    "gpu_memory",
    "TABLE_IMAGE_SIZES",
    "image_tokens",
    "models_table",
]

#: Ids at the top of the vocabulary held by special tokens: EOS, padding, image placeholder,
#: video placeholder, vision start, vision end (the LLaVA configs use the first three).
RESERVED_TOKEN_IDS: int = 8


class UnknownRealShapeError(KeyError):
    """A model name that is not one of :data:`REAL_SHAPES` (the message lists them)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class InvalidShapeOptionError(ValueError):
    """A reduced depth, vocabulary or position count that the shape cannot take."""


@dataclass(frozen=True)
class RealShape:
    """One real model's language-model shape (docs/method.md §1) and the class that runs it.

    ``layers`` L, ``query_heads`` H, ``kv_heads`` H_kv, head_dim = hidden / H unless the checkpoint
    names its own (``attention_head_dim``: Qwen3-VL-4B has hidden 2560, 32 heads of 128);
    ``text_model_type`` is the text config's model type ("llama", "mistral", "qwen2", or the Qwen-VL
    text model);
    ``max_position_embeddings`` is the checkpoint's own (LLaVA-NeXT-Vicuna's is 4096: the paper
    still times it at 32K tokens, RoPE being computed on the fly).
    """

    name: str
    hub_id: str
    model_type: str
    text_model_type: str
    layers: int
    hidden: int
    intermediate: int
    query_heads: int
    kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    attention_head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidShapeOptionError(f"{self.name}: model_type {self.model_type!r} is not supported")
        if (self.attention_head_dim is None and self.hidden % self.query_heads) or self.query_heads % self.kv_heads:
            raise InvalidShapeOptionError(
                f"{self.name}: need hidden % query_heads == 0 (or an explicit attention_head_dim) and "
                f"query_heads % kv_heads == 0, got {self.hidden}, {self.query_heads}, {self.kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else self.hidden // self.query_heads

    def model_shape(self, layers: int | None = None) -> ModelShape:
        """(layers, query_heads, kv_heads), at full depth or ``layers``."""
        return ModelShape(self.check_layers(layers), self.query_heads, self.kv_heads)

    def check_layers(self, layers: int | None) -> int:
        """``layers`` validated against the real depth (None: the real depth)."""
        if layers is None:
            return self.layers
        return check_int(
            "layers (or None for the full depth)", layers, 1, self.layers, error=InvalidShapeOptionError,
            hint=f"{self.name} has {self.layers} decoder layers",
        )


#: Short name (the config file stem) -> shape. Values from the checkpoints' config.json.
REAL_SHAPES: Mapping[str, RealShape] = MappingProxyType(
    {
        s.name: s
        for s in (
            RealShape(
                name="llava-next-vicuna-7b", hub_id="llava-hf/llava-v1.6-vicuna-7b-hf", model_type="llava_next",
                text_model_type="llama", layers=32, hidden=4096, intermediate=11008, query_heads=32, kv_heads=32,
                vocab_size=32064, max_position_embeddings=4096, rope_theta=10_000.0, rms_norm_eps=1e-5,
            ),
            RealShape(
                name="llava-next-mistral-7b", hub_id="llava-hf/llava-v1.6-mistral-7b-hf", model_type="llava_next",
                text_model_type="mistral", layers=32, hidden=4096, intermediate=14336, query_heads=32, kv_heads=8,
                vocab_size=32064, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
            ),
            RealShape(
                name="qwen2-vl-7b", hub_id="Qwen/Qwen2-VL-7B-Instruct", model_type="qwen2_vl",
                text_model_type="qwen2_vl_text", layers=28, hidden=3584, intermediate=18944, query_heads=28,
                kv_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6,
            ),
            RealShape(
                name="qwen2-vl-2b", hub_id="Qwen/Qwen2-VL-2B-Instruct", model_type="qwen2_vl",
                text_model_type="qwen2_vl_text", layers=28, hidden=1536, intermediate=8960, query_heads=12,
                kv_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
            ),
            RealShape(
                name="qwen2.5-vl-3b", hub_id="Qwen/Qwen2.5-VL-3B-Instruct", model_type="qwen2_5_vl",
                text_model_type="qwen2_5_vl_text", layers=36, hidden=2048, intermediate=11008, query_heads=16,
                kv_heads=2, vocab_size=151936, max_position_embeddings=128000, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
            ),
            RealShape(
                name="qwen2.5-vl-7b", hub_id="Qwen/Qwen2.5-VL-7B-Instruct", model_type="qwen2_5_vl",
                text_model_type="qwen2_5_vl_text", layers=28, hidden=3584, intermediate=18944, query_heads=28,
                kv_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6,
            ),
            *(
                RealShape(
                    name=f"qwen3-vl-{size}", hub_id=f"Qwen/Qwen3-VL-{size.upper()}-Instruct", model_type="qwen3_vl",
                    text_model_type="qwen3_vl_text", layers=layers, hidden=hidden, intermediate=intermediate,
                    query_heads=heads, kv_heads=8, vocab_size=151936, max_position_embeddings=262144,
                    rope_theta=5_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_head_dim=128,
                )
                for size, layers, hidden, intermediate, heads, tie in (
                    ("2b", 28, 2048, 6144, 16, True),
                    ("4b", 36, 2560, 9728, 32, True),
                    ("8b", 36, 4096, 12288, 32, False),
                )
            ),
            RealShape(
                name="llava-onevision-qwen2-0.5b", hub_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                model_type="llava_onevision", text_model_type="qwen2", layers=24, hidden=896, intermediate=4864,
                query_heads=14, kv_heads=2, vocab_size=152000, max_position_embeddings=32768,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            ),
            RealShape(
                name="llava-onevision-qwen2-7b", hub_id="llava-hf/llava-onevision-qwen2-7b-ov-hf",
                model_type="llava_onevision", text_model_type="qwen2", layers=28, hidden=3584, intermediate=18944,
                query_heads=28, kv_heads=4, vocab_size=152128, max_position_embeddings=32768,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            ),
            *(
                # InternVL3's language models are Qwen2.5 (0.5B, 1.5B, 7B, 14B, 32B, 72B)
                RealShape(
                    name=f"internvl3-{size}", hub_id=f"OpenGVLab/InternVL3-{size.upper()}-hf", model_type="internvl",
                    text_model_type="qwen2", layers=layers, hidden=hidden, intermediate=intermediate,
                    query_heads=heads, kv_heads=kv_heads, vocab_size=151674, max_position_embeddings=32768,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                )
                for size, layers, hidden, intermediate, heads, kv_heads in (
                    ("1b", 24, 896, 4864, 14, 2),
                    ("2b", 28, 1536, 8960, 12, 2),
                    ("8b", 28, 3584, 18944, 28, 4),
                    ("14b", 48, 5120, 13824, 40, 8),
                    ("38b", 64, 5120, 27648, 40, 8),
                    ("78b", 80, 8192, 29568, 64, 8),
                )
            ),
        )
    }
)


def get_real_shape(name: str | RealShape) -> RealShape:
    """The shape named by a short name (``"qwen2-vl-7b"``), a hub id (``"Qwen/Qwen2-VL-7B-Instruct"``)
    or a local folder named after the hub repo; case-insensitive."""
    if isinstance(name, RealShape):
        return name
    if isinstance(name, str) and name.strip():
        key = name.strip().rstrip("/").lower()
        for shape in REAL_SHAPES.values():
            if key in (shape.name, shape.hub_id.lower()) or key.rsplit("/", 1)[-1] == shape.hub_id.split("/")[1].lower():
                return shape
    raise UnknownRealShapeError(
        f"unknown real model {name!r}: known shapes are {', '.join(REAL_SHAPES)} (short names) or their hub ids "
        f"({', '.join(s.hub_id for s in REAL_SHAPES.values())})"
    )


def depth_scaled_vocab(shape: RealShape, layers: int | None) -> int:
    """The vocabulary that keeps the output projection's real share of a decode step at ``layers``
    of ``shape.layers`` layers: ceil(V x layers / L), at least ``RESERVED_TOKEN_IDS + 8``.

    Example: LLaVA-NeXT-Vicuna-7B (V = 32064, L = 32) at 2 layers: ceil(32064 x 2 / 32) = 2004."""
    layers = shape.check_layers(layers)
    return max(math.ceil(shape.vocab_size * layers / shape.layers), RESERVED_TOKEN_IDS + 8)


def _special_ids(vocab_size: int) -> dict[str, int]:
    top = vocab_size - 1
    return {"eos": top, "pad": top - 1, "image": top - 2, "video": top - 3, "vision_start": top - 4, "vision_end": top - 5}


#: A tiny vision tower (the text-only benchmark never runs it): width 32, one layer, two heads.
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def real_config(
    shape: RealShape | str,
    *,
    layers: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
):
    """The model config of ``shape`` (its VLM class's config), with a tiny vision tower.

    Args:
        shape: a :class:`RealShape` or its name.
        layers: decoder layers to keep (None: all).
        vocab_size: None for the real vocabulary, or a smaller one (see :func:`depth_scaled_vocab`).
        max_position_embeddings: None for the checkpoint's own; a larger value lets a benchmark time
            contexts beyond it (RoPE is computed on the fly, so speed is unaffected).
    """
    shape = get_real_shape(shape)
    layers = shape.check_layers(layers)
    vocab = shape.vocab_size if vocab_size is None else vocab_size
    vocab = check_int("vocab_size", vocab, RESERVED_TOKEN_IDS + 8, error=InvalidShapeOptionError)
    positions = shape.max_position_embeddings if max_position_embeddings is None else max_position_embeddings
    positions = check_int("max_position_embeddings", positions, 1, error=InvalidShapeOptionError)
    ids = _special_ids(vocab)
    text: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.query_heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=positions,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=shape.tie_word_embeddings,
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        bos_token_id=None,
    )
    if shape.model_type in ("llava_onevision", "internvl"):
        return qwen2_based_vlm_config(
            shape.model_type, text, _TINY_VISION, rope_theta=shape.rope_theta, image_token_id=ids["image"],
            video_token_id=ids["video"], tie_word_embeddings=shape.tie_word_embeddings,
        )
    if shape.model_type == "qwen3_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden)
        return qwen3_vl_vlm_config(
            dict(text, head_dim=shape.head_dim), vision, rope_theta=shape.rope_theta, token_ids=ids,
            tie_word_embeddings=shape.tie_word_embeddings,
        )
    if shape.model_type == "llava_next":
        text.update(model_type=shape.text_model_type, rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta})
        if shape.text_model_type == "mistral":
            text["sliding_window"] = None
        vision = dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=336, patch_size=14, projection_dim=32, hidden_act="quick_gelu",
        )
        return LlavaNextConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=ids["image"],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=shape.tie_word_embeddings,
        )
    text.update(
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
            "mrope_section": mrope_section_for(shape.head_dim),
        },
    )
    special = dict(
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    if shape.model_type == "qwen2_vl":
        vision = dict(
            depth=1, embed_dim=32, hidden_size=shape.hidden, mlp_ratio=2, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=shape.hidden, num_heads=2, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0], tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def build_random_model(
    shape: RealShape | str,
    *,
    layers: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A model of ``shape`` with random weights (the class's own init), built directly on ``device``
    in ``dtype``, eval mode, sdpa attention; same ``seed``, same weights (the global RNG is left as
    it was). The :class:`~sparsemm_utils.models.LoadedModel` has no processor: benchmark prompts
    are token ids (:func:`random_prompt`). Options as in :func:`real_config`."""
    shape = get_real_shape(shape)
    config = real_config(shape, layers=layers, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)
    config._attn_implementation = "sdpa"
    device = torch.device(device)
    cls = SUPPORTED_MODEL_TYPES[shape.model_type]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )
    model.eval()
    depth = shape.check_layers(layers)
    suffix = "" if depth == shape.layers else f", {depth} of {shape.layers} layers"
    return LoadedModel(
        model=model, processor=None, model_type=shape.model_type, name_or_path=f"random weights ({shape.name}{suffix})"
    )


def random_prompt(loaded: LoadedModel, length: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A text-only prompt of ``length`` random token ids below the reserved special ids:
    ``{"input_ids": (1, length) int64, "attention_mask": (1, length) ones}`` on the model's device."""
    length = check_int("prompt length", length, 1, error=InvalidShapeOptionError)
    vocab = int(loaded.text_config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - RESERVED_TOKEN_IDS, (1, length), generator=generator)
    return {"input_ids": ids.to(loaded.device), "attention_mask": torch.ones_like(ids).to(loaded.device)}


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


#: The paper's longest measured context (docs/method.md §7): 32K prompt tokens + 512 generated.
PAPER_MEMORY_CONTEXT: int = 32768 + 512


@dataclass(frozen=True)
class GpuMemory:
    """What a model of a shape needs on the GPU at ``context`` tokens, from its shapes alone.

    ``text_weights_bytes``: the language model and its output layer (the real vocabulary, tied
    embeddings counted once) in ``dtype``; ``full_kv_bytes``: the uncompressed KV cache,
    ``layers x kv_heads x context x head_dim x 2`` elements (docs/method.md §7). The vision tower
    is NOT included (its size is not part of :class:`RealShape`; InternVL3-38B / 78B's is
    InternViT-6B), nor activations."""

    name: str
    context: int
    dtype: str
    text_parameters: int
    text_weights_bytes: int
    full_kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.text_weights_bytes + self.full_kv_bytes

    def line(self) -> str:
        """One line for a config's header: GiB of weights, KV cache and their sum."""
        gib = 2**30
        return (
            f"GPU memory ({self.dtype}, {self.context} tokens, vision tower and activations not counted): "
            f"{self.text_weights_bytes / gib:.1f} GiB language-model weights ({self.text_parameters / 1e9:.2f} B "
            f"parameters) + {self.full_kv_bytes / gib:.1f} GiB full KV cache = {self.total_bytes / gib:.1f} GiB"
        )


def gpu_memory(shape: RealShape | str, context: int = PAPER_MEMORY_CONTEXT, dtype: torch.dtype = torch.bfloat16) -> GpuMemory:
    """:class:`GpuMemory` of ``shape`` at ``context`` tokens: the language model is built on the
    meta device (no memory) from :func:`real_config` at full depth and vocabulary and its
    parameters counted; the KV bytes are :func:`~sparsemm_utils.kv_cache.analytic_kv_bytes` of
    every KV head storing ``context`` tokens."""
    shape = get_real_shape(shape)
    context = check_int("context", context, 1, error=InvalidShapeOptionError)
    config = real_config(shape)
    with torch.device("meta"):
        model = SUPPORTED_MODEL_TYPES[shape.model_type]._from_config(config, dtype=dtype)
    text_parts = (model.model.language_model, model.lm_head)
    unique = {id(p): p for part in text_parts for p in part.parameters()}
    parameters = sum(p.numel() for p in unique.values())
    element = torch.empty((), dtype=dtype).element_size()
    stored = np.full((shape.layers, shape.kv_heads), context, dtype=np.int64)
    return GpuMemory(
        name=shape.name,
        context=context,
        dtype=str(dtype).removeprefix("torch."),
        text_parameters=parameters,
        text_weights_bytes=parameters * element,
        full_kv_bytes=analytic_kv_bytes(stored, shape.head_dim, dtype),
    )


#: The image sizes (width, height) of the supported-models table: the hand-worked 1000 x 700 image
#: of the mapping tests and a US-letter page scanned at 200 dpi (DocVQA's pages are of that order).
TABLE_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((1000, 700), (1700, 2200))


def _original_mapper(model_type: str) -> PatchMapper:
    """The mapper of ``model_type`` with the processor settings the configs use: the original's
    (Qwen2-VL / 2.5-VL, LLaVA-NeXT) or the checkpoint's own (OneVision, InternVL); Qwen3-VL with
    SparseMM's bounds counted in its 32 px tokens (docs/method.md §3)."""
    if model_type == "qwen3_vl":
        return QwenVLPatchMapper(QwenVLGeometry(16, 2, *sparsemm_pixel_bounds(32)))
    return make_mapper(model_type)


def image_tokens(model_type: str, width: int, height: int) -> int:
    """Image tokens the language model sees for a ``width x height`` image (step 02's geometry,
    which the tests check against each processor's own count)."""
    return _original_mapper(model_type).num_tokens(width, height)


def models_table() -> list[str]:
    """The supported-models table of docs/models.md, as markdown lines: one row per config'd real
    shape (model, class, layers x heads x KV heads, head_dim, image tokens at
    :data:`TABLE_IMAGE_SIZES`, GPU memory of :func:`gpu_memory`)."""
    sizes = " / ".join(f"{w} x {h}" for w, h in TABLE_IMAGE_SIZES)
    lines = [
        f"| model | class | layers x heads x KV heads | head_dim | image tokens ({sizes}) | GPU GiB (weights + KV at 32K) |",
        "|---|---|---|---|---|---|",
    ]
    for shape in REAL_SHAPES.values():
        if shape.name == "qwen2-vl-2b":  # a step 06 timing shape only, no config
            continue
        tokens = " / ".join(str(image_tokens(shape.model_type, w, h)) for w, h in TABLE_IMAGE_SIZES)
        memory = gpu_memory(shape)
        gib = 2**30
        lines.append(
            f"| [{shape.name}](../configs/{shape.name}.yaml) `{shape.hub_id}` | {SUPPORTED_MODEL_TYPES[shape.model_type].__name__} "
            f"| {shape.layers} x {shape.query_heads} x {shape.kv_heads} | {shape.head_dim} | {tokens} "
            f"| {memory.text_weights_bytes / gib:.1f} + {memory.full_kv_bytes / gib:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsemm_utils.real_shapes [NAME ...]``: each shape's layers x heads x KV heads and
    :func:`gpu_memory` line (all shapes when no name is given); ``--table``: :func:`models_table`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="*", help="short names or hub ids (default: every known shape)")
    parser.add_argument("--context", type=int, default=PAPER_MEMORY_CONTEXT)
    parser.add_argument("--table", action="store_true", help="print docs/models.md's supported-models table")
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(models_table()))
        return 0
    for name in args.names or list(REAL_SHAPES):
        shape = get_real_shape(name)
        print(f"{shape.name} ({shape.hub_id}): {shape.layers} x {shape.query_heads} x {shape.kv_heads}, "
              f"head_dim {shape.head_dim}")
        print(f"  {gpu_memory(shape, args.context).line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
