"""notebooks/00_tiny_reader.ipynb (outside the chain: it documents the shipped reader) runs
headless on the shipped checkpoint and writes its evaluation and figures."""

from __future__ import annotations

import json

import papermill as pm
import pytest

from sparsemm_utils.runs import repo_root

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
