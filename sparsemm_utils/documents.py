"""Step 01: OCR documents with chunk boxes and per-character boxes (docs/method.md §2).

SparseMM scores a head by asking whether, while the model *reads* a document aloud, the head's
strongest attention lands on the image patch the current output token was read from. That needs
documents whose text positions are known: each row holds an image and its OCR **chunks** (a
line or a word of text with its box). The original study uses the first 1000 rows of the HF
dataset ``nnethercott/synthdog-en-detection`` (see :mod:`sparsemm_utils.synthdog`); offline, this
module *generates* documents from a seed, in the same schema plus per-character boxes.

Schema of a step-01 dataset (``FEATURES``; :func:`save_documents` writes it with
``save_to_disk`` into ``<run_dir>/01_ocr_annotation/documents/``):

- ``doc_id`` (int64): the row's id; for SynthDoG, its index in dataset order.
- ``image`` (``datasets.Image``): the page (PNG for generated pages, the original bytes for
  SynthDoG).
- ``2_coord``: the ORIGINAL field, a list of structs ``{"chunk": str, "coord": [[xmin, ymin],
  [xmax, ymax]]}`` (floats, original-image pixels, a list of structs and not a JSON string, as
  on the hub: ``list: [chunk: string, coord: sequence<sequence<float64>>]``).
- ``char_coord``: a list of ``{"char": str, "coord": [[x0, y0], [x1, y1]], "chunk_index": int}``,
  one per non-whitespace character, in reading order; ``chunk_index`` indexes ``2_coord``.
  Empty for SynthDoG (the original has no character boxes).
- ``source`` (str): ``"synthetic"`` or ``"synthdog"``.

Box convention: pixel edges, ``x1``/``y1`` exclusive, so a glyph whose ink covers pixel columns
``12..21`` has ``x0 = 12, x1 = 22``. The image is the closed rectangle ``[0, W] x [0, H]`` (the
convention of step 02). A generated chunk box is the tight union of its characters' ink boxes
(PaddleOCR's boxes on SynthDoG are a few pixels looser).

The generator (:class:`DocumentGeneratorConfig`, :func:`generate_documents`) has two layouts:

- ``"free"``: lines of words at random indents and line spacings, one font size per line,
  a proportional font by default (Pillow's bundled Aileron);
- ``"grid"``: a monospace page of ``cell_size`` x ``cell_size`` cells (28 px = one Qwen2-VL
  visual token: 14 px patches merged 2 x 2); each character is centred in its own cell with a
  small jitter and its ink box is kept strictly inside the cell, so under the patch-mapping rule
  ``floor(x / 28)`` every character lies in exactly one visual token. This is the layout a
  character-level tiny reader can learn (see ``docs/tiny_reader.md``); the default font for it
  is the shipped ``data/fonts/DejaVuSansMono.ttf``.

Default character set: ``A-Z`` and ``0-9`` (:data:`UPPER_DIGITS`, 36 glyphs). Upper case and
digits have no descenders and similar heights, so boxes are comparable across characters and a
character-level tokenizer stays small; ``charset`` takes any string of non-whitespace
characters (:data:`UPPER_DIGITS_UNAMBIGUOUS` drops the look-alikes 0/O, 1/I, 5/S, 8/B, 2/Z).

Reproducibility: document ``k`` is drawn from its own generator ``numpy.random.default_rng([seed,
k])`` (so the first ``n`` documents do not depend on ``n_documents``), glyphs are drawn one by
one at integer positions (no kerning or shaping engine involved), PNG bytes are encoded by
Pillow with fixed settings, and :func:`save_documents` sets the dataset fingerprint to a hash of
the content (:func:`content_fingerprint`): the same config gives byte-identical files with the
pinned Pillow and datasets.

Validation (:func:`validate_rows`, both sources; docs/method.md §2 gives the schema, these rules
are this project's). With ``on_bad="skip"`` (default) each problem is counted and reported
with its reason, row and index; with ``on_bad="raise"`` the first one raises
:class:`BadDocumentError` naming the row:

- unreadable or corrupt image (fully decoded to find truncation), duplicate ``doc_id``: the
  row is skipped;
- empty or whitespace chunk text, malformed or non-finite box, inverted box (``x1 < x0`` or
  ``y1 < y0``), box with no point in the image: the chunk is skipped, and so are its characters;
- box partly outside the image: **clipped** to the image (clip-and-count, not skip: PaddleOCR
  boxes may overhang the page by a pixel or two, and the text is still there);
- a character entry with a bad ``chunk_index``, not exactly one non-whitespace character, not
  found in its chunk's text, or with a bad box: that character is skipped (partly outside:
  clipped);
- a document left with no chunks is **kept** and noted (action ``"kept"``, never raised): the
  original averages head scores over all its samples (docs/method.md §4), chunkless ones included.

Skipped chunks are removed and ``chunk_index`` of the remaining characters renumbered.
Degenerate boxes (zero width or height) are valid, as in step 02.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

import datasets
from datasets import Dataset, Features, List, Value

from .runs import repo_root

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "STEP",
    "SOURCES",
    "UPPER_DIGITS",
    "UPPER_DIGITS_UNAMBIGUOUS",
    "ALNUM",
    "FONTS",
    "FEATURES",
    "COLUMNS",
    "DocumentError",
    "DocumentConfigError",
    "BadDocumentError",
    "SchemaMismatchError",
    "DocumentGeneratorConfig",
    "OcrAnnotationConfig",
    "Issue",
    "ValidationReport",
    "generate_documents",
    "render_document",
    "layout_document",
    "PageLayout",
    "place_in_cell",
    "build_documents",
    "validate_rows",
    "save_documents",
    "load_documents",
    "content_fingerprint",
    "write_report",
    "run_ocr_annotation",
    "reading_text",
    "document_statistics",
    "chunk_statistics",
    "char_statistics",
]

STEP = "01_ocr_annotation"
SOURCES = ("synthetic", "synthdog")

#: Default character set: upper-case letters and digits (36 glyphs, no descenders).
UPPER_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: ``UPPER_DIGITS`` without the pairs a small reader confuses (0/O, 1/I, 5/S, 8/B, 2/Z).
UPPER_DIGITS_UNAMBIGUOUS = "ACDEFGHJKLMNPQRTUVWXY34679"
#: Upper and lower case letters and digits (62 glyphs; lower case adds descenders).
ALNUM = UPPER_DIGITS + "abcdefghijklmnopqrstuvwxyz"

#: Named fonts. ``"pillow"`` is the FreeType font bundled inside Pillow
#: (``ImageFont.load_default(size)``, Aileron Regular, proportional); ``"dejavu-sans-mono"`` is
#: shipped in ``data/fonts`` (Bitstream Vera license, see ``data/fonts/LICENSE_DEJAVU.txt``).
FONTS: dict[str, Path | None] = {
    "pillow": None,
    "dejavu-sans-mono": repo_root() / "data" / "fonts" / "DejaVuSansMono.ttf",
}

_COORD = List(List(Value("float64")))
#: The step-01 schema (column order included). ``2_coord`` mirrors the hub dataset exactly.
FEATURES = Features(
    {
        "doc_id": Value("int64"),
        "image": datasets.Image(),
        "2_coord": List({"chunk": Value("string"), "coord": _COORD}),
        "char_coord": List({"char": Value("string"), "coord": _COORD, "chunk_index": Value("int64")}),
        "source": Value("string"),
    }
)
COLUMNS = tuple(FEATURES)


# --------------------------------------------------------------------------------------------
# errors


class DocumentError(ValueError):
    """Base class of step-01 errors."""


class DocumentConfigError(DocumentError):
    """A generator or step parameter is invalid; the message names it and the accepted values."""


class BadDocumentError(DocumentError):
    """A row failed validation under ``on_bad="raise"``.

    Attributes: ``row`` (position in the input, dataset order), ``doc_id``, ``reason`` (a short
    code such as ``"inverted_box"``) and ``detail``."""

    def __init__(self, row: int, doc_id: Any, reason: str, detail: str) -> None:
        self.row, self.doc_id, self.reason, self.detail = row, doc_id, reason, detail
        super().__init__(
            f"row {row} (doc_id {doc_id}): {reason.replace('_', ' ')}: {detail}. Fix or drop this "
            "row, or validate with on_bad='skip' to skip what is bad and record it in the "
            "annotation report."
        )


class SchemaMismatchError(DocumentError):
    """A dataset does not have the columns (or types) the step expects."""


# --------------------------------------------------------------------------------------------
# configuration


def _int_range(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> tuple[int, int]:
    """Validate an inclusive integer range ``(a, b)`` with ``lo <= a <= b (<= hi)``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise DocumentConfigError(f"{owner}.{name} must be a pair (min, max), got {value!r}")
    a, b = value
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (a, b)):
        raise DocumentConfigError(f"{owner}.{name} must hold integers, got {value!r}")
    a, b = int(a), int(b)
    if not lo <= a <= b or (hi is not None and b > hi):
        bound = f"{lo} <= min <= max" + (f" <= {hi}" if hi is not None else "")
        raise DocumentConfigError(f"{owner}.{name} must satisfy {bound}, got {value!r}")
    return a, b


