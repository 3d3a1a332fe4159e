"""The paper's accuracy numbers (docs/method.md §6), as data, to draw beside ours and compare with.

docs/method.md §6 reads them off the paper's figures to within +-0.01 (:data:`READING_TOLERANCE`):
full-cache accuracy, SparseMM at budgets 256 / 128 / 64, and AdaKV, SnapKV, PyramidKV and the
random allocation at budget 64, for LLaVA-NeXT-Vicuna-7B (DocVQA, OCRBench, TextVQA),
LLaVA-NeXT-Mistral-7B (DocVQA) and Qwen2-VL-7B-Instruct (DocVQA, OCRBench, TextVQA).

Names follow step 05's own: benchmarks as in :data:`sparsemm_utils.benchmarks.BENCHMARKS`
(``docvqa``, ``ocrbench``, ``textvqa``), methods as in :data:`sparsemm_utils.evaluation.EVAL_METHODS`
(``fullkv``, ``sparsemm``, ``adakv``, ``snapkv``, ``pyramidkv``, ``random``), models by their hub
id; ``budget`` is None for the full cache. Each benchmark's number is its headline metric (ANLS,
OCRBench accuracy, VQA accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from types import MappingProxyType

import pandas as pd

from .benchmarks import BENCHMARKS

__all__ = [
    "READING_TOLERANCE",
    "REFERENCE_MODELS",
    "ReferencePoint",
    "REFERENCE_POINTS",
    "reference_model_id",
    "reference_frame",
    "compare_with_reference",
]

#: How precisely docs/method.md §6 reads a number off the paper's figures.
READING_TOLERANCE: float = 0.01

#: Short name (config file stem) -> hub id of the models the paper reports.
REFERENCE_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-next-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
        "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    }
)


@dataclass(frozen=True)
class ReferencePoint:
    """One number of docs/method.md §6's table: ``score`` of ``method`` at ``budget`` (None: full
    cache) on ``benchmark`` for ``model`` (hub id)."""

    model: str
    benchmark: str
    method: str
    budget: int | None
    score: float


# docs/method.md §6, row by row: full | SparseMM @256 / @128 / @64 | AdaKV | SnapKV | PyramidKV | Random (@64).
_TABLE: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("llava-next-vicuna-7b", "docvqa", (0.685, 0.678, 0.668, 0.638, 0.541, 0.497, 0.49, 0.487)),
    ("llava-next-vicuna-7b", "ocrbench", (0.522, 0.522, 0.50, 0.478, 0.352, 0.34, 0.31, 0.318)),
    ("llava-next-vicuna-7b", "textvqa", (0.648, 0.646, 0.641, 0.631, 0.56, 0.56, 0.55, 0.565)),
    ("llava-next-mistral-7b", "docvqa", (0.635, 0.616, 0.608, 0.576, 0.487, 0.473, 0.435, 0.42)),
    ("qwen2-vl-7b", "docvqa", (0.94, 0.935, 0.915, 0.85, 0.685, 0.665, 0.60, 0.51)),
    ("qwen2-vl-7b", "ocrbench", (0.82, 0.81, 0.79, 0.74, 0.625, 0.627, 0.56, 0.485)),
    ("qwen2-vl-7b", "textvqa", (0.82, 0.82, 0.815, 0.77, 0.70, 0.70, 0.655, 0.585)),
)
_COLUMNS: tuple[tuple[str, int | None], ...] = (
    ("fullkv", None),
    ("sparsemm", 256),
    ("sparsemm", 128),
    ("sparsemm", 64),
    ("adakv", 64),
    ("snapkv", 64),
    ("pyramidkv", 64),
    ("random", 64),
)

#: Every number of docs/method.md §6's table.
REFERENCE_POINTS: tuple[ReferencePoint, ...] = tuple(
    ReferencePoint(REFERENCE_MODELS[short], benchmark, method, budget, score)
    for short, benchmark, scores in _TABLE
    for (method, budget), score in zip(_COLUMNS, scores, strict=True)
)


def reference_model_id(model: str) -> str | None:
    """The hub id of the paper's model that ``model`` names, or None when the paper reports none.

    Accepts a hub id (``"Qwen/Qwen2-VL-7B-Instruct"``), a short name (``"qwen2-vl-7b"``) or a local
    folder named after the repo (``"/models/Qwen2-VL-7B-Instruct"``); case-insensitive."""
    if not isinstance(model, str) or not model:
        return None
    key = model.strip().lower().rstrip("/")
    for short, hub_id in REFERENCE_MODELS.items():
        if key in (short, hub_id.lower()) or PurePath(key).name == hub_id.split("/")[1].lower():
            return hub_id
    return None


def reference_frame(model: str | None = None) -> pd.DataFrame:
    """The reference numbers as a frame: model, benchmark, method, budget (nullable int), score,
    tolerance; only ``model``'s rows when given (empty for a model the paper does not report)."""
    rows = [
        {"model": p.model, "benchmark": p.benchmark, "method": p.method, "budget": p.budget, "score": p.score}
        for p in REFERENCE_POINTS
    ]
    frame = pd.DataFrame(rows, columns=["model", "benchmark", "method", "budget", "score"])
    frame["budget"] = frame["budget"].astype("Int64")
    frame["tolerance"] = READING_TOLERANCE
    if model is not None:
        frame = frame[frame["model"] == reference_model_id(model)].reset_index(drop=True)
    return frame


def compare_with_reference(results: pd.DataFrame, model: str, tolerance: float = READING_TOLERANCE) -> pd.DataFrame:
    """Our numbers beside the paper's for ``model``: one row per reference point with ``ours``
    (NaN where we have no such cell), ``paper``, ``difference`` (ours - paper) and ``within``
    (|difference| <= ``tolerance``).

    ``results``: step 05's ``results.csv`` frame (model, benchmark, method, budget, metric, score,
    n_samples); only each benchmark's headline metric is compared."""
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    missing = {"benchmark", "method", "budget", "metric", "score"} - set(results.columns)
    if missing:
        raise ValueError(f"results lacks columns {sorted(missing)}; pass step 05's results.csv frame")
    ref = reference_frame(model).rename(columns={"score": "paper"}).drop(columns=["model", "tolerance"])
    headline = {name: spec.metric for name, spec in BENCHMARKS.items()}
    ours = results[[headline.get(b) == m for b, m in zip(results["benchmark"], results["metric"])]]
    ours = ours[["benchmark", "method", "budget", "score"]].rename(columns={"score": "ours"}).copy()
    ours["budget"] = pd.to_numeric(ours["budget"], errors="coerce").astype("Int64")
    merged = ref.merge(ours, on=["benchmark", "method", "budget"], how="left")
    merged["difference"] = merged["ours"] - merged["paper"]
    merged["within"] = merged["difference"].abs() <= tolerance
    return merged[["benchmark", "method", "budget", "paper", "ours", "difference", "within"]]

