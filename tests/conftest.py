"""Fixtures shared across the test folders."""

from __future__ import annotations

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
