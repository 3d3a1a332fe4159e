"""Fault cases of the files steps read (docs/faults.md, "Inputs"): regions outside the image,
head-score files with impossible keys, bad cells, zero scores, damaged model folders and
benchmark parquet files. Each error names the file and what to do."""

from __future__ import annotations

import json
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparsemm_utils import head_scoring_capture as capture
from sparsemm_utils.allocation import InvalidScoresError, validate_head_scores
from sparsemm_utils.benchmark_fixtures import fixture_dir
from sparsemm_utils.benchmarks import BenchmarkFileError, load_benchmark
from sparsemm_utils.head_scoring_files import HeadScoreFileError, load_head_scores
from sparsemm_utils.head_scoring_rule import HeadScoreShapeError, InvalidHeadScoresError
from sparsemm_utils.models import ModelFilesError, check_model_files, load_model
from sparsemm_utils.patch_mapping import PatchMappingError
from sparsemm_utils.runs import repo_root
from sparsemm_utils.steps import patch_mapping as step02

# ------------------------------------------------------------------------------ regions.jsonl

RECORD = {
    "doc_id": 0, "model_type": "qwen2_vl", "variant": "fidelity", "image_size": [280, 112],
    "geometry": {"grid_h": 4, "grid_w": 10, "resized_height": 112, "resized_width": 280},
    "image_token_start": 45, "num_image_tokens": 40,
    "chunks": [{"chunk": "3W9", "box": [38.0, 31.0, 103.0, 52.0], "positions": [11, 12, 13]}],
    "chars": [{"char": "3", "chunk_index": 0, "box": [38.0, 31.0, 50.0, 49.0], "positions": [11]}],
    "skipped": [],
}  # fmt: skip


def _regions(run: Path, *records: dict | str) -> Path:
    path = step02.REGIONS.path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _with(kind: str, positions: list) -> dict:
    record = json.loads(json.dumps(RECORD))
    record[kind][0]["positions"] = positions
    return record


def test_a_valid_regions_file_reads_back(tmp_path):
    _regions(tmp_path, RECORD, {**RECORD, "doc_id": 1})
    assert [r["doc_id"] for r in step02.REGIONS.read(tmp_path)] == [0, 1]


@pytest.mark.parametrize(
    "kind, positions, shown",
    [("chunks", [11, 99999], "chunk 0 ('3W9') has position 99999"), ("chars", [-1], "char 0 ('3') has position -1"),
     ("chunks", [11, 12.5], "chunk 0 ('3W9') has position 12.5"), ("chars", [40], "char 0 ('3') has position 40")],
    ids=["position-99999", "position-minus-1", "position-not-int", "position-one-past-the-end"],
)  # fmt: skip
def test_a_region_outside_its_image_span_is_refused(tmp_path, kind, positions, shown):
    path = _regions(tmp_path, RECORD, _with(kind, positions))
    with pytest.raises(PatchMappingError) as info:
        step02.REGIONS.read(tmp_path)
    message = str(info.value)
    assert f"{path}:2: document 0, {shown} outside its image span [0, 40)" in message
    assert "rerun step 02" in message


@pytest.mark.parametrize(
    "field, value, shown",
    [("image_token_start", -3, "image_token_start must be an int >= 0, got -3"),
     ("num_image_tokens", 0, "num_image_tokens must be an int >= 1, got 0")],
    ids=["image-token-start-negative", "num-image-tokens-zero"],
)  # fmt: skip
def test_an_impossible_image_span_is_refused(tmp_path, field, value, shown):
    path = _regions(tmp_path, {**RECORD, field: value})
    with pytest.raises(PatchMappingError, match=f"{path}:1: document 0: {shown}.*rerun step 02"):
        step02.REGIONS.read(tmp_path)


def test_a_regions_line_that_is_not_an_object_is_refused(tmp_path):
    path = _regions(tmp_path, RECORD, "[1, 2]")
    with pytest.raises(PatchMappingError, match=f"{path}:2 is not a JSON object; rerun step 02"):
        step02.REGIONS.read(tmp_path)


def test_a_half_written_regions_line_is_refused(tmp_path):
    path = _regions(tmp_path, RECORD, json.dumps(RECORD)[:60])
    with pytest.raises(PatchMappingError, match=f"{path}:2 is not valid JSON.*rerun step 02"):
        step02.REGIONS.read(tmp_path)


def test_a_record_whose_image_span_is_not_the_prompts_is_refused():
    with pytest.raises(capture.RegionMismatchError, match="image tokens start at 45 \\(41 tokens\\) but step 02's regions.jsonl records 45 \\(40 tokens\\)"):
        capture._check_record(RECORD, "qwen2_vl", 0, 45, 41)
    with pytest.raises(capture.RegionMismatchError, match="step 02 \\(regions.jsonl\\) mapped its boxes for 'qwen2_vl' but the model is 'llava_next'"):
        capture._check_record(RECORD, "llava_next", 0, 45, 40)


