"""The sweep: cells, results.csv / predictions.jsonl, resuming, mismatches; with a fake generator."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils.benchmarks import EvalSample, SkipReport, UnknownBenchmarkError
from sparsemm_utils.lmms_protocol import PROTOCOLS
from sparsemm_utils.evaluation import (
    EVAL_METHODS,
    PREDICTIONS_FILE,
    RESULTS_COLUMNS,
    RESULTS_FILE,
    Cell,
    EvaluationError,
    Generation,
    MissingMethodSettingError,
    ResultsFileError,
    SweepMismatchError,
    UnknownMethodError,
    predictions_frame,
    press_for,
    read_predictions,
    read_results,
    run_sweep,
    scaled_budgets,
    sweep_cells,
    verify_ledger,
)
from sparsemm_utils.sharding import MERGED_DIR, SHARDS_DIR, Shard, ShardError, shard_folder

IMAGE = Image.new("RGB", (8, 8), "white")
GQA = [
    EvalSample(str(i), IMAGE, f"q{i}", (answer,), {"fullAnswer": "", "imageId": f"n{i}", "raw_question": f"q{i}"})
    for i, answer in enumerate(["yes", "no", "red", "two"])
]


class Fake:
    """fullkv answers everything; sparsemm at budget B answers samples i < B / 16; others answer "?"."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[str, str, int | None]] = []
        self.fail_at = fail_at

    def __call__(self, sample, spec, method, budget):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls.append((sample.sample_id, method, budget))
        i = int(sample.sample_id)
        if method == "fullkv" or (method == "sparsemm" and i < budget / 16):
            return Generation(sample.answers[0], prompt_tokens=100 + i, kv_bytes=1000 * (budget or 100))
        return "?"


def _run(out, fake, **kwargs):
    args = {
        "model": "fake/model",
        "benchmarks": {"gqa": GQA},
        "methods": ["fullkv", "sparsemm", "snapkv"],
        "budgets": [16, 32, 64],
        "generate": fake,
        "settings": {"window": 8},
        "progress": False,
        "log": None,
    }
    args.update(kwargs)
    return run_sweep(out, **args)


# ---------------------------------------------------------------------------------- cells


def test_cells_are_benchmark_method_budget_with_one_cell_for_budget_free_methods():
    cells = sweep_cells(["gqa"], ["fullkv", "sparsemm", "mask"], [64, 16])
    assert cells == [
        Cell("gqa", "fullkv", None),
        Cell("gqa", "sparsemm", 16),
        Cell("gqa", "sparsemm", 64),
        Cell("gqa", "mask", None),
    ]
    assert str(cells[1]) == "gqa / sparsemm @ 16" and str(cells[0]) == "gqa / fullkv"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownMethodError, match="known methods: fullkv, sparsemm, adakv"):
        sweep_cells(["gqa"], ["h2o"], [64])
    with pytest.raises(UnknownBenchmarkError, match="known benchmarks"):
        sweep_cells(["nocaps"], ["fullkv"], [64])
    with pytest.raises(EvaluationError, match=r"budget \(tokens per KV head, window included\) must be an int >= 1, got 0"):
        sweep_cells(["gqa"], ["snapkv"], [0])
    with pytest.raises(EvaluationError, match="needs budgets"):
        sweep_cells(["gqa"], ["snapkv"], [])


# ---------------------------------------------------------------------------------- the sweep


