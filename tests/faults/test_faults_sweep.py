"""Fault cases of step 05's resumable sweep (docs/faults.md, "Resumable sweep"): finished cells
are resumed only after every line of results.csv and predictions.jsonl is checked against the
ledger the sweep writes as it goes. A fake generator stands in for the model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sparsemm_utils import pipeline as pl
from sparsemm_utils.artifacts import Artifact, StepSpec
from sparsemm_utils.benchmarks import EvalSample
from sparsemm_utils.evaluation import (
    LEDGER_FILE,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    SweepMismatchError,
    SweepTamperedError,
    read_predictions,
    read_results,
    run_sweep,
    verify_ledger,
)
from sparsemm_utils.manifest import Manifest, sha256_file

IMAGE = Image.new("RGB", (8, 8), "white")
SAMPLES = [EvalSample(str(i), IMAGE, f"q{i}", (a,), {}) for i, a in enumerate(["yes", "no", "red"])]


class Generator:
    """Answers every sample right; counts its calls; raises at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[str, str, int | None]] = []
        self.fail_at = fail_at

    def __call__(self, sample, spec, method, budget):
        if len(self.calls) == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls.append((sample.sample_id, method, budget))
        return sample.answers[0] if method == "fullkv" else "?"


def _sweep(out: Path, generate=None, **kwargs):
    args = {
        "model": "fake/model", "benchmarks": {"textvqa": SAMPLES}, "methods": ["fullkv", "snapkv"],
        "budgets": [16, 32], "generate": generate or Generator(), "settings": {"window": 8}, "progress": False, "log": None,
    }  # fmt: skip
    return run_sweep(out, **{**args, **kwargs})


@pytest.fixture()
def finished(tmp_path) -> Path:
    out = tmp_path / "05_eval"
    _sweep(out)
    return out


@pytest.fixture()
def half_done(tmp_path) -> Path:
    """A sweep that crashed at its fifth answer. The sweep goes sample by sample, every cell of a
    sample at once: sample 0 is answered in all three cells, sample 1 in fullkv only, and no cell
    has finished, so results.csv is not written yet."""
    out = tmp_path / "05_eval"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _sweep(out, Generator(fail_at=4))
    return out


def _set_score(line: str, score: str = "0.25") -> str:
    """A results.csv row with its score column replaced."""
    fields = line.split(",")
    fields[5] = score
    return ",".join(fields)


