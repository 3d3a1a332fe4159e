from pathlib import Path

import pytest

from sparsemm_utils.runs import MissingUpstreamError, repo_root, require_upstream, resolve_run_dir, step_dir


def test_relative_run_dirs_resolve_against_the_repo_root():
    assert resolve_run_dir("runs/x") == repo_root() / "runs" / "x"
    assert (repo_root() / "sparsemm_utils").is_dir()


def test_step_dir_is_created(tmp_path):
    folder = step_dir(tmp_path, "01_ocr_annotation")
    assert folder == tmp_path / "01_ocr_annotation" and folder.is_dir()


def test_missing_upstream_names_the_step(tmp_path):
    with pytest.raises(MissingUpstreamError, match="01_ocr_annotation") as info:
        require_upstream(tmp_path, "01_ocr_annotation", "documents")
    assert "--to 01_ocr_annotation" in str(info.value)
    (tmp_path / "01_ocr_annotation" / "documents").mkdir(parents=True)
    assert require_upstream(tmp_path, "01_ocr_annotation", "documents") == Path(tmp_path) / "01_ocr_annotation" / "documents"
