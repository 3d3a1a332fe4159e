"""One look for every figure of the study: a colour per method, a colormap per quantity.

A reader who learns in step 04 that SparseMM is red and that visual scores are drawn in viridis
finds the same in steps 05, 06 and 07. Every figure module takes its colours from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import seaborn as sns

__all__ = [
    "METHOD_COLORS",
    "METHOD_STYLES",
    "METHOD_ORDER",
    "QUANTITY_CMAPS",
    "method_color",
    "method_style",
    "cmap_for",
]

_TAB10 = sns.color_palette("tab10", 10)

#: One colour per method, the same in every figure of the study (SparseMM red, FullKV dark grey).
METHOD_COLORS: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "sparsemm": _TAB10[3],
        "fullkv": (0.2, 0.2, 0.2),
        "fullkv_static": (0.55, 0.55, 0.55),
        "adakv": _TAB10[0],
        "snapkv": _TAB10[2],
        "pyramidkv": _TAB10[4],
        "random": _TAB10[7],
        "streamingllm": _TAB10[8],
        "mask": _TAB10[1],
        "mask_random": _TAB10[5],
        "fastv": _TAB10[6],
    }
)
#: Legend order: the full cache first, then SparseMM, then the baselines.
METHOD_ORDER: tuple[str, ...] = tuple(METHOD_COLORS)

_PLAIN = {"linestyle": "-", "marker": "o", "linewidth": 1.6}
#: Line style and marker per method (SparseMM drawn thicker; full-cache methods dashed or dotted).
METHOD_STYLES: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {m: dict(_PLAIN) for m in METHOD_COLORS}
    | {
        "sparsemm": {"linestyle": "-", "marker": "o", "linewidth": 2.6},
        "fullkv": {"linestyle": "--", "marker": None, "linewidth": 1.4},
        "fullkv_static": {"linestyle": "-.", "marker": None, "linewidth": 1.4},
        "mask": {"linestyle": ":", "marker": None, "linewidth": 1.4},
        "mask_random": {"linestyle": ":", "marker": None, "linewidth": 1.4},
        "fastv": {"linestyle": "-.", "marker": "s", "linewidth": 1.6},
    }
)

#: One colormap per quantity drawn as a heatmap or a colour scale.
QUANTITY_CMAPS: Mapping[str, str] = MappingProxyType(
    {
        "visual_score": "viridis",  # S[l, h] of step 03, wherever it is drawn
        "kv_tokens": "mako",  # tokens a KV head stores (budgets, caches)
        "attention": "rocket",  # attention weights and attention shares
        "layer": "crest",  # hue by layer index
        "image": "gray",  # page images
    }
)


def _family(method: str) -> str:
    """A random-mask draw (``mask_random_<k>``) is drawn like ``mask_random``."""
    head, _, tail = method.rpartition("_")
    return head if head == "mask_random" and tail.isdigit() else method


def method_color(method: str) -> tuple[float, float, float]:
    """The method's colour (mid grey for a method not in :data:`METHOD_COLORS`)."""
    return METHOD_COLORS.get(_family(method), (0.5, 0.5, 0.5))


def method_style(method: str) -> dict:
    """Line style, marker and width of ``method`` (a fresh dict the caller may change)."""
    return dict(METHOD_STYLES.get(_family(method), _PLAIN))


def cmap_for(quantity: str) -> str:
    """The colormap of ``quantity`` (one of :data:`QUANTITY_CMAPS`)."""
    if quantity not in QUANTITY_CMAPS:
        raise KeyError(f"no colormap for {quantity!r}; known quantities: {sorted(QUANTITY_CMAPS)}")
    return QUANTITY_CMAPS[quantity]
