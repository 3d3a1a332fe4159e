"""The original data of step 01: ``nnethercott/synthdog-en-detection`` (docs/method.md §2).

SparseMM scores heads on the first 1000 rows, in dataset order, of this HF dataset: SynthDoG-en
renders (Donut's synthetic documents) with OCR boxes added by PaddleOCR. Its schema on the hub
(``README.md`` of the dataset, ``dataset_info.features``; 50,016 train rows in 10 parquet shards
``data/train-0000K-of-00010.parquet``) is mirrored by :data:`SYNTHDOG_FEATURES`:

- ``image``: ``datasets.Image`` (JPEG bytes);
- ``ground_truth``: a JSON string ``{"gt_parse": {"text_sequence": ...}}`` (SynthDoG's text);
- ``2_coord``: list of ``{chunk: string, coord: [[xmin, ymin], [xmax, ymax]]}`` (float64 pixels),
  a list of structs, not a JSON string; ``2_coord_norm`` the same divided by (w, h);
- ``4_coord`` / ``4_coord_norm``: the same chunks with 4-corner polygons.

:func:`load_synthdog` reads the first ``n_rows`` rows in dataset order and converts them to the
step-01 schema (:data:`sparsemm_utils.document_dataset.FEATURES`): ``doc_id`` = row index, the image
bytes untouched, ``2_coord`` as is, ``char_coord`` empty (the original has no character boxes),
``source = "synthdog"``. It does not validate: :func:`sparsemm_utils.document_dataset.validate_rows`
does (a corrupt image is reported there, with its row).

Offline, the hub cannot be reached: :class:`SynthdogUnavailableError` says how to download the
first shard (about 5,000 rows, enough for the original 1000) and where to point ``dataset_path``.
The local fixture ``data/fixtures/synthdog_en_detection`` (:func:`build_synthdog_fixture`) has
the hub's layout and schema with a few small generated rows, one of them with a corrupt image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

import datasets
from datasets import Dataset, Features, List, Value

from .document_dataset import (
    COLUMNS,
    FEATURES,
    DocumentError,
    SchemaMismatchError,
    reading_text,
    with_content_fingerprint,
)
from .page_generator import ALNUM, DocumentGeneratorConfig, render_document
from .runs import repo_root
from .validate import check_int

__all__ = [
    "SYNTHDOG_HUB_ID",
    "SYNTHDOG_FEATURES",
    "SYNTHDOG_COLUMNS",
    "FIXTURE_DIR",
    "SynthdogError",
    "SynthdogUnavailableError",
    "NotEnoughRowsError",
    "download_instructions",
    "read_synthdog_rows",
    "synthdog_to_documents",
    "load_synthdog",
    "build_synthdog_fixture",
]

SYNTHDOG_HUB_ID = "nnethercott/synthdog-en-detection"
_BOXES = List({"chunk": Value("string"), "coord": List(List(Value("float64")))})
#: The hub dataset's features, in the hub's column order.
SYNTHDOG_FEATURES = Features(
    {
        "image": datasets.Image(),
        "ground_truth": Value("string"),
        "2_coord": _BOXES,
        "4_coord": _BOXES,
        "2_coord_norm": _BOXES,
        "4_coord_norm": _BOXES,
    }
)
SYNTHDOG_COLUMNS = tuple(SYNTHDOG_FEATURES)
_REQUIRED = ("image", "2_coord")
FIXTURE_DIR = repo_root() / "data" / "fixtures" / "synthdog_en_detection"


class SynthdogError(DocumentError):
    """Base class of the adapter's errors."""


class SynthdogUnavailableError(SynthdogError):
    """The dataset is neither local nor reachable on the hub; the message says how to get it."""


class NotEnoughRowsError(SynthdogError):
    """Fewer rows than requested are available."""


def download_instructions(hub_id: str = SYNTHDOG_HUB_ID) -> str:
    """How to fetch the rows the original uses (the first shard holds about the first 5,000 rows)."""
    return (
        f"Download it on a machine with hub access, e.g.\n"
        f"  hf download {hub_id} README.md data/train-00000-of-00010.parquet --repo-type dataset "
        f"--local-dir data/synthdog-en-detection\n"
        f"(about 430 MB; the first 1000 rows used by the original are in that first shard), then "
        f"run step 01 with source='synthdog' and dataset_path='data/synthdog-en-detection'."
    )


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") != 1 or text.endswith(".parquet")


