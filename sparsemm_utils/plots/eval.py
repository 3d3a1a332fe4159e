"""Figures of step 05: accuracy against KV budget, like the paper's main figure (docs/method.md §6).

:func:`plot_accuracy_vs_budget` draws one panel per benchmark and one line per method (budget on
a log2 axis); methods without a budget (FullKV, head masks) are horizontal lines; the paper's
numbers (:mod:`sparsemm_utils.reference_numbers`), when given, are hollow markers joined by a
dotted line in the method's colour. :func:`plot_accuracy_by_group` splits one benchmark's
accuracy by a per-sample field (the offline benchmark's task, OCRBench's category, ...).
Colours and line styles are the study's (:mod:`sparsemm_utils.plots.style`); legend labels are
the methods' (:data:`~sparsemm_utils.evaluation.EVAL_METHODS`) unless ``labels`` gives measured
ones (e.g. how many times the budget's KV bytes FastV stored).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..benchmarks import EvalSample, get_benchmark
from ..evaluation import EVAL_METHODS, UnknownMethodError, get_method, is_random_mask
from .style import method_color, method_style

__all__ = [
    "plot_benchmark_samples",
    "plot_accuracy_vs_budget",
    "plot_accuracy_vs_kv_share",
    "plot_paired_differences",
    "plot_accuracy_by_group",
]

def _label(method: str, labels: Mapping[str, str] | None = None) -> str:
    if labels and method in labels:
        return labels[method]
    try:
        return get_method(method).label
    except UnknownMethodError:
        return method


def _check(results: pd.DataFrame) -> None:
    missing = {"benchmark", "method", "budget", "metric", "score"} - set(results.columns)
    if missing:
        raise ValueError(f"results lacks columns {sorted(missing)}; pass step 05's results.csv frame (read_results)")
    if results.empty:
        raise ValueError("results is empty: run the sweep first")


def _method_style(method: str) -> tuple[tuple[float, float, float], dict]:
    """The method's colour and line style (grey, plain line for a method not in the tables)."""
    return method_color(method), method_style(method)


def _benchmark_panels(n: int, ncols: int) -> tuple[Figure, np.ndarray]:
    """A grid of ``n`` panels, ``ncols`` per row at most (axes as a 2-D array)."""
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    return plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)


