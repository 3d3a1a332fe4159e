"""An exercise's last part: the student's function next to the library on the run's own data.

The checkers (:mod:`sparsemm_utils.checkers`) test a student's function on small cases; the
functions here then run it on what the chain produced in ``run_dir`` and put it beside the
library's result, row by row, with one figure:

- :func:`map_box_on_run`: every chunk box of the first documents (step 02's ``regions.jsonl``);
- :func:`hit_rule_on_run`: s_n of the first documents, from a fresh greedy generation of the
  run's model (the rows the hit rule reads are not stored by step 03);
- :func:`allocation_on_run`: SparseMM's caps from step 03's ``head_scores.json`` at several budgets;
- :func:`snapkv_selection_on_run`: the positions every KV head of every layer keeps on one real
  prompt, from the post-RoPE queries and keys of its prefill;
- :func:`anls_on_run`: ANLS of every prediction step 05 scored with it (``predictions.jsonl``).

Each returns a :class:`RunComparison`. Parameters come from one small config dataclass per
exercise (the exercise notebook's ``parameters`` cell, validated).
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.allocation import InvalidScoresError, SparseMMAllocation
from sparsemm_utils.compression import model_shape, snapkv_scores, topk_positions
from sparsemm_utils.document_dataset import load_documents
from sparsemm_utils.evaluation import read_predictions
from sparsemm_utils.head_scoring_capture import capture_sample, score_captures
from sparsemm_utils.head_scoring_files import load_head_scores
from sparsemm_utils.head_scoring_rule import make_matcher
from sparsemm_utils.manifest import Manifest
from sparsemm_utils.models import load_model, register_text_attention, set_text_attention, text_attention_implementation
from sparsemm_utils.patch_mapping import QwenVLGeometry, QwenVLPatchMapper, load_regions
from sparsemm_utils.plots.heads import plot_head_heatmap
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.runs import require_upstream, resolve_run_dir
from sparsemm_utils.steps import eval as step05
from sparsemm_utils.steps import head_scoring as step03
from sparsemm_utils.validate import check_fraction, check_int

__all__ = [
    "ExerciseRunError",
    "RunComparison",
    "ExerciseRunConfig",
    "MapBoxRunConfig",
    "HitRuleRunConfig",
    "AllocationRunConfig",
    "SnapKVRunConfig",
    "AnlsRunConfig",
    "map_box_on_run",
    "hit_rule_on_run",
    "allocation_on_run",
    "snapkv_selection_on_run",
    "anls_on_run",
    "capture_prefill_qk",
    "check_run_model",
]


class ExerciseRunError(ValueError):
    """The run cannot be used for this exercise (wrong model family, nothing to compare, a bad
    parameter); the message says what to change."""


@dataclass
class RunComparison:
    """The student's function beside the library on the run's data.

    ``table``: one row per compared item with an ``agree`` column; ``figure``: one picture of the
    comparison (or None); ``note``: how to read it.
    """

    exercise: str
    table: pd.DataFrame
    figure: Figure | None = None
    note: str = ""

    @property
    def agree(self) -> bool:
        return bool(len(self.table)) and bool(self.table["agree"].all())

    def summary(self) -> str:
        n = len(self.table)
        same = int(self.table["agree"].sum()) if n else 0
        verdict = "your function agrees with the library everywhere" if self.agree else "see the rows with agree == False"
        return f"{self.exercise} on this run: {same} of {n} rows agree; {verdict}." + (f" {self.note}" if self.note else "")

    def disagreements(self) -> pd.DataFrame:
        return self.table[~self.table["agree"]]


# ------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class ExerciseRunConfig:
    """The parameters every exercise notebook has: the run folder, the model, the seed."""

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise ExerciseRunError(f"{owner}.run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ExerciseRunError(f"{owner}.model_id must be a non-empty string, got {self.model_id!r}")
        check_int(f"{owner}.seed", self.seed, 0, error=ExerciseRunError)


@dataclass(frozen=True)
class MapBoxRunConfig(ExerciseRunConfig):
    """Exercise 02 (map_box): compare on the chunks of the first ``n_documents`` documents."""

    n_documents: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{type(self).__name__}.n_documents", self.n_documents, 1, error=ExerciseRunError)


@dataclass(frozen=True)
class HitRuleRunConfig(ExerciseRunConfig):
    """Exercise 03 (hit_rule): generate ``max_new_tokens`` for each of the first ``n_documents``."""

    n_documents: int = 2
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{type(self).__name__}.n_documents", self.n_documents, 1, error=ExerciseRunError)
        check_int(f"{type(self).__name__}.max_new_tokens", self.max_new_tokens, 1, error=ExerciseRunError)


@dataclass(frozen=True)
class AllocationRunConfig(ExerciseRunConfig):
    """Exercise 04 (allocation): SparseMM's caps at each of ``budgets`` (window ``window``, ratio ``ratio``)."""

    budgets: tuple[int, ...] = (16, 32, 64)
    window: int = 8
    ratio: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        object.__setattr__(self, "budgets", tuple(self.budgets))
        if not self.budgets:
            raise ExerciseRunError(f"{owner}.budgets must list at least one budget")
        check_int(f"{owner}.window", self.window, 1, error=ExerciseRunError)
        for b in self.budgets:
            check_int(f"{owner}.budgets[...]", b, self.window + 1, error=ExerciseRunError)
        check_fraction(f"{owner}.ratio", self.ratio, error=ExerciseRunError)