def _float_range(owner: str, name: str, value: Any, lo: float) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise DocumentConfigError(f"{owner}.{name} must be a pair (min, max), got {value!r}")
    a, b = (float(v) for v in value)
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b):
        raise DocumentConfigError(f"{owner}.{name} must satisfy {lo} <= min <= max, got {value!r}")
    return a, b


def _choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise DocumentConfigError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")
    return value


def _nonneg_int(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DocumentConfigError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class DocumentGeneratorConfig:
    """How :func:`generate_documents` draws synthetic OCR pages (docs/method.md §2, offline data).

    Every ``*_range`` is an inclusive ``(min, max)`` pair sampled uniformly per document
    (page size, grid font size), per line (free-layout font size, words per line, line spacing)
    or per word (word length). Document ``k`` uses ``numpy.random.default_rng([seed, k])``.

    - ``chunk_level``: ``"line"`` (a chunk is a line, words joined by one space, as PaddleOCR's
      lines in SynthDoG) or ``"word"``. Both levels of one seed share the same images.
    - ``layout``: ``"free"`` or ``"grid"`` (module docstring). In the grid, page sizes are
      rounded down to multiples of ``cell_size``, words are separated by one empty cell and
      lines sit on distinct random rows; ``margin`` and ``line_spacing_range`` apply to
      ``"free"`` only, ``cell_size`` and ``jitter`` to ``"grid"`` only.
    - ``font``: ``"auto"`` (``"dejavu-sans-mono"`` for the grid, ``"pillow"`` for free pages), a
      name in :data:`FONTS`, or a path to a ``.ttf``/``.otf`` file.
    - ``background_range`` / ``ink_range``: grey levels (0-255) of paper and ink per document.
    """

    n_documents: int = 48
    seed: int = 0
    chunk_level: str = "line"
    layout: str = "free"
    charset: str = UPPER_DIGITS
    font: str = "auto"
    font_size_range: tuple[int, int] = (16, 24)
    page_width_range: tuple[int, int] = (336, 560)
    page_height_range: tuple[int, int] = (224, 392)
    lines_per_page_range: tuple[int, int] = (2, 8)
    words_per_line_range: tuple[int, int] = (1, 5)
    word_length_range: tuple[int, int] = (1, 8)
    margin: int = 8
    line_spacing_range: tuple[float, float] = (1.1, 1.8)
    cell_size: int = 28
    jitter: int = 3
    background_range: tuple[int, int] = (225, 255)
    ink_range: tuple[int, int] = (0, 60)

    def __post_init__(self) -> None:
        own = type(self).__name__
        self.n_documents = _nonneg_int(own, "n_documents", self.n_documents, 1)
        self.seed = _nonneg_int(own, "seed", self.seed)
        _choice(own, "chunk_level", self.chunk_level, ("line", "word"))
        _choice(own, "layout", self.layout, ("free", "grid"))
        if not isinstance(self.charset, str) or not self.charset:
            raise DocumentConfigError(f"{own}.charset must be a non-empty string, got {self.charset!r}")
        if any(c.isspace() for c in self.charset):
            raise DocumentConfigError(
                f"{own}.charset must not contain whitespace (words are separated by the layout), "
                f"got {self.charset!r}"
            )
        self.charset = "".join(dict.fromkeys(self.charset))  # de-duplicate, keep order
        if self.font != "auto" and self.font not in FONTS and not Path(self.font).is_file():
            raise DocumentConfigError(
                f"{own}.font must be 'auto', one of {list(FONTS)} or a path to a font file, "
                f"got {self.font!r} (no such file)"
            )
        self.font_size_range = _int_range(own, "font_size_range", self.font_size_range, 4, 200)
        self.page_width_range = _int_range(own, "page_width_range", self.page_width_range, 8, 8192)
        self.page_height_range = _int_range(own, "page_height_range", self.page_height_range, 8, 8192)
        self.lines_per_page_range = _int_range(own, "lines_per_page_range", self.lines_per_page_range, 1)
        self.words_per_line_range = _int_range(own, "words_per_line_range", self.words_per_line_range, 1)
        self.word_length_range = _int_range(own, "word_length_range", self.word_length_range, 1)
        self.margin = _nonneg_int(own, "margin", self.margin)
        self.line_spacing_range = _float_range(own, "line_spacing_range", self.line_spacing_range, 1.0)
        self.cell_size = _nonneg_int(own, "cell_size", self.cell_size, 4)
        self.jitter = _nonneg_int(own, "jitter", self.jitter)
        self.background_range = _int_range(own, "background_range", self.background_range, 0, 255)
        self.ink_range = _int_range(own, "ink_range", self.ink_range, 0, 255)
        if self.ink_range[1] >= self.background_range[0]:
            raise DocumentConfigError(
                f"{own}: ink must be darker than paper: ink_range max {self.ink_range[1]} must be "
                f"below background_range min {self.background_range[0]}"
            )
        self._check_geometry()

    @property
    def font_name(self) -> str:
        """The font actually used (``"auto"`` resolved by layout)."""
        if self.font != "auto":
            return self.font
        return "dejavu-sans-mono" if self.layout == "grid" else "pillow"

    def _check_geometry(self) -> None:
        """Every glyph at the largest size must fit the smallest page (or a grid cell)."""
        own = type(self).__name__
        size = self.font_size_range[1]
        boxes = [_glyph_ink_box(self.font_name, size, c) for c in self.charset]
        missing = [c for c in self.charset if not _has_glyph(self.font_name, size, c)]
        if missing:
            raise DocumentConfigError(
                f"{own}: font {self.font_name!r} has no glyph for {''.join(missing)!r} (it would "
                "draw a placeholder box); remove them from charset or choose another font"
            )
        empty = [c for c, b in zip(self.charset, boxes) if b is None]
        if empty:
            raise DocumentConfigError(
                f"{own}: characters {''.join(empty)!r} draw no ink in font {self.font_name!r}; "
                "remove them from charset or choose another font"
            )
        width = max(b[2] - b[0] for b in boxes)
        height = max(b[3] - b[1] for b in boxes)
        if self.layout == "grid":
            if width > self.cell_size - 1 or height > self.cell_size - 1:
                raise DocumentConfigError(
                    f"{own}: at font size {size} a glyph's ink is {width}x{height} px, it must fit "
                    f"strictly inside a {self.cell_size} px cell (at most {self.cell_size - 1} px); "
                    "lower font_size_range or raise cell_size"
                )
            if min(self.page_width_range[0], self.page_height_range[0]) < self.cell_size:
                raise DocumentConfigError(
                    f"{own}: the smallest page ({self.page_width_range[0]}x"
                    f"{self.page_height_range[0]}) must hold at least one {self.cell_size} px cell"
                )
        else:
            font = _font(self.font_name, size)
            line_h = max(sum(font.getmetrics()), max(b[3] for b in boxes)) - min(0, min(b[1] for b in boxes))
            glyph_w = max(max(b[2], math.ceil(font.getlength(c))) - min(b[0], 0) for c, b in zip(self.charset, boxes))
            room_w = self.page_width_range[0] - 2 * self.margin
            room_h = self.page_height_range[0] - 2 * self.margin
            if room_w < glyph_w or room_h < line_h:
                raise DocumentConfigError(
                    f"{own}: the smallest page ({self.page_width_range[0]}x"
                    f"{self.page_height_range[0]}, margin {self.margin}) cannot hold one character "
                    f"at font size {size} ({glyph_w}x{line_h} px); enlarge the page or "
                    "lower font_size_range"
                )


@dataclass
class OcrAnnotationConfig(DocumentGeneratorConfig):
    """Parameters of step 01 (notebook ``01_ocr_annotation``): where documents come from, how
    bad rows are handled, and (for ``source="synthetic"``) every generator field of
    :class:`DocumentGeneratorConfig`.

    - ``source``: ``"synthetic"`` (generate ``n_documents`` pages from ``seed``) or
      ``"synthdog"`` (the first ``n_documents`` rows, in dataset order, of the original data:
      docs/method.md §2 uses 1000).
    - ``dataset_path``: for ``"synthdog"``, a local copy (a hub snapshot folder, a parquet file
      or a ``save_to_disk`` folder; relative paths are taken from the repository root) or a hub
      id; ``None`` means the hub id ``nnethercott/synthdog-en-detection``.
    - ``split``: the split to read (``"train"``, the only one on the hub).
    - ``on_bad``: ``"skip"`` (count and report) or ``"raise"`` (:class:`BadDocumentError`).
    """

    source: str = "synthetic"
    dataset_path: str | None = None
    split: str = "train"
    on_bad: str = "skip"

    def __post_init__(self) -> None:
        own = type(self).__name__
        _choice(own, "source", self.source, SOURCES)
        _choice(own, "on_bad", self.on_bad, ("skip", "raise"))
        if self.dataset_path is not None and (not isinstance(self.dataset_path, str) or not self.dataset_path):
            raise DocumentConfigError(f"{own}.dataset_path must be None or a non-empty string, got {self.dataset_path!r}")
        if self.source == "synthetic" and self.dataset_path is not None:
            raise DocumentConfigError(
                f"{own}: dataset_path={self.dataset_path!r} is only read with source='synthdog'; "
                "set source='synthdog' or dataset_path=None"
            )
        if not isinstance(self.split, str) or not self.split:
            raise DocumentConfigError(f"{own}.split must be a non-empty string, got {self.split!r}")
        super().__post_init__()

    def generator_config(self) -> DocumentGeneratorConfig:
        """The generator part alone (drops ``source``, ``dataset_path``, ``split``, ``on_bad``)."""
        names = DocumentGeneratorConfig.__dataclass_fields__
        return DocumentGeneratorConfig(**{k: v for k, v in asdict(self).items() if k in names})


# --------------------------------------------------------------------------------------------
# fonts and glyphs


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A FreeType font by name (:data:`FONTS`) or path, basic layout (no shaping engine)."""
    path = FONTS[name] if name in FONTS else Path(name)
    if path is None:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType
            raise DocumentConfigError("Pillow lacks FreeType support; install the pinned pillow wheel")
        return font
    if not path.is_file():
        raise DocumentConfigError(f"font file {path} not found (see data/fonts/README.md)")
    return ImageFont.truetype(str(path), size=size, layout_engine=ImageFont.Layout.BASIC)


def _canvas_size(size: int) -> tuple[int, int]:
    return 4 * size + 8, 4 * size + 8


@lru_cache(maxsize=8192)
def _render_mask(font_name: str, size: int, char: str) -> bytes:
    """Coverage mask of ``char`` drawn at ``(2 * size, 2 * size)`` (left-ascender anchor) on a
    blank ``_canvas_size(size)`` canvas, as raw 8-bit bytes."""
    canvas = PILImage.new("L", _canvas_size(size), 0)
    ImageDraw.Draw(canvas).text((2 * size, 2 * size), char, font=_font(font_name, size), fill=255, anchor="la")
    return canvas.tobytes()


@lru_cache(maxsize=8192)
def _glyph_ink_box(font_name: str, size: int, char: str) -> tuple[int, int, int, int] | None:
    """Ink box ``(l, t, r, b)`` of ``char`` drawn with its left-ascender anchor at ``(0, 0)``
    (``r``, ``b`` exclusive; every pixel with any coverage counts), or ``None`` if it draws
    nothing. Measured on a rendered mask, because ``textbbox`` reports the advance width
    horizontally, not the ink."""
    box = PILImage.frombytes("L", _canvas_size(size), _render_mask(font_name, size, char)).getbbox()
    if box is None:
        return None
    pad = 2 * size
    return box[0] - pad, box[1] - pad, box[2] - pad, box[3] - pad


_NOT_A_GLYPH = "\U0010fffd"  # a private-use code point: fonts draw their placeholder (.notdef)


def _has_glyph(font_name: str, size: int, char: str) -> bool:
    """False when ``char`` renders exactly as the font's placeholder glyph (missing)."""
    return _render_mask(font_name, size, char) != _render_mask(font_name, size, _NOT_A_GLYPH)


# --------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class _Glyph:
    char: str
    size: int  # font size
    origin: tuple[int, int]  # left-ascender anchor
    box: tuple[int, int, int, int]  # ink box (x0, y0, x1, y1), exclusive right/bottom


@dataclass(frozen=True)
class _Word:
    glyphs: tuple[_Glyph, ...]

    @property
    def text(self) -> str:
        return "".join(g.char for g in self.glyphs)


def _draw_words(rng: np.random.Generator, cfg: DocumentGeneratorConfig) -> list[int]:
    """Word lengths of one line."""
    n = int(rng.integers(cfg.words_per_line_range[0], cfg.words_per_line_range[1] + 1))
    return [int(rng.integers(cfg.word_length_range[0], cfg.word_length_range[1] + 1)) for _ in range(n)]


def _random_text(rng: np.random.Generator, charset: str, n: int) -> str:
    return "".join(charset[i] for i in rng.integers(0, len(charset), size=n))


def _layout_free(rng: np.random.Generator, cfg: DocumentGeneratorConfig, width: int, height: int) -> list[list[_Word]]:
    """Lines of words for a free page; each glyph's origin is an integer pixel and every ink
    box lies inside the page minus its margin.

    Each line draws a font size, a word gap (1-2 spaces wide), words and an indent; words (then
    characters of a first word) that do not fit the line are dropped, and lines stop when the
    next one (at ``line_spacing_range`` times its height) would leave the page. The vertical
    room left over is then shared at random among the gaps above, between and below the lines,
    so text is spread over the page rather than packed at the top."""
    n_lines = int(rng.integers(cfg.lines_per_page_range[0], cfg.lines_per_page_range[1] + 1))
    room_w, room_h = width - 2 * cfg.margin, height - 2 * cfg.margin
    planned: list[tuple[int, list[list[tuple[str, float]]], int, int, int, int]] = []
    used_h = 0
    for _ in range(n_lines):
        size = int(rng.integers(cfg.font_size_range[0], cfg.font_size_range[1] + 1))
        spacing = float(rng.uniform(*cfg.line_spacing_range))
        gap_factor = float(rng.uniform(1.0, 2.0))
        texts = [_random_text(rng, cfg.charset, n) for n in _draw_words(rng, cfg)]
        indent_u = float(rng.uniform())
        font = _font(cfg.font_name, size)

        def extent(ch: str, pen: float) -> tuple[int, int]:
            """Horizontal extent [lo, hi) of a glyph drawn at pen position ``pen``."""
            l, _, r, _ = _glyph_ink_box(cfg.font_name, size, ch)
            return round(pen) + min(l, 0), round(pen) + max(r, math.ceil(font.getlength(ch)))

        placed: list[list[tuple[str, float]]] = []
        lo, hi, pen_end = 0, 0, 0.0
        for text in texts:
            pen = pen_end + (font.getlength(" ") * gap_factor if placed else 0.0)
            chars: list[tuple[str, float]] = []
            w_lo, w_hi = lo, hi
            for ch in text:
                a, b = extent(ch, pen)
                n_lo, n_hi = (min(w_lo, a), max(w_hi, b)) if (placed or chars) else (a, b)
                if n_hi - n_lo > room_w:
                    break
                chars.append((ch, pen))
                w_lo, w_hi = n_lo, n_hi
                pen += font.getlength(ch)
            if len(chars) < len(text):
                if not placed and chars:  # a first word longer than the page: keep its head
                    placed.append(chars)
                    lo, hi = w_lo, w_hi
                break
            placed.append(chars)
            lo, hi, pen_end = w_lo, w_hi, pen
        inks = [_glyph_ink_box(cfg.font_name, size, ch) for word in placed for ch, _ in word]
        top = min(0, min(b[1] for b in inks))
        line_h = max(sum(font.getmetrics()), max(b[3] for b in inks)) - top
        step = line_h if not planned else max(line_h, round(line_h * spacing))
        if used_h + step > room_h:
            break
        used_h += step
        x_shift = cfg.margin - lo + int(indent_u * (room_w - (hi - lo)))
        planned.append((size, placed, x_shift, top, step - line_h, line_h))
    # share the vertical slack among the len(planned) + 1 gaps
    shares = rng.dirichlet(np.ones(len(planned) + 1))
    slack = room_h - used_h
    lines: list[list[_Word]] = []
    y = cfg.margin
    for (size, placed, x_shift, top, lead, line_h), share in zip(planned, shares):
        y += lead + int(share * slack)
        line = []
        for word in placed:
            glyphs = []
            for ch, pen in word:
                ox, oy = x_shift + round(pen), y - top
                l, t, r, b = _glyph_ink_box(cfg.font_name, size, ch)
                glyphs.append(_Glyph(ch, size, (ox, oy), (ox + l, oy + t, ox + r, oy + b)))
            line.append(_Word(tuple(glyphs)))
        lines.append(line)
        y += line_h
    return lines


def place_in_cell(
    ink: tuple[int, int, int, int], col: int, row: int, cell: int, dx: int = 0, dy: int = 0
) -> tuple[int, int]:
    """Drawing origin (left-ascender anchor) that centres a glyph's ink box in cell
    ``(col, row)``, shifted by the jitter ``(dx, dy)`` and then clamped so the ink box lies in
    ``[col * cell, col * cell + cell - 1]`` (exclusive right edge) and likewise vertically:
    under the patch rule ``floor(x / cell)`` both edges of the box fall in the same cell.

    ``ink = (l, t, r, b)`` is the glyph's ink box relative to its origin
    (:func:`_glyph_ink_box`); it must be at most ``cell - 1`` px wide and high."""
    l, t, r, b = ink
    if r - l > cell - 1 or b - t > cell - 1:
        raise DocumentConfigError(f"glyph ink {r - l}x{b - t} px does not fit strictly inside a {cell} px cell")
    x0c, y0c = col * cell, row * cell
    ox = x0c + (cell - (r - l)) // 2 - l + dx
    oy = y0c + (cell - (b - t)) // 2 - t + dy
    ox = min(max(ox, x0c - l), x0c + cell - 1 - r)
    oy = min(max(oy, y0c - t), y0c + cell - 1 - b)
    return ox, oy


def _layout_grid(rng: np.random.Generator, cfg: DocumentGeneratorConfig, width: int, height: int) -> list[list[_Word]]:
    """Lines of words on a grid page: one character per cell, ink strictly inside the cell."""
    c = cfg.cell_size
    cols, rows = width // c, height // c
    size = int(rng.integers(cfg.font_size_range[0], cfg.font_size_range[1] + 1))
    n_lines = min(rows, int(rng.integers(cfg.lines_per_page_range[0], cfg.lines_per_page_range[1] + 1)))
    line_rows = sorted(int(r) for r in rng.choice(rows, size=n_lines, replace=False))
    lines: list[list[_Word]] = []
    for row in line_rows:
        texts = [_random_text(rng, cfg.charset, n) for n in _draw_words(rng, cfg)]
        kept: list[str] = []
        used = 0
        for text in texts:
            need = len(text) + (1 if kept else 0)
            if used + need > cols:
                if not kept:
                    kept.append(text[:cols])
                    used = len(kept[0])
                break
            kept.append(text)
            used += need
        start = int(rng.integers(0, cols - used + 1))
        col = start
        line = []
        for text in kept:
            glyphs = []
            for ch in text:
                ink = _glyph_ink_box(cfg.font_name, size, ch)
                dx, dy = (int(v) for v in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
                ox, oy = place_in_cell(ink, col, row, c, dx, dy)
                l, t, r, b = ink
                glyphs.append(_Glyph(ch, size, (ox, oy), (ox + l, oy + t, ox + r, oy + b)))
                col += 1
            line.append(_Word(tuple(glyphs)))
            col += 1  # one empty cell between words
        lines.append(line)
    return lines


def _union(boxes: Iterable[tuple[int, int, int, int]]) -> list[list[float]]:
    xs0, ys0, xs1, ys1 = zip(*boxes)
    return [[float(min(xs0)), float(min(ys0))], [float(max(xs1)), float(max(ys1))]]


@dataclass(frozen=True)
class PageLayout:
    """Document ``index`` of ``cfg`` laid out but not drawn (:func:`layout_document`): page size
    ``width x height`` px, grey levels ``paper`` and ``ink``, and the glyphs of each line.
    :meth:`row` turns it into the dataset row; the layout never depends on the drawing, so a
    caller can look at the text and boxes first and pay for drawing only the pages it keeps."""

    cfg: DocumentGeneratorConfig
    index: int
    width: int
    height: int
    paper: int
    ink: int
    lines: tuple[tuple[_Word, ...], ...]

    def row(self, draw: bool = True) -> dict[str, Any]:
        """The row of :data:`FEATURES` (:func:`render_document`); ``draw=False``: ``"image": None``."""
        cfg = self.cfg
        image = PILImage.new("RGB", (self.width, self.height), (self.paper,) * 3) if draw else None
        pen = ImageDraw.Draw(image) if image is not None else None
        chunks: list[dict[str, Any]] = []
        chars: list[dict[str, Any]] = []
        for line in self.lines:
            groups = [line] if cfg.chunk_level == "line" else [(w,) for w in line]
            for group in groups:
                glyphs = [g for w in group for g in w.glyphs]
                chunk_index = len(chunks)
                chunks.append({"chunk": " ".join(w.text for w in group), "coord": _union(g.box for g in glyphs)})
                for g in glyphs:
                    x0, y0, x1, y1 = (float(v) for v in g.box)
                    chars.append({"char": g.char, "coord": [[x0, y0], [x1, y1]], "chunk_index": chunk_index})
                for g in glyphs if pen is not None else ():
                    pen.text(g.origin, g.char, font=_font(cfg.font_name, g.size), fill=(self.ink,) * 3, anchor="la")
        return {"doc_id": self.index, "image": image, "2_coord": chunks, "char_coord": chars, "source": "synthetic"}


def layout_document(cfg: DocumentGeneratorConfig, index: int) -> PageLayout:
    """Lay out document ``index`` of ``cfg`` without drawing it (:class:`PageLayout`); all the
    randomness of a document is drawn here, from ``default_rng([cfg.seed, index])``."""
    rng = np.random.default_rng([cfg.seed, index])
    width = int(rng.integers(cfg.page_width_range[0], cfg.page_width_range[1] + 1))
    height = int(rng.integers(cfg.page_height_range[0], cfg.page_height_range[1] + 1))
    paper = int(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1))
    ink = int(rng.integers(cfg.ink_range[0], cfg.ink_range[1] + 1))
    if cfg.layout == "grid":
        width -= width % cfg.cell_size
        height -= height % cfg.cell_size
        lines = _layout_grid(rng, cfg, width, height)
    else:
        lines = _layout_free(rng, cfg, width, height)
    return PageLayout(cfg, index, width, height, paper, ink, tuple(tuple(line) for line in lines))


def render_document(cfg: DocumentGeneratorConfig, index: int) -> dict[str, Any]:
    """Draw document ``index`` of ``cfg`` (independent of ``cfg.n_documents``).

    Returns a row of :data:`FEATURES` with the image as a PIL RGB image of size
    ``(W, H)``: ``{"doc_id": index, "image": PIL.Image, "2_coord": [...], "char_coord": [...],
    "source": "synthetic"}``. Equal to ``layout_document(cfg, index).row()``.
    """
    return layout_document(cfg, index).row()


def _png_bytes(image: PILImage.Image) -> bytes:
    """PNG bytes with fixed settings (no metadata chunks): deterministic for a given Pillow."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generate_documents(
    cfg: DocumentGeneratorConfig, *, progress: bool = True
) -> Dataset:
    """Generate ``cfg.n_documents`` synthetic OCR documents (docs/method.md §2, offline data).

    ``cfg`` may be an :class:`OcrAnnotationConfig` with ``source="synthetic"``. Returns a
    ``datasets.Dataset`` with :data:`FEATURES` (images PNG-encoded) whose fingerprint is a hash
    of its content. Same config, same bytes.
    """
    if isinstance(cfg, OcrAnnotationConfig):
        if cfg.source != "synthetic":
            raise DocumentConfigError(
                f"generate_documents needs source='synthetic', got source={cfg.source!r}; "
                "use build_documents(cfg) to load the original data"
            )
        cfg = cfg.generator_config()
    if not isinstance(cfg, DocumentGeneratorConfig):
        raise DocumentConfigError(f"generate_documents expects a DocumentGeneratorConfig, got {type(cfg).__name__}")
    from tqdm.auto import tqdm

    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for index in tqdm(range(cfg.n_documents), desc="generating documents", disable=not progress):
        row = render_document(cfg, index)
        row["image"] = {"bytes": _png_bytes(row["image"]), "path": None}
        for name in COLUMNS:
            columns[name].append(row[name])
    return _with_content_fingerprint(Dataset.from_dict(columns, features=FEATURES))


# --------------------------------------------------------------------------------------------
# fingerprint, schema, save and load


class _HashSink(io.RawIOBase):
    def __init__(self) -> None:
        super().__init__()
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        self.hash.update(data)
        return len(data)


def content_fingerprint(ds: Dataset) -> str:
    """sha256 (first 16 hex digits) of the dataset's Arrow data serialised as an IPC stream.

    ``save_to_disk`` writes the fingerprint into ``state.json``. The one ``datasets`` derives
    itself hashes the pickled object state, adds file modification times for memory-mapped
    data and turns random after a transform it cannot hash, so it is not a function of the
    content; this one is."""
    if ds._indices is not None:
        ds = ds.flatten_indices()
    table = ds.data.table
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return sink.hash.hexdigest()[:16]


def _with_content_fingerprint(ds: Dataset) -> Dataset:
    if ds._indices is not None:
        ds = ds.flatten_indices()
    return Dataset(ds.data, info=datasets.DatasetInfo(features=ds.features), fingerprint=content_fingerprint(ds))


def _check_schema(ds: Any, what: str = "dataset") -> None:
    """Raise :class:`SchemaMismatchError` unless ``ds`` is a Dataset with :data:`FEATURES`
    (the image column may be decoded or not)."""
    if not isinstance(ds, Dataset):
        raise SchemaMismatchError(f"{what} must be a datasets.Dataset, got {type(ds).__name__}")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    extra = [c for c in ds.column_names if c not in COLUMNS]
    if missing or extra:
        raise SchemaMismatchError(
            f"{what} has columns {ds.column_names}; step 01 needs exactly {list(COLUMNS)} "
            f"(missing {missing}, unexpected {extra}). Original SynthDoG rows must go through "
            "sparsemm_utils.synthdog.load_synthdog first."
        )
    for name in COLUMNS:
        got, want = ds.features[name], FEATURES[name]
        if isinstance(want, datasets.Image) and isinstance(got, datasets.Image):
            continue
        if got != want:
            raise SchemaMismatchError(f"{what} column {name!r} has type {got}, expected {want}")


def save_documents(ds: Dataset, path: str | Path) -> Path:
    """Save a step-01 dataset with ``save_to_disk`` into ``path`` and return the path.

    The fingerprint in ``state.json`` is :func:`content_fingerprint`, so the same rows give the
    same files byte for byte. An existing saved dataset at ``path`` is replaced; any other
    non-empty folder is refused (:class:`DocumentError`)."""
    _check_schema(ds)
    path = Path(path)
    if path.exists():
        if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            shutil.rmtree(path)
        elif not path.is_dir() or any(path.iterdir()):
            raise DocumentError(
                f"{path} exists and is not a saved dataset: refusing to overwrite it; remove it or "
                "choose another path"
            )
    ds = _with_content_fingerprint(ds.cast_column("image", datasets.Image()))
    ds = Dataset(ds.data, info=datasets.DatasetInfo(features=FEATURES), fingerprint=ds._fingerprint)
    ds.save_to_disk(str(path))
    return path


def load_documents(path: str | Path) -> Dataset:
    """Load the documents saved by step 01 (``<run_dir>/01_ocr_annotation/documents``) and check
    their schema (:data:`FEATURES`)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"no step-01 documents at {path} (expected a save_to_disk folder with state.json): "
            f"run step {STEP} first (notebooks/{STEP}.ipynb, or the pipeline with --to {STEP})"
        )
    ds = datasets.load_from_disk(str(path))
    _check_schema(ds, f"the dataset at {path}")
    return ds


