"""Per-head KV cache compression in ``model.generate``: SparseMM and the baselines (docs/method.md §5).

How a method runs (kvpress calls such a method a *press*):

1. **Allocation** (how many tokens each KV head keeps): the method's dataclass builds its
   :mod:`sparsemm_utils.allocation` object (SparseMM, random, SnapKV, PyramidKV, StreamingLLM:
   static caps for a prompt of n tokens; AdaKV: caps from each layer's attention at prefill).
2. **Selection** (which tokens, docs/method.md §5 "Token selection inside a head"): at prefill,
   after RoPE, :func:`snapkv_scores` scores the keys before the window by the attention of the
   last w queries (fp32 softmax, causal inside the window, mean over the window queries, mean
   over the query heads of a KV group, ``avg_pool1d`` kernel 5 padding 2; ``selection_dtype=
   "model"``: the original's rounding in the model's dtype); each KV head keeps its top-``cap``
   positions plus the last w (:func:`topk_positions`). StreamingLLM keeps sinks +
   recent tokens instead. A head with cap >= n - w keeps everything; a prompt shorter than B is
   not compressed at all where the original skips it (``HeadCapacities.skip_if_shorter_than``).
3. **Storage**: :class:`~sparsemm_utils.kv_cache.PerHeadKVCache` packs what each head keeps.
   The prefill's own attention output uses the full keys; decoding appends every new token to
   every head and evicts nothing.

Everything reaches ``model.generate`` through transformers' extension points only
(:mod:`sparsemm_utils.attention_hooks`): an attention function registered with
``AttentionInterface`` (plus its mask function) under :data:`PER_HEAD_ATTENTION`, set on the
LANGUAGE model only (the vision tower keeps sdpa), and the cache object passed as
``past_key_values``. Per-call state (the method, the cache) reaches the attention function through
:data:`COMPRESSION_HOOK`, activated by :func:`compression` (``generate`` rejects unknown keyword
arguments). No model class is patched; the model's attention implementation is restored on exit.

The head-mask ablation (:class:`HeadMaskAblation`, docs/method.md §5) keeps the full cache and
zeroes the query of chosen heads, which makes their attention uniform over the visible keys.

Batch size 1 only, greedy or sampling, no beam search (as the original SparseMM code). Many methods
on one prompt share its prefill and decode as one batch in :mod:`sparsemm_utils.shared_prefill`
(greedy), which selects with the same :meth:`PrefillDecisions.select`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from sparsemm_utils.allocation import (
    AdaKVAllocation,
    FullKV,
    HeadCapacities,
    InvalidParameterError,
    MissingAllocationInputError,
    ModelShape,
    PyramidKVAllocation,
    RandomAllocation,
    SnapKVAllocation,
    SparseMMAllocation,
    StreamingLLMAllocation,
    adakv_round,
    build_with_known_fields,
    streaming_llm_positions,
    validate_head_scores,
)
from sparsemm_utils.attention_hooks import (
    SELECTION_DTYPES,
    AttentionHook,
    NoActiveStateError,
    original_attention_logits,
    text_attention,
)
from sparsemm_utils.kv_cache import (
    DECODE_BLOCK,
    PerHeadKVCache,
    UnsupportedBatchError,
    cache_kv_bytes,
    decode_reserve_for,
)
from sparsemm_utils.validate import check_choice, check_fraction, check_int

__all__ = [
    "PER_HEAD_ATTENTION",
    "HEAD_MASK_ATTENTION",
    "COMPRESSION_METHODS",
    "CompressionError",
    "UnknownCompressionMethodError",
    "NoActiveCompressionError",
    "NestedCompressionError",
    "InvalidGenerationInputError",
    "FullKVPress",
    "SparseMMPress",
    "RandomPress",
    "SnapKVPress",
    "PyramidKVPress",
    "AdaKVPress",
    "StreamingLLMPress",
    "HeadMaskAblation",
    "Press",
    "PrefillDecisions",
    "CompressionSession",
    "GenerationResult",
    "make_press",
    "model_shape",
    "snapkv_scores",
    "snapkv_window_scores",
    "SELECTION_DTYPES",
    "topk_positions",
    "RANKINGS",
    "COMPRESSION_HOOK",
    "compression",
    "compressed_generate",
    "per_head_attention",
    "head_mask_attention",
]

#: Name the per-head attention function is registered under (AttentionInterface + mask interface).
PER_HEAD_ATTENTION = "sparsemm_per_head"
#: Name of the head-mask ablation's attention function.
HEAD_MASK_ATTENTION = "sparsemm_head_mask"


# ---------------------------------------------------------------------------------------- errors


class CompressionError(ValueError):
    """Base class of the errors raised by this module."""


class UnknownCompressionMethodError(CompressionError):
    """A method name not in :data:`COMPRESSION_METHODS` (the message lists the known ones)."""


class NoActiveCompressionError(NoActiveStateError):
    """The per-head attention function ran outside :func:`compression` / :func:`compressed_generate`."""


class NestedCompressionError(RuntimeError):
    """:func:`compression` entered while another compression context is active."""


class InvalidGenerationInputError(CompressionError):
    """Inputs or ``generate`` arguments the compressed path cannot honour (batch > 1, padding,
    beam search, a cache of one's own)."""


def _check_kernel(kernel_size: object) -> int:
    kernel = check_int("kernel_size", kernel_size, 1, error=InvalidParameterError)
    if kernel % 2 == 0:
        raise InvalidParameterError(
            f"kernel_size must be odd (avg_pool1d with padding kernel_size // 2 keeps the length), got {kernel}; "
            f"docs/method.md §5: default 5"
        )
    return kernel


def model_shape(loaded_or_model: Any) -> ModelShape:
    """(layers, query_heads, kv_heads) of a LoadedModel's (or a model's / config's) language model."""
    config = getattr(getattr(loaded_or_model, "model", loaded_or_model), "config", loaded_or_model)
    return ModelShape.from_config(config)


# ------------------------------------------------------------------------------------- selection


def _check_window(window: object, prompt_len: int) -> int:
    window = check_int("window", window, 1, error=InvalidParameterError)
    if window >= prompt_len:
        raise InvalidParameterError(f"window w={window} must be < the prompt length n={prompt_len} to score anything")
    return window


def snapkv_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    window: int,
    scaling: float | None = None,
    kernel_size: int = 5,
    selection_dtype: str = "float32",
) -> torch.Tensor:
    """SnapKV's per-KV-head scores of the keys before the window (docs/method.md §5, token selection).

    A = softmax_fp32(Q[-w:] K^T * scaling) with a causal mask inside the window (window query i,
    at position n - w + i, sees keys 0 .. n - w + i); averaged over the w window queries; columns
    0 .. n - w - 1 kept; averaged over the G = H / H_kv query heads of each KV group; smoothed by
    ``avg_pool1d(kernel_size, stride 1, padding kernel_size // 2)`` (zero padding counted, as
    torch's default and the original). Only the last w queries matter:
    :func:`snapkv_window_scores` computes the same from those alone.

    Args:
        query: ``(1, H, n, d)`` post-RoPE queries of the prompt.
        key: ``(1, H_kv, n, d)`` post-RoPE keys.
        window: w, with 1 <= w < n.
        scaling: softmax scale (default d ** -0.5, the models' own).
        kernel_size: odd pooling kernel (docs/method.md §5: default 5).
        selection_dtype: ``"float32"`` (every step in float32) or ``"model"`` (the original's
            rounding: see :func:`snapkv_window_scores`).

    Returns:
        float32 ``(H_kv, n - w)``.
    """
    if query.ndim != 4 or key.ndim != 4 or query.shape[0] != 1 or key.shape[0] != 1:
        raise UnsupportedBatchError(
            f"snapkv_scores needs query (1, H, n, d) and key (1, H_kv, n, d), got {tuple(query.shape)}, {tuple(key.shape)}"
        )
    n = query.shape[2]
    if key.shape[2] != n:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match (same n, H % H_kv == 0)")
    window = _check_window(window, n)
    return snapkv_window_scores(query[:, :, n - window :], key, scaling, kernel_size, selection_dtype)


