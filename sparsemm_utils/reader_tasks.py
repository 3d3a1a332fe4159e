"""Reading tasks on synthetic documents: questions, answers and training batches for the tiny reader.

The offline default run needs a model that really reads (docs/design.md, "The offline world"), so
the project trains a tiny Qwen2-VL on the step-01 grid documents (:mod:`sparsemm_utils.tiny`).
This module turns a step-01 document (schema :data:`sparsemm_utils.documents.FEATURES`) into
questions whose answers can only be read from the image, shaped like the study's tasks:

========  =====================================================  ===========================
task      prompt                                                 answer
========  =====================================================  ===========================
``ocr``   ``"Provide all the OCR results of this image."``       every line, top to bottom,
          (:data:`~sparsemm_utils.prompts.OCR_PROMPT`, the        joined by ``"\\n"``
          prompt of head scoring, docs/method.md §2)                 (:func:`document_lines`)
``line``  ``"Read line 2."`` (``k`` counts lines with text,       the text of line ``k``
          from 1, top to bottom; empty rows do not count)
``value`` ``"Value of K7?"``: ``K7`` is the first word of a      the rest of that line
          line (its *key*), unique among first words             (``"93A"``, ``"93A X4"``)
========  =====================================================  ===========================

Several lines per page make most visual tokens irrelevant to any one ``line`` or ``value``
answer, which is what makes per-head budgets matter (docs/method.md §5). Step 05 reuses the same
questions as its offline document-QA benchmark (:func:`make_task_dataset`).

Lines. A line is one ``2_coord`` chunk of a line-level document; for a word-level document the
words of one visual line are grouped again (a chunk whose vertical centre lies below the previous
chunk's bottom starts a new line, the rule of :func:`sparsemm_utils.documents.reading_text`).
A line's words are its text split on spaces.

Training batches (:func:`collate`) hold the chat of :func:`sparsemm_utils.prompts.build_inputs`
(system prompt, image, prompt) followed by the answer and ``<|im_end|>``; ``labels`` keep the
answer tokens and the closing ``<|im_end|>`` only (``-100`` elsewhere: loss on the answer only),
and ``aux_labels`` give each visual token the character drawn inside it (0 = no character), for
the reader's auxiliary glyph loss.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .documents import (
    UPPER_DIGITS_UNAMBIGUOUS,
    DocumentGeneratorConfig,
    PageLayout,
    layout_document,
)
from .prompts import OCR_PROMPT, build_messages

__all__ = [
    "TASK_TYPES",
    "READER_CHARSET",
    "LINE_PROMPT",
    "VALUE_PROMPT",
    "ReaderTaskError",
    "NoQuestionError",
    "CollationError",
    "ReaderDocSpec",
    "Line",
    "ReaderQuestion",
    "document_lines",
    "ocr_question",
    "line_question",
    "value_question",
    "value_keys",
    "draw_question",
    "questions_for_document",
    "make_task_dataset",
    "char_classes",
    "visual_char_labels",
    "answer_char_boxes",
    "answer_pointer_labels",
    "key_pointer_label",
    "collate",
]

#: The task types, in the order :func:`questions_for_document` asks them.
TASK_TYPES: tuple[str, ...] = ("ocr", "line", "value")
#: The reader's alphabet: upper case and digits without look-alike pairs (0/O, 1/I, 5/S, 8/B,
#: 2/Z): 26 glyphs. A trial reader's main confusion was '0' vs 'D' (docs/tiny_reader.md).
READER_CHARSET: str = UPPER_DIGITS_UNAMBIGUOUS
LINE_PROMPT = "Read line {k}."
VALUE_PROMPT = "Value of {key}?"


class ReaderTaskError(ValueError):
    """Base class of this module's errors."""


class NoQuestionError(ReaderTaskError):
    """The document cannot host the question asked (no such line, no key-value line, ...)."""


class CollationError(ReaderTaskError):
    """A batch cannot be built (empty batch, wrong processor, inconsistent prompt layout)."""


# --------------------------------------------------------------------------------------------
# the reader's documents


