"""The page generator's config: every invalid parameter gets a clear DocumentConfigError (the step's
own parameters are tested in test_steps_ocr_annotation.py)."""

from __future__ import annotations

import pytest

from sparsemm_utils.document_dataset import DocumentConfigError
from sparsemm_utils.page_generator import UPPER_DIGITS, DocumentGeneratorConfig


def test_defaults_are_valid_and_documented_choices():
    cfg = DocumentGeneratorConfig()
    assert cfg.charset == UPPER_DIGITS and cfg.chunk_level == "line" and cfg.layout == "free"
    assert cfg.font_name == "pillow"
    assert DocumentGeneratorConfig(layout="grid").font_name == "dejavu-sans-mono"


def test_lists_from_yaml_become_tuples():
    cfg = DocumentGeneratorConfig(font_size_range=[14, 18], line_spacing_range=[1, 2])
    assert cfg.font_size_range == (14, 18) and cfg.line_spacing_range == (1.0, 2.0)


def test_charset_is_deduplicated_in_order():
    assert DocumentGeneratorConfig(charset="ABBA12").charset == "AB12"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_documents=0), "n_documents must be an int >= 1"),
        (dict(n_documents=2.5), "n_documents"),
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(chunk_level="char"), "chunk_level must be one of 'line', 'word'"),
        (dict(layout="columns"), "layout must be one of"),
        (dict(charset=""), "charset must be a non-empty string"),
        (dict(charset="AB C"), "must not contain whitespace"),
        (dict(font="no/such/font.ttf"), "no such file"),
        (dict(font_size_range=(20, 10)), "font_size_range must satisfy"),
        (dict(font_size_range=(10,)), "must be a pair"),
        (dict(font_size_range="10,20"), "must be a pair"),
        (dict(font_size_range=(10.5, 20)), "must hold integers"),
        (dict(lines_per_page_range=(0, 3)), "lines_per_page_range must satisfy 1 <= min"),
        (dict(word_length_range=(3, 2)), "word_length_range"),
        (dict(line_spacing_range=(0.5, 1.0)), "line_spacing_range must satisfy 1.0 <= min"),
        (dict(background_range=(100, 300)), "background_range must satisfy 0 <= min <= max <= 255"),
        (dict(ink_range=(0, 230), background_range=(225, 255)), "ink must be darker than paper"),
        (dict(layout="grid", font_size_range=(30, 40)), "fit strictly inside a 28 px cell"),
        (dict(layout="grid", page_width_range=(20, 40)), "must hold at least one 28 px cell"),
        (dict(font_size_range=(60, 80), page_height_range=(40, 60)), "cannot hold one character"),
        (dict(charset="A\u4e00"), "has no glyph for '\u4e00'"),
        (dict(charset="A\ufeff", font="dejavu-sans-mono"), "draw no ink"),
    ],
)
def test_invalid_generator_parameters(kwargs, match):
    with pytest.raises(DocumentConfigError, match=match):
        DocumentGeneratorConfig(**kwargs)
