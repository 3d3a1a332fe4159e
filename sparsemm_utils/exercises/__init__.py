"""Course exercises: notebooks in which a key function is a stub for the student.

Five exercises (:data:`EXERCISES`, in course order): the box -> token mapping (step 02), the hit
rule (03), SparseMM's allocation and SnapKV's selection (04), ANLS (05). Each is a small spec
(:class:`Exercise`, :mod:`.catalog`) from which ``notebooks/exercises/<NN>_<key>_exercise.ipynb``
is built, taking its background text from the full notebook; the student's function is checked by
:mod:`sparsemm_utils.checkers` and then compared with the library on the run's data
(:mod:`.on_run`).

    python -m sparsemm_utils.exercises build            # (re)write notebooks/exercises/
    python -m sparsemm_utils.exercises build --check    # exit 1 if a committed notebook is stale
    python -m sparsemm_utils.exercises build --solutions /tmp/solutions   # instructors' versions
    python -m sparsemm_utils.exercises list
"""

from .catalog import EXERCISES, exercise
from .notebook import (
    SOLUTION_TAG,
    STUB_TAG,
    ExerciseSourceError,
    background_cells,
    build_notebook,
    exercises_dir,
    render,
    write_notebooks,
)
from .spec import Exercise, ExerciseSpecError

__all__ = [
    "EXERCISES",
    "Exercise",
    "ExerciseSpecError",
    "ExerciseSourceError",
    "STUB_TAG",
    "SOLUTION_TAG",
    "exercise",
    "background_cells",
    "build_notebook",
    "exercises_dir",
    "render",
    "write_notebooks",
    "stale_notebooks",
]


def stale_notebooks(root=None) -> list[str]:
    """Problems that make the committed exercise notebooks differ from a fresh build: a missing or
    outdated notebook, or a file in ``notebooks/exercises/`` that no exercise builds."""
    out_dir = exercises_dir(root)
    problems = []
    expected = {ex.filename for ex in EXERCISES}
    for ex in EXERCISES:
        path = out_dir / ex.filename
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.read_text(encoding="utf-8") != render(build_notebook(ex, root=root)):
            problems.append(f"{path} differs from a fresh build")
    if out_dir.is_dir():
        for path in sorted(out_dir.glob("*.ipynb")):
            if path.name not in expected:
                problems.append(f"{path} is not built by any exercise (remove it or add a spec to catalog.py)")
    return problems
