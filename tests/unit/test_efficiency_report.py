"""Step 06's timer, memory meter, targets, the paper's numbers and the figures (no model built)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sparsemm_utils import efficiency as eff  # noqa: E402
from sparsemm_utils.runs import repo_root  # noqa: E402
from sparsemm_utils.efficiency import (  # noqa: E402
    EXTRA_COLUMNS,
    RESULT_COLUMNS,
    StepTimer,
    comparable_to_paper,
)
from sparsemm_utils.paper_efficiency import (  # noqa: E402
    PAPER_GB_BYTES,
    paper_efficiency_frame,
    paper_speedup,
)
from sparsemm_utils.plots.efficiency import efficiency_table, plot_efficiency  # noqa: E402
from sparsemm_utils.steps.efficiency import efficiency_targets, format_targets  # noqa: E402

VICUNA = "llava-hf/llava-v1.6-vicuna-7b-hf"


# ----------------------------------------------------------------------------------------- timer


def test_step_timer_by_hand(monkeypatch):
    """Clock readings 0 (start), 5 (prefill logits), 6 (leave), 8, 8.5, 11, 11.5: prefill 5 s;
    steps 8 - 6 = 2 and 11 - 8.5 = 2.5. on_first runs between 5 and 6 and is in no interval."""
    clock = iter([0.0, 5.0, 6.0, 8.0, 8.5, 11.0, 11.5])
    monkeypatch.setattr(eff.time, "perf_counter", lambda: next(clock))
    calls = []
    timer = StepTimer(on_first=lambda: calls.append("first"))
    timer.start()
    scores = torch.zeros(1, 4)
    for _ in range(3):
        assert timer(torch.zeros(1, 1, dtype=torch.long), scores) is scores
    assert calls == ["first"]
    assert timer.prefill_s == 5.0
    assert timer.step_seconds() == [2.0, 2.5]


def test_step_timer_needs_a_start():
    with pytest.raises(RuntimeError, match="call start\\(\\) before generate"):
        StepTimer().prefill_s


def test_cpu_peak_memory_sees_a_new_allocation():
    """In a fresh process, as step 06 measures (one process per measurement): a test process that
    already peaked higher (a model loaded earlier in the session) could not show a new peak when
    only the lifetime maximum RSS is readable."""
    code = (
        "import numpy as np, torch\n"
        "from sparsemm_utils.efficiency import PeakMemory\n"
        "meter = PeakMemory(torch.device('cpu'))\n"
        "meter.reset()\n"
        "before = meter.peak()\n"
        "block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched\n"
        "print(meter.kind, before, meter.peak())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root())
    kind, before, after = out.stdout.split()
    assert kind in ("cpu_peak_rss", "cpu_max_rss_lifetime")
    assert int(after) >= int(before) + 250 * 2**20


# --------------------------------------------------------------------------------------- targets


def _rows(model: str, full_ms, sparse_ms, contexts, *, kv_ok=True, device="cpu x", layers=2, full_layers=32):
    rows = []
    for n, f, s in zip(contexts, full_ms, sparse_ms):
        for method, ms, kv in (("fullkv", f, 1000 * n), ("sparsemm", s, 500)):
            row = {c: None for c in RESULT_COLUMNS + EXTRA_COLUMNS}
            row.update(model=model, method=method, context_len=n, budget=None if method == "fullkv" else 256,
                       prefill_s=1.0, decode_ms_per_token=ms, peak_mem_bytes=2**30 * (2 if method == "fullkv" else 1),
                       kv_bytes=kv, kv_bytes_analytic=kv if kv_ok or method == "fullkv" else kv + 1, device=device,
                       shape="s", layers=layers, full_layers=full_layers, dtype="float32", peak_mem_kind="cpu_peak_rss")
            rows.append(row)
    frame = pd.DataFrame(rows)
    for c in ("budget", "kv_bytes", "kv_bytes_analytic"):
        frame[c] = frame[c].astype("Int64")
    return frame


def test_targets_by_hand():
    # SparseMM 40, 42, 45 ms: spread 45 / 40 = 1.125 <= 1.25, flat; FullKV / SparseMM at 32K =
    # 70.9 / 37.9 ... here 90 / 45 = 2.0 >= the paper's 70.9 / 37.9 = 1.871: met
    frame = _rows(VICUNA, [50, 70, 90], [40, 42, 45], [2048, 16384, 32768])
    targets = efficiency_targets(frame).set_index("method")
    sparse = targets.loc["sparsemm"]
    assert sparse["spread"] == pytest.approx(1.125) and sparse["flat"]
    assert sparse["speedup"] == pytest.approx(2.0)
    assert sparse["paper_speedup"] == pytest.approx(70.9 / 37.9)
    assert sparse["speedup_met"] == True and sparse["kv_bytes_match"] == True  # noqa: E712 (numpy bools)
    assert targets.loc["fullkv", "kv_bytes_match"] == True  # noqa: E712
    text = format_targets(efficiency_targets(frame))
    assert "spread over 3 contexts 1.12x (flat, target <= 1.25)" in text
    assert "2.00x (paper 1.87x: met)" in text


def test_targets_that_fail_are_reported_as_failed():
    # 30 / 20 = 1.5 spread: not flat; 40 / 30 = 1.33 < 1.871: not met; a KV mismatch
    frame = _rows(VICUNA, [25, 40], [20, 30], [2048, 32768], kv_ok=False)
    sparse = efficiency_targets(frame).set_index("method").loc["sparsemm"]
    assert sparse["flat"] == False and sparse["speedup_met"] == False and sparse["kv_bytes_match"] == False  # noqa: E712
    assert "NOT flat" in format_targets(efficiency_targets(frame)) and "NOT met" in format_targets(efficiency_targets(frame))
    # no paper value below 32K or for a model the paper does not report
    short = efficiency_targets(_rows(VICUNA, [25, 40], [20, 30], [1024, 2048])).set_index("method").loc["sparsemm"]
    assert short["paper_speedup"] is None and short["speedup_met"] is None


# ----------------------------------------------------------------------------------------- paper


def test_paper_numbers_of_spec_section_7():
    frame = paper_efficiency_frame()
    assert len(frame) == 6 and set(frame["context_len"]) == {32768} and set(frame["budget"]) == {256}
    vicuna = paper_efficiency_frame("llava-next-vicuna-7b").set_index("method")
    assert vicuna.loc["fullkv", "decode_ms_per_token"] == 70.9 and vicuna.loc["sparsemm", "peak_mem_gb"] == 17.4
    assert vicuna.loc["fullkv", "peak_mem_bytes"] == 32.9 * 2**30 == 32.9 * PAPER_GB_BYTES
    assert paper_speedup("llava-next-vicuna-7b") == pytest.approx(1.87, abs=0.005)  # the paper's 1.87x
    assert paper_speedup("Qwen/Qwen2-VL-7B-Instruct") == pytest.approx(1.60, abs=0.005)  # 59.2 / 37.1
    assert paper_speedup("llava-next-mistral-7b") == pytest.approx(1.68, abs=0.005)  # 75.8 / 45.2
    assert paper_speedup("qwen2-vl-2b") is None and paper_efficiency_frame("qwen2-vl-2b").empty


# --------------------------------------------------------------------------------------- figures


def test_figure_overlays_the_papers_absolute_numbers_only_when_comparable():
    cpu = _rows(VICUNA, [50, 90], [40, 45], [2048, 32768])
    assert not comparable_to_paper(cpu)
    fig = plot_efficiency(cpu)
    assert len(fig.axes) == 4
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert any("not comparable" in t for t in labels)
    speed_labels = fig.axes[2].get_legend_handles_labels()[1]
    assert any("paper SparseMM at 32K" in label for label in speed_labels)
    gpu = _rows(VICUNA, [50, 70.9], [37, 37.9], [2048, 32768], device="cuda:0 H100", layers=32, full_layers=32)
    assert comparable_to_paper(gpu)
    fig = plot_efficiency(gpu)
    assert "paper sparsemm" in fig.axes[0].get_legend_handles_labels()[1]
    two = pd.concat([gpu, _rows("Qwen/Qwen2-VL-2B-Instruct", [5, 6], [4, 4], [2048, 32768])], ignore_index=True)
    assert len(plot_efficiency(two).axes) == 8


def test_latency_memory_and_speedup_axes_start_at_zero():
    """A speed-up of 1.13x must not fill the panel: the three ratio-scale panels start at 0."""
    fig = plot_efficiency(_rows("Qwen/Qwen2-VL-2B-Instruct", [40, 45], [39, 40], [1024, 2048]))
    assert [fig.axes[i].get_ylim()[0] for i in range(3)] == [0, 0, 0]
    assert fig.axes[2].get_ylim()[1] >= 45 / 40  # the speed-up still fits


def test_table_puts_the_paper_beside_ours():
    table = efficiency_table(_rows(VICUNA, [50, 90], [40, 45], [2048, 32768]))
    row = table[(table["method"] == "sparsemm") & (table["context_len"] == 32768)].iloc[0]
    assert row["speedup"] == pytest.approx(2.0) and row["paper_decode_ms"] == 37.9
    assert row["paper_peak_GiB"] == pytest.approx(17.4) and row["paper_speedup"] == pytest.approx(70.9 / 37.9)
    assert table[table["context_len"] == 2048]["paper_decode_ms"].isna().all()
    assert bool(row["kv_equals_analytic"])


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="lacks columns"):
        plot_efficiency(pd.DataFrame({"model": ["x"]}))
    with pytest.raises(ValueError, match="results is empty"):
        efficiency_table(pd.DataFrame(columns=list(RESULT_COLUMNS)))


def test_head_lengths_figure_reports_varlen_against_padded_rows():
    from sparsemm_utils.plots.efficiency import plot_head_lengths

    # 2 layers x 2 KV heads storing [[10, 30], [20, 20]]: a step reads 80 rows; padded to each
    # layer's longest head: 2 x 30 + 2 x 20 = 100 rows, 100 / 80 = 1.25x
    fig = plot_head_lengths(np.array([[10, 30], [20, 20]]), budget=20)
    assert "reads 80 rows (varlen) vs 100 (padded: 1.2x)" in fig.axes[1].get_title(loc="left")
    with pytest.raises(ValueError, match="non-empty \\(layers, kv_heads\\)"):
        plot_head_lengths(np.array([1, 2]), budget=2)


# ---------------------------------------------------------------------------- the two baselines


def _with_static(frame: pd.DataFrame, static_ms: dict[int, float]) -> pd.DataFrame:
    """``frame`` plus a fullkv_static row per context (its preallocated KV bytes = analytic)."""
    extra = frame[frame["method"] == "fullkv"].copy()
    extra["method"] = "fullkv_static"
    extra["decode_ms_per_token"] = [static_ms[n] for n in extra["context_len"]]
    return pd.concat([frame, extra], ignore_index=True)


def test_targets_table_and_figure_report_both_baselines():
    # SparseMM 45 ms at 32K; FullKV (DynamicCache) 90 ms -> 2.0x; FullKV (StaticCache) 60 ms -> 1.33x;
    # DynamicCache / StaticCache = 90 / 60 = 1.5x (the per-step copy)
    frame = _with_static(_rows(VICUNA, [50, 90], [40, 45], [2048, 32768]), {2048: 45.0, 32768: 60.0})
    targets = efficiency_targets(frame).set_index("method")
    assert targets.loc["sparsemm", "speedup"] == pytest.approx(2.0)
    assert targets.loc["sparsemm", "speedup_static"] == pytest.approx(60 / 45)
    assert targets.loc["fullkv_static", "speedup"] == pytest.approx(1.5)
    assert targets.loc["fullkv_static", "kv_bytes_match"] == True  # noqa: E712
    assert pd.isna(targets.loc["fullkv_static", "spread"]) and targets.loc["fullkv_static", "flat"] is None
    text = format_targets(efficiency_targets(frame))
    assert "FullKV (StaticCache) / sparsemm: 1.33x" in text
    assert "FullKV (DynamicCache) / FullKV (StaticCache) at n=32768: 1.50x" in text
    table = efficiency_table(frame).set_index(["method", "context_len"])
    assert table.loc[("sparsemm", 32768), "speedup_static"] == pytest.approx(60 / 45)
    assert table.loc[("fullkv_static", 32768), "speedup"] == pytest.approx(1.5)
    labels = plot_efficiency(frame).axes[2].get_legend_handles_labels()[1]
    assert "FullKV (StaticCache) / sparsemm" in labels and "FullKV / fullkv_static" in labels
    # a run without fullkv_static keeps its table and targets as before
    assert "speedup_static" not in efficiency_table(_rows(VICUNA, [50, 90], [40, 45], [2048, 32768])).columns
    assert pd.isna(efficiency_targets(_rows(VICUNA, [50, 90], [40, 45], [2048, 32768])).set_index("method").loc["sparsemm", "speedup_static"])
