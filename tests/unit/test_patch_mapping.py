"""Unit tests of step 02's patch mapping (docs/method.md §3): geometry, the box rule, errors, I/O.

The geometry is checked against transformers' own functions (``smart_resize``,
``select_best_resolution``, ``get_anyres_image_grid_shape``, ``unpad_image`` and the LLaVA-NeXT
processor's ``_get_number_of_features``) over many image sizes; the box rule against examples
worked out by hand.
"""

from __future__ import annotations

import json
import math
import types
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from sparsemm_utils import patch_mapping as pm
from sparsemm_utils.patch_mapping import (
    Box,
    BoxOutsideImageError,
    InvalidBoxError,
    InvalidGeometryError,
    InternVLGeometry,
    InternVLPatchMapper,
    InvalidImageSizeError,
    LlavaNextGeometry,
    LlavaOnevisionGeometry,
    LlavaOnevisionPatchMapper,
    LlavaNextPatchMapper,
    PatchMappingError,
    QwenVLGeometry,
    QwenVLPatchMapper,
    TokenCountMismatchError,
    UnsupportedModelTypeError,
)

SETTINGS = settings(max_examples=150, deadline=None)
sides = st.integers(min_value=28, max_value=1200)


# ----------------------------------------------------------------------------------------------
# Hand-worked examples (docs/method.md §3)
# ----------------------------------------------------------------------------------------------


def test_qwen_hand_example_1000x700():
    # Original bounds [32*28^2, 16384*28^2] = [25088, 12845056].
    # smart_resize: h = round(700/28)*28 = 25*28 = 700, w = round(1000/28 = 35.71)*28 = 36*28 = 1008;
    # 700*1008 = 705600 lies in the bounds, so (H_r, W_r) = (700, 1008); grid 25 x 36 = 900 tokens.
    mapper = QwenVLPatchMapper()
    assert mapper.geometry.resized_size(700, 1000) == (700, 1008)
    assert mapper.geometry.grid(700, 1000) == (25, 36)
    assert mapper.num_tokens(1000, 700) == 900
    # Box (100, 200, 300, 260); scale x by 1008/1000 = 1.008, y by 700/700 = 1.
    # x: 100.8 // 28 = 3 (84 <= 100.8 < 112), 302.4 // 28 = 10 (280 <= 302.4 < 308) -> cols 3..10
    # y: 200 // 28 = 7 (196 <= 200 < 224), 260 // 28 = 9 (252 <= 260 < 280)       -> rows 7..9
    # position = row * 36 + col: 255..262, 291..298, 327..334.
    expected = list(range(255, 263)) + list(range(291, 299)) + list(range(327, 335))
    got = mapper.map_box((100, 200, 300, 260), width=1000, height=700)
    assert got.dtype == np.int64 and got.shape == (24,)
    assert got.tolist() == expected


def test_qwen_box_touching_bottom_right_edge_is_clipped_to_last_token():
    # (990, 680, 1000, 700): x 997.92 // 28 = 35, 1008 // 28 = 36 -> clipped to 35 (grid_w - 1);
    # y 680 // 28 = 24, 700 // 28 = 25 -> clipped to 24. Position 24 * 36 + 35 = 899 (the last).
    mapper = QwenVLPatchMapper()
    assert mapper.map_box((990, 680, 1000, 700), width=1000, height=700).tolist() == [899]


def test_qwen_hand_example_max_pixels_binds():
    # min_pixels = 56*56, max_pixels = 100 * 28^2 = 78400. 1000x700: 700*1008 = 705600 > 78400, so
    # beta = sqrt(700000 / 78400) = 2.98807; h = floor(700/2.98807/28 = 8.37)*28 = 224,
    # w = floor(1000/2.98807/28 = 11.95)*28 = 308 -> grid 8 x 11 = 88 tokens.
    geometry = QwenVLGeometry(min_pixels=56 * 56, max_pixels=100 * 28 * 28)
    mapper = QwenVLPatchMapper(geometry)
    assert geometry.resized_size(700, 1000) == (224, 308)
    assert mapper.num_tokens(1000, 700) == 88
    # Box (100, 200, 300, 260), scale 308/1000 = 0.308 and 224/700 = 0.32:
    # x 30.8 // 28 = 1, 92.4 // 28 = 3 -> cols 1..3; y 64 // 28 = 2, 83.2 // 28 = 2 -> row 2.
    # positions 2*11 + 1..3 = 23, 24, 25.
    assert mapper.map_box((100, 200, 300, 260), width=1000, height=700).tolist() == [23, 24, 25]


