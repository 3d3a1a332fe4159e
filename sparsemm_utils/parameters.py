"""A notebook's parameters, checked: a name papermill injects that the step does not declare stops
the notebook (``papermill -p n_document 3`` would otherwise only warn and run with the default).

papermill puts the values it is given into a cell right after the one tagged ``parameters``; that
cell's source starts with ``# Parameters``. :func:`reject_unknown_parameters` reads the kernel's
input history for the last such cell and compares the names it assigns with the fields of the
step's ``Config``. In JupyterLab (no injected cell) there is nothing to check.

Sizes a user can make long (documents generated, samples scored, tokens generated) have a sane
upper bound, checked by :func:`check_size` in the steps' ``Config``: ``n_documents: 100000000``
stops at once, saying so, instead of running for days without a word. A step's ``allow_large =
True`` (its parameters cell's override) lifts the bounds for a run that really wants them.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

from .validate import check_int

__all__ = [
    "ALLOW_LARGE",
    "MAX_DOCUMENTS",
    "MAX_NEW_TOKENS",
    "UnknownParameterError",
    "check_allow_large",
    "check_size",
    "injected_parameter_names",
    "reject_unknown_parameters",
]

INJECTED_HEADER = "# Parameters"
#: The parameter (in a step's parameters cell and ``Config``) that lifts its size bounds.
ALLOW_LARGE = "allow_large"
#: Bound on documents generated, scored or analysed by one step (the paper's step 01 uses 1000;
#: docs/method.md §2). 10x that is hours of CPU time per step already.
MAX_DOCUMENTS = 10_000
#: Bound on tokens generated per answer (the paper's OCR answers stop at 1024; docs/method.md §2).
MAX_NEW_TOKENS = 4096


class UnknownParameterError(ValueError):
    """papermill was given a parameter the notebook does not declare."""


def _history() -> Sequence[str]:
    try:
        from IPython import get_ipython  # optional: only inside a kernel
    except ImportError:  # pragma: no cover - IPython is installed with jupyterlab
        return ()
    shell = get_ipython()
    if shell is None:
        return ()
    return list(shell.user_ns.get("In", ()))


def injected_parameter_names(history: Iterable[str] | None = None) -> list[str] | None:
    """The names assigned in the last papermill-injected cell of ``history`` (the kernel's input
    history by default), or None when no cell was injected."""
    cells = [s for s in (_history() if history is None else history) if s.startswith(INJECTED_HEADER)]
    if not cells:
        return None
    names: list[str] = []
    for node in ast.parse(cells[-1]).body:
        if isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


def reject_unknown_parameters(config: Any, history: Iterable[str] | None = None) -> None:
    """Raise :class:`UnknownParameterError` when papermill injected a name that ``config`` (a
    dataclass or its class: the step's ``Config``) does not declare."""
    if not is_dataclass(config):
        raise TypeError(f"reject_unknown_parameters takes the step's Config dataclass, got {config!r}")
    names = injected_parameter_names(history)
    if names is None:
        return
    declared = [f.name for f in fields(config)]
    unknown = [n for n in names if n not in declared]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownParameterError(
            f"papermill was given {', '.join(hints)}, which this notebook does not declare; it declares "
            f"{declared}. Fix the name (-p NAME VALUE) or the config section that passed it."
        )


def check_allow_large(value: Any, *, error: type[Exception] = ValueError) -> bool:
    """``allow_large`` as a bool (``True``/``False`` only)."""
    if not isinstance(value, bool):
        raise error(f"{ALLOW_LARGE} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_size(
    name: str, value: Any, maximum: int, *, allow_large: bool, minimum: int = 1, error: type[Exception] = ValueError
) -> int:
    """``value`` as an int >= ``minimum`` and, unless ``allow_large``, <= ``maximum``: a size a user
    can make long (documents, samples, generated tokens). Above the bound the error says what the
    bound is for and how to lift it (``allow_large = True``)."""
    value = check_int(name, value, minimum, error=error)
    if value > maximum and not allow_large:
        raise error(
            f"{name} = {value} is above this step's bound of {maximum}: at that size the step runs for hours to days "
            f"(and a typo is likelier than intent). Use a value <= {maximum}, or, to run it anyway, set "
            f"{ALLOW_LARGE} = True for this step (config: `steps.<step>.{ALLOW_LARGE}: true`; papermill: "
            f"`-p {ALLOW_LARGE} True`)"
        )
    return value