# --------------------------------------------------------------------------------------------
# validation


@dataclass
class Issue:
    """One problem found by :func:`validate_rows`.

    ``row``: position in the input dataset (dataset order); ``level``: ``"row"``, ``"chunk"``
    or ``"char"``; ``index``: the chunk's index in the input ``2_coord`` or the character's in
    ``char_coord`` (``None`` for a row); ``action``: ``"skipped"``, ``"clipped"`` or
    ``"kept"``."""

    row: int
    doc_id: int | None
    level: str
    index: int | None
    reason: str
    detail: str
    action: str


@dataclass
class ValidationReport:
    """What :func:`validate_rows` kept and every problem it met (written to
    ``annotation_report.json``).

    Counts are of what was kept: ``documents`` rows, ``chunks`` entries of ``2_coord``,
    ``characters`` entries of ``char_coord`` (per-character boxes; 0 for SynthDoG),
    ``text_characters`` non-whitespace characters of the chunk texts."""

    on_bad: str
    input_rows: int
    documents: int = 0
    chunks: int = 0
    characters: int = 0
    text_characters: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    def _count(self, level: str, action: str) -> int:
        return sum(1 for i in self.issues if i.level == level and i.action == action)

    @property
    def skipped_rows(self) -> int:
        return self._count("row", "skipped")

    @property
    def skipped_chunks(self) -> int:
        return self._count("chunk", "skipped")

    @property
    def skipped_characters(self) -> int:
        return self._count("char", "skipped")

    @property
    def clipped_boxes(self) -> int:
        return sum(1 for i in self.issues if i.action == "clipped")

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(i.reason for i in self.issues).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "on_bad": self.on_bad,
            "input_rows": self.input_rows,
            "documents": self.documents,
            "chunks": self.chunks,
            "characters": self.characters,
            "text_characters": self.text_characters,
            "sources": dict(sorted(self.sources.items())),
            "skipped_rows": self.skipped_rows,
            "skipped_chunks": self.skipped_chunks,
            "skipped_characters": self.skipped_characters,
            "clipped_boxes": self.clipped_boxes,
            "by_reason": self.by_reason,
            "issues": [asdict(i) for i in self.issues],
        }

    def summary(self) -> str:
        """One paragraph for a notebook."""
        text = (
            f"{self.documents} documents kept of {self.input_rows} input rows; {self.chunks} chunks, "
            f"{self.characters} character boxes, {self.text_characters} characters of chunk text. "
            f"Skipped: {self.skipped_rows} rows, {self.skipped_chunks} chunks, "
            f"{self.skipped_characters} character boxes; clipped: {self.clipped_boxes} boxes."
        )
        if self.issues:
            text += " Issues by reason: " + ", ".join(f"{k}={v}" for k, v in self.by_reason.items()) + "."
        return text


