"""The files of step 03: ``head_scores.json`` (the original format) and ``head_scores.csv``.

``head_scores.json`` is the original's ``{"l-h": [s_1, ..., s_N]}``: one key per (layer, query
head), layer-major, holding that head's per-sample scores s_n (docs/method.md §4); a reader
averages each list to get S. ``head_scores.csv`` has one row per head: layer, head, score (S),
rank. :func:`load_head_scores` reads either, or an officially shipped JSON file, and checks what
it reads (keys, missing heads, empty lists, values, the model's shape) before anyone uses it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .head_scoring_rule import HeadScoringError, InvalidHeadScoresError, validate_head_scores

__all__ = [
    "HeadScoreFileError",
    "head_scores_to_json_dict",
    "write_head_scores_json",
    "load_head_scores",
    "head_scores_frame",
]

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


def _load_json_scores(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HeadScoreFileError(f"{path} is not valid JSON ({exc}); expected {{\"l-h\": [s_1, ..., s_N]}}") from exc
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
        means[(int(parsed.group(1)), int(parsed.group(2)))] = float(np.mean(numbers))
    layers = 1 + max(l for l, _ in means)
    heads = 1 + max(h for _, h in means)
    missing = [f"{l}-{h}" for l in range(layers) for h in range(heads) if (l, h) not in means]
    if missing:
        raise HeadScoreFileError(
            f"{path}: keys cover up to {layers} layers x {heads} heads but {len(missing)} head(s) are missing "
            f"(first: {', '.join(missing[:5])}); every 'l-h' of the grid must be present"
        )
    scores = np.zeros((layers, heads), dtype=np.float64)
    for (l, h), v in means.items():
        scores[l, h] = v
    return scores


def _load_csv_scores(path: Path) -> np.ndarray:
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for unreadable files
        raise HeadScoreFileError(f"{path} is not a readable CSV ({exc})") from exc
    needed = {"layer", "head", "score"}
    if not needed.issubset(frame.columns):
        raise HeadScoreFileError(f"{path} needs columns {sorted(needed)}, has {list(frame.columns)}")
    if frame.duplicated(["layer", "head"]).any():
        raise HeadScoreFileError(f"{path} lists some (layer, head) more than once")
    layers, heads = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    if len(frame) != layers * heads:
        raise HeadScoreFileError(f"{path} has {len(frame)} rows but layers x heads = {layers} x {heads} needs {layers * heads}")
    scores = np.full((layers, heads), np.nan)
    scores[frame["layer"].to_numpy(int), frame["head"].to_numpy(int)] = frame["score"].to_numpy(float)
    return scores


def load_head_scores(path: str | Path, shape: Any = None) -> np.ndarray:
    """Head scores S (L, H) float64 from a step-03 file or an officially shipped one.

    ``.json``: the original format ``{"l-h": [s_1, ..., s_N]}``: lists of any length (each head's
    list is averaged, as the original's loader does with ``np.mean``; a bare number counts as a
    one-element list); heads are placed by their key, so the file's key order does not matter
    (the original relies on layer-major order). ``.csv``: ``head_scores.csv`` (layer, head, score).
    ``shape``: ``(layers, heads)`` or a LoadedModel to check against (None: inferred from the keys).
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
    scores = _load_csv_scores(path) if path.suffix.lower() == ".csv" else _load_json_scores(path)
    return validate_head_scores(scores, shape, source=f"head scores in {path}")


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