def test_sweep_writes_the_artifact_contract(tmp_path):
    fake = Fake()
    result = _run(tmp_path, fake)
    # fullkv: 4/4; sparsemm @16: i < 1 -> 1/4; @32: i < 2 -> 2/4; @64: i < 4 -> 4/4; snapkv: 0
    table = read_results(tmp_path / RESULTS_FILE)
    assert tuple(table.columns) == RESULTS_COLUMNS
    got = {(m, None if pd.isna(b) else int(b)): s for m, b, s in zip(table["method"], table["budget"], table["score"])}
    assert got == {
        ("fullkv", None): 1.0,
        ("sparsemm", 16): 0.25, ("sparsemm", 32): 0.5, ("sparsemm", 64): 1.0,
        ("snapkv", 16): 0.0, ("snapkv", 32): 0.0, ("snapkv", 64): 0.0,
    }  # fmt: skip
    assert set(table["metric"]) == {"exact_match"} and set(table["n_samples"]) == {4}
    assert set(table["model"]) == {"fake/model"}
    # the budget of fullkv is an empty field in the file
    raw = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert raw[0] == ",".join(RESULTS_COLUMNS)
    assert raw[1] == "fake/model,gqa,fullkv,,exact_match,1.0,4,1.0,1.0,,,"  # FullKV: no paired difference
    # each cell's bootstrap interval brackets its score; SnapKV's paired difference from SparseMM at
    # B = 16 is the mean of [1, 0, 0, 0] - [0, 0, 0, 0] = 0.25, with its own interval around it
    assert ((table["ci_low"] <= table["score"]) & (table["score"] <= table["ci_high"])).all()
    snap16 = table[(table["method"] == "snapkv") & (table["budget"] == 16)].iloc[0]
    assert snap16["sparsemm_minus_method"] == 0.25 and snap16["diff_ci_low"] <= 0.25 <= snap16["diff_ci_high"]
    assert table.loc[table["method"] == "sparsemm", "sparsemm_minus_method"].isna().all()
    assert len(fake.calls) == 7 * 4 and result.generated == 28 and result.reused == 0
    # one prediction record per (cell, sample)
    records, dropped = read_predictions(tmp_path)
    assert dropped == 0 and len(records) == 28
    first = records[0]
    assert first["method"] == "fullkv" and first["budget"] is None and first["prediction"] == "yes"
    assert first["scores"] == {"exact_match": 1.0} and first["prompt_tokens"] == 100 and first["kv_bytes"] == 100000
    assert first["extra"] == {"fullAnswer": "", "imageId": "n0"}  # raw_question left out
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["model"] == "fake/model" and manifest["settings"] == {"window": 8, "scoring": PROTOCOLS["0.3"].as_dict()}
    assert manifest["benchmarks"]["gqa"]["n_samples"] == 4


def test_multi_metric_benchmark_gets_one_row_per_metric(tmp_path):
    reader = [EvalSample("0", IMAGE, "Read line 1.", ("AC",), {"task": "line"})]
    _run(tmp_path, lambda s, spec, m, b: "AB", benchmarks={"reader_docqa": reader}, methods=["fullkv"])
    table = read_results(tmp_path)
    # ANLS: 1 - lev("ac", "ab") / max(2, 2) = 1 - 1/2 = 0.5 (kept: not below 0.5); exact match 0
    assert dict(zip(table["metric"], table["score"])) == {"anls": 0.5, "exact_match": 0.0}


def test_stop_strings_cut_the_prediction_and_keep_the_raw_output(tmp_path):
    textvqa = [EvalSample("7", IMAGE, "What?", ("stop",) * 10, {})]
    _run(tmp_path, lambda s, spec, m, b: "stopASSISTANT: more", benchmarks={"textvqa": textvqa}, methods=["fullkv"])
    (record,) = read_predictions(tmp_path)[0]
    assert record["prediction"] == "stop" and record["raw_output"] == "stopASSISTANT: more"
    assert read_results(tmp_path)["score"].tolist() == [1.0]


def test_rerun_skips_finished_cells(tmp_path):
    first = _run(tmp_path, Fake())
    again = Fake()
    second = _run(tmp_path, again)
    assert again.calls == [] and second.ran == [] and len(second.skipped) == 7
    pd.testing.assert_frame_equal(first.results, second.results)


def test_a_crash_resumes_at_the_next_answer(tmp_path):
    clean = _run(tmp_path / "clean", Fake()).results
    crashing = Fake(fail_at=6)  # sample 0 answered by 6 of the 7 cells, then the crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "run", crashing)
    assert read_results(tmp_path / "run").empty  # results are written when a benchmark's samples are all answered
    assert len(read_predictions(tmp_path / "run")[0]) == 6
    resumed = Fake()
    result = _run(tmp_path / "run", resumed)
    # the sweep goes sample by sample: sample 0's last cell, then samples 1-3 under all 7 cells
    assert resumed.calls[:2] == [("0", "snapkv", 64), ("1", "fullkv", None)]
    assert len(resumed.calls) == 1 + 3 * 7 and result.reused == 6
    pd.testing.assert_frame_equal(result.results, clean)
    assert len(read_predictions(tmp_path / "run")[0]) == 28


