"""Figures and tables of step 06: decode latency, peak memory and KV bytes against context
(docs/method.md §7), with the paper's numbers beside ours.

:func:`plot_efficiency` draws one row of four panels per model: mean decode latency, peak memory,
the speed-up FullKV / method (and, dotted, FullKV on a preallocated ``StaticCache`` / method when
the run times ``fullkv_static``), and KV bytes (measured markers on the analytic line, plus the
analytic bytes of the FULL-depth real shape, dashed). The paper's absolute numbers (GPU, full
depth, bf16) are drawn on the latency and memory panels only for rows measured the same way
(full depth on a GPU); its speed-up, a ratio, is drawn on the speed-up panel always, labelled as
the paper's GPU figure. Latency, memory and speed-up are drawn from 0, so a ratio of 1.1x looks
like one. :func:`efficiency_table` is the same content as a table.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..efficiency import BASELINES, RESULT_COLUMNS, STATIC_FULLKV, comparable_to_paper
from ..paper_efficiency import (
    PAPER_CONTEXT,
    PAPER_SPARSEMM_FLAT_MS,
    paper_efficiency_frame,
    paper_speedup,
)
from .style import METHOD_COLORS, cmap_for, method_color, method_style

__all__ = ["plot_efficiency", "plot_head_lengths", "efficiency_table"]

_GIB = float(2**30)


def _check(results: pd.DataFrame) -> None:
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results lacks columns {missing}; pass step 06's results.csv frame (efficiency.load_results)")
    if results.empty:
        raise ValueError("results is empty: run the measurements first (efficiency.run_efficiency)")


def _context_label(n: int) -> str:
    """2048 -> "2K", 1536 -> "1.5K", 96 -> "96"."""
    if n < 1024:
        return str(n)
    return f"{n / 1024:g}K"


def _methods(results: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(results["method"]))
    return [m for m in METHOD_COLORS if m in present] + [m for m in present if m not in METHOD_COLORS]


def _style(method: str) -> dict:
    style = method_style(method)
    if style.get("marker") is None:
        style["marker"] = "s"
    return {"color": method_color(method), **style}


def plot_efficiency(
    results: pd.DataFrame,
    *,
    analytic: pd.DataFrame | None = None,
    models: Sequence[str] | None = None,
    paper: bool = True,
) -> Figure:
    """Latency, memory, speed-up and KV bytes against context, one row of panels per model.

    Args:
        results: step 06's ``results.csv`` frame (:func:`~sparsemm_utils.efficiency.load_results`).
        analytic: ``analytic_kv.csv`` (full-depth analytic KV bytes), drawn dashed on the KV panel.
        models: hub ids to draw (default: all, in order of appearance).
        paper: overlay the paper's numbers (docs/method.md §7) where they are comparable (see module doc).
    """
    _check(results)
    models = list(models or dict.fromkeys(results["model"]))
    methods = _methods(results)
    fig, axes = plt.subplots(len(models), 4, figsize=(18, 3.9 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        rows = results[results["model"] == model].sort_values("context_len")
        if rows.empty:
            raise ValueError(f"no rows for model {model!r}; models present: {sorted(set(results['model']))}")
        ax_ms, ax_mem, ax_speed, ax_kv = row_axes
        shape = rows["shape"].iloc[0] if "shape" in rows else model
        depth = f"{int(rows['layers'].iloc[0])}/{int(rows['full_layers'].iloc[0])} layers" if "layers" in rows else ""
        dtype = rows["dtype"].iloc[0] if "dtype" in rows else ""
        device = str(rows["device"].iloc[0]).split(" (")[0]
        comparable = paper and comparable_to_paper(rows)
        ref = paper_efficiency_frame(model) if paper else pd.DataFrame()
        full = rows[rows["method"] == "fullkv"].set_index("context_len")["decode_ms_per_token"]
        static = rows[rows["method"] == STATIC_FULLKV].set_index("context_len")["decode_ms_per_token"]
        for method in methods:
            sub = rows[rows["method"] == method]
            if sub.empty:
                continue
            style = _style(method)
            x = sub["context_len"].to_numpy()
            ax_ms.plot(x, sub["decode_ms_per_token"], label=method, **style)
            ax_mem.plot(x, sub["peak_mem_bytes"] / _GIB, label=method, **style)
            ax_kv.plot(x, sub["kv_bytes"].astype(float) / 2**20, label=f"{method} measured", linestyle="none",
                       marker=style["marker"], color=style["color"], markersize=7)
            if "kv_bytes_analytic" in sub and sub["kv_bytes_analytic"].notna().any():
                ax_kv.plot(x, sub["kv_bytes_analytic"].astype(float) / 2**20, color=style["color"], linewidth=1.0,
                           label=f"{method} analytic ({depth})")
            if method != "fullkv" and not full.empty:
                common = [n for n in x if n in full.index]
                ms = sub.set_index("context_len")["decode_ms_per_token"]
                ax_speed.plot(common, [full[n] / ms[n] for n in common], label=f"FullKV / {method}", **style)
            if method not in BASELINES and not static.empty:  # the fair baseline: a preallocated cache
                common = [n for n in x if n in static.index]
                ms = sub.set_index("context_len")["decode_ms_per_token"]
                ax_speed.plot(common, [static[n] / ms[n] for n in common], label=f"FullKV (StaticCache) / {method}",
                              **{**style, "linestyle": ":", "alpha": 0.8})
            if analytic is not None and not analytic.empty:
                a = analytic[(analytic["model"] == model) & (analytic["method"] == method)].dropna(subset=["kv_bytes"])
                if not a.empty:
                    ax_kv.plot(a["context_len"], a["kv_bytes"].astype(float) / 2**20, color=style["color"], linestyle="--",
                               linewidth=1.0, alpha=0.7, label=f"{method} analytic, full depth {a['dtype'].iloc[0]}")
        if comparable and not ref.empty:
            for r in ref.itertuples(index=False):
                color = method_color(r.method)
                ax_ms.plot([r.context_len], [r.decode_ms_per_token], marker="D", markersize=9, markerfacecolor="none",
                           markeredgecolor=color, linestyle="none", label=f"paper {r.method}")
                ax_mem.plot([r.context_len], [r.peak_mem_bytes / _GIB], marker="D", markersize=9, markerfacecolor="none",
                            markeredgecolor=color, linestyle="none", label=f"paper {r.method}")
            ax_ms.axhspan(*PAPER_SPARSEMM_FLAT_MS, color=METHOD_COLORS["sparsemm"], alpha=0.08,
                          label="paper: SparseMM 2K-32K")
        elif paper and not ref.empty:
            ax_ms.text(0.02, 0.97, "paper's ms: GPU, full depth\n(not comparable; see speed-up)", transform=ax_ms.transAxes,
                       va="top", fontsize=7, color="0.35")
        speedup = paper_speedup(model) if paper else None
        if speedup is not None:
            ax_speed.plot([PAPER_CONTEXT], [speedup], marker="D", markersize=9, markerfacecolor="none",
                          markeredgecolor=METHOD_COLORS["sparsemm"], linestyle="none",
                          label=f"paper SparseMM at 32K, GPU ({speedup:.2f}x)")
        ax_speed.axhline(1.0, color="0.6", linewidth=0.8)
        contexts = sorted(set(rows["context_len"].astype(int)))
        title = f"{shape} ({depth}, {dtype}, {device})"
        for ax, ylabel in ((ax_ms, "decode ms / token (mean)"), (ax_mem, "peak memory (GiB)"),
                           (ax_speed, "speed-up FullKV / method"), (ax_kv, "KV cache after prefill (MiB)")):
            ax.set_xscale("log", base=2)
            ticks = contexts + ([PAPER_CONTEXT] if ax is ax_speed and speedup is not None and PAPER_CONTEXT not in contexts else [])
            ax.set_xticks(ticks, [_context_label(n) for n in ticks])
            ax.minorticks_off()
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="best")
        for ax in (ax_ms, ax_mem, ax_speed):  # from 0: the heights compare as the numbers do
            ax.set_ylim(bottom=0)
        ax_kv.set_yscale("log")
        ax_kv.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_ms.set_title(title, fontsize=9, loc="left")
        ax_mem.set_title(f"peak: {rows['peak_mem_kind'].iloc[0]}" if "peak_mem_kind" in rows else "peak", fontsize=9)
    fig.tight_layout()
    return fig


def plot_head_lengths(stored: np.ndarray, *, budget: int, title: str = "") -> Figure:
    """What each KV head stores, the layout a decode step must read (docs/method.md §5 and §7).

    Left: tokens stored per (layer, KV head), ``stored`` int (layers, kv_heads). Right: the same
    sorted, with the mean (about B when nothing saturates), the longest head, and what a padded
    layout would read per layer (H_kv x the layer's longest head) against what a variable-length
    kernel reads (the sum of the lengths)."""
    stored = np.asarray(stored)
    if stored.ndim != 2 or stored.size == 0:
        raise ValueError(f"stored must be a non-empty (layers, kv_heads) array, got shape {stored.shape}")
    layers, kv_heads = stored.shape
    fig, (ax_map, ax_sorted) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
    image = ax_map.imshow(stored.T, aspect="auto", cmap=cmap_for("kv_tokens"), origin="lower", interpolation="nearest")
    fig.colorbar(image, ax=ax_map, label="tokens stored")
    ax_map.set_xlabel("layer")
    ax_map.set_ylabel("KV head")
    ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set_title(title or f"tokens stored per KV head ({layers} layers x {kv_heads} KV heads)", fontsize=9, loc="left")
    flat = np.sort(stored.ravel())[::-1]
    ax_sorted.bar(np.arange(flat.size), flat, width=1.0, color=METHOD_COLORS["sparsemm"], alpha=0.8)
    ax_sorted.axhline(flat.mean(), color="0.2", linestyle="--", linewidth=1, label=f"mean {flat.mean():.0f} (B = {budget})")
    ax_sorted.axhline(flat.max(), color="0.5", linestyle=":", linewidth=1, label=f"longest head {flat.max()}")
    padded = int((stored.max(axis=1) * kv_heads).sum())
    ax_sorted.set_yscale("log")
    ax_sorted.set_xlabel("KV heads, longest first")
    ax_sorted.set_ylabel("tokens stored")
    ax_sorted.set_title(
        f"a step reads {int(stored.sum()):,} rows (varlen) vs {padded:,} (padded: {padded / stored.sum():.1f}x)",
        fontsize=9, loc="left",
    )
    ax_sorted.legend(fontsize=8)
    fig.tight_layout()
    return fig


def efficiency_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, context): decode ms, speed-up over FullKV (DynamicCache) at that
    context, and over FullKV on a StaticCache (``speedup_static``, when the run has it), peak
    GiB, KV MiB, whether KV bytes equal the analytic value, and the paper's numbers at 32K (decode
    ms, peak GiB read as 2^30 bytes, speed-up) where it reports the model and method."""
    _check(results)
    out = results.copy()
    keys = list(zip(out["model"], out["context_len"]))
    for column, baseline in (("speedup", "fullkv"), ("speedup_static", STATIC_FULLKV)):
        base = out[out["method"] == baseline].set_index(["model", "context_len"])["decode_ms_per_token"]
        out[column] = [base.get(k, np.nan) / ms for k, ms in zip(keys, out["decode_ms_per_token"])]
    out["peak_GiB"] = out["peak_mem_bytes"] / _GIB
    out["kv_MiB"] = out["kv_bytes"].astype(float) / 2**20
    if "kv_bytes_analytic" in out:
        out["kv_equals_analytic"] = [
            None if pd.isna(a) else bool(k == a) for k, a in zip(out["kv_bytes"], out["kv_bytes_analytic"])
        ]
    ref = pd.concat([paper_efficiency_frame(m) for m in dict.fromkeys(out["model"])], ignore_index=True)
    paper_ms, paper_gib, paper_speed = [], [], []
    for r in out.itertuples(index=False):
        hit = ref[(ref["model"] == r.model) & (ref["method"] == r.method) & (ref["context_len"] == r.context_len)] if not ref.empty else ref
        paper_ms.append(float(hit["decode_ms_per_token"].iloc[0]) if len(hit) else np.nan)
        paper_gib.append(float(hit["peak_mem_bytes"].iloc[0]) / _GIB if len(hit) else np.nan)
        speed = paper_speedup(r.model) if r.method == "sparsemm" and r.context_len == PAPER_CONTEXT else None
        paper_speed.append(np.nan if speed is None else speed)
    out["paper_decode_ms"] = paper_ms
    out["paper_peak_GiB"] = paper_gib
    out["paper_speedup"] = paper_speed
    columns = ["model", "method", "context_len", "budget", "decode_ms_per_token", "speedup"]
    columns += ["speedup_static"] if out["speedup_static"].notna().any() else []
    columns += ["peak_GiB", "kv_MiB"]
    columns += ["kv_equals_analytic"] if "kv_equals_analytic" in out else []
    columns += ["paper_decode_ms", "paper_peak_GiB", "paper_speedup", "device"]
    return out[columns].reset_index(drop=True)