@dataclass(frozen=True)
class SnapKVRunConfig(ExerciseRunConfig):
    """Exercise 04 (snapkv_selection): the prompt of document ``doc_index``; caps of SparseMM at
    ``budget`` with window ``window``; pooling kernel ``kernel_size``."""

    doc_index: int = 0
    budget: int = 16
    window: int = 8
    kernel_size: int = 5
    ratio: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_int(f"{owner}.doc_index", self.doc_index, 0, error=ExerciseRunError)
        check_int(f"{owner}.window", self.window, 1, error=ExerciseRunError)
        check_int(f"{owner}.budget", self.budget, self.window + 1, error=ExerciseRunError)
        check_int(f"{owner}.kernel_size", self.kernel_size, 1, error=ExerciseRunError)
        if self.kernel_size % 2 == 0:
            raise ExerciseRunError(f"{owner}.kernel_size must be odd (docs/method.md §5: default 5), got {self.kernel_size}")
        check_fraction(f"{owner}.ratio", self.ratio, error=ExerciseRunError)


@dataclass(frozen=True)
class AnlsRunConfig(ExerciseRunConfig):
    """Exercise 05 (anls): every prediction of step 05 that was scored with ANLS (at most
    ``max_predictions``; None: all)."""

    max_predictions: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_predictions is not None:
            check_int(f"{type(self).__name__}.max_predictions", self.max_predictions, 1, error=ExerciseRunError)


# ------------------------------------------------------------------------------------ helpers