def snapkv_window_scores(
    window_query: torch.Tensor,
    key: torch.Tensor,
    scaling: float | None = None,
    kernel_size: int = 5,
    selection_dtype: str = "float32",
) -> torch.Tensor:
    """:func:`snapkv_scores` from the queries of the last w prompt positions only (what a shared
    prefill keeps, :mod:`sparsemm_utils.shared_prefill`); the window w is ``window_query``'s length.

    ``selection_dtype="float32"`` (the default) casts queries and keys to float32 and keeps every
    step there. ``"model"`` computes as the original's ``calcul_attn_sore`` /
    ``SnapKVCluster.update_kv``, in the inputs' dtype (bf16 on the paper's models): logits by
    :func:`~sparsemm_utils.attention_hooks.original_attention_logits`, the window's causal mask
    added as the dtype's minimum, the softmax in float32 cast back to the inputs' dtype, then the
    window mean, the GQA mean and the pooling in that dtype (docs/deviations.md, "Selection
    scores"). On a float32 model the two agree.

    Args:
        window_query: ``(1, H, w, d)`` post-RoPE queries of prompt positions n - w .. n - 1.
        key: ``(1, H_kv, n, d)`` post-RoPE keys of the whole prompt, 1 <= w < n.

    Returns:
        float32 ``(H_kv, n - w)`` (with ``"model"``: the model-dtype values, exactly represented).
    """
    if window_query.ndim != 4 or key.ndim != 4 or window_query.shape[0] != 1 or key.shape[0] != 1:
        raise UnsupportedBatchError(
            f"snapkv_window_scores needs window_query (1, H, w, d) and key (1, H_kv, n, d), got "
            f"{tuple(window_query.shape)}, {tuple(key.shape)}"
        )
    _, heads, window, dim = window_query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    if heads % kv_heads or key.shape[-1] != dim:
        raise ValueError(
            f"window_query {tuple(window_query.shape)} and key {tuple(key.shape)} do not match (same d, H % H_kv == 0)"
        )
    _check_window(window, n)
    kernel = _check_kernel(kernel_size)
    check_choice("selection_dtype", selection_dtype, SELECTION_DTYPES, error=InvalidParameterError)
    group = heads // kv_heads
    if selection_dtype == "model":
        return _model_dtype_window_scores(window_query, repeat_kv(key, group), scaling, kv_heads, kernel)
    scale = dim**-0.5 if scaling is None else float(scaling)
    q = window_query[0].float()  # (H, w, d)
    k = repeat_kv(key, group)[0].float()  # (H, n, d)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (H, w, n)
    row = torch.arange(window, device=window_query.device)[:, None]
    col = torch.arange(window, device=window_query.device)[None, :]
    logits[:, :, n - window :] = logits[:, :, n - window :].masked_fill(col > row, float("-inf"))
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)  # (H, n)
    attn = attn[:, : n - window].reshape(kv_heads, group, n - window).mean(dim=1)  # (H_kv, n - w)
    return F.avg_pool1d(attn[None], kernel_size=kernel, stride=1, padding=kernel // 2)[0]


def _model_dtype_window_scores(
    window_query: torch.Tensor, key: torch.Tensor, scaling: float | None, kv_heads: int, kernel: int
) -> torch.Tensor:
    """The original's window scores, op for op in the inputs' dtype: ``window_query`` (1, H, w, d),
    ``key`` (1, H, n, d) already repeated per query head; float32 (H_kv, n - w)."""
    window = window_query.shape[2]
    logits = original_attention_logits(window_query, key, scaling)  # (1, H, w, n), model dtype
    mask = torch.full((window, window), torch.finfo(logits.dtype).min, device=logits.device)
    cond = torch.arange(window, device=logits.device)
    mask.masked_fill_(cond < (cond + 1).view(window, 1), 0)
    logits[:, :, -window:, -window:] += mask[None, None]
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(window_query.dtype)
    mean = attn[:, :, -window:, :-window].mean(dim=-2)  # (1, H, n - w)
    mean = mean.view(1, kv_heads, -1, mean.shape[-1]).mean(dim=-2)  # (1, H_kv, n - w)
    return F.avg_pool1d(mean, kernel_size=kernel, padding=kernel // 2, stride=1)[0].float()


#: How a method ranks its scored keys: ``"topk"`` (``torch.topk``, the original's SnapKV and
#: PyramidKV) or ``"sort"`` (the first cap of a descending ``sort``, the original's SparseMM and
#: AdaKV). They keep different keys only on ties at the cap, which bf16 scores make common.
RANKINGS: tuple[str, ...] = ("topk", "sort")


def topk_positions(
    scores: torch.Tensor, caps: Any, prompt_len: int, window: int, *, ranking: str = "topk"
) -> list[torch.Tensor]:
    """Prompt positions each KV head keeps: its top-``cap`` scored positions, then the window.

    Args:
        scores: ``(H_kv, n - w)``, e.g. from :func:`snapkv_scores` (higher = keep).
        caps: ``(H_kv,)`` ints, selected tokens per head (window excluded).
        prompt_len: n.
        window: w.
        ranking: which of two equal scores at the cap is kept (:data:`RANKINGS`): ``"topk"``
            (``torch.topk``'s choice, the default) or ``"sort"`` (the first cap of
            ``scores.sort(dim=-1, descending=True)``).

    Returns:
        H_kv sorted int64 tensors. A head with cap >= n - w keeps all n positions (docs/method.md §5:
        "skip compression when cap >= n - w"); otherwise its top-cap positions among 0 .. n - w - 1
        followed by n - w .. n - 1.
    """
    check_choice("ranking", ranking, RANKINGS, error=InvalidParameterError)
    caps = np.asarray(caps).astype(np.int64).ravel()
    n, w = int(prompt_len), int(window)
    if scores.ndim != 2 or scores.shape != (caps.size, max(n - w, 0)):
        raise ValueError(f"scores must be (H_kv, n - w) = ({caps.size}, {n - w}), got {tuple(scores.shape)}")
    device = scores.device
    tail = torch.arange(max(n - w, 0), n, device=device)
    order = scores.sort(dim=-1, descending=True).indices if ranking == "sort" else None
    out = []
    for h, cap in enumerate(caps.tolist()):
        if cap >= n - w:
            out.append(torch.arange(n, device=device))
            continue
        picked = order[h, : int(cap)] if order is not None else torch.topk(scores[h], int(cap)).indices
        out.append(torch.cat([picked.sort().values, tail]))
    return out


# ---------------------------------------------------------------------------------------- presses


@dataclass(frozen=True, kw_only=True, eq=False)
class _BudgetedPress(ABC):
    """Fields every compressing method shares: the budget B (window included) and the window w."""

    budget: int
    window: int = 32

    name: ClassVar[str] = ""
    selection: ClassVar[Literal["snapkv", "streaming"]] = "snapkv"

    def __post_init__(self) -> None:
        self.allocation  # builds (and so validates) the allocation: budget, window, method parameters

    @property
    @abstractmethod
    def allocation(self) -> Any:
        """The :mod:`sparsemm_utils.allocation` object whose capacities this method uses."""

    def validate_for(self, shape: ModelShape) -> None:
        """Raise before any forward pass if the method cannot run on a model of this ``shape``."""

    def capacities(self, shape: ModelShape, prompt_len: int) -> HeadCapacities:
        """Selected tokens per KV head, (layers, kv_heads), for a prompt of ``prompt_len`` tokens."""
        return self.allocation.capacities(shape, prompt_len=prompt_len)

    @property
    def data_dependent(self) -> bool:
        """True when the caps come from the prompt's attention (AdaKV), not from ``capacities``."""
        return False


@dataclass(frozen=True, kw_only=True, eq=False)
class _SnapKVSelecting(_BudgetedPress):
    """Fields of the methods that select by window attention (:func:`snapkv_window_scores`): the
    pooling ``kernel_size`` and the ``selection_dtype`` the scores are computed in (``"float32"``,
    the default, or ``"model"``, the original's rounding)."""

    kernel_size: int = 5
    selection_dtype: Literal["float32", "model"] = "float32"

    #: The original's ranking op for this method (:data:`RANKINGS`), used with ``"model"``;
    #: ``"float32"`` always ranks with ``torch.topk``.
    original_ranking: ClassVar[Literal["topk", "sort"]] = "sort"

    @property
    def ranking(self) -> str:
        """How :meth:`PrefillDecisions.select` ranks the scored keys (:func:`topk_positions`)."""
        return self.original_ranking if self.selection_dtype == "model" else "topk"

    def __post_init__(self) -> None:
        _check_kernel(self.kernel_size)
        check_choice("selection_dtype", self.selection_dtype, SELECTION_DTYPES, error=InvalidParameterError)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True, eq=False)
class FullKVPress:
    """FullKV (docs/method.md §5): no compression; the stock ``DynamicCache`` and sdpa attention.
    The reference every method's KV bytes and outputs are compared with."""

    name: ClassVar[str] = "fullkv"

    @property
    def allocation(self) -> FullKV:
        return FullKV()

    def validate_for(self, shape: ModelShape) -> None:
        """Nothing to check: FullKV runs on any model."""

    def capacities(self, shape: ModelShape, prompt_len: int) -> HeadCapacities:
        """n for every KV head, window 0."""
        return FullKV().capacities(shape, prompt_len=prompt_len)


def _scores_array(head_scores: Any) -> np.ndarray:
    if head_scores is None:
        raise MissingAllocationInputError(
            "head_scores=... is required: the visual head scores (layers, query_heads) of step 03, e.g. "
            "sparsemm_utils.head_scoring_files.load_head_scores('<run>/03_head_scoring/head_scores.json', shape)"
        )
    if hasattr(head_scores, "detach"):
        head_scores = head_scores.detach().to("cpu").double().numpy()
    array = np.array(head_scores, dtype=np.float64)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, kw_only=True, eq=False)