# ------------------------------------------------------------------------------ head scores


def _json(tmp_path: Path, payload, name: str = "head_scores.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _grid(layers: int = 4, heads: int = 8) -> dict[str, list[float]]:
    return {f"{l}-{h}": [1.0 + l, 0.5] for l in range(layers) for h in range(heads)}


@pytest.mark.parametrize("shape", [(4, 8), None], ids=["with-the-model-shape", "without-a-shape"])
def test_a_head_key_far_outside_the_model_fails_at_once(tmp_path, shape):
    path = _json(tmp_path, {**_grid(), "99999-99999": [1.0]})
    tracemalloc.start()
    start = time.perf_counter()
    error = HeadScoreShapeError if shape else HeadScoreFileError
    with pytest.raises(error) as info:
        load_head_scores(path, shape=shape)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2 and peak < 20 * 2**20, (seconds, peak)  # the 10^10-cell grid is never built
    if shape:
        assert "head '99999-99999' lies outside the model's 4 layers x 8 query heads" in str(info.value)
    else:
        assert "9999999967 head(s) are missing (first: 0-8, 0-9," in str(info.value)


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "head_scores.csv"
    path.write_text("layer,head,score,rank\n" + "".join(r + "\n" for r in rows))
    return path


GOOD_ROWS = ["0,0,0.5,2", "0,1,0.75,1", "1,0,0.25,3", "1,1,0.0,4"]


@pytest.mark.parametrize(
    "row, shown",
    [("1,1,abc,4", "line 5: column 'score' holds 'abc', which is not a number"),
     ("1,1.7,0.0,4", "line 5: column 'head' holds '1.7', which is not a non-negative integer"),
     ("1,1", "line 5: column 'score' is empty (a short, ragged row?)"),
     ("1,-1,0.0,4", "line 5: column 'head' holds '-1', which is not a non-negative integer")],
    ids=["score-abc", "head-1.7", "short-row", "head-negative"],
)  # fmt: skip
def test_a_bad_head_scores_csv_cell_names_its_line(tmp_path, row, shown):
    path = _csv(tmp_path, GOOD_ROWS[:3] + [row])
    with pytest.raises(HeadScoreFileError, match=re.escape(f"{path} {shown}") + ".*Rerun step 03 or fix the file"):
        load_head_scores(path, shape=(2, 2))
    np.testing.assert_allclose(load_head_scores(_csv(tmp_path, GOOD_ROWS), shape=(2, 2)), [[0.5, 0.75], [0.25, 0.0]])


def test_a_head_scores_csv_row_with_an_extra_field_is_refused(tmp_path):
    path = _csv(tmp_path, GOOD_ROWS[:3] + ["1,1,0.0,4,9"])
    with pytest.raises(HeadScoreFileError, match=f"{path} is not a readable CSV .*rerun step 03"):
        load_head_scores(path)


@pytest.mark.parametrize(
    "payload, error, shown",
    [('{"0-0": [1], "0-1": [2], "0-0": [3]}', HeadScoreFileError, "key '0-0' is written twice"),
     ({"0-0": [1], "0-1": [2], "00-0": [3]}, HeadScoreFileError, "key '00-0' names head 0-0 a second time"),
     ({"0-0": [[1, 2], [3]], "0-1": [2]}, HeadScoreFileError, r"head '0-0' holds \[1, 2\], which is not a number"),
     ({"0-0": [1, -2], "0-1": [2]}, InvalidHeadScoresError, "head '0-0' has score -2.0"),
     ('{"0-0": [1.0, 0.5], "0-1": [2.0', HeadScoreFileError, "is not valid JSON .*half-written or edited file.*Rerun step 03")],
    ids=["duplicate-key", "same-head-twice", "nested-lists", "negative-score", "half-written"],
)  # fmt: skip
def test_a_bad_head_scores_json_is_refused(tmp_path, payload, error, shown):
    with pytest.raises(error, match=shown):
        load_head_scores(_json(tmp_path, payload))


def test_head_scores_of_another_model_name_both_shapes(tmp_path):
    with pytest.raises(HeadScoreShapeError, match="2 layers x 2 heads but the model has 4 layers x 8 query heads"):
        load_head_scores(_json(tmp_path, _grid(2, 2)), shape=(4, 8))


def test_lists_of_different_lengths_are_averaged_as_the_original_does(tmp_path):
    # the original's loader takes np.mean of each head's list; shipped files may differ in length
    np.testing.assert_allclose(load_head_scores(_json(tmp_path, {"0-0": [1, 3], "0-1": [2]})), [[2.0, 2.0]])


REPORT = {"samples": 4, "tokens_generated": 37, "tokens_matched": 0,
          "tokens_skipped": {"end_of_sequence": 4, "no_match": 30, "ambiguous": 3, "empty_region": 0}}  # fmt: skip


def test_all_zero_head_scores_explain_that_step_03_matched_nothing(tmp_path):
    path = _json(tmp_path, {k: [0.0, 0.0] for k in _grid(2, 2)})
    (tmp_path / "scoring_report.json").write_text(json.dumps(REPORT))
    with pytest.raises(InvalidHeadScoresError) as info:
        load_head_scores(path, shape=(2, 2))
    message = str(info.value)
    assert f"the head scores in {path} are zero for every head" in message
    assert "step 03 matched 0 of 37 generated tokens over 4 samples" in message
    assert "no_match 30, end_of_sequence 4, ambiguous 3;" in message and "token_matches.csv" in message
    assert load_head_scores(path, allow_zero=True).sum() == 0  # text-copy scores may be all zero


def test_all_zero_head_scores_without_a_report_still_explain(tmp_path):
    path = _json(tmp_path, {k: [0.0] for k in _grid(2, 2)})
    with pytest.raises(InvalidHeadScoresError, match="matched no generated token .*scoring_report.json not readable"):
        load_head_scores(path)


def test_allocation_on_all_zero_scores_points_to_step_03():
    with pytest.raises(InvalidScoresError, match="Step 03 matched no generated token.*scoring_report.json"):
        validate_head_scores(np.zeros((2, 4)), (2, 4, 2))


# ------------------------------------------------------------------------------ model folders


@pytest.fixture()
def reader_copy(tmp_path) -> Path:
    folder = tmp_path / "tiny_reader"
    shutil.copytree(repo_root() / "data" / "tiny_reader", folder)
    return folder


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_the_shipped_model_folder_passes_the_check():
    check_model_files(repo_root() / "data" / "tiny_reader")


def test_half_a_config_json_names_the_file_and_the_fix(reader_copy):
    _cut(reader_copy / "config.json")
    with pytest.raises(ModelFilesError) as info:
        load_model(reader_copy)
    message = str(info.value)
    assert f"{reader_copy / 'config.json'} is not valid JSON" in message and "half a file?" in message
    assert "git checkout -- data/tiny_reader" in message and "hf download" in message


def test_a_config_json_that_is_not_an_object_is_refused(reader_copy):
    (reader_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFilesError, match="config.json must hold a JSON object, got list"):
        load_model(reader_copy)


def test_half_a_tokenizer_json_names_the_file(reader_copy):
    _cut(reader_copy / "tokenizer.json")
    with pytest.raises(ModelFilesError, match="tokenizer.json is not valid JSON"):
        load_model(reader_copy)


def test_a_truncated_model_safetensors_names_the_file_and_the_fix(reader_copy):
    weights = reader_copy / "model.safetensors"
    size = weights.stat().st_size
    _cut(weights)
    with pytest.raises(ModelFilesError, match=f"{weights} has {size // 2} bytes but its header describes {size} \\(truncated\\)"):
        load_model(reader_copy)


def test_a_safetensors_file_cut_inside_its_header_is_refused(reader_copy):
    weights = reader_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFilesError, match="has 100 bytes but its header alone needs"):
        load_model(reader_copy)


