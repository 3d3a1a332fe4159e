"""Re-scoring a finished sweep (``evaluation.rescore_records`` / ``rescore_sweep``, step 05's
``rescore`` and its command): the same protocol gives back ``results.csv`` exactly; answers written
before the strip are scored as lmms-eval scores them; a tampered or missing file is refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from sparsemm_utils.benchmarks import EvalSample
from sparsemm_utils.findings import read_findings
from sparsemm_utils.steps import eval as step05
from sparsemm_utils.evaluation import (
    PREDICTIONS_FILE,
    RESULTS_COLUMNS,
    EvaluationError,
    Generation,
    SweepTamperedError,
    read_predictions,
    read_results,
    rescore_records,
    rescore_sweep,
    run_sweep,
)

IMAGE = Image.new("RGB", (8, 8), "white")
DOCVQA = [EvalSample(str(i), IMAGE, f"q{i}", (answer,), {"raw_question": f"q{i}"}) for i, answer in enumerate(["1998", "total", "12%", "Paris", "42"])]


def padded(sample, spec, method, budget):
    """FullKV answers right with whitespace around; SparseMM drops the last character of every
    answer; SnapKV answers "?". Padding makes the sweep keep ``raw_output``."""
    answer = sample.answers[0]
    if method == "fullkv":
        return Generation(f" {answer} \n", prompt_tokens=50)
    if method == "sparsemm":
        return Generation(answer[:-1] + "\n", prompt_tokens=50)
    return "?"


def _sweep(out, **kwargs):
    args = dict(
        model="fake/model", benchmarks={"docvqa": DOCVQA}, methods=["fullkv", "sparsemm", "snapkv", "mask"],
        budgets=[16, 32], generate=padded, settings={"window": 8}, method_limits={"mask": 3}, progress=False, log=None,
    )  # fmt: skip
    args.update(kwargs)
    return run_sweep(out, **args)


@pytest.mark.parametrize("protocol", ["0.3", "current"])
def test_rescoring_under_the_sweeps_own_protocol_gives_back_its_results(tmp_path, protocol):
    _sweep(tmp_path, lmms_eval=protocol)
    rescored = rescore_sweep(tmp_path, lmms_eval=protocol)
    expected = read_results(tmp_path)
    pd.testing.assert_frame_equal(rescored.results, expected, check_dtype=False)
    assert tuple(rescored.results.columns) == RESULTS_COLUMNS
    # the mask cell (3 samples) and the paired differences are part of it
    assert set(rescored.results.loc[rescored.results.method == "mask", "n_samples"]) == {3}
    assert rescored.results["sparsemm_minus_method"].notna().any()
    # the records are the sweep's own, field for field
    assert rescored.records == read_predictions(tmp_path)[0]


def test_an_answer_written_before_the_strip_is_scored_as_lmms_eval_scores_it():
    # worked by hand: lmms-eval strips "1999 \n" to "1999"; ANLS = 1 - 1/4 = 0.75. The unstripped
    # text gave 1 - 1/6 = 0.833 (its length counted the space and the newline).
    record = {
        "model": "m", "benchmark": "docvqa", "method": "fullkv", "budget": None, "sample_id": "0",
        "prediction": "1999 \n", "answers": ["1998"], "scores": {"anls": 1 - 1 / 6}, "extra": {},
    }  # fmt: skip
    rescored = rescore_records([record], lmms_eval="0.3")
    frame = rescored.results
    assert frame.loc[0, "metric"] == "anls"
    assert frame.loc[0, "score"] == pytest.approx(0.75)
    assert frame.loc[0, "n_samples"] == 1
    assert rescored.records[0]["prediction"] == "1999" and rescored.records[0]["raw_output"] == "1999 \n"
    # the model's text is read from raw_output where a record has one
    stripped = {**record, "prediction": "1999", "raw_output": "1998\n"}
    assert rescore_records([stripped], lmms_eval="0.3").results.loc[0, "score"] == pytest.approx(1.0)


def test_rescoring_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(EvaluationError, match="no predictions.jsonl"):
        rescore_sweep(tmp_path)
    with pytest.raises(EvaluationError, match="no prediction records"):
        rescore_records([])
    records = [
        {"model": name, "benchmark": "docvqa", "method": "fullkv", "budget": None, "sample_id": "0", "prediction": "a", "answers": ["a"], "extra": {}}
        for name in ("m1", "m2")
    ]
    with pytest.raises(EvaluationError, match="2 models"):
        rescore_records(records)
    run = tmp_path / "run"
    _sweep(step05.STEP.folder(run, create=True))
    with pytest.raises(EvaluationError, match="step 05's own folder"):
        step05.rescore(run, "0.3", out=step05.STEP.folder(run))
    with pytest.raises(EvaluationError, match="lmms_eval"):
        step05.rescore(run, "0.4")


def test_an_edited_answer_is_detected_before_rescoring(tmp_path):
    _sweep(tmp_path)
    path = tmp_path / PREDICTIONS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["raw_output"] = first["answers"][0]
    lines[0] = json.dumps(first, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SweepTamperedError):
        rescore_sweep(tmp_path)


def test_the_rescore_command_writes_the_steps_files_beside_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    step_dir = step05.STEP.folder(run, create=True)
    _sweep(step_dir)
    before = {p.name: p.read_bytes() for p in step_dir.iterdir()}
    assert step05.main(["rescore", "--run-dir", str(run), "--lmms-eval", "current"]) == 0
    out = run / step05.RESCORED_DIR / "current"
    printed = capsys.readouterr().out
    assert "anls" in printed and str(out / "findings.csv") in printed
    pd.testing.assert_frame_equal(read_results(out), read_results(step_dir), check_dtype=False)
    assert len(read_predictions(out)[0]) == 5 * (1 + 2 + 2) + 3
    assert not read_findings(out / "findings.csv").empty
    assert {p.name: p.read_bytes() for p in step_dir.iterdir()} == before  # the sweep is untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".writing-")]
    assert step05.main(["rescore", "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "no predictions.jsonl" in capsys.readouterr().err
