"""The files of step 03: ``head_scores.json`` (the original format) and ``head_scores.csv``.

``head_scores.json`` is the original's ``{"l-h": [s_1, ..., s_N]}``: one key per (layer, query
head), layer-major, holding that head's per-sample scores s_n (docs/method.md §4); a reader
averages each list to get S. ``head_scores.csv`` has one row per head: layer, head, score (S),
rank. :func:`load_head_scores` reads either, or an officially shipped JSON file, and checks what
it reads (keys, missing heads, empty lists, values, the model's shape) before anyone uses it:
every key or row is checked against the model's shape (or, without one, against the number of
heads the file holds) before the (L, H) matrix is allocated, so a key like ``"99999-99999"``
fails at once instead of asking for a 10^10-cell grid. Scores that are zero for every head (step 03
matched no generated token to a region) are refused with the counts of step 03's
``scoring_report.json`` when it lies beside the file (:func:`zero_scores_explanation`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .head_scoring_rule import (
    HeadScoreShapeError,
    HeadScoringError,
    InvalidHeadScoresError,
    _expected_shape,
    validate_head_scores,
)

__all__ = [
    "HeadScoreFileError",
    "head_scores_to_json_dict",
    "write_head_scores_json",
    "load_head_scores",
    "zero_scores_explanation",
    "head_scores_frame",
    "REPORT_NAME",
]

#: Step 03's report, read beside a head-score file to explain scores that are all zero.
REPORT_NAME = "scoring_report.json"

_KEY = re.compile(r"^(\d+)-(\d+)$")


class HeadScoreFileError(HeadScoringError):
    """A head-score file cannot be read: not JSON/CSV, bad keys, missing heads, empty lists."""


def head_scores_to_json_dict(sample_scores: np.ndarray) -> dict[str, list[float]]:
    """``{"l-h": [s_1, ..., s_N]}``, layer-major, from (N, L, H) per-sample scores."""
    sample_scores = np.asarray(sample_scores, dtype=np.float64)
    if sample_scores.ndim != 3:
        raise ValueError(f"per-sample scores must be (samples, layers, heads), got shape {sample_scores.shape}")
    _, layers, heads = sample_scores.shape
    return {f"{l}-{h}": [float(v) for v in sample_scores[:, l, h]] for l in range(layers) for h in range(heads)}


def write_head_scores_json(sample_scores: np.ndarray, path: str | Path) -> Path:
    """Write the original format (:func:`head_scores_to_json_dict`)."""
    path = Path(path)
    path.write_text(json.dumps(head_scores_to_json_dict(sample_scores)) + "\n", encoding="utf-8")
    return path


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeadScoreFileError(f"{path}: head {key!r} holds {value!r}, which is not a number")
    return float(value)


def _unique_keys(path: Path) -> Any:
    """A ``json`` object hook refusing a key written twice (JSON would keep the last)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise HeadScoreFileError(f"{path}: key {key!r} is written twice; JSON would silently keep the last one")
            seen[key] = value
        return seen

    return hook