def _finish_panels(fig: Figure, axes: np.ndarray, used: int, handles: Mapping[str, object], title: str | None) -> Figure:
    """Hide the unused panels, put one legend above them all, the title above that."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(5, len(handles)), frameon=False, bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, y=1.06)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def plot_benchmark_samples(samples: Mapping[str, Sequence[EvalSample]], *, per_benchmark: int = 2, width: int = 48) -> Figure:
    """The first ``per_benchmark`` samples of each benchmark: the image, the text the model is
    given (wrapped at ``width`` characters, cut after 6 lines) and the ground truths."""
    names = [n for n, s in samples.items() if len(s)]
    if not names:
        raise ValueError("no benchmark with samples to show")
    ncols = max(1, min(per_benchmark, max(len(samples[n]) for n in names)))
    fig, axes = plt.subplots(len(names), ncols, figsize=(4.2 * ncols, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        spec = get_benchmark(name)
        for j, ax in enumerate(row):
            ax.axis("off")
            if j >= len(samples[name]):
                continue
            sample = samples[name][j]
            ax.imshow(sample.image)
            lines = [w for part in sample.question.split("\n") for w in (textwrap.wrap(part, width) or [""])]
            text = "\n".join(lines[:6] + (["..."] if len(lines) > 6 else []))
            answers = ", ".join(repr(a) for a in dict.fromkeys(sample.answers))
            ax.set_title(f"{spec.title} #{sample.sample_id}", fontsize=9)
            ax.text(0, -0.04, f"{text}\nanswers: {textwrap.shorten(answers, width + 20)}", transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    fig.tight_layout(h_pad=6)
    return fig


def plot_accuracy_vs_budget(
    results: pd.DataFrame,
    *,
    reference: pd.DataFrame | None = None,
    benchmarks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    ncols: int = 3,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Accuracy (each benchmark's headline metric) against budget.

    Args:
        results: step 05's ``results.csv`` frame (:func:`~sparsemm_utils.evaluation.read_results`).
        reference: the paper's numbers for this model
            (:func:`~sparsemm_utils.reference_numbers.reference_frame`), or None.
        benchmarks / methods: which to draw (default: all in ``results``, registry order for methods).
        ncols: panels per row.
        labels: {method: legend label} replacing the registry's labels (e.g.
            :func:`sparsemm_utils.steps.eval.method_labels`: FastV's measured KV bytes).
    """
    _check(results)
    results, labels = _pool_random_masks(results, labels)
    benchmarks = list(benchmarks or dict.fromkeys(results["benchmark"]))
    present = set(results["method"])
    methods = list(methods or [m for m in EVAL_METHODS if m in present] + sorted(present - set(EVAL_METHODS)))
    fig, axes = _benchmark_panels(len(benchmarks), ncols)
    handles: dict[str, object] = {}
    paper_handle = None
    for ax, name in zip(axes.flat, benchmarks):
        spec = get_benchmark(name)
        sub = results[(results["benchmark"] == spec.name) & (results["metric"] == spec.metric)]
        budgets = sorted(int(b) for b in sub["budget"].dropna().unique())
        ref = None
        if reference is not None and not reference.empty:
            ref = reference[reference["benchmark"] == spec.name]
            budgets = sorted(set(budgets) | {int(b) for b in ref["budget"].dropna()})
        span = (min(budgets) / 1.3, max(budgets) * 1.3) if budgets else (1, 2)
        for method in methods:
            color, style = _method_style(method)
            rows = sub[sub["method"] == method]
            if not rows.empty:
                bands = {"ci_low", "ci_high"} <= set(rows.columns) and rows[["ci_low", "ci_high"]].notna().all().all()
                if rows["budget"].isna().all():
                    score = float(rows["score"].iloc[0])
                    line = ax.hlines(score, *span, color=color, linestyles=style["linestyle"], linewidth=style["linewidth"])
                    if bands:
                        ax.axhspan(float(rows["ci_low"].iloc[0]), float(rows["ci_high"].iloc[0]), color=color, alpha=0.07, linewidth=0)
                else:
                    rows = rows.dropna(subset=["budget"]).sort_values("budget")
                    (line,) = ax.plot(rows["budget"].astype(int), rows["score"], color=color, **style)
                    if bands:
                        ax.fill_between(rows["budget"].astype(int), rows["ci_low"], rows["ci_high"], color=color, alpha=0.12, linewidth=0)
                handles.setdefault(_label(method, labels), line)
            if ref is not None:
                pts = ref[ref["method"] == method]
                if pts.empty:
                    continue
                if pts["budget"].isna().all():
                    ax.hlines(float(pts["score"].iloc[0]), *span, color=color, linestyles=(0, (1, 3)), linewidth=1.2, alpha=0.8)
                else:
                    pts = pts.dropna(subset=["budget"]).sort_values("budget")
                    (pline,) = ax.plot(
                        pts["budget"].astype(int), pts["score"], color=color, linestyle=(0, (1, 2)), marker="D",
                        markerfacecolor="none", markersize=6, linewidth=1.2, alpha=0.9,
                    )
                    paper_handle = pline
        ax.set_xscale("log", base=2)
        if budgets:
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets], rotation=45 if len(budgets) > 6 else 0)
            ax.set_xlim(*span)
        ax.set_title(spec.title)
        ax.set_xlabel("KV budget B per head (window included)")
        ax.set_ylabel(spec.metric)
        ax.grid(True, alpha=0.3)
    if paper_handle is not None:
        handles["paper (hollow, dotted)"] = paper_handle
    return _finish_panels(fig, axes, len(benchmarks), handles, title)


