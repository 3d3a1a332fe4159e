"""Step 04: budget allocation (notebook ``04_allocation``, docs/method.md §5).

For every method and budget of the config, each of the run's first prompts is prefilled once with
the per-head KV cache and the cache's decisions are read back
(:func:`sparsemm_utils.budget_report.measure_prompts`: the caps, the saturated heads and the bytes
every cache holds). This module declares the step (:data:`STEP`, its artifacts), its parameters
(:class:`Config`), the writing of its tables and findings (:func:`write_outputs`) and the claims
checked on them (:func:`findings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..allocation import InvalidBudgetError, InvalidParameterError, kv_group_sum, normalise_head_scores
from ..artifacts import Artifact, StepSpec
from ..budget_report import BUDGETED_METHODS, AllocationTables
from ..compression import UnknownCompressionMethodError
from ..findings import Finding, findings_frame, read_findings
from ..kv_cache import analytic_kv_bytes
from ..validate import check_fraction, check_int, is_int
from . import head_scoring, ocr_annotation

__all__ = [
    "NAME",
    "STEP",
    "BUDGETS",
    "CACHE_BYTES",
    "SATURATION",
    "FINDINGS",
    "TOP_FRACTION",
    "Config",
    "write_outputs",
    "findings",
]

NAME = "04_allocation"

BUDGETS: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "budgets.csv",
    "each method's cap per KV head on the first prompt: method, budget, layer, kv_head, selected, window, prompt_len, stored",
    reader=pd.read_csv,
)
CACHE_BYTES: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "cache_bytes.csv",
    "KV bytes per method, budget and prompt beside FullKV: method, budget, prompt_len, kept_tokens, kv_bytes, fullkv_bytes, doc_id",
    reader=pd.read_csv,
)
SATURATION: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "saturation.csv",
    "heads whose cap reaches n - w per method, budget and prompt: saturated, uncompressed, skipped_layers, lost_tokens",
    reader=pd.read_csv,
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(
    NAME, "findings.csv", "SparseMM's allocation claims beside this run's caps, saturation and bytes", reader=read_findings
)

STEP = StepSpec(
    NAME,
    "Budget allocation: per-head KV budgets, saturation and cache bytes",
    inputs=(ocr_annotation.DOCUMENTS, head_scoring.HEAD_SCORES),
    outputs=(BUDGETS, CACHE_BYTES, SATURATION, FINDINGS),
)

#: The share of KV heads whose part of SparseMM's budget :func:`findings` reports (the top 10% by
#: their summed visual score, as the paper's top-10% score share, docs/method.md §4).
TOP_FRACTION = 0.10


@dataclass(frozen=True)
class Config:
    """Parameters of step 04 (notebook ``04_allocation``), validated.

    ``window`` w and ``ratio`` r: docs/method.md §5 (defaults 32 and 0.1); ``budgets``: the budgets B
    to compare, increasing, each > w (the figures show the lowest, a middle one and the highest);
    ``methods``: a subset of :data:`~sparsemm_utils.budget_report.BUDGETED_METHODS`; ``n_prompts``:
    how many of step 01's documents to prefill (the first ones, in order); ``head_mask_fraction``:
    the share of heads the head-mask ablation zeroes (the paper: 10%); ``seed``: model seed (tiny
    models) and the random allocation's seed; ``threads``: torch CPU threads (0: torch's default).
    """

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
    seed: int = 0
    window: int = 32
    budgets: tuple[int, ...] = (64, 256, 1024)
    methods: tuple[str, ...] = BUDGETED_METHODS
    n_prompts: int = 8
    ratio: float = 0.1
    head_mask_fraction: float = 0.1
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise InvalidParameterError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise InvalidParameterError(f"model_id must be a non-empty string, got {self.model_id!r}")
        for name in ("seed", "window", "n_prompts", "threads"):
            minimum = 0 if name in ("seed", "threads") else 1
            check_int(name, getattr(self, name), minimum, error=InvalidParameterError)
        budgets = tuple(self.budgets) if isinstance(self.budgets, (list, tuple)) else None
        if not budgets:
            raise InvalidBudgetError(f"budgets must be a non-empty list of ints, got {self.budgets!r}")
        for budget in budgets:
            if not is_int(budget):
                raise InvalidBudgetError(
                    f"budgets must be ints (tokens per KV head, window included), got {type(budget).__name__} {budget!r}"
                )
            if budget <= self.window:
                raise InvalidBudgetError(
                    f"budget {budget} must exceed the window w={self.window} (B counts the window; e.g. "
                    f"B = {self.window + 16}), or lower the window"
                )
        if list(budgets) != sorted(set(budgets)):
            raise InvalidBudgetError(f"budgets must be strictly increasing, got {list(budgets)}")
        methods = tuple(self.methods) if isinstance(self.methods, (list, tuple)) else None
        if not methods:
            raise InvalidParameterError(f"methods must be a non-empty list of method names, got {self.methods!r}")
        unknown = [m for m in methods if m not in BUDGETED_METHODS]
        if unknown:
            raise UnknownCompressionMethodError(
                f"unknown budgeted method(s) {unknown}; step 04 compares {', '.join(BUDGETED_METHODS)} "
                f"(FullKV is always measured as the reference)"
            )
        check_fraction("ratio", self.ratio, error=InvalidParameterError)
        fraction = self.head_mask_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise InvalidParameterError(f"head_mask_fraction must be a number in (0, 1], got {fraction!r}")
        object.__setattr__(self, "budgets", tuple(int(b) for b in budgets))
        object.__setattr__(self, "methods", methods)

    @property
    def figure_budgets(self) -> tuple[int, ...]:
        """The low, a middle and the high budget (all of them when there are three or fewer)."""
        if len(self.budgets) <= 3:
            return self.budgets
        return (self.budgets[0], self.budgets[len(self.budgets) // 2], self.budgets[-1])


def write_outputs(
    cfg: Config, tables: AllocationTables, head_scores: np.ndarray, *, head_dim: int, dtype: torch.dtype
) -> dict[str, Path]:
    """Write every output of step 04 into ``<cfg.run_dir>/04_allocation/``: ``budgets.csv``,
    ``cache_bytes.csv``, ``saturation.csv`` (the tables of
    :func:`~sparsemm_utils.budget_report.measure_prompts`) and ``findings.csv`` (:func:`findings`
    with step 03's ``head_scores`` (L, H) and the model's ``head_dim`` and ``dtype``). Returns
    file name -> path."""
    STEP.folder(cfg.run_dir, create=True)
    paths = {artifact.name: artifact.path(cfg.run_dir) for artifact in STEP.outputs}
    tables.budgets.to_csv(paths[BUDGETS.name], index=False)
    tables.saturation.to_csv(paths[SATURATION.name], index=False)
    tables.cache_bytes.to_csv(paths[CACHE_BYTES.name], index=False)
    found = findings(tables, head_scores, head_dim=head_dim, dtype=dtype)
    findings_frame(found).to_csv(paths[FINDINGS.name], index=False)
    return paths


# -------------------------------------------------------------------------------------- findings


def _budget_list(values: Any) -> str:
    return ", ".join(str(int(v)) for v in values)


def _concentration(budgets: pd.DataFrame, head_scores: np.ndarray) -> Finding | None:
    """SparseMM's share of the selected tokens that goes to the top :data:`TOP_FRACTION` of KV
    heads by sigma (the GQA-summed normalised scores, docs/method.md §5 steps 1-2), per budget."""
    sparse = budgets[budgets["method"] == "sparsemm"]
    if sparse.empty:
        return None
    layers, kv_heads = int(budgets["layer"].max()) + 1, int(budgets["kv_head"].max()) + 1
    n_kv = layers * kv_heads
    k = max(1, math.ceil(TOP_FRACTION * n_kv))
    claim = "SparseMM's caps concentrate on the top visual heads"
    paper = (
        "the pool P is shared in proportion to the visual scores, cap = round(sigma P + m) (docs/method.md §5); "
        "the top 10% of heads hold ~77% of the score on LLaVA-NeXT-Vicuna-7B (docs/method.md §4)"
    )
    scores = np.asarray(head_scores, dtype=np.float64)
    if not scores.sum() > 0:
        return Finding(NAME, claim, paper, "step 03's scores are all zero: nothing to concentrate on", n_kv, None, True)
    sigma = kv_group_sum(normalise_head_scores(scores), kv_heads)
    top = np.argsort(-sigma.ravel(), kind="stable")[:k]
    shares = []
    for budget, rows in sparse.groupby("budget", sort=True):
        caps = np.zeros(n_kv)
        caps[rows["layer"].to_numpy() * kv_heads + rows["kv_head"].to_numpy()] = rows["selected"].to_numpy()
        shares.append((int(budget), float(caps[top].sum() / caps.sum()) if caps.sum() > 0 else float("nan")))
    names = ", ".join(f"L{i // kv_heads}KV{i % kv_heads}" for i in top)
    equal = k / n_kv
    this_run = (
        f"the {k} of {n_kv} KV heads with the highest summed score sigma ({names}) get "
        + ", ".join(f"{share:.0%} (B = {budget})" for budget, share in shares)
        + f" of SparseMM's selected tokens; an equal split would give them {equal:.0%}"
    )
    holds = bool(all(share > equal for _, share in shares))
    return Finding(NAME, claim, paper, this_run, n_kv, holds, headline=True)


def _saturation(saturation: pd.DataFrame, cache_bytes: pd.DataFrame, window: int) -> Finding | None:
    """How many of SparseMM's KV heads reach n - w per prompt, the budget they lose, and the selected
    tokens a KV head keeps on average (kept / KV heads - w) against b = B - w where they lose most."""
    sparse = saturation[saturation["method"] == "sparsemm"]
    if sparse.empty:
        return None
    by_budget = sparse.groupby("budget", sort=True)[["saturated", "lost_tokens", "kv_heads"]].mean()
    hit = by_budget[by_budget["saturated"] > 0]
    lengths = sparse.drop_duplicates("doc_id")["prompt_len"]
    prompts = f"{len(lengths)} prompts of {int(lengths.min())}-{int(lengths.max())} tokens"
    if hit.empty:
        text = f"no SparseMM head saturates at B = {_budget_list(by_budget.index)} ({prompts})"
    else:
        worst = int(hit["lost_tokens"].idxmax())
        kept = cache_bytes[(cache_bytes["method"] == "sparsemm") & (cache_bytes["budget"] == worst)]
        per_head = float((kept["kept_tokens"] / by_budget.loc[worst, "kv_heads"]).mean()) - window
        quiet = [b for b in by_budget.index if b not in hit.index]
        text = (
            "SparseMM: "
            + "; ".join(
                f"{row.saturated:.1f} of {row.kv_heads:.0f} KV heads saturate per prompt at B = {budget}, "
                f"losing {row.lost_tokens:.1f} tokens of budget"
                for budget, row in hit.iterrows()
            )
            + (f"; none at B = {_budget_list(quiet)}" if quiet else "")
            + f" ({prompts}); at B = {worst} a KV head keeps {per_head:.1f} selected tokens on average instead of "
            f"b = {worst - window}"
        )
    others = saturation[(saturation["method"] != "sparsemm") & (saturation["saturated"] > 0)]
    if others.empty:
        text += "; no other method saturates"
    else:
        pairs = others.groupby(["method", "budget"], sort=False)["saturated"].mean()
        text += "; other methods: " + ", ".join(f"{m} at B = {b} ({s:.1f} heads)" for (m, b), s in pairs.items())
    return Finding(
        NAME,
        "SparseMM's favoured heads saturate on short prompts and their surplus is lost",
        "at B = 1024 on prompts of ~2400 tokens the heads kept ~526 selected tokens on average instead of "
        "b = 992; the original does not hand the surplus to other heads (docs/method.md §5)",
        text,
        n=len(sparse),
        holds=bool((sparse["lost_tokens"] > 0).any()),
        headline=True,
    )


def _bytes(cache_bytes: pd.DataFrame, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> Finding:
    """Every cache's reported bytes against sum(kept) x head_dim x 2 x element size (docs/method.md §7)."""
    expected = np.array([analytic_kv_bytes(np.array([k], dtype=np.int64), head_dim, dtype) for k in cache_bytes["kept_tokens"]])
    compressed_ok = cache_bytes["kv_bytes"].to_numpy() == expected
    # FullKV is measured once per prompt and repeated on each of its rows: a prompt is right when all its rows are
    full_expected = [
        analytic_kv_bytes(np.array([n * layers * kv_heads], dtype=np.int64), head_dim, dtype) for n in cache_bytes["prompt_len"]
    ]
    full_ok = (cache_bytes["fullkv_bytes"] == full_expected).groupby(cache_bytes["doc_id"], sort=False).all().to_numpy()
    cells = (
        f"{cache_bytes['method'].nunique()} methods x {cache_bytes['budget'].nunique()} budgets x "
        f"{cache_bytes['doc_id'].nunique()} prompts"
    )
    element = torch.empty((), dtype=dtype).element_size()
    text = (
        f"{int(compressed_ok.sum())} of {len(compressed_ok)} compressed caches ({cells}) and {int(full_ok.sum())} of "
        f"{len(full_ok)} FullKV caches hold exactly sum(kept) x {head_dim} x 2 x {element} bytes"
    )
    if not compressed_ok.all():
        row = cache_bytes[~compressed_ok].iloc[0]
        first = expected[~compressed_ok][0]
        text += f"; e.g. {row['method']} B = {row['budget']}, doc {row['doc_id']}: {row['kv_bytes']} reported, {first} expected"
    return Finding(
        NAME,
        "the cache holds exactly the analytic KV bytes",
        "KV bytes = sum over layers and KV heads of stored tokens x head_dim x 2 (K and V) x bytes per element "
        "(docs/method.md §7)",
        text,
        n=len(compressed_ok) + len(full_ok),
        holds=bool(compressed_ok.all() and full_ok.all()),
    )


