"""What an exercise is: a small spec from which its notebook is built (no hand-kept copy).

An :class:`Exercise` names the full notebook it comes from (``notebooks/<source>.ipynb``) and the
markdown cells of that notebook to show as background (selected by their heading line, so the
explanation is the full notebook's own text), and adds what only the exercise has: the task, the
stub the student fills in, the checker call and the comparison on the run's data.
:mod:`sparsemm_utils.exercises.notebook` turns it into
``notebooks/exercises/<NN>_<key>_exercise.ipynb``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from sparsemm_utils.checkers import CHECKERS
from sparsemm_utils.validate import check_int_range

from . import on_run

__all__ = ["ExerciseSpecError", "Exercise"]


class ExerciseSpecError(ValueError):
    """An exercise spec is inconsistent (bad key, minutes, stub, checker or parameters)."""


@dataclass(frozen=True)
class Exercise:
    """One exercise.

    Attributes:
        key: short name, also the checker's key in :data:`sparsemm_utils.checkers.CHECKERS`
            (``map_box``, ``hit_rule``, ``allocation``, ``snapkv_selection``, ``anls``).
        source: the full notebook's step name, e.g. ``"02_patch_mapping"``.
        title: the exercise's title.
        minutes: (low, high) minutes a student should need for the stub.
        build: markdown, one or two sentences: what the student builds.
        background: heading lines (``"## The rule, drawn"``) of the full notebook's markdown
            cells shown as background, in this order.
        task: markdown: the rule to implement, the signature and a worked example.
        function: the name the stub defines (what the checker receives).
        stub: Python source of the stub cell: defines ``function`` and raises NotImplementedError.
        config_class: name of the run-comparison config in :mod:`sparsemm_utils.exercises.on_run`.
        parameters: (name, literal) pairs of the exercise's own parameters (besides ``run_dir``,
            ``model_id``, ``seed``), in the order of the parameters cell.
        on_run: name of the comparison function in :mod:`sparsemm_utils.exercises.on_run`.
        on_run_intro: markdown before the comparison on the run's data.
        needs: steps whose outputs the comparison reads (the header lists them).
        runtime: markdown: how long the comparison takes on the tiny and the real setting.
        open_questions: 2 to 4 questions the check report and the comparison can answer.
    """

    key: str
    source: str
    title: str
    minutes: tuple[int, int]
    build: str
    background: tuple[str, ...]
    task: str
    function: str
    stub: str
    config_class: str
    parameters: tuple[tuple[str, Any], ...]
    on_run: str
    on_run_intro: str
    needs: tuple[str, ...]
    runtime: str
    open_questions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.key not in CHECKERS:
            raise ExerciseSpecError(f"exercise key {self.key!r} has no checker; known: {sorted(CHECKERS)}")
        number = self.source.split("_", 1)[0]
        if not (len(number) == 2 and number.isdigit()):
            raise ExerciseSpecError(f"source must be a step name like '02_patch_mapping', got {self.source!r}")
        check_int_range("minutes (low, high)", self.minutes, 1, error=ExerciseSpecError)
        if not self.background:
            raise ExerciseSpecError(f"exercise {self.key!r} must show at least one background cell of {self.source}")
        try:
            tree = ast.parse(self.stub)
        except SyntaxError as exc:
            raise ExerciseSpecError(f"the stub of {self.key!r} is not valid Python: {exc}") from exc
        defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        if self.function not in defined:
            raise ExerciseSpecError(f"the stub of {self.key!r} must define {self.function}(), it defines {defined}")
        if "NotImplementedError" not in self.stub:
            raise ExerciseSpecError(f"the stub of {self.key!r} must raise NotImplementedError until it is filled in")
        for name in (self.config_class, self.on_run):
            if not hasattr(on_run, name):
                raise ExerciseSpecError(f"sparsemm_utils.exercises.on_run has no {name!r} (exercise {self.key!r})")
        names = [n for n, _ in self.parameters]
        if {"run_dir", "model_id", "seed"} & set(names):
            raise ExerciseSpecError("run_dir, model_id and seed are always parameters; do not list them again")
        for name, value in self.parameters:
            try:
                if ast.literal_eval(repr(value)) != value:
                    raise ValueError
            except (ValueError, SyntaxError) as exc:
                raise ExerciseSpecError(f"parameter {name!r} of {self.key!r} must be a literal, got {value!r}") from exc
        if not 2 <= len(self.open_questions) <= 4:
            raise ExerciseSpecError(f"exercise {self.key!r} needs 2 to 4 open questions, got {len(self.open_questions)}")

    @property
    def number(self) -> str:
        """The step number, e.g. ``"02"``."""
        return self.source.split("_", 1)[0]

    @property
    def filename(self) -> str:
        """``<NN>_<key>_exercise.ipynb``."""
        return f"{self.number}_{self.key}_exercise.ipynb"

    @property
    def checker(self) -> str:
        """The checker's name in :mod:`sparsemm_utils.checkers`."""
        return f"check_{self.key}"