class SparseMMPress(_SnapKVSelecting):
    """SparseMM (docs/method.md §5): caps proportional to the visual head scores, SnapKV selection.

    cap[l, g] = round(sigma[l, g] * P + m) with m = floor(r * (B - w)) and P = (B - w - m) * L * H_kv
    (:class:`~sparsemm_utils.allocation.SparseMMAllocation`); each KV head keeps its top-cap keys
    by window attention plus the last w tokens. ``head_scores``: (layers, query_heads), step 03.
    """

    head_scores: Any = None
    ratio: float = 0.1
    saturation: Literal["fidelity", "redistribute"] = "fidelity"

    name: ClassVar[str] = "sparsemm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_scores", _scores_array(self.head_scores))
        super().__post_init__()

    @property
    def allocation(self) -> SparseMMAllocation:
        return SparseMMAllocation(budget=self.budget, window=self.window, ratio=self.ratio, saturation=self.saturation)

    def validate_for(self, shape: ModelShape) -> None:
        """The scores must be (layers, query_heads) of THIS model, finite, >= 0, not all zero."""
        validate_head_scores(self.head_scores, shape)

    def capacities(self, shape: ModelShape, prompt_len: int) -> HeadCapacities:
        return self.allocation.capacities(shape, head_scores=self.head_scores, prompt_len=prompt_len)


