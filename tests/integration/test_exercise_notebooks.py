"""The exercise notebooks run end to end (papermill, headless) on the tiny run.

- The committed notebook, stub unfilled, stops exactly at its check with CheckFailed ("the stub is
  not filled in yet"): the exercise flows as a student meets it.
- The solution build (the stub replaced by the library's reference) runs top to bottom on the
  tiny run: its check passes every case, the comparison on the run agrees everywhere, and the
  figure is written into ``<run_dir>/exercises/<key>/``.

The run: by default the session's own chain run (``tiny_chain`` in tests/conftest.py, shared with
the chain test); with ``SPARSEMM_TEST_RUN`` (e.g. ``runs/tiny``) of ``SPARSEMM_TEST_CONFIG``
(default ``configs/tiny.yaml``) that run, brought up to date by the pipeline up to the last step an
exercise reads (unchanged steps are skipped; ``SPARSEMM_TEST_REUSE=1`` uses the run as it is).
Either way it is copied so that the notebooks write into the copy.
"""

from __future__ import annotations

import os
import shutil

import nbformat
import papermill as pm
import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.exercises import EXERCISES, build_notebook, exercises_dir, render
from sparsemm_utils.manifest import Manifest
from sparsemm_utils.runs import repo_root, resolve_run_dir

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]
IDS = [ex.key for ex in EXERCISES]


@pytest.fixture(scope="module")
def tiny_run(request, tmp_path_factory):
    """(config, run copy): by default the session's chain run (tests/conftest.py: tiny_chain);
    with SPARSEMM_TEST_RUN a run folder brought up to date by the pipeline (or reused as it is)."""
    if not os.environ.get("SPARSEMM_TEST_RUN"):
        run, config, _ = request.getfixturevalue("tiny_chain")
        copy = tmp_path_factory.mktemp("exercise_run") / "run"
        shutil.copytree(run, copy)
        return config, copy
    config = pl.load_config(os.environ.get("SPARSEMM_TEST_CONFIG") or repo_root() / "configs" / "tiny.yaml")
    order = [s.name for s in pl.STEPS]
    last = max((need for ex in EXERCISES for need in ex.needs), key=order.index)
    run = resolve_run_dir(os.environ["SPARSEMM_TEST_RUN"])
    if os.environ.get("SPARSEMM_TEST_REUSE", "") in ("", "0"):
        pl.run_pipeline(config, run, to_step=last)
    else:
        for step in pl.select_steps(None, last):
            manifest = Manifest.read(run / step.name)
            assert manifest is not None and manifest.status == "ok", f"SPARSEMM_TEST_REUSE: {step.name} has not run in {run}"
    copy = tmp_path_factory.mktemp("exercise_run") / "run"
    shutil.copytree(run, copy)
    return config, copy


def _text_outputs(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(str(output["data"].get("text/plain", "")))
    return "".join(parts)


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_the_unfilled_exercise_stops_at_its_check(ex, tmp_path):
    out = tmp_path / ex.filename
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(
            str(exercises_dir() / ex.filename), str(out), parameters={"run_dir": str(tmp_path / "no_run")},
            cwd=str(repo_root()), kernel_name="python3", progress_bar=False,
        )
    assert info.value.ename == "CheckFailed"
    assert "stub is not filled in yet" in info.value.evalue
    executed = nbformat.read(str(out), as_version=4)
    failing = [c for c in executed.cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failing) == 1 and f"{ex.checker}({ex.function})" in failing[0].source


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_the_solution_notebook_runs_on_the_tiny_run(ex, tiny_run, tmp_path):
    config, run = tiny_run
    source = tmp_path / f"solution_{ex.filename}"
    source.write_text(render(build_notebook(ex, solution=True)), encoding="utf-8")
    out = tmp_path / ex.filename
    params = {"run_dir": str(run), **{k: v for k, v in config.params.items() if k in ("model_id", "seed")}}
    pm.execute_notebook(str(source), str(out), parameters=params, cwd=str(repo_root()), kernel_name="python3",
                        progress_bar=False)
    executed = nbformat.read(str(out), as_version=4)
    (check,) = [c for c in executed.cells if c.cell_type == "code" and f"{ex.checker}({ex.function})" in c.source]
    assert "cases passed" in _text_outputs(check) and "FAILED" not in _text_outputs(check)
    (compare,) = [c for c in executed.cells if c.cell_type == "code" and ex.on_run in c.source]
    assert "your function agrees with the library everywhere" in _text_outputs(compare)
    assert (run / "exercises" / ex.key / f"fig_{ex.key}_on_run.png").is_file()
