"""Step 02, patch mapping (notebook ``02_patch_mapping``): OCR boxes to visual-token positions
(docs/method.md §3).

The step maps every chunk box and every character box of step 01's documents onto the positions
of the visual tokens that cover it, with the run's own processor, and checks each image's token
count against the processor's (the rule, the geometries and the mappers are in
:mod:`sparsemm_utils.patch_mapping`).

Reads :data:`~sparsemm_utils.steps.ocr_annotation.DOCUMENTS`. Outputs, in
``<run_dir>/02_patch_mapping/`` (:data:`STEP`): :data:`REGIONS` (``regions.jsonl``, one record per
document as :func:`~sparsemm_utils.patch_mapping.map_documents` describes it),
:data:`MAPPING_REPORT` (:func:`mapping_report`) and :data:`FINDINGS` (:func:`findings`), all
written by :func:`write_outputs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..artifacts import Artifact, StepSpec
from ..findings import Finding, findings_frame, read_findings
from ..patch_mapping import LlavaNextPatchMapper, PatchMapper, PatchMappingError, load_regions
from ..validate import check_choice, check_int
from . import ocr_annotation

__all__ = [
    "NAME",
    "REGIONS",
    "MAPPING_REPORT",
    "FINDINGS",
    "STEP",
    "Config",
    "mapping_report",
    "write_outputs",
    "findings",
]

NAME = "02_patch_mapping"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


REGIONS: Artifact[list[dict[str, Any]]] = Artifact(
    NAME,
    "regions.jsonl",
    "the regions of step 02 (per document: image_token_start, num_image_tokens and the visual-token positions of every chunk and character box)",
    reader=load_regions,
)
MAPPING_REPORT: Artifact[dict[str, Any]] = Artifact(
    NAME,
    "mapping_report.json",
    "the mapping report (mapper and geometry, counts, tokens per region, skipped boxes)",
    reader=_read_json,
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(NAME, "findings.csv", "step 02's findings table", reader=read_findings)

STEP = StepSpec(
    NAME,
    "Patch mapping: OCR boxes to visual-token positions",
    inputs=(ocr_annotation.DOCUMENTS,),
    outputs=(REGIONS, MAPPING_REPORT, FINDINGS),
)


@dataclass(frozen=True)
class Config:
    """Parameters of step 02 (notebook ``02_patch_mapping``), validated.

    ``run_dir``: the run folder; ``model_id``: the model whose processor lays out the image
    tokens (its weights are not used); ``seed``: for loading the model; ``variant``: the mapping
    rule (``"fidelity"``, the original's, for every model type; ``"base_and_crop"`` for
    LLaVA-NeXT / LLaVA-OneVision (base grid) and InternVL (thumbnail) only, docs/method.md §3); ``figure_doc_index`` / ``figure_chunk_index``: the
    document (position in the dataset) and chunk drawn in the figures."""

    run_dir: str = "runs/tiny"
    model_id: str = "data/tiny_reader"
    seed: int = 0
    variant: str = "fidelity"
    figure_doc_index: int = 0
    figure_chunk_index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise PatchMappingError(f"Config.run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise PatchMappingError(f"Config.model_id must be a non-empty string, got {self.model_id!r}")
        check_choice("Config.variant", self.variant, LlavaNextPatchMapper.VARIANTS, error=PatchMappingError)
        for name in ("seed", "figure_doc_index", "figure_chunk_index"):
            check_int(f"Config.{name}", getattr(self, name), 0, error=PatchMappingError)


def _stats(values: Sequence[int]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    arr = np.asarray(values, dtype=float)
    return {
        "count": int(arr.size),
        "min": int(arr.min()),
        "median": float(np.median(arr)),
        "mean": round(float(arr.mean()), 4),
        "max": int(arr.max()),
    }


def _region_sizes(records: Sequence[Mapping[str, Any]], key: str) -> list[int]:
    """``|R|`` of every non-empty region of kind ``key`` (``"chunks"`` or ``"chars"``)."""
    return [len(e["positions"]) for r in records for e in r[key] if e["positions"]]


def mapping_report(records: Sequence[Mapping[str, Any]], mapper: PatchMapper) -> dict[str, Any]:
    """The content of ``mapping_report.json``: the mapper and its geometry, counts of documents,
    chunks and characters (all and mapped), image tokens per document, tokens per region
    (``count, min, median, mean, max``) and every skipped box with its document."""
    skipped = [{"doc_id": r["doc_id"], **s} for r in records for s in r["skipped"]]
    return {
        "step": NAME,
        "model_types": sorted({r["model_type"] for r in records}),
        "mapper": type(mapper).__name__,
        "variant": mapper.variant,
        "geometry_settings": asdict(mapper.geometry),
        "positions_are": "relative to image_token_start (absolute = image_token_start + position)",
        "n_documents": len(records),
        "n_chunks": sum(len(r["chunks"]) for r in records),
        "n_chunks_mapped": len(_region_sizes(records, "chunks")),
        "n_chars": sum(len(r["chars"]) for r in records),
        "n_chars_mapped": len(_region_sizes(records, "chars")),
        "image_tokens_per_document": _stats([r["num_image_tokens"] for r in records]),
        "tokens_per_chunk": _stats(_region_sizes(records, "chunks")),
        "tokens_per_char": _stats(_region_sizes(records, "chars")),
        "n_skipped": len(skipped),
        "skipped": skipped,
    }


def write_outputs(cfg: Config, records: Sequence[Mapping[str, Any]], mapper: PatchMapper) -> list[Finding]:
    """Write the step's outputs into ``<cfg.run_dir>/02_patch_mapping/``: ``regions.jsonl`` (one
    record per line, :data:`REGIONS`), ``mapping_report.json`` (:func:`mapping_report`,
    :data:`MAPPING_REPORT`) and ``findings.csv`` (:func:`findings`, :data:`FINDINGS`). Returns the
    findings."""
    STEP.folder(cfg.run_dir, create=True)
    with REGIONS.path(cfg.run_dir).open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    report = mapping_report(records, mapper)
    MAPPING_REPORT.path(cfg.run_dir).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    found = findings(records, mapper)
    findings_frame(found).to_csv(FINDINGS.path(cfg.run_dir), index=False)
    return found


def _spread(values: Sequence[int]) -> str:
    """``"median m (min-max)"`` of a non-empty sequence."""
    s = _stats(values)
    return f"median {s['median']:g} ({s['min']}-{s['max']})"


_RULE = {
    "qwen_vl": "rows floor(y0/28)..floor(y1/28) x columns floor(x0/28)..floor(x1/28) of the resized image",
    "llava_next": "the unpadded crop grid only, p_w = W // W', p_h = H // H', base tokens never",
    "llava_onevision": "the unpadded crop grid after the anyres-max shrink only, p_w = W // W'', p_h = H // H'', base tokens never",
    "internvl": "rows floor(y0/28)..floor(y1/28) x columns floor(x0/28)..floor(x1/28) of the tiled canvas, read tile by tile, thumbnail never",
}


def findings(records: Sequence[Mapping[str, Any]], mapper: PatchMapper) -> list[Finding]:
    """Step 02's findings, from the records of ``regions.jsonl`` and the run's ``mapper``:

    1. every document's image-token count under the mapping equals the processor's count stored
       in its record (recomputed here from ``image_size``; headline);
    2. the regions follow the paper's rule (``variant="fidelity"``, docs/method.md §3);
    3. every chunk and character box has a non-empty region;
    4. a character's region lies inside its chunk's and is smaller on average, so a hit on it
       weighs more (``1/|R_t|``, docs/method.md §4); cannot tell without character boxes;
    5. chance level: the share of image tokens inside some chunk region, and the mean
       ``|R| / num_image_tokens`` (the chance that one uniformly drawn image token lands in a
       given chunk's region); the paper does not report it.
    """
    n_docs = len(records)
    disagree = [r["doc_id"] for r in records if mapper.num_tokens(*r["image_size"]) != r["num_image_tokens"]]
    model_types = ", ".join(sorted({r["model_type"] for r in records})) or "no model"
    tokens = [r["num_image_tokens"] for r in records]
    agree_this_run = f"{n_docs - len(disagree)} of {n_docs} documents agree ({model_types})"
    if tokens:
        agree_this_run += f"; image tokens per page: {_spread(tokens)}"
    if disagree:
        agree_this_run += f"; documents that disagree: {disagree[:5]}"

    fidelity = mapper.variant == "fidelity"
    rule_this_run = f"{type(mapper).__name__}, variant {mapper.variant!r}: {_RULE[mapper.family]}"
    if not fidelity:
        rule_this_run += ", plus the thumbnail tokens under the box" if mapper.family == "internvl" else ", plus the base-grid tokens under the box"

    n_chunks = sum(len(r["chunks"]) for r in records)
    n_chars = sum(len(r["chars"]) for r in records)
    chunk_sizes, char_sizes = _region_sizes(records, "chunks"), _region_sizes(records, "chars")
    mapped_this_run = (
        f"{len(chunk_sizes)} of {n_chunks} chunk boxes and {len(char_sizes)} of {n_chars} character boxes "
        f"have a region; {sum(len(r['skipped']) for r in records)} skipped (outside the image or malformed)"
    )

    inside = [
        set(ch["positions"]) <= set(r["chunks"][ch["chunk_index"]]["positions"])
        for r in records
        for ch in r["chars"]
        if ch["positions"]
    ]
    if char_sizes and chunk_sizes:
        finer_this_run = (
            f"tokens per chunk region: {_spread(chunk_sizes)}, mean {np.mean(chunk_sizes):.2f}; per character region: "
            f"{_spread(char_sizes)}, mean {np.mean(char_sizes):.2f}; {sum(inside)} of {len(inside)} character "
            "regions lie inside their chunk's"
        )
        finer_holds = bool(all(inside) and np.mean(char_sizes) < np.mean(chunk_sizes))
    else:
        finer_this_run = f"cannot compare: {len(char_sizes)} character regions, {len(chunk_sizes)} chunk regions"
        finer_holds = None

    total = sum(tokens)
    covered = sum(len({p for c in r["chunks"] for p in c["positions"]}) for r in records)
    chance = [len(c["positions"]) / r["num_image_tokens"] for r in records for c in r["chunks"] if c["positions"]]
    if total and chance:
        chance_this_run = (
            f"{covered} of {total} image tokens ({covered / total:.1%}) lie in some chunk region; one uniformly "
            f"drawn image token lands in a given chunk's region with probability {np.mean(chance):.1%} on average "
            f"(n = {len(chance)} chunks)"
        )
    else:
        chance_this_run = "no mapped chunk regions"

    return [
        Finding(
            NAME,
            "Every mapping agrees with the processor's count of image tokens",
            "the mapping's count must equal the processor's for every image; a mismatch stops step 02 (docs/method.md §3)",
            agree_this_run,
            n_docs,
            n_docs > 0 and not disagree,
            headline=True,
        ),
        Finding(
            NAME,
            "Regions follow the original rule",
            "Qwen2-VL: 28 px blocks of the resized image; LLaVA-NeXT: the crop grid only (docs/method.md §3)",
            rule_this_run,
            n_docs,
            fidelity,
        ),
        Finding(
            NAME,
            "Every OCR box maps to at least one visual token",
            "the original leaves a box wholly in LLaVA-NeXT's W mod W' leftover strip (Qwen: x0 == W) with an empty region (docs/deviations.md)",
            mapped_this_run,
            n_chunks + n_chars,
            len(chunk_sizes) == n_chunks and len(char_sizes) == n_chars if n_chunks + n_chars else None,
        ),
        Finding(
            NAME,
            "A character's region is finer than its chunk's, so a hit on it weighs more",
            "none: the original has line boxes only (docs/method.md §2); a hit earns 1/|R_t| (docs/method.md §4)",
            finer_this_run,
            len(char_sizes),
            finer_holds,
        ),
        Finding(
            NAME,
            "Chance level of a hit under uniform attention over the image",
            "not reported (a hit counts only inside the token's own region R_t, docs/method.md §4)",
            chance_this_run,
            len(chance),
            None,
        ),
    ]
