"""The step-01 dataset: OCR documents with chunk boxes and per-character boxes (docs/method.md §2).

SparseMM scores a head by asking whether, while the model *reads* a document aloud, the head's
strongest attention lands on the image patch the current output token was read from. That needs
documents whose text positions are known: each row holds an image and its OCR **chunks** (a
line or a word of text with its box). This module is the dataset itself, whichever source it
comes from (pages drawn by :mod:`sparsemm_utils.page_generator`, or the original data read by
:mod:`sparsemm_utils.synthdog`): its schema, saving and loading, the validation of its rows, and
statistics for the notebook. Step 01 (:mod:`sparsemm_utils.steps.ocr_annotation`) builds it.

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
- ``source`` (str): ``"synthetic"`` or ``"synthdog"`` (:data:`SOURCES`).

Box convention: pixel edges, ``x1``/``y1`` exclusive, so a glyph whose ink covers pixel columns
``12..21`` has ``x0 = 12, x1 = 22``. The image is the closed rectangle ``[0, W] x [0, H]`` (the
convention of step 02).

Reproducibility: :func:`save_documents` sets the dataset fingerprint to a hash of the content
(:func:`content_fingerprint`), so the same rows give byte-identical files with the pinned Pillow
and datasets.

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
import math
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
from PIL import Image as PILImage
from tqdm.auto import tqdm

import datasets
from datasets import Dataset, Features, List, Value

from .validate import check_choice

__all__ = [
    "SOURCES",
    "FEATURES",
    "COLUMNS",
    "DocumentError",
    "DocumentConfigError",
    "BadDocumentError",
    "SchemaMismatchError",
    "content_fingerprint",
    "with_content_fingerprint",
    "save_documents",
    "load_documents",
    "Issue",
    "ValidationReport",
    "image_bytes",
    "validate_rows",
    "reading_text",
    "document_statistics",
    "chunk_statistics",
    "char_statistics",
]

#: Values of the ``source`` column.
SOURCES = ("synthetic", "synthdog")

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


def with_content_fingerprint(ds: Dataset) -> Dataset:
    """``ds`` (indices flattened) with :func:`content_fingerprint` as its fingerprint."""
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
    ds = with_content_fingerprint(ds.cast_column("image", datasets.Image()))
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
            "run step 01 (OCR annotation) first: notebooks/01_ocr_annotation.ipynb, or the pipeline with --to 01"
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


def image_bytes(value: Any) -> bytes:
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
    check_choice("validate_rows.on_bad", on_bad, ("skip", "raise"), error=DocumentConfigError)
    _check_schema(ds)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    report = ValidationReport(on_bad=on_bad, input_rows=len(raw))
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    seen: set[int] = set()
    for r, row in enumerate(tqdm(raw, desc="validating documents", disable=not progress, total=len(raw))):
        doc_id = row["doc_id"]

        def issue(level: str, index: int | None, reason: str, detail: str, action: str = "skipped") -> None:
            if on_bad == "raise" and action != "kept":
                where = "" if index is None else f" ({'2_coord' if level == 'chunk' else 'char_coord'}[{index}])"
                raise BadDocumentError(r, doc_id, reason, detail + where)
            report.issues.append(Issue(r, doc_id, level, index, reason, detail, action))

        def checked_box(level: str, index: int, coord: Any) -> list[list[float]] | None:
            """The entry's box, clipped to the image when it overhangs (reported), or None when
            the entry must be skipped (reported)."""
            box, reason, detail = _check_box(coord, width, height)
            if box is None:
                issue(level, index, reason, detail)
            elif reason is not None:
                issue(level, index, reason, detail, "clipped")
            return box

        if doc_id is None:
            issue("row", None, "missing_doc_id", "doc_id is None")
            continue
        if doc_id in seen:
            issue("row", None, "duplicate_doc_id", f"doc_id {doc_id} already used by an earlier row")
            continue
        try:
            data = image_bytes(row["image"])
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
            box = checked_box("chunk", j, entry.get("coord"))
            if box is None:
                continue
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
            box = checked_box("char", k, entry.get("coord"))
            if box is None:
                continue
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
    clean = with_content_fingerprint(Dataset.from_dict(columns, features=FEATURES))
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
        with PILImage.open(io.BytesIO(image_bytes(row["image"]))) as image:
            width, height = image.size
        yield row, width, height


def document_statistics(ds: Dataset) -> pd.DataFrame:
    """One row per document: ``doc_id, source, width, height, n_chunks, n_char_boxes,
    text_characters`` (image sizes read from the file headers)."""
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


def chunk_statistics(ds: Dataset) -> pd.DataFrame:
    """One row per chunk: ``doc_id, chunk_index, text, n_characters`` (non-whitespace),
    ``n_words, x0, y0, x1, y1, width, height``."""
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


def char_statistics(ds: Dataset) -> pd.DataFrame:
    """One row per character box: ``doc_id, char, chunk_index, x0, y0, x1, y1, width, height``."""
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
