"""What each method's per-head KV budgets look like on real prompts (docs/method.md §5).

For every method and budget, each prompt is prefilled once through
:func:`~sparsemm_utils.compression.compressed_generate` (one new token: the prefill only) and the
cache's decisions are read back (:func:`measure_prompts`). Three tables come out of it
(:class:`AllocationTables`; step 04, :mod:`sparsemm_utils.steps.allocation`, writes them):

- ``budgets``: method, budget, layer, kv_head, selected, window, prompt_len, stored.
  ``selected``: the cap the method assigns to the KV head (selected tokens, window excluded,
  before the n - w limit), on the first prompt (``prompt_len`` tokens; SparseMM, random
  and SnapKV do not depend on it, PyramidKV does, AdaKV reads the prompt's attention);
  ``stored``: the prompt tokens the head really keeps for that prompt (window included).
- ``saturation``: method, budget, doc_id, prompt_len, kv_heads, saturated (heads whose cap
  reaches n - w: they keep everything and the rest of their cap is lost, docs/method.md §5),
  uncompressed (heads storing the whole prompt, saturated or in a layer the original skips
  because n < B), skipped_layers, lost_tokens (sum of cap - (n - w) over saturated heads).
- ``cache_bytes``: method, budget, prompt_len, kept_tokens, kv_bytes, fullkv_bytes, doc_id.
  ``kept_tokens``: prompt tokens stored over all layers and KV heads; ``kv_bytes``: what the cache
  reports; ``fullkv_bytes``: the uncompressed cache of the same prompt, measured (docs/method.md §7).

The settings (window, ratio, seed, methods, budgets) come from step 04's config;
:class:`BudgetSettings` names the fields read here, so this module does not depend on the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sparsemm_utils.compression import (
    FullKVPress,
    UnknownCompressionMethodError,
    compressed_generate,
    make_press,
    model_shape,
)
from sparsemm_utils.kv_cache import analytic_kv_bytes

__all__ = [
    "BUDGETED_METHODS",
    "BUDGETS_COLUMNS",
    "SATURATION_COLUMNS",
    "CACHE_BYTES_COLUMNS",
    "BudgetSettings",
    "AllocationTables",
    "KVBytesMismatchError",
    "build_press",
    "measure_prompt",
    "measure_prompts",
]

#: Methods with a budget, in the order the figures show them.
BUDGETED_METHODS: tuple[str, ...] = ("sparsemm", "random", "snapkv", "pyramidkv", "adakv", "streamingllm")
BUDGETS_COLUMNS = ("method", "budget", "layer", "kv_head", "selected", "window", "prompt_len", "stored")
SATURATION_COLUMNS = (
    "method", "budget", "doc_id", "prompt_len", "kv_heads", "saturated", "uncompressed", "skipped_layers", "lost_tokens"
)
CACHE_BYTES_COLUMNS = ("method", "budget", "prompt_len", "kept_tokens", "kv_bytes", "fullkv_bytes", "doc_id")


class KVBytesMismatchError(AssertionError):
    """A cache reported bytes that differ from sum(kept) x head_dim x 2 x element size."""


class BudgetSettings(Protocol):
    """The settings this module reads (fields of step 04's ``Config``): the local ``window`` w,
    SparseMM's uniform ``ratio`` r, the random allocation's ``seed``, and the ``methods`` (of
    :data:`BUDGETED_METHODS`) and ``budgets`` B that :func:`measure_prompts` sweeps."""

    window: int
    ratio: float
    seed: int
    methods: Sequence[str]
    budgets: Sequence[int]


def build_press(name: str, budget: int, cfg: BudgetSettings, head_scores: Any = None) -> Any:
    """The press of budgeted method ``name`` at ``budget`` with the config's window (and ratio and
    seed for SparseMM / random; ``head_scores`` (layers, query_heads) for SparseMM)."""
    if name not in BUDGETED_METHODS:
        raise UnknownCompressionMethodError(f"unknown budgeted method {name!r}; known: {', '.join(BUDGETED_METHODS)}")
    kwargs: dict[str, Any] = {"budget": budget, "window": cfg.window}
    if name == "sparsemm":
        kwargs.update(head_scores=head_scores, ratio=cfg.ratio)
    elif name == "random":
        kwargs.update(ratio=cfg.ratio, seed=cfg.seed)
    elif name == "streamingllm":
        kwargs.update(sink=min(4, budget - cfg.window))  # StreamingLLM's 4 sinks, fewer if b < 4
    return make_press(name, **kwargs)


@dataclass
class AllocationTables:
    """The three tables of step 04 (columns: module docstring)."""

    budgets: pd.DataFrame
    saturation: pd.DataFrame
    cache_bytes: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per method and budget: mean KV bytes relative to FullKV and mean share of uncompressed heads."""
        kv = self.cache_bytes.assign(kv_fraction=self.cache_bytes.kv_bytes / self.cache_bytes.fullkv_bytes)
        sat = self.saturation.assign(uncompressed_share=self.saturation.uncompressed / self.saturation.kv_heads)
        left = kv.groupby(["method", "budget"], sort=False).kv_fraction.mean()
        right = sat.groupby(["method", "budget"], sort=False).uncompressed_share.mean()
        return pd.concat([left, right], axis=1).reset_index()


