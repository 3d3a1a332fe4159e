"""How much attention each token category pays to each other one, layer by layer (docs/method.md §8).

LLaVA-Mini's Eq. 4 and attention entropy on category labels (:mod:`sparsemm_utils.token_categories`),
as pure functions of attention weights: nothing here runs a model (the weights of a real model are
reduced to per-row statistics by :mod:`sparsemm_utils.layer_stats_capture`).

Category attention (LLaVA-Mini Eq. 4)
-------------------------------------
With ``a_ij`` the attention of query i to key j averaged over the heads of a layer::

    Attn(tgt -> src) = sum_{i in tgt} sum_{j in src} a_ij  /  #{i in tgt : sum_{j in src} a_ij > 0}

The denominator counts only the target rows that put non-zero mass on the source: under the
causal mask the system-prompt tokens before the image cannot see it, and no prompt token can
see the response, so those rows do not dilute the average. A pair with no such row is undefined
(NaN). Attention entropy (LLaVA-Mini appendix A) renormalises each counted row over the source
category, ``p_j = a_ij / sum_{j in src} a_ij``, takes ``-sum_j p_j ln p_j`` (nats), and averages
over the same rows; ``max_entropy`` is the mean of ``ln(#source keys the row sees)``, the value
of uniform attention.

Head-level view (:meth:`LayerStats.head_share`)
-----------------------------------------------
Per query head, the share of attention that goes to vision tokens, averaged over the rows that
*generated* the response (the last prompt token and every response token but the last: the rows
SparseMM's score reads, docs/method.md §4), set against the head's visual score from step 03
(:func:`head_vision_share_table`, :func:`spearman`).

The step's tables (``category_attention.csv``, ``entropy.csv``, ``head_vision_share.csv``) are
built from a list of :class:`LayerStats`, one per analysed sample.

Shapes: ``L`` layers, ``H`` query heads, ``N`` tokens (prompt + response), ``C = 3`` categories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparsemm_utils.token_categories import (
    CATEGORIES,
    INSTRUCTION,
    VISION,
    AttentionShapeError,
    CategoryLabelError,
    LayerAnalysisError,
)
from sparsemm_utils.validate import is_int

__all__ = [
    "ROW_SELECTIONS",
    "LayerStats",
    "check_labels",
    "category_mass",
    "visible_key_counts",
    "category_entropy_rows",
    "eq4_attention",
    "category_attention",
    "row_entropy_average",
    "category_entropy",
    "category_attention_table",
    "entropy_table",
    "head_vision_share_table",
    "spearman",
]

#: Which query rows :meth:`LayerStats.head_share` averages over.
ROW_SELECTIONS: tuple[str, ...] = ("generating", "response", "instruction", "all")


# ------------------------------------------------------------------------------ pure attention math


def check_labels(labels: Any, n: int, num_categories: int, what: str) -> np.ndarray:
    """``labels`` as int64 ``(n,)`` category codes in ``0 .. num_categories - 1``; :class:`CategoryLabelError`
    naming ``what`` otherwise."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise CategoryLabelError(f"{what} must have shape ({n},) to match the attention, got {labels.shape}")
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_categories):
        raise CategoryLabelError(f"{what} must be integer codes in 0..{num_categories - 1}, got {labels!r}")
    return labels.astype(np.int64, copy=False)


