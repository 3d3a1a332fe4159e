"""notebooks/00_tiny_reader.ipynb (outside the chain: it documents the shipped reader) runs
headless on the shipped checkpoint and leaves its evaluation, findings and figures."""

from __future__ import annotations

import json

import papermill as pm
import pytest

from sparsemm_utils.runs import repo_root
from sparsemm_utils.steps import tiny_reader as step

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]


def test_tiny_reader_notebook_runs_on_the_shipped_checkpoint(tmp_path):
    root = repo_root()
    out = tmp_path / "00_tiny_reader.ipynb"
    pm.execute_notebook(
        str(root / "notebooks" / "00_tiny_reader.ipynb"),
        str(out),
        parameters={"run_dir": str(tmp_path), "model_id": "data/tiny_reader", "n_eval_docs": 8, "n_sample_docs": 4},
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    folder = tmp_path / "00_tiny_reader"
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["summary"], "the notebook wrote no accuracy summary"
    assert sorted(p.name for p in folder.glob("fig_*.png")), "the notebook saved no figure"
    missing = [a.name for a in step.STEP.outputs if not a.exists(tmp_path)]
    assert not missing, f"the notebook did not leave its declared outputs {missing}"
    findings = step.FINDINGS.read(tmp_path)
    assert "the reader answers `value` questions exactly" in set(findings["claim"])
    assert findings["holds"].map(lambda v: v in (True, False)).all()  # the shipped card judges every target
