"""notebooks/00_study_model.ipynb (outside the chain: it documents the shipped study model) runs
headless on the model assembled from the shipped parts and leaves its reading, findings and figures."""

from __future__ import annotations

import json

import papermill as pm
import pytest

from sparsemm_utils.runs import repo_root
from sparsemm_utils.steps import study_model as step

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]


def test_study_model_notebook_runs_on_the_shipped_parts(tmp_path, study_model):
    root = repo_root()
    model, _ = study_model
    pm.execute_notebook(
        str(root / "notebooks" / "00_study_model.ipynb"),
        str(tmp_path / "00_study_model.ipynb"),
        parameters={"run_dir": str(tmp_path), "model_id": str(model), "n_pages": 2},
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    missing = [a.name for a in step.STEP.outputs if not a.exists(tmp_path)]
    assert not missing, f"the notebook did not leave its declared outputs {missing}"
    findings = step.FINDINGS.read(tmp_path)
    assert len(findings) >= 3 and findings["holds"].map(lambda v: v in (True, False)).all()  # time, size, FullKV ANLS
    assert sorted(p.name for p in (tmp_path / step.NAME).glob("fig_*.png")), "the notebook saved no figure"
