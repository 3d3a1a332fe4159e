"""The paper's efficiency numbers (docs/method.md §7), as data, to draw and tabulate beside ours.

docs/method.md §7 gives, at a 32K-token text-only context, batch 1, B = 256, r = 0.1, on a GPU:
decode latency (ms per token, mean of 100 steps) and peak memory (GB during a 512-token
generation) for FullKV and SparseMM on three models, and says SparseMM's decode latency stays
flat, 37-45 ms, from 2K to 32K. Models by hub id (as :mod:`sparsemm_utils.reference_numbers`),
methods by the names of :mod:`sparsemm_utils.compression` (``fullkv``, ``sparsemm``).

The paper prints memory in "GB" without saying 10^9 or 2^30 bytes; :data:`PAPER_GB_BYTES` reads
it as 2^30 (GiB, what ``torch.cuda.max_memory_allocated() / 1024**3`` prints). Only that reading is
self-consistent for LLaVA-NeXT-Vicuna-7B: weights 7.06e9 parameters x 2 bytes = 13.2 GiB and the
FullKV cache at 32K in bf16 (32 layers x 32 heads x 32768 x 128 x 2 x 2 bytes) = 16.0 GiB leave
3.7 GiB of activations for FullKV's 32.9, and SparseMM's 17.4 minus the weights and its 0.1 GiB cache
leaves 4.1 GiB (similar, as it should be: the same prefill); read as 10^9 bytes they would leave
1.6 GB for FullKV but 3.2 GB for SparseMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .reference_numbers import REFERENCE_MODELS, reference_model_id

__all__ = [
    "PAPER_CONTEXT",
    "PAPER_BUDGET",
    "PAPER_RATIO",
    "PAPER_GB_BYTES",
    "PAPER_SPARSEMM_FLAT_MS",
    "PaperEfficiencyPoint",
    "PAPER_EFFICIENCY",
    "paper_efficiency_frame",
    "paper_speedup",
]

#: The context length of the paper's table: "32K" read as 32 x 1024 tokens.
PAPER_CONTEXT: int = 32768
#: The paper's budget B and uniform ratio r for the efficiency runs.
PAPER_BUDGET: int = 256
PAPER_RATIO: float = 0.1
#: Bytes per "GB" of the paper's memory column (read as 2^30; see the module docstring).
PAPER_GB_BYTES: float = float(2**30)
#: SparseMM's decode latency range the paper reports over 2K..32K ("stays flat").
PAPER_SPARSEMM_FLAT_MS: tuple[float, float] = (37.0, 45.0)


@dataclass(frozen=True)
class PaperEfficiencyPoint:
    """One cell pair of docs/method.md §7's table: ``method`` on ``model`` (hub id) at
    :data:`PAPER_CONTEXT` tokens."""

    model: str
    method: str
    decode_ms_per_token: float
    peak_mem_gb: float


# docs/method.md §7: model | decode ms/token full -> SparseMM | peak GB full -> SparseMM
_TABLE: tuple[tuple[str, float, float, float, float], ...] = (
    ("llava-next-vicuna-7b", 70.9, 37.9, 32.9, 17.4),
    ("llava-next-mistral-7b", 75.8, 45.2, 22.1, 17.7),
    ("qwen2-vl-7b", 59.2, 37.1, 21.0, 18.7),
)

#: Every number of docs/method.md §7's table.
PAPER_EFFICIENCY: tuple[PaperEfficiencyPoint, ...] = tuple(
    point
    for short, full_ms, sparse_ms, full_gb, sparse_gb in _TABLE
    for point in (
        PaperEfficiencyPoint(REFERENCE_MODELS[short], "fullkv", full_ms, full_gb),
        PaperEfficiencyPoint(REFERENCE_MODELS[short], "sparsemm", sparse_ms, sparse_gb),
    )
)


def paper_efficiency_frame(model: str | None = None) -> pd.DataFrame:
    """The paper's table as a frame: model (hub id), method, context_len, budget,
    decode_ms_per_token, peak_mem_gb, peak_mem_bytes (GB x :data:`PAPER_GB_BYTES`); only
    ``model``'s rows when given (a hub id, short name or folder; empty when the paper has none)."""
    frame = pd.DataFrame(
        [
            {
                "model": p.model,
                "method": p.method,
                "context_len": PAPER_CONTEXT,
                "budget": PAPER_BUDGET,
                "decode_ms_per_token": p.decode_ms_per_token,
                "peak_mem_gb": p.peak_mem_gb,
                "peak_mem_bytes": p.peak_mem_gb * PAPER_GB_BYTES,
            }
            for p in PAPER_EFFICIENCY
        ]
    )
    if model is not None:
        frame = frame[frame["model"] == reference_model_id(model)].reset_index(drop=True)
    return frame


def paper_speedup(model: str) -> float | None:
    """FullKV / SparseMM decode latency at 32K in the paper for ``model`` (e.g. 70.9 / 37.9 = 1.87
    for LLaVA-NeXT-Vicuna-7B), or None when the paper does not report the model."""
    frame = paper_efficiency_frame(model).set_index("method")
    if frame.empty:
        return None
    return float(frame.loc["fullkv", "decode_ms_per_token"] / frame.loc["sparsemm", "decode_ms_per_token"])