def _load_json_scores(path: Path, shape: Any) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as exc:
        raise HeadScoreFileError(
            f"{path} is not valid JSON ({exc}; a half-written or edited file?); expected {{\"l-h\": [s_1, ..., s_N]}}. "
            "Rerun step 03 or restore the file"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise HeadScoreFileError(f"{path} must hold a non-empty JSON object {{\"l-h\": [s_1, ..., s_N]}}")
    means: dict[tuple[int, int], float] = {}
    for key, values in data.items():
        parsed = _KEY.match(str(key))
        if parsed is None:
            raise HeadScoreFileError(f"{path}: key {key!r} is not of the form 'layer-head' (e.g. '0-0', '14-24')")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise HeadScoreFileError(f"{path}: head {key!r} has an empty list of scores; nothing to average")
        numbers = [_number(v, key, path) for v in values]
        bad = [v for v in numbers if not math.isfinite(v) or v < 0]
        if bad:
            raise InvalidHeadScoresError(
                f"{path}: head {key!r} has score {bad[0]!r}; scores must be finite and >= 0. Rerun step 03 or fix the file."
            )
        head = (int(parsed.group(1)), int(parsed.group(2)))
        if head in means:
            raise HeadScoreFileError(f"{path}: key {key!r} names head {head[0]}-{head[1]} a second time")
        means[head] = float(np.mean(numbers))
    return _grid(means, path, shape)


def _missing(heads: Mapping[tuple[int, int], float], layers: int, width: int) -> Iterator[str]:
    """The 'l-h' keys of the layers x width grid absent from ``heads``, lazily in layer-major order."""
    for l in range(layers):
        for h in range(width):
            if (l, h) not in heads:
                yield f"{l}-{h}"


def _grid(values: Mapping[tuple[int, int], float], path: Path, shape: Any) -> np.ndarray:
    """The (L, H) matrix of ``values`` ({(layer, head): S}), checked before it is allocated: every
    (layer, head) inside the model's shape when given, and the grid spanned by the largest layer
    and head no bigger than the number of heads the file holds (else some are missing)."""
    layers = 1 + max(l for l, _ in values)
    heads = 1 + max(h for _, h in values)
    expected = _expected_shape(shape)
    if expected is not None and (layers > expected[0] or heads > expected[1]):
        l, h = max(values, key=lambda key: (key[0] >= expected[0] or key[1] >= expected[1], key))
        raise HeadScoreShapeError(
            f"{path}: head '{l}-{h}' lies outside the model's {expected[0]} layers x {expected[1]} query heads "
            f"(layers 0..{expected[0] - 1}, heads 0..{expected[1] - 1}): the scores belong to another model or the "
            "file was edited. Rerun step 03 for this model, or pick the file made for it"
        )
    if layers * heads != len(values):
        missing = list(itertools.islice(_missing(values, layers, heads), 5))
        raise HeadScoreFileError(
            f"{path}: keys cover up to {layers} layers x {heads} heads but {layers * heads - len(values)} head(s) are "
            f"missing (first: {', '.join(missing)}); every 'l-h' of the grid must be present. Rerun step 03 or "
            "restore the file"
        )
    scores = np.zeros((layers, heads), dtype=np.float64)
    for (l, h), v in values.items():
        scores[l, h] = v
    return scores


def _csv_column(frame: pd.DataFrame, column: str, path: Path, *, index: bool) -> np.ndarray:
    """One column of head_scores.csv as numbers: head indices must be non-negative integers written
    as such ("1.7" is not truncated to 1), scores numbers; an empty cell is a short (ragged) row.
    The error names the line of the file (the header is line 1)."""
    raw = frame[column].astype(str).str.strip()
    if index:
        good = raw.str.fullmatch(r"\d+")
        wanted = "a non-negative integer"
    else:
        good = pd.to_numeric(raw, errors="coerce").notna() | raw.str.lower().isin(["nan", "inf", "-inf"])
        wanted = "a number"
    if not good.all():
        row = int(np.flatnonzero(~good.to_numpy())[0])
        value = raw.iloc[row]
        what = "is empty (a short, ragged row?)" if value == "" else f"holds {value!r}, which is not {wanted}"
        raise HeadScoreFileError(
            f"{path} line {row + 2}: column {column!r} {what}; every row is layer, head, score (and rank). Rerun "
            "step 03 or fix the file"
        )
    return raw.astype(np.int64).to_numpy() if index else raw.astype(np.float64).to_numpy()


def _load_csv_scores(path: Path, shape: Any) -> np.ndarray:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unreadable files
        raise HeadScoreFileError(f"{path} is not a readable CSV ({str(exc).strip()}); rerun step 03 or restore the file") from exc
    needed = {"layer", "head", "score"}
    if not needed.issubset(frame.columns):
        raise HeadScoreFileError(f"{path} needs columns {sorted(needed)}, has {list(frame.columns)}")
    if frame.empty:
        raise HeadScoreFileError(f"{path} has a header but no rows; rerun step 03 or restore the file")
    layer = _csv_column(frame, "layer", path, index=True)
    head = _csv_column(frame, "head", path, index=True)
    score = _csv_column(frame, "score", path, index=False)
    values: dict[tuple[int, int], float] = {}
    for row, key in enumerate(zip(layer.tolist(), head.tolist())):
        if key in values:
            raise HeadScoreFileError(f"{path} line {row + 2} lists head {key[0]}-{key[1]} a second time")
        values[key] = float(score[row])
    return _grid(values, path, shape)


def zero_scores_explanation(path: str | Path) -> str:
    """Why the head scores in ``path`` are zero for every head, from step 03's
    ``scoring_report.json`` beside it: how many generated tokens matched a region, why the others
    were skipped, and what to do. Without a readable report, the general reasons."""
    path = Path(path)
    report_path = path.parent / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        skipped = {k: v for k, v in dict(report.get("tokens_skipped") or {}).items() if v}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"
        matched = report.get("tokens_matched")
        counts = (
            f"step 03 matched {matched} of {report.get('tokens_generated')} generated tokens over "
            f"{report.get('samples')} samples to an annotated image region (skipped tokens: {reasons}; {REPORT_NAME})"
        )
        if matched:
            counts += (
                f", and for none of those {matched} did a head's strongest attention "
                f"({report.get('selection', 'argmax')}) fall inside the token's region"
            )
    except (OSError, ValueError, AttributeError, TypeError):
        counts = f"step 03 matched no generated token to an annotated image region ({report_path} not readable)"
    return (
        f"the head scores in {path} are zero for every head: {counts}. No head ever hit a region, so there is "
        "nothing to rank heads or allocate budgets by. This happens when the model's answers do not reproduce the "
        "page's text (random or untrained weights, a model that does not read this kind of page; skipped as "
        "no_match or ambiguous), when it does not look at the text it reads, or when the regions do not line up "
        "(empty_region, unaligned). Look at token_matches.csv beside it (each generated token and why it did not "
        "match), then rerun step 03 with a model that reads the documents, or with more samples (n_samples) or a "
        "longer answer (max_new_tokens)"
    )


def load_head_scores(path: str | Path, shape: Any = None, *, allow_zero: bool = False) -> np.ndarray:
    """Head scores S (L, H) float64 from a step-03 file or an officially shipped one.

    ``.json``: the original format ``{"l-h": [s_1, ..., s_N]}``: lists of any length (each head's
    list is averaged, as the original's loader does with ``np.mean``; a bare number counts as a
    one-element list); heads are placed by their key, so the file's key order does not matter
    (the original relies on layer-major order). ``.csv``: ``head_scores.csv`` (layer, head, score).
    ``shape``: ``(layers, heads)`` or a LoadedModel to check against (None: inferred from the keys).
    ``allow_zero``: accept scores that are zero for every head (text-copy scores may be; visual
    scores that are all zero leave nothing to allocate by, :func:`zero_scores_explanation`).
    Raises :class:`HeadScoreFileError`, :class:`HeadScoreShapeError`, :class:`InvalidHeadScoresError`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "head_scores.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: head scores are written by step 03 (notebooks/03_head_scoring.ipynb) "
            "or shipped with a model in the original's JSON format"
        )
    scores = _load_csv_scores(path, shape) if path.suffix.lower() == ".csv" else _load_json_scores(path, shape)
    scores = validate_head_scores(scores, shape, source=f"head scores in {path}")
    if not allow_zero and not scores.any():
        raise InvalidHeadScoresError(zero_scores_explanation(path))
    return scores


def head_scores_frame(scores: np.ndarray) -> pd.DataFrame:
    """``head_scores.csv``: one row per head, layer-major: layer, head, score, rank (1 = highest;
    ties ranked in layer-major order, so ranks are 1..L*H without gaps)."""
    scores = validate_head_scores(scores)
    layers, heads = scores.shape
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(1, flat.size + 1)
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "score": flat,
            "rank": rank,
        }
    )