def _call(fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    """(result, '') or (None, the error) : a crash on one row must not hide the others."""
    try:
        return fn(*args), ""
    except Exception as exc:  # the student's code: report, keep going
        return None, f"{type(exc).__name__}: {exc}"


def _positions(value: Any) -> list[int] | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return [int(v) for v in np.asarray(value).ravel()]


def check_run_model(cfg: ExerciseRunConfig, step: str) -> None:
    """Raise :class:`ExerciseRunError` when ``step``'s manifest in the run records another
    ``model_id`` than ``cfg.model_id`` (the regions and head scores belong to that model)."""
    manifest = Manifest.read(resolve_run_dir(cfg.run_dir) / step)
    recorded = None if manifest is None else manifest.params.get("model_id")
    if recorded is not None and recorded != cfg.model_id:
        raise ExerciseRunError(
            f"the run's step {step} used model_id = {recorded!r}, this notebook has model_id = {cfg.model_id!r}: "
            f"set model_id = {recorded!r} in the parameters cell (its outputs belong to that model)"
        )


# ------------------------------------------------------------------------------------ map_box


def _draw_cells(ax: Any, image: Any, boxes: np.ndarray, expected: set[int], got: set[int], title: str) -> None:
    ax.imshow(image)
    for p, (x0, y0, x1, y1) in enumerate(boxes):
        if p in expected and p in got:
            color = "tab:green"
        elif p in expected:
            color = "tab:blue"
        elif p in got:
            color = "tab:red"
        else:
            continue
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=color, alpha=0.35, edgecolor=color))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def map_box_on_run(fn: Callable[..., Any], cfg: MapBoxRunConfig) -> RunComparison:
    """``fn(box, width, height, geometry)`` on every chunk box of the first documents, beside the
    positions step 02 wrote (``regions.jsonl``, docs/method.md §3). Qwen2-VL / Qwen2.5-VL runs only.

    Table: doc_id, chunk, box, tokens (library), your_tokens, missing, extra, agree, error. Figure:
    the first document with the library's cells (blue), yours (red) and both (green) for the
    first chunk that disagrees (or the first chunk).
    """
    regions = load_regions(require_upstream(cfg.run_dir, "02_patch_mapping", "regions.jsonl"))
    report = json.loads(require_upstream(cfg.run_dir, "02_patch_mapping", "mapping_report.json").read_text(encoding="utf-8"))
    families = sorted({r["model_type"] for r in regions})
    if any(m not in ("qwen2_vl", "qwen2_5_vl") for m in families):
        raise ExerciseRunError(
            f"this exercise is the Qwen2-VL rule, but the run's boxes were mapped for {families}: use a run of a "
            "Qwen2-VL / Qwen2.5-VL model (e.g. configs/tiny.yaml)"
        )
    geometry = QwenVLGeometry(**report["geometry_settings"])
    rows = []
    for record in regions[: cfg.n_documents]:
        width, height = record["image_size"]
        for i, chunk in enumerate(record["chunks"]):
            if chunk["box"] is None:
                continue
            expected = [int(p) for p in chunk["positions"]]
            got_raw, error = _call(fn, tuple(chunk["box"]), width, height, geometry)
            got = _positions(got_raw) if not error else None
            rows.append({
                "doc_id": record["doc_id"], "chunk_index": i, "chunk": chunk["chunk"], "box": chunk["box"],
                "tokens": len(expected), "your_tokens": None if got is None else len(got),
                "missing": sorted(set(expected) - set(got or [])), "extra": sorted(set(got or []) - set(expected)),
                "agree": got == expected, "error": error,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        raise ExerciseRunError(f"the first {cfg.n_documents} documents of the run have no mapped chunk box")
    shown = table[~table["agree"]].head(1)
    shown = shown if len(shown) else table.head(1)
    doc_id, index = shown.iloc[0]["doc_id"], int(shown.iloc[0]["chunk_index"])
    documents = load_documents(require_upstream(cfg.run_dir, "01_ocr_annotation", "documents"))
    document = next(d for d in documents if d["doc_id"] == doc_id)
    record = next(r for r in regions if r["doc_id"] == doc_id)
    width, height = record["image_size"]
    expected = set(record["chunks"][index]["positions"])
    got = set(_positions(_call(fn, tuple(record["chunks"][index]["box"]), width, height, geometry)[0]) or [])
    boxes = QwenVLPatchMapper(geometry).token_boxes(width, height)
    fig, ax = plt.subplots(figsize=(7, 7 * height / width + 0.6))
    _draw_cells(ax, document["image"], boxes, expected, got,
                f"doc {doc_id}, chunk {index} {record['chunks'][index]['chunk'][:30]!r}: library blue, yours red, both green")
    x0, y0, x1, y1 = record["chunks"][index]["box"]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", linewidth=1.2))
    fig.tight_layout()
    return RunComparison("map_box", table, fig, "Positions are relative to the first image token.")


# ----------------------------------------------------------------------------------- hit rule


def hit_rule_on_run(fn: Callable[..., Any], cfg: HitRuleRunConfig) -> RunComparison:
    """``fn(token_texts, chunk_texts, chunk_regions, attention_rows)`` on fresh generations of the
    run's model for the first documents, beside step 03's own scoring of the same generation
    (``score_captures`` with the substring / argmax rule, docs/method.md §4).

    The end-of-sequence token is left out before calling ``fn`` (the rule never scores it).
    Table: doc_id, tokens, matched (library), max_abs_diff, agree, error. Figure: the library's
    S over these documents beside yours.
    """
    documents = load_documents(require_upstream(cfg.run_dir, "01_ocr_annotation", "documents"))
    regions = {r["doc_id"]: r for r in load_regions(require_upstream(cfg.run_dir, "02_patch_mapping", "regions.jsonl"))}
    check_run_model(cfg, "02_patch_mapping")
    loaded = load_model(cfg.model_id, seed=cfg.seed)
    scoring = step03.Config(
        run_dir=cfg.run_dir, model_id=cfg.model_id, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
        n_samples=cfg.n_documents, explorer_samples=0, reference_check_samples=0,
    )  # fmt: skip
    rows, library, yours = [], [], []
    for i in range(min(cfg.n_documents, len(documents))):
        doc = documents[i]
        record = regions[doc["doc_id"]]
        sample = capture_sample(loaded, doc, record, scoring, keep_rows=True)
        expected = score_captures([sample], "substring", "argmax", 1).sample_scores[0]
        keep = [t for t, stop in enumerate(sample.tokens.stop) if not stop]
        start = int(record["image_token_start"])
        args = (
            [sample.tokens.texts[t] for t in keep],
            [c["chunk"] or "" for c in record["chunks"]],
            [[start + int(p) for p in c["positions"]] for c in record["chunks"]],
            [np.array(sample.captured.rows[t]) for t in keep],
        )
        got_raw, error = _call(fn, *args)
        got = None
        diff = float("nan")
        if not error:
            try:
                got = np.asarray(got_raw, dtype=np.float64)
                diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
            except (TypeError, ValueError) as exc:
                error = f"the result is not an (L, H) array of numbers ({exc})"
        matched = int(sum(m.matched for m in make_matcher("substring").match(sample.tokens, record)))
        rows.append({"doc_id": doc["doc_id"], "tokens": len(keep), "matched": matched,
                     "max_abs_diff": diff, "agree": bool(diff <= 1e-9), "error": error})
        library.append(expected)
        if got is not None and got.shape == expected.shape:
            yours.append(got)
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.35 * loaded.num_layers))
    plot_head_heatmap(np.mean(library, axis=0), ax=axes[0], title=f"library: S over {len(library)} documents")
    if len(yours) == len(library):
        plot_head_heatmap(np.clip(np.mean(yours, axis=0), 0, None), ax=axes[1], title="yours")
    else:
        axes[1].text(0.5, 0.5, "your function failed on some document", ha="center", va="center")
        axes[1].axis("off")
    fig.tight_layout()
    note = "" if table["matched"].sum() else (
        "No token was matched on these documents (a character-level tokenizer makes most tokens ambiguous): "
        "raise n_documents or max_new_tokens for a stronger comparison."
    )
    return RunComparison("hit_rule", table, fig, note)