def test_a_truncated_last_prediction_line_is_dropped_and_regenerated(tmp_path):
    with pytest.raises(RuntimeError):
        _run(tmp_path, Fake(fail_at=6))
    path = tmp_path / PREDICTIONS_FILE
    path.write_text(path.read_text() + '{"model": "fake/model", "benchm')  # a crash mid-write
    resumed = Fake()
    _run(tmp_path, resumed)
    assert resumed.calls[0] == ("0", "snapkv", 64)
    records, dropped = read_predictions(path)
    assert dropped == 0 and len(records) == 28


def test_a_corrupt_line_inside_the_file_is_an_error(tmp_path):
    (tmp_path / PREDICTIONS_FILE).write_text('not json\n{"a": 1}\n')
    with pytest.raises(ResultsFileError, match="line 1 is not valid JSON"):
        read_predictions(tmp_path)


def test_new_methods_and_budgets_extend_the_sweep(tmp_path):
    _run(tmp_path, Fake(), methods=["fullkv"])
    more = Fake()
    _run(tmp_path, more, methods=["fullkv", "sparsemm"], budgets=[16])
    assert {c[1] for c in more.calls} == {"sparsemm"}
    assert len(read_results(tmp_path)) == 2


def test_mismatched_reruns_are_refused(tmp_path):
    _run(tmp_path, Fake(), methods=["fullkv"])
    with pytest.raises(SweepMismatchError, match="model 'fake/model', not 'other/model'"):
        _run(tmp_path, Fake(), model="other/model", methods=["fullkv"])
    with pytest.raises(SweepMismatchError, match="settings"):
        _run(tmp_path, Fake(), settings={"window": 16}, methods=["fullkv"])
    with pytest.raises(SweepMismatchError, match="another sample set"):
        _run(tmp_path, Fake(), benchmarks={"gqa": GQA[:3]}, methods=["fullkv"])


def test_a_mismatched_sweep_is_archived_on_request(tmp_path):
    _run(tmp_path, Fake(), methods=["fullkv"])
    before = {name: (tmp_path / name).read_text() for name in (RESULTS_FILE, PREDICTIONS_FILE, "sweep.json")}
    lines: list[str] = []
    result = _run(tmp_path, Fake(), settings={"window": 16}, methods=["fullkv"], on_mismatch="archive", log=lines.append)
    (archived,) = (tmp_path / "superseded").iterdir()
    assert {name: (archived / name).read_text() for name in before} == before  # moved intact
    assert "settings" in (archived / "reason.txt").read_text()
    assert any(str(archived) in line for line in lines)
    assert result.generated == 4 and json.loads((tmp_path / "sweep.json").read_text())["settings"] == {"window": 16, "scoring": PROTOCOLS["0.3"].as_dict()}
    # a matching rerun leaves the archive alone and reuses the new sweep
    again = _run(tmp_path, Fake(), settings={"window": 16}, methods=["fullkv"], on_mismatch="archive")
    assert again.generated == 0 and len(list((tmp_path / "superseded").iterdir())) == 1
    with pytest.raises(EvaluationError, match="on_mismatch"):
        _run(tmp_path, Fake(), methods=["fullkv"], on_mismatch="overwrite")


def test_bad_inputs(tmp_path):
    report = SkipReport("gqa", n_rows=2)
    report.add("no image", "a")
    report.add("no answers", "b")
    with pytest.raises(EvaluationError, match="no sample to evaluate .*2 rows; skipped 1 no answers"):
        _run(tmp_path, Fake(), benchmarks={"gqa": []}, skips={"gqa": report})
    with pytest.raises(EvaluationError, match="duplicate sample ids"):
        _run(tmp_path / "dup", Fake(), benchmarks={"gqa": [GQA[0], GQA[0]]})
    with pytest.raises(EvaluationError, match="not a str"):
        _run(tmp_path / "bad", lambda s, spec, m, b: 42, methods=["fullkv"])
    with pytest.raises(EvaluationError, match="model must be"):
        _run(tmp_path / "m", Fake(), model="")


def test_results_file_with_other_columns_is_refused(tmp_path):
    (tmp_path / RESULTS_FILE).write_text("model,benchmark,score\nm,gqa,1\n")
    with pytest.raises(ResultsFileError, match="artifact contract"):
        read_results(tmp_path)