def test_llava_next_hand_example_wide_image_1000x700():
    # select_best_resolution for (H, W) = (700, 1000) over pinpoints (h, w):
    #   (336, 672): scale min(0.672, 0.48) = 0.48  -> 480 x 336 = 161280
    #   (672, 336): scale 0.336 -> 336 x 235 = 78960
    #   (672, 672): scale min(0.672, 0.96) = 0.672 -> 672 x 470 = 315840   <- best
    #   (1008, 336): 78960;  (336, 1008): 161280
    # Padded crop grid: 2x2 crops of 24x24 -> 48 x 48 tokens. Wide image (1000/700 > 48/48), so rows
    # are unpadded: new_h = int(700 * 48/1000 = 33.6) = 33, padding (48 - 33) // 2 = 7, H' = 48 - 14 = 34.
    # W' = 48. num_tokens = 576 + 34 * (48 + 1) = 2242.
    mapper = LlavaNextPatchMapper()
    g = mapper.geometry
    assert g.best_resolution(700, 1000) == (672, 672)
    assert g.padded_grid(700, 1000) == (48, 48)
    assert g.unpadded_grid(700, 1000) == (34, 48)
    assert mapper.num_tokens(1000, 700) == 2242
    # p_w = 1000 // 48 = 20, p_h = 700 // 34 = 20.
    assert mapper.pixels_per_token(1000, 700) == (20, 20)
    # Box (100, 200, 300, 260): cols 100//20 = 5 .. 300//20 = 15; rows 200//20 = 10 .. 260//20 = 13.
    # position = 576 + row * 49 + col: row 10 -> 1071..1081, 11 -> 1120..1130, 12 -> 1169..1179,
    # 13 -> 1218..1228.
    expected = [576 + r * 49 + c for r in range(10, 14) for c in range(5, 16)]
    assert expected[0] == 1071 and expected[-1] == 1228
    got = mapper.map_box((100, 200, 300, 260), width=1000, height=700)
    assert got.tolist() == expected
    # Edge box (990, 690, 1000, 700): col 990//20 = 49 -> clipped to 47 (never the newline column 48);
    # row 690//20 = 34 -> clipped to 33. Position 576 + 33*49 + 47 = 2240 (2241 is the last newline).
    assert mapper.map_box((990, 690, 1000, 700), width=1000, height=700).tolist() == [2240]
    assert mapper.newline_positions(1000, 700)[-1] == 2241


def test_llava_next_hand_example_tall_image_300x800():
    # (H, W) = (800, 300): (1008, 336) has scale min(1.12, 1.26) = 1.12 -> 336 x 896, effective
    # min(301056, 240000) = 240000, beating (672, 336) / (672, 672) at 252 x 672 = 169344.
    # Padded grid 72 x 24. 300/800 = 0.375 > 24/72 = 0.333, so rows are unpadded:
    # new_h = int(800 * 24/300) = 64, padding (72 - 64) // 2 = 4, H' = 64; W' = 24.
    # num_tokens = 576 + 64 * 25 = 2176; p_w = 300 // 24 = 12, p_h = 800 // 64 = 12.
    mapper = LlavaNextPatchMapper()
    assert mapper.geometry.best_resolution(800, 300) == (1008, 336)
    assert mapper.geometry.unpadded_grid(800, 300) == (64, 24)
    assert mapper.num_tokens(300, 800) == 2176
    assert mapper.pixels_per_token(300, 800) == (12, 12)
    # Box (30, 100, 60, 110): cols 30//12 = 2 .. 60//12 = 5, rows 100//12 = 8 .. 110//12 = 9.
    # 576 + 8*25 + 2..5 = 778..781; 576 + 9*25 + 2..5 = 803..806.
    got = mapper.map_box((30, 100, 60, 110), width=300, height=800)
    assert got.tolist() == [778, 779, 780, 781, 803, 804, 805, 806]


def test_llava_next_base_and_crop_variant_hand_example():
    # Base grid: the image squashed to 336 x 336, 14 px patches, 24 x 24 tokens.
    # Box (100, 200, 300, 260) on 1000x700: x scale 336/1000 = 0.336 -> 33.6 // 14 = 2, 100.8 // 14 = 7;
    # y scale 336/700 = 0.48 -> 96 // 14 = 6, 124.8 // 14 = 8. rows 6..8, cols 2..7, row*24 + col:
    # 146..151, 170..175, 194..199, followed by the 44 crop positions of the fidelity rule.
    fidelity = LlavaNextPatchMapper().map_box((100, 200, 300, 260), width=1000, height=700)
    variant = LlavaNextPatchMapper(variant="base_and_crop").map_box((100, 200, 300, 260), width=1000, height=700)
    base = [r * 24 + c for r in range(6, 9) for c in range(2, 8)]
    assert variant.tolist() == base + fidelity.tolist()


