"""Step 01, OCR annotation (notebook ``01_ocr_annotation``): documents with chunk and character
boxes (docs/method.md §2).

The step builds the documents that step 03 reads aloud: pages generated from a seed
(:mod:`sparsemm_utils.page_generator`) or the first rows of the original data
(:mod:`sparsemm_utils.synthdog`), validated and saved in the step-01 schema
(:mod:`sparsemm_utils.document_dataset`, which states the schema and the validation rules).

Outputs, in ``<run_dir>/01_ocr_annotation/`` (:data:`STEP`): :data:`DOCUMENTS` (``documents/``,
``save_to_disk``), :data:`ANNOTATION_REPORT` (what validation kept, clipped and skipped, with the
parameters) and :data:`FINDINGS` (:func:`findings`), all written by :func:`write_outputs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset

from ..artifacts import Artifact, StepSpec
from ..document_dataset import (
    SOURCES,
    DocumentConfigError,
    ValidationReport,
    load_documents,
    reading_text,
    save_documents,
)
from ..findings import Finding, findings_frame, read_findings
from ..page_generator import DocumentGeneratorConfig, generate_documents
from ..parameters import MAX_DOCUMENTS, check_allow_large, check_size
from ..runs import repo_root
from ..synthdog import SYNTHDOG_HUB_ID, load_synthdog
from ..validate import check_choice, check_int

__all__ = [
    "NAME",
    "DOCUMENTS",
    "ANNOTATION_REPORT",
    "FINDINGS",
    "STEP",
    "PAPER_DOCUMENTS",
    "PAPER_MAX_NEW_TOKENS",
    "Config",
    "build_documents",
    "report_parameters",
    "write_outputs",
    "findings",
]

NAME = "01_ocr_annotation"

#: The original's data: the first 1000 rows of the hub dataset, in dataset order (docs/method.md §2).
PAPER_DOCUMENTS = 1000
#: The original's OCR answer: greedy, at most 1024 new tokens (docs/method.md §2).
PAPER_MAX_NEW_TOKENS = 1024


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


DOCUMENTS: Artifact[Dataset] = Artifact(
    NAME,
    "documents",
    "the step-01 documents (a save_to_disk dataset: doc_id, image, chunk boxes 2_coord, character boxes char_coord, source)",
    reader=load_documents,
)
ANNOTATION_REPORT: Artifact[dict[str, Any]] = Artifact(
    NAME,
    "annotation_report.json",
    "the annotation report (parameters; documents, chunks and character boxes kept; every skipped or clipped item)",
    reader=_read_json,
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(NAME, "findings.csv", "step 01's findings table", reader=read_findings)

STEP = StepSpec(
    NAME,
    "OCR annotation: documents with chunk and character boxes",
    inputs=(),
    outputs=(DOCUMENTS, ANNOTATION_REPORT, FINDINGS),
)

#: Parameters of the notebook alone (where to write, how many pages to draw): they do not shape
#: the documents, so the annotation report does not record them.
_NOTEBOOK_ONLY = ("run_dir", "n_sample_figures", "allow_large")


@dataclass
class Config(DocumentGeneratorConfig):
    """Parameters of step 01 (notebook ``01_ocr_annotation``): where documents come from, how
    bad rows are handled, and (for ``source="synthetic"``) every generator field of
    :class:`~sparsemm_utils.page_generator.DocumentGeneratorConfig`.

    - ``source``: ``"synthetic"`` (generate ``n_documents`` pages from ``seed``) or
      ``"synthdog"`` (the first ``n_documents`` rows, in dataset order, of the original data:
      docs/method.md §2 uses 1000).
    - ``dataset_path``: for ``"synthdog"``, a local copy (a hub snapshot folder, a parquet file
      or a ``save_to_disk`` folder; relative paths are taken from the repository root) or a hub
      id; ``None`` means the hub id ``nnethercott/synthdog-en-detection``.
    - ``split``: the split to read (``"train"``, the only one on the hub).
    - ``on_bad``: ``"skip"`` (count and report) or ``"raise"``
      (:class:`~sparsemm_utils.document_dataset.BadDocumentError`).
    - ``run_dir``: the run folder (relative paths from the repository root).
    - ``n_sample_figures``: pages drawn in ``fig_samples.png``.
    - ``allow_large``: lift the bound on ``n_documents``
      (:data:`~sparsemm_utils.parameters.MAX_DOCUMENTS`).
    """

    source: str = "synthetic"
    dataset_path: str | None = None
    split: str = "train"
    on_bad: str = "skip"
    run_dir: str = "runs/tiny"
    n_sample_figures: int = 4
    allow_large: bool = False

    def __post_init__(self) -> None:
        own = type(self).__name__
        check_allow_large(self.allow_large, error=DocumentConfigError)
        check_size(f"{own}.n_documents", self.n_documents, MAX_DOCUMENTS, allow_large=self.allow_large, error=DocumentConfigError)
        check_choice(f"{own}.source", self.source, SOURCES, error=DocumentConfigError)
        check_choice(f"{own}.on_bad", self.on_bad, ("skip", "raise"), error=DocumentConfigError)
        if self.dataset_path is not None and (not isinstance(self.dataset_path, str) or not self.dataset_path):
            raise DocumentConfigError(f"{own}.dataset_path must be None or a non-empty string, got {self.dataset_path!r}")
        if self.source == "synthetic" and self.dataset_path is not None:
            raise DocumentConfigError(
                f"{own}: dataset_path={self.dataset_path!r} is only read with source='synthdog'; "
                "set source='synthdog' or dataset_path=None"
            )
        if not isinstance(self.split, str) or not self.split:
            raise DocumentConfigError(f"{own}.split must be a non-empty string, got {self.split!r}")
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise DocumentConfigError(f"{own}.run_dir must be a non-empty path, got {self.run_dir!r}")
        self.n_sample_figures = check_int(f"{own}.n_sample_figures", self.n_sample_figures, 1, error=DocumentConfigError)
        super().__post_init__()


def build_documents(cfg: Config, *, progress: bool = True) -> Dataset:
    """The unvalidated step-01 dataset of ``cfg``: generated (``source="synthetic"``) or the
    first ``cfg.n_documents`` rows of the original data (``source="synthdog"``)."""
    if cfg.source == "synthetic":
        return generate_documents(cfg.generator_config(), progress=progress)
    path_or_id = cfg.dataset_path or SYNTHDOG_HUB_ID
    local = repo_root() / path_or_id
    if cfg.dataset_path and not Path(path_or_id).is_absolute() and local.exists():
        path_or_id = str(local)
    return load_synthdog(cfg.n_documents, path_or_id=path_or_id, split=cfg.split)


def report_parameters(cfg: Config) -> dict[str, Any]:
    """The parameters recorded in ``annotation_report.json``: every field of ``cfg`` that shapes
    the documents (the notebook's ``run_dir``, ``n_sample_figures`` and ``allow_large`` left out)."""
    return {k: v for k, v in asdict(cfg).items() if k not in _NOTEBOOK_ONLY}


def write_outputs(cfg: Config, documents: Dataset, report: ValidationReport) -> list[Finding]:
    """Write the step's outputs into ``<cfg.run_dir>/01_ocr_annotation/``: the validated
    ``documents`` (:data:`DOCUMENTS`), ``annotation_report.json`` (``report`` with the
    parameters, :data:`ANNOTATION_REPORT`) and ``findings.csv`` (:func:`findings`,
    :data:`FINDINGS`). Returns the findings."""
    STEP.folder(cfg.run_dir, create=True)
    save_documents(documents, DOCUMENTS.path(cfg.run_dir))
    payload = {"config": report_parameters(cfg), **report.to_dict()}
    ANNOTATION_REPORT.path(cfg.run_dir).write_text(json.dumps(payload, indent=2) + "\n")
    found = findings(report, documents, cfg)
    findings_frame(found).to_csv(FINDINGS.path(cfg.run_dir), index=False)
    return found


def _count(report: ValidationReport, level: str, action: str) -> int:
    return sum(1 for i in report.issues if i.level == level and i.action == action)


def _spread(values: np.ndarray) -> str:
    """``"median m (min-max)"`` of a non-empty array."""
    return f"median {float(np.median(values)):g} ({values.min()}-{values.max()})"


def findings(report: ValidationReport, documents: Dataset, cfg: Config) -> list[Finding]:
    """Step 01's findings, from the validation ``report`` and the validated ``documents``:

    1. the data: the paper's first 1000 SynthDoG rows, or what this run used instead (headline);
    2. rows: every input row kept (skipped rows are lost samples; chunkless ones are kept);
    3. chunk boxes: every box lies on its page (none skipped, none clipped);
    4. character boxes: one per character of chunk text (this project's addition);
    5. page length: every page's text fits the paper's 1024-token OCR answer (a reader emits at
       most one token per character of ASCII text; longer pages: cannot tell).
    """
    docs = report.documents
    source_counts = ", ".join(f"{n} {s}" for s, n in sorted(report.sources.items())) or "no"
    if cfg.source == "synthdog":
        used = f"{source_counts} rows (the first {cfg.n_documents} of {cfg.dataset_path or SYNTHDOG_HUB_ID}, in dataset order)"
    else:
        used = f"{source_counts} documents drawn from seed {cfg.seed} ({cfg.layout} layout, {cfg.chunk_level} chunks; offline data, docs/method.md §2)"
    paper_data = f"the first {PAPER_DOCUMENTS} rows of {SYNTHDOG_HUB_ID}, in dataset order (docs/method.md §2)"
    data_holds = cfg.source == "synthdog" and report.input_rows == PAPER_DOCUMENTS and docs == PAPER_DOCUMENTS

    kept_without_chunks = _count(report, "row", "kept")
    rows_this_run = (
        f"{docs} of {report.input_rows} input rows kept, {report.skipped_rows} skipped "
        f"({kept_without_chunks} kept without any chunk)"
    )

    chunks_in = report.chunks + report.skipped_chunks
    clipped_chunks = _count(report, "chunk", "clipped")
    chunks_this_run = (
        f"{report.chunks} of {chunks_in} chunk boxes kept, {report.skipped_chunks} skipped, "
        f"{clipped_chunks} clipped to the page"
    )

    clipped_chars = _count(report, "char", "clipped")
    if cfg.source == "synthdog" and report.characters == 0:
        chars_this_run = f"none: the original data has no character boxes ({report.text_characters} characters of chunk text)"
        chars_holds = None
    else:
        chars_this_run = (
            f"{report.characters} character boxes for {report.text_characters} characters of chunk text; "
            f"{report.skipped_characters} skipped, {clipped_chars} clipped"
        )
        chars_holds = report.characters == report.text_characters and report.skipped_characters == 0

    lengths = np.array([len(reading_text(c)) for c in documents["2_coord"]], dtype=np.int64)
    if lengths.size:
        longest = int(lengths.max())
        length_this_run = (
            f"characters of text per page (spaces and line breaks included): {_spread(lengths)}; "
            f"{int((lengths <= PAPER_MAX_NEW_TOKENS).sum())} of {lengths.size} pages have at most {PAPER_MAX_NEW_TOKENS}"
        )
        length_holds = True if longest <= PAPER_MAX_NEW_TOKENS else None
    else:
        length_this_run, length_holds = "no documents", None

    return [
        Finding(NAME, "Heads are scored on the original OCR data", paper_data, used, docs, data_holds, headline=True),
        Finding(
            NAME,
            "Every input row is a usable document",
            f"every one of the {PAPER_DOCUMENTS} rows is a sample; head scores average over all of them (docs/method.md §4)",
            rows_this_run,
            report.input_rows,
            report.skipped_rows == 0,
        ),
        Finding(
            NAME,
            "Every OCR chunk box lies on its page",
            "the original uses the boxes of 2_coord as given (docs/method.md §2)",
            chunks_this_run,
            chunks_in,
            report.skipped_chunks == 0 and clipped_chunks == 0,
        ),
        Finding(
            NAME,
            "Every character of chunk text has its own box",
            "none: the original data has line boxes only (docs/method.md §2)",
            chars_this_run,
            report.text_characters,
            chars_holds,
        ),
        Finding(
            NAME,
            f"A page's text fits the OCR answer of at most {PAPER_MAX_NEW_TOKENS} new tokens",
            f"greedy decoding, at most {PAPER_MAX_NEW_TOKENS} new tokens (docs/method.md §2)",
            length_this_run,
            int(lengths.size),
            length_holds,
        ),
    ]
