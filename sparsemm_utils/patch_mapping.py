"""The patch mapping: an OCR box onto the visual-token positions the LLM sees (docs/method.md §3).

SparseMM scores a head when its strongest attention for an output token lands inside the
*region* of the chunk that token was read from. A region is the set of visual-token positions
that cover the chunk's OCR box. This module computes those positions for the supported
architectures, as docs/method.md §3 states the rule (the newer families: docs/models.md):

- **Qwen2-VL / Qwen2.5-VL** (:class:`QwenVLPatchMapper`): the processor resizes the image to
  multiples of 28 px within ``[min_pixels, max_pixels]`` (``smart_resize``); the LLM sees one
  token per 28 x 28 block (14 px patches merged 2 x 2), row-major, no newline tokens. A box is
  scaled by resized/original size (in exact rational arithmetic), rows ``floor(y0/28) .. floor(y1/28)``
  and columns ``floor(x0/28) .. floor(x1/28)`` (inclusive) are marked; position ``row * grid_w + col``.
- **LLaVA-NeXT** (:class:`LlavaNextPatchMapper`, anyres + spatial_unpad): the image block is
  the base image (24 x 24 = 576 tokens for a 336 px CLIP) followed by the unpadded crop grid of
  ``H' x W'`` tokens with one newline token after each row. The original maps a box onto the
  crop grid only, with pixels per token by integer floor division of the ORIGINAL image size
  (``p_w = W_img // W'``, ``p_h = H_img // H'``); position ``576 + row * (W' + 1) + col``.
  The named variant ``"base_and_crop"`` also marks the base-grid tokens under the box.

The original has no script for the newer models; each gets the rule above that fits its layout
(docs/models.md):

- **Qwen3-VL** (:class:`QwenVLPatchMapper` over a :class:`QwenVLGeometry` with 16 px patches):
  Qwen's rule on 32 px blocks. Deepstack adds vision features to the hidden states of these same
  positions in the first decoder layers and adds no token; frame timestamps belong to videos.
- **LLaVA-OneVision** (:class:`LlavaOnevisionPatchMapper`): LLaVA-NeXT's rule on the crop grid
  after the anyres-max shrink; 729 base tokens (SigLIP 384/14, no CLS) come first.
- **InternVL** (:class:`InternVLPatchMapper`): Qwen's 28 px block rule on the tiled canvas,
  read tile by tile (256 tokens a tile); ``"base_and_crop"`` adds the thumbnail's tokens.

Positions are **relative to the first image token** (int64 arrays of shape ``(k,)``, sorted,
unique, in ``[0, num_tokens)``); the absolute position in the prompt is
``image_token_start + position`` where ``image_token_start`` is the index of the first image
token in the OCR prompt's ``input_ids`` (:func:`map_documents` records it per document).

Box conventions. A box is ``(x0, y0, x1, y1)`` in original-image pixels (floats allowed), as in
the SynthDoG field ``coord = [[xmin, ymin], [xmax, ymax]]``. The image is the closed rectangle
``[0, W] x [0, H]``. A box that sticks out of the image is clipped to it first; a box with no
point in the image raises :class:`BoxOutsideImageError`; an inverted box (``x1 < x0`` or
``y1 < y0``) or a non-finite coordinate raises :class:`InvalidBoxError`. A degenerate box (zero
width and/or height) that lies in the image still maps to the token(s) under it: the rule is
inclusive on both ends, so a point maps to exactly one token. Indices reaching ``grid_w`` /
``grid_h`` (a box touching the right or bottom edge) are clipped to the last row/column.
Floor division is Python's ``//`` on the (scaled) float coordinates, as in the original scripts
(``visual_head/qwen_visual_head.py``, ``llava_visual_head.py``).

One deliberate difference from the original code: it marks ``flag[start:end]`` with
``start = x0 // p``, so a box lying entirely beyond the last full token (LLaVA-NeXT: ``x0 >=
W' * p_w``, i.e. inside the ``W mod W'`` leftover strip; Qwen: ``x0 == W``) gets an empty slice
there, i.e. an empty region. Here the indices are clipped to the grid instead, so every in-image
box has at least one token; any box with a pixel left of that strip maps identically.

Step 02 itself (its config, ``regions.jsonl``, the report and the findings) is
:mod:`sparsemm_utils.steps.patch_mapping`; :func:`load_regions` reads its ``regions.jsonl``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from tqdm.auto import tqdm

from . import prompts
from .validate import check_int, is_int

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PatchMappingError",
    "UnsupportedModelTypeError",
    "InvalidBoxError",
    "BoxOutsideImageError",
    "InvalidImageSizeError",
    "InvalidGeometryError",
    "TokenCountMismatchError",
    "Box",
    "QwenVLGeometry",
    "LlavaNextGeometry",
    "LlavaOnevisionGeometry",
    "InternVLGeometry",
    "QwenVLPatchMapper",
    "LlavaNextPatchMapper",
    "LlavaOnevisionPatchMapper",
    "InternVLPatchMapper",
    "PatchMapper",
    "Geometry",
    "MAPPER_FAMILY",
    "ARITHMETICS",
    "check_model_type",
    "geometry_from_processor",
    "make_mapper",
    "mapper_from_processor",
    "chunk_box",
    "compare_with_processors",
    "map_document",
    "map_documents",
    "load_regions",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl", "llava_onevision", "internvl")
QWEN_MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: The mapper family (``mapper.family``) of each model type.
MAPPER_FAMILY: dict[str, str] = {
    "qwen2_vl": "qwen_vl",
    "qwen2_5_vl": "qwen_vl",
    "qwen3_vl": "qwen_vl",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "internvl": "internvl",
}

# The original SparseMM settings (docs/method.md §3): min/max pixels for Qwen, llava-v1.6 pinpoints.
QWEN_ORIGINAL_MIN_PIXELS = 32 * 28 * 28
QWEN_ORIGINAL_MAX_PIXELS = 16384 * 28 * 28
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
#: LLaVA-OneVision's pinpoints: every (h, w) with h, w in 384 x {1, ..., 6}, rows first.
LLAVA_ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)
)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class PatchMappingError(ValueError):
    """Base class of every error raised by the patch mapping (step 02)."""


class UnsupportedModelTypeError(PatchMappingError):
    """The model type is not one of :data:`SUPPORTED_MODEL_TYPES`."""


class InvalidBoxError(PatchMappingError):
    """A box is malformed: wrong shape, non-finite, or inverted (x1 < x0 or y1 < y0)."""


class BoxOutsideImageError(InvalidBoxError):
    """A box has no point inside the image rectangle ``[0, W] x [0, H]``."""


class InvalidImageSizeError(PatchMappingError):
    """The image size cannot be processed (non-positive, too small, or too elongated)."""


class InvalidGeometryError(PatchMappingError):
    """Geometry settings are inconsistent (e.g. pinpoints not multiples of the crop size)."""


class TokenCountMismatchError(PatchMappingError):
    """The mapping's token count disagrees with the processor's for the same image."""


def check_model_type(model_type: str) -> str:
    """Return ``model_type`` if supported, else raise :class:`UnsupportedModelTypeError`."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelTypeError(
            f"unsupported model type {model_type!r}: the patch mapping (docs/method.md §3) supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use the `model_type` of the model's config "
            f"(e.g. LoadedModel.model_type)."
        )
    return model_type