def test_qwen_exact_arithmetic_on_a_token_boundary():
    # 440 x 300: h = round(300/28 = 10.71) * 28 = 308, w = round(440/28 = 15.71) * 28 = 448.
    # x = 55 scales to 55 * 448 / 440 = 56 exactly: column 56 // 28 = 2. In float64,
    # 55 * (448 / 440) = 55.99999999999999, column 1 (the original's arithmetic, kept as an option).
    assert QwenVLGeometry().resized_size(300, 440) == (308, 448)
    assert 55 * (448 / 440) < 56
    assert QwenVLPatchMapper().map_box((55, 0, 55, 0), width=440, height=300).tolist() == [2]
    assert QwenVLPatchMapper(arithmetic="float64").map_box((55, 0, 55, 0), width=440, height=300).tolist() == [1]
    with pytest.raises(PatchMappingError, match="unknown mapping arithmetic 'decimal'"):
        QwenVLPatchMapper(arithmetic="decimal")


@SETTINGS
@given(width=sides, height=sides, data=st.data())
def test_qwen_exact_mapping_equals_fraction_arithmetic(width, height, data):
    # Box edges drawn on token boundaries (the float nearest to k * 28 * W / W_r, and its two float
    # neighbours) and anywhere: the marked columns/rows are floor(Fraction(x) * W_r / W / 28), clipped.
    mapper = QwenVLPatchMapper()
    h_r, w_r = mapper.geometry.resized_size(height, width)
    grid_h, grid_w = h_r // 28, w_r // 28

    def coordinate(size, resized, grid):
        boundary = float(Fraction(data.draw(st.integers(0, grid)) * 28 * size, resized))
        nudged = float(np.nextafter(boundary, data.draw(st.sampled_from([-np.inf, np.inf]))))
        anywhere = data.draw(st.floats(0, size, allow_nan=False))
        return min(max(data.draw(st.sampled_from([boundary, nudged, anywhere])), 0.0), float(size))

    def index(value, size, resized, grid):
        return min(max(math.floor(Fraction(value) * resized / size / 28), 0), grid - 1)

    x0, x1 = sorted(coordinate(width, w_r, grid_w) for _ in range(2))
    y0, y1 = sorted(coordinate(height, h_r, grid_h) for _ in range(2))
    cols = range(index(x0, width, w_r, grid_w), index(x1, width, w_r, grid_w) + 1)
    rows = range(index(y0, height, h_r, grid_h), index(y1, height, h_r, grid_h) + 1)
    expected = [r * grid_w + c for r in rows for c in cols]
    assert mapper.map_box((x0, y0, x1, y1), width=width, height=height).tolist() == expected


def test_qwen3_vl_hand_example_1000x700():
    # 16 px patches, merge 2: 32 px tokens; SparseMM's bounds in tokens, [32 * 32^2, 16384 * 32^2].
    # h = round(700/32 = 21.875) * 32 = 704, w = round(1000/32 = 31.25) * 32 = 992 -> grid 22 x 31 = 682.
    mapper = QwenVLPatchMapper(QwenVLGeometry(16, 2, 32 * 32 * 32, 16384 * 32 * 32))
    assert mapper.geometry.resized_size(700, 1000) == (704, 992)
    assert mapper.num_tokens(1000, 700) == 682
    # Box (100, 200, 300, 260): x * 992/1000: 99.2 // 32 = 3, 297.6 // 32 = 9 -> cols 3..9;
    # y * 704/700: 201.14 // 32 = 6, 261.49 // 32 = 8 -> rows 6..8; row * 31 + col.
    expected = [r * 31 + c for r in range(6, 9) for c in range(3, 10)]
    assert expected[0] == 189 and expected[-1] == 257
    assert mapper.map_box((100, 200, 300, 260), width=1000, height=700).tolist() == expected
    with pytest.raises(InvalidGeometryError, match="Qwen3-VL has 16 px patches"):
        pm.make_mapper("qwen3_vl")