def _check_box(coord: Any, width: int, height: int) -> tuple[list[list[float]] | None, str | None, str]:
    """Check one ``[[x0, y0], [x1, y1]]`` against an image ``[0, W] x [0, H]``.

    Returns ``(box, reason, detail)``: ``reason`` is ``None`` for a good box,
    ``"box_partly_outside_image"`` with the clipped ``box``, or one of ``"malformed_box"``,
    ``"inverted_box"``, ``"box_outside_image"`` with ``box=None``."""
    try:
        (x0, y0), (x1, y1) = coord
        x0, y0, x1, y1 = (float(v) for v in (x0, y0, x1, y1))
    except (TypeError, ValueError) as exc:
        return None, "malformed_box", f"coord must be [[xmin, ymin], [xmax, ymax]], got {coord!r} ({exc})"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "malformed_box", f"coord has a non-finite value: {coord!r}"
    if x1 < x0 or y1 < y0:
        return None, "inverted_box", f"xmax < xmin or ymax < ymin in {coord!r}"
    if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
        return None, "box_outside_image", f"{coord!r} has no point inside the {width}x{height} image"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        clipped = [[max(x0, 0.0), max(y0, 0.0)], [min(x1, float(width)), min(y1, float(height))]]
        return clipped, "box_partly_outside_image", f"{coord!r} clipped to {clipped} ({width}x{height} image)"
    return [[x0, y0], [x1, y1]], None, ""