def _check_image_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` as ints, each a whole number of pixels >= 1."""
    return (
        check_int("image width", width, 1, error=InvalidImageSizeError),
        check_int("image height", height, 1, error=InvalidImageSizeError),
    )


# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x0, y0, x1, y1)`` in original-image pixels, ``x0 <= x1``, ``y0 <= y1``.

    Build one from the SynthDoG layout with :meth:`from_coord` (``[[xmin, ymin], [xmax, ymax]]``)
    or from any 4-sequence with :meth:`parse`.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        for name, value in zip(("x0", "y0", "x1", "y1"), values):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InvalidBoxError(f"box coordinate {name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise InvalidBoxError(f"box coordinate {name} must be finite, got {value!r} in {values}")
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise InvalidBoxError(
                f"inverted box (x0={self.x0}, y0={self.y0}, x1={self.x1}, y1={self.y1}): need "
                f"x0 <= x1 and y0 <= y1; coord must be [[xmin, ymin], [xmax, ymax]]"
            )

    @classmethod
    def from_coord(cls, coord: Sequence[Sequence[float]]) -> Box:
        """From ``[[xmin, ymin], [xmax, ymax]]`` (the SynthDoG ``coord`` field, docs/method.md §2)."""
        try:
            (x0, y0), (x1, y1) = coord
        except (TypeError, ValueError) as exc:
            raise InvalidBoxError(
                f"coord must be [[xmin, ymin], [xmax, ymax]], got {coord!r}"
            ) from exc
        return cls(x0, y0, x1, y1)

    @classmethod
    def parse(cls, box: Box | Sequence[float] | Sequence[Sequence[float]]) -> Box:
        """Accept a :class:`Box`, ``(x0, y0, x1, y1)`` or ``[[x0, y0], [x1, y1]]``."""
        if isinstance(box, Box):
            return box
        if isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, np.ndarray)):
            raise InvalidBoxError(f"a box must be (x0, y0, x1, y1) or [[x0, y0], [x1, y1]], got {box!r}")
        if len(box) == 2:
            return cls.from_coord(box)  # type: ignore[arg-type]
        if len(box) == 4:
            return cls(*box)  # type: ignore[arg-type]
        raise InvalidBoxError(f"a box must be (x0, y0, x1, y1) or [[x0, y0], [x1, y1]], got {box!r}")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (float(self.x0), float(self.y0), float(self.x1), float(self.y1))

    def clip_to_image(self, width: int, height: int) -> Box:
        """This box intersected with ``[0, W] x [0, H]``; :class:`BoxOutsideImageError` if empty."""
        if self.x1 < 0 or self.y1 < 0 or self.x0 > width or self.y0 > height:
            raise BoxOutsideImageError(
                f"box {self.as_tuple()} lies entirely outside the {width}x{height} (W x H) image "
                f"[0, {width}] x [0, {height}]: check that the box is in original-image pixels of "
                f"this image"
            )
        return Box(
            min(max(self.x0, 0), width),
            min(max(self.y0, 0), height),
            min(max(self.x1, 0), width),
            min(max(self.y1, 0), height),
        )


def _index_range(lo: float, hi: float, step: float, n: int) -> np.ndarray:
    """Inclusive ``lo // step .. hi // step`` clipped to ``[0, n - 1]``; shape ``(k,)``.

    Python's floor division, as the original code does it (``x // step`` is exact for floats,
    unlike ``floor(x / step)`` whose quotient can round up to the next integer).
    """
    first = min(max(int(lo // step), 0), n - 1)
    last = min(max(int(hi // step), 0), n - 1)
    return np.arange(first, last + 1, dtype=np.int64)


#: How a box coordinate is scaled onto a resized grid: ``"exact"`` (rational arithmetic, the
#: default) or ``"float64"`` (the original's ``x * (resized / original)``; docs/deviations.md).
ARITHMETICS: tuple[str, ...] = ("exact", "float64")


def _exact(value: float) -> Fraction:
    """A box coordinate as the exact rational it stores (every float is a dyadic rational)."""
    return Fraction(int(value)) if isinstance(value, (int, np.integer)) else Fraction(float(value))


def _scaled_index_range(lo: float, hi: float, scale: Fraction, step: int, n: int, arithmetic: str) -> np.ndarray:
    """:func:`_index_range` of ``lo * scale .. hi * scale`` (``scale = resized / original``, a
    rational); shape ``(k,)``. ``"exact"``: ``floor(lo * scale / step)`` in rational arithmetic, so
    a coordinate that scales exactly onto a token boundary lands in the token that starts there;
    ``"float64"``: the original's ``(lo * (resized / original)) // step`` in float64, which can land
    just below the boundary, one token low (docs/deviations.md, "Qwen mapping in exact arithmetic")."""
    if arithmetic == "float64":
        return _index_range(lo * float(scale), hi * float(scale), step, n)
    first = min(max(math.floor(_exact(lo) * scale / step), 0), n - 1)
    last = min(max(math.floor(_exact(hi) * scale / step), 0), n - 1)
    return np.arange(first, last + 1, dtype=np.int64)


def _check_arithmetic(arithmetic: str) -> None:
    if arithmetic not in ARITHMETICS:
        raise PatchMappingError(f"unknown mapping arithmetic {arithmetic!r}; choose one of {ARITHMETICS}")


def _flat(rows: np.ndarray, cols: np.ndarray, stride: int, offset: int = 0) -> np.ndarray:
    """``offset + row * stride + col`` for every (row, col) pair, row-major; shape ``(R*C,)``."""
    return (offset + rows[:, None] * stride + cols[None, :]).reshape(-1).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Geometry: how many tokens an image becomes, and on what grid
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenVLGeometry:
    """Qwen2-VL / Qwen2.5-VL image geometry (docs/method.md §3).

    The image processor resizes ``(H, W)`` with ``smart_resize`` to multiples of
    ``factor = patch_size * merge_size`` (28) whose area lies in ``[min_pixels, max_pixels]``;
    the vision tower cuts 14 px patches and merges 2 x 2 of them, so the LLM sees
    ``(H_r / 28) x (W_r / 28)`` tokens, row-major, no newline tokens. Defaults are the original
    SparseMM settings (``min_pixels = 32 * 28^2``, ``max_pixels = 16384 * 28^2``); use
    :func:`geometry_from_processor` to pick up a processor's own settings.
    """

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = QWEN_ORIGINAL_MIN_PIXELS
    max_pixels: int = QWEN_ORIGINAL_MAX_PIXELS

    MAX_ASPECT_RATIO: ClassVar[float] = 200.0

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "min_pixels", "max_pixels"):
            check_int(f"QwenVLGeometry.{name}", getattr(self, name), 1, error=InvalidGeometryError)
        if self.min_pixels > self.max_pixels:
            raise InvalidGeometryError(
                f"QwenVLGeometry.min_pixels ({self.min_pixels}) must not exceed max_pixels "
                f"({self.max_pixels})"
            )

    @property
    def factor(self) -> int:
        """Pixels per LLM token along each side: ``patch_size * merge_size`` (28)."""
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_r, W_r)``: transformers' ``smart_resize`` (Qwen2-VL image processor), mirrored.

        Both sides become multiples of :attr:`factor`; the area is brought into
        ``[min_pixels, max_pixels]`` keeping the aspect ratio as closely as possible.
        """
        width, height = _check_image_size(width, height)
        factor = self.factor
        if max(height, width) / min(height, width) > self.MAX_ASPECT_RATIO:
            raise InvalidImageSizeError(
                f"image {width}x{height} (W x H) has aspect ratio "
                f"{max(height, width) / min(height, width):.1f} > 200, which the Qwen2-VL "
                f"processor rejects; crop or pad the image first"
            )
        h_bar = round(height / factor) * factor
        w_bar = round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(grid_h, grid_w)`` in LLM tokens (merged patches)."""
        h_r, w_r = self.resized_size(height, width)
        return h_r // self.factor, w_r // self.factor

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens in the LLM sequence: ``grid_h * grid_w``."""
        grid_h, grid_w = self.grid(height, width)
        return grid_h * grid_w


@dataclass(frozen=True)
class LlavaNextGeometry:
    """LLaVA-NeXT anyres + spatial_unpad geometry (docs/method.md §3).

    The image block in the LLM sequence is ``base_grid^2`` base-image tokens (the image squashed
    to ``base_size`` px; 24 x 24 = 576 for a 336 px CLIP with 14 px patches), then the crop grid:
    the image is resized into the best pinpoint resolution (``select_best_resolution``), padded,
    cut into ``base_size`` crops of ``base_grid x base_grid`` tokens each, and the padding rows
    or columns are removed (``unpad_image``), leaving ``H' x W'`` tokens; one newline token
    follows each row. ``num_tokens = base_grid^2 + H' * (W' + 1)``.

    All sizes follow transformers (``LlavaNextProcessor._get_number_of_features``,
    ``get_anyres_image_grid_shape``, ``unpad_image``), including the ``int(round(x, 7))``
    rounding and the symmetric ``(current - new) // 2`` padding.
    """

    base_size: int = 336
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.base_size % self.patch_size:
            raise InvalidGeometryError(
                f"LlavaNextGeometry.base_size ({self.base_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        self._check_pinpoints()

    def _check_sizes(self) -> None:
        """``base_size`` and ``patch_size`` are positive ints."""
        check_int(f"{type(self).__name__}.base_size", self.base_size, 1, error=InvalidGeometryError)
        check_int(f"{type(self).__name__}.patch_size", self.patch_size, 1, error=InvalidGeometryError)

    def _check_pinpoints(self) -> None:
        """``grid_pinpoints`` is a non-empty sequence of ``(height, width)`` multiples of
        ``base_size``; stored as a tuple of int pairs (hashable, comparable)."""
        name = type(self).__name__
        try:
            pinpoints = tuple((int(h), int(w)) for h, w in self.grid_pinpoints)
        except (TypeError, ValueError) as exc:
            raise InvalidGeometryError(
                f"{name}.grid_pinpoints must be a list of (height, width) pairs, got {self.grid_pinpoints!r}"
            ) from exc
        if not pinpoints:
            raise InvalidGeometryError(f"{name}.grid_pinpoints must not be empty")
        for h, w in pinpoints:
            if h <= 0 or w <= 0 or h % self.base_size or w % self.base_size:
                raise InvalidGeometryError(
                    f"every grid pinpoint must be a positive multiple of base_size "
                    f"({self.base_size}) on both sides, got {(h, w)} in {pinpoints}"
                )
        object.__setattr__(self, "grid_pinpoints", pinpoints)

    @property
    def base_grid(self) -> int:
        """Tokens per side of the base image and of each crop: ``base_size // patch_size`` (24)."""
        return self.base_size // self.patch_size

    @property
    def base_tokens(self) -> int:
        """Tokens of the base image block: ``base_grid ** 2`` (576)."""
        return self.base_grid**2

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the chosen pinpoint: transformers' ``select_best_resolution``.

        Maximise the effective resolution ``min(downscaled area, original area)``, then
        minimise the wasted area; the first pinpoint wins ties.
        """
        width, height = _check_image_size(width, height)
        best_fit: tuple[int, int] | None = None
        max_effective = 0
        min_wasted = float("inf")
        for pin_h, pin_w in self.grid_pinpoints:
            scale = min(pin_w / width, pin_h / height)
            down_w, down_h = int(width * scale), int(height * scale)
            effective = min(down_w * down_h, width * height)
            wasted = pin_w * pin_h - effective
            if effective > max_effective or (effective == max_effective and wasted < min_wasted):
                max_effective = effective
                min_wasted = wasted
                best_fit = (pin_h, pin_w)
        if best_fit is None:  # only when every pinpoint downscales the image to 0 px
            raise InvalidImageSizeError(
                f"image {width}x{height} (W x H) is too elongated for every grid pinpoint "
                f"{self.grid_pinpoints}"
            )
        return best_fit

    def padded_grid(self, height: int, width: int) -> tuple[int, int]:
        """Crop-grid size in tokens before unpadding: ``(best_h / base_size * base_grid, ...)``."""
        best_h, best_w = self.best_resolution(height, width)
        return (best_h // self.base_size) * self.base_grid, (best_w // self.base_size) * self.base_grid

    def unpadded_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')``: the crop grid after ``unpad_image`` (padding removed symmetrically)."""
        cur_h, cur_w = self.padded_grid(height, width)
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= ((cur_h - new_h) // 2) * 2
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= ((cur_w - new_w) // 2) * 2
        if cur_h <= 0 or cur_w <= 0:
            raise InvalidImageSizeError(
                f"image {width}x{height} (W x H) unpads to an empty {cur_h}x{cur_w} crop grid"
            )
        return cur_h, cur_w

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Alias of :meth:`unpadded_grid`: ``(H', W')`` crop-grid tokens (newlines excluded)."""
        return self.unpadded_grid(height, width)

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens in the LLM sequence: ``base_grid^2 + H' * (W' + 1)``."""
        grid_h, grid_w = self.unpadded_grid(height, width)
        return self.base_tokens + grid_h * (grid_w + 1)


@dataclass(frozen=True)
class LlavaOnevisionGeometry(LlavaNextGeometry):
    """LLaVA-OneVision anyres-max geometry (docs/method.md §3): LLaVA-NeXT's, with three changes.

    - SigLIP 384 px with 14 px patches: ``base_grid = 384 // 14 = 27`` (the tower's last 6 px are
      not a whole patch), 729 base tokens and no CLS (``vision_feature_select_strategy="full"``).
    - The pinpoints are every 384 px multiple from 1 x 1 to 6 x 6 crops.
    - ``anyres_max_9``: when the unpadded crop grid ``H' x W'`` holds more than ``max_num_patches``
      crops' worth of tokens (``ratio = sqrt(H' W' / (9 * 27^2)) > 1.1``), it is shrunk
      (bilinear) to ``int(H' // ratio) x int(W' // ratio)`` before the newline tokens are added.

    The image block is then ``729`` base tokens followed by the (shrunk) crop grid with one newline
    after each row: ``num_tokens = 729 + H'' * (W'' + 1)``. Sizes follow transformers
    (``LlavaOnevisionProcessor._get_number_of_features``, ``LlavaOnevisionModel.pack_image_features``).
    """

    base_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_ONEVISION_PINPOINTS
    max_num_patches: int = 9

    #: The shrink applies only above this ratio (transformers' ``ratio > 1.1``).
    SHRINK_ABOVE: ClassVar[float] = 1.1

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.base_size < self.patch_size:
            raise InvalidGeometryError(
                f"LlavaOnevisionGeometry.base_size ({self.base_size}) must be at least patch_size ({self.patch_size})"
            )
        check_int("LlavaOnevisionGeometry.max_num_patches", self.max_num_patches, 1, error=InvalidGeometryError)
        self._check_pinpoints()

    def unpadded_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(H'', W'')``: LLaVA-NeXT's unpadded crop grid, shrunk by the anyres-max rule."""
        grid_h, grid_w = super().unpadded_grid(height, width)
        ratio = math.sqrt(grid_h * grid_w / (self.max_num_patches * self.base_grid**2))
        if ratio > self.SHRINK_ABOVE:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
        if grid_h <= 0 or grid_w <= 0:
            raise InvalidImageSizeError(f"image {width}x{height} (W x H) shrinks to an empty {grid_h}x{grid_w} crop grid")
        return grid_h, grid_w


@dataclass(frozen=True)
class InternVLGeometry:
    """InternVL dynamic-tiling geometry (docs/method.md §3).

    The image processor picks a grid of ``cols x rows`` tiles (1 <= cols * rows <= 12) whose
    aspect ratio is closest to the image's (``get_optimal_tiled_canvas``: first the smallest ratio
    difference in order of tile count, a tie going to the larger grid while the image's area exceeds
    half the grid's), resizes the image to ``cols * 448 x rows * 448`` and cuts it into 448 px tiles,
    row-major; when there is more than one tile, the whole image squashed to 448 x 448 follows as a
    thumbnail. The vision tower cuts 14 px patches (32 x 32 a tile) and its pixel shuffle merges
    2 x 2 of them, so each tile (and the thumbnail) becomes ``tokens_per_side^2 = 16^2 = 256``
    tokens, row-major, each covering a ``cell = 448 / 16 = 28`` px block of its tile. No newline
    tokens; the block is ``<img>`` + tiles + thumbnail + ``</img>``, and only the ``<IMG_CONTEXT>``
    tokens between are image tokens: ``num_tokens = (cols * rows + thumbnail) * 256``.
    """

    tile_size: int = 448
    tokens_per_side: int = 16
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    crop_to_patches: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_size", "tokens_per_side", "min_tiles", "max_tiles"):
            check_int(f"InternVLGeometry.{name}", getattr(self, name), 1, error=InvalidGeometryError)
        if self.tile_size % self.tokens_per_side:
            raise InvalidGeometryError(
                f"InternVLGeometry.tile_size ({self.tile_size}) must be a multiple of tokens_per_side "
                f"({self.tokens_per_side}) so that every token covers a whole block"
            )
        if self.min_tiles > self.max_tiles:
            raise InvalidGeometryError(
                f"InternVLGeometry.min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles})"
            )

    @property
    def cell(self) -> int:
        """Pixels of a tile per token along each side: ``tile_size // tokens_per_side`` (28)."""
        return self.tile_size // self.tokens_per_side

    @property
    def tokens_per_tile(self) -> int:
        """Tokens of one tile (or of the thumbnail): ``tokens_per_side ** 2`` (256)."""
        return self.tokens_per_side**2

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of tiles: transformers' ``get_optimal_tiled_canvas``, mirrored
        (``(1, 1)`` when the processor does not tile)."""
        width, height = _check_image_size(width, height)
        if not self.crop_to_patches or self.max_tiles <= 1:
            return 1, 1
        arrangements = sorted(
            (
                (cols, rows)
                for cols in range(1, self.max_tiles + 1)
                for rows in range(1, self.max_tiles + 1)
                if self.min_tiles <= cols * rows <= self.max_tiles
            ),
            key=lambda grid: grid[0] * grid[1],
        )
        aspect, area = width / height, width * height
        best, best_diff = (1, 1), float("inf")
        for cols, rows in arrangements:
            diff = abs(aspect - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and area > 0.5 * self.tile_size * self.tile_size * cols * rows:
                best = (cols, rows)
        return best[1], best[0]

    def has_thumbnail(self, height: int, width: int) -> bool:
        """Whether a thumbnail tile follows the tiles (more than one tile, ``use_thumbnail``)."""
        rows, cols = self.tile_grid(height, width)
        return self.use_thumbnail and rows * cols > 1

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles the tower sees: ``rows * cols`` plus the thumbnail."""
        rows, cols = self.tile_grid(height, width)
        return rows * cols + int(self.has_thumbnail(height, width))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows * 16, cols * 16)``: the tokens of the tiles as one grid over the resized image."""
        rows, cols = self.tile_grid(height, width)
        return rows * self.tokens_per_side, cols * self.tokens_per_side

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens in the LLM sequence: ``num_tiles * tokens_per_tile``."""
        return self.num_tiles(height, width) * self.tokens_per_tile


# ----------------------------------------------------------------------------------------------
# Mappers: the rule of docs/method.md §3, one small dataclass per architecture
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenVLPatchMapper:
    """Box -> image-token positions for Qwen2-VL / Qwen2.5-VL (docs/method.md §3).

    Scale the box by ``(W_r / W, H_r / H)``; mark rows ``floor(y0/28) .. floor(y1/28)`` and
    columns ``floor(x0/28) .. floor(x1/28)`` inclusive (clipped to the grid, so a box touching the
    right/bottom edge never yields ``col == grid_w``); position ``row * grid_w + col`` relative to
    the first ``<|image_pad|>`` token. Only the original rule exists (``variant="fidelity"``).
    ``arithmetic``: ``"exact"`` (default) scales in rational arithmetic, so a box edge exactly on a
    token boundary lands in the token starting there; ``"float64"`` is the original's
    ``x * (W_r / W)`` in float64, one token low on some boundaries (docs/deviations.md).
    """

    geometry: QwenVLGeometry = field(default_factory=QwenVLGeometry)
    variant: Literal["fidelity"] = "fidelity"
    arithmetic: Literal["exact", "float64"] = "exact"

    VARIANTS: ClassVar[tuple[str, ...]] = ("fidelity",)
    family: ClassVar[str] = "qwen_vl"

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, QwenVLGeometry):
            raise InvalidGeometryError(
                f"QwenVLPatchMapper.geometry must be a QwenVLGeometry, got {type(self.geometry).__name__}"
            )
        if self.variant not in self.VARIANTS:
            raise PatchMappingError(
                f"unknown Qwen-VL mapping variant {self.variant!r}; choose one of {self.VARIANTS}"
            )
        _check_arithmetic(self.arithmetic)

    def num_tokens(self, width: int, height: int) -> int:
        """Image tokens the LLM sees for a ``width x height`` image."""
        return self.geometry.num_tokens(height, width)

    def describe(self, width: int, height: int) -> dict[str, int]:
        """The grid of a ``width x height`` image, as stored in ``regions.jsonl``."""
        h_r, w_r = self.geometry.resized_size(height, width)
        return {
            "resized_height": h_r,
            "resized_width": w_r,
            "grid_h": h_r // self.geometry.factor,
            "grid_w": w_r // self.geometry.factor,
        }

    def map_box(self, box: Box | Sequence[float] | Sequence[Sequence[float]], *, width: int, height: int) -> np.ndarray:
        """Sorted unique positions ``(k,)`` int64, relative to the first image token."""
        width, height = _check_image_size(width, height)
        b = Box.parse(box).clip_to_image(width, height)
        h_r, w_r = self.geometry.resized_size(height, width)
        f = self.geometry.factor
        grid_h, grid_w = h_r // f, w_r // f
        sx, sy = Fraction(w_r, width), Fraction(h_r, height)
        rows = _scaled_index_range(b.y0, b.y1, sy, f, grid_h, self.arithmetic)
        cols = _scaled_index_range(b.x0, b.x1, sx, f, grid_w, self.arithmetic)
        return _flat(rows, cols, grid_w)

    def token_boxes(self, width: int, height: int) -> np.ndarray:
        """Each token's cell in original-image pixels, ``(num_tokens, 4)`` as ``x0, y0, x1, y1``.

        Row ``p`` is the block of the image that position ``p`` covers (a 28 px block of the
        resized image, scaled back); used by the figures.
        """
        h_r, w_r = self.geometry.resized_size(height, width)
        f = self.geometry.factor
        grid_h, grid_w = h_r // f, w_r // f
        xs = np.arange(grid_w + 1) * f * width / w_r
        ys = np.arange(grid_h + 1) * f * height / h_r
        rr, cc = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        return np.stack([xs[cc], ys[rr], xs[cc + 1], ys[rr + 1]], axis=-1).reshape(-1, 4)


@dataclass(frozen=True)
class LlavaNextPatchMapper:
    """Box -> image-token positions for LLaVA-NeXT (anyres, spatial_unpad; docs/method.md §3).

    ``variant="fidelity"`` (the original): pixels per token by integer floor division of the
    ORIGINAL image size, ``p_w = W // W'`` and ``p_h = H // H'``; columns ``x0 // p_w ..
    x1 // p_w`` and rows ``y0 // p_h .. y1 // p_h`` (inclusive, clipped to the grid); position
    ``base_tokens + row * (W' + 1) + col`` (576 + flat index over ``H' x (W'+1)``). Newline tokens
    and base-image tokens are never part of a region. Because ``p_w`` is floored, the last
    column also absorbs the ``W mod W'`` leftover pixels (a quirk kept on purpose).

    ``variant="base_and_crop"`` (a corrected variant): the fidelity positions plus the base-grid
    tokens under the box (box scaled by ``base_size / W`` and ``base_size / H``, then
    ``floor(./patch_size)``, position ``row * base_grid + col``).
    """

    geometry: LlavaNextGeometry = field(default_factory=LlavaNextGeometry)
    variant: Literal["fidelity", "base_and_crop"] = "fidelity"

    VARIANTS: ClassVar[tuple[str, ...]] = ("fidelity", "base_and_crop")
    family: ClassVar[str] = "llava_next"

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, LlavaNextGeometry):
            raise InvalidGeometryError(
                f"LlavaNextPatchMapper.geometry must be a LlavaNextGeometry, got {type(self.geometry).__name__}"
            )
        if self.variant not in self.VARIANTS:
            raise PatchMappingError(
                f"unknown LLaVA-NeXT mapping variant {self.variant!r}; choose one of {self.VARIANTS}"
            )

    @property
    def include_base_grid(self) -> bool:
        return self.variant == "base_and_crop"

    def num_tokens(self, width: int, height: int) -> int:
        """Image tokens the LLM sees for a ``width x height`` image (base + crop + newlines)."""
        return self.geometry.num_tokens(height, width)

    def pixels_per_token(self, width: int, height: int) -> tuple[int, int]:
        """``(p_w, p_h) = (W // W', H // H')``, the original's integer pixels per crop token."""
        width, height = _check_image_size(width, height)
        grid_h, grid_w = self.geometry.unpadded_grid(height, width)
        p_w, p_h = width // grid_w, height // grid_h
        if p_w == 0 or p_h == 0:
            raise InvalidImageSizeError(
                f"image {width}x{height} (W x H) is smaller than its {grid_h}x{grid_w} crop grid, so "
                f"the original floor division W // W' = {p_w}, H // H' = {p_h} gives 0 px per token "
                f"(the original code divides by zero); use an image at least {grid_w}x{grid_h} px"
            )
        return p_w, p_h

    def describe(self, width: int, height: int) -> dict[str, int]:
        """The grid of a ``width x height`` image, as stored in ``regions.jsonl``."""
        best_h, best_w = self.geometry.best_resolution(height, width)
        grid_h, grid_w = self.geometry.unpadded_grid(height, width)
        p_w, p_h = self.pixels_per_token(width, height)
        return {
            "best_resolution_height": best_h,
            "best_resolution_width": best_w,
            "base_grid": self.geometry.base_grid,
            "base_tokens": self.geometry.base_tokens,
            "grid_h": grid_h,
            "grid_w": grid_w,
            "row_stride": grid_w + 1,
            "pixels_per_token_w": p_w,
            "pixels_per_token_h": p_h,
        }

    def map_box(self, box: Box | Sequence[float] | Sequence[Sequence[float]], *, width: int, height: int) -> np.ndarray:
        """Sorted unique positions ``(k,)`` int64, relative to the first image token."""
        width, height = _check_image_size(width, height)
        b = Box.parse(box).clip_to_image(width, height)
        grid_h, grid_w = self.geometry.unpadded_grid(height, width)
        p_w, p_h = self.pixels_per_token(width, height)
        rows = _index_range(b.y0, b.y1, p_h, grid_h)
        cols = _index_range(b.x0, b.x1, p_w, grid_w)
        positions = _flat(rows, cols, grid_w + 1, offset=self.geometry.base_tokens)
        if self.include_base_grid:
            g, ps = self.geometry.base_grid, self.geometry.patch_size
            sx, sy = self.geometry.base_size / width, self.geometry.base_size / height
            base_rows = _index_range(b.y0 * sy, b.y1 * sy, ps, g)
            base_cols = _index_range(b.x0 * sx, b.x1 * sx, ps, g)
            positions = np.concatenate([_flat(base_rows, base_cols, g), positions])
        return np.unique(positions)

    def token_boxes(self, width: int, height: int) -> np.ndarray:
        """Each token's cell in original-image pixels, ``(num_tokens, 4)`` as ``x0, y0, x1, y1``.

        Base tokens: the ``W/24 x H/24`` cell of the squashed base image. Crop tokens: the cell
        the fidelity rule assigns (``[c*p_w, (c+1)*p_w)``, the last row/column stretched to the
        image edge). Newline tokens: NaN (they cover no pixels).
        """
        g = self.geometry.base_grid
        bx = np.arange(g + 1) * width / g
        by = np.arange(g + 1) * height / g
        rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        base = np.stack([bx[cc], by[rr], bx[cc + 1], by[rr + 1]], axis=-1).reshape(-1, 4)
        grid_h, grid_w = self.geometry.unpadded_grid(height, width)
        p_w, p_h = self.pixels_per_token(width, height)
        xs = np.minimum(np.arange(grid_w + 1) * p_w, width).astype(float)
        ys = np.minimum(np.arange(grid_h + 1) * p_h, height).astype(float)
        xs[-1], ys[-1] = width, height
        crop = np.full((grid_h, grid_w + 1, 4), np.nan)
        rr, cc = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        crop[:, :grid_w] = np.stack([xs[cc], ys[rr], xs[cc + 1], ys[rr + 1]], axis=-1)
        return np.concatenate([base, crop.reshape(-1, 4)], axis=0)

    def newline_positions(self, width: int, height: int) -> np.ndarray:
        """Positions of the newline tokens (column ``W'`` of every crop row); shape ``(H',)``."""
        grid_h, grid_w = self.geometry.unpadded_grid(height, width)
        return self.geometry.base_tokens + np.arange(grid_h, dtype=np.int64) * (grid_w + 1) + grid_w


@dataclass(frozen=True)
class LlavaOnevisionPatchMapper(LlavaNextPatchMapper):
    """Box -> image-token positions for LLaVA-OneVision (anyres-max; docs/method.md §3).

    LLaVA-NeXT's rules on the OneVision grid (:class:`LlavaOnevisionGeometry`): the original has
    no OneVision script, so ``variant="fidelity"`` applies the LLaVA-NeXT original's rule to the
    crop grid the language model sees, i.e. after the anyres-max shrink: ``p_w = W // W''``,
    ``p_h = H // H''``, position ``729 + row * (W'' + 1) + col``; newline and base tokens never.
    ``"base_and_crop"`` adds the 27 x 27 base-grid tokens under the box.
    """

    geometry: LlavaOnevisionGeometry = field(default_factory=LlavaOnevisionGeometry)
    variant: Literal["fidelity", "base_and_crop"] = "fidelity"

    family: ClassVar[str] = "llava_onevision"

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, LlavaOnevisionGeometry):
            raise InvalidGeometryError(
                f"LlavaOnevisionPatchMapper.geometry must be a LlavaOnevisionGeometry, got {type(self.geometry).__name__}"
            )
        super().__post_init__()


@dataclass(frozen=True)
class InternVLPatchMapper:
    """Box -> image-token positions for InternVL (dynamic 448 px tiles; docs/method.md §3).

    The box is scaled to the tiled canvas (``cols * 448 / W``, ``rows * 448 / H``); rows
    ``floor(y0/28) .. floor(y1/28)`` and columns ``floor(x0/28) .. floor(x1/28)`` of the canvas's
    ``(16 * rows) x (16 * cols)`` token grid are marked (inclusive, clipped), and global token ``(R, C)`` is
    token ``(R mod 16) * 16 + C mod 16`` of tile ``(R // 16) * cols + C // 16``: position
    ``256 * tile + (R mod 16) * 16 + C mod 16``, relative to the first ``<IMG_CONTEXT>``. This is
    Qwen's 28 px block rule on the tiles the language model reads in tile order.

    ``variant="fidelity"`` marks the tiles only (as LLaVA-NeXT's original marks its crop grid
    only); ``"base_and_crop"`` also marks the thumbnail's tokens under the box (box scaled by
    ``448 / W``, ``448 / H``; position ``256 * tiles + row * 16 + col``), the analogue of
    LLaVA-NeXT's base grid. A one-tile image has no thumbnail, so both variants agree on it.
    ``arithmetic``: as :class:`QwenVLPatchMapper`'s (``"exact"`` by default).
    """

    geometry: InternVLGeometry = field(default_factory=InternVLGeometry)
    variant: Literal["fidelity", "base_and_crop"] = "fidelity"
    arithmetic: Literal["exact", "float64"] = "exact"

    VARIANTS: ClassVar[tuple[str, ...]] = ("fidelity", "base_and_crop")
    family: ClassVar[str] = "internvl"

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, InternVLGeometry):
            raise InvalidGeometryError(
                f"InternVLPatchMapper.geometry must be an InternVLGeometry, got {type(self.geometry).__name__}"
            )
        if self.variant not in self.VARIANTS:
            raise PatchMappingError(f"unknown InternVL mapping variant {self.variant!r}; choose one of {self.VARIANTS}")
        _check_arithmetic(self.arithmetic)

    def num_tokens(self, width: int, height: int) -> int:
        """Image tokens the LLM sees for a ``width x height`` image (tiles + thumbnail)."""
        return self.geometry.num_tokens(height, width)

    def describe(self, width: int, height: int) -> dict[str, int]:
        """The tiling of a ``width x height`` image, as stored in ``regions.jsonl``."""
        rows, cols = self.geometry.tile_grid(height, width)
        grid_h, grid_w = self.geometry.grid(height, width)
        return {
            "tile_rows": rows,
            "tile_cols": cols,
            "thumbnail": int(self.geometry.has_thumbnail(height, width)),
            "tokens_per_tile": self.geometry.tokens_per_tile,
            "grid_h": grid_h,
            "grid_w": grid_w,
        }

    def _tile_positions(self, rows_idx: np.ndarray, cols_idx: np.ndarray, cols: int) -> np.ndarray:
        """Positions ``(k,)`` of global canvas tokens ``rows_idx x cols_idx`` in tile order."""
        side = self.geometry.tokens_per_side
        rr, cc = np.meshgrid(rows_idx, cols_idx, indexing="ij")
        tile = (rr // side) * cols + cc // side
        return (tile * side * side + (rr % side) * side + cc % side).reshape(-1).astype(np.int64)

    def map_box(self, box: Box | Sequence[float] | Sequence[Sequence[float]], *, width: int, height: int) -> np.ndarray:
        """Sorted unique positions ``(k,)`` int64, relative to the first image token."""
        width, height = _check_image_size(width, height)
        b = Box.parse(box).clip_to_image(width, height)
        rows, cols = self.geometry.tile_grid(height, width)
        grid_h, grid_w = self.geometry.grid(height, width)
        size, cell = self.geometry.tile_size, self.geometry.cell
        sx, sy = Fraction(cols * size, width), Fraction(rows * size, height)
        positions = self._tile_positions(
            _scaled_index_range(b.y0, b.y1, sy, cell, grid_h, self.arithmetic),
            _scaled_index_range(b.x0, b.x1, sx, cell, grid_w, self.arithmetic),
            cols,
        )
        if self.variant == "base_and_crop" and self.geometry.has_thumbnail(height, width):
            side = self.geometry.tokens_per_side
            tx, ty = Fraction(size, width), Fraction(size, height)
            thumb = _flat(
                _scaled_index_range(b.y0, b.y1, ty, cell, side, self.arithmetic),
                _scaled_index_range(b.x0, b.x1, tx, cell, side, self.arithmetic),
                side,
                offset=rows * cols * self.geometry.tokens_per_tile,
            )
            positions = np.concatenate([positions, thumb])
        return np.unique(positions)

    def token_boxes(self, width: int, height: int) -> np.ndarray:
        """Each token's cell in original-image pixels, ``(num_tokens, 4)`` as ``x0, y0, x1, y1``:
        tile tokens the 28 px block of the canvas they cover (scaled back), thumbnail tokens their
        block of the squashed image."""
        rows, cols = self.geometry.tile_grid(height, width)
        grid_h, grid_w = self.geometry.grid(height, width)
        size, cell, side = self.geometry.tile_size, self.geometry.cell, self.geometry.tokens_per_side
        xs = np.arange(grid_w + 1) * cell * width / (cols * size)
        ys = np.arange(grid_h + 1) * cell * height / (rows * size)
        rr, cc = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        canvas = np.stack([xs[cc], ys[rr], xs[cc + 1], ys[rr + 1]], axis=-1).reshape(-1, 4)
        boxes = np.empty((self.num_tokens(width, height), 4))
        boxes[self._tile_positions(np.arange(grid_h), np.arange(grid_w), cols)] = canvas
        if self.geometry.has_thumbnail(height, width):
            tx = np.arange(side + 1) * width / side
            ty = np.arange(side + 1) * height / side
            rr, cc = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
            boxes[rows * cols * side * side :] = np.stack([tx[cc], ty[rr], tx[cc + 1], ty[rr + 1]], axis=-1).reshape(-1, 4)
        return boxes


PatchMapper = QwenVLPatchMapper | LlavaNextPatchMapper | InternVLPatchMapper
Geometry = QwenVLGeometry | LlavaNextGeometry | InternVLGeometry


# ----------------------------------------------------------------------------------------------
# Construction from a processor / a model type
# ----------------------------------------------------------------------------------------------


def _size_value(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def geometry_from_processor(processor: Any, model_type: str) -> Geometry:
    """The geometry a processor really uses, so real checkpoints pick up their real settings.

    Qwen: ``image_processor.size`` (``shortest_edge`` = min_pixels, ``longest_edge`` =
    max_pixels), ``patch_size``, ``merge_size``. LLaVA-NeXT: the crop size (``crop_size`` when
    ``do_center_crop``, else ``size``), ``processor.patch_size``, ``image_grid_pinpoints``; the
    processor must emit exactly ``base_grid^2`` base tokens (``num_additional_image_tokens``
    minus one for ``vision_feature_select_strategy == "default"`` must be 0). LLaVA-OneVision:
    ``size`` (384), ``processor.num_image_tokens`` (729 = 27^2, so ``patch_size = 384 // 27``),
    ``image_grid_pinpoints``, ``vision_aspect_ratio`` (``anyres_max_<n>``); strategy ``"full"``.
    InternVL: the tile ``size`` (448), ``min_patches`` / ``max_patches``, whether the processor
    tiles (``crop_to_patches``, the processor's default first), ``processor.image_seq_length``
    (256 = 16^2).
    """
    check_model_type(model_type)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise InvalidGeometryError(
            f"{type(processor).__name__} has no image_processor: pass the full multimodal processor "
            f"(AutoProcessor / LoadedModel.processor), not just the tokenizer"
        )
    if model_type == "llava_onevision":
        return _onevision_geometry(processor, image_processor)
    if model_type == "internvl":
        return _internvl_geometry(processor, image_processor)
    if model_type in QWEN_MODEL_TYPES:
        size = getattr(image_processor, "size", None)
        min_pixels = _size_value(size, "shortest_edge") or getattr(image_processor, "min_pixels", None)
        max_pixels = _size_value(size, "longest_edge") or getattr(image_processor, "max_pixels", None)
        if min_pixels is None or max_pixels is None:
            raise InvalidGeometryError(
                f"cannot read min/max pixels from {type(image_processor).__name__}.size={size!r}"
            )
        return QwenVLGeometry(
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )
    # llava_next
    if getattr(image_processor, "do_center_crop", False) and _size_value(image_processor.crop_size, "height"):
        crop_h = _size_value(image_processor.crop_size, "height")
        crop_w = _size_value(image_processor.crop_size, "width")
    else:
        size = image_processor.size
        crop_h = _size_value(size, "height") or _size_value(size, "shortest_edge")
        crop_w = _size_value(size, "width") or _size_value(size, "shortest_edge")
    if crop_h is None or crop_h != crop_w:
        raise InvalidGeometryError(
            f"LLaVA-NeXT crops must be square, got {crop_h}x{crop_w} from {type(image_processor).__name__}"
        )
    patch_size = getattr(processor, "patch_size", None)
    if patch_size is None:
        raise InvalidGeometryError(
            f"{type(processor).__name__}.patch_size is None: set it from the vision config "
            f"(vision_config.patch_size, 14 for CLIP ViT-L/14-336)"
        )
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        extra -= 1
    if extra != 0:
        raise InvalidGeometryError(
            f"processor emits {extra:+d} extra base-image tokens (num_additional_image_tokens="
            f"{processor.num_additional_image_tokens}, vision_feature_select_strategy="
            f"{processor.vision_feature_select_strategy!r}); the mapping supports only the "
            f"base_grid^2 base block of LLaVA-NeXT"
        )
    return LlavaNextGeometry(
        base_size=int(crop_h),
        patch_size=int(patch_size),
        grid_pinpoints=tuple(tuple(p) for p in image_processor.image_grid_pinpoints),
    )


def _onevision_geometry(processor: Any, image_processor: Any) -> LlavaOnevisionGeometry:
    """:class:`LlavaOnevisionGeometry` of a ``LlavaOnevisionProcessor`` (see :func:`geometry_from_processor`)."""
    size = image_processor.size
    base_size = _size_value(size, "height") or _size_value(size, "shortest_edge")
    if base_size is None or base_size != (_size_value(size, "width") or base_size):
        raise InvalidGeometryError(f"LLaVA-OneVision crops must be square, got size={size!r}")
    base_tokens = getattr(processor, "num_image_tokens", None)
    base_grid = math.isqrt(int(base_tokens)) if is_int(base_tokens) and base_tokens > 0 else 0
    if base_grid * base_grid != base_tokens:
        raise InvalidGeometryError(
            f"{type(processor).__name__}.num_image_tokens must be a square (base_grid^2, 729 for SigLIP 384/14), "
            f"got {base_tokens!r}"
        )
    if getattr(processor, "vision_feature_select_strategy", None) != "full":
        raise InvalidGeometryError(
            f"the mapping supports LLaVA-OneVision's vision_feature_select_strategy 'full' (SigLIP has no CLS), got "
            f"{processor.vision_feature_select_strategy!r}"
        )
    aspect = str(getattr(processor, "vision_aspect_ratio", ""))
    if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_") :].isdigit():
        raise InvalidGeometryError(f"vision_aspect_ratio must be 'anyres_max_<n>', got {aspect!r}")
    geometry = LlavaOnevisionGeometry(
        base_size=int(base_size),
        patch_size=int(base_size) // base_grid,
        grid_pinpoints=tuple(tuple(p) for p in image_processor.image_grid_pinpoints),
        max_num_patches=int(aspect[len("anyres_max_") :]),
    )
    if geometry.base_grid != base_grid:
        raise InvalidGeometryError(
            f"{base_tokens} base tokens are not a whole number of patches of a {base_size} px crop"
        )
    return geometry


def _internvl_geometry(processor: Any, image_processor: Any) -> InternVLGeometry:
    """:class:`InternVLGeometry` of an ``InternVLProcessor`` (see :func:`geometry_from_processor`)."""
    size = image_processor.size
    tile = _size_value(size, "height")
    if tile is None or tile != _size_value(size, "width"):
        raise InvalidGeometryError(f"InternVL tiles must be square, got size={size!r}")
    per_tile = getattr(processor, "image_seq_length", None)
    side = math.isqrt(int(per_tile)) if is_int(per_tile) and per_tile > 0 else 0
    if side * side != per_tile:
        raise InvalidGeometryError(
            f"{type(processor).__name__}.image_seq_length must be a square (256 = 16^2 tokens a tile), got {per_tile!r}"
        )
    defaults = getattr(processor, "images_kwargs", None) or {}
    return InternVLGeometry(
        tile_size=int(tile),
        tokens_per_side=side,
        min_tiles=int(image_processor.min_patches),
        max_tiles=int(image_processor.max_patches),
        crop_to_patches=bool(defaults.get("crop_to_patches", image_processor.crop_to_patches)),
    )


_MAPPERS: dict[str, tuple[type, type]] = {
    "qwen_vl": (QwenVLPatchMapper, QwenVLGeometry),
    "llava_next": (LlavaNextPatchMapper, LlavaNextGeometry),
    "llava_onevision": (LlavaOnevisionPatchMapper, LlavaOnevisionGeometry),
    "internvl": (InternVLPatchMapper, InternVLGeometry),
}


def make_mapper(model_type: str, geometry: Geometry | None = None, variant: str = "fidelity") -> PatchMapper:
    """The mapper for ``model_type`` (default geometry: the original settings; Qwen3-VL has no
    default, its 16 px patches must come from :func:`geometry_from_processor`)."""
    check_model_type(model_type)
    mapper_cls, geometry_cls = _MAPPERS[MAPPER_FAMILY[model_type]]
    if geometry is None:
        if model_type == "qwen3_vl":
            raise InvalidGeometryError(
                "Qwen3-VL has 16 px patches, not the QwenVLGeometry default 14: pass its geometry or use "
                "mapper_from_processor(processor, 'qwen3_vl')"
            )
        geometry = geometry_cls()
    return mapper_cls(geometry, variant)


def mapper_from_processor(processor: Any, model_type: str, variant: str = "fidelity") -> PatchMapper:
    """:func:`make_mapper` with the processor's own geometry (:func:`geometry_from_processor`)."""
    return make_mapper(model_type, geometry_from_processor(processor, model_type), variant)


# ----------------------------------------------------------------------------------------------
# Documents -> regions.jsonl
# ----------------------------------------------------------------------------------------------


def _map_entry(mapper: PatchMapper, coord: Any, width: int, height: int) -> tuple[list[int], list[float] | None, str | None]:
    """(positions, box, skip reason) for one OCR entry; a bad box is skipped, not fatal."""
    try:
        box = Box.parse(coord)
    except InvalidBoxError as exc:
        return [], None, str(exc)
    try:
        positions = mapper.map_box(box, width=width, height=height)
    except BoxOutsideImageError as exc:
        return [], list(box.as_tuple()), str(exc)
    return positions.tolist(), list(box.as_tuple()), None


def map_document(
    doc: Mapping[str, Any],
    mapper: PatchMapper,
    model_type: str,
    *,
    image_token_start: int,
    num_image_tokens: int,
) -> dict[str, Any]:
    """One ``regions.jsonl`` record for a document (see :func:`map_documents` for the layout).

    ``num_image_tokens`` is the processor's count for this image; it must equal the mapping's
    (else :class:`TokenCountMismatchError`).
    """
    image = doc["image"]
    width, height = image.size
    expected = mapper.num_tokens(width, height)
    if expected != num_image_tokens:
        raise TokenCountMismatchError(
            f"document {doc.get('doc_id')!r} ({width}x{height} W x H): the {model_type} mapping "
            f"expects {expected} image tokens ({mapper.describe(width, height)}) but the processor "
            f"emitted {num_image_tokens}; the geometry does not match the processor. Build the "
            f"mapper with mapper_from_processor(processor, model_type)."
        )
    skipped: list[dict[str, Any]] = []
    chunks = []
    for i, entry in enumerate(doc.get("2_coord") or []):
        positions, box, reason = _map_entry(mapper, entry.get("coord"), width, height)
        chunks.append({"chunk": entry.get("chunk"), "box": box, "positions": positions})
        if reason is not None:
            skipped.append({"kind": "chunk", "index": i, "text": entry.get("chunk"), "reason": reason})
    chars = []
    for i, entry in enumerate(doc.get("char_coord") or []):
        positions, box, reason = _map_entry(mapper, entry.get("coord"), width, height)
        chars.append(
            {"char": entry.get("char"), "chunk_index": entry.get("chunk_index"), "box": box, "positions": positions}
        )
        if reason is not None:
            skipped.append({"kind": "char", "index": i, "text": entry.get("char"), "reason": reason})
    return {
        "doc_id": doc.get("doc_id"),
        "model_type": model_type,
        "variant": mapper.variant,
        "image_size": [width, height],
        "geometry": mapper.describe(width, height),
        "image_token_start": int(image_token_start),
        "num_image_tokens": int(num_image_tokens),
        "chunks": chunks,
        "chars": chars,
        "skipped": skipped,
    }


def map_documents(
    documents_ds: Iterable[Mapping[str, Any]],
    loaded_or_processor: Any,
    model_type: str,
    mapper: PatchMapper | None = None,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Map every OCR chunk and character box of every document (docs/method.md §3).

    ``loaded_or_processor``: a :class:`~sparsemm_utils.models.LoadedModel` (so the prompt gets the
    model's own default system prompt, :func:`~sparsemm_utils.prompts.resolve_system_prompt`) or a
    processor (the family's default). For each document the OCR prompt is built with
    ``prompts.build_inputs(loaded_or_processor, image, prompts.OCR_PROMPT, model_type)``;
    ``image_token_start`` is the index of its first image
    token and the processor's image-token count must equal the mapping's (else
    :class:`TokenCountMismatchError`). A record (one ``regions.jsonl`` line):

    ``doc_id``, ``model_type``, ``variant``, ``image_size`` ``[W, H]``, ``geometry`` (grid, see
    ``mapper.describe``), ``image_token_start`` (absolute), ``num_image_tokens``, ``chunks``
    ``[{chunk, box, positions}]`` (index-aligned with ``2_coord``), ``chars`` ``[{char,
    chunk_index, box, positions}]`` (index-aligned with ``char_coord``), ``skipped`` ``[{kind,
    index, text, reason}]``. ``positions`` are relative to ``image_token_start``; a skipped box
    (outside the image, malformed) keeps its entry with ``positions == []`` so indices stay
    aligned; a reader must treat an empty region as "no region" (skip the token).
    """
    check_model_type(model_type)
    processor = getattr(loaded_or_processor, "processor", loaded_or_processor)
    if mapper is None:
        mapper = mapper_from_processor(processor, model_type)
    if mapper.family != MAPPER_FAMILY[model_type]:
        raise PatchMappingError(
            f"a {type(mapper).__name__} cannot map {model_type!r} documents; use make_mapper({model_type!r})"
        )
    image_token_id = processor.image_token_id
    iterator: Iterable[Mapping[str, Any]] = documents_ds
    if progress:
        iterator = tqdm(documents_ds, desc=f"patch mapping ({model_type})")
    records = []
    for doc in iterator:
        image = doc["image"]
        inputs = prompts.build_inputs(loaded_or_processor, image, prompts.OCR_PROMPT, model_type)
        input_ids = inputs["input_ids"][0]
        start, length = prompts.image_token_span(input_ids, image_token_id)
        records.append(
            map_document(doc, mapper, model_type, image_token_start=int(start), num_image_tokens=int(length))
        )
    return records


def chunk_box(doc: Mapping[str, Any], index: int) -> tuple[str, Box]:
    """``(chunk text, box)`` of chunk ``index`` of a document (its ``2_coord`` entry)."""
    chunks = doc.get("2_coord") or []
    if not 0 <= index < len(chunks):
        raise IndexError(
            f"document {doc.get('doc_id')!r} has {len(chunks)} chunks; chunk index {index} is out of "
            f"range (use 0..{len(chunks) - 1})"
        )
    return chunks[index]["chunk"], Box.from_coord(chunks[index]["coord"])


def compare_with_processors(image: Any, processors: Mapping[str, Any], variant: str = "fidelity") -> list[dict[str, Any]]:
    """For one image and several processors (``model_type -> processor``): the mapping's grid and
    token count next to the processor's own count in the OCR prompt (docs/method.md §3: they must
    agree). One dict per model type: ``model_type``, ``mapping_tokens``, ``processor_tokens``,
    ``image_token_start``, ``agree`` and the ``describe`` fields. ``variant`` applies to
    LLaVA-NeXT only (Qwen has the fidelity rule alone)."""
    width, height = image.size
    rows = []
    for model_type, processor in processors.items():
        mapper = mapper_from_processor(
            processor, model_type, variant if model_type not in QWEN_MODEL_TYPES else "fidelity"
        )
        inputs = prompts.build_inputs(processor, image, prompts.OCR_PROMPT, model_type)
        start, length = prompts.image_token_span(inputs["input_ids"][0], processor.image_token_id)
        expected = mapper.num_tokens(width, height)
        rows.append(
            {
                "model_type": model_type,
                "mapping_tokens": expected,
                "processor_tokens": int(length),
                "image_token_start": int(start),
                "agree": expected == int(length),
                **mapper.describe(width, height),
            }
        )
    return rows


_REQUIRED_KEYS = ("doc_id", "model_type", "image_size", "geometry", "image_token_start", "num_image_tokens", "chunks", "chars")


def _check_positions(record: Mapping[str, Any], where: str) -> None:
    """Every region of a ``regions.jsonl`` record points inside its image span: ``image_token_start``
    >= 0, ``num_image_tokens`` >= 1 and each position an int in ``[0, num_image_tokens)`` (positions
    are relative to the span's start). A position outside would score a key that is not an image
    token (or, negative, count from the end), so the record is refused naming the entry."""
    doc = record.get("doc_id")
    for key, minimum in (("image_token_start", 0), ("num_image_tokens", 1)):
        check_int(f"{where}: document {doc!r}: {key}", record[key], minimum, error=PatchMappingError,
                  hint="the file was edited or is not step 02's; rerun step 02 (patch mapping)")
    count = int(record["num_image_tokens"])
    for kind in ("chunks", "chars"):
        entries = record[kind]
        if not isinstance(entries, list):
            raise PatchMappingError(f"{where}: document {doc!r}: {kind} must be a list; rerun step 02 (patch mapping)")
        for index, entry in enumerate(entries):
            positions = entry.get("positions") if isinstance(entry, Mapping) else None
            if not isinstance(positions, list):
                raise PatchMappingError(
                    f"{where}: document {doc!r}, {kind[:-1]} {index}: positions must be a list of image-token "
                    "indices; rerun step 02 (patch mapping)"
                )
            bad = [p for p in positions if not is_int(p) or not 0 <= p < count]
            if bad:
                raise PatchMappingError(
                    f"{where}: document {doc!r}, {kind[:-1]} {index} ({entry.get(kind[:-1])!r}) has position {bad[0]!r} "
                    f"outside its image span [0, {count}) (num_image_tokens = {count}): a region must point at the "
                    "document's own image tokens. The file was edited or belongs to another model; rerun step 02 "
                    "(patch mapping)"
                )


def load_regions(path: str | Path) -> list[dict[str, Any]]:
    """Read ``regions.jsonl`` back: a list of records as :func:`map_documents` returns them (one
    per line, written by step 02, :mod:`sparsemm_utils.steps.patch_mapping`). ``path`` is the file
    or its folder. Every record is checked: its keys, and every region inside its image span
    (:func:`_check_positions`); a bad line raises :class:`PatchMappingError` naming file, line,
    document and entry."""
    path = Path(path)
    if path.is_dir():
        path = path / "regions.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: regions.jsonl is written by step 02 (patch mapping, "
            f"notebooks/02_patch_mapping.ipynb); run it first"
        )
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PatchMappingError(f"{path}:{lineno} is not valid JSON ({exc}); rerun step 02 (patch mapping)") from exc
            if not isinstance(record, dict):
                raise PatchMappingError(f"{path}:{lineno} is not a JSON object; rerun step 02 (patch mapping)")
            missing = [k for k in _REQUIRED_KEYS if k not in record]
            if missing:
                raise PatchMappingError(f"{path}:{lineno} lacks keys {missing}; rerun step 02 (patch mapping)")
            _check_positions(record, f"{path}:{lineno}")
            records.append(record)
    return records