def test_llava_onevision_hand_example_1000x700():
    # Pinpoints 384 * (1..6) per side. (H, W) = (700, 1000): every (h, w) with h >= 700 and w >= 1000
    # keeps the whole image (effective 700000); the least padding among them is (768, 1152), 2 x 3 crops.
    # Padded grid 54 x 81 (27 tokens a crop). 1000/700 = 1.43 < 81/54 = 1.5, so columns are unpadded:
    # new_w = int(1000 * 54/700 = 77.14) = 77, padding (81 - 77) // 2 = 2, W'' = 77; H'' = 54.
    # anyres_max_9: ratio sqrt(54 * 77 / (9 * 27^2)) = 0.80 <= 1.1, no shrink.
    # num_tokens = 729 + 54 * (77 + 1) = 4941; p_w = 1000 // 77 = 12, p_h = 700 // 54 = 12.
    mapper = LlavaOnevisionPatchMapper()
    g = mapper.geometry
    assert g.base_tokens == 729
    assert g.best_resolution(700, 1000) == (768, 1152)
    assert g.padded_grid(700, 1000) == (54, 81)
    assert g.unpadded_grid(700, 1000) == (54, 77)
    assert mapper.num_tokens(1000, 700) == 4941
    assert mapper.pixels_per_token(1000, 700) == (12, 12)
    # Box (100, 200, 300, 260): cols 100 // 12 = 8 .. 300 // 12 = 25, rows 200 // 12 = 16 .. 260 // 12 = 21;
    # position 729 + row * 78 + col: 1985..2002 for row 16, ..., 2375..2392 for row 21.
    expected = [729 + r * 78 + c for r in range(16, 22) for c in range(8, 26)]
    assert expected[0] == 1985 and expected[-1] == 2392
    assert mapper.map_box((100, 200, 300, 260), width=1000, height=700).tolist() == expected
    # The shrink: 2000 x 2000 -> (2304, 2304), 6 x 6 crops, 162 x 162 (square, nothing unpadded);
    # ratio sqrt(162^2 / 6561) = 2 > 1.1 -> int(162 // 2) = 81 per side; 729 + 81 * 82 = 7371.
    assert g.unpadded_grid(2000, 2000) == (81, 81)
    assert mapper.num_tokens(2000, 2000) == 7371


def test_internvl_hand_example_1000x700():
    # Aspect 1000/700 = 1.43; among grids of <= 12 tiles, 3 cols x 2 rows (1.5, off by 0.071) is
    # closest (4 x 3: 0.095, 1 x 1: 0.43). Canvas 1344 x 896, 6 tiles + a thumbnail = 7 * 256 = 1792.
    mapper = InternVLPatchMapper()
    assert mapper.geometry.tile_grid(700, 1000) == (2, 3)
    assert mapper.geometry.grid(700, 1000) == (32, 48)
    assert mapper.num_tokens(1000, 700) == 1792
    # Box (100, 200, 300, 260): x * 1344/1000: 134.4 // 28 = 4, 403.2 // 28 = 14 -> cols 4..14;
    # y * 896/700: 256 // 28 = 9, 332.8 // 28 = 11 -> rows 9..11, all in tile 0: row * 16 + col.
    expected = [r * 16 + c for r in range(9, 12) for c in range(4, 15)]
    assert expected[0] == 148 and expected[-1] == 190
    got = mapper.map_box((100, 200, 300, 260), width=1000, height=700)
    assert got.tolist() == expected
    # base_and_crop adds the thumbnail (448 x 448, after the 6 tiles: offset 1536): x * 0.448:
    # 44.8 // 28 = 1 .. 134.4 // 28 = 4; y * 0.64: 128 // 28 = 4 .. 166.4 // 28 = 5.
    thumb = [1536 + r * 16 + c for r in range(4, 6) for c in range(1, 5)]
    assert thumb == [1601, 1602, 1603, 1604, 1617, 1618, 1619, 1620]
    variant = InternVLPatchMapper(variant="base_and_crop").map_box((100, 200, 300, 260), width=1000, height=700)
    assert variant.tolist() == expected + thumb
    # A box across tile borders, (300, 300, 400, 400): cols 403.2 // 28 = 14 .. 537.6 // 28 = 19,
    # rows 384 // 28 = 13 .. 512 // 28 = 18; global (R, C) is token (R % 16) * 16 + C % 16 of tile
    # (R // 16) * 3 + C // 16: (13, 14) -> 222, (13, 16) -> 256 + 208 = 464, (16, 14) -> 768 + 14 = 782,
    # (16, 16) -> 1024.
    across = InternVLPatchMapper().map_box((300, 300, 400, 400), width=1000, height=700).tolist()
    assert len(across) == 36 and {222, 464, 782, 1024} <= set(across)
    assert min(across) == 222 and max(across) == 1024 + 2 * 16 + 3


def test_degenerate_box_maps_to_the_token_under_it():
    # A point (500, 350) on Qwen 1000x700: 504 // 28 = 18, 350 // 28 = 12 -> 12*36 + 18 = 450.
    assert QwenVLPatchMapper().map_box((500, 350, 500, 350), width=1000, height=700).tolist() == [450]
    # On LLaVA-NeXT: 500 // 20 = 25, 350 // 20 = 17 -> 576 + 17*49 + 25 = 1434.
    assert LlavaNextPatchMapper().map_box((500, 350, 500, 350), width=1000, height=700).tolist() == [1434]