def _pool_random_masks(results: pd.DataFrame, labels: Mapping[str, str] | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Random-mask draws (``mask_random_<k>``) drawn as one line: their mean score (the band
    spans the draws' lowest and highest score), labelled with the number of draws."""
    labels = dict(labels or {})
    draws = results[results["method"].map(is_random_mask)]
    if draws["method"].nunique() <= 1:
        return results, labels
    keys = ["model", "benchmark", "metric"]
    pooled = draws.groupby(keys, sort=False).agg(score=("score", "mean"), ci_low=("score", "min"), ci_high=("score", "max"), n_samples=("n_samples", "first")).reset_index()
    pooled["method"], pooled["budget"] = "mask_random", pd.array([pd.NA] * len(pooled), dtype="Int64")
    labels["mask_random"] = f"Mask random heads (mean of {draws['method'].nunique()} draws; band: their range)"
    rest = results[~results["method"].map(is_random_mask)]
    return pd.concat([rest, pooled[[c for c in results.columns if c in pooled.columns]]], ignore_index=True), labels


def plot_paired_differences(results: pd.DataFrame, *, ncols: int = 3, title: str | None = None) -> Figure:
    """SparseMM minus each budgeted method at every budget (each benchmark's headline metric), with
    the paired bootstrap 95% interval of the difference (``results.csv``'s
    ``sparsemm_minus_method``, ``diff_ci_low``, ``diff_ci_high``): above the zero line SparseMM is
    ahead on the same questions."""
    _check(results)
    frame = results.dropna(subset=["sparsemm_minus_method"]) if "sparsemm_minus_method" in results.columns else results.iloc[0:0]
    frame = frame[[get_benchmark(b).metric == m for b, m in zip(frame["benchmark"], frame["metric"])]]
    if frame.empty:
        raise ValueError("results hold no paired differences: the sweep needs SparseMM and another budgeted method at the same budgets")
    benchmarks = list(dict.fromkeys(frame["benchmark"]))
    fig, axes = _benchmark_panels(len(benchmarks), ncols)
    handles: dict[str, object] = {}
    methods = [m for m in EVAL_METHODS if m in set(frame["method"])]
    for ax, name in zip(axes.flat, benchmarks):
        spec = get_benchmark(name)
        sub = frame[frame["benchmark"] == name]
        offsets = np.linspace(-0.06, 0.06, max(len(methods), 1))
        for offset, method in zip(offsets, methods):
            rows = sub[sub["method"] == method].sort_values("budget")
            if rows.empty:
                continue
            color, style = _method_style(method)
            x = rows["budget"].astype(int).to_numpy() * 2**offset
            y = rows["sparsemm_minus_method"].to_numpy()
            err = np.vstack([y - rows["diff_ci_low"].to_numpy(), rows["diff_ci_high"].to_numpy() - y])
            line = ax.errorbar(x, y, yerr=err, color=color, marker=style.get("marker") or "o", linestyle="-", linewidth=1.2, capsize=3)
            handles.setdefault(f"SparseMM - {_label(method)}", line)
        ax.axhline(0.0, color="0.3", linewidth=0.9)
        budgets = sorted(int(b) for b in sub["budget"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_title(f"{spec.title} (n = {int(sub['n_samples'].iloc[0])})")
        ax.set_xlabel("KV budget B per head (window included)")
        ax.set_ylabel(f"SparseMM - method, {spec.metric} (95% CI)")
        ax.grid(True, alpha=0.3)
    return _finish_panels(fig, axes, len(benchmarks), handles, title)


def plot_accuracy_vs_kv_share(
    results: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    ncols: int = 3,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Accuracy (each benchmark's headline metric) against the KV bytes each cell really stored,
    as a share of FullKV's: the comparison at equal KV bytes, whatever a method's budget means.

    Args:
        results: step 05's ``results.csv`` frame (:func:`~sparsemm_utils.evaluation.read_results`).
        stats: :func:`~sparsemm_utils.steps.eval.cell_statistics` of the same sweep (``kv_share``
            per benchmark, method and budget; needs a FullKV cell per benchmark).
        labels: {method: legend label} replacing the registry's labels.
    """
    _check(results)
    missing = {"benchmark", "method", "budget", "kv_share"} - set(stats.columns)
    if missing:
        raise ValueError(f"stats lacks columns {sorted(missing)}; pass cell_statistics(predictions_frame(...))")
    keys = ["benchmark", "method", "budget"]
    frame = results.merge(stats[keys + ["kv_share"]].astype({"budget": results["budget"].dtype}), on=keys, how="left")
    frame = frame[[get_benchmark(b).metric == m for b, m in zip(frame["benchmark"], frame["metric"])]]
    if frame["kv_share"].isna().all():
        raise ValueError("no cell has a kv_share: run the sweep with a FullKV cell per benchmark")
    benchmarks = list(dict.fromkeys(frame["benchmark"]))
    present = set(frame["method"])
    methods = [m for m in EVAL_METHODS if m in present] + sorted(present - set(EVAL_METHODS))
    fig, axes = _benchmark_panels(len(benchmarks), ncols)
    handles: dict[str, object] = {}
    for ax, name in zip(axes.flat, benchmarks):
        spec = get_benchmark(name)
        sub = frame[frame["benchmark"] == name].dropna(subset=["kv_share"])
        for method in methods:
            rows = sub[sub["method"] == method].sort_values("kv_share")
            if rows.empty:
                continue
            color, style = _method_style(method)
            style["marker"] = style.get("marker") or "o"
            (line,) = ax.plot(rows["kv_share"], rows["score"], color=color, **style)
            handles.setdefault(_label(method, labels), line)
        ax.set_xlim(0, 1.05)
        ax.set_title(spec.title)
        ax.set_xlabel("KV bytes stored / FullKV's (measured)")
        ax.set_ylabel(spec.metric)
        ax.grid(True, alpha=0.3)
    return _finish_panels(fig, axes, len(benchmarks), handles, title)


def plot_accuracy_by_group(
    predictions: pd.DataFrame,
    benchmark: str,
    *,
    group: str,
    metric: str | None = None,
    methods: Sequence[str] | None = None,
) -> Figure:
    """One benchmark's accuracy against budget, one panel per value of the per-sample field
    ``group`` (e.g. the offline benchmark's ``task``: ocr / line / value), one line per method.

    ``predictions``: :func:`~sparsemm_utils.evaluation.predictions_frame` of ``predictions.jsonl``
    (one row per cell and sample, a ``score_<metric>`` column per metric and the sample's fields)."""
    spec = get_benchmark(benchmark)
    metric = metric or spec.metric
    column = f"score_{metric}"
    frame = predictions[predictions["benchmark"] == spec.name]
    for needed in (column, group):
        if needed not in frame.columns:
            raise ValueError(f"predictions of {spec.name!r} have no column {needed!r}; columns: {sorted(frame.columns)}")
    if frame.empty:
        raise ValueError(f"no predictions for benchmark {spec.name!r}")
    groups = sorted(frame[group].dropna().unique(), key=str)
    present = set(frame["method"])
    methods = list(methods or [m for m in EVAL_METHODS if m in present])
    means = frame.groupby(["method", "budget", group], dropna=False)[column].mean().reset_index()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups), 3.4), squeeze=False, sharey=True)
    budgets = sorted(int(b) for b in frame["budget"].dropna().unique())
    span = (min(budgets) / 1.3, max(budgets) * 1.3) if budgets else (1, 2)
    for ax, value in zip(axes.flat, groups):
        part = means[means[group] == value]
        for method in methods:
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            color, style = _method_style(method)
            if rows["budget"].isna().all():
                ax.hlines(float(rows[column].iloc[0]), *span, color=color, linestyles=style["linestyle"], linewidth=style["linewidth"], label=_label(method))
            else:
                rows = rows.dropna(subset=["budget"]).sort_values("budget")
                ax.plot(rows["budget"].astype(int), rows[column], color=color, label=_label(method), **style)
        n = int((frame[group] == value).sum() / max(1, frame.groupby(["method", "budget"], dropna=False).ngroups))
        ax.set_title(f"{group} = {value} ({n} questions)")
        ax.set_xscale("log", base=2)
        if budgets:
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_xlim(*span)
        ax.set_xlabel("KV budget B")
        ax.grid(True, alpha=0.3)
    axes.flat[0].set_ylabel(metric)
    axes.flat[-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{spec.title}: {metric} by {group}")
    fig.tight_layout()
    return fig
