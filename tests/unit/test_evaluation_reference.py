"""The paper's numbers (docs/method.md §6) as data, and the comparison with ours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparsemm_utils.benchmarks import BENCHMARKS
from sparsemm_utils.evaluation import EVAL_METHODS, LEGACY_RESULTS_COLUMNS, RESULTS_COLUMNS
from sparsemm_utils.reference_numbers import (
    READING_TOLERANCE,
    REFERENCE_MODELS,
    REFERENCE_POINTS,
    compare_with_reference,
    reference_frame,
    reference_model_id,
)


def test_table_has_every_number_of_spec_section_6():
    # 7 (model, task) rows x 8 columns (full, SparseMM @256/@128/@64, AdaKV, SnapKV, PyramidKV, Random)
    assert len(REFERENCE_POINTS) == 56
    frame = reference_frame()
    assert set(frame["benchmark"]) <= set(BENCHMARKS) and set(frame["method"]) <= set(EVAL_METHODS)
    assert READING_TOLERANCE == 0.01 and (frame["tolerance"] == 0.01).all()
    # spot checks against docs/method.md §6
    def score(model, bench, method, budget):
        rows = frame[(frame.model == REFERENCE_MODELS[model]) & (frame.benchmark == bench) & (frame.method == method)]
        rows = rows[rows.budget.isna()] if budget is None else rows[rows.budget == budget]
        (value,) = rows["score"].tolist()
        return value

    assert score("llava-next-vicuna-7b", "docvqa", "fullkv", None) == 0.685
    assert score("llava-next-vicuna-7b", "ocrbench", "sparsemm", 128) == 0.50
    assert score("llava-next-mistral-7b", "docvqa", "random", 64) == 0.42
    assert score("qwen2-vl-7b", "ocrbench", "snapkv", 64) == 0.627
    assert score("qwen2-vl-7b", "textvqa", "pyramidkv", 64) == 0.655


def test_model_names_resolve_to_the_papers_models():
    assert reference_model_id("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"
    assert reference_model_id("qwen2-vl-7b") == "Qwen/Qwen2-VL-7B-Instruct"
    assert reference_model_id("/models/llava-v1.6-vicuna-7b-hf/") == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert reference_model_id("tiny-random/qwen2_vl") is None
    assert reference_frame("tiny-random/qwen2_vl").empty
    assert len(reference_frame("llava-next-mistral-7b")) == 8


def test_compare_with_reference_hand_example():
    ours = pd.DataFrame(
        [
            ("Qwen/Qwen2-VL-7B-Instruct", "docvqa", "fullkv", None, "anls", 0.945, 100),
            ("Qwen/Qwen2-VL-7B-Instruct", "docvqa", "sparsemm", 64, "anls", 0.80, 100),
            ("Qwen/Qwen2-VL-7B-Instruct", "docvqa", "sparsemm", 64, "other", 0.10, 100),  # not the headline metric
        ],
        columns=list(LEGACY_RESULTS_COLUMNS),
    ).reindex(columns=list(RESULTS_COLUMNS))  # no intervals: the comparison reads score only
    table = compare_with_reference(ours, "Qwen/Qwen2-VL-7B-Instruct")
    assert len(table) == 24  # every reference point of Qwen2-VL
    full = table[(table.benchmark == "docvqa") & (table.method == "fullkv")].iloc[0]
    # 0.945 - 0.94 = 0.005 <= 0.01
    assert full.ours == 0.945 and np.isclose(full.difference, 0.005) and bool(full.within)
    low = table[(table.benchmark == "docvqa") & (table.method == "sparsemm") & (table.budget == 64)].iloc[0]
    # 0.80 - 0.85 = -0.05: outside the reading tolerance
    assert np.isclose(low.difference, -0.05) and not bool(low.within)
    missing = table[(table.benchmark == "ocrbench")]
    assert missing["ours"].isna().all() and not missing["within"].any()
    with pytest.raises(ValueError, match="lacks columns"):
        compare_with_reference(ours.drop(columns=["metric"]), "qwen2-vl-7b")