def _pair(owner: str, name: str, value: Any, lo: int) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ReaderTaskError(f"{owner}.{name} must be a pair (min, max), got {value!r}")
    a, b = value
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (a, b)):
        raise ReaderTaskError(f"{owner}.{name} must hold integers, got {value!r}")
    if not lo <= a <= b:
        raise ReaderTaskError(f"{owner}.{name} must satisfy {lo} <= min <= max, got {value!r}")
    return int(a), int(b)


@dataclass(frozen=True)
class ReaderDocSpec:
    """The page distribution of the tiny reader: monospace grid pages (one character per 28 px
    cell = one Qwen2-VL visual token, docs/method.md §3), drawn by
    :func:`sparsemm_utils.documents.render_document` with ``layout="grid"``.

    ``cols`` / ``rows``: page size in cells (uniform); ``lines``: lines with text per page
    (at most ``rows``; lines sit on distinct random rows, so empty rows may separate them);
    ``words_per_line`` / ``word_length``: per line and per word; ``charset``: the glyphs;
    ``font_size``: DejaVu Sans Mono size in px; ``jitter``: the glyph's random shift inside its
    cell in px. The defaults give 32-50 visual tokens per page holding 2-3 lines of one or two
    words (up to 9 cells): a ``line`` or ``value`` answer covers a few of those tokens.
    Pages are never resized by the processor: ``cols * rows >= 32`` keeps them above SparseMM's
    ``min_pixels`` (32 * 28^2)."""

    cols: tuple[int, int] = (8, 10)
    rows: tuple[int, int] = (4, 5)
    lines: tuple[int, int] = (2, 3)
    words_per_line: tuple[int, int] = (1, 2)
    word_length: tuple[int, int] = (1, 4)
    charset: str = READER_CHARSET
    font_size: int = 24
    jitter: int = 2
    cell_size: int = 28

    def __post_init__(self) -> None:
        own = type(self).__name__
        for name, lo in (("cols", 1), ("rows", 1), ("lines", 1), ("words_per_line", 1), ("word_length", 1)):
            object.__setattr__(self, name, _pair(own, name, getattr(self, name), lo))
        if self.lines[1] > self.rows[0]:
            raise ReaderTaskError(
                f"{own}.lines={self.lines} allows more lines than the smallest page has rows "
                f"({self.rows[0]}); lower lines or raise rows"
            )
        if self.cols[0] * self.rows[0] < 32:
            raise ReaderTaskError(
                f"{own}: the smallest page ({self.cols[0]}x{self.rows[0]} cells) is below 32 visual tokens; "
                "the Qwen2-VL processor (min_pixels = 32*28^2) would upscale it and break the one-glyph-per-"
                "token geometry. Use cols * rows >= 32"
            )
        if not isinstance(self.charset, str) or not self.charset or any(c.isspace() for c in self.charset):
            raise ReaderTaskError(f"{own}.charset must be a non-empty string without whitespace, got {self.charset!r}")

    def generator_config(self, seed: int, n_documents: int = 1) -> DocumentGeneratorConfig:
        """The step-01 generator config that draws these pages (``chunk_level="line"``)."""
        c = self.cell_size
        return DocumentGeneratorConfig(
            n_documents=n_documents,
            seed=seed,
            chunk_level="line",
            layout="grid",
            charset=self.charset,
            font="dejavu-sans-mono",
            font_size_range=(self.font_size, self.font_size),
            page_width_range=(self.cols[0] * c, self.cols[1] * c + c - 1),
            page_height_range=(self.rows[0] * c, self.rows[1] * c + c - 1),
            lines_per_page_range=self.lines,
            words_per_line_range=self.words_per_line,
            word_length_range=self.word_length,
            cell_size=c,
            jitter=self.jitter,
        )

    def step01_params(self) -> dict[str, Any]:
        """The same pages as step-01 parameters (``configs/*.yaml``, ``01_ocr_annotation``)."""
        cfg = self.generator_config(seed=0)
        keys = (
            "chunk_level", "layout", "charset", "font", "font_size_range", "page_width_range",
            "page_height_range", "lines_per_page_range", "words_per_line_range", "word_length_range",
            "cell_size", "jitter",
        )
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k in keys}

    def with_lines(self, lines: tuple[int, int]) -> "ReaderDocSpec":
        """The same pages with another number of lines (the curriculum's easy pages)."""
        return ReaderDocSpec(**{**asdict(self), "lines": lines})

    def render(self, seed: int, index: int) -> dict[str, Any]:
        """Document ``index`` of the stream ``seed``: a step-01 row with a PIL image."""
        return self.layout(seed, index).row()

    def layout(self, seed: int, index: int) -> PageLayout:
        """The same document laid out, not drawn yet (``.row()`` draws it; ``.row(draw=False)``:
        its text and boxes only, far cheaper)."""
        return layout_document(_shared_generator_config(self, seed), index)


