"""Synthetic OCR pages for step 01 (docs/method.md §2, offline data): config, fonts, layout, drawing.

The original study reads the first 1000 rows of the HF dataset
``nnethercott/synthdog-en-detection`` (:mod:`sparsemm_utils.synthdog`); offline, step 01
*generates* documents from a seed, in the same schema plus per-character boxes
(:data:`sparsemm_utils.document_dataset.FEATURES`). A generated chunk box is the tight union of
its characters' ink boxes (PaddleOCR's boxes on SynthDoG are a few pixels looser).

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
Pillow with fixed settings, and the dataset's fingerprint is a hash of its content
(:func:`sparsemm_utils.document_dataset.content_fingerprint`): the same config gives
byte-identical files with the pinned Pillow and datasets.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from tqdm.auto import tqdm

from datasets import Dataset

from .document_dataset import COLUMNS, FEATURES, DocumentConfigError, with_content_fingerprint
from .runs import repo_root
from .validate import check_choice, check_int, check_int_range

__all__ = [
    "UPPER_DIGITS",
    "UPPER_DIGITS_UNAMBIGUOUS",
    "ALNUM",
    "FONTS",
    "DocumentGeneratorConfig",
    "generate_documents",
    "render_document",
    "layout_document",
    "PageLayout",
    "place_in_cell",
]

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


# --------------------------------------------------------------------------------------------
# configuration


def _float_range(owner: str, name: str, value: Any, lo: float) -> tuple[float, float]:
    """Validate an inclusive float range ``(a, b)`` with ``lo <= a <= b`` (both finite)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise DocumentConfigError(f"{owner}.{name} must be a pair (min, max), got {value!r}")
    a, b = (float(v) for v in value)
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b):
        raise DocumentConfigError(f"{owner}.{name} must satisfy {lo} <= min <= max, got {value!r}")
    return a, b


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
        own, err = type(self).__name__, DocumentConfigError
        self.n_documents = check_int(f"{own}.n_documents", self.n_documents, 1, error=err)
        self.seed = check_int(f"{own}.seed", self.seed, 0, error=err)
        check_choice(f"{own}.chunk_level", self.chunk_level, ("line", "word"), error=err)
        check_choice(f"{own}.layout", self.layout, ("free", "grid"), error=err)
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
        self.font_size_range = check_int_range(f"{own}.font_size_range", self.font_size_range, 4, 200, error=err)
        self.page_width_range = check_int_range(f"{own}.page_width_range", self.page_width_range, 8, 8192, error=err)
        self.page_height_range = check_int_range(f"{own}.page_height_range", self.page_height_range, 8, 8192, error=err)
        self.lines_per_page_range = check_int_range(f"{own}.lines_per_page_range", self.lines_per_page_range, 1, error=err)
        self.words_per_line_range = check_int_range(f"{own}.words_per_line_range", self.words_per_line_range, 1, error=err)
        self.word_length_range = check_int_range(f"{own}.word_length_range", self.word_length_range, 1, error=err)
        self.margin = check_int(f"{own}.margin", self.margin, 0, error=err)
        self.line_spacing_range = _float_range(own, "line_spacing_range", self.line_spacing_range, 1.0)
        self.cell_size = check_int(f"{own}.cell_size", self.cell_size, 4, error=err)
        self.jitter = check_int(f"{own}.jitter", self.jitter, 0, error=err)
        self.background_range = check_int_range(f"{own}.background_range", self.background_range, 0, 255, error=err)
        self.ink_range = check_int_range(f"{own}.ink_range", self.ink_range, 0, 255, error=err)
        if self.ink_range[1] >= self.background_range[0]:
            raise DocumentConfigError(
                f"{own}: ink must be darker than paper: ink_range max {self.ink_range[1]} must be "
                f"below background_range min {self.background_range[0]}"
            )
        self._check_geometry()

    def generator_config(self) -> DocumentGeneratorConfig:
        """The generator fields alone, as a plain :class:`DocumentGeneratorConfig` (a step config
        built on this class drops its own fields, such as ``source`` and ``on_bad``)."""
        names = DocumentGeneratorConfig.__dataclass_fields__
        return DocumentGeneratorConfig(**{k: v for k, v in asdict(self).items() if k in names})

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

    ``cfg`` may be a step config built on :class:`DocumentGeneratorConfig` (step 01's
    ``Config``, :mod:`sparsemm_utils.steps.ocr_annotation`) when its ``source`` is ``"synthetic"``. Returns a
    ``datasets.Dataset`` with :data:`FEATURES` (images PNG-encoded) whose fingerprint is a hash
    of its content. Same config, same bytes.
    """
    if not isinstance(cfg, DocumentGeneratorConfig):
        raise DocumentConfigError(f"generate_documents expects a DocumentGeneratorConfig, got {type(cfg).__name__}")
    source = getattr(cfg, "source", "synthetic")  # a step config also says where documents come from
    if source != "synthetic":
        raise DocumentConfigError(
            f"generate_documents needs source='synthetic', got source={source!r}; "
            "use sparsemm_utils.steps.ocr_annotation.build_documents(cfg) to load the original data"
        )
    if type(cfg) is not DocumentGeneratorConfig:
        cfg = cfg.generator_config()

    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for index in tqdm(range(cfg.n_documents), desc="generating documents", disable=not progress):
        row = render_document(cfg, index)
        row["image"] = {"bytes": _png_bytes(row["image"]), "path": None}
        for name in COLUMNS:
            columns[name].append(row[name])
    return with_content_fingerprint(Dataset.from_dict(columns, features=FEATURES))


