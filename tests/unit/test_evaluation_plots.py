"""Step 05's figures: one panel per benchmark, one line per method, the paper's points beside."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from sparsemm_utils.evaluation import LEGACY_RESULTS_COLUMNS, RESULTS_COLUMNS
from sparsemm_utils.plots.eval import (
    plot_accuracy_by_group,
    plot_accuracy_vs_budget,
    plot_accuracy_vs_kv_share,
)
from sparsemm_utils.plots.style import METHOD_COLORS
from sparsemm_utils.reference_numbers import reference_frame

MODEL = "Qwen/Qwen2-VL-7B-Instruct"


def _results() -> pd.DataFrame:
    rows = [(MODEL, "docvqa", "fullkv", None, "anls", 0.93, 10)]
    for bench, metric in (("docvqa", "anls"), ("textvqa", "vqa_accuracy")):
        for method, base in (("sparsemm", 0.8), ("snapkv", 0.6)):
            for i, budget in enumerate((64, 128, 256)):
                rows.append((MODEL, bench, method, budget, metric, base + 0.05 * i, 10))
    frame = pd.DataFrame(rows, columns=list(LEGACY_RESULTS_COLUMNS)).reindex(columns=list(RESULTS_COLUMNS))
    frame["budget"] = frame["budget"].astype("Int64")
    return frame


def test_one_panel_per_benchmark_one_line_per_method():
    fig = plot_accuracy_vs_budget(_results())
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["DocVQA", "TextVQA"]
    docvqa = axes[0]
    assert len(docvqa.get_lines()) == 2  # sparsemm, snapkv; fullkv is a horizontal line collection
    assert len(docvqa.collections) == 1
    assert [t.get_text() for t in docvqa.get_xticklabels()] == ["64", "128", "256"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["FullKV", "SparseMM", "SnapKV"]
    assert tuple(docvqa.get_lines()[0].get_color()[:3]) == tuple(METHOD_COLORS["sparsemm"])
    plt.close(fig)


def test_measured_labels_replace_the_registry_labels():
    """FastV's legend says what it stored (steps.eval.method_labels), not that it matched the bytes."""
    fig = plot_accuracy_vs_budget(_results(), labels={"snapkv": "SnapKV (measured)"})
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["FullKV", "SparseMM", "SnapKV (measured)"]
    plt.close(fig)


def test_reference_points_are_drawn_beside():
    fig = plot_accuracy_vs_budget(_results(), reference=reference_frame(MODEL), benchmarks=["docvqa"])
    ax = fig.axes[0]
    # lines: ours sparsemm and snapkv; the paper's sparsemm (64/128/256) and snapkv (64 only).
    # The paper's adakv, pyramidkv and random are not drawn: only the methods shown (those in results).
    assert len(ax.get_lines()) == 4
    assert "paper (hollow, dotted)" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)


def test_accuracy_by_group():
    preds = pd.DataFrame(
        {
            "benchmark": ["reader_docqa"] * 6,
            "method": ["sparsemm"] * 4 + ["fullkv"] * 2,
            "budget": pd.array([16, 16, 32, 32, None, None], dtype="Int64"),
            "task": ["line", "value"] * 3,
            "score_anls": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        }
    )
    fig = plot_accuracy_by_group(preds, "reader_docqa", group="task")
    assert [ax.get_title() for ax in fig.axes] == ["task = line (1 questions)", "task = value (1 questions)"]
    plt.close(fig)
    with pytest.raises(ValueError, match="no column 'category'"):
        plot_accuracy_by_group(preds, "reader_docqa", group="category")


def test_accuracy_against_measured_kv_share():
    """x is each cell's measured KV share (cell_statistics), so methods compare at equal bytes."""
    results = _results()
    stats = pd.DataFrame(
        {
            "benchmark": ["docvqa"] * 7,
            "method": ["fullkv", "sparsemm", "sparsemm", "sparsemm", "snapkv", "snapkv", "snapkv"],
            "budget": [None, 64, 128, 256, 64, 128, 256],
            "kv_share": [1.0, 0.1, 0.2, 0.4, 0.1, 0.2, 0.4],
        }
    )
    fig = plot_accuracy_vs_kv_share(results, stats)
    axes = [ax for ax in fig.axes if ax.axison]
    # textvqa has no kv_share (no statistics for it) but still gets its panel, empty
    assert [ax.get_title() for ax in axes] == ["DocVQA", "TextVQA"]
    lines = {tuple(line.get_color()[:3]): line for line in axes[0].get_lines()}
    fullkv = lines[tuple(METHOD_COLORS["fullkv"])]
    assert list(fullkv.get_xdata()) == [1.0] and list(fullkv.get_ydata()) == [0.93]
    sparse = lines[tuple(METHOD_COLORS["sparsemm"])]
    assert list(sparse.get_xdata()) == [0.1, 0.2, 0.4]
    assert list(sparse.get_ydata()) == pytest.approx([0.8, 0.85, 0.9])
    assert len(axes[1].get_lines()) == 0
    plt.close(fig)
    with pytest.raises(ValueError, match="lacks columns \\['kv_share'\\]"):
        plot_accuracy_vs_kv_share(results, stats.drop(columns=["kv_share"]))
    with pytest.raises(ValueError, match="no cell has a kv_share"):
        plot_accuracy_vs_kv_share(results, stats.assign(kv_share=float("nan")))


def test_empty_or_malformed_results_are_refused():
    with pytest.raises(ValueError, match="empty"):
        plot_accuracy_vs_budget(_results().iloc[0:0])
    with pytest.raises(ValueError, match="lacks columns"):
        plot_accuracy_vs_budget(_results().drop(columns=["metric"]))


def test_benchmark_samples_figure():
    from PIL import Image

    from sparsemm_utils.benchmarks import EvalSample
    from sparsemm_utils.plots.eval import plot_benchmark_samples

    image = Image.new("RGB", (40, 20), "white")
    samples = {"gqa": [EvalSample("1", image, "Is it? " * 40, ("yes",), {})], "docvqa": []}
    fig = plot_benchmark_samples(samples)
    assert [ax.get_title() for ax in fig.axes] == ["GQA (testdev balanced) #1"]
    plt.close(fig)
    with pytest.raises(ValueError, match="no benchmark"):
        plot_benchmark_samples({"gqa": []})