def _check_bytes(reported: int, stored: np.ndarray, loaded: Any, what: str) -> None:
    expected = analytic_kv_bytes(stored, loaded.head_dim, loaded.dtype)
    if reported != expected:
        raise KVBytesMismatchError(
            f"{what}: the cache reports {reported} bytes but sum(kept) x head_dim x 2 x element size = {expected}"
        )


@dataclass
class _PromptResult:
    budgets: list[dict] = field(default_factory=list)
    saturation: list[dict] = field(default_factory=list)
    cache_bytes: list[dict] = field(default_factory=list)


def measure_prompt(
    loaded: Any,
    inputs: Any,
    presses: Sequence[tuple[str, int, Any]],
    *,
    doc_id: Any = 0,
    record_budgets: bool = False,
) -> _PromptResult:
    """Prefill one prompt with FullKV and with every ``(method, budget, press)``; the rows of the
    three tables for it (``budgets`` rows only when ``record_budgets``). Every cache's reported
    bytes are checked against sum(kept) x head_dim x 2 x element size (:class:`KVBytesMismatchError`)."""
    shape = model_shape(loaded)
    n = int(inputs["input_ids"].shape[1])
    full = compressed_generate(loaded, FullKVPress(), inputs, max_new_tokens=1, do_sample=False)
    full_bytes = int(full.kv_bytes)
    _check_bytes(full_bytes, np.full(shape.kv_grid, n), loaded, "FullKV")
    out = _PromptResult()
    for method, budget, press in presses:
        result = compressed_generate(loaded, press, inputs, max_new_tokens=1, do_sample=False)
        session, cache = result.session, result.cache
        stored = cache.stored_tokens()  # prefill only: the prompt tokens each head keeps
        _check_bytes(int(result.kv_bytes), stored, loaded, f"{method} B={budget}")
        w = session.window
        saturated = session.assigned >= n - w
        out.saturation.append(
            {
                "method": method,
                "budget": budget,
                "doc_id": doc_id,
                "prompt_len": n,
                "kv_heads": int(stored.size),
                "saturated": int(saturated.sum()),
                "uncompressed": int((stored == n).sum()),
                "skipped_layers": len(session.skipped_layers),
                "lost_tokens": int(np.maximum(session.assigned - max(n - w, 0), 0)[saturated].sum()),
            }
        )
        out.cache_bytes.append(
            {
                "method": method,
                "budget": budget,
                "prompt_len": n,
                "kept_tokens": int(stored.sum()),
                "kv_bytes": int(result.kv_bytes),
                "fullkv_bytes": full_bytes,
                "doc_id": doc_id,
            }
        )
        if record_budgets:
            for layer in range(shape.layers):
                for head in range(shape.kv_heads):
                    out.budgets.append(
                        {
                            "method": method,
                            "budget": budget,
                            "layer": layer,
                            "kv_head": head,
                            "selected": int(session.assigned[layer, head]),
                            "window": w,
                            "prompt_len": n,
                            "stored": int(stored[layer, head]),
                        }
                    )
    return out


def measure_prompts(
    loaded: Any,
    cfg: BudgetSettings,
    prompts: Iterable[tuple[Any, Any]],
    head_scores: Any = None,
    *,
    progress: bool = True,
) -> AllocationTables:
    """The three tables for ``prompts`` (pairs ``(doc_id, inputs)``, batch size 1 each), every
    method of ``cfg`` at every budget. The first prompt's caps go to ``budgets``."""
    presses = [(m, b, build_press(m, b, cfg, head_scores)) for m in cfg.methods for b in cfg.budgets]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to measure: step 01 produced no documents?")
    iterator: Iterable = prompts
    if progress:
        iterator = tqdm(prompts, desc="prompts", unit="prompt")
    rows = _PromptResult()
    for index, (doc_id, inputs) in enumerate(iterator):
        result = measure_prompt(loaded, inputs, presses, doc_id=doc_id, record_budgets=index == 0)
        rows.budgets += result.budgets
        rows.saturation += result.saturation
        rows.cache_bytes += result.cache_bytes
    return AllocationTables(
        budgets=pd.DataFrame(rows.budgets, columns=list(BUDGETS_COLUMNS)),
        saturation=pd.DataFrame(rows.saturation, columns=list(SATURATION_COLUMNS)),
        cache_bytes=pd.DataFrame(rows.cache_bytes, columns=list(CACHE_BYTES_COLUMNS)),
    )