def findings(tables: AllocationTables, head_scores: np.ndarray, *, head_dim: int, dtype: torch.dtype) -> list[Finding]:
    """SparseMM's allocation claims (docs/method.md §5, §7) beside this run's tables.

    ``tables``: the step's three tables (``budgets`` gives the grid L x H_kv); ``head_scores``:
    step 03's S (L, H); ``head_dim`` and ``dtype``: the model's, for the analytic bytes.

    1. SparseMM's caps concentrate on the top visual heads (n: KV heads): holds when, at every
       budget, the top :data:`TOP_FRACTION` of KV heads by sigma get more than their equal share
       of SparseMM's selected tokens.
    2. Saturation (n: SparseMM's prompt x budget cells): holds when some SparseMM head reaches
       n - w and loses budget on these prompts.
    3. Measured KV bytes equal the analytic count (n: compressed caches + FullKV caches).

    Claims 1-2 are left out when ``sparsemm`` is not among the methods."""
    check_int("head_dim", head_dim, 1, error=InvalidParameterError)
    budgets = tables.budgets
    if budgets.empty or tables.cache_bytes.empty:
        raise InvalidParameterError("the budgets and cache_bytes tables are empty: measure at least one prompt first")
    layers, kv_heads = int(budgets["layer"].max()) + 1, int(budgets["kv_head"].max()) + 1
    window = int(budgets["window"].iloc[0])
    found = [_concentration(budgets, head_scores), _saturation(tables.saturation, tables.cache_bytes, window)]
    found.append(_bytes(tables.cache_bytes, layers, kv_heads, head_dim, dtype))
    return [f for f in found if f is not None]
