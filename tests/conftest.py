"""Fixtures shared across the test folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.runs import repo_root


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """The offline chain (configs/tiny.yaml) run once per test session into a fresh folder, as
    `make reproduce` runs it: (run folder, config, step results). The chain test checks it; the
    exercise and browser tests run their notebooks on copies of it."""
    run = tmp_path_factory.mktemp("tiny_chain") / "run"
    config = pl.load_config(repo_root() / "configs" / "tiny.yaml")
    results = pl.run_pipeline(config, run, log=lambda line: print(line, flush=True))
    return run, config, results


@pytest.fixture(scope="session")
def study_model(tmp_path_factory) -> tuple[Path, list[str]]:
    """The study model assembled once per test session from the shipped parts (data/study_model/)
    and the pinned backbone, as `make reproduce` assembles it: (model folder, assembly log)."""
    from sparsemm_utils.study_model.assemble import PARTS_DIR, ensure_assembled

    out = tmp_path_factory.mktemp("study_model") / "model"
    lines: list[str] = []
    ensure_assembled(out, repo_root() / PARTS_DIR, log=lines.append)
    return out, lines


def _write_notebook(path: Path, params: str, body: list[str]) -> Path:
    """A small notebook at ``path``: a markdown title, the ``parameters`` cell ``params`` and one
    code cell per entry of ``body`` (the pipeline tests' fake steps)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# fake"), cell] + [nbformat.v4.new_code_cell(b) for b in body]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="session")
def write_notebook() -> Callable[[Path, str, list[str]], Path]:
    """``write_notebook(path, params, body)``: write a fake step's notebook (see :func:`_write_notebook`)."""
    return _write_notebook