def test_predictions_frame_flattens_scores_and_extra(tmp_path):
    _run(tmp_path, Fake(), methods=["fullkv"])
    frame = predictions_frame(tmp_path / PREDICTIONS_FILE)
    assert len(frame) == 4 and "score_exact_match" in frame and "imageId" in frame
    assert frame["budget"].isna().all()


# ---------------------------------------------------------------------------------- budgets


def test_scaled_budgets_hand_example():
    # 120 / 2400 = 0.05: 64 -> 3.2 and 128 -> 6.4 rise to the floor w + 1 = 9; 256 -> 12.8 -> 13;
    # 512 -> 25.6 -> 26; 1024 -> 51.2 -> 51; 2048 -> 102.4 -> 102
    assert scaled_budgets(120, window=8) == (9, 13, 26, 51, 102)
    assert scaled_budgets(2400, window=32) == (64, 128, 256, 512, 1024, 2048)
    with pytest.raises(EvaluationError, match="prompt_tokens"):
        scaled_budgets(0, window=8)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1, max_value=10_000), st.integers(min_value=0, max_value=64))
def test_scaled_budgets_are_sorted_unique_and_above_the_window(prompt, window):
    got = scaled_budgets(prompt, window=window)
    assert list(got) == sorted(set(got)) and all(b >= window + 1 for b in got)


# ---------------------------------------------------------------------------------- methods


def test_every_method_names_a_press_of_the_compression_framework():
    from sparsemm_utils.compression import COMPRESSION_METHODS

    assert {m.press for m in EVAL_METHODS.values()} <= set(COMPRESSION_METHODS) | {"fastv"}
    assert [m for m, spec in EVAL_METHODS.items() if not spec.budgeted] == ["fullkv", "mask", "mask_random"]


def test_press_for_builds_each_method():
    scores = np.arange(2 * 4, dtype=float).reshape(2, 4) + 1
    knobs = {"window": 8, "ratio": 0.1, "seed": 3, "fraction": 0.25, "head_scores": scores}
    sparsemm = press_for("sparsemm", 32, **knobs)
    assert (sparsemm.name, sparsemm.budget, sparsemm.window, sparsemm.ratio) == ("sparsemm", 32, 8, 0.1)
    assert press_for("fullkv", None, **knobs).name == "fullkv"
    mask = press_for("mask", None, **knobs)
    assert (mask.name, mask.selection, mask.fraction) == ("head_mask", "top", 0.25)
    rand = press_for("mask_random", None, **knobs)
    assert (rand.selection, rand.seed) == ("random", 3)
    assert press_for("random", 32, **knobs).seed == 3
    with pytest.raises(MissingMethodSettingError, match="'head_scores' \\(step 03"):
        press_for("sparsemm", 32, window=8, ratio=0.1)
    with pytest.raises(EvaluationError, match="takes no budget"):
        press_for("fullkv", 64)
    with pytest.raises(EvaluationError, match="needs a budget"):
        press_for("snapkv", None, window=8)


def test_press_for_fastv_is_fastv_matched_to_the_budget():
    from sparsemm_utils.fastv import FastVAtBudget

    assert press_for("fastv", 32, fastv_k=3) == FastVAtBudget(budget=32, k=3)
    with pytest.raises(MissingMethodSettingError, match="'fastv_k'"):
        press_for("fastv", 32, window=8)
    with pytest.raises(EvaluationError, match="needs a budget"):
        press_for("fastv", None, fastv_k=2)


def test_method_details_are_kept_in_the_predictions(tmp_path):
    class WithDetails:
        def __call__(self, sample, spec, method, budget):
            return Generation("x", prompt_tokens=10, kv_bytes=5, details={"ratio": 0.25, "reachable": True})

    run_sweep(tmp_path, model="m", benchmarks={"gqa": GQA[:2]}, methods=["fastv"], budgets=[16],
              generate=WithDetails(), progress=False, log=None)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["method_details"] for r in lines] == [{"ratio": 0.25, "reachable": True}] * 2
    frame = predictions_frame(tmp_path / PREDICTIONS_FILE)
    assert list(frame["detail_ratio"]) == [0.25, 0.25] and list(frame["detail_reachable"]) == [True, True]


def test_counter_of_calls_per_cell(tmp_path):
    """Each cell answers every sample exactly once."""
    fake = Fake()
    _run(tmp_path, fake)
    per_cell = Counter((m, b) for _, m, b in fake.calls)
    assert set(per_cell.values()) == {4} and len(per_cell) == 7