def test_box_sticking_out_is_clipped_to_the_image():
    # (-50, -50, 20, 20) clipped to (0, 0, 20, 20): Qwen 1000x700 -> col 0, row 0 -> [0].
    assert QwenVLPatchMapper().map_box((-50, -50, 20, 20), width=1000, height=700).tolist() == [0]
    # LLaVA-NeXT (p = 20 px): 20 // 20 = 1, so cols 0..1 and rows 0..1 -> 576, 577, 576+49, 576+50.
    assert LlavaNextPatchMapper().map_box((-50, -50, 20, 20), width=1000, height=700).tolist() == [576, 577, 625, 626]
    # and (-50, -50, 19, 19) -> 19 // 20 = 0 -> only the first crop token.
    assert LlavaNextPatchMapper().map_box((-50, -50, 19, 19), width=1000, height=700).tolist() == [576]


def test_box_accepts_synthdog_coord_and_tuple():
    coord = [[100.0, 200.0], [300.0, 260.0]]
    a = QwenVLPatchMapper().map_box(coord, width=1000, height=700)
    b = QwenVLPatchMapper().map_box(Box(100, 200, 300, 260), width=1000, height=700)
    assert a.tolist() == b.tolist()


# ----------------------------------------------------------------------------------------------
# Geometry equals transformers' own functions over many sizes
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(height=sides, width=sides, bounds=st.sampled_from([(32 * 28 * 28, 16384 * 28 * 28), (56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 64 * 28 * 28)]))
def test_qwen_resized_size_equals_transformers_smart_resize(height, width, bounds):
    min_pixels, max_pixels = bounds
    geometry = QwenVLGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    expected = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert geometry.resized_size(height, width) == tuple(expected)
    # the image processor's own patch count, / merge_size^2, is the LLM token count
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    assert geometry.num_tokens(height, width) == ip.get_number_of_image_patches(height, width) // 4


def _transformers_llava_count(height: int, width: int, pinpoints: list[list[int]]) -> int:
    """LlavaNextProcessor._get_number_of_features on a 336 px crop, 14 px patches (no tokenizer)."""
    fake = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=14,
        num_additional_image_tokens=0,
        _get_unpadded_features=partial(LlavaNextProcessor._get_unpadded_features, None),
    )
    return LlavaNextProcessor._get_number_of_features(fake, height, width, 336, 336)


@SETTINGS
@given(height=sides, width=sides)
def test_llava_next_geometry_equals_transformers(height, width):
    geometry = LlavaNextGeometry()
    pins = [list(p) for p in geometry.grid_pinpoints]
    assert geometry.best_resolution(height, width) == tuple(select_best_resolution((height, width), pins))
    # the model's own unpadding of the crop-feature grid
    n_h, n_w = get_anyres_image_grid_shape((height, width), pins, 336)
    features = torch.zeros(1, n_h * 24, n_w * 24)
    unpadded = unpad_image(features, [height, width])
    assert geometry.unpadded_grid(height, width) == tuple(unpadded.shape[1:])
    # the processor's token count (base + unpadded + newlines)
    assert geometry.num_tokens(height, width) == _transformers_llava_count(height, width, pins)


# ----------------------------------------------------------------------------------------------
# Invariants of the mapping
# ----------------------------------------------------------------------------------------------


@st.composite
def image_and_box(draw):
    width, height = draw(sides), draw(sides)
    x0 = draw(st.floats(0, width, allow_nan=False))
    x1 = draw(st.floats(x0, width, allow_nan=False))
    y0 = draw(st.floats(0, height, allow_nan=False))
    y1 = draw(st.floats(y0, height, allow_nan=False))
    return width, height, (x0, y0, x1, y1)


MAPPERS = [
    QwenVLPatchMapper(),
    QwenVLPatchMapper(arithmetic="float64"),
    QwenVLPatchMapper(QwenVLGeometry(16, 2, 32 * 32 * 32, 16384 * 32 * 32)),  # Qwen3-VL
    LlavaNextPatchMapper(),
    LlavaNextPatchMapper(variant="base_and_crop"),
    LlavaOnevisionPatchMapper(),
    LlavaOnevisionPatchMapper(variant="base_and_crop"),
    InternVLPatchMapper(),
    InternVLPatchMapper(variant="base_and_crop"),
]


@SETTINGS
@given(case=image_and_box(), mapper=st.sampled_from(MAPPERS))
def test_every_in_image_box_maps_inside_the_image_span(case, mapper):
    width, height, box = case
    positions = mapper.map_box(box, width=width, height=height)
    assert positions.dtype == np.int64 and positions.ndim == 1
    assert positions.size >= 1
    assert np.all(np.diff(positions) > 0), "sorted and unique"
    assert positions.min() >= 0 and positions.max() < mapper.num_tokens(width, height)