def _image_bytes(value: Any) -> bytes:
    """Raw bytes of an undecoded ``datasets.Image`` value ``{"bytes", "path"}``."""
    if value is None:
        raise ValueError("the image is missing (None)")
    if value.get("bytes") is not None:
        return value["bytes"]
    if value.get("path"):
        return Path(value["path"]).read_bytes()
    raise ValueError("the image has neither bytes nor a path")


def _open_image(data: bytes) -> tuple[int, int]:
    """Fully decode ``data`` (a truncated file fails here, not later); return ``(W, H)``."""
    with PILImage.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def validate_rows(
    ds: Dataset, *, on_bad: Literal["skip", "raise"] = "skip", progress: bool = True
) -> tuple[Dataset, ValidationReport]:
    """Check every row of a step-01 dataset (either source) and return ``(clean, report)``.

    The rules are in the module docstring: unreadable image or duplicate ``doc_id``: row
    skipped; empty chunk text, malformed, inverted or fully-outside box: chunk skipped; partly
    outside: clipped; bad character entries: character skipped; each counted in ``report``
    with its reason, row and index. ``on_bad="raise"`` raises :class:`BadDocumentError` at the
    first problem instead. ``clean`` has :data:`FEATURES`, images as their original bytes, and a
    content fingerprint."""
    _choice("validate_rows", "on_bad", on_bad, ("skip", "raise"))
    _check_schema(ds)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    report = ValidationReport(on_bad=on_bad, input_rows=len(raw))
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    seen: set[int] = set()
    from tqdm.auto import tqdm

    for r, row in enumerate(tqdm(raw, desc="validating documents", disable=not progress, total=len(raw))):
        doc_id = row["doc_id"]

        def issue(level: str, index: int | None, reason: str, detail: str, action: str = "skipped") -> None:
            if on_bad == "raise" and action != "kept":
                where = "" if index is None else f" ({'2_coord' if level == 'chunk' else 'char_coord'}[{index}])"
                raise BadDocumentError(r, doc_id, reason, detail + where)
            report.issues.append(Issue(r, doc_id, level, index, reason, detail, action))

        if doc_id is None:
            issue("row", None, "missing_doc_id", "doc_id is None")
            continue
        if doc_id in seen:
            issue("row", None, "duplicate_doc_id", f"doc_id {doc_id} already used by an earlier row")
            continue
        try:
            data = _image_bytes(row["image"])
            width, height = _open_image(data)
        except Exception as exc:  # any decoder failure is this row's problem, reported
            issue("row", None, "unreadable_image", f"{type(exc).__name__}: {exc}")
            continue

        chunks: list[dict[str, Any]] = []
        remap: dict[int, int] = {}
        entries = row["2_coord"] or []
        for j, entry in enumerate(entries):
            text = entry.get("chunk")
            if not isinstance(text, str) or not text.strip():
                issue("chunk", j, "empty_chunk_text", f"chunk text is {text!r}")
                continue
            box, reason, detail = _check_box(entry.get("coord"), width, height)
            if box is None:
                issue("chunk", j, reason, detail)
                continue
            if reason is not None:
                issue("chunk", j, reason, detail, "clipped")
            remap[j] = len(chunks)
            chunks.append({"chunk": text, "coord": box})

        chars: list[dict[str, Any]] = []
        for k, entry in enumerate(row["char_coord"] or []):
            ci, ch = entry.get("chunk_index"), entry.get("char")
            if not isinstance(ci, int) or not 0 <= ci < len(entries):
                issue("char", k, "bad_chunk_index", f"chunk_index {ci!r} is not an index of 2_coord ({len(entries)} chunks)")
                continue
            if ci not in remap:
                issue("char", k, "parent_chunk_skipped", f"its chunk 2_coord[{ci}] was skipped")
                continue
            if not isinstance(ch, str) or len(ch) != 1 or ch.isspace():
                issue("char", k, "bad_char_text", f"char must be one non-whitespace character, got {ch!r}")
                continue
            if ch not in chunks[remap[ci]]["chunk"]:
                issue("char", k, "char_not_in_chunk", f"{ch!r} does not occur in chunk {chunks[remap[ci]]['chunk']!r}")
                continue
            box, reason, detail = _check_box(entry.get("coord"), width, height)
            if box is None:
                issue("char", k, reason, detail)
                continue
            if reason is not None:
                issue("char", k, reason, detail, "clipped")
            chars.append({"char": ch, "coord": box, "chunk_index": remap[ci]})

        if not chunks:
            issue("row", None, "no_chunks", "the document has no valid chunk; kept (it scores 0)", "kept")
        seen.add(doc_id)
        columns["doc_id"].append(doc_id)
        columns["image"].append({"bytes": data, "path": None})
        columns["2_coord"].append(chunks)
        columns["char_coord"].append(chars)
        columns["source"].append(row["source"])
        report.documents += 1
        report.chunks += len(chunks)
        report.characters += len(chars)
        report.text_characters += sum(len("".join(c["chunk"].split())) for c in chunks)
    report.sources = dict(Counter(columns["source"]))
    clean = _with_content_fingerprint(Dataset.from_dict(columns, features=FEATURES))
    return clean, report