@functools.lru_cache(maxsize=64)
def _shared_generator_config(spec: ReaderDocSpec, seed: int) -> DocumentGeneratorConfig:
    """:meth:`ReaderDocSpec.generator_config`, built (and validated) once per ``(spec, seed)``:
    the reader's training loop lays out about 40 pages a step. Shared, so never mutated."""
    return spec.generator_config(seed)


# --------------------------------------------------------------------------------------------
# lines and questions


@dataclass(frozen=True)
class Line:
    """One line of a document: ``text`` (words joined by one space), ``words``, ``box``
    ``(x0, y0, x1, y1)`` (union of its chunks), per word the union box of its characters
    (``word_boxes``) and the box of every character of ``text`` that is not a space, in order
    (``char_boxes``; both ``None`` where ``char_coord`` has no entries for the line, e.g. SynthDoG)."""

    text: str
    words: tuple[str, ...]
    box: tuple[float, float, float, float]
    word_boxes: tuple[tuple[float, float, float, float], ...] | None
    char_boxes: tuple[tuple[float, float, float, float], ...] | None = None


def _box(coord: Any) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = coord
    return float(x0), float(y0), float(x1), float(y1)


def _union(boxes: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


_LINES_MEMO: dict[int, tuple[Mapping[str, Any], list[Line]]] | None = None


@contextlib.contextmanager
def memoized_document_lines() -> Iterator[None]:
    """Inside the block, :func:`document_lines` works each document out once: a question, its
    pointer labels and its key label all ask for the lines of the same page (about 120 calls a
    training step for 24 pages). Documents must not be changed inside the block; the memo is
    keyed by the document object itself and dropped when the block ends."""
    global _LINES_MEMO
    outer = _LINES_MEMO
    _LINES_MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _LINES_MEMO = outer


def document_lines(doc: Mapping[str, Any]) -> list[Line]:
    """The lines of a step-01 document, top to bottom (module docstring, "Lines").

    ``doc`` is a row of :data:`~sparsemm_utils.documents.FEATURES` (``2_coord`` required,
    ``char_coord`` optional). The OCR answer is ``"\\n".join(line.text for line in lines)``,
    which equals :func:`sparsemm_utils.documents.reading_text` of the chunks."""
    memo = _LINES_MEMO
    if memo is None:
        return _document_lines(doc)
    hit = memo.get(id(doc))
    if hit is None or hit[0] is not doc:
        hit = memo[id(doc)] = (doc, _document_lines(doc))  # the memo keeps doc alive: its id stays its own
    return list(hit[1])


def _document_lines(doc: Mapping[str, Any]) -> list[Line]:
    chunks = doc.get("2_coord")
    if chunks is None:
        raise ReaderTaskError("the document has no '2_coord' field: pass a step-01 row (documents.FEATURES)")
    groups: list[list[int]] = []
    prev_bottom: float | None = None
    for j, entry in enumerate(chunks):
        x0, y0, x1, y1 = _box(entry["coord"])
        if prev_bottom is None or (y0 + y1) / 2 > prev_bottom:
            groups.append([j])
        else:
            groups[-1].append(j)
        prev_bottom = y1
    chars_by_chunk: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for entry in doc.get("char_coord") or []:
        chars_by_chunk.setdefault(int(entry["chunk_index"]), []).append((entry["char"], _box(entry["coord"])))
    lines: list[Line] = []
    for group in groups:
        text = " ".join(chunks[j]["chunk"] for j in group)
        words = tuple(text.split())
        box = _union([_box(chunks[j]["coord"]) for j in group])
        chars = [c for j in group for c in chars_by_chunk.get(j, [])]
        word_boxes = char_boxes = None
        if chars and len(chars) == sum(len(w) for w in words):
            word_boxes, k = [], 0
            for w in words:
                word_boxes.append(_union([b for _, b in chars[k : k + len(w)]]))
                k += len(w)
            word_boxes = tuple(word_boxes)
            char_boxes = tuple(b for _, b in chars)
        lines.append(Line(text=text, words=words, box=box, word_boxes=word_boxes, char_boxes=char_boxes))
    return lines


@dataclass(frozen=True)
class ReaderQuestion:
    """One question on one document.

    ``task``: one of :data:`TASK_TYPES`; ``prompt``: the user text after the image; ``answer``:
    the exact expected output (greedy decoding must reproduce it); ``evidence``: boxes
    ``(x0, y0, x1, y1)`` in image pixels of what the answer is read from (the lines for ``ocr``
    and ``line``, the value's words for ``value``); ``detail``: ``{"line": k}`` (1-based) or
    ``{"key": key, "line": k}``, empty for ``ocr``."""

    task: str
    prompt: str
    answer: str
    evidence: tuple[tuple[float, float, float, float], ...]
    detail: dict[str, Any] = field(default_factory=dict)


def ocr_question(doc: Mapping[str, Any]) -> ReaderQuestion:
    """"Read all the text" with the study's OCR prompt (docs/method.md §2)."""
    lines = document_lines(doc)
    if not lines:
        raise NoQuestionError("the document has no text: no OCR question can be asked")
    return ReaderQuestion("ocr", OCR_PROMPT, "\n".join(l.text for l in lines), tuple(l.box for l in lines))


def line_question(doc: Mapping[str, Any], k: int) -> ReaderQuestion:
    """"Read line k." (``k`` from 1; lines with text only, top to bottom)."""
    lines = document_lines(doc)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(lines):
        raise NoQuestionError(f"line {k!r} does not exist: the document has {len(lines)} lines (k counts from 1)")
    line = lines[int(k) - 1]
    return ReaderQuestion("line", LINE_PROMPT.format(k=int(k)), line.text, (line.box,), {"line": int(k)})


def value_keys(doc: Mapping[str, Any]) -> dict[str, int]:
    """Keys that can be asked about: ``{key: line number (1-based)}`` for every line with at
    least two words whose first word is the first word of no other line."""
    lines = document_lines(doc)
    firsts = [l.words[0] for l in lines if l.words]
    return {
        l.words[0]: i
        for i, l in enumerate(lines, start=1)
        if len(l.words) >= 2 and firsts.count(l.words[0]) == 1
    }


def value_question(doc: Mapping[str, Any], key: str) -> ReaderQuestion:
    """"Value of KEY?": the words after ``key`` on the line that starts with it."""
    keys = value_keys(doc)
    if key not in keys:
        raise NoQuestionError(
            f"{key!r} is not a key of this document (keys: first words of lines with two or more words, "
            f"unique among first words): {sorted(keys) or 'none'}"
        )
    k = keys[key]
    line = document_lines(doc)[k - 1]
    answer = " ".join(line.words[1:])
    evidence = (_union(list(line.word_boxes[1:])),) if line.word_boxes else (line.box,)
    return ReaderQuestion("value", VALUE_PROMPT.format(key=key), answer, evidence, {"key": key, "line": k})


def _check_task(task: str) -> str:
    if task not in TASK_TYPES:
        raise ReaderTaskError(f"unknown task {task!r}; choose one of {list(TASK_TYPES)}")
    return task


def draw_question(doc: Mapping[str, Any], task: str, rng: np.random.Generator) -> ReaderQuestion:
    """A question of type ``task`` on ``doc``; the line (``line``) or key (``value``) is drawn
    uniformly with ``rng``. Raises :class:`NoQuestionError` when the document cannot host it."""
    _check_task(task)
    if task == "ocr":
        return ocr_question(doc)
    if task == "line":
        n = len(document_lines(doc))
        if n == 0:
            raise NoQuestionError("the document has no lines: no line question can be asked")
        return line_question(doc, int(rng.integers(1, n + 1)))
    by_key = value_keys(doc)
    keys = sorted(by_key, key=by_key.__getitem__)  # in line order
    if not keys:
        raise NoQuestionError("the document has no key-value line (a line of two or more words with a unique first word)")
    return value_question(doc, keys[int(rng.integers(0, len(keys)))])


def questions_for_document(
    doc: Mapping[str, Any], tasks: Sequence[str] = TASK_TYPES, *, seed: int = 0
) -> list[ReaderQuestion]:
    """One question per task in ``tasks`` that ``doc`` can host, deterministic in ``(seed,
    doc["doc_id"], task)``: the rng of task ``t`` is ``default_rng([seed, doc_id, index of t in
    TASK_TYPES])``. Tasks the document cannot host are left out."""
    out = []
    doc_id = int(doc.get("doc_id", 0))
    for task in tasks:
        rng = np.random.default_rng([seed, doc_id, TASK_TYPES.index(_check_task(task))])
        try:
            out.append(draw_question(doc, task, rng))
        except NoQuestionError:
            continue
    return out


def make_task_dataset(
    seed: int,
    n: int,
    *,
    tasks: Sequence[str] = TASK_TYPES,
    spec: ReaderDocSpec | None = None,
    progress: bool = False,
):
    """The reading benchmark: documents ``0 .. n-1`` of the stream ``seed`` (``spec``'s pages),
    each asked one question per task it can host (:func:`questions_for_document` with the same
    ``seed``).

    Returns a ``datasets.Dataset`` with columns ``question_id`` (int, row order), ``doc_id``,
    ``task``, ``prompt``, ``answer``, ``evidence`` (list of ``[x0, y0, x1, y1]``), ``detail`` (JSON
    string), ``image`` (``datasets.Image``), ``2_coord`` and ``char_coord`` (step-01 schema). The
    training stream of :mod:`sparsemm_utils.tiny` uses another seed, so a benchmark seed never
    overlaps it when the seeds differ."""
    import datasets
    from tqdm.auto import tqdm

    from .documents import FEATURES

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ReaderTaskError(f"n must be a positive integer (number of documents), got {n!r}")
    for t in tasks:
        _check_task(t)
    spec = spec or ReaderDocSpec()
    rows: dict[str, list[Any]] = {k: [] for k in ("question_id", "doc_id", "task", "prompt", "answer", "evidence", "detail", "image", "2_coord", "char_coord")}
    for index in tqdm(range(int(n)), desc="reader questions", disable=not progress):
        doc = spec.render(seed, index)
        for q in questions_for_document(doc, tasks, seed=seed):
            rows["question_id"].append(len(rows["question_id"]))
            rows["doc_id"].append(doc["doc_id"])
            rows["task"].append(q.task)
            rows["prompt"].append(q.prompt)
            rows["answer"].append(q.answer)
            rows["evidence"].append([list(b) for b in q.evidence])
            rows["detail"].append(json.dumps(q.detail, sort_keys=True))
            rows["image"].append(doc["image"])
            rows["2_coord"].append(doc["2_coord"])
            rows["char_coord"].append(doc["char_coord"])
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "doc_id": datasets.Value("int64"),
            "task": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "evidence": datasets.List(datasets.List(datasets.Value("float64"))),
            "detail": datasets.Value("string"),
            "image": datasets.Image(),
            "2_coord": FEATURES["2_coord"],
            "char_coord": FEATURES["char_coord"],
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


# --------------------------------------------------------------------------------------------
# batches


def char_classes(charset: str = READER_CHARSET) -> dict[str, int]:
    """Class ids of the auxiliary glyph loss: 0 = no character, then ``charset`` in order."""
    return {c: i for i, c in enumerate(charset, start=1)}


def visual_char_labels(doc: Mapping[str, Any], mapper: Any, classes: Mapping[str, int]) -> np.ndarray:
    """The character drawn in each visual token of ``doc``'s image, ``(grid_h * grid_w,)`` int64,
    row-major (the order of the ``<|image_pad|>`` tokens, docs/method.md §3).

    A token holds class 0 when no character box maps to it, ``classes[char]`` when exactly one
    box maps to it and that box maps to it alone, and -100 (ignored by the loss) otherwise
    (boxes over several tokens or tokens under several boxes, impossible on grid pages, or a
    character outside ``classes``). ``mapper``: a
    :class:`~sparsemm_utils.patch_mapping.QwenVLPatchMapper` with the processor's geometry."""
    width, height = doc["image"].size
    labels = np.zeros(mapper.num_tokens(width, height), dtype=np.int64)
    hits = np.zeros_like(labels)
    for entry in doc.get("char_coord") or []:
        positions = mapper.map_box(_box(entry["coord"]), width=width, height=height)
        hits[positions] += 1
        if len(positions) == 1 and entry["char"] in classes:
            labels[positions[0]] = classes[entry["char"]]
        else:
            labels[positions] = -100
    labels[hits > 1] = -100
    return labels


def _text_char_boxes(line: Line, text: str) -> list[tuple[float, float, float, float] | None]:
    """The box of each character of ``text``, a suffix of ``line.text`` (``None`` for spaces)."""
    if not line.text.endswith(text):
        raise ReaderTaskError(
            f"the answer {text!r} is not read from the line {line.text!r} its question names; build questions with "
            "ocr_question / line_question / value_question on the same document"
        )
    skipped = sum(1 for c in line.text[: len(line.text) - len(text)] if c != " ")
    boxes = iter(line.char_boxes[skipped:])
    return [None if c == " " else next(boxes) for c in text]


def answer_char_boxes(doc: Mapping[str, Any], question: ReaderQuestion) -> list[tuple[float, float, float, float] | None]:
    """Where each character of ``question.answer`` is drawn: one entry per character, the box
    ``(x0, y0, x1, y1)`` of that very glyph on the page, ``None`` for a space or a line break
    (drawn nowhere). ``ocr`` answers walk every line, ``line`` answers line ``detail["line"]``,
    ``value`` answers the words after the key on line ``detail["line"]``.

    Worked example: on a page whose second line is ``"K7 93A"``, "Value of K7?" answers
    ``"93A"`` and this returns the boxes of the line's 3rd, 4th and 5th glyphs.
    Raises :class:`ReaderTaskError` for a document without character boxes (``char_coord``)."""
    lines = document_lines(doc)
    if any(l.char_boxes is None for l in lines):
        raise ReaderTaskError(
            "the document has no character boxes for every line ('char_coord'): answer pointers need a "
            "step-01 grid document"
        )
    if question.task != "ocr":
        k = int(question.detail.get("line", 0))
        if not 1 <= k <= len(lines):
            raise ReaderTaskError(
                f"the question names line {k} but the document has {len(lines)} lines; build questions on the same document"
            )
        return _text_char_boxes(lines[k - 1], question.answer)
    if question.answer != "\n".join(l.text for l in lines):
        raise ReaderTaskError(
            f"the answer {question.answer!r} is not this document's OCR text; build questions with ocr_question on the same document"
        )
    out: list[tuple[float, float, float, float] | None] = []
    for i, line in enumerate(lines):
        out += ([None] if i else []) + _text_char_boxes(line, line.text)
    return out


def answer_pointer_labels(doc: Mapping[str, Any], question: ReaderQuestion, mapper: Any, *, blanks: bool = False) -> np.ndarray:
    """The visual token to read each answer token from: ``(len(answer) + 1,)`` int64, one entry
    per answer character and a last one for the closing ``<|im_end|>``; the targets of the
    reader's auxiliary *pointer* loss (:class:`sparsemm_utils.tiny.AuxiliaryHeads`).

    A drawn character points at the row-major index (``<|image_pad|>`` order) of the one token its
    glyph's box maps to (-100 for a glyph over several tokens: none on grid pages). A space, a
    line break and the closing ``<|im_end|>`` are drawn nowhere: -100, or with ``blanks`` the
    token right of the previous glyph (the blank cell that shows the word or line has ended),
    -100 when that glyph is in the last column or has no token of its own.

    Worked example (8 x 4 page, tokens ``row * 8 + col``; ``"CD EF"`` on row 2 from column 3):
    ``[19, 20, -100, 22, 23, -100]``; with ``blanks`` ``[19, 20, 21, 22, 23, -100]`` (F sits in
    the last column, so the end has no cell to its right)."""
    width, height = doc["image"].size
    out = np.full(len(question.answer) + 1, -100, dtype=np.int64)
    for i, box in enumerate(answer_char_boxes(doc, question)):
        if box is not None:
            positions = mapper.map_box(box, width=width, height=height)
            if len(positions) == 1:
                out[i] = int(positions[0])
    if blanks:
        grid_w = int(mapper.describe(width, height)["grid_w"])
        previous = -100
        for i, ch in enumerate([*question.answer, None]):  # None: the closing <|im_end|>
            if ch is None or ch in " \n":
                out[i] = previous + 1 if previous >= 0 and previous % grid_w != grid_w - 1 else -100
            else:
                previous = int(out[i])
    return out


def key_pointer_label(doc: Mapping[str, Any], question: ReaderQuestion, mapper: Any) -> int:
    """The visual token that shows the last character of a ``value`` question's key: the row-major
    index (``<|image_pad|>`` order) of the one token its glyph's box maps to, -100 for a glyph
    over several tokens (none on grid pages). The target of the reader's auxiliary *key pointer*
    loss (:class:`sparsemm_utils.tiny.AuxiliaryHeads`): the prompt steps after the key name the
    row the key was found on, before the answer starts.

    Worked example (8 x 4 page, tokens ``row * 8 + col``; ``"K7 93A"`` on row 1 from column 0):
    "Value of K7?" -> the ``7`` at column 1 -> ``9``. Raises :class:`ReaderTaskError` for other
    tasks and for documents without character boxes."""
    if question.task != "value":
        raise ReaderTaskError(f"key pointers are defined for value questions only, got a {question.task!r} question")
    lines = document_lines(doc)
    k = int(question.detail.get("line", 0))
    key = question.detail.get("key")
    if not 1 <= k <= len(lines) or not lines[k - 1].words or lines[k - 1].words[0] != key:
        raise ReaderTaskError(f"the question's key {key!r} does not start line {k} of this document; build it with value_question on the same document")
    boxes = lines[k - 1].char_boxes
    if boxes is None:
        raise ReaderTaskError("the document has no character boxes for the key's line ('char_coord'): key pointers need a step-01 grid document")
    width, height = doc["image"].size
    positions = mapper.map_box(boxes[len(key) - 1], width=width, height=height)
    return int(positions[0]) if len(positions) == 1 else -100


def collate(
    processor: Any,
    samples: Sequence[tuple[Mapping[str, Any], ReaderQuestion]],
    *,
    classes: Mapping[str, int] | None = None,
    mapper: Any = None,
    pointers: bool = False,
    pointer_blanks: bool = False,
    key_pointers: bool = False,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch of ``(document, question)`` pairs for a Qwen2-VL reader.

    Each sequence is the chat of :func:`sparsemm_utils.prompts.build_inputs` (system prompt,
    image, ``question.prompt``, generation prompt) followed by ``question.answer`` and
    ``<|im_end|>``. Returns the processor's tensors (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``: (B, L); ``pixel_values``: (patches, 1176); ``image_grid_thw``: (B, 3))
    plus ``labels`` (B, L): the token ids of the answer and its closing ``<|im_end|>``, -100
    elsewhere (padding included); ``prefix_len``: a 0-d tensor, the number of leading tokens
    shared by every sequence (everything before the first image token); and, when ``classes``
    is given, ``aux_labels`` (sum of visual tokens,): :func:`visual_char_labels` of each image,
    concatenated in batch order (``mapper``: default, the processor's own geometry); and, when
    ``pointers`` is set, ``pointer_labels`` (B, L): at position ``t`` whose next token ``t + 1``
    is an answer token, the visual token it is read from (:func:`answer_pointer_labels`, with
    ``blanks=pointer_blanks``; row-major within that sample's image), -100 elsewhere (position
    ``t`` predicts token ``t + 1``)."""
    if not samples:
        raise CollationError("cannot collate an empty batch")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise CollationError(f"collate needs a Qwen2-VL processor (image processor + tokenizer), got {type(processor).__name__}")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts, images, prompts = [], [], []
    chats: dict[str, str] = {}  # a batch repeats its task's few prompts: render each chat once
    for doc, q in samples:
        if q.prompt not in chats:
            chats[q.prompt] = processor.apply_chat_template(build_messages(q.prompt, "qwen2_vl"), add_generation_prompt=True, tokenize=False)
        prompt = chats[q.prompt]
        prompts.append(prompt)
        texts.append(prompt + q.answer + "<|im_end|>")
        image = doc["image"]
        if not isinstance(image, Image.Image):
            raise CollationError(f"document {doc.get('doc_id')} has no decoded PIL image (got {type(image).__name__})")
        images.append(image.convert("RGB"))
    answer_ids = [ids + [eos] for ids in tokenizer([q.answer for _, q in samples], add_special_tokens=False)["input_ids"]]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    lengths = mask.sum(dim=1).tolist()
    for i, (n, ans) in enumerate(zip(lengths, answer_ids)):
        tail = ids[i, n - len(ans) : n].tolist()
        if tail != ans:
            raise CollationError(
                f"sample {i}: the last {len(ans)} tokens {tail} are not the answer's {ans}; the chat template or "
                "tokenizer does not end the sequence with the answer"
            )
        labels[i, n - len(ans) : n] = ids[i, n - len(ans) : n]
    image_id = processor.image_token_id
    firsts = (ids == image_id).int().argmax(dim=1)
    if not bool((firsts == firsts[0]).all()) or not bool((ids[:, : int(firsts[0])] == ids[0, : int(firsts[0])]).all()):
        raise CollationError("the sequences do not share the tokens before the image (different system prompts?)")
    out = dict(batch)
    out["labels"] = labels
    out["prefix_len"] = torch.tensor(int(firsts[0]))
    if (classes is not None or pointers or key_pointers) and mapper is None:
        from .patch_mapping import mapper_from_processor

        mapper = mapper_from_processor(processor, "qwen2_vl")
    if pointers:
        pointer = torch.full_like(ids, -100)
        for i, ((doc, q), n, ans) in enumerate(zip(samples, lengths, answer_ids)):
            start = n - len(ans)  # first answer token; the character tokenizer gives one token per character
            if len(ans) - 1 != len(q.answer):
                raise CollationError(f"sample {i}: answer pointers need one token per answer character, got {len(ans) - 1} for {q.answer!r}")
            pointer[i, start - 1 : n - 1] = torch.from_numpy(answer_pointer_labels(doc, q, mapper, blanks=pointer_blanks))
        out["pointer_labels"] = pointer
    if key_pointers:
        key_labels = torch.full_like(ids, -100)
        for i, ((doc, q), n, ans) in enumerate(zip(samples, lengths, answer_ids)):
            if q.task != "value":
                continue
            start = n - len(ans)
            # the key, the rest of the question and the generation prompt end the prompt
            key, chat = str(q.detail["key"]), prompts[i]
            tail = tokenizer(chat[chat.rindex(q.prompt) + q.prompt.rindex(key) :], add_special_tokens=False)["input_ids"]
            key_end = start - len(tail) + len(tokenizer(key, add_special_tokens=False)["input_ids"]) - 1
            if ids[i, start - len(tail) : start].tolist() != tail:
                raise CollationError(f"sample {i}: the prompt does not end with the key {key!r} of {q.prompt!r} and the generation prompt")
            key_labels[i, key_end : start - 1] = key_pointer_label(doc, q, mapper)
        out["key_labels"] = key_labels
    if classes is not None:
        aux = [visual_char_labels(doc, mapper, classes) for doc, _ in samples]
        counts = (batch["image_grid_thw"].prod(dim=1) // 4).tolist()
        if [len(a) for a in aux] != counts:
            raise CollationError(f"visual token counts {[len(a) for a in aux]} disagree with the processor's {counts}")
        out["aux_labels"] = torch.from_numpy(np.concatenate(aux))
    return out