def _replace_line(path: Path, number: int, edit) -> None:
    """Edit line ``number`` of ``path`` as a text editor would (other lines keep their bytes)."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines(keepends=True)
    lines[number - 1] = edit(lines[number - 1])
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("".join(lines))


def test_a_hand_edited_score_in_results_csv_is_detected(finished):
    path = finished / RESULTS_FILE
    recorded = verify_ledger(finished)
    _replace_line(path, 2, _set_score)
    generate = Generator()
    with pytest.raises(SweepTamperedError) as info:
        _sweep(finished, generate)
    message = str(info.value)
    assert f"{path} line 2 is not what the sweep wrote" in message and "0.25" in message
    assert "records sha256" in message and "the line now has" in message
    assert "move results.csv, predictions.jsonl, sweep_ledger.jsonl, sweep.json out of" in message
    assert generate.calls == [] and recorded[RESULTS_FILE] == (4, 0)
    assert "0.25" in path.read_text()  # left as found for the user to inspect


@pytest.mark.parametrize(
    "name, line, old, new, expected",
    [(PREDICTIONS_FILE, 5, '"prediction": "?"', '"prediction": "red"',
      r"predictions.jsonl line 5 is not what the sweep wrote \(cell textvqa/snapkv@16, sample 1\)"),
     (LEDGER_FILE, 3, '"line": 3', '"line": 7', f"{LEDGER_FILE} line 3 is not a record the sweep writes.*the ledger was edited")],
    ids=["prediction-edited", "ledger-edited"],
)  # fmt: skip
def test_an_edited_prediction_or_ledger_line_is_detected(finished, name, line, old, new, expected):
    _replace_line(finished / name, line, lambda text: text.replace(old, new))
    with pytest.raises(SweepTamperedError, match=expected):
        _sweep(finished)


def test_a_deleted_prediction_line_is_detected(finished):
    path = finished / PREDICTIONS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))
    with pytest.raises(SweepTamperedError, match="predictions.jsonl line 3 is not what the sweep wrote"):
        _sweep(finished)


def test_finished_rows_cut_off_results_csv_are_detected(finished):
    path = finished / RESULTS_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(SweepTamperedError, match=r"results.csv has 2 complete line\(s\) but the sweep wrote 4.*line 3 onward was deleted"):
        _sweep(finished)


def test_a_line_cut_mid_write_is_dropped_and_regenerated(half_done):
    path = half_done / PREDICTIONS_FILE
    path.write_text(path.read_text() + '{"model": "fake/model", "benchm')
    lines: list[str] = []
    resumed = _sweep(half_done, log=lines.append)
    assert any("dropped 1 line(s) at the end of predictions.jsonl" in line for line in lines)
    assert resumed.reused == 4 and read_predictions(path)[1] == 0
    assert verify_ledger(half_done)[PREDICTIONS_FILE] == (9, 0)


def test_a_line_written_but_not_recorded_is_regenerated(half_done, tmp_path):
    """A crash between writing a prediction and recording it in the ledger: the unrecorded line is
    not trusted; the sample is answered again, and the sweep ends as a clean one does."""
    path = half_done / PREDICTIONS_FILE
    record = json.loads(path.read_text().splitlines()[-1]) | {"sample_id": "1", "prediction": "yes"}
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    generate = Generator()
    result = _sweep(half_done, generate)
    assert generate.calls[0] == ("1", "snapkv", 16)
    pd.testing.assert_frame_equal(result.results, _sweep(tmp_path / "clean").results)


def test_a_fake_results_row_appended_by_hand_is_not_kept(tmp_path):
    """textvqa's cells finished (its rows are in results.csv) and docvqa crashed at its second
    answer; a row appended by hand for an unfinished docvqa cell is not taken as its result."""
    two = {"textvqa": SAMPLES, "docvqa": SAMPLES}
    out = tmp_path / "05_eval"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _sweep(out, Generator(fail_at=10), benchmarks=two)
    path = out / RESULTS_FILE
    assert len(read_results(path)) == 3  # textvqa's three cells
    path.write_text(path.read_text() + "fake/model,docvqa,snapkv,16,anls,1.0,3\n")
    generate = Generator()
    result = _sweep(out, generate, benchmarks=two)
    assert ("2", "snapkv", 16) in generate.calls  # the cell was computed, not taken from the fake row
    pd.testing.assert_frame_equal(result.results, _sweep(tmp_path / "clean", benchmarks=two).results)


def test_results_without_a_ledger_are_not_resumed(finished):
    (finished / LEDGER_FILE).unlink()
    with pytest.raises(SweepMismatchError, match=f"no {LEDGER_FILE}.*cannot be verified"):
        _sweep(finished, on_mismatch="error")
    generate = Generator()
    _sweep(finished, generate, on_mismatch="archive")
    (archived,) = (finished / "superseded").iterdir()
    assert (archived / RESULTS_FILE).is_file() and len(generate.calls) == 9


def test_a_ledger_cut_mid_write_is_repaired(half_done):
    ledger = half_done / LEDGER_FILE
    ledger.write_text(ledger.read_text() + '{"file": "predictions.js')
    generate = Generator()
    _sweep(half_done, generate)
    assert len(generate.calls) == 9 - 4
    assert verify_ledger(half_done) == {RESULTS_FILE: (4, 0), PREDICTIONS_FILE: (9, 0)}


# ------------------------------------------------------------------------- through the pipeline

SWEEP_STEP = StepSpec(
    "01_sweep",
    "a resumable sweep with a fake generator",
    outputs=(Artifact("01_sweep", RESULTS_FILE, "scores"), Artifact("01_sweep", PREDICTIONS_FILE, "answers")),
    resumable=True,
)
SWEEP_CELL = """
from pathlib import Path
from PIL import Image
from sparsemm_utils.benchmarks import EvalSample
from sparsemm_utils.evaluation import run_sweep
samples = [EvalSample(str(i), Image.new("RGB", (8, 8)), "q", ("yes",), {}) for i in range(3)]
run_sweep(Path(run_dir) / "01_sweep", model="fake/model", benchmarks={"textvqa": samples}, methods=["fullkv"],
          budgets=[], generate=lambda *a: "yes", progress=False)
"""


@pytest.mark.slow
def test_a_hand_edited_results_csv_stops_the_resumable_step_and_is_never_recorded_as_good(tmp_path, write_notebook):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    write_notebook(root / "notebooks" / "01_sweep.ipynb", 'run_dir = "runs/dev"', [SWEEP_CELL])
    run = tmp_path / "run"
    config = pl.PipelineConfig(name="sweep")
    pl.run_pipeline(config, run, steps=(SWEEP_STEP,), root=root, log=lambda _: None)
    results = run / "01_sweep" / RESULTS_FILE
    _replace_line(results, 2, _set_score)
    edited = sha256_file(results)
    for _ in range(2):  # the rerun the edit triggers, and the one after it
        with pytest.raises(pl.StepFailedError, match="SweepTamperedError.*results.csv line 2 is not what the sweep wrote"):
            pl.run_pipeline(config, run, steps=(SWEEP_STEP,), root=root, log=lambda _: None)
        manifest = Manifest.read(run / "01_sweep")
        assert manifest.status == "failed" and edited not in {o.sha256 for o in manifest.outputs}
    assert sha256_file(results) == edited and read_results(results)["score"].tolist() == [0.25]