@SETTINGS
@given(case=image_and_box())
def test_llava_next_never_marks_newline_or_base_tokens(case):
    width, height, box = case
    fidelity = LlavaNextPatchMapper().map_box(box, width=width, height=height)
    grid_h, grid_w = LlavaNextGeometry().unpadded_grid(height, width)
    assert fidelity.min() >= 576, "fidelity never includes base tokens"
    assert not np.any((fidelity - 576) % (grid_w + 1) == grid_w), "no newline column"
    assert not np.isin(fidelity, LlavaNextPatchMapper().newline_positions(width, height)).any()
    variant = LlavaNextPatchMapper(variant="base_and_crop").map_box(box, width=width, height=height)
    assert set(fidelity.tolist()) <= set(variant.tolist())
    base = variant[variant < 576]
    assert base.size >= 1 and base.max() < 24 * 24
    assert variant[variant >= 576].tolist() == fidelity.tolist()


@SETTINGS
@given(case=image_and_box(), mapper=st.sampled_from(MAPPERS), shrink=st.tuples(*[st.floats(0, 1)] * 4))
def test_a_box_inside_another_maps_to_a_subset(case, mapper, shrink):
    width, height, (x0, y0, x1, y1) = case
    a, b, c, d = shrink
    inner = (x0 + a * (x1 - x0) / 2, y0 + b * (y1 - y0) / 2, x1 - c * (x1 - x0) / 2, y1 - d * (y1 - y0) / 2)
    inner = (inner[0], inner[1], max(inner[0], inner[2]), max(inner[1], inner[3]))
    outer_pos = set(mapper.map_box((x0, y0, x1, y1), width=width, height=height).tolist())
    inner_pos = set(mapper.map_box(inner, width=width, height=height).tolist())
    assert inner_pos <= outer_pos


@SETTINGS
@given(width=sides, height=sides, data=st.data())
def test_llava_next_marked_tokens_are_exactly_the_cells_the_box_touches(width, height, data):
    # Brute force over LlavaNextPatchMapper.token_boxes (integer boxes keep the arithmetic exact):
    # a crop token is marked iff its cell [x0, x1) x [y0, y1) (the last row/column closed at the
    # image edge) meets the closed box.
    mapper = LlavaNextPatchMapper()
    bx0 = data.draw(st.integers(0, width))
    bx1 = data.draw(st.integers(bx0, width))
    by0 = data.draw(st.integers(0, height))
    by1 = data.draw(st.integers(by0, height))
    cells = mapper.token_boxes(width, height)
    valid = ~np.isnan(cells[:, 0])
    valid[:576] = False
    cx0, cy0, cx1, cy1 = cells.T
    hit_x = (cx0 <= bx1) & ((bx0 < cx1) | (cx1 == width))
    hit_y = (cy0 <= by1) & ((by0 < cy1) | (cy1 == height))
    expected = np.flatnonzero(valid & hit_x & hit_y)
    got = mapper.map_box((bx0, by0, bx1, by1), width=width, height=height)
    assert got.tolist() == expected.tolist()


def test_token_boxes_shapes_and_newlines():
    q = QwenVLPatchMapper().token_boxes(1000, 700)
    assert q.shape == (900, 4)
    assert q[-1, 2] == pytest.approx(1000) and q[-1, 3] == pytest.approx(700)
    cells = LlavaNextPatchMapper().token_boxes(1000, 700)
    assert cells.shape == (2242, 4)
    newlines = LlavaNextPatchMapper().newline_positions(1000, 700)
    assert np.isnan(cells[newlines]).all()
    assert not np.isnan(np.delete(cells, newlines, axis=0)).any()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_box_outside_image_names_box_and_image_size():
    with pytest.raises(BoxOutsideImageError, match=r"\(1200\.0, 10\.0, 1300\.0, 20\.0\).*1000x700"):
        QwenVLPatchMapper().map_box((1200, 10, 1300, 20), width=1000, height=700)
    with pytest.raises(BoxOutsideImageError):
        LlavaNextPatchMapper().map_box((10, -30, 20, -1), width=1000, height=700)


def test_inverted_and_malformed_boxes_are_rejected():
    with pytest.raises(InvalidBoxError, match="inverted"):
        Box(10, 10, 5, 20)
    with pytest.raises(InvalidBoxError, match="inverted"):
        QwenVLPatchMapper().map_box([[10, 30], [20, 20]], width=100, height=100)
    with pytest.raises(InvalidBoxError, match="finite"):
        Box(0, 0, float("nan"), 1)
    with pytest.raises(InvalidBoxError, match=r"\[\[xmin, ymin\], \[xmax, ymax\]\]"):
        Box.from_coord([1, 2, 3])
    with pytest.raises(InvalidBoxError):
        Box.parse("0,0,1,1")
    with pytest.raises(InvalidBoxError):
        Box.parse((1, 2, 3))