@settings(max_examples=30, deadline=None)
@given(
    answers=st.lists(st.sampled_from(["yes", "no", "red"]), min_size=1, max_size=5),
    outputs=st.lists(st.sampled_from(["yes", "No.", "red", "?"]), min_size=10, max_size=10),
    crash=st.integers(min_value=0, max_value=9),
)
def test_resumed_sweep_equals_a_clean_one_and_scores_are_sample_means(answers, outputs, crash):
    """Invariants: a crash at any answer, then a rerun, gives the clean run's results.csv; each
    score is the mean of the cell's per-sample scores in predictions.jsonl."""
    import tempfile
    from pathlib import Path

    samples = [EvalSample(str(i), IMAGE, "q", (a,), {}) for i, a in enumerate(answers)]

    def generate(sample, spec, method, budget):
        return outputs[(int(sample.sample_id) + (budget or 0)) % len(outputs)]

    def crashing(limit):
        calls = {"n": 0}

        def gen(sample, spec, method, budget):
            if calls["n"] == limit:
                raise RuntimeError("crash")
            calls["n"] += 1
            return generate(sample, spec, method, budget)

        return gen

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kwargs = {"benchmarks": {"gqa": samples}, "methods": ["fullkv", "snapkv"], "budgets": [1, 2]}
        clean = _run(tmp / "clean", generate, **kwargs).results
        try:
            _run(tmp / "run", crashing(crash), **kwargs)
        except RuntimeError:
            pass
        resumed = _run(tmp / "run", generate, **kwargs).results
        pd.testing.assert_frame_equal(clean, resumed)
        records, _ = read_predictions(tmp / "run")
        for _, row in clean.iterrows():
            budget = None if pd.isna(row["budget"]) else int(row["budget"])
            cell = [r["scores"]["exact_match"] for r in records if r["method"] == row["method"] and r["budget"] == budget]
            assert len(cell) == row["n_samples"] == len(samples)
            assert np.isclose(row["score"], sum(cell) / len(cell))


class GroupedFake(Fake):
    """A generator with ``many``: one call per sample for all its cells (as ModelGenerator's shared prefill)."""

    def __init__(self):
        super().__init__()
        self.groups: list[tuple[str, tuple]] = []

    def many(self, sample, spec, cells):
        self.groups.append((sample.sample_id, tuple(cells)))
        return [self(sample, spec, m, b) for m, b in cells]


def test_a_grouped_generator_answers_each_sample_once_for_all_its_cells(tmp_path):
    clean = _run(tmp_path / "clean", Fake()).results
    grouped = GroupedFake()
    result = _run(tmp_path / "grouped", grouped)
    assert [s for s, _ in grouped.groups] == ["0", "1", "2", "3"]
    assert all(len(cells) == 7 for _, cells in grouped.groups)
    pd.testing.assert_frame_equal(result.results, clean)


