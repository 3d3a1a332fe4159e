"""The whole chain on the offline default (configs/tiny.yaml), headless, as `make reproduce` runs
it: every step runs, writes its manifest, promised outputs and HTML export, index.html links
them, and a second run skips every step."""

from __future__ import annotations

import json

import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.manifest import Manifest

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]


@pytest.fixture(scope="module")
def tiny_run(tiny_chain):
    return tiny_chain


def test_every_step_runs(tiny_run):
    run, _, results = tiny_run
    assert [(r.step, r.status) for r in results] == [(s.name, "ran") for s in pl.STEPS]


def test_manifests_outputs_and_index(tiny_run):
    run, _, _ = tiny_run
    index = (run / "index.html").read_text()
    for step in pl.STEPS:
        folder = run / step.name
        manifest = Manifest.read(folder)
        assert manifest is not None and manifest.status == "ok", step.name
        raw = json.loads((folder / "manifest.json").read_text())
        for key in ("params", "inputs", "outputs", "packages", "git_commit", "device", "started_at", "finished_at", "seconds"):
            assert key in raw, f"{step.name} manifest lacks {key}"
        for name in step.output_names:
            assert (folder / name).exists(), f"{step.name} did not write {name}"
        assert f"{step.name}/{step.name}.html" in index
        assert list(folder.glob("fig_*.png")), f"{step.name} saved no figure"


def test_second_run_skips_everything(tiny_run):
    run, config, _ = tiny_run
    again = pl.run_pipeline(config, run)
    assert [(r.step, r.status, r.message) for r in again] == [(s.name, "skipped", "unchanged") for s in pl.STEPS]