def test_unknown_model_type_lists_supported_ones():
    with pytest.raises(UnsupportedModelTypeError, match="qwen2_vl, qwen2_5_vl, llava_next"):
        pm.make_mapper("llava")
    with pytest.raises(UnsupportedModelTypeError):
        pm.geometry_from_processor(object(), "idefics3")


def test_bad_image_sizes_are_rejected():
    with pytest.raises(InvalidImageSizeError, match="image width must be an int >= 1, got 0"):
        QwenVLPatchMapper().num_tokens(0, 10)
    with pytest.raises(InvalidImageSizeError, match="int"):
        QwenVLPatchMapper().num_tokens(10.5, 10)
    with pytest.raises(InvalidImageSizeError, match="aspect ratio"):
        QwenVLPatchMapper().num_tokens(28 * 201, 28)
    # 20x20 px on LLaVA-NeXT: crop grid 24 x 24, so 20 // 24 = 0 px per token (the original divides by 0)
    with pytest.raises(InvalidImageSizeError, match="0 px per token"):
        LlavaNextPatchMapper().map_box((0, 0, 5, 5), width=20, height=20)


def test_geometry_and_mapper_validation():
    with pytest.raises(InvalidGeometryError, match="min_pixels"):
        QwenVLGeometry(min_pixels=1000, max_pixels=10)
    with pytest.raises(InvalidGeometryError, match="patch_size"):
        QwenVLGeometry(patch_size=0)
    with pytest.raises(InvalidGeometryError, match="multiple of base_size"):
        LlavaNextGeometry(grid_pinpoints=((336, 600),))
    with pytest.raises(InvalidGeometryError, match="multiple of patch_size"):
        LlavaNextGeometry(base_size=330)
    with pytest.raises(InvalidGeometryError, match="empty"):
        LlavaNextGeometry(grid_pinpoints=())
    with pytest.raises(PatchMappingError, match="base_and_crop"):
        LlavaNextPatchMapper(variant="base")
    with pytest.raises(PatchMappingError, match="fidelity"):
        QwenVLPatchMapper(variant="base_and_crop")
    with pytest.raises(InvalidGeometryError):
        QwenVLPatchMapper(geometry=LlavaNextGeometry())
    # pinpoints given as lists are normalised to tuples (hashable, comparable)
    assert LlavaNextGeometry(grid_pinpoints=[[336, 672]]).grid_pinpoints == ((336, 672),)


# ----------------------------------------------------------------------------------------------
# Construction from a processor
# ----------------------------------------------------------------------------------------------


def test_geometry_from_processor_reads_the_real_settings():
    qwen = types.SimpleNamespace(image_processor=Qwen2VLImageProcessorPil(min_pixels=25088, max_pixels=12845056))
    assert pm.geometry_from_processor(qwen, "qwen2_5_vl") == QwenVLGeometry(14, 2, 25088, 12845056)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    llava = types.SimpleNamespace(
        image_processor=ip, patch_size=14, num_additional_image_tokens=1, vision_feature_select_strategy="default"
    )
    assert pm.geometry_from_processor(llava, "llava_next") == LlavaNextGeometry()
    assert isinstance(pm.mapper_from_processor(llava, "llava_next", "base_and_crop"), LlavaNextPatchMapper)
    # a CLS token kept in the base block is not a layout the mapping supports
    cls_kept = types.SimpleNamespace(
        image_processor=ip, patch_size=14, num_additional_image_tokens=1, vision_feature_select_strategy="full"
    )
    with pytest.raises(InvalidGeometryError, match="extra base-image tokens"):
        pm.geometry_from_processor(cls_kept, "llava_next")
    no_patch = types.SimpleNamespace(image_processor=ip, patch_size=None)
    with pytest.raises(InvalidGeometryError, match="patch_size"):
        pm.geometry_from_processor(no_patch, "llava_next")
    with pytest.raises(InvalidGeometryError, match="image_processor"):
        pm.geometry_from_processor(types.SimpleNamespace(), "qwen2_vl")


# ----------------------------------------------------------------------------------------------
# Documents -> records -> regions.jsonl
# ----------------------------------------------------------------------------------------------


def _doc():
    return {
        "doc_id": "doc-0",
        "image": Image.new("RGB", (1000, 700), "white"),
        "2_coord": [
            {"chunk": "hello", "coord": [[100.0, 200.0], [300.0, 260.0]]},
            {"chunk": "gone", "coord": [[1100.0, 10.0], [1200.0, 20.0]]},
        ],
        "char_coord": [
            {"char": "h", "coord": [[100.0, 200.0], [118.0, 260.0]], "chunk_index": 0},
            {"char": "x", "coord": [[50.0, 50.0], [40.0, 60.0]], "chunk_index": 0},
        ],
    }