@dataclass(frozen=True, kw_only=True, eq=False)
class RandomPress(_SnapKVSelecting):
    """Random allocation (docs/method.md §5 ablation): SparseMM's formula on seeded uniform scores,
    SnapKV selection (:class:`~sparsemm_utils.allocation.RandomAllocation`)."""

    ratio: float = 0.1
    saturation: Literal["fidelity", "redistribute"] = "fidelity"
    seed: int = 0

    name: ClassVar[str] = "random"

    @property
    def allocation(self) -> RandomAllocation:
        return RandomAllocation(
            budget=self.budget, window=self.window, ratio=self.ratio, saturation=self.saturation, seed=self.seed
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class SnapKVPress(_SnapKVSelecting):
    """SnapKV (docs/method.md §5): every KV head keeps B - w tokens by window attention + the window."""

    name: ClassVar[str] = "snapkv"
    original_ranking: ClassVar[Literal["topk", "sort"]] = "topk"

    @property
    def allocation(self) -> SnapKVAllocation:
        return SnapKVAllocation(budget=self.budget, window=self.window)


@dataclass(frozen=True, kw_only=True, eq=False)
class PyramidKVPress(_SnapKVSelecting):
    """PyramidKV (docs/method.md §5, beta = 20): caps fall linearly with depth, SnapKV selection."""

    beta: int = 20

    name: ClassVar[str] = "pyramidkv"
    original_ranking: ClassVar[Literal["topk", "sort"]] = "topk"

    @property
    def allocation(self) -> PyramidKVAllocation:
        return PyramidKVAllocation(budget=self.budget, window=self.window, beta=self.beta)

    def validate_for(self, shape: ModelShape) -> None:
        if shape.layers < 2:
            raise InvalidParameterError("PyramidKV interpolates between layers: the model needs >= 2 layers")


@dataclass(frozen=True, kw_only=True, eq=False)
class AdaKVPress(_SnapKVSelecting):
    """AdaKV (docs/method.md §5, alpha = 0.2): per layer, caps from the heads' pooled window attention
    (:func:`~sparsemm_utils.allocation.adakv_caps`), then SnapKV selection with those caps."""

    alpha: float = 0.2

    name: ClassVar[str] = "adakv"

    @property
    def allocation(self) -> AdaKVAllocation:
        return AdaKVAllocation(budget=self.budget, window=self.window, alpha=self.alpha)

    @property
    def data_dependent(self) -> bool:
        return True

    def capacities(self, shape: ModelShape, prompt_len: int) -> HeadCapacities:
        raise MissingAllocationInputError(
            "AdaKV's caps depend on each layer's attention at prefill: they are computed inside the compressed "
            "forward (see CompressionSession.assigned), or with AdaKVAllocation.capacities(shape, attention=...)"
        )

    def layer_capacities(self, pooled_scores: torch.Tensor, model_dtype: torch.dtype | None = None) -> np.ndarray:
        """One layer's caps, int64 (H_kv,), from its :func:`snapkv_scores` ``(H_kv, n - w)``.

        With ``selection_dtype="model"`` and the model's ``model_dtype``, the steps before the
        rounding run as the original's ``AdaKVCluster.update_kv`` runs them, in that dtype: each
        head's top-b mass over its total, the scaled sorted scores, the layer-wide ``torch.topk``
        (its choice on ties); otherwise :func:`~sparsemm_utils.allocation.adakv_caps` in float64.
        """
        if self.selection_dtype != "model" or model_dtype is None:
            return self.allocation.layer_capacities(pooled_scores)
        b = self.allocation.selected_budget
        kv_heads, length = pooled_scores.shape
        ranked = pooled_scores.to(model_dtype)[None].sort(dim=-1, descending=True).values  # (1, H_kv, n - w)
        weight = ranked[..., :b].sum(dim=-1, keepdim=True) / ranked.sum(dim=-1, keepdim=True)
        chosen = torch.topk((ranked * weight).reshape(1, -1), k=kv_heads * b, dim=-1).indices[0] // length
        return adakv_round(torch.bincount(chosen, minlength=kv_heads).cpu().numpy(), b, self.alpha)


@dataclass(frozen=True, kw_only=True, eq=False)
class StreamingLLMPress(_BudgetedPress):
    """StreamingLLM (docs/method.md §5 peer): every KV head keeps the first ``sink`` tokens and the
    most recent ones, B in all (:func:`~sparsemm_utils.allocation.streaming_llm_positions`)."""

    sink: int = 4

    name: ClassVar[str] = "streamingllm"
    selection: ClassVar[Literal["snapkv", "streaming"]] = "streaming"

    @property
    def allocation(self) -> StreamingLLMAllocation:
        return StreamingLLMAllocation(budget=self.budget, window=self.window, sink=self.sink)


@dataclass(frozen=True, kw_only=True, eq=False)
class HeadMaskAblation:
    """Head-mask ablation (docs/method.md §5): the full cache, with the query of chosen heads zeroed,
    so their attention is uniform over the keys they see (causal).

    ``selection="top"``: the k = round(fraction x L x H) query heads with the highest visual score
    (ties to the lower layer-major index); ``"random"``: k heads drawn without replacement with
    ``numpy.random.default_rng(seed)``. The paper's ablation masks the top 10% visual heads versus
    10% random heads. ``head_scores`` (layers, query_heads) is needed for ``"top"``.
    """

    selection: Literal["top", "random"] = "top"
    fraction: float = 0.1
    head_scores: Any = None
    seed: int = 0

    name: ClassVar[str] = "head_mask"

    def __post_init__(self) -> None:
        check_choice("selection", self.selection, ("top", "random"), error=InvalidParameterError)
        zero = "fraction must be a number in (0, 1]: the ablation masks at least one head"
        if check_fraction("fraction", self.fraction, error=InvalidParameterError, hint=zero) == 0:
            raise InvalidParameterError(f"{zero}, got {self.fraction!r}")
        check_int("seed", self.seed, 0, error=InvalidParameterError)
        if self.selection == "top":
            object.__setattr__(self, "head_scores", _scores_array(self.head_scores))

    def num_masked(self, shape: ModelShape) -> int:
        """k = round(fraction x L x H), half to even; at least 1."""
        return max(1, round(self.fraction * shape.layers * shape.query_heads))

    def validate_for(self, shape: ModelShape) -> None:
        if self.selection == "top":
            validate_head_scores(self.head_scores, shape)

    def masked_heads(self, shape: ModelShape) -> np.ndarray:
        """Boolean (layers, query_heads): True for the heads whose query is zeroed."""
        k = self.num_masked(shape)
        total = shape.layers * shape.query_heads
        if self.selection == "top":
            flat = validate_head_scores(self.head_scores, shape).ravel()
            chosen = np.argsort(-flat, kind="stable")[:k]
        else:
            chosen = np.random.default_rng(self.seed).choice(total, size=k, replace=False)
        mask = np.zeros(total, dtype=bool)
        mask[chosen] = True
        return mask.reshape(shape.layers, shape.query_heads)


Press = (
    FullKVPress | SparseMMPress | RandomPress | SnapKVPress | PyramidKVPress | AdaKVPress | StreamingLLMPress | HeadMaskAblation
)

#: name -> method dataclass (the allocation names of docs/method.md §5, plus the head-mask ablation).
COMPRESSION_METHODS: Mapping[str, type] = {
    cls.name: cls
    for cls in (
        FullKVPress,
        SparseMMPress,
        RandomPress,
        SnapKVPress,
        PyramidKVPress,
        AdaKVPress,
        StreamingLLMPress,
        HeadMaskAblation,
    )
}


def make_press(name: str, **kwargs: Any) -> Press:
    """The method registered under ``name`` (case-insensitive), built with ``kwargs``.

    >>> make_press("snapkv", budget=256).allocation.selected_budget
    224
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in COMPRESSION_METHODS:
        raise UnknownCompressionMethodError(
            f"unknown compression method {name!r}; known methods: {', '.join(sorted(COMPRESSION_METHODS))}"
        )
    return build_with_known_fields(COMPRESSION_METHODS[key], kwargs)


# ---------------------------------------------------------------------------------------- session


@dataclass(eq=False)
class PrefillDecisions:
    """What a method decided at one prompt's prefill, layer by layer (docs/method.md §5): the caps
    it assigned, the layers it left uncompressed, and which prompt positions each KV head keeps.

    :meth:`select` is THE selection rule of the compressed path: :class:`CompressionSession`
    (batch 1, inside ``model.generate``) and :mod:`sparsemm_utils.shared_prefill` (one prefill
    shared by many methods) both call it.

    Attributes:
        press: the method.
        shape: the language model's (layers, query_heads, kv_heads).
        prompt_len: n, set at the prefill's first layer.
        assigned: int64 (layers, kv_heads): the caps (selected tokens, window excluded) the method
            assigned at the prefill, before the n - w limit; -1 until the layer's prefill ran.
        skipped_layers: layers left uncompressed because n < B (the original's whole-prompt skip).
    """

    press: Any
    shape: ModelShape
    prompt_len: int | None = field(default=None, kw_only=True)
    assigned: np.ndarray = field(init=False)
    skipped_layers: list[int] = field(default_factory=list, kw_only=True)
    _static: HeadCapacities | None = field(default=None, repr=False, kw_only=True)

    def __post_init__(self) -> None:
        self.assigned = np.full(self.shape.kv_grid, -1, dtype=np.int64)

    @property
    def window(self) -> int:
        return int(getattr(self.press, "window", 0))

    def _start_prefill(self, n: int) -> None:
        self.prompt_len = n
        if not getattr(self.press, "data_dependent", False):
            self._static = self.press.capacities(self.shape, n)

    def select(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float | None,
        *,
        scorer: Callable[[int, int, str], torch.Tensor] | None = None,
    ) -> list[torch.Tensor] | None:
        """Decide what each KV head of ``layer_idx`` keeps; record its caps (and a skip).

        Args:
            layer_idx: the decoder layer (layer 0 starts a new prompt).
            query: ``(1, H, m, d)`` post-RoPE queries of the LAST m prompt positions, m >= min(w, n)
                (the whole prompt's queries in the batch-1 path; SnapKV reads the last w only).
            key: ``(1, H_kv, n, d)`` post-RoPE keys of the prompt.
            scaling: the attention's softmax scale.
            scorer: ``scorer(window, kernel_size, selection_dtype)`` -> this layer's SnapKV scores
                ``(H_kv, n - w)`` (:func:`snapkv_window_scores` of ``query`` and ``key``, the
                default); a shared prefill passes a memoised one, so methods with the same w,
                kernel and dtype score once.

        Returns:
            H_kv sorted int64 position tensors (docs/method.md §5: top-cap by window attention, or
            StreamingLLM's sinks + recent tokens, then the window), or None when every head keeps
            all n positions (n < B skip, or every cap >= n - w).
        """
        n = int(key.shape[-2])
        if layer_idx == 0 or self.prompt_len is None:
            self._start_prefill(n)
        w = self.window
        press = self.press
        if press.data_dependent:  # AdaKV: caps from this layer's pooled scores
            if n - w < press.allocation.selected_budget:  # b > n - w: the original does not compress
                self.assigned[layer_idx] = press.allocation.selected_budget
                self.skipped_layers.append(layer_idx)
                return None
            scores = self._window_scores(query, key, scaling, scorer)
            caps = press.layer_capacities(scores, key.dtype)
            self.assigned[layer_idx] = caps
            return topk_positions(scores, caps, n, w, ranking=press.ranking)
        caps = self._static.selected[layer_idx]
        self.assigned[layer_idx] = caps
        skip_below = self._static.skip_if_shorter_than
        if skip_below is not None and n < skip_below:
            self.skipped_layers.append(layer_idx)
            return None
        if (caps >= n - w).all():
            return None
        if press.selection == "streaming":
            tail = torch.arange(n - w, n, device=key.device)
            positions = []
            for cap in caps.tolist():
                if cap >= n - w:
                    positions.append(torch.arange(n, device=key.device))
                else:
                    chosen = torch.as_tensor(streaming_llm_positions(n, cap, w, press.sink), device=key.device)
                    positions.append(torch.cat([chosen, tail]))
            return positions
        return topk_positions(self._window_scores(query, key, scaling, scorer), caps, n, w, ranking=press.ranking)

    def _window_scores(
        self, query: torch.Tensor, key: torch.Tensor, scaling: float | None, scorer: Callable[[int, int, str], torch.Tensor] | None
    ) -> torch.Tensor:
        w = self.window
        dtype = self.press.selection_dtype
        if scorer is not None:
            return scorer(w, self.press.kernel_size, dtype)
        if query.ndim != 4 or query.shape[2] < w:
            raise ValueError(
                f"{self.press.name}: SnapKV scoring needs the queries of the last w={w} prompt positions, got a query "
                f"of shape {tuple(query.shape)}; record at least w window queries (shared_prefill(query_window=...))"
            )
        return snapkv_window_scores(query[:, :, query.shape[2] - w :], key, scaling, self.press.kernel_size, dtype)

    def saturated(self) -> np.ndarray:
        """bool (layers, kv_heads): heads whose cap reached n - w (they keep everything; the rest of
        their cap is lost, docs/method.md §5)."""
        if self.prompt_len is None:
            raise RuntimeError("no prefill has run in this session yet")
        return self.assigned >= self.prompt_len - self.window


@dataclass(eq=False)
class CompressionSession(PrefillDecisions):
    """State of one compressed forward/generation: the method's :class:`PrefillDecisions` plus the
    cache they are applied to.

    Attributes (besides :class:`PrefillDecisions`'):
        cache: the cache to pass as ``past_key_values`` (a :class:`PerHeadKVCache` for the
            compressing methods, a ``DynamicCache`` for FullKV and the head-mask ablation).
        head_mask: bool (layers, query_heads) for :class:`HeadMaskAblation`, else None.
    """

    cache: Cache
    head_mask: np.ndarray | None = field(default=None, kw_only=True)

    def prefill_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Choose the prompt positions each KV head of ``layer_idx`` keeps (:meth:`select`) and pack them.

        ``query`` (1, H, n, d) and ``key`` (1, H_kv, n, d) are the prefill's post-RoPE states."""
        positions = self.select(layer_idx, query, key, scaling)
        layer = self.cache.layers[layer_idx]
        if positions is None:
            layer.keep_all()
        else:
            layer.compress(positions)


#: The session every compressed-path attention function reads (:func:`per_head_attention`,
#: :func:`head_mask_attention`, the decode backends of :mod:`sparsemm_utils.varlen_attention`).
COMPRESSION_HOOK: AttentionHook[CompressionSession] = AttentionHook(
    "sparsemm_compression",
    context="a compression context",
    usage=(
        "use sparsemm_utils.compression.compressed_generate(loaded, press, inputs, ...) or "
        "`with compression(loaded, press) as session:` around the forward pass"
    ),
    missing_error=NoActiveCompressionError,
    nested_error=NestedCompressionError,
)


def per_head_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of the compressed path (registered as :data:`PER_HEAD_ATTENTION`).

    Prefill (the layer holds its full keys pending): the output is sdpa over the full keys with the
    model's mask (docs/method.md §5: the prefill's own attention is not compressed), then the session
    chooses what each KV head keeps and the layer packs it. Decode: attention of the new tokens over
    each KV head's stored tokens (:meth:`~sparsemm_utils.kv_cache.PerHeadKVLayer.attend`).
    Shapes: query (1, H, q, d), key/value as the cache's ``update`` returned them; output (1, q, H, d).
    """
    session = COMPRESSION_HOOK.active(PER_HEAD_ATTENTION)
    layer = session.cache.layers[module.layer_idx]
    if layer.has_pending_prefill:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        session.prefill_layer(module.layer_idx, query, key, scaling)
        return output, None
    return layer.attend(query, scaling), None


def head_mask_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa with the query of the session's masked heads of this layer set to zero (uniform attention)."""
    session = COMPRESSION_HOOK.active(HEAD_MASK_ATTENTION)
    heads = np.flatnonzero(session.head_mask[module.layer_idx])
    if heads.size:
        query = query.clone()
        query[:, torch.as_tensor(heads, device=query.device)] = 0
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextmanager
def compression(loaded: Any, press: Any, *, decode_reserve: int = DECODE_BLOCK) -> Iterator[CompressionSession]:
    """Run the language model of ``loaded`` with ``press`` inside the ``with`` block.

    Registers the method's attention function (idempotent), switches the language model to it
    (FullKV keeps the current one), makes a fresh cache, and yields the :class:`CompressionSession`
    whose ``cache`` must be passed as ``past_key_values``. On exit the previous attention
    implementation is restored, also after an error. Nested contexts raise
    :class:`NestedCompressionError`.

    Args:
        loaded: a :class:`~sparsemm_utils.models.LoadedModel`.
        press: a method dataclass (see :data:`COMPRESSION_METHODS`).
        decode_reserve: rows per KV head reserved for generated tokens (see kv_cache).
    """
    if not hasattr(press, "validate_for") or getattr(press, "name", None) not in COMPRESSION_METHODS:
        raise UnknownCompressionMethodError(
            f"press must be one of the method dataclasses ({', '.join(sorted(COMPRESSION_METHODS))}), built e.g. with "
            f"make_press('sparsemm', budget=256, head_scores=...); got {press!r}"
        )
    shape = model_shape(loaded)
    press.validate_for(shape)
    model = loaded.model
    text_config = model.config.get_text_config()
    if isinstance(press, FullKVPress):
        session = CompressionSession(press, shape, DynamicCache(config=text_config))
        attention = None
    elif isinstance(press, HeadMaskAblation):
        session = CompressionSession(press, shape, DynamicCache(config=text_config), head_mask=press.masked_heads(shape))
        attention = COMPRESSION_HOOK.register(HEAD_MASK_ATTENTION, head_mask_attention)
    else:
        session = CompressionSession(press, shape, PerHeadKVCache(shape.layers, decode_reserve=decode_reserve))
        attention = COMPRESSION_HOOK.register(PER_HEAD_ATTENTION, per_head_attention)
    switch = text_attention(model, attention) if attention is not None else nullcontext()
    with COMPRESSION_HOOK.activate(session), switch:
        yield session


@dataclass(eq=False)
class GenerationResult:
    """What :func:`compressed_generate` returns: ``output`` is ``model.generate``'s own return value
    (a tensor of token ids, or a ModelOutput with ``return_dict_in_generate=True``); ``session``
    holds the cache and the prefill's decisions."""

    output: Any
    session: CompressionSession

    @property
    def sequences(self) -> torch.Tensor:
        """(1, n + new tokens) token ids."""
        return self.output if isinstance(self.output, torch.Tensor) else self.output.sequences

    @property
    def cache(self) -> Cache:
        return self.session.cache

    @property
    def kv_bytes(self) -> int:
        """KV bytes the cache holds after generation (docs/method.md §7)."""
        return cache_kv_bytes(self.session.cache)


def _decode_reserve(loaded: Any, gen_kwargs: Mapping[str, Any], decode_block: int) -> int:
    """:func:`~sparsemm_utils.kv_cache.decode_reserve_for` of the generation's ``max_new_tokens``
    (``gen_kwargs``, else the model's generation config, else 64)."""
    max_new = gen_kwargs.get("max_new_tokens") or getattr(loaded.model.generation_config, "max_new_tokens", None) or 64
    return decode_reserve_for(int(max_new), decode_block)


_FORBIDDEN_GENERATE_KWARGS = ("past_key_values", "cache_implementation", "prefill_chunk_size", "assistant_model")


def _check_generation_inputs(inputs: Mapping[str, Any], gen_kwargs: Mapping[str, Any]) -> None:
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise InvalidGenerationInputError(
            "inputs must hold input_ids of shape (1, n), e.g. from sparsemm_utils.prompts.build_inputs(loaded, image)"
        )
    if ids.shape[0] != 1:
        raise UnsupportedBatchError(
            f"batch size {ids.shape[0]}: the per-head KV cache runs one prompt at a time (batch size 1, as the "
            f"original); loop over prompts"
        )
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        raise InvalidGenerationInputError(
            "the attention_mask holds padding (zeros): a single prompt needs no padding; build it without padding"
        )
    for name in _FORBIDDEN_GENERATE_KWARGS:
        if gen_kwargs.get(name) is not None:
            raise InvalidGenerationInputError(
                f"{name}= is not supported here: compressed_generate makes the cache itself and prefills in one pass"
            )
    for name in ("num_beams", "num_return_sequences"):
        if gen_kwargs.get(name, 1) != 1:
            raise InvalidGenerationInputError(f"{name}={gen_kwargs[name]}: the per-head KV cache needs {name}=1")
    if gen_kwargs.get("use_cache", True) is False:
        raise InvalidGenerationInputError("use_cache=False: a compressed KV cache needs use_cache=True")


def compressed_generate(
    loaded: Any, press: Any, inputs: Mapping[str, Any], *, decode_block: int = DECODE_BLOCK, **gen_kwargs: Any
) -> GenerationResult:
    """``loaded.model.generate(**inputs, **gen_kwargs)`` with the KV cache compressed by ``press``.

    The method is validated against the model (e.g. head scores of the wrong shape raise
    :class:`~sparsemm_utils.allocation.ScoreShapeError`) before any forward pass. ``inputs``: one
    prompt (batch size 1, no padding), e.g. :func:`sparsemm_utils.prompts.build_inputs`.
    ``gen_kwargs`` go to ``generate`` (``max_new_tokens``, ``do_sample``, ``output_logits``,
    ``return_dict_in_generate``, ...); the decode reserve is
    :func:`~sparsemm_utils.kv_cache.decode_reserve_for` ``(max_new_tokens, decode_block)``: free rows
    per KV head, granted again in blocks of ``decode_block`` when they run out.
    The model's attention implementation is restored afterwards.
    """
    _check_generation_inputs(inputs, gen_kwargs)
    with compression(loaded, press, decode_reserve=_decode_reserve(loaded, gen_kwargs, decode_block)) as session:
        output = loaded.model.generate(**inputs, past_key_values=session.cache, **gen_kwargs)
    return GenerationResult(output=output, session=session)
