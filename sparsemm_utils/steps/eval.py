"""Step 05, ``notebooks/05_eval.ipynb``: accuracy against KV budget for every method (docs/method.md §6).

The sweep itself (cells, methods, the generator, the resumable ``results.csv`` /
``predictions.jsonl`` / ``sweep.json``) is :mod:`sparsemm_utils.evaluation`; this module declares
the step around it: its artifacts (:data:`STEP`), the notebook's parameters (:class:`Config`), the
tables the notebook shows (:func:`lowest_budget_table`, :func:`cell_statistics`,
:func:`fastv_match_table`), the files it leaves besides the sweep's (:func:`write_outputs`:
``lowest_budget.csv``, ``findings.csv``) and what the run shows against the paper
(:func:`findings`). :func:`sweep` runs the notebook's sweep outside it: one shard of a sharded
run (``python -m sparsemm_utils.pipeline ... --shard i/n``, docs/design.md "Sharded runs").
:func:`rescore` (``python -m sparsemm_utils.steps.eval rescore --run-dir <run>``) scores a finished
sweep's answers again under a scoring protocol and writes its tables and findings beside the run,
generating nothing.

**How the findings decide.** Each benchmark's headline metric at the two lowest budgets of the
sweep: SparseMM's score as a share of FullKV's, beside the paper's 90-97% at B = 64
(docs/method.md §6); SparseMM against each baseline on the same questions, judged by the paired
bootstrap 95% interval of the difference (:mod:`sparsemm_utils.statistics`): above zero holds,
below zero fails, straddling zero cannot tell (one question moves a score by 1/n, 9.1 points at
n = 11); and, when the sweep masks heads, the top visual heads against random draws.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..artifacts import Artifact, StepSpec
from ..attention_hooks import SELECTION_DTYPES
from ..benchmarks import OFFLINE_PAGES, get_benchmark, load_benchmark, make_reader_benchmark
from ..evaluation import (
    EVAL_METHODS,
    is_random_mask,
    ON_MISMATCH,
    PREDICTIONS_FILE,
    REFERENCE_PROMPT_TOKENS,
    RESULTS_FILE,
    SWEEP_FILE,
    EvaluationError,
    ModelGenerator,
    Rescored,
    SweepResult,
    check_budgets,
    get_method,
    predictions_frame,
    read_results,
    rescore_sweep,
    run_sweep,
)
from ..findings import Finding, findings_frame, read_findings
from ..head_scoring_files import load_head_scores
from ..lmms_protocol import DEFAULT_LMMS_EVAL, PROTOCOLS, LmmsProtocol, get_protocol
from ..models import load_model
from ..sharding import Shard, shard_folder
from ..statistics import paired_bootstrap_interval
from ..parameters import MAX_DOCUMENTS, MAX_NEW_TOKENS, check_allow_large, check_size
from ..reader_tasks import HELDOUT_SEED
from ..reference_numbers import REFERENCE_MODELS, reference_frame, reference_model_id
from ..runs import require_upstream
from ..validate import check_choice, check_int
from . import head_scoring

__all__ = [
    "NAME",
    "RESULTS",
    "PREDICTIONS",
    "SWEEP",
    "LOWEST_BUDGET",
    "FINDINGS",
    "STEP",
    "MASK_RATIO_TARGET",
    "MAX_BATCH_SIZE",
    "Config",
    "sweep",
    "read_lowest_budget",
    "lowest_budget_table",
    "cell_statistics",
    "fastv_match_table",
    "method_labels",
    "findings",
    "write_outputs",
]

NAME = "05_eval"
#: The largest ``batch_size``: 64 questions x the tiny config's 21 shared cells = 1344 cache rows.
MAX_BATCH_SIZE = 64
_LOWEST_COLUMNS = ["benchmark", "metric", "method", "budget", "score", "n_samples", "vs_fullkv"]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_lowest_budget(path: str | Path) -> pd.DataFrame:
    """``lowest_budget.csv`` as written by :func:`write_outputs` (``budget`` nullable Int64)."""
    frame = pd.read_csv(path, keep_default_na=False, na_values={"budget": [""], "score": [""], "vs_fullkv": [""]})
    frame["budget"] = pd.to_numeric(frame["budget"], errors="coerce").astype("Int64")
    return frame


RESULTS: Artifact[pd.DataFrame] = Artifact(
    NAME, RESULTS_FILE, "the sweep's scores: one row per metric of each (benchmark, method, budget) cell",
    reader=read_results,
)
PREDICTIONS: Artifact[pd.DataFrame] = Artifact(
    NAME, PREDICTIONS_FILE, "one record per (cell, question): prediction, answers, scores, prompt tokens, KV bytes",
    reader=predictions_frame,
)
SWEEP: Artifact[dict[str, Any]] = Artifact(NAME, SWEEP_FILE, "the sweep's settings and each benchmark's sample set", reader=_read_json)
LOWEST_BUDGET: Artifact[pd.DataFrame] = Artifact(
    NAME, "lowest_budget.csv", "every method at the lowest budget beside FullKV", reader=read_lowest_budget
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(NAME, "findings.csv", "step 05's findings against the paper", reader=read_findings)

STEP = StepSpec(
    NAME,
    "Evaluation: accuracy against KV budget for every method",
    inputs=(head_scoring.HEAD_SCORES,),
    outputs=(RESULTS, PREDICTIONS, SWEEP, LOWEST_BUDGET, FINDINGS),
    resumable=True,
)


# --------------------------------------------------------------------------------------------
# the notebook's parameters


@dataclass
class Config:
    """Parameters of notebook 05 (validated in ``__post_init__``); the defaults are
    ``configs/tiny.yaml``'s.

    ``benchmarks`` / ``methods`` / ``budgets``: the sweep (budgets > ``window``); ``window``,
    ``ratio``, ``mask_fraction``: docs/method.md §5's w, r and the head-mask share; ``fastv_k``: the
    layers FastV keeps whole (FastV's K; used by the ``fastv`` method only); ``limit``: first
    rows per benchmark (None: all); ``n_documents`` / ``benchmark_seed``: the offline benchmark
    (seed None: the tiny reader's held-out stream); ``benchmark_sources``: {benchmark: local
    folder or parquet} (else the HF cache); ``head_scores``: step 03's file, relative to
    ``run_dir`` unless absolute (read only when a method needs it); ``dtype`` / ``device``: for
    ``load_model`` (device "auto": CUDA when available); ``max_new_tokens``: a cap on every
    benchmark's generation limit, for smoke runs of random-weight models only (None: lmms-eval's
    limits); ``selection_dtype``: the dtype SnapKV-style selection scores the keys in (SparseMM,
    AdaKV, SnapKV, PyramidKV, random): ``"float32"`` (the default) or ``"model"`` (the original's
    rounding and ranking; docs/deviations.md "Selection scores"); ``on_mismatch``: what :func:`~sparsemm_utils.evaluation.run_sweep` does with an
    earlier sweep of other settings in the folder ("archive": move it to ``superseded/``;
    "error": stop); ``ablation_samples``: the head masks (``mask``, ``mask_random``,
    ``mask_random_<k>``) answer only the first n questions (None: all); ``batch_size``: questions
    answered at once (one left-padded prefill and one decode for the methods that share a prefill,
    :func:`~sparsemm_utils.shared_prefill.shared_generate_batch`; the answers are batch 1's, token
    for token; at most :data:`MAX_BATCH_SIZE`); ``allow_large``: lift the bounds on ``n_documents``
    (:data:`~sparsemm_utils.parameters.MAX_DOCUMENTS`) and ``max_new_tokens``
    (:data:`~sparsemm_utils.parameters.MAX_NEW_TOKENS`); ``lmms_eval``: which lmms-eval's rules
    build the prompts and score the answers, end to end ("0.3": v0.3.4, the paper's; "current":
    today's; :mod:`sparsemm_utils.lmms_protocol`, the differences in docs/deviations.md)."""

    run_dir: str = "runs/tiny"
    model_id: str = "data/tiny_reader"
    seed: int = 0
    benchmarks: Sequence[str] = ("reader_docqa",)
    methods: Sequence[str] = ("fullkv", "sparsemm", "adakv", "snapkv", "pyramidkv", "random", "fastv")
    budgets: Sequence[int] = (16, 32, 64, 96)
    window: int = 8
    ratio: float = 0.1
    mask_fraction: float = 0.1
    fastv_k: int = 1
    limit: int | None = None
    n_documents: int = 4
    benchmark_seed: int | None = None
    benchmark_sources: Mapping[str, str] = field(default_factory=dict)
    head_scores: str = head_scoring.HEAD_SCORES.key
    dtype: str = "auto"
    device: str = "auto"
    max_new_tokens: int | None = None
    selection_dtype: str = "float32"
    on_mismatch: str = "archive"
    ablation_samples: int | None = None
    batch_size: int = 1
    allow_large: bool = False
    lmms_eval: str = DEFAULT_LMMS_EVAL

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise EvaluationError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise EvaluationError(f"model_id must be a non-empty string, got {self.model_id!r}")
        check_int("seed", self.seed, 0, error=EvaluationError)
        if isinstance(self.benchmarks, str) or not self.benchmarks:
            raise EvaluationError(f"benchmarks must be a non-empty list of names, got {self.benchmarks!r}")
        self.benchmarks = tuple(get_benchmark(b).name for b in self.benchmarks)
        if isinstance(self.methods, str) or not self.methods:
            raise EvaluationError(f"methods must be a non-empty list of names, got {self.methods!r}")
        self.methods = tuple(get_method(m).name for m in self.methods)
        self.window = check_int("window", self.window, 0, error=EvaluationError)
        if isinstance(self.budgets, str):
            raise EvaluationError(f"budgets must be a list of ints, got {self.budgets!r}")
        self.budgets = check_budgets(self.budgets)
        small = [b for b in self.budgets if b <= self.window]
        if small:
            raise EvaluationError(f"budgets {small} do not exceed the window w = {self.window}: a budget counts the window (docs/method.md §5)")
        if any(get_method(m).budgeted for m in self.methods) and not self.budgets:
            raise EvaluationError("budgeted methods need at least one budget")
        for name in ("ratio", "mask_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise EvaluationError(f"{name} must be a number in (0, 1], got {value!r}")
        self.fastv_k = check_int("fastv_k", self.fastv_k, 1, error=EvaluationError)
        if self.limit is not None:
            self.limit = check_int("limit", self.limit, 1, error=EvaluationError)
        large = check_allow_large(self.allow_large, error=EvaluationError)
        self.n_documents = check_size("n_documents", self.n_documents, MAX_DOCUMENTS, allow_large=large, error=EvaluationError)
        if self.benchmark_seed is not None:
            self.benchmark_seed = check_int("benchmark_seed", self.benchmark_seed, 0, error=EvaluationError)
        if not isinstance(self.benchmark_sources, Mapping):
            raise EvaluationError(f"benchmark_sources must map benchmark names to paths, got {self.benchmark_sources!r}")
        self.benchmark_sources = {get_benchmark(k).name: str(v) for k, v in self.benchmark_sources.items()}
        if not isinstance(self.head_scores, str) or not self.head_scores:
            raise EvaluationError(f"head_scores must be a path, got {self.head_scores!r}")
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_size(
                "max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS, allow_large=large, error=EvaluationError
            )
        if not isinstance(self.device, str) or not self.device:
            raise EvaluationError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_choice("selection_dtype", self.selection_dtype, SELECTION_DTYPES, error=EvaluationError)
        check_choice("on_mismatch", self.on_mismatch, ON_MISMATCH, error=EvaluationError)
        if self.ablation_samples is not None:
            self.ablation_samples = check_int("ablation_samples", self.ablation_samples, 1, error=EvaluationError)
        self.batch_size = check_int(
            "batch_size", self.batch_size, 1, MAX_BATCH_SIZE, error=EvaluationError,
            hint="questions answered at once; 1 answers them one by one",
        )  # fmt: skip
        check_choice("lmms_eval (the scoring protocol)", self.lmms_eval, tuple(PROTOCOLS), error=EvaluationError)

    @property
    def protocol(self) -> LmmsProtocol:
        """The scoring protocol ``lmms_eval`` names."""
        return get_protocol(self.lmms_eval)

    def method_limits(self) -> dict[str, int]:
        """The head masks answer only the first ``ablation_samples`` questions of each benchmark
        (all of them when None): the ablation runs the full cache once per mask, prefill included."""
        if self.ablation_samples is None:
            return {}
        return {m: self.ablation_samples for m in self.methods if get_method(m).press == "head_mask"}

    @property
    def needs_head_scores(self) -> bool:
        return any(get_method(m).needs_head_scores for m in self.methods)

    def head_scores_path(self) -> Path:
        """Step 03's head-score file: an absolute path as is; a relative one is ``<step>/<file>``
        under ``run_dir``, and its absence raises :class:`~sparsemm_utils.runs.MissingUpstreamError`
        naming that step."""
        path = Path(self.head_scores).expanduser()
        if path.is_absolute():
            if not path.is_file():
                raise FileNotFoundError(f"head scores {path} do not exist (step 03 writes head_scores.json)")
            return path
        if len(path.parts) < 2:
            raise EvaluationError(f"head_scores {self.head_scores!r} must be '<step folder>/<file>' under run_dir or absolute")
        return require_upstream(self.run_dir, path.parts[0], str(Path(*path.parts[1:])))

    def load_benchmarks(self, save_dir: str | Path | None = None, *, progress: bool = False) -> dict[str, Any]:
        """{name: :class:`~sparsemm_utils.benchmarks.BenchmarkSamples`} of every benchmark: the
        offline one built from ``n_documents`` pages of :meth:`reader_seed` (and written to
        ``save_dir/reader_docqa.parquet`` when given), the others from ``benchmark_sources`` or the
        HF cache; ``limit`` rows each; prompts as the ``lmms_eval`` protocol builds them."""
        loaded = {}
        for name in self.benchmarks:
            source: Any = self.benchmark_sources.get(name)
            if name in OFFLINE_PAGES and source is None:
                source = make_reader_benchmark(self.n_documents, self.reader_seed(), name=name, progress=progress)
                if save_dir is not None:
                    source.to_parquet(str(Path(save_dir) / f"{name}.parquet"))
            loaded[name] = load_benchmark(self.protocol.spec(name), source=source, limit=self.limit)
        return loaded

    def resolved_device(self) -> str:
        """``device``, with "auto" resolved to "cuda" when a GPU is visible, else "cpu"."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def press_settings(self, head_scores: Any = None) -> dict[str, Any]:
        """What :func:`~sparsemm_utils.evaluation.press_for` / :class:`~sparsemm_utils.evaluation.ModelGenerator` take."""
        return {
            "window": self.window, "ratio": self.ratio, "seed": self.seed, "fraction": self.mask_fraction,
            "head_scores": head_scores, "fastv_k": self.fastv_k, "selection_dtype": self.selection_dtype,
        }  # fmt: skip

    def sweep_settings(self, head_scores: Any = None) -> dict[str, Any]:
        """The JSON-able identity of the sweep recorded in ``sweep.json`` (head scores by sha256)."""
        digest = None
        if head_scores is not None:
            digest = hashlib.sha256(np.ascontiguousarray(np.asarray(head_scores, dtype=np.float64)).tobytes()).hexdigest()
        settings: dict[str, Any] = {
            "window": self.window, "ratio": self.ratio, "seed": self.seed, "mask_fraction": self.mask_fraction,
            "head_scores_sha256": digest, "decoding": "greedy, batch 1", "max_new_tokens": self.max_new_tokens,
        }  # fmt: skip
        if "fastv" in self.methods:  # only then: sweeps without FastV keep the identity they had
            settings["fastv_k"] = self.fastv_k
        if self.selection_dtype != "float32":  # likewise: float32 sweeps keep the identity they had
            settings["selection_dtype"] = self.selection_dtype
        if self.method_limits():  # likewise: only sweeps that limit a method record it
            settings["method_limits"] = self.method_limits()
        for name in (b for b in self.benchmarks if b in OFFLINE_PAGES):  # sample ids (row numbers) do not change with the seed
            settings[name] = {"n_documents": self.n_documents, "seed": self.reader_seed()}
            limits = get_benchmark(name).task_limits
            if limits:  # only benchmarks that limit a question type record it
                settings[name]["task_limits"] = dict(limits)
        return settings

    def reader_seed(self) -> int:
        """The offline benchmark's document stream: ``benchmark_seed``, else the tiny reader's held-out one."""
        if self.benchmark_seed is not None:
            return self.benchmark_seed
        return HELDOUT_SEED


def run_step_sweep(
    cfg: Config, samples: Mapping[str, Any], loaded: Any, head_scores: Any = None, shard: Shard | None = None,
    *, log: Any = print, progress: bool = True,
) -> SweepResult:  # fmt: skip
    """Step 05's sweep (:func:`~sparsemm_utils.evaluation.run_sweep` with ``cfg``'s methods,
    budgets, settings, limits, batch size and scoring protocol) over ``samples``
    (:meth:`Config.load_benchmarks`) on ``loaded`` (:func:`~sparsemm_utils.models.load_model`),
    with ``head_scores`` where a method needs them: into the step folder, or with ``shard`` into
    that shard's folder (:func:`~sparsemm_utils.sharding.shard_folder`), answering only its samples.
    Notebook 05 and :func:`sweep` both call it, so a sharded run is the notebook's sweep."""
    out = STEP.folder(cfg.run_dir, create=True)
    return run_sweep(
        out if shard is None else shard_folder(out, shard),
        model=cfg.model_id,
        benchmarks=samples,
        methods=cfg.methods,
        budgets=cfg.budgets,
        generate=ModelGenerator(loaded, cfg.press_settings(head_scores), max_new_tokens=cfg.max_new_tokens),
        settings=cfg.sweep_settings(head_scores),
        method_limits=cfg.method_limits(),
        on_mismatch=cfg.on_mismatch,
        batch_size=cfg.batch_size,
        shard=shard,
        lmms_eval=cfg.lmms_eval,
        progress=progress,
        log=log,
    )


def sweep(cfg: Config, shard: Shard | None = None, *, log: Any = print, progress: bool = True) -> SweepResult:
    """Notebook 05's sweep outside the notebook (:func:`run_step_sweep` after loading the
    benchmarks, the model and the head scores as the notebook does): one shard of a sharded run.
    The offline benchmark's parquet copy is the notebook's to write (several shards would write it
    at once)."""
    samples = cfg.load_benchmarks()
    loaded = load_model(cfg.model_id, dtype=cfg.dtype, device=cfg.resolved_device(), seed=cfg.seed)
    head_scores = load_head_scores(cfg.head_scores_path(), shape=loaded) if cfg.needs_head_scores else None
    return run_step_sweep(cfg, samples, loaded, head_scores, shard, log=log, progress=progress)


# --------------------------------------------------------------------------------------------
# tables of the run


def lowest_budget_table(results: pd.DataFrame, *, headline_only: bool = True) -> pd.DataFrame:
    """For each benchmark: every budgeted method at the lowest budget of the results, and the
    budget-free methods (FullKV, head masks); columns benchmark, metric, method, budget, score,
    n_samples, vs_fullkv (score - FullKV's score; NaN without a FullKV row).
    ``headline_only``: keep each benchmark's headline metric only."""
    if results.empty:
        return pd.DataFrame(columns=_LOWEST_COLUMNS)
    frame = results.copy()
    if headline_only:
        frame = frame[[get_benchmark(b).metric == m for b, m in zip(frame["benchmark"], frame["metric"])]]
    parts = []
    for (benchmark, metric), group in frame.groupby(["benchmark", "metric"], sort=False):
        budgeted = group[group["budget"].notna()]
        lowest = budgeted[budgeted["budget"] == budgeted["budget"].min()] if not budgeted.empty else budgeted
        free = group[group["budget"].isna()]
        part = pd.concat([free, lowest])
        full = group.loc[group["method"] == "fullkv", "score"]
        part = part.assign(vs_fullkv=part["score"] - (full.iloc[0] if not full.empty else np.nan))
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    order = {name: i for i, name in enumerate(EVAL_METHODS)}
    table = table.sort_values(["benchmark", "metric", "budget", "method"], key=lambda s: s.map(order) if s.name == "method" else s, na_position="first")
    return table[_LOWEST_COLUMNS].reset_index(drop=True)


def cell_statistics(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per (benchmark, method, budget): ``n`` samples, mean ``prompt_tokens``, mean ``kv_bytes``
    after generation, ``kv_share`` (mean KV bytes / FullKV's on the same benchmark; NaN without a
    FullKV cell) and mean ``seconds`` per sample. ``predictions``:
    :func:`~sparsemm_utils.evaluation.predictions_frame`."""
    columns = ["benchmark", "method", "budget", "n", "prompt_tokens", "kv_bytes", "kv_share", "seconds"]
    if predictions.empty:
        return pd.DataFrame(columns=columns)
    frame = predictions.copy()
    for c in ("prompt_tokens", "kv_bytes", "seconds"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    stats = (
        frame.groupby(["benchmark", "method", "budget"], dropna=False, sort=False)
        .agg(n=("sample_id", "size"), prompt_tokens=("prompt_tokens", "mean"), kv_bytes=("kv_bytes", "mean"), seconds=("seconds", "mean"))
        .reset_index()
    )
    full = stats[stats["method"] == "fullkv"].set_index("benchmark")["kv_bytes"]
    stats["kv_share"] = stats["kv_bytes"] / stats["benchmark"].map(full)
    return stats[columns]


def fastv_match_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """How FastV met each budget (:class:`sparsemm_utils.fastv.FastVAtBudget`), per benchmark and
    budget: ``n`` answers, ``reachable`` (share of prompts where FastV fits the budget's KV bytes),
    mean ``ratio`` R, mean ``dropped`` image tokens, mean ``target_tokens`` and ``stored_tokens``
    (prompt tokens over all layers and KV heads) and ``stored_over_target`` (their ratio of means).
    ``predictions``: :func:`~sparsemm_utils.evaluation.predictions_frame`; no FastV answer gives
    an empty frame."""
    columns = ["benchmark", "budget", "n", "reachable", "ratio", "dropped", "target_tokens", "stored_tokens", "stored_over_target"]
    needed = {"detail_ratio", "detail_dropped", "detail_target_tokens", "detail_stored_tokens", "detail_reachable"}
    frame = predictions[predictions["method"] == "fastv"] if "method" in predictions.columns else predictions.iloc[0:0]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    missing = needed - set(frame.columns)
    if missing:
        raise EvaluationError(f"FastV predictions lack {sorted(missing)}: were they written by ModelGenerator?")
    table = (
        frame.assign(detail_reachable=frame["detail_reachable"].astype(float))
        .groupby(["benchmark", "budget"], sort=True)
        .agg(
            n=("sample_id", "size"), reachable=("detail_reachable", "mean"), ratio=("detail_ratio", "mean"),
            dropped=("detail_dropped", "mean"), target_tokens=("detail_target_tokens", "mean"),
            stored_tokens=("detail_stored_tokens", "mean"),
        )
        .reset_index()
    )  # fmt: skip
    table["stored_over_target"] = table["stored_tokens"] / table["target_tokens"]
    return table[columns]


def _percent_range(values: Sequence[float]) -> str:
    """E.g. [0.904, 0.974] -> "90-97%"."""
    low, high = f"{100 * min(values):.0f}", f"{100 * max(values):.0f}"
    return f"{low}%" if low == high else f"{low}-{high}%"


def _times(value: float) -> str:
    return f"{value:.1f}x"


def method_labels(predictions: pd.DataFrame) -> dict[str, str]:
    """Legend labels of the methods, FastV's measured: FastV is matched to a budget's KV bytes
    only where it can be (:class:`~sparsemm_utils.fastv.FastVAtBudget`), so its label says how
    many times the budget's bytes it stored (the range of :func:`fastv_match_table`'s
    ``stored_over_target`` over the budgets), or that it stayed within them."""
    labels = {name: method.label for name, method in EVAL_METHODS.items()}
    matches = fastv_match_table(predictions)
    if not matches.empty:
        low, high = float(matches["stored_over_target"].min()), float(matches["stored_over_target"].max())
        if high <= 1.0:
            labels["fastv"] = "FastV (within the budget's KV bytes)"
        else:
            span = _times(high) if _times(low) == _times(high) else f"{low:.1f}-{_times(high)}"
            labels["fastv"] = f"FastV (stored {span} the budget's KV bytes)"
    return labels


# --------------------------------------------------------------------------------------------
# findings


def _question_scores(predictions: pd.DataFrame, benchmark: str, metric: str, method: str, budget: int | None) -> pd.Series:
    """One cell's per-question scores, indexed by sample id (empty when the cell has none)."""
    column = f"score_{metric}"
    if predictions.empty or column not in predictions.columns:
        return pd.Series(dtype=float)
    rows = predictions[(predictions["benchmark"] == benchmark) & (predictions["method"] == method)]
    rows = rows[rows["budget"].isna()] if budget is None else rows[rows["budget"] == budget]
    return rows.set_index(rows["sample_id"].astype(str))[column].astype(float)


def _short_model(hub_id: str) -> str:
    return next((short for short, full in REFERENCE_MODELS.items() if full == hub_id), hub_id)


def _paper_shares(method: str) -> list[float]:
    """``method``'s score at B = 64 over FullKV's, for every model and benchmark of docs/method.md §6."""
    ref = reference_frame()
    full = ref[ref["method"] == "fullkv"].set_index(["model", "benchmark"])["score"]
    rows = ref[(ref["method"] == method) & (ref["budget"] == 64)]
    return [float(s / full[(m, b)]) for m, b, s in zip(rows["model"], rows["benchmark"], rows["score"])]


def _paper_pair(model: str, benchmark: str) -> pd.DataFrame:
    """The paper's numbers of this model and benchmark (empty when it reports none)."""
    ref = reference_frame(model)
    return ref[ref["benchmark"] == benchmark]


def _paper_score(pair: pd.DataFrame, method: str, budget: int | None) -> float | None:
    rows = pair[(pair["method"] == method) & (pair["budget"].isna() if budget is None else pair["budget"] == budget)]
    return None if rows.empty else float(rows["score"].iloc[0])


def _paper_text(model: str, benchmark: str, baseline: str | None) -> str:
    """The paper's value for SparseMM against FullKV (``baseline`` None) or against ``baseline``:
    this model's and benchmark's numbers when the paper reports them, else its range at B = 64."""
    label = get_method(baseline).label if baseline else "FullKV"
    pair = _paper_pair(model, benchmark)
    full, sparse = _paper_score(pair, "fullkv", None), _paper_score(pair, "sparsemm", 64)
    other = full if baseline is None else _paper_score(pair, baseline, 64)
    if full is not None and sparse is not None and other is not None:
        where = f"{_short_model(reference_model_id(model))} {get_benchmark(benchmark).title}"
        if baseline is None:
            return f"{where}, B = 64: SparseMM {sparse:.3f} vs FullKV {full:.3f} ({sparse / full:.0%}) (docs/method.md §6)"
        return f"{where}, B = 64: SparseMM {sparse:.3f} ({sparse / full:.0%} of FullKV) vs {label} {other:.3f} ({other / full:.0%}) (docs/method.md §6)"
    sparse_shares = _paper_shares("sparsemm")
    pairs = f"{len(sparse_shares)} model/benchmark pairs"
    if baseline is None:
        return f"B = 64: SparseMM keeps {_percent_range(sparse_shares)} of FullKV on {pairs} (docs/method.md §6)"
    shares = _paper_shares(baseline)
    if not shares:
        return f"{label} is not in the paper's table (docs/method.md §6)"
    ahead = sum(s > b for s, b in zip(sparse_shares, shares))
    return (
        f"B = 64: SparseMM keeps {_percent_range(sparse_shares)} of FullKV, {label} {_percent_range(shares)}; "
        f"SparseMM ahead on {ahead} of {len(shares)} pairs (docs/method.md §6)"
    )


def _prompt_share(predictions: pd.DataFrame, benchmark: str, budget: int) -> str:
    tokens = pd.to_numeric(predictions.loc[predictions["benchmark"] == benchmark, "prompt_tokens"], errors="coerce").dropna() if not predictions.empty else pd.Series(dtype=float)
    paper = f"the paper's B = 64 is {64 / REFERENCE_PROMPT_TOKENS:.1%} of a ~{REFERENCE_PROMPT_TOKENS}-token prompt"
    if tokens.empty:
        return paper
    return f"B = {budget} is {budget / tokens.mean():.0%} of the mean {tokens.mean():.0f}-token prompt; {paper}"


def _fastv_note(predictions: pd.DataFrame, benchmark: str, budget: int) -> str:
    """How FastV met the budget's KV bytes ("" when its answers carry no byte match, e.g. a fake generator's)."""
    if "detail_stored_tokens" not in predictions.columns:
        return ""
    matches = fastv_match_table(predictions)
    row = matches[(matches["benchmark"] == benchmark) & (matches["budget"] == budget)]
    if row.empty:
        return ""
    r = row.iloc[0]
    return (
        f"; FastV stored {r['stored_over_target']:.1f}x the budget's KV bytes here (within them on "
        f"{round(r['reachable'] * r['n'])} of {int(r['n'])} prompts)"
    )


def _difference(first: pd.Series, second: pd.Series) -> tuple[float, float, float, int] | None:
    """Mean of ``first - second`` over their common questions, its paired bootstrap 95% interval,
    and n (None without common questions)."""
    common = first.index.intersection(second.index)
    if common.empty:
        return None
    a, b = first[common].to_numpy(dtype=float), second[common].to_numpy(dtype=float)
    low, high = paired_bootstrap_interval(a, b, seed=0)
    return float((a - b).mean()), low, high, int(common.size)


def _interval_verdict(diff: tuple[float, float, float, int] | None) -> bool | None:
    """True when the paired interval lies above zero, False when below, None when it straddles it."""
    if diff is None:
        return None
    _, low, high, _ = diff
    return True if low > 0 else False if high < 0 else None


def _diff_text(diff: tuple[float, float, float, int] | None, first: str, second: str) -> str:
    if diff is None:
        return "no per-question scores to compare"
    mean, low, high, n = diff
    return f"{first} - {second} = {mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap 95%, n = {n}; one question = {100 / n:.1f} points)"


def _label(method: str) -> str:
    return get_method(method).label


#: The paper's claim about the head-mask ablation (docs/method.md §5) and the project's target for it.
MASK_RATIO_TARGET = 3.0


def _mask_finding(predictions: pd.DataFrame, benchmark: str, metric: str, title: str) -> Finding | None:
    """Masking the top visual heads against masking as many random heads (every ``mask_random*``
    draw of the sweep), each as the drop from FullKV on the same questions."""
    full = _question_scores(predictions, benchmark, metric, "fullkv", None)
    top = _question_scores(predictions, benchmark, metric, "mask", None)
    draws = sorted({m for m in predictions.get("method", pd.Series(dtype=str)) if is_random_mask(m)})
    if full.empty or top.empty or not draws:
        return None
    drop_top = _difference(full, top)
    drops = {m: _difference(full, _question_scores(predictions, benchmark, metric, m, None)) for m in draws}
    random_mean = float(np.mean([d[0] for d in drops.values() if d is not None]))
    randoms = predictions[(predictions["benchmark"] == benchmark) & predictions["method"].map(is_random_mask)]
    random_per_question = randoms.groupby(randoms["sample_id"].astype(str))[f"score_{metric}"].mean()
    gap = _difference(random_per_question, top)  # how much more the top mask loses than the mean random mask
    ratio = drop_top[0] / random_mean if drop_top is not None and random_mean > 0 else float("inf")
    each = ", ".join(f"{m.removeprefix('mask_random_') if m != 'mask_random' else '0'}: {d[0]:+.3f}" for m, d in drops.items() if d is not None)
    ratio_text = f"{ratio:.1f}x" if np.isfinite(ratio) else "random masks cost nothing on average"
    verdict = _interval_verdict(gap)  # is the top mask worse than the mean random mask, question by question?
    if verdict is True:
        holds = bool(not np.isfinite(ratio) or ratio >= MASK_RATIO_TARGET)
    else:
        holds = False if verdict is False else None
    return Finding(
        NAME, f"Masking the top visual heads hurts far more than masking random heads ({title})",
        f"the paper's ablation: the top 10% visual heads masked lose much more than 10% random heads (docs/method.md §5); "
        f"this project's target: at least {MASK_RATIO_TARGET:.0f}x the mean random drop",
        f"{metric} drop from FullKV: top heads {drop_top[0]:+.3f} [{drop_top[1]:+.3f}, {drop_top[2]:+.3f}], random heads "
        f"{random_mean:+.3f} on average over {len(drops)} draws ({each}); ratio {ratio_text}; "
        f"{_diff_text(gap, 'mean random mask', 'top mask')}",
        drop_top[3], holds, headline=True,
    )  # fmt: skip


def findings(results: pd.DataFrame, predictions: pd.DataFrame) -> list[Finding]:
    """What this run shows, per benchmark (headline metric), against the paper (docs/method.md §6):

    - SparseMM keeps most of FullKV's accuracy at the lowest budget: holds when its score is at least
      the paper's lowest share (90% of FullKV at B = 64); fails when it is below that and FullKV is
      ahead on the same questions (paired bootstrap 95% interval of the difference above zero);
      cannot tell otherwise. Headline.
    - At each of the two lowest budgets, SparseMM is ahead of each budgeted baseline: holds / fails
      when the paired bootstrap 95% interval of SparseMM minus the baseline lies above / below zero,
      cannot tell when it straddles zero (the text gives both scores, the difference with its
      interval, n and what one question is worth). The ones against random allocation and SnapKV at
      the lowest budget are headlines.
    - With ``mask`` and random-mask draws in the sweep: the head-mask ablation (:func:`_mask_finding`).

    ``results``: ``results.csv`` (:func:`~sparsemm_utils.evaluation.read_results`);
    ``predictions``: :func:`~sparsemm_utils.evaluation.predictions_frame` (per-question scores,
    prompt lengths, FastV's byte match). A benchmark without FullKV or SparseMM cells gives none."""
    out: list[Finding] = []
    paper_floor = min(_paper_shares("sparsemm"))
    for benchmark in dict.fromkeys(results["benchmark"]):
        spec = get_benchmark(benchmark)
        metric = spec.metric
        rows = results[(results["benchmark"] == benchmark) & (results["metric"] == metric)]
        budgeted = rows[rows["budget"].notna()]
        full_rows = rows[rows["method"] == "fullkv"]
        if budgeted.empty or full_rows.empty:
            continue
        model = str(rows["model"].iloc[0])
        full = float(full_rows["score"].iloc[0])
        full_q = _question_scores(predictions, benchmark, metric, "fullkv", None)
        budgets = sorted(int(b) for b in budgeted["budget"].unique())
        for rank, budget in enumerate(budgets[:2]):
            cells = budgeted[budgeted["budget"] == budget].set_index("method")
            if "sparsemm" not in cells.index:
                continue
            sparse = float(cells.loc["sparsemm", "score"])
            n = int(cells.loc["sparsemm", "n_samples"])
            sparse_q = _question_scores(predictions, benchmark, metric, "sparsemm", budget)
            where = f"{spec.title} {metric}, B = {budget}"

            def share(score: float) -> str:
                return f"{score / full:.0%} of FullKV" if full > 0 else "FullKV scores 0"

            if rank == 0:
                loss = _difference(full_q, sparse_q)
                if full <= 0:
                    holds = None
                elif sparse / full >= paper_floor:
                    holds = True
                else:
                    holds = False if _interval_verdict(loss) is True else None
                out.append(
                    Finding(
                        NAME, f"SparseMM keeps most of FullKV's {metric} at the lowest budget ({spec.title})",
                        _paper_text(model, benchmark, None),
                        f"{where}: SparseMM {sparse:.3f} vs FullKV {full:.3f} ({share(sparse)}); "
                        f"{_prompt_share(predictions, benchmark, budget)}; {_diff_text(loss, 'FullKV', 'SparseMM')}",
                        n, holds, headline=True,
                    )
                )  # fmt: skip
            for method in (m for m in cells.index if m != "sparsemm" and get_method(m).budgeted):
                score = float(cells.loc[method, "score"])
                diff = _difference(sparse_q, _question_scores(predictions, benchmark, metric, method, budget))
                note = _fastv_note(predictions, benchmark, budget) if method == "fastv" else ""
                which = "lowest" if rank == 0 else "second-lowest"
                out.append(
                    Finding(
                        NAME, f"SparseMM is ahead of {_label(method)} at the {which} budget ({spec.title})",
                        _paper_text(model, benchmark, method),
                        f"{where}: SparseMM {sparse:.3f} ({share(sparse)}) vs {_label(method)} {score:.3f} ({share(score)}); "
                        f"{_diff_text(diff, 'SparseMM', _label(method))}{note}",
                        n, _interval_verdict(diff), headline=rank == 0 and method in ("random", "snapkv"),
                    )
                )  # fmt: skip
        mask = _mask_finding(predictions, benchmark, metric, spec.title)
        if mask is not None:
            out.append(mask)
    return out


# --------------------------------------------------------------------------------------------
# outputs


def write_outputs(cfg: Config, results: pd.DataFrame, predictions: pd.DataFrame) -> list[Finding]:
    """Write what the step leaves in ``<cfg.run_dir>/05_eval/`` besides the sweep's own files
    (which :func:`~sparsemm_utils.evaluation.run_sweep` writes as it goes): ``lowest_budget.csv``
    (:func:`lowest_budget_table`, :data:`LOWEST_BUDGET`) and ``findings.csv`` (:func:`findings`,
    :data:`FINDINGS`). Returns the findings."""
    STEP.folder(cfg.run_dir, create=True)
    lowest_budget_table(results).to_csv(LOWEST_BUDGET.path(cfg.run_dir), index=False)
    found = findings(results, predictions)
    findings_frame(found).to_csv(FINDINGS.path(cfg.run_dir), index=False)
    return found


#: Where :func:`rescore` writes by default, under the run folder: ``rescored/<protocol>/``.
RESCORED_DIR = "rescored"


def rescore(run_dir: str | Path, lmms_eval: str = DEFAULT_LMMS_EVAL, out: str | Path | None = None) -> tuple[Rescored, list[Finding], Path]:
    """Score the answers of ``<run_dir>/05_eval/`` again under ``lmms_eval``
    (:func:`~sparsemm_utils.evaluation.rescore_sweep`; nothing is generated) and write, into
    ``out`` (default ``<run_dir>/rescored/<lmms_eval>/``), what step 05 writes from them:
    ``results.csv``, ``predictions.jsonl`` (the re-scored records), ``lowest_budget.csv`` and
    ``findings.csv``. The files are written into a temporary folder first and moved in only when
    all are complete, so a failure leaves an earlier re-scoring whole. The step's own folder is
    never written. Returns (the re-scored sweep, its findings, the folder)."""
    check_choice("lmms_eval (the scoring protocol)", lmms_eval, tuple(PROTOCOLS), error=EvaluationError)
    step_dir = STEP.folder(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / RESCORED_DIR / lmms_eval
    if target.resolve() == step_dir.resolve():
        raise EvaluationError(f"{target} is step 05's own folder, which its ledger records: write the re-scoring elsewhere")
    rescored = rescore_sweep(step_dir, lmms_eval=lmms_eval)
    found = findings(rescored.results, predictions_frame(rescored.records))
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".writing-") as tmp:
        staging = Path(tmp)
        rescored.results.to_csv(staging / RESULTS_FILE, index=False)
        with open(staging / PREDICTIONS_FILE, "w", encoding="utf-8", newline="") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rescored.records)
        lowest_budget_table(rescored.results).to_csv(staging / LOWEST_BUDGET.name, index=False)
        findings_frame(found).to_csv(staging / FINDINGS.name, index=False)
        for name in (RESULTS_FILE, PREDICTIONS_FILE, LOWEST_BUDGET.name, FINDINGS.name):
            shutil.move(str(staging / name), str(target / name))
    return rescored, found, target


def main(argv: Sequence[str] | None = None) -> int:
    """``rescore --run-dir <run> [--lmms-eval 0.3|current] [--out <folder>]`` (:func:`rescore`);
    exit code 2 with the reason on bad input."""
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.steps.eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("rescore", help="score a finished sweep's answers again under a scoring protocol, generating nothing")
    cmd.add_argument("--run-dir", required=True, help="the run folder whose 05_eval/ holds the sweep")
    cmd.add_argument("--lmms-eval", default=DEFAULT_LMMS_EVAL, choices=sorted(PROTOCOLS), help="the scoring protocol")
    cmd.add_argument("--out", default=None, help="where to write (default <run-dir>/rescored/<protocol>/)")
    args = parser.parse_args(argv)
    try:
        rescored, found, target = rescore(args.run_dir, args.lmms_eval, args.out)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    headline = rescored.results[rescored.results["metric"] == rescored.results["benchmark"].map(lambda b: get_benchmark(b).metric)]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(headline[["benchmark", "method", "budget", "metric", "score", "n_samples", "ci_low", "ci_high", "sparsemm_minus_method"]].to_string(index=False))
    print(findings_frame(found)[["claim", "this_run", "n", "holds"]].to_string(index=False))
    print(f"wrote {', '.join(str(target / n) for n in (RESULTS_FILE, PREDICTIONS_FILE, LOWEST_BUDGET.name, FINDINGS.name))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
