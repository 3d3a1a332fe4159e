"""Run folders and step folders (docs/design.md, "How data flows").

A run lives in ``runs/<run>/``; each step writes into ``runs/<run>/<NN_step>/``. Notebooks call
:func:`step_dir` for their own folder and :func:`require_upstream` for what earlier steps wrote,
so that a missing upstream output fails with an error that names the step to run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "MissingUpstreamError",
    "RunLockedError",
    "LOCK_NAME",
    "run_lock",
    "read_lock",
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


class RunLockedError(RuntimeError):
    """Another pipeline holds the run folder's lock, or a stale lock was left by a dead one."""


LOCK_NAME = ".pipeline.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(run: Path) -> dict | None:
    """The lock record of ``run`` (pid, host, started), or None when the folder is not locked."""
    path = run / LOCK_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"pid": None, "host": None, "started": None, "unreadable": True}


@contextmanager
def run_lock(run: Path, *, break_stale: bool = False) -> Iterator[Path]:
    """Hold ``<run>/.pipeline.lock`` while a pipeline writes into ``run``.

    The lock is created atomically (``O_EXCL``) with the holder's pid, host and start time, and
    removed on exit. A lock held by a live process raises :class:`RunLockedError` naming it. A
    lock whose process is gone (same host) is *stale*: it is reported with how to clear it, and
    broken only when ``break_stale`` is given (``--break-stale-lock``); a lock from another host
    is never broken automatically."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_lock(run) or {}
            pid, host = held.get("pid"), held.get("host")
            same_host = host == socket.gethostname()
            stale = held.get("unreadable") or (same_host and isinstance(pid, int) and not _pid_alive(pid))
            if stale and break_stale and attempt == 1:
                path.unlink(missing_ok=True)
                continue
            who = f"pid {pid} on {host}, started {held.get('started')}"
            if stale:
                raise RunLockedError(
                    f"{run} holds a stale lock ({path}: {who}; that process is gone). If no pipeline is "
                    f"writing into this run folder, rerun with --break-stale-lock (or delete {path})."
                ) from None
            raise RunLockedError(
                f"{run} is in use by another pipeline ({who}): wait for it to finish, or use another "
                f"--run-dir. Two pipelines writing into one run folder would overwrite each other's steps."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        break
    try:
        yield path
    finally:
        current = read_lock(run)
        if current is not None and current.get("pid") == record["pid"] and current.get("started") == record["started"]:
            path.unlink(missing_ok=True)