# --------------------------------------------------------------------------------------------
# the step


def build_documents(cfg: OcrAnnotationConfig, *, progress: bool = True) -> Dataset:
    """The unvalidated step-01 dataset of ``cfg``: generated (``source="synthetic"``) or the
    first ``cfg.n_documents`` rows of the original data (``source="synthdog"``)."""
    if cfg.source == "synthetic":
        return generate_documents(cfg.generator_config(), progress=progress)
    from .synthdog import SYNTHDOG_HUB_ID, load_synthdog

    path_or_id = cfg.dataset_path or SYNTHDOG_HUB_ID
    local = repo_root() / path_or_id
    if cfg.dataset_path and not Path(path_or_id).is_absolute() and local.exists():
        path_or_id = str(local)
    return load_synthdog(cfg.n_documents, path_or_id=path_or_id, split=cfg.split)


def write_report(report: ValidationReport, path: str | Path, cfg: OcrAnnotationConfig | None = None) -> Path:
    """Write ``annotation_report.json``: the report's counts and issues, plus the config."""
    payload = report.to_dict()
    if cfg is not None:
        payload = {"config": asdict(cfg), **payload}
    path = Path(path)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def run_ocr_annotation(cfg: OcrAnnotationConfig, run_dir: str | Path, *, progress: bool = True) -> tuple[Dataset, ValidationReport]:
    """Step 01 end to end: build, validate, save ``documents/`` and ``annotation_report.json``
    into ``<run_dir>/01_ocr_annotation/``. Returns the clean dataset and the report."""
    from .runs import step_dir

    out = step_dir(run_dir, STEP)
    clean, report = validate_rows(build_documents(cfg, progress=progress), on_bad=cfg.on_bad, progress=progress)
    save_documents(clean, out / "documents")
    write_report(report, out / "annotation_report.json", cfg)
    return clean, report