# --------------------------------------------------------------------------------- allocation


def allocation_on_run(fn: Callable[..., Any], cfg: AllocationRunConfig) -> RunComparison:
    """``fn(head_scores, kv_heads, budget, window, ratio)`` with step 03's scores, beside
    ``SparseMMAllocation.capacities`` (docs/method.md §5) at each budget.

    Table: budget, total (library), your_total, heads_differing, max_abs_diff, agree, error.
    Figure: the library's caps and yours at the first budget (layers x KV heads).
    """
    scores_path = require_upstream(cfg.run_dir, "03_head_scoring", "head_scores.json")
    check_run_model(cfg, "03_head_scoring")
    shape = model_shape(load_model(cfg.model_id, seed=cfg.seed))
    scores = load_head_scores(scores_path, shape=(shape.layers, shape.query_heads))
    rows, pairs = [], []
    for budget in cfg.budgets:
        try:
            expected = SparseMMAllocation(budget=budget, window=cfg.window, ratio=cfg.ratio).capacities(
                shape, head_scores=scores
            ).selected
        except InvalidScoresError as exc:
            raise ExerciseRunError(f"the run's head scores cannot be allocated by: {exc}") from exc
        got_raw, error = _call(fn, scores.copy(), shape.kv_heads, budget, cfg.window, cfg.ratio)
        got = None
        if not error:
            got = np.asarray(got_raw)
            if got.shape != expected.shape:
                error = f"shape {got.shape}, expected (layers, kv_heads) = {expected.shape}"
                got = None
        differing = None if got is None else int((got != expected).sum())
        rows.append({
            "budget": budget, "total": int(expected.sum()), "your_total": None if got is None else int(got.sum()),
            "heads_differing": differing, "max_abs_diff": None if got is None else int(np.abs(got - expected).max()),
            "agree": differing == 0, "error": error,
        })  # fmt: skip
        pairs.append((budget, expected, got))
    budget, expected, got = pairs[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.35 * shape.layers))
    for ax, (label, caps) in zip(axes, (("library", expected), ("yours", got))):
        if caps is None:
            ax.text(0.5, 0.5, "no result", ha="center", va="center")
            ax.axis("off")
            continue
        sns.heatmap(caps, ax=ax, annot=shape.kv_heads <= 8, fmt="d", cmap="magma",
                    vmin=0, vmax=int(expected.max()), cbar_kws={"label": "selected tokens (window excluded)"})
        ax.set_title(f"{label}: caps at B = {budget}, w = {cfg.window}", fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
    fig.tight_layout()
    return RunComparison("allocation", pd.DataFrame(rows), fig)


# --------------------------------------------------------------------------- SnapKV selection


_QK_STORE: contextvars.ContextVar[dict[int, tuple[Any, Any, float | None]] | None] = contextvars.ContextVar(
    "sparsemm_exercise_qk", default=None
)
_QK_ATTENTION = "sparsemm_exercise_prefill_qk"


def _capturing_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> Any:
    """sdpa attention that also records the prefill's post-RoPE (query, key, scaling) per layer."""
    store = _QK_STORE.get()
    if store is not None and query.shape[-2] > 1:
        store[int(module.layer_idx)] = (query.detach().float().cpu(), key.detach().float().cpu(), scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextmanager
def capture_prefill_qk(loaded: Any) -> Iterator[dict[int, tuple[Any, Any, float | None]]]:
    """Within the block, every forward pass of ``loaded``'s language model records, per layer,
    the post-RoPE ``query`` (1, H, n, d), ``key`` (1, H_kv, n, d) and the softmax scale of its
    prefill (the same states SnapKV selects from, docs/method.md §5). The model's attention
    implementation is restored on exit."""
    register_text_attention(_QK_ATTENTION, _capturing_attention, mask="sdpa")
    previous = text_attention_implementation(loaded.model)
    store: dict[int, tuple[Any, Any, float | None]] = {}
    token = _QK_STORE.set(store)
    set_text_attention(loaded.model, _QK_ATTENTION)
    try:
        yield store
    finally:
        set_text_attention(loaded.model, previous)
        _QK_STORE.reset(token)


def snapkv_selection_on_run(fn: Callable[..., Any], cfg: SnapKVRunConfig) -> RunComparison:
    """``fn(query, key, caps, window, kernel_size)`` on the prefill of one real prompt (the OCR
    prompt of document ``doc_index``), layer by layer, beside ``snapkv_scores`` +
    ``topk_positions`` (docs/method.md §5) with SparseMM's caps at ``budget``.

    Every layer is compressed here (the original leaves a prompt shorter than B uncompressed; that
    whole-prompt rule is not part of the selection). Table: layer, kv_head, cap, kept (library),
    your_kept, missing, extra, near_tie (the cap-th and the next score within 1e-5, relative),
    tie_swap (you kept other positions than the library, all scored within 1e-5 of the cap-th
    score: float precision decides, so the row agrees), agree, error. Figure: every head's kept
    positions, library vs yours.
    """
    documents = load_documents(require_upstream(cfg.run_dir, "01_ocr_annotation", "documents"))
    scores_path = require_upstream(cfg.run_dir, "03_head_scoring", "head_scores.json")
    if cfg.doc_index >= len(documents):
        raise ExerciseRunError(f"doc_index {cfg.doc_index} is out of range: the run has {len(documents)} documents")
    check_run_model(cfg, "03_head_scoring")
    loaded = load_model(cfg.model_id, seed=cfg.seed)
    shape = model_shape(loaded)
    head_scores = load_head_scores(scores_path, shape=(shape.layers, shape.query_heads))
    caps = SparseMMAllocation(budget=cfg.budget, window=cfg.window, ratio=cfg.ratio).capacities(
        shape, head_scores=head_scores
    ).selected
    inputs = build_inputs(loaded, documents[cfg.doc_index]["image"])
    n = int(inputs["input_ids"].shape[1])
    if n <= cfg.window:
        raise ExerciseRunError(f"the prompt has {n} tokens, not more than the window w = {cfg.window}: lower the window")
    with capture_prefill_qk(loaded) as store, torch.no_grad():
        loaded.model(**inputs)
    rows = []
    kept_map = np.zeros((shape.layers * shape.kv_heads, n), dtype=np.int8)
    for layer in range(shape.layers):
        query, key, scaling = store[layer]
        layer_caps = [int(c) for c in caps[layer]]
        scores = snapkv_scores(query, key, cfg.window, scaling, cfg.kernel_size)
        expected = [p.tolist() for p in topk_positions(scores, layer_caps, n, cfg.window)]
        got_raw, error = _call(fn, query.clone(), key.clone(), list(layer_caps), cfg.window, cfg.kernel_size)
        heads = list(got_raw) if not error and got_raw is not None else [None] * shape.kv_heads
        if not error and len(heads) != shape.kv_heads:
            error = f"{len(heads)} lists returned for {shape.kv_heads} KV heads"
            heads = [None] * shape.kv_heads
        values = scores.double().numpy()
        ordered = np.sort(values, axis=-1)[:, ::-1]
        for g in range(shape.kv_heads):
            cap = layer_caps[g]
            got = _positions(heads[g])
            missing = sorted(set(expected[g]) - set(got or []))
            extra = sorted(set(got or []) - set(expected[g]))
            near_tie, tie_swap = False, False
            if 0 < cap < ordered.shape[1]:
                edge = ordered[g, cap - 1]
                tol = 1e-5 * abs(edge)
                near_tie = bool(edge - ordered[g, cap] < tol)
                swapped = missing + extra
                tie_swap = bool(
                    got is not None and swapped and len(missing) == len(extra)
                    and all(p < values.shape[1] and abs(values[g, p] - edge) < tol for p in swapped)
                )
            rows.append({
                "layer": layer, "kv_head": g, "cap": cap, "kept": len(expected[g]),
                "your_kept": None if got is None else len(got), "missing": missing, "extra": extra,
                "near_tie": near_tie, "tie_swap": tie_swap,
                "agree": got is not None and (sorted(got) == expected[g] or tie_swap), "error": error,
            })  # fmt: skip
            row = layer * shape.kv_heads + g
            lib, own = set(expected[g]), set(got or [])
            for p in lib | own:
                kept_map[row, p] = 1 if (p in lib and p in own) else (2 if p in lib else 3)
    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.25 * shape.layers * shape.kv_heads))
    cmap = ListedColormap(["#f2f2f2", "tab:green", "tab:blue", "tab:red"])
    ax.imshow(kept_map, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=3)
    ax.set_yticks(range(shape.layers * shape.kv_heads))
    ax.set_yticklabels([f"L{l} KV{g}" for l in range(shape.layers) for g in range(shape.kv_heads)], fontsize=7)
    ax.axvline(n - cfg.window - 0.5, color="black", linewidth=0.8)
    ax.set_xlabel(f"prompt position (the window starts at {n - cfg.window})")
    ax.set_title(f"kept positions, B = {cfg.budget}, w = {cfg.window}: both green, library only blue, yours only red",
                 fontsize=10)
    fig.tight_layout()
    swaps = int(table["tie_swap"].sum())
    note = (
        f"{swaps} head(s) kept a different position than the library at a tie (scores within 1e-5 of each other): "
        "float rounding decides those, so they count as agreeing." if swaps else ""
    )
    return RunComparison("snapkv_selection", table, fig, note)