def test_map_document_record_layout_and_skips():
    mapper = QwenVLPatchMapper()
    record = pm.map_document(_doc(), mapper, "qwen2_vl", image_token_start=15, num_image_tokens=900)
    assert record["image_size"] == [1000, 700]
    assert record["geometry"] == {"resized_height": 700, "resized_width": 1008, "grid_h": 25, "grid_w": 36}
    assert record["image_token_start"] == 15 and record["num_image_tokens"] == 900
    assert record["chunks"][0]["positions"] == mapper.map_box((100, 200, 300, 260), width=1000, height=700).tolist()
    # the outside chunk and the inverted char keep their slots (indices stay aligned) with no positions
    assert record["chunks"][1] == {"chunk": "gone", "box": [1100.0, 10.0, 1200.0, 20.0], "positions": []}
    assert record["chars"][1]["positions"] == [] and record["chars"][1]["box"] is None
    # char 'h': x 100.8//28 = 3 .. 118.944//28 = 4, rows 7..9 -> 255, 256, 291, 292, 327, 328
    assert record["chars"][0]["positions"] == [255, 256, 291, 292, 327, 328]
    kinds = [(s["kind"], s["index"]) for s in record["skipped"]]
    assert kinds == [("chunk", 1), ("char", 1)]
    assert "outside" in record["skipped"][0]["reason"] and "inverted" in record["skipped"][1]["reason"]


def test_map_document_rejects_a_token_count_mismatch():
    with pytest.raises(TokenCountMismatchError, match="expects 900 image tokens.*emitted 899"):
        pm.map_document(_doc(), QwenVLPatchMapper(), "qwen2_vl", image_token_start=0, num_image_tokens=899)


def test_load_regions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"written by step 02 \(patch mapping"):
        pm.load_regions(tmp_path / "nope.jsonl")
    bad = tmp_path / "regions.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(PatchMappingError, match="not valid JSON"):
        pm.load_regions(bad)
    bad.write_text(json.dumps({"doc_id": "x"}) + "\n")
    with pytest.raises(PatchMappingError, match="lacks keys"):
        pm.load_regions(bad)


def test_chunk_box_picks_the_chunk_and_rejects_a_bad_index():
    doc = {"doc_id": 3, "2_coord": [{"chunk": "AB", "coord": [[1.0, 2.0], [3.0, 4.0]]}]}
    assert pm.chunk_box(doc, 0) == ("AB", pm.Box(1.0, 2.0, 3.0, 4.0))
    with pytest.raises(IndexError, match="has 1 chunks; chunk index 5 is out of range"):
        pm.chunk_box(doc, 5)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def test_token_grid_figure_lights_exactly_the_region(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from sparsemm_utils.plots.patches import plot_region_sizes, plot_token_grids

    image = Image.new("RGB", (1000, 700), "white")
    mappers = {
        "qwen2_vl": QwenVLPatchMapper(),
        "llava_next": LlavaNextPatchMapper(variant="base_and_crop"),
        "llava_onevision": LlavaOnevisionPatchMapper(),
        "internvl": InternVLPatchMapper(variant="base_and_crop"),
    }
    fig = plot_token_grids(image, mappers, (100, 200, 300, 260), chunk="hello")
    axes = fig.axes
    assert len(axes) == 5  # Qwen grid, LLaVA-NeXT crop grid, LLaVA-NeXT base grid, OneVision crop grid, InternVL tiles
    # per panel: [grid cells, lit cells]; sizes from the hand examples: Qwen 900 cells / 24 lit,
    # crop 34*48 = 1632 cells / 44 lit, base 576 cells / 18 lit, OneVision crop 54*77 = 4158 / 6 x 18 = 108,
    # InternVL 6 tiles of 256 = 1536 / 33 (the thumbnail's 8 are not drawn)
    sizes = [[len(c.get_paths()) for c in ax.collections if isinstance(c, PolyCollection)] for ax in axes]
    assert sizes == [[900, 24], [1632, 44], [576, 18], [4158, 108], [1536, 33]]
    assert "24 tokens lit of 900" in axes[0].get_title()
    assert all(ax.images[0].get_cmap().name == "gray" for ax in axes)  # plots.style's "image" colormap
    fig.savefig(tmp_path / "grid.png")
    plt.close(fig)
    record = pm.map_document(_doc(), QwenVLPatchMapper(), "qwen2_vl", image_token_start=0, num_image_tokens=900)
    fig = plot_region_sizes([record])
    assert fig.axes[0].get_xlabel().startswith("visual tokens per region")
    plt.close(fig)
