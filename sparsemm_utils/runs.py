"""Run folders and step folders (docs/design.md, "How data flows").

A run lives in ``runs/<run>/``; each step writes into ``runs/<run>/<NN_step>/``. Notebooks call
:func:`step_dir` for their own folder and :func:`require_upstream` for what earlier steps wrote,
so that a missing upstream output fails with an error that names the step to run.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MissingUpstreamError",
    "repo_root",
    "resolve_run_dir",
    "step_dir",
    "require_upstream",
]


class MissingUpstreamError(FileNotFoundError):
    """An output of an earlier step is missing: the message names the step to run."""


def repo_root() -> Path:
    """The repository root (the folder that holds ``sparsemm_utils/``)."""
    return Path(__file__).resolve().parents[1]


def resolve_run_dir(run_dir: str | Path) -> Path:
    """Absolute run folder. A relative path is taken from the repository root, so a notebook
    opened in JupyterLab (cwd ``notebooks/``) and one run by papermill (cwd the repo root) read
    and write the same folder."""
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        path = repo_root() / path
    return path


def step_dir(run_dir: str | Path, step: str, *, create: bool = True) -> Path:
    """``<run_dir>/<step>``, created unless ``create=False``."""
    path = resolve_run_dir(run_dir) / step
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def require_upstream(run_dir: str | Path, step: str, relpath: str) -> Path:
    """Path of ``relpath`` inside an earlier step's folder; raises :class:`MissingUpstreamError`
    naming the step (and the command that produces it) when it is not there."""
    run = resolve_run_dir(run_dir)
    path = run / step / relpath
    if not path.exists():
        raise MissingUpstreamError(
            f"missing upstream output {path}: it is written by step {step}. Run that step first, "
            f"e.g. `python -m sparsemm_utils.pipeline --config <config.yaml> --run-dir {run} "
            f"--to {step}` (or open notebooks/{step}.ipynb with run_dir={str(run_dir)!r})."
        )
    return path