# --------------------------------------------------------------------------------------------
# reading and statistics


def reading_text(chunks: Sequence[Mapping[str, Any]]) -> str:
    """The document's text from its ``2_coord`` chunks, in list order.

    A chunk starts a new line when its vertical centre lies below the previous chunk's bottom
    edge; otherwise it joins the line after one space. Line-level chunks give one line each,
    word-level chunks of one line are joined again."""
    out: list[str] = []
    prev_bottom: float | None = None
    for entry in chunks:
        (_, y0), (_, y1) = entry["coord"]
        if prev_bottom is not None:
            out.append("\n" if (y0 + y1) / 2 > prev_bottom else " ")
        out.append(entry["chunk"])
        prev_bottom = y1
    return "".join(out)


def _iter_sized(ds: Dataset) -> Iterator[tuple[dict[str, Any], int, int]]:
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for row in raw:
        with PILImage.open(io.BytesIO(_image_bytes(row["image"]))) as image:
            width, height = image.size
        yield row, width, height


def document_statistics(ds: Dataset) -> "pd.DataFrame":
    """One row per document: ``doc_id, source, width, height, n_chunks, n_char_boxes,
    text_characters`` (image sizes read from the file headers)."""
    import pandas as pd

    records = []
    for row, width, height in _iter_sized(ds):
        records.append(
            {
                "doc_id": row["doc_id"],
                "source": row["source"],
                "width": width,
                "height": height,
                "n_chunks": len(row["2_coord"]),
                "n_char_boxes": len(row["char_coord"]),
                "text_characters": sum(len("".join(c["chunk"].split())) for c in row["2_coord"]),
            }
        )
    return pd.DataFrame.from_records(records, columns=["doc_id", "source", "width", "height", "n_chunks", "n_char_boxes", "text_characters"])