class BatchedFake(GroupedFake):
    """A generator with ``many_batch``: one call per batch of samples."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.batches: list[list[str]] = []
        self.fail_at = fail_at

    def many_batch(self, samples, spec, cells):
        self.batches.append([s.sample_id for s in samples])
        return [self.many(sample, spec, own) for sample, own in zip(samples, cells)]


def _predictions_without_seconds(path):
    records, _ = read_predictions(path / "predictions.jsonl")
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
def test_a_batch_of_samples_gives_the_same_files_in_the_same_order(tmp_path, batch_size):
    clean = _run(tmp_path / "clean", Fake())
    batched = BatchedFake()
    result = _run(tmp_path / "batched", batched, batch_size=batch_size)
    pd.testing.assert_frame_equal(result.results, clean.results)
    assert _predictions_without_seconds(tmp_path / "batched") == _predictions_without_seconds(tmp_path / "clean")
    expected = {1: [], 3: [["0", "1", "2"]], 4: [["0", "1", "2", "3"]], 8: [["0", "1", "2", "3"]]}[batch_size]
    assert batched.batches == expected  # batch 1 (and a last batch of one sample) goes through many()
    assert len(batched.groups) == 4


def test_a_batched_sweep_resumes_after_a_crash(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, BatchedFake(fail_at=10), batch_size=3)  # in the first batch: nothing of it was written
    records, _ = read_predictions(tmp_path / "predictions.jsonl")
    assert records == []
    resumed = BatchedFake()
    result = _run(tmp_path, resumed, batch_size=3)
    pd.testing.assert_frame_equal(result.results, _run(tmp_path / "clean", Fake()).results)
    with pytest.raises(EvaluationError, match="batch_size must be an int >= 1"):
        _run(tmp_path / "bad", Fake(), batch_size=0)


def test_method_limits_answer_only_the_first_samples(tmp_path):
    fake = Fake()
    result = _run(tmp_path, fake, methods=["fullkv", "mask", "mask_random_3"], budgets=[], method_limits={"mask": 2, "mask_random_3": 3})
    n = dict(zip(result.results["method"], result.results["n_samples"]))
    assert n == {"fullkv": 4, "mask": 2, "mask_random_3": 3}
    assert sorted(s for s, m, _ in fake.calls if m == "mask") == ["0", "1"]


def test_random_mask_draws_are_methods_with_their_own_seed():
    from sparsemm_utils.evaluation import get_method, is_random_mask, press_for

    draw = get_method("mask_random_4")
    assert draw.press == "head_mask" and draw.fixed == {"selection": "random", "seed": 4} and not draw.budgeted
    assert is_random_mask("mask_random") and is_random_mask("mask_random_4") and not is_random_mask("mask")
    press = press_for("mask_random_4", None, fraction=0.1, seed=0)
    assert press.seed == 4 and press.selection == "random"
    with pytest.raises(UnknownMethodError, match="mask_random_<k>"):
        get_method("mask_random_x")


def test_the_generator_limits_each_sample_by_its_question_type():
    """ModelGenerator decodes a sample up to its benchmark's limit for that question type, lowered
    further by its own smoke-run cap."""
    from types import SimpleNamespace

    from PIL import Image

    from sparsemm_utils.benchmarks import EvalSample, get_benchmark
    from sparsemm_utils.evaluation import ModelGenerator

    study, image = get_benchmark("study_docqa"), Image.new("RGB", (8, 8))
    line, ocr = (EvalSample("0", image, "q", ("a",), {"task": t}) for t in ("line", "ocr"))
    generator = ModelGenerator(SimpleNamespace(model_type="llava_next"))
    assert (generator._limit(study, line), generator._limit(study, ocr)) == (32, 96)
    capped = ModelGenerator(SimpleNamespace(model_type="llava_next"), max_new_tokens=40)
    assert (capped._limit(study, line), capped._limit(study, ocr)) == (32, 40)


# ---------------------------------------------------------------------------------- shards


def _sharded(out, count, fake_for=lambda shard: Fake(), **kwargs):
    """Every shard of ``count`` into ``out/shards/``, then the single-process sweep that merges them."""
    for index in range(count):
        shard = Shard(index, count)
        part = _run(shard_folder(out, shard), fake_for(shard), shard=shard, **kwargs)
        assert part.results.empty  # a shard never finishes a cell
    merging = Fake()
    result = _run(out, merging, **kwargs)
    assert merging.calls == []  # every answer came from the shards
    return result


def _without_seconds(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_predictions(path)[0]]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_a_sharded_sweep_merges_into_the_single_process_files(tmp_path, count):
    limits = {"mask": 3}
    single = _run(tmp_path / "single", Fake(), methods=["fullkv", "sparsemm", "snapkv", "mask"], method_limits=limits)
    sharded = _sharded(tmp_path / "sharded", count, methods=["fullkv", "sparsemm", "snapkv", "mask"], method_limits=limits)
    assert (tmp_path / "sharded" / RESULTS_FILE).read_bytes() == (tmp_path / "single" / RESULTS_FILE).read_bytes()
    assert _without_seconds(tmp_path / "sharded") == _without_seconds(tmp_path / "single")  # same answers, same order
    pd.testing.assert_frame_equal(sharded.results, single.results)
    assert not (tmp_path / "sharded" / SHARDS_DIR).exists() and (tmp_path / "sharded" / MERGED_DIR / f"0-of-{count}").is_dir()
    verify_ledger(tmp_path / "sharded")  # the merged files verify, so the sweep resumes on them
    again = Fake()
    assert _run(tmp_path / "sharded", again, methods=["fullkv", "sparsemm", "snapkv", "mask"], method_limits=limits).ran == []
    assert again.calls == []


def test_each_shard_answers_its_own_positions_and_resumes(tmp_path):
    out = tmp_path / "run"
    shard = Shard(1, 2)
    crashing = Fake(fail_at=9)  # sample 1 under 7 cells, then sample 3 under 2 of them
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(shard_folder(out, shard), crashing, shard=shard)
    assert {s for s, _, _ in crashing.calls} == {"1", "3"}
    with pytest.raises(ShardError, match=r"lacks shard\(s\) 0/2 of 2"):
        _run(out, Fake())
    _run(shard_folder(out, Shard(0, 2)), Fake(), shard=Shard(0, 2))
    with pytest.raises(ShardError, match=r"incomplete: 1/2 \(5 answers\) missing"):
        _run(out, Fake())
    resumed = Fake()
    _run(shard_folder(out, shard), resumed, shard=shard)
    assert len(resumed.calls) == 5 and {s for s, _, _ in resumed.calls} == {"3"}
    _run(out, Fake())
    assert (out / RESULTS_FILE).read_bytes() == (_run(tmp_path / "single", Fake()).out_dir / RESULTS_FILE).read_bytes()


def test_a_merge_refuses_shards_of_another_sweep(tmp_path):
    for index in range(2):
        _run(shard_folder(tmp_path, Shard(index, 2)), Fake(), shard=Shard(index, 2))
    with pytest.raises(ShardError, match=r"shard 0/2 .* ran model 'fake/model' with settings \{'scoring': \{.*\}, 'window': 8\}; this sweep is 'fake/model' with \{'window': 4, 'scoring'"):
        _run(tmp_path, Fake(), settings={"window": 4})
    with pytest.raises(ShardError, match="on another sample set"):
        _run(tmp_path, Fake(), benchmarks={"gqa": GQA[:3]})
    with pytest.raises(ShardError, match="answers this sweep does not ask for"):
        _run(tmp_path, Fake(), methods=["fullkv", "sparsemm"])
    (tmp_path / SHARDS_DIR / "1-of-2").rename(tmp_path / SHARDS_DIR / "1-of-3")
    with pytest.raises(ShardError, match=r"shards of \[2, 3\] processes"):
        _run(tmp_path, Fake())
    (tmp_path / SHARDS_DIR / "1-of-3").rename(tmp_path / SHARDS_DIR / "1-of-2")
    (tmp_path / SHARDS_DIR / "0-of-2").rename(tmp_path / SHARDS_DIR / "2-of-2")
    with pytest.raises(ShardError, match="shard index must be an int >= 0 and <= 1, got 2"):
        _run(tmp_path, Fake())


def test_a_merge_refuses_a_folder_that_holds_answers(tmp_path):
    _run(tmp_path, Fake())
    _run(shard_folder(tmp_path, Shard(0, 1)), Fake(), shard=Shard(0, 1))
    with pytest.raises(ShardError, match="holds results.csv and predictions.jsonl already and shard folders to merge"):
        _run(tmp_path, Fake())


def test_a_merge_refuses_a_shard_named_for_another(tmp_path):
    _run(shard_folder(tmp_path / "a", Shard(0, 2)), Fake(), shard=Shard(0, 2))
    _run(shard_folder(tmp_path / "b", Shard(0, 2)), Fake(), shard=Shard(0, 2))
    (tmp_path / "a" / SHARDS_DIR).mkdir(exist_ok=True)
    (tmp_path / "b" / SHARDS_DIR / "0-of-2").rename(tmp_path / "a" / SHARDS_DIR / "1-of-2")
    with pytest.raises(ShardError, match="is named shard 1/2 but its sweep.json records shard '0/2'"):
        _run(tmp_path / "a", Fake())


def test_shard_specifications():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4" and Shard(1, 4).name == "1-of-4"
    assert [k for k in range(10) if Shard(1, 4).owns(k)] == [1, 5, 9]
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == Shard(3, 8)
    for bad, message in [("2/2", "shard index must be an int >= 0 and <= 1"), ("1", "a shard is 'i/n'"), ("0/0", "shard count must be an int >= 1")]:
        with pytest.raises(ShardError, match=message):
            Shard.parse(bad)
    with pytest.raises(ShardError, match="WORLD_SIZE is not set: start the processes with `accelerate launch`"):
        Shard.from_env({"RANK": "0"})
