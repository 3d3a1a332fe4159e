"""Findings: what a paper claims beside what this run measured, as one table per step.

Every sentence a notebook says about its run's results comes from a :class:`Finding` built from
that run's numbers, so the text stays true when the model, the data or the budget changes. A
finding holds the claim, the paper's value (with its source), this run's value, the number of
observations behind it (``n``) and whether the claim holds here (``True``/``False``, or
``None`` when this run cannot tell, e.g. a random-weight model or too few observations).

``<run>/<step>/findings.csv`` holds a step's table; ``index.html`` shows the headline ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

__all__ = [
    "Finding",
    "FINDINGS_COLUMNS",
    "FindingsError",
    "findings_frame",
    "read_findings",
    "findings_markdown",
    "verdict",
]


class FindingsError(ValueError):
    """A findings table is malformed (missing columns, unknown verdicts)."""


@dataclass(frozen=True)
class Finding:
    """One claim checked on this run.

    ``claim``: what the paper reports, in a few words; ``paper``: the paper's value and where it
    comes from; ``this_run``: what this run measured (a sentence with its numbers);
    ``n``: the observations behind ``this_run`` (questions, heads, samples); ``holds``: ``True``,
    ``False`` or ``None`` (cannot tell); ``headline``: shown on the run's front page."""

    step: str
    claim: str
    paper: str
    this_run: str
    n: int
    holds: bool | None
    headline: bool = False

    def __post_init__(self) -> None:
        if self.holds not in (True, False, None):
            raise FindingsError(f"holds must be True, False or None, got {self.holds!r} ({self.claim})")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise FindingsError(f"n must be an int >= 0 (observations), got {self.n!r} ({self.claim})")
        for name in ("step", "claim", "paper", "this_run"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise FindingsError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")


FINDINGS_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Finding))


def findings_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """The findings as a table with :data:`FINDINGS_COLUMNS` (``holds`` as an object column:
    True, False or None)."""
    rows = [asdict(f) for f in findings]
    frame = pd.DataFrame(rows, columns=list(FINDINGS_COLUMNS))
    frame["holds"] = frame["holds"].astype(object)
    return frame


def _parse_holds(value: object) -> bool | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    if text in ("", "none", "nan"):
        return None
    raise FindingsError(f"unknown verdict {value!r} in a findings table (True, False or empty)")


def read_findings(path: str | Path) -> pd.DataFrame:
    """A ``findings.csv`` written by :func:`findings_frame` ``.to_csv(index=False)``."""
    frame = pd.read_csv(path, dtype={"claim": str, "paper": str, "this_run": str, "step": str}, keep_default_na=False)
    missing = [c for c in FINDINGS_COLUMNS if c not in frame.columns]
    if missing:
        raise FindingsError(f"{path} lacks the findings columns {missing}")
    frame["holds"] = [_parse_holds(v) for v in frame["holds"]]
    frame["headline"] = [bool(_parse_holds(v)) for v in frame["headline"]]
    frame["n"] = frame["n"].astype(int)
    return frame


def verdict(holds: bool | None) -> str:
    """``"holds"``, ``"does not hold"`` or ``"cannot tell"``."""
    return {True: "holds", False: "does not hold", None: "cannot tell"}[holds]


def findings_markdown(frame: pd.DataFrame | Sequence[Finding], title: str | None = None) -> str:
    """A Markdown list for a notebook: one line per finding with its verdict, this run's value
    with n, and the paper's value."""
    if not isinstance(frame, pd.DataFrame):
        frame = findings_frame(frame)
    lines = [f"### {title}", ""] if title else []
    for row in frame.itertuples(index=False):
        lines.append(f"- **{row.claim}** ({verdict(row.holds)}): {row.this_run} (n = {row.n}). *Paper:* {row.paper}.")
    return "\n".join(lines)