def _one_hot(labels: np.ndarray, num_categories: int, like: torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(labels, device=like.device, dtype=torch.long)
    return torch.nn.functional.one_hot(idx, num_categories).to(like.dtype)


def _as_tensor(attn: Any) -> torch.Tensor:
    t = attn.detach() if isinstance(attn, torch.Tensor) else torch.as_tensor(np.asarray(attn, dtype=np.float64))
    if not t.is_floating_point():
        t = t.double()
    return t


def category_mass(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """Attention each query row puts on each category: ``(..., q, C)``.

    ``attn``: ``(..., q, k)`` attention weights (any leading dims, e.g. heads); ``key_labels``:
    ``(k,)`` category codes. ``out[..., i, c] = sum_{j : label_j = c} attn[..., i, j]``.
    """
    attn = _as_tensor(attn)
    labels = check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    return attn @ _one_hot(labels, num_categories, attn)


def visible_key_counts(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """How many keys of each category a row gives non-zero weight (the keys it sees): ``(..., q, C)``."""
    attn = _as_tensor(attn)
    labels = check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    return (attn > 0).to(attn.dtype) @ _one_hot(labels, num_categories, attn)


def category_entropy_rows(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """Entropy (nats) of each row's attention renormalised over each category: ``(..., q, C)``.

    ``H[i, c] = -sum_{j in c} p_j ln p_j`` with ``p_j = attn[i, j] / m``, ``m = sum_{j in c} attn[i, j]``;
    computed as ``ln m - (sum_{j in c} a ln a) / m``. NaN where ``m == 0`` (the row sees no key
    of that category).
    """
    attn = _as_tensor(attn)
    labels = check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    onehot = _one_hot(labels, num_categories, attn)
    mass = attn @ onehot
    a_log_a = torch.where(attn > 0, attn * torch.log(attn.clamp_min(torch.finfo(attn.dtype).tiny)), torch.zeros_like(attn))
    s = a_log_a @ onehot
    safe = mass.clamp_min(torch.finfo(attn.dtype).tiny)
    ent = torch.log(safe) - s / safe
    ent = ent.clamp_min(0.0)  # rounding can give -1e-16 for one-key rows
    return torch.where(mass > 0, ent, torch.full_like(ent, float("nan")))


def eq4_attention(mass: Any, query_labels: Any, num_categories: int = len(CATEGORIES)) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-Mini's Eq. 4 from per-row category masses (docs/method.md §8).

    ``mass``: ``(q, C)`` (:func:`category_mass` of head-averaged attention); ``query_labels``:
    ``(q,)``. Returns ``(attn, rows)``, both ``(C_tgt, C_src)``: ``attn[t, s] = sum_{i in t}
    mass[i, s] / rows[t, s]`` with ``rows[t, s] = #{i in t : mass[i, s] > 0}``; NaN where
    ``rows == 0``.
    """
    mass = np.asarray(mass.detach().cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if mass.ndim != 2 or mass.shape[1] != num_categories:
        raise AttentionShapeError(f"mass must be (q, {num_categories}), got {mass.shape}")
    labels = check_labels(query_labels, mass.shape[0], num_categories, "query_labels")
    attn = np.full((num_categories, num_categories), np.nan)
    rows = np.zeros((num_categories, num_categories), dtype=np.int64)
    for t in range(num_categories):
        sel = mass[labels == t]
        rows[t] = (sel > 0).sum(axis=0)
        total = sel.sum(axis=0)
        ok = rows[t] > 0
        attn[t, ok] = total[ok] / rows[t, ok]
    return attn, rows


def _head_mean(attn: torch.Tensor) -> torch.Tensor:
    if attn.ndim == 3:
        return attn.mean(dim=0)
    if attn.ndim != 2:
        raise AttentionShapeError(f"attention must be (q, k) or (heads, q, k), got {tuple(attn.shape)}")
    return attn


def category_attention(attn: Any, labels: Any, num_categories: int = len(CATEGORIES)) -> np.ndarray:
    """Eq. 4 on one layer's attention: ``(C_tgt, C_src)`` (NaN where undefined).

    ``attn``: ``(q, k)`` or ``(heads, q, k)`` (averaged over heads first, as LLaVA-Mini does);
    ``labels``: ``(k,)`` categories of the keys; the queries are the last ``q`` positions (their
    labels are ``labels[k - q:]``), so a full square matrix uses the same labels for both.
    """
    attn = _head_mean(_as_tensor(attn))
    q, k = attn.shape
    labels = check_labels(labels, k, num_categories, "labels")
    if q > k:
        raise AttentionShapeError(f"more query rows ({q}) than keys ({k})")
    mass = category_mass(attn, labels, num_categories)
    return eq4_attention(mass, labels[k - q :], num_categories)[0]


def row_entropy_average(
    entropy: np.ndarray, mass: np.ndarray, query_labels: np.ndarray, num_categories: int = len(CATEGORIES)
) -> np.ndarray:
    """Mean of ``entropy[i, s]`` over the rows ``i`` of each target category with ``mass[i, s] > 0``
    (the rows Eq. 4 counts): ``(C_tgt, C_src)``, NaN where there is no such row."""
    entropy = np.asarray(entropy, dtype=np.float64)
    mass = np.asarray(mass, dtype=np.float64)
    out = np.full((num_categories, num_categories), np.nan)
    for t in range(num_categories):
        rows = query_labels == t
        for s in range(num_categories):
            ok = rows & (mass[:, s] > 0)
            if ok.any():
                out[t, s] = float(entropy[ok, s].mean())
    return out


def category_entropy(attn: Any, labels: Any, num_categories: int = len(CATEGORIES)) -> np.ndarray:
    """Mean renormalised entropy per (target, source) on one layer: ``(C_tgt, C_src)``.

    ``attn`` and ``labels`` as in :func:`category_attention` (heads averaged first)."""
    attn = _head_mean(_as_tensor(attn))
    q, k = attn.shape
    labels = check_labels(labels, k, num_categories, "labels")
    mass = category_mass(attn, labels, num_categories).cpu().numpy()
    ent = category_entropy_rows(attn, labels, num_categories).cpu().numpy()
    return row_entropy_average(ent, mass, labels[k - q :], num_categories)


# ------------------------------------------------------------------------------ per-sample statistics


@dataclass
class LayerStats:
    """Per-row attention statistics of one sequence, every layer (module docstring).

    - ``labels`` int8 ``(N,)``: category of each position; ``prompt_len``.
    - ``mass`` float64 ``(L, N, C)``: head-averaged attention of row i on category c.
    - ``entropy`` float64 ``(L, N, C)``: renormalised entropy of that attention (NaN if mass 0).
    - ``visible`` int64 ``(L, N, C)``: keys of category c row i gives non-zero weight.
    - ``head_mass`` float32 ``(L, H, N, C)``: the same mass per query head.
    """

    labels: np.ndarray
    prompt_len: int
    mass: np.ndarray
    entropy: np.ndarray
    visible: np.ndarray
    head_mass: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.mass.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.head_mass.shape[1])

    def category_attention(self) -> np.ndarray:
        """Eq. 4 per layer: ``(L, C_tgt, C_src)``."""
        return np.stack([eq4_attention(self.mass[l], self.labels)[0] for l in range(self.num_layers)])

    def category_rows(self) -> np.ndarray:
        """Eq. 4's denominators per layer: ``(L, C_tgt, C_src)`` int64."""
        return np.stack([eq4_attention(self.mass[l], self.labels)[1] for l in range(self.num_layers)])

    def category_entropy(self) -> np.ndarray:
        """Mean renormalised entropy per layer: ``(L, C_tgt, C_src)``."""
        return np.stack(
            [row_entropy_average(self.entropy[l], self.mass[l], self.labels) for l in range(self.num_layers)]
        )

    def max_entropy(self) -> np.ndarray:
        """Mean ``ln(#visible source keys)`` over the same rows: uniform attention's entropy, ``(L, C, C)``."""
        with np.errstate(divide="ignore"):
            log_visible = np.where(self.visible > 0, np.log(np.maximum(self.visible, 1)), np.nan)
        return np.stack(
            [row_entropy_average(log_visible[l], self.mass[l], self.labels) for l in range(self.num_layers)]
        )

    def rows(self, selection: str = "generating") -> np.ndarray:
        """Positions of the query rows ``selection`` names (:data:`ROW_SELECTIONS`): ``generating``:
        ``prompt_len - 1 .. N - 2`` (the rows whose outputs are the response tokens, docs/method.md
        §4); ``response``: ``prompt_len .. N - 1``; ``instruction``: instruction positions; ``all``."""
        n = self.labels.size
        if selection == "generating":
            return np.arange(max(self.prompt_len - 1, 0), n - 1)
        if selection == "response":
            return np.arange(self.prompt_len, n)
        if selection == "instruction":
            return np.flatnonzero(self.labels == INSTRUCTION)
        if selection == "all":
            return np.arange(n)
        raise LayerAnalysisError(f"row selection must be one of {ROW_SELECTIONS}, got {selection!r}")

    def head_share(self, source: int = VISION, rows: str = "generating") -> np.ndarray:
        """Per query head, mean share of attention on category ``source`` over the ``rows``:
        float64 ``(L, H)`` (NaN when the selection is empty, e.g. no response was generated)."""
        if not is_int(source) or not 0 <= source < len(CATEGORIES):
            raise CategoryLabelError(f"source must be a category code 0..{len(CATEGORIES) - 1}, got {source!r}")
        picked = self.rows(rows)
        if picked.size == 0:
            return np.full((self.num_layers, self.num_heads), np.nan)
        return self.head_mass[:, :, picked, source].astype(np.float64).mean(axis=2)


# ---------------------------------------------------------------------------------------- tables


def _long_table(per_sample: np.ndarray, value: str) -> pd.DataFrame:
    """(S, L, C, C) -> rows layer, target, source, <value> (nan-mean over samples), std, n_samples."""
    s, layers, c, _ = per_sample.shape
    rows = []
    for l in range(layers):
        for t in range(c):
            for src in range(c):
                vals = per_sample[:, l, t, src]
                ok = vals[~np.isnan(vals)]
                rows.append(
                    {
                        "layer": l,
                        "target": CATEGORIES[t],
                        "source": CATEGORIES[src],
                        value: float(ok.mean()) if ok.size else float("nan"),
                        "std": float(ok.std()) if ok.size else float("nan"),
                        "n_samples": int(ok.size),
                    }
                )
    return pd.DataFrame(rows)


def _check_stats(stats: Sequence[LayerStats]) -> None:
    if not stats:
        raise LayerAnalysisError("no samples: pass at least one LayerStats")
    shapes = {(s.num_layers, s.num_heads) for s in stats}
    if len(shapes) != 1:
        raise LayerAnalysisError(f"samples come from models of different shapes (layers, heads): {sorted(shapes)}")


def category_attention_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``category_attention.csv``: layer, target, source, attention (Eq. 4, mean over the samples
    where it is defined), std, n_samples. 0-based layers; all 9 (target, source) pairs."""
    _check_stats(stats)
    return _long_table(np.stack([s.category_attention() for s in stats]), "attention")


def entropy_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``entropy.csv``: layer, target, source, entropy (nats, mean over samples), std, n_samples,
    max_entropy (uniform attention over the source keys the rows see)."""
    _check_stats(stats)
    table = _long_table(np.stack([s.category_entropy() for s in stats]), "entropy")
    ceiling = _long_table(np.stack([s.max_entropy() for s in stats]), "max_entropy")
    table["max_entropy"] = ceiling["max_entropy"].to_numpy()
    return table


def head_vision_share_table(
    stats: Sequence[LayerStats], visual_scores: Any = None, *, rows: str = "generating"
) -> pd.DataFrame:
    """``head_vision_share.csv``: layer, head, vision_share (mean over samples of
    :meth:`LayerStats.head_share` on ``rows``), visual_score (step 03's S, NaN when not given).
    ``visual_scores``: ``(L, H)``."""
    _check_stats(stats)
    share = np.nanmean(np.stack([s.head_share(VISION, rows) for s in stats]), axis=0)
    layers, heads = share.shape
    if visual_scores is None:
        scores = np.full_like(share, np.nan)
    else:
        scores = np.asarray(visual_scores, dtype=np.float64)
        if scores.shape != share.shape:
            raise AttentionShapeError(
                f"visual_scores must be (layers, heads) = {share.shape} like the model's attention, got {scores.shape}"
            )
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "vision_share": share.ravel(),
            "visual_score": scores.ravel(),
        }
    )


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank).
    NaN when fewer than 2 pairs or either side is constant. Pairs with a NaN are dropped."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise LayerAnalysisError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 2:
        return float("nan")
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")

