"""Fixtures of the fault-injection suite (docs/faults.md): the fake chain of fake_chain.py, run
once per session into a finished run folder that each test copies before breaking it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sparsemm_utils import pipeline as pl

sys.path.insert(0, str(Path(__file__).parent))
import fake_chain  # noqa: E402  (this folder's helper module)


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory, write_notebook) -> Path:
    """A repository root holding the fake chain's notebooks."""
    return fake_chain.write_repo(tmp_path_factory.mktemp("fake_repo"), write_notebook)


@pytest.fixture()
def run_fake(fake_repo) -> Callable[..., list[pl.StepResult]]:
    """``run_fake(config, run_dir, **kw)``: the pipeline on the fake chain; log lines go to ``run_fake.lines``."""
    lines: list[str] = []

    def run(config, run_dir, **kw):
        return pl.run_pipeline(config, run_dir, steps=fake_chain.STEPS, root=fake_repo, log=lines.append, **kw)

    run.lines = lines  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="session")
def finished_fake_run(tmp_path_factory, fake_repo) -> Path:
    """The fake chain run to its end once (value 3: value.txt 3, double.txt 6, log.txt "3")."""
    run = tmp_path_factory.mktemp("finished") / "run"
    results = pl.run_pipeline(fake_chain.config(), run, steps=fake_chain.STEPS, root=fake_repo, log=lambda _: None)
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    return run


@pytest.fixture()
def fresh_run(tmp_path, finished_fake_run) -> Path:
    """A private copy of the finished fake run (tests break it)."""
    run = tmp_path / "run"
    shutil.copytree(finished_fake_run, run)
    return run