def test_a_safetensors_file_with_a_garbage_header_is_refused(reader_copy):
    weights = reader_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(ModelFilesError, match="unreadable safetensors header"):
        load_model(reader_copy)


# ------------------------------------------------------------------------------ benchmark files


def _shard() -> Path:
    return next(fixture_dir("docvqa").rglob("*.parquet"))


def test_a_benchmark_parquet_with_0_rows_is_named(tmp_path):
    path = tmp_path / "docvqa.parquet"
    pq.write_table(pq.read_table(_shard()).slice(0, 0), path)
    with pytest.raises(BenchmarkFileError, match=f"(?s){path} is a parquet file with 0 rows: benchmark 'docvqa'.*hf download"):
        load_benchmark("docvqa", source=str(path))


def test_a_truncated_benchmark_parquet_is_named(tmp_path):
    path = tmp_path / "docvqa.parquet"
    shutil.copy(_shard(), path)
    _cut(path)
    with pytest.raises(BenchmarkFileError, match=f"{path} is not a readable parquet file .*cut off"):
        load_benchmark("docvqa", source=str(path))


def test_a_truncated_shard_in_a_benchmark_folder_is_named(tmp_path):
    folder = tmp_path / "docvqa"
    shutil.copytree(fixture_dir("docvqa"), folder)
    shard = next(folder.rglob("*.parquet"))
    _cut(shard)
    with pytest.raises(BenchmarkFileError, match=f"{shard} is not a readable parquet file"):
        load_benchmark("docvqa", source=str(folder))