def chunk_statistics(ds: Dataset) -> "pd.DataFrame":
    """One row per chunk: ``doc_id, chunk_index, text, n_characters`` (non-whitespace),
    ``n_words, x0, y0, x1, y1, width, height``."""
    import pandas as pd

    records = []
    for row in ds.select_columns(["doc_id", "2_coord"]):
        for j, c in enumerate(row["2_coord"]):
            (x0, y0), (x1, y1) = c["coord"]
            records.append(
                {
                    "doc_id": row["doc_id"], "chunk_index": j, "text": c["chunk"],
                    "n_characters": len("".join(c["chunk"].split())), "n_words": len(c["chunk"].split()),
                    "x0": x0, "y0": y0, "x1": x1, "y1": y1, "width": x1 - x0, "height": y1 - y0,
                }
            )
    cols = ["doc_id", "chunk_index", "text", "n_characters", "n_words", "x0", "y0", "x1", "y1", "width", "height"]
    return pd.DataFrame.from_records(records, columns=cols)


def char_statistics(ds: Dataset) -> "pd.DataFrame":
    """One row per character box: ``doc_id, char, chunk_index, x0, y0, x1, y1, width, height``."""
    import pandas as pd

    records = []
    for row in ds.select_columns(["doc_id", "char_coord"]):
        for c in row["char_coord"]:
            (x0, y0), (x1, y1) = c["coord"]
            records.append(
                {
                    "doc_id": row["doc_id"], "char": c["char"], "chunk_index": c["chunk_index"],
                    "x0": x0, "y0": y0, "x1": x1, "y1": y1, "width": x1 - x0, "height": y1 - y0,
                }
            )
    cols = ["doc_id", "char", "chunk_index", "x0", "y0", "x1", "y1", "width", "height"]
    return pd.DataFrame.from_records(records, columns=cols)
