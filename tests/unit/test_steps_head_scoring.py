"""Step 03's declaration, config, outputs and findings (sparsemm_utils.steps.head_scoring), on
hand-made scores and reports: no model, no notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsemm_utils import head_scoring_rule as rule
from sparsemm_utils.findings import findings_frame
from sparsemm_utils.head_scoring_capture import HeadScoringResult
from sparsemm_utils.head_scoring_rule import TokenMatch
from sparsemm_utils import text_heads as th
from sparsemm_utils.steps import head_scoring as step03

# ------------------------------------------------------------------------------ declaration


def test_step_declares_its_inputs_and_every_output():
    assert step03.STEP.name == "03_head_scoring"
    assert step03.STEP.needs == ("01_ocr_annotation", "02_patch_mapping")
    assert step03.STEP.output_names == (
        "head_scores.json",
        "head_scores.csv",
        "scoring_report.json",
        "token_matches.csv",
        "findings.csv",
    )
    assert step03.HEAD_SCORES.key == "03_head_scoring/head_scores.json"


# ---------------------------------------------------------------------------------- config


def test_config_defaults_and_errors():
    cfg = step03.Config()
    assert (cfg.match, cfg.selection, cfg.max_new_tokens, cfg.capture, cfg.batch_size) == ("substring", "argmax", 1024, "streamed", 1)
    assert cfg.prompt == "Provide all the OCR results of this image."
    with pytest.raises(rule.HeadScoringConfigError, match="'substring', 'char_box'"):
        step03.Config(match="chunks")
    with pytest.raises(rule.HeadScoringConfigError, match="n_samples"):
        step03.Config(n_samples=0)
    with pytest.raises(rule.HeadScoringConfigError, match="capture"):
        step03.Config(capture="eager")
    with pytest.raises(rule.HeadScoringConfigError, match="top_k"):
        step03.Config(top_k=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_dir": ""}, "run_dir must be a non-empty path"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
        ({"selection": "max"}, "selection"),
        ({"token_text": "bytes"}, "token_text"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"explorer_tokens": -1}, "explorer_tokens"),
        ({"threads": 1.5}, "threads"),
        ({"device": None}, "dtype and device must be strings"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": step03.MAX_BATCH_SIZE + 1}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
    ],
)
def test_config_errors_name_the_parameter(kwargs, message):
    with pytest.raises(rule.HeadScoringConfigError, match=message):
        step03.Config(**kwargs)


def test_config_to_dict_is_json_ready():
    cfg = step03.Config(run_dir=Path("runs/x"), n_samples=3)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["run_dir"] == "runs/x" and data["n_samples"] == 3 and data["prompt"] == cfg.prompt


# ---------------------------------------------------------------------------------- outputs


def _result() -> HeadScoringResult:
    """Two samples of a 2-layer x 2-head model. Sample 7: token 0 matched a 2-position region and
    hit heads L0H0 and L1H1 (1/2 each), token 1 was ambiguous, token 2 the stop token. Sample 8:
    its one token matched a 1-position region and hit L1H1 (1)."""
    region2, region1 = np.array([30, 31]), np.array([40])
    return HeadScoringResult(
        sample_scores=np.array([[[0.5, 0.0], [0.0, 0.5]], [[0.0, 0.0], [0.0, 1.0]]]),
        doc_ids=[7, 8],
        matches=[
            [TokenMatch(rule.MATCHED, region2, (0,)), TokenMatch(rule.AMBIGUOUS), TokenMatch(rule.END_OF_SEQUENCE)],
            [TokenMatch(rule.MATCHED, region1, (1,))],
        ],
        hits=[
            np.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool),
            np.array([[[0, 0], [0, 1]]], dtype=bool),
        ],
        match="substring",
        selection="argmax",
        top_k=1,
    )


def test_write_outputs_writes_every_declared_output_and_each_reads_back(tmp_path):
    cfg = step03.Config(run_dir=str(tmp_path), model_id="data/tiny_reader")
    result = _result()
    paths = step03.write_outputs(cfg, result, {"layers": 2})
    assert sorted(paths) == sorted(step03.STEP.output_names)
    for artifact in step03.STEP.outputs:
        assert paths[artifact.name] == tmp_path / "03_head_scoring" / artifact.name and artifact.exists(tmp_path)
    # S = mean over the two samples: [[0.25, 0], [0, 0.75]]
    np.testing.assert_allclose(step03.HEAD_SCORES.read(tmp_path), [[0.25, 0.0], [0.0, 0.75]])
    table = step03.HEAD_SCORES_CSV.read(tmp_path)
    assert table.sort_values("rank")[["layer", "head"]].values.tolist()[:2] == [[1, 1], [0, 0]]
    report = step03.SCORING_REPORT.read(tmp_path)
    assert (report["tokens_generated"], report["tokens_matched"], report["layers"]) == (4, 2, 2)
    tokens = step03.TOKEN_MATCHES.read(tmp_path)
    assert tokens["reason"].tolist() == ["matched", "ambiguous", "end_of_sequence", "matched"]
    assert tokens["heads_hit"].tolist() == [2, 0, 0, 1]
    written = step03.FINDINGS.read(tmp_path)
    expected = findings_frame(step03.findings(result.scores, {"model_id": cfg.model_id, **report}))
    assert written["this_run"].tolist() == expected["this_run"].tolist()
    assert written["holds"].tolist() == expected["holds"].tolist()


# --------------------------------------------------------------------------------- findings


def _report(**overrides):
    report = {
        "model_id": "data/tiny_reader",
        "match": "substring",
        "selection": "argmax",
        "samples": 3,
        "tokens_generated": 10,
        "tokens_matched": 6,
        "tokens_skipped": {"end_of_sequence": 1, "no_match": 1, "ambiguous": 2, "unaligned": 0},
        "samples_with_no_match": 0,
    }
    return {**report, **overrides}


def _concentrated() -> np.ndarray:
    """4 layers x 5 heads = 20 heads (5% = 1 head, 10% = 2 heads): L1H2 holds 12, L2H0 holds 4 and the
    18 others 2/9 each, 20 in all. Top 5%: 12 / 20 = 60%; top 10%: 16 / 20 = 80%."""
    scores = np.full((4, 5), 2 / 9)
    scores[1, 2], scores[2, 0] = 12.0, 4.0
    return scores


def _by_claim(found):
    return {f.claim: f for f in found}


def test_findings_by_hand_on_concentrated_scores():
    found = step03.findings(_concentrated(), _report())
    assert [f.step for f in found] == ["03_head_scoring"] * 4
    tokens, top5, top10, where = found
    assert tokens.holds is True and tokens.n == 10 and tokens.headline
    assert tokens.this_run == (
        "6 of 10 generated tokens matched one region (60%) with the substring/argmax rule, in 3 of 3 samples; "
        "skipped: 2 ambiguous, 1 end_of_sequence, 1 no_match"
    )
    # 60% >= 55% - 10 points; 80% >= 77% - 10 points
    assert (top5.holds, top5.n, top5.headline) == (True, 20, False)
    assert top5.this_run.startswith("60.0% of the score in the top 5% of the 20 heads (1.0 heads")
    assert "55%" in top5.paper and "LLaVA-NeXT-Vicuna-7B" in top5.paper
    assert (top10.holds, top10.headline) == (True, True) and top10.this_run.startswith("80.0% ")
    # top five: L1H2, L2H0, then the ties in layer-major order L0H0, L0H1, L0H2: 2 of 5 in layers 1-2
    assert where.n == 5 and where.holds is False
    assert where.this_run == (
        "the 5 strongest heads L1H2, L2H0, L0H0, L0H1, L0H2 sit in layers 0-2 of 4; 2 of 5 in the middle half (layers 1-2)"
    )
    assert where.paper.startswith("L14H24, L15H14, L15H12, L21H30, L16H19 sit in layers 14-16, 21 of 32; 5 of 5")


def test_equal_scores_are_not_concentrated_and_a_sample_without_match_fails():
    found = _by_claim(step03.findings(np.ones((4, 5)), _report(samples_with_no_match=1)))
    assert found["every sample has generated tokens the hit rule can score"].holds is False
    assert "in 2 of 3 samples" in found["every sample has generated tokens the hit rule can score"].this_run
    top10 = found["the top 10% of heads hold about 77% of the visual score"]
    assert top10.holds is False and top10.this_run.startswith("10.0% of the score")


def test_random_weights_cannot_tell():
    found = step03.findings(_concentrated(), _report(model_id="tiny-random/qwen2_vl"))
    assert found[0].holds is True  # the token counts do not depend on the weights
    for finding in found[1:]:
        assert finding.holds is None
        assert "tiny-random/qwen2_vl has random weights" in finding.this_run


def test_all_zero_scores_cannot_tell():
    found = step03.findings(np.zeros((2, 3)), _report(tokens_matched=0, samples_with_no_match=3))
    assert found[0].holds is False and found[0].this_run.startswith("0 of 10 generated tokens matched one region (0%)")
    assert [f.holds for f in found[1:]] == [None, None, None]
    assert all("all scores are zero" in f.this_run for f in found[1:])
    assert found[3].n == 0


def test_findings_reject_a_report_without_counts():
    report = _report()
    del report["tokens_matched"], report["model_id"]
    with pytest.raises(rule.HeadScoringError, match=r"lacks \['model_id', 'tokens_matched'\]"):
        step03.findings(np.ones((2, 2)), report)
    with pytest.raises(rule.HeadScoreShapeError):
        step03.findings(np.ones(4), _report())


def test_middle_layers():
    assert step03.middle_layers(32) == list(range(8, 24))
    assert step03.middle_layers(4) == [1, 2]
    assert step03.middle_layers(1) == [0]
    with pytest.raises(rule.HeadScoringError, match="layers"):
        step03.middle_layers(0)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, (3, 7), elements=st.floats(0, 50, allow_nan=False)))
def test_share_verdicts_follow_the_tolerance(scores):
    found = step03.findings(scores, _report())
    for finding, (fraction, paper) in zip(found[1:3], sorted(rule.PAPER_TOP_SHARE.items())):
        if not scores.sum() > 0:
            assert finding.holds is None
        else:
            assert finding.holds == (rule.top_share(scores, fraction) >= paper - step03.SHARE_TOLERANCE)
    frame = findings_frame(found)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 4


# ------------------------------------------------------------------------- text-copy heads


def test_text_parameters_defaults_and_errors():
    cfg = step03.Config()
    assert (cfg.text_heads, cfg.text_samples) == (True, 24)
    assert step03.Config(text_samples=None).text_samples is None
    with pytest.raises(rule.HeadScoringConfigError, match="text_heads must be True or False"):
        step03.Config(text_heads="yes")
    with pytest.raises(rule.HeadScoringConfigError, match="text_samples"):
        step03.Config(text_samples=0)


def test_the_text_scores_are_an_optional_output():
    assert step03.TEXT_HEAD_SCORES.key == "03_head_scoring/text_head_scores.json"
    assert step03.OPTIONAL_OUTPUTS == (step03.TEXT_HEAD_SCORES,)
    assert step03.TEXT_HEAD_SCORES.name not in step03.STEP.output_names  # text_heads=False does not write it


def _copy_sample(hits_by_token: list[list[list[int]]]) -> th.CopySample:
    """A copy sample of a 2 x 2 model: T answer tokens (ids 1..T at positions T+1..2T), each with
    its own source (positions 0..T-1); token t's heads look at its source where
    ``hits_by_token[t]`` is 1, else at the separator (position T)."""
    t = len(hits_by_token)
    ids = list(range(1, t + 1)) + [0] + list(range(1, t + 1))
    targets, reasons = th.align_answer(ids, list(range(t)), list(range(t + 1, 2 * t + 1)))
    chat = th.CopyChat(0, "text", np.asarray(ids), np.arange(t), np.arange(t + 1, 2 * t + 1), targets, reasons)
    argmax = np.where(np.asarray(hits_by_token, dtype=bool), targets[:, None, None], t)
    return th.score_copy_sample(chat, argmax)


def test_write_outputs_with_text_heads(tmp_path):
    cfg = step03.Config(run_dir=str(tmp_path), model_id="data/tiny_reader")
    # S_copy = mean of [[2, 0], [0, 1]] and [[0, 0], [0, 2]] = [[1, 0], [0, 1.5]]
    text = th.TextHeadResult(
        [_copy_sample([[[1, 0], [0, 1]], [[1, 0], [0, 0]]]), _copy_sample([[[0, 0], [0, 1]], [[0, 0], [0, 1]]])],
        doc_ids_without_text=[],
    )
    np.testing.assert_array_equal(text.sample_scores, [[[2, 0], [0, 1]], [[0, 0], [0, 2]]])
    paths = step03.write_outputs(cfg, _result(), {"layers": 2}, text=text)
    assert sorted(paths) == sorted([*step03.STEP.output_names, "text_head_scores.json"])
    np.testing.assert_allclose(step03.TEXT_HEAD_SCORES.read(tmp_path), [[1.0, 0.0], [0.0, 1.5]])
    report = step03.SCORING_REPORT.read(tmp_path)["text_heads"]
    assert (report["samples"], report["answer_tokens"], report["tokens_scored"]) == (2, 4, 4)
    # visual S = [[0.25, 0], [0, 0.75]]: top 10% of 4 heads = 1 head, L1H1 in both; chance 1/4
    overlap = report["comparison"]["top_overlap"]
    assert (overlap["k"], overlap["shared"], overlap["chance"], overlap["p_value"]) == (1, ["L1H1"], 0.25, 0.25)
    written = step03.FINDINGS.read(tmp_path)
    assert len(written) == 4 + 3  # no SmolLM2-shaped model: no named-heads claim
    expected = findings_frame(
        step03.findings(_result().scores, {"model_id": cfg.model_id, **step03.SCORING_REPORT.read(tmp_path)}, text.scores)
    )
    assert written["this_run"].tolist() == expected["this_run"].tolist()
    # rerun without text heads: the old text scores go, the findings lose their text claims
    paths = step03.write_outputs(cfg, _result(), {"layers": 2})
    assert not step03.TEXT_HEAD_SCORES.exists(tmp_path) and "text_heads" not in step03.SCORING_REPORT.read(tmp_path)
    assert len(step03.FINDINGS.read(tmp_path)) == 4


def _text_report(**overrides):
    text = {
        "samples": 8,
        "answer_tokens": 90,
        "tokens_scored": 60,
        "tokens_skipped": {th.DUPLICATE: 25, th.NOT_IN_SOURCE: 5},
        "top_heads": [
            {"layer": 1, "head": 2, "score": 12.0, "hit_rate": 0.8},
            {"layer": 2, "head": 0, "score": 4.0, "hit_rate": 0.4},
            {"layer": 0, "head": 0, "score": 0.2, "hit_rate": 0.02},
        ],
        **overrides,
    }
    return _report(text_heads=text)


def test_text_findings_by_hand_when_the_copy_heads_are_the_visual_heads():
    scores = _concentrated()
    found = step03.findings(scores, _text_report(), scores)
    assert len(found) == 7 and [f.headline for f in found[4:]] == [False] * 3
    concentrated, overlap, correlation = found[4:]
    # 60% / 80% of the copy score; 80% >= 83% - 10 points
    assert concentrated.holds is True and concentrated.n == 20
    assert concentrated.this_run == (
        "the top 5% hold 60.0% and the top 10% hold 80.0% of the copy score of the 20 heads; strongest (hit rate): "
        "L1H2 (0.80), L2H0 (0.40), L0H0 (0.02); 60 of 90 answer tokens scored in 8 documents "
        "(skipped: 25 duplicate_in_source, 5 not_in_source)"
    )
    assert concentrated.paper.startswith("not in the paper (SparseMM scores visual heads only")
    assert "measured on SmolLM2-135M's own copy heads (issue 20): the top 5% hold 67% and the top 10% hold 83%" in concentrated.paper
    # the top 2 of 20 heads are the same: p = 1 / C(20, 2) = 1 / 190
    assert overlap.holds is True and overlap.this_run == (
        "2 of the top 2 visual heads are among the top 2 copy heads (100%; two random sets of 2 of the 20 heads share "
        "10% on average, p = 0.0053 of sharing as many): L1H2, L2H0"
    )
    assert overlap.paper == "not in the paper (SparseMM scores visual heads only and reports nothing on text-copy heads)"
    assert correlation.holds is True and correlation.this_run.startswith("Spearman's rho = +1.00 between the visual")


def test_text_findings_when_the_copy_heads_are_elsewhere():
    visual = _concentrated()
    copy = np.full((4, 5), 0.1)
    copy[3, 4], copy[0, 1] = 9.0, 8.0  # two other heads copy, nothing ranks like the visual scores
    found = _by_claim(step03.findings(visual, _text_report(), copy))
    overlap = found["the visual heads are the language model's own copy heads (top 10% overlap)"]
    assert overlap.holds is False and overlap.this_run.startswith("0 of the top 2 visual heads")
    assert "p = 1 of sharing" in overlap.this_run
    correlation = found["heads that copy text also read the image (rank correlation)"]
    assert correlation.holds is False


def test_text_findings_on_random_weights_and_zero_scores_cannot_tell():
    scores = _concentrated()
    found = step03.findings(scores, _text_report(), scores)
    random_model = step03.findings(scores, {**_text_report(), "model_id": "tiny-random/llava_next"}, scores)
    assert [f.holds for f in random_model[4:]] == [None, None, None]
    assert all("tiny-random/llava_next has random weights" in f.this_run for f in random_model[4:])
    assert random_model[5].this_run.startswith(found[5].this_run)  # the numbers are still shown
    zero = step03.findings(scores, _text_report(tokens_scored=0), np.zeros((4, 5)))
    assert [f.holds for f in zero[4:]] == [None, None, None]
    assert all("all text-copy scores are zero" in f.this_run for f in zero[4:])
    no_visual = step03.findings(np.zeros((4, 5)), _text_report(), scores)
    assert [f.holds for f in no_visual[5:]] == [None, None]
    assert all(f.this_run == "all visual scores are zero: there are no visual heads to compare" for f in no_visual[5:])


def test_the_smollm2_heads_are_checked_on_a_model_of_its_shape():
    ref = th.SMOLLM2_COPY_HEADS
    copy = np.full((30, 9), 0.01)
    for rank, (l, h, _) in enumerate(ref.top_heads):
        copy[l, h] = 10.0 - rank
    visual = np.random.default_rng(0).random((30, 9))
    found = _by_claim(step03.findings(visual, _text_report(), copy))
    named = found["the strongest copy heads are SmolLM2-135M's"]
    assert named.holds is True and named.n == 6
    assert named.this_run == "6 of the 6 are among this run's top 27 copy heads (L18H6, L17H4, L23H2, L17H5, L17H3, L18H7)"
    assert named.paper.endswith("(issue 20): L18H6 (0.75), L17H4 (0.70), L23H2 (0.56), L17H5, L17H3, L18H7")
    moved = np.roll(copy, 5, axis=0)  # the same heads five layers down
    assert _by_claim(step03.findings(visual, _text_report(), moved))["the strongest copy heads are SmolLM2-135M's"].holds is False


def test_text_findings_need_the_text_report_and_one_shape():
    with pytest.raises(rule.HeadScoringError, match="text_heads"):
        step03.findings(np.ones((2, 2)), _report(), np.ones((2, 2)))
    with pytest.raises(rule.HeadScoreShapeError, match="text-copy head scores"):
        step03.findings(np.ones((2, 2)), _text_report(), np.ones((2, 3)))
