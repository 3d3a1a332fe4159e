"""Reading tasks on synthetic documents: the tiny reader's pages, its questions, and the offline
reading benchmark.

The offline default run needs a model that really reads (docs/design.md, "The offline world"), so
the project trains a tiny Qwen2-VL on the step-01 grid documents (:mod:`sparsemm_utils.tiny_reader`).
This module turns a step-01 document (schema :data:`sparsemm_utils.document_dataset.FEATURES`) into
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
questions as its offline document-QA benchmark (:func:`make_task_dataset`), and the layer-level
ablations of step 07 read the same held-out pages (:func:`heldout_documents`).

Lines. A line is one ``2_coord`` chunk of a line-level document; for a word-level document the
words of one visual line are grouped again (a chunk whose vertical centre lies below the previous
chunk's bottom starts a new line, the rule of :func:`sparsemm_utils.document_dataset.reading_text`).
A line's words are its text split on spaces.

Document streams. Page ``i`` of the stream ``seed`` is ``ReaderDocSpec.render(seed, i)``; streams
of different seeds share no page (``default_rng([seed, index])``). The reader trains on the stream
of its training seed (0 by default), its model card and the offline benchmark read
:data:`HELDOUT_SEED`, and its training monitor :data:`VALIDATION_SEED`.

This module builds no training batch: those (labels, pointers, ``collate``) belong to the
reader's training (:mod:`sparsemm_utils.tiny_reader.batches`), so the steps that only ask
questions do not import the training code.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .document_dataset import FEATURES
from .page_generator import UPPER_DIGITS_UNAMBIGUOUS, DocumentGeneratorConfig, PageLayout, layout_document
from .prompts import OCR_PROMPT
from .validate import check_choice, check_int, check_int_range, is_int

__all__ = [
    "TASK_TYPES",
    "READER_CHARSET",
    "LINE_PROMPT",
    "VALUE_PROMPT",
    "HELDOUT_SEED",
    "STUDY_PAGES",
    "VALIDATION_SEED",
    "ReaderTaskError",
    "NoQuestionError",
    "ReaderDocSpec",
    "heldout_documents",
    "Line",
    "ReaderQuestion",
    "coord_box",
    "memoized_document_lines",
    "document_lines",
    "ocr_question",
    "line_question",
    "value_question",
    "value_keys",
    "draw_question",
    "questions_for_document",
    "make_task_dataset",
]

#: The task types, in the order :func:`questions_for_document` asks them.
TASK_TYPES: tuple[str, ...] = ("ocr", "line", "value")
#: The reader's alphabet: upper case and digits without look-alike pairs (0/O, 1/I, 5/S, 8/B,
#: 2/Z): 26 glyphs, so that a glyph's shape alone names the character (docs/tiny_reader.md
#: says which confusion it removed).
READER_CHARSET: str = UPPER_DIGITS_UNAMBIGUOUS
LINE_PROMPT = "Read line {k}."
VALUE_PROMPT = "Value of {key}?"
#: Document stream of the held-out benchmark (the reader's model card, step 05's offline
#: ``reader_docqa``, step 07's ablations). The reader's training seed must differ from it.
HELDOUT_SEED: int = 10_000
#: Document stream of the monitor evaluated while the reader trains (not the benchmark's).
VALIDATION_SEED: int = 20_000


class ReaderTaskError(ValueError):
    """Base class of this module's errors."""


class NoQuestionError(ReaderTaskError):
    """The document cannot host the question asked (no such line, no key-value line, ...)."""


# --------------------------------------------------------------------------------------------
# the reader's documents


@dataclass(frozen=True)
class ReaderDocSpec:
    """The page distribution of the tiny reader: monospace grid pages (one character per 28 px
    cell = one Qwen2-VL visual token, docs/method.md §3), drawn by
    :func:`sparsemm_utils.page_generator.render_document` with ``layout="grid"``.

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
            object.__setattr__(self, name, check_int_range(f"{own}.{name}", getattr(self, name), lo, error=ReaderTaskError))
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


#: The study model's pages (:mod:`sparsemm_utils.study_model`): 12 x 8 cells of 28 px = 336 x 224 px
#: (the study model's one page size, so one visual token stays one cell), 3-6 lines of 1-3 words of
#: 1-4 characters. The offline benchmark ``study_docqa`` asks its questions on these pages.
STUDY_PAGES = ReaderDocSpec(cols=(12, 12), rows=(8, 8), lines=(3, 6), words_per_line=(1, 3), word_length=(1, 4))


@functools.lru_cache(maxsize=64)
def _shared_generator_config(spec: ReaderDocSpec, seed: int) -> DocumentGeneratorConfig:
    """:meth:`ReaderDocSpec.generator_config`, built (and validated) once per ``(spec, seed)``:
    the reader's training loop lays out about 40 pages a step. Shared, so never mutated."""
    return spec.generator_config(seed)


def heldout_documents(n: int, spec: ReaderDocSpec | None = None, seed: int = HELDOUT_SEED) -> list[dict[str, Any]]:
    """Pages ``0 .. n-1`` of the held-out stream ``seed`` (step-01 rows with PIL images) of
    ``spec``'s distribution (default :class:`ReaderDocSpec`)."""
    spec = spec or ReaderDocSpec()
    return [spec.render(seed, i) for i in range(n)]


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


def coord_box(coord: Any) -> tuple[float, float, float, float]:
    """A step-01 ``coord`` ``[[x0, y0], [x1, y1]]`` as a box ``(x0, y0, x1, y1)`` of floats."""
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

    ``doc`` is a row of :data:`~sparsemm_utils.document_dataset.FEATURES` (``2_coord`` required,
    ``char_coord`` optional). The OCR answer is ``"\\n".join(line.text for line in lines)``,
    which equals :func:`sparsemm_utils.document_dataset.reading_text` of the chunks."""
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
        raise ReaderTaskError("the document has no '2_coord' field: pass a step-01 row (document_dataset.FEATURES)")
    groups: list[list[int]] = []
    prev_bottom: float | None = None
    for j, entry in enumerate(chunks):
        x0, y0, x1, y1 = coord_box(entry["coord"])
        if prev_bottom is None or (y0 + y1) / 2 > prev_bottom:
            groups.append([j])
        else:
            groups[-1].append(j)
        prev_bottom = y1
    chars_by_chunk: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for entry in doc.get("char_coord") or []:
        chars_by_chunk.setdefault(int(entry["chunk_index"]), []).append((entry["char"], coord_box(entry["coord"])))
    lines: list[Line] = []
    for group in groups:
        text = " ".join(chunks[j]["chunk"] for j in group)
        words = tuple(text.split())
        box = _union([coord_box(chunks[j]["coord"]) for j in group])
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
    if not is_int(k) or not 1 <= k <= len(lines):
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
    return check_choice("task", task, TASK_TYPES, error=ReaderTaskError)


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
    reader's training stream uses another seed, so a benchmark seed never overlaps it when the
    seeds differ."""
    check_int("n", n, 1, error=ReaderTaskError, hint="the number of documents")
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
