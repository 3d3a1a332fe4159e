"""Step 00's declarations: the notebook's Config, write_outputs and the reader's findings against
the project's targets, on hand-made summaries and a hand-made reader folder. No model, no notebook."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sparsemm_utils.findings import FINDINGS_COLUMNS
from sparsemm_utils.steps import tiny_reader as step
from sparsemm_utils.tiny_reader.card import TARGET_CHARS, TARGET_EXACT, TARGET_MINUTES
from sparsemm_utils.tiny_reader.config import DEFAULT_READER_DIR, TrainConfigError
from sparsemm_utils.tiny_reader.training import PREVIOUS_STAGE_DIR, TRAIN_LOG

# ocr and line meet both targets; value misses exact match (0.85 < 0.90) and characters (0.95 < 0.98)
SUMMARY = {
    "ocr": {"n": 20, "exact_match": 0.95, "char_accuracy": 0.99},
    "line": {"n": 20, "exact_match": 0.90, "char_accuracy": 0.98},
    "value": {"n": 16, "exact_match": 0.85, "char_accuracy": 0.95},
    "all": {"n": 56, "exact_match": 0.9, "char_accuracy": 0.975},
}


def test_targets_are_the_projects():
    assert (TARGET_EXACT, TARGET_CHARS, TARGET_MINUTES) == (0.90, 0.98, 60)


def test_step_declares_its_outputs():
    assert step.STEP.name == "00_tiny_reader" and step.STEP.needs == ()
    assert step.STEP.output_names == (
        "eval_results.json", "findings.csv", "fig_samples.png", "fig_training.png", "fig_accuracy.png", "fig_predictions.png",
    )
    assert step.STEP.notebook_path().is_file()


def test_config_validation():
    cfg = step.Config()
    assert (cfg.run_dir, cfg.model_id) == ("runs/tiny", "data/tiny_reader")  # configs/tiny.yaml's values
    assert cfg.reader_dir == DEFAULT_READER_DIR
    assert step.Config(model_id="tiny-random/qwen2_vl").reader_dir == DEFAULT_READER_DIR  # no reader behind that id
    assert step.Config(retrain=True, run_dir="/tmp/x").reader_dir.as_posix() == "/tmp/x/00_tiny_reader/reader"
    with pytest.raises(TrainConfigError, match="no reader checkpoint"):
        step.Config(model_id="data/no_such_reader")
    for bad, name in ((dict(n_eval_docs=0), "n_eval_docs"), (dict(retrain="yes"), "retrain"),
                      (dict(train_steps=-1), "train_steps"), (dict(run_dir=""), "run_dir"), (dict(seed=1.5), "seed")):
        with pytest.raises(TrainConfigError, match=name):
            step.Config(**bad)


def test_findings_against_the_targets():
    out = step.findings(SUMMARY, 54.26, 6500, source="the model card's 20 held-out pages")
    assert [f.claim for f in out][:3] == [f"the reader answers `{t}` questions exactly" for t in ("ocr", "line", "value")]
    assert [f.holds for f in out] == [True, True, False, False, True]  # line's 0.90 meets ">= 0.90"
    assert [f.n for f in out] == [20, 20, 16, 56, 6500]
    assert out[2].this_run == "exact match 0.850 on the model card's 20 held-out pages"
    assert out[3].this_run.startswith("character accuracy ocr 0.9900, line 0.9800, value 0.9500; all questions together 0.9750")
    assert out[4].this_run == "54.3 minutes of optimizer wall time over 6500 steps (its training_log.csv)"
    assert all("project's target" in f.paper and "not a paper value" in f.paper for f in out)
    assert "exact match >= 0.90" in out[0].paper and "character accuracy >= 0.98" in out[3].paper and "<= 60 minutes" in out[4].paper
    # headlines: the task with the lowest exact match (value) and the training time
    assert [f.headline for f in out] == [False, False, True, False, True]


def test_findings_flip_with_the_numbers():
    good = {t: {"n": 4, "exact_match": 1.0, "char_accuracy": 1.0} for t in ("ocr", "line", "value")}
    out = step.findings(good, 61.0, 10, source="x")
    assert [f.holds for f in out] == [True, True, True, True, False]
    assert out[3].n == 12  # no "all" row: the tasks' questions added up
    assert [f.headline for f in out] == [True, False, False, False, True]  # ties: the first task


def test_findings_refuse_bad_input():
    with pytest.raises(step.ReaderResultsError, match="lacks"):
        step.findings({"ocr": {"n": 3, "exact_match": 1.0}}, 1.0, 1, source="x")
    with pytest.raises(step.ReaderResultsError, match="no task"):
        step.findings({"all": SUMMARY["all"]}, 1.0, 1, source="x")
    with pytest.raises(step.ReaderResultsError, match="training_minutes"):
        step.findings(SUMMARY, -1.0, 1, source="x")
    with pytest.raises(step.ReaderResultsError, match="training_steps"):
        step.findings(SUMMARY, 1.0, -1, source="x")


def _reader(tmp_path, *, card: bool, stages: tuple[float, ...] = (600.0,)):
    """A reader folder with training logs of ``stages`` (seconds each, two steps per stage; the
    last stage in ``training/``, earlier ones in ``previous_stage``) and, when ``card``, a model
    card evaluation of 200 pages."""
    reader = tmp_path / "reader"
    folder = reader / "training"
    for seconds in reversed(stages):
        folder.mkdir(parents=True)
        pd.DataFrame({"step": [0, 1], "task": ["ocr", "line"], "elapsed": [seconds / 2, seconds]}).to_csv(folder / TRAIN_LOG, index=False)
        folder = folder / PREVIOUS_STAGE_DIR
    if card:
        (reader / "training" / "eval_results.json").write_text(json.dumps({"n_docs": 200, "summary": SUMMARY, "records": []}))
    return reader


EVALUATION = {
    "summary": {"ocr": {"n": 1, "exact_match": 1.0, "char_accuracy": 1.0}, "all": {"n": 1, "exact_match": 1.0, "char_accuracy": 1.0}},
    "records": [{"doc_id": 0, "task": "ocr", "prompt": "p", "answer": "A", "prediction": "A", "exact": True, "edit_distance": 0}],
    "seconds": 1.5,
    "extra": "not written",
}


def test_write_outputs_judges_the_model_card(tmp_path):
    reader = _reader(tmp_path, card=True, stages=(1800.0, 1500.0))
    written = step.write_outputs(tmp_path / "run", EVALUATION, reader)
    assert sorted(written) == ["eval_results.json", "findings.csv"]
    saved = step.EVAL_RESULTS.read(tmp_path / "run")
    assert saved == {k: EVALUATION[k] for k in ("summary", "records", "seconds")}
    found = step.FINDINGS.read(tmp_path / "run")
    assert list(found.columns) == list(FINDINGS_COLUMNS)
    assert found["holds"].tolist() == [True, True, False, False, True]
    assert "on the model card's 200 held-out pages" in found["this_run"][0]
    # two stages: 30 + 25 minutes over 4 steps
    assert found["this_run"].iloc[-1].startswith("55.0 minutes of optimizer wall time over 4 steps")


def test_write_outputs_without_a_card_judges_this_run(tmp_path):
    reader = _reader(tmp_path, card=False)
    step.write_outputs(tmp_path / "run", EVALUATION, reader)
    found = step.FINDINGS.read(tmp_path / "run")
    assert found["claim"].tolist()[0] == "the reader answers `ocr` questions exactly" and len(found) == 3
    assert "this notebook's held-out pages" in found["this_run"][0] and found["n"][0] == 1
    with pytest.raises(step.ReaderResultsError, match="lacks"):
        step.write_outputs(tmp_path / "run", {"summary": EVALUATION["summary"]}, reader)
    with pytest.raises(FileNotFoundError, match="training_log.csv is missing"):
        step.write_outputs(tmp_path / "run", EVALUATION, tmp_path / "no_reader")
