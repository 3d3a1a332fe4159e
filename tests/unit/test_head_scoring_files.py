"""Score files (the original format and head_scores.csv), validation errors, the report's counts
and the concentration statistics (cumulative share, top share, top heads)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsemm_utils import head_scoring_capture as capture
from sparsemm_utils import head_scoring_files as files
from sparsemm_utils import head_scoring_rule as rule
from sparsemm_utils.attention_capture import CapturedAttention
from sparsemm_utils.head_scoring_rule import GeneratedTokens
from sparsemm_utils.steps import head_scoring as step03


def write(tmp_path, payload, name="scores.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


# ------------------------------------------------------------------------ reading files


def test_official_files_lists_of_any_length_are_averaged(tmp_path):
    # keys deliberately not layer-major: heads are placed by key, not by file order
    path = write(tmp_path, {"1-1": [4, 0], "0-0": [1, 3], "0-1": [2], "1-0": [0, 0, 0]})
    # means: 0-0 = 2, 0-1 = 2, 1-0 = 0, 1-1 = 2
    np.testing.assert_allclose(files.load_head_scores(path), [[2, 2], [0, 2]])
    np.testing.assert_allclose(files.load_head_scores(path, shape=(2, 2)), [[2, 2], [0, 2]])


def test_bare_numbers_count_as_one_sample(tmp_path):
    np.testing.assert_allclose(files.load_head_scores(write(tmp_path, {"0-0": 0.5, "0-1": [1.5]})), [[0.5, 1.5]])


def test_shape_mismatch_names_both_shapes(tmp_path):
    path = write(tmp_path, {f"{l}-{h}": [1.0] for l in range(2) for h in range(2)})
    with pytest.raises(rule.HeadScoreShapeError, match=r"2 layers x 2 heads.*3 layers x 4 query heads"):
        files.load_head_scores(path, shape=(3, 4))
    model = SimpleNamespace(num_layers=2, num_heads=3)
    with pytest.raises(rule.HeadScoreShapeError, match=r"2 layers x 3 query heads"):
        files.load_head_scores(path, shape=model)


@pytest.mark.parametrize(
    "payload, error, message",
    [
        ('{"0-0": [NaN], "0-1": [1]}', rule.InvalidHeadScoresError, "0-0.*nan"),
        ({"0-0": [1, -0.5], "0-1": [1]}, rule.InvalidHeadScoresError, "-0.5"),
        ({"0-0": [], "0-1": [1]}, files.HeadScoreFileError, "empty list"),
        ({"0_0": [1]}, files.HeadScoreFileError, "layer-head"),
        ({"0-0": [1], "1-1": [1]}, files.HeadScoreFileError, "missing.*0-1"),
        ({"0-0": ["x"]}, files.HeadScoreFileError, "not a number"),
        ("[1, 2]", files.HeadScoreFileError, "JSON object"),
        ("{not json", files.HeadScoreFileError, "not valid JSON"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, payload, error, message):
    with pytest.raises(error, match=message):
        files.load_head_scores(write(tmp_path, payload))


def test_missing_file_names_the_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="03_head_scoring"):
        files.load_head_scores(tmp_path / "nope.json")


def test_validate_head_scores_rejects_bad_values():
    with pytest.raises(rule.InvalidHeadScoresError, match="head 1-0"):
        rule.validate_head_scores([[0.0, 1.0], [np.inf, 0.0]])
    with pytest.raises(rule.HeadScoreShapeError, match="matrix"):
        rule.validate_head_scores([1.0, 2.0])


# ------------------------------------------------------------------------ writing files


def test_json_is_layer_major_with_one_value_per_sample(tmp_path):
    per_sample = np.arange(12, dtype=float).reshape(2, 2, 3)  # 2 samples, 2 layers, 3 heads
    path = files.write_head_scores_json(per_sample, tmp_path / "head_scores.json")
    data = json.loads(path.read_text())
    assert list(data) == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert data["1-2"] == [5.0, 11.0]  # s_1[1, 2] = 5, s_2[1, 2] = 11


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=3, max_dims=3, max_side=5),
                  elements=st.floats(0, 1e6, allow_nan=False)))
def test_json_and_csv_round_trip(tmp_path_factory, per_sample):
    folder = tmp_path_factory.mktemp("rt")
    files.write_head_scores_json(per_sample, folder / "head_scores.json")
    mean = per_sample.mean(axis=0)
    # allow_zero: the round trip holds for all-zero scores too (which allocation refuses)
    np.testing.assert_allclose(files.load_head_scores(folder / "head_scores.json", allow_zero=True), mean, rtol=1e-12)
    files.head_scores_frame(mean).to_csv(folder / "head_scores.csv", index=False)
    np.testing.assert_allclose(files.load_head_scores(folder / "head_scores.csv", shape=mean.shape, allow_zero=True), mean)


def test_csv_ranks_by_hand():
    frame = files.head_scores_frame(np.array([[0.1, 0.5], [0.5, 0.0]]))
    # 0.5 (0-1) and 0.5 (1-0) tie: layer-major order ranks 0-1 first
    assert frame.to_dict("list") == {
        "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [0.1, 0.5, 0.5, 0.0], "rank": [3, 1, 2, 4],
    }


# ---------------------------------------------------------------------------- analysis


def test_cumulative_and_top_share_by_hand():
    scores = np.array([[1.0, 3.0], [4.0, 2.0]])  # sorted 4, 3, 2, 1; total 10
    fractions, shares = rule.cumulative_share(scores)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(shares, [0, 0.4, 0.7, 0.9, 1])
    assert rule.top_share(scores, 0.25) == pytest.approx(0.4)
    assert rule.top_share(scores, 0.1) == pytest.approx(0.16)  # 0.1 / 0.25 of the way to 0.4
    assert rule.top_heads(scores, 2) == [(1, 0, 4.0), (0, 1, 3.0)]


def test_zero_scores_have_no_share():
    with pytest.raises(rule.InvalidHeadScoresError, match="zero"):
        rule.cumulative_share(np.zeros((2, 2)))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, (3, 4), elements=st.floats(0, 100, allow_nan=False)))
def test_cumulative_share_is_concave_and_above_the_diagonal(scores):
    if not scores.sum() > 0:
        return
    fractions, shares = rule.cumulative_share(scores)
    steps = np.diff(shares)
    assert shares[-1] == pytest.approx(1.0)
    assert (steps >= -1e-12).all() and (np.diff(steps) <= 1e-12).all()
    assert (shares >= fractions - 1e-12).all()


# ----------------------------------------------------------------------------- reports


def captured(argmax: list[list[list[int]]], prompt_len: int = 20) -> CapturedAttention:
    a = np.array(argmax, dtype=np.int64)
    return CapturedAttention(
        argmax=a, top_positions=a[..., None], top_weights=np.ones(a.shape + (1,), np.float32),
        key_lengths=prompt_len + np.arange(a.shape[0]),
    )


RECORD = {"doc_id": 0, "image_token_start": 10, "chunks": [{"chunk": "AB", "positions": [0, 1]}], "chars": []}


def sample(doc_id, texts, argmax, stop=None):
    record = {**RECORD, "doc_id": doc_id}
    return capture.SampleCapture(doc_id, GeneratedTokens.from_texts(texts, stop), captured(argmax), record, 20, 0.1)


def test_report_counts_matches_skips_and_samples_without_match(tmp_path):
    samples = [
        # "A" matches chunk "AB" (R = {10, 11}): head 0 at 10 hits, head 1 at 3 misses; "Q" no match; EOS
        sample(5, ["A", "Q", "</s>"], [[[10, 3]], [[10, 10]], [[10, 10]]], stop=[0, 0, 1]),
        # nothing matches in this sample: it scores 0 and is reported
        sample(6, ["Q", "Z"], [[[10, 10]], [[11, 11]]]),
    ]
    result = capture.score_captures(samples, "substring", "argmax")
    np.testing.assert_allclose(result.sample_scores, [[[0.5, 0.0]], [[0.0, 0.0]]])
    np.testing.assert_allclose(result.scores, [[0.25, 0.0]])  # mean over both samples
    summary = result.summary()
    assert summary["tokens_generated"] == 5 and summary["tokens_matched"] == 1
    assert summary["tokens_skipped"][rule.NO_MATCH] == 3 and summary["tokens_skipped"][rule.END_OF_SEQUENCE] == 1
    assert summary["samples_with_no_match"] == 1 and summary["doc_ids_with_no_match"] == [6]
    assert summary["top_heads"][0] == {"layer": 0, "head": 0, "score": 0.25}

    paths = step03.write_outputs(step03.Config(run_dir=str(tmp_path)), result, {"model_id": "m"}, samples=samples)
    assert sorted(paths) == ["findings.csv", "head_scores.csv", "head_scores.json", "scoring_report.json", "token_matches.csv"]
    assert {p.parent for p in paths.values()} == {tmp_path / "03_head_scoring"}
    report = json.loads(paths["scoring_report.json"].read_text())
    assert report["model_id"] == "m" and report["samples_with_no_match"] == 1
    assert json.loads(paths["head_scores.json"].read_text()) == {"0-0": [0.5, 0.0], "0-1": [0.0, 0.0]}
    tokens = pd.read_csv(paths["token_matches.csv"])
    assert tokens["reason"].tolist() == ["matched", "no_match", "end_of_sequence", "no_match", "no_match"]
    assert tokens["heads_hit"].tolist() == [1, 0, 0, 0, 0]


def test_topk_needs_captured_positions():
    s = sample(1, ["A"], [[[10, 3]]])
    with pytest.raises(rule.HeadScoringConfigError, match="top_k=3"):
        capture.score_captures([s], "substring", "topk", top_k=3)


def test_compare_variants_scores_every_combination():
    variants = capture.compare_variants([sample(1, ["A"], [[[10, 3]]])], top_k=1)
    assert sorted(variants) == ["char_box/argmax", "char_box/topk", "substring/argmax", "substring/topk"]
    assert variants["char_box/argmax"].reason_counts()[rule.NO_CHAR_BOXES] == 1