# --------------------------------------------------------------------------------------- ANLS


def anls_on_run(fn: Callable[..., Any], cfg: AnlsRunConfig) -> RunComparison:
    """``fn(prediction, answers)`` on every prediction step 05 scored with ANLS, beside the score
    it recorded (``predictions.jsonl``, docs/method.md §6).

    Table: benchmark, method, budget, sample_id, prediction, answers, anls (recorded), yours,
    agree, error. Figure: mean ANLS against budget per method, computed with your function
    (dots) and recorded by step 05 (lines): your own version of the paper's figure.
    """
    records, _ = read_predictions(step05.PREDICTIONS.require(cfg.run_dir))
    scored = [r for r in records if "anls" in (r.get("scores") or {})]
    if not scored:
        raise ExerciseRunError("step 05 scored no prediction with ANLS in this run (no DocVQA-like benchmark was evaluated)")
    if cfg.max_predictions is not None:
        scored = scored[: cfg.max_predictions]
    rows = []
    for r in scored:
        got, error = _call(fn, r["prediction"], list(r["answers"]))
        expected = float(r["scores"]["anls"])
        ok = not error and isinstance(got, (int, float, np.floating)) and abs(float(got) - expected) <= 1e-9
        rows.append({
            "benchmark": r["benchmark"], "method": r["method"], "budget": r["budget"], "sample_id": r["sample_id"],
            "prediction": r["prediction"], "answers": r["answers"], "anls": expected,
            "yours": float(got) if not error and isinstance(got, (int, float, np.floating)) else None,
            "agree": bool(ok), "error": error,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    means = (
        table.assign(budget=table["budget"].fillna(-1))
        .groupby(["method", "budget"], as_index=False)[["anls", "yours"]]
        .mean()
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = means[means["budget"] >= 0]
    for i, (method, part) in enumerate(finite.groupby("method")):
        color = f"C{i % 10}"
        ax.plot(part["budget"], part["anls"], color=color, label=f"{method} (step 05)")
        ax.plot(part["budget"], part["yours"], "o", color=color, markerfacecolor="none")
    for i, (_, row) in enumerate(means[means["budget"] < 0].iterrows()):
        ax.axhline(row["anls"], color="grey", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[0], row["anls"], f" {row['method']}", va="bottom", fontsize=8)
    if len(finite):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("budget B (tokens per KV head)")
    ax.set_ylabel("mean ANLS")
    ax.set_title("ANLS against budget: lines recorded by step 05, circles your function", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return RunComparison("anls", table, fig)
