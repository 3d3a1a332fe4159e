"""Argument checks shared by every module: one place for "an int >= 1", "a fraction", "one of".

Each check raises the caller's own error class (``error=``), so a config error stays a
``HeadScoringConfigError``, an allocation error an ``InvalidParameterError``, and so on, with one
wording for the same mistake everywhere. ``bool`` is never an int here (``True`` is not a budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["is_int", "check_int", "check_fraction", "check_choice", "check_int_range"]

E = TypeVar("E", bound=Exception)


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools (and everything else)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    error: type[Exception] = ValueError,
    hint: str = "",
) -> int:
    """``value`` as an ``int`` when it is an integer within ``[minimum, maximum]`` (either bound
    optional), else ``error`` naming ``name``, the bounds, what was given and ``hint``."""
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    wanted = "an int" + (" " + " and ".join(bounds) if bounds else "")
    if not is_int(value):
        raise error(f"{name} must be {wanted}, got {type(value).__name__} {value!r}{_hint(hint)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be {wanted}, got {value!r}{_hint(hint)}")
    return int(value)


def check_fraction(name: str, value: Any, *, error: type[Exception] = ValueError, hint: str = "") -> float:
    """``value`` as a ``float`` in ``[0, 1]`` (NaN rejected), else ``error``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}{_hint(hint)}")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise error(f"{name} must lie in [0, 1], got {number}{_hint(hint)}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[Any], *, error: type[Exception] = ValueError) -> Any:
    """``value`` when it is one of ``choices``, else ``error`` listing them."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set/dict
        ok = False
    if not ok:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_int_range(
    name: str, value: Any, lo: int, hi: int | None = None, *, error: type[Exception] = ValueError
) -> tuple[int, int]:
    """An inclusive integer range ``(a, b)`` with ``lo <= a <= b (<= hi)``, as a tuple of ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise error(f"{name} must be a pair (min, max), got {value!r}")
    a, b = value
    if not (is_int(a) and is_int(b)):
        raise error(f"{name} must hold integers, got {value!r}")
    a, b = int(a), int(b)
    if not lo <= a <= b or (hi is not None and b > hi):
        bound = f"{lo} <= min <= max" + (f" <= {hi}" if hi is not None else "")
        raise error(f"{name} must satisfy {bound}, got {value!r}")
    return a, b
