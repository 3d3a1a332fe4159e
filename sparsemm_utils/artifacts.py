"""Typed artifacts and step declarations: what each step reads and writes (docs/design.md).

An :class:`Artifact` is one file (or folder) a step writes into its folder of a run,
``<run_dir>/<step>/<name>``. It knows its step and its path, how to read itself, and fails
with an error that names the step to run when it is missing. A :class:`StepSpec` declares a
step: its notebook (``notebooks/<name>.ipynb``), the upstream artifacts it reads (``inputs``;
the steps it needs follow from them) and the artifacts it must leave behind (``outputs``).
Each module of :mod:`sparsemm_utils.steps` declares its ``STEP`` with these, and the pipeline's
registry is built from those declarations, so no step name or file name is typed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .runs import MissingUpstreamError, repo_root, resolve_run_dir

__all__ = ["Artifact", "StepSpec", "ArtifactReadError"]

T = TypeVar("T")


class ArtifactReadError(ValueError):
    """An artifact exists but cannot be read: the message names the file and the step to rerun."""


@dataclass(frozen=True)
class Artifact(Generic[T]):
    """One output of one step: ``<run_dir>/<step>/<name>``.

    ``reader`` turns the path into the object a later step works with (a DataFrame, a score
    array, a ``datasets.Dataset``); ``None`` for artifacts that are only looked at (figures,
    reports) or read with arguments (use :meth:`require` and the module's loader then)."""

    step: str
    name: str
    description: str
    reader: Callable[[Path], T] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """``"<step>/<name>"``: the artifact's path relative to the run folder (manifest paths)."""
        return f"{self.step}/{self.name}"

    def path(self, run_dir: str | Path) -> Path:
        """Where the artifact lives in ``run_dir`` (whether or not it exists)."""
        return resolve_run_dir(run_dir) / self.step / self.name

    def exists(self, run_dir: str | Path) -> bool:
        return self.path(run_dir).exists()

    def require(self, run_dir: str | Path) -> Path:
        """The path, or :class:`~sparsemm_utils.runs.MissingUpstreamError` naming the step that
        writes it and the command that runs that step."""
        path = self.path(run_dir)
        if not path.exists():
            raise MissingUpstreamError(
                f"missing {self.description} ({path}): it is written by step {self.step}. Run that step "
                f"first, e.g. `python -m sparsemm_utils.pipeline --config <config.yaml> --run-dir "
                f"{resolve_run_dir(run_dir)} --to {self.step}` (or open notebooks/{self.step}.ipynb with "
                f"run_dir={str(run_dir)!r})."
            )
        return path

    def read(self, run_dir: str | Path) -> T:
        """The artifact, read with its ``reader``. A file that exists but cannot be parsed raises
        :class:`ArtifactReadError` naming the file and the step to rerun; the reader's own
        validation errors (shape, schema) pass through unchanged."""
        if self.reader is None:
            raise TypeError(f"{self.key} has no reader: use .require(run_dir) and open it yourself")
        path = self.require(run_dir)
        try:
            return self.reader(path)
        except (UnicodeDecodeError, OSError) as exc:
            raise ArtifactReadError(
                f"{path} ({self.description}) cannot be read: {exc}. Rerun step {self.step} "
                f"(`--from {self.step} --to {self.step} --force`)"
            ) from exc


@dataclass(frozen=True)
class StepSpec:
    """One step of the study: ``notebooks/<name>.ipynb`` writing into ``<run>/<name>/``.

    ``inputs``: the upstream artifacts the step reads (their steps must have run);
    ``outputs``: the artifacts it must leave behind, checked after the notebook ran;
    ``resumable``: the step keeps its finished work when it reruns (its notebook skips what it
    finds done, e.g. the eval sweep's cells)."""

    name: str
    title: str
    inputs: tuple[Artifact, ...] = ()
    outputs: tuple[Artifact, ...] = ()
    resumable: bool = False

    def __post_init__(self) -> None:
        number, _, rest = self.name.partition("_")
        if not (number.isdigit() and len(number) == 2 and rest):
            raise ValueError(f"a step name is 'NN_name' (e.g. '03_head_scoring'), got {self.name!r}")
        own = [a for a in self.outputs if a.step != self.name]
        if own:
            raise ValueError(f"step {self.name} declares outputs of other steps: {[a.key for a in own]}")
        loops = [a for a in self.inputs if a.step == self.name]
        if loops:
            raise ValueError(f"step {self.name} reads its own outputs as inputs: {[a.key for a in loops]}")
        names = [a.name for a in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"step {self.name} declares an output twice: {names}")

    @property
    def number(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def needs(self) -> tuple[str, ...]:
        """The upstream steps whose outputs this step reads, in step order."""
        return tuple(sorted({a.step for a in self.inputs}))

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.outputs)

    def output(self, name: str) -> Artifact:
        """The declared output called ``name``."""
        for artifact in self.outputs:
            if artifact.name == name:
                return artifact
        raise KeyError(f"step {self.name} declares no output {name!r}; it declares {list(self.output_names)}")

    def notebook_path(self, root: Path | None = None) -> Path:
        return (root or repo_root()) / "notebooks" / f"{self.name}.ipynb"

    def folder(self, run_dir: str | Path, *, create: bool = False) -> Path:
        """``<run_dir>/<name>``, created when ``create``."""
        path = resolve_run_dir(run_dir) / self.name
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

