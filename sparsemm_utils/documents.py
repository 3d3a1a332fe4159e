"""Step 01: OCR documents with chunk boxes and per-character boxes (docs/method.md §2).

The step (notebook ``01_ocr_annotation``) builds the documents that step 03 reads aloud: pages
generated from a seed (:mod:`sparsemm_utils.page_generator`) or the first rows of the original
data (:mod:`sparsemm_utils.synthdog`), validated and saved in the step-01 schema
(:mod:`sparsemm_utils.document_dataset`, which states the schema and the validation rules), with
an ``annotation_report.json`` of what validation kept, clipped and skipped.

Outputs, in ``<run_dir>/01_ocr_annotation/``: ``documents/`` (``save_to_disk``) and
``annotation_report.json`` (:func:`write_report`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset

from .document_dataset import (
    SOURCES,
    STEP,
    DocumentConfigError,
    ValidationReport,
    save_documents,
    validate_rows,
)
from .page_generator import DocumentGeneratorConfig, generate_documents
from .runs import repo_root, step_dir
from .synthdog import SYNTHDOG_HUB_ID, load_synthdog
from .validate import check_choice

__all__ = [
    "STEP",
    "OcrAnnotationConfig",
    "build_documents",
    "write_report",
    "run_ocr_annotation",
]


@dataclass
class OcrAnnotationConfig(DocumentGeneratorConfig):
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
    """

    source: str = "synthetic"
    dataset_path: str | None = None
    split: str = "train"
    on_bad: str = "skip"

    def __post_init__(self) -> None:
        own = type(self).__name__
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
        super().__post_init__()


def build_documents(cfg: OcrAnnotationConfig, *, progress: bool = True) -> Dataset:
    """The unvalidated step-01 dataset of ``cfg``: generated (``source="synthetic"``) or the
    first ``cfg.n_documents`` rows of the original data (``source="synthdog"``)."""
    if cfg.source == "synthetic":
        return generate_documents(cfg.generator_config(), progress=progress)
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
    out = step_dir(run_dir, STEP)
    clean, report = validate_rows(build_documents(cfg, progress=progress), on_bad=cfg.on_bad, progress=progress)
    save_documents(clean, out / "documents")
    write_report(report, out / "annotation_report.json", cfg)
    return clean, report