def _open(path_or_id: str, split: str) -> Dataset | datasets.IterableDataset:
    """A dataset (or a stream) over the rows of ``split``, in dataset order."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.is_file():
            if split != "train":
                raise SynthdogError(f"a single parquet file has only the 'train' split, got split={split!r}")
            return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SynthdogError(f"{path} has splits {list(loaded)}, not {split!r}")
                loaded = loaded[split]
            return loaded
        try:
            return datasets.load_dataset(str(path), split=split, streaming=True)
        except ValueError as exc:  # e.g. an unknown split
            raise SynthdogError(f"cannot read split {split!r} of {path}: {exc}") from exc
    if _looks_like_path(path_or_id):
        raise FileNotFoundError(f"no dataset at {path}. " + download_instructions())
    try:
        return datasets.load_dataset(path_or_id, split=split, streaming=True)
    except Exception as exc:  # offline, unknown id, gated...: all mean "not available here"
        raise SynthdogUnavailableError(
            f"cannot reach the hub dataset {path_or_id!r} ({type(exc).__name__}: {exc}). "
            + download_instructions(path_or_id)
        ) from exc


def read_synthdog_rows(n_rows: int, path_or_id: str = SYNTHDOG_HUB_ID, split: str = "train") -> list[dict[str, Any]]:
    """The first ``n_rows`` rows of ``split`` in dataset order, as dicts with the hub's columns;
    images undecoded (``{"bytes", "path"}``), so a corrupt file is read, not raised."""
    check_int("n_rows", n_rows, 1, error=SynthdogError)
    source = _open(path_or_id, split)
    names = source.column_names
    if names is not None:
        missing = [c for c in _REQUIRED if c not in names]
        if missing:
            raise SchemaMismatchError(
                f"{path_or_id} has columns {names}, lacking {missing}; expected the schema of "
                f"{SYNTHDOG_HUB_ID}: {list(SYNTHDOG_COLUMNS)}"
            )
    source = source.cast_column("image", datasets.Image(decode=False))
    rows: list[dict[str, Any]] = []
    try:
        for row in source:
            if len(rows) == n_rows:
                break
            rows.append(row)
    except Exception as exc:  # a stream fails while reading (network or file)
        if isinstance(exc, (SynthdogError, SchemaMismatchError)):
            raise
        raise SynthdogUnavailableError(
            f"reading {path_or_id!r} failed after {len(rows)} rows ({type(exc).__name__}: {exc}). "
            + download_instructions()
        ) from exc
    if len(rows) < n_rows:
        raise NotEnoughRowsError(f"{path_or_id} split {split!r} has {len(rows)} rows, fewer than n_rows={n_rows}; ask for at most {len(rows)}")
    return rows


def synthdog_to_documents(rows: Sequence[dict[str, Any]]) -> Dataset:
    """Convert hub rows (in order) to the step-01 schema: ``doc_id`` = position, image bytes
    kept as they are, ``2_coord`` as is, ``char_coord`` empty, ``source = "synthdog"``."""
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for i, row in enumerate(rows):
        image = row["image"]
        if isinstance(image, PILImage.Image):  # a decoded image (e.g. rows built in memory)
            buf = io.BytesIO()
            image.save(buf, format=image.format or "PNG")
            image = {"bytes": buf.getvalue(), "path": None}
        columns["doc_id"].append(i)
        columns["image"].append(image)
        columns["2_coord"].append(
            [{"chunk": c.get("chunk"), "coord": c.get("coord")} for c in (row.get("2_coord") or [])]
        )
        columns["char_coord"].append([])
        columns["source"].append("synthdog")
    return with_content_fingerprint(Dataset.from_dict(columns, features=FEATURES))


def load_synthdog(n_rows: int, path_or_id: str = SYNTHDOG_HUB_ID, split: str = "train") -> Dataset:
    """The first ``n_rows`` rows of the original OCR data, in dataset order, in the step-01
    schema (unvalidated; pass the result to ``validate_rows``). ``path_or_id``: a hub snapshot
    folder (``README.md`` + ``data/*.parquet``), a parquet file, a ``save_to_disk`` folder, or
    the hub id (needs the hub: see :func:`download_instructions`)."""
    return synthdog_to_documents(read_synthdog_rows(n_rows, path_or_id, split))


# --------------------------------------------------------------------------------------------
# the fixture

#: How the fixture's pages are drawn: small pages, proportional font, line-level chunks.
FIXTURE_GENERATOR = DocumentGeneratorConfig(
    n_documents=6,
    seed=2506,
    chunk_level="line",
    layout="free",
    charset=ALNUM,
    font_size_range=(12, 16),
    page_width_range=(160, 240),
    page_height_range=(96, 144),
    lines_per_page_range=(2, 4),
    words_per_line_range=(1, 3),
    word_length_range=(2, 7),
    margin=6,
)

_README = """---
dataset_info:
  features:
{features}
  splits:
    - name: train
      num_bytes: {num_bytes}
      num_examples: {n_rows}
  download_size: {download_size}
  dataset_size: {num_bytes}
configs:
  - config_name: default
    data_files:
      - split: train
        path: data/train-*
task_categories:
  - image-to-text
  - object-detection
language:
  - en
---

# Fixture in the schema of `{hub_id}`

NOT real data. {n_rows} small pages drawn by `sparsemm_utils.page_generator` (seed {seed}), stored
exactly in the layout and schema of the hub dataset (`README.md` with `dataset_info`, parquet
shards under `data/`, columns {columns}), so that `datasets.load_dataset(<this folder>)` reads it
as it reads a download of the hub dataset. Boxes are the generator's line boxes padded by
{pad} px, like PaddleOCR's looser boxes. Row(s) {corrupt} hold a truncated JPEG on purpose: the
adapter's tests check that step 01 reports it.

Rebuild: `python -c "from sparsemm_utils.synthdog import build_synthdog_fixture as b; b()"`.
"""


def _features_yaml() -> str:
    lines = []
    for name in SYNTHDOG_COLUMNS:
        if name == "image":
            lines += ["    - name: image", "      dtype: image"]
        elif name == "ground_truth":
            lines += ["    - name: ground_truth", "      dtype: string"]
        else:
            lines += [
                f"    - name: {name}",
                "      list:",
                "        - name: chunk",
                "          dtype: string",
                "        - name: coord",
                "          sequence:",
                "            sequence: float64",
            ]
    return "\n".join(lines)


def _jpeg_bytes(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def fixture_rows(
    cfg: DocumentGeneratorConfig = FIXTURE_GENERATOR, corrupt_rows: Sequence[int] = (5,), pad: int = 2
) -> list[dict[str, Any]]:
    """The fixture's rows in the hub schema (images as ``{"bytes", "path"}``)."""
    rows = []
    for i in range(cfg.n_documents):
        doc = render_document(cfg, i)
        w, h = doc["image"].size
        boxes2, boxes4 = [], []
        for c in doc["2_coord"]:
            (x0, y0), (x1, y1) = c["coord"]
            x0, y0 = max(0.0, x0 - pad), max(0.0, y0 - pad)
            x1, y1 = min(float(w), x1 + pad), min(float(h), y1 + pad)
            boxes2.append({"chunk": c["chunk"], "coord": [[x0, y0], [x1, y1]]})
            boxes4.append({"chunk": c["chunk"], "coord": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]})
        data = _jpeg_bytes(doc["image"])
        if i in corrupt_rows:
            data = data[: len(data) // 2]  # a truncated JPEG: the header opens, decoding fails
        rows.append(
            {
                "image": {"bytes": data, "path": None},
                "ground_truth": json.dumps({"gt_parse": {"text_sequence": reading_text(boxes2)}}),
                "2_coord": boxes2,
                "4_coord": boxes4,
                "2_coord_norm": [
                    {"chunk": b["chunk"], "coord": [[x / w, y / h] for x, y in b["coord"]]} for b in boxes2
                ],
                "4_coord_norm": [
                    {"chunk": b["chunk"], "coord": [[x / w, y / h] for x, y in b["coord"]]} for b in boxes4
                ],
            }
        )
    return rows


def build_synthdog_fixture(
    out_dir: str | Path = FIXTURE_DIR,
    cfg: DocumentGeneratorConfig = FIXTURE_GENERATOR,
    corrupt_rows: Sequence[int] = (5,),
    pad: int = 2,
) -> Path:
    """Write a hub-layout fixture (``README.md`` + ``data/train-00000-of-00001.parquet``)."""
    out = Path(out_dir)
    bad = [r for r in corrupt_rows if not 0 <= r < cfg.n_documents]
    if bad:
        raise SynthdogError(f"corrupt_rows {bad} are not rows of a {cfg.n_documents}-row fixture")
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("train-*.parquet"):
        old.unlink()
    rows = fixture_rows(cfg, corrupt_rows, pad)
    ds = Dataset.from_list(rows, features=SYNTHDOG_FEATURES)
    parquet = out / "data" / "train-00000-of-00001.parquet"
    ds.to_parquet(str(parquet))
    readme = _README.format(
        features=_features_yaml(),
        num_bytes=ds.data.nbytes,
        download_size=parquet.stat().st_size,
        n_rows=len(rows),
        hub_id=SYNTHDOG_HUB_ID,
        seed=cfg.seed,
        columns=", ".join(f"`{c}`" for c in SYNTHDOG_COLUMNS),
        pad=pad,
        corrupt=", ".join(str(r) for r in corrupt_rows) or "none",
    )
    (out / "README.md").write_text(readme)
    return out
