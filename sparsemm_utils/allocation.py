"""Per-head KV-cache budgets: SparseMM's score-proportional allocation and the baselines' rules.

docs/method.md §5 ("Budget allocation (step 04)") is the source of every rule here. This module is pure
arithmetic: it decides HOW MANY prompt tokens each KV head stores after prefill; the cache engine of
step 04 decides WHICH ones (SnapKV's rule, docs/method.md §5 "Token selection inside a head") and
stores them.

Conventions (docs/method.md §5):

- ``budget`` B counts the local window: a compressing KV head stores ``cap`` selected tokens plus
  the last ``window`` (w) prompt tokens. ``b = B - w`` (``selected_budget``) is the average number
  of selected tokens per KV head; B * L * H_kv (``total_budget``) is the nominal number of prompt
  tokens the whole cache stores on a long prompt.
- Shapes: L layers, H query heads, H_kv KV heads. Query head h belongs to KV group h // (H / H_kv)
  (consecutive query heads share a KV head, as ``repeat_kv`` lays them out).
- Every method's ``capacities(...)`` returns a :class:`HeadCapacities`: an int64 array
  ``selected`` of shape (layers, kv_heads) (selected tokens, window excluded) and the ``window``.
  :meth:`HeadCapacities.kept` / :func:`effective_kept` say what a head really stores for a prompt
  of n tokens (a head cannot select more than the n - w tokens before the window).

Inputs may be numpy arrays or torch tensors (any float dtype, bfloat16 included); outputs are numpy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

import numpy as np

from .validate import check_fraction, check_int, is_int

if TYPE_CHECKING:  # torch is only needed by callers that pass tensors
    import torch

    ArrayLike = Union[np.ndarray, torch.Tensor]
else:
    ArrayLike = Any

__all__ = [
    "ALLOCATION_METHODS",
    "Allocation",
    "SATURATION_MODES",
    "AdaKVAllocation",
    "AllocationError",
    "FullKV",
    "HeadCapacities",
    "HeadGroupingError",
    "InvalidBudgetError",
    "InvalidParameterError",
    "InvalidScoresError",
    "MissingAllocationInputError",
    "ModelShape",
    "PyramidKVAllocation",
    "RandomAllocation",
    "ScoreShapeError",
    "SnapKVAllocation",
    "SparseMMAllocation",
    "StreamingLLMAllocation",
    "UnknownAllocationMethodError",
    "adakv_caps",
    "adakv_round",
    "effective_kept",
    "kv_group_sum",
    "make_allocation",
    "normalise_head_scores",
    "pyramidkv_caps",
    "redistribute_saturated",
    "sparsemm_caps",
    "streaming_llm_positions",
    "uniform_floor",
    "validate_head_scores",
]

Saturation = Literal["fidelity", "redistribute"]
SATURATION_MODES: tuple[str, ...] = ("fidelity", "redistribute")


# --------------------------------------------------------------------------------------- errors


class AllocationError(ValueError):
    """Base class of every error raised by this module."""


class InvalidBudgetError(AllocationError):
    """The budget B is not an integer, or does not exceed the window w (so b = B - w < 1)."""


class InvalidParameterError(AllocationError):
    """A method parameter (ratio, alpha, beta, sink, seed, saturation, prompt length, ...) is invalid."""


class InvalidScoresError(AllocationError):
    """Head scores or attention scores hold NaN/inf, negative values, only zeros, or a bad dtype."""


class ScoreShapeError(InvalidScoresError):
    """Scores whose shape does not match the model (the message names both shapes)."""


class HeadGroupingError(AllocationError):
    """The number of query heads is not a multiple of the number of KV heads."""


class MissingAllocationInputError(AllocationError):
    """A method needs an input (head scores, attention scores, prompt length) that was not given."""


class UnknownAllocationMethodError(AllocationError):
    """A method name that is not in :data:`ALLOCATION_METHODS` (the message lists the known ones)."""


# -------------------------------------------------------------------------------------- helpers


def _check_budget(budget: object, window: object) -> None:
    """docs/method.md §5: B counts the window, so b = B - w must be at least 1."""
    if not is_int(window) or window < 1:
        raise InvalidParameterError(
            f"window must be an int >= 1 (the last w prompt tokens every head keeps; docs/method.md §5: default 32), "
            f"got {window!r}"
        )
    if not is_int(budget):
        raise InvalidBudgetError(
            f"budget must be an int number of tokens per KV head (window included), got "
            f"{type(budget).__name__} {budget!r}; pass e.g. budget=256"
        )
    if budget <= window:
        raise InvalidBudgetError(
            f"budget B={budget} must exceed the window w={window}: B counts the window, so each head "
            f"would select b = B - w = {budget - window} tokens. Use B >= w + 1 (e.g. B = {window + 64}) "
            f"or a smaller window."
        )


def _require(value: object, name: str, method: str, why: str) -> Any:
    if value is None:
        raise MissingAllocationInputError(f"{method}.capacities needs {name}=...: {why}")
    return value


def _as_float_array(values: ArrayLike, what: str) -> np.ndarray:
    """numpy float64 copy of a numpy array, a torch tensor (any dtype, any device) or a nested list."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values)
    if array.dtype == object or array.dtype.kind not in "iuf":
        raise InvalidScoresError(f"{what} must be real numbers (int or float), got dtype {array.dtype}")
    return array.astype(np.float64)


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_finite_non_negative(array: np.ndarray, what: str, index_names: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        raise InvalidScoresError(
            f"{what} hold {int(bad.sum())} NaN/inf value(s), first at {index_names}={_first_index(bad)}; "
            f"fix the scoring run that produced them (scores must be finite)"
        )
    negative = array < 0
    if negative.any():
        where = _first_index(negative)
        raise InvalidScoresError(
            f"{what} hold {int(negative.sum())} negative value(s), first {array[where]:g} at "
            f"{index_names}={where}; scores must be >= 0"
        )


def _as_caps(caps: ArrayLike, what: str = "caps") -> np.ndarray:
    if hasattr(caps, "detach"):
        caps = caps.detach().to("cpu").numpy()
    array = np.asarray(caps)
    if array.dtype.kind not in "iu":
        raise InvalidParameterError(f"{what} must be an integer array, got dtype {array.dtype}")
    if (array < 0).any():
        raise InvalidParameterError(f"{what} must be >= 0, got minimum {array.min()}")
    return array.astype(np.int64)


# ---------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a language model: ``layers`` L, ``query_heads`` H, ``kv_heads`` H_kv.

    Grouped-query attention needs H to be a multiple of H_kv: query head h reads KV head
    h // (H / H_kv) (docs/method.md §5, step 2).
    """

    layers: int
    query_heads: int
    kv_heads: int

    def __post_init__(self) -> None:
        for name in ("layers", "query_heads", "kv_heads"):
            check_int(name, getattr(self, name), 1, error=InvalidParameterError)
        if self.query_heads % self.kv_heads:
            raise HeadGroupingError(
                f"query_heads={self.query_heads} is not a multiple of kv_heads={self.kv_heads}: grouped-query "
                f"attention needs every KV head to serve H / H_kv query heads. Check num_attention_heads and "
                f"num_key_value_heads in the model's text config."
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head, H / H_kv."""
        return self.query_heads // self.kv_heads

    @property
    def kv_grid(self) -> tuple[int, int]:
        """Shape of a per-KV-head array, (layers, kv_heads)."""
        return (self.layers, self.kv_heads)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Shape of a transformers config (its text config for a multimodal model).

        Reads ``num_hidden_layers``, ``num_attention_heads`` and ``num_key_value_heads`` (absent or
        None means multi-head attention, H_kv = H)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(layers=text.num_hidden_layers, query_heads=heads, kv_heads=kv_heads)


def _as_shape(shape: ModelShape | tuple[int, int, int]) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) == 3:
        return ModelShape(*shape)
    raise InvalidParameterError(
        f"shape must be a ModelShape or a (layers, query_heads, kv_heads) tuple, got {shape!r}"
    )


# ------------------------------------------------------------------------------ the allocations


@dataclass(frozen=True, eq=False)
class HeadCapacities:
    """What a method hands the cache engine.

    Attributes:
        selected: int64 array (layers, kv_heads): tokens each KV head selects from the prompt, the
            window excluded (read-only).
        window: the last ``window`` prompt tokens every head stores on top of ``selected`` (0 for
            FullKV).
        method: the registry name of the method that made it.
        skip_if_shorter_than: the budget B when the original skips compression in every layer for
            prompts shorter than B (``if b > n - w: return uncompressed`` in SnapKV, SparseMM and
            AdaKV); None when only the per-head limit applies. See :func:`effective_kept`.
    """

    selected: np.ndarray
    window: int
    method: str
    skip_if_shorter_than: int | None = None

    def __post_init__(self) -> None:
        selected = _as_caps(self.selected, "selected")
        if selected.ndim != 2:
            raise InvalidParameterError(f"selected must have shape (layers, kv_heads), got {selected.shape}")
        selected.setflags(write=False)
        object.__setattr__(self, "selected", selected)
        check_int("window", self.window, 0, error=InvalidParameterError)

    @property
    def total_selected(self) -> int:
        """Sum of ``selected`` over all KV heads of all layers."""
        return int(self.selected.sum())

    def kept(self, prompt_len: int) -> np.ndarray:
        """Selected tokens each KV head really stores for a prompt of ``prompt_len`` tokens,
        int64 (layers, kv_heads); see :func:`effective_kept`."""
        return effective_kept(self.selected, prompt_len, self.window, budget=self.skip_if_shorter_than)

    def stored(self, prompt_len: int) -> np.ndarray:
        """All prompt tokens each KV head stores (selected + window), int64 (layers, kv_heads)."""
        n = check_int("prompt_len", prompt_len, 1, error=InvalidParameterError)
        return self.kept(n) + min(self.window, n)


def effective_kept(
    caps: ArrayLike, prompt_len: int, window: int, *, budget: int | None = None
) -> np.ndarray:
    """Selected tokens each head really stores after a prefill of n = ``prompt_len`` tokens.

    docs/method.md §5: a head selects among the n - w tokens before the window, so a head with
    cap >= n - w keeps all of them and the rest of its cap is lost (the original does not cap at
    the prompt length): kept = min(cap, max(n - w, 0)). When ``budget`` B is given, the original's
    whole-layer skip applies too: for n < B (b > n - w) SnapKV, SparseMM and AdaKV return the
    cache uncompressed, so EVERY head keeps all n - w tokens, even one whose cap is smaller.

    Args:
        caps: int array of any shape, e.g. (layers, kv_heads): the method's capacities.
        prompt_len: n, tokens in the prompt.
        window: w, the local window stored on top of the selection.
        budget: B for the methods whose original skips compression when n < B, else None.

    Returns:
        int64 array shaped like ``caps``; the window is not counted (add min(w, n) for storage).
    """
    caps = _as_caps(caps)
    n = check_int("prompt_len", prompt_len, 1, error=InvalidParameterError)
    check_int("window", window, 0, error=InvalidParameterError)
    available = max(n - window, 0)
    if budget is not None and check_int("budget", budget, 1, error=InvalidParameterError) > n:
        return np.full(caps.shape, available, dtype=np.int64)
    return np.minimum(caps, available)


# ---------------------------------------------------------------------- SparseMM's rule, steps


def validate_head_scores(scores: ArrayLike, shape: ModelShape | tuple[int, int, int]) -> np.ndarray:
    """Checked float64 copy of visual head scores S, shape (layers, query_heads) (docs/method.md §4).

    Raises ScoreShapeError on a wrong shape (naming both shapes) and InvalidScoresError on
    NaN/inf, negative values or all zeros."""
    shape = _as_shape(shape)
    array = _as_float_array(scores, "head scores")
    expected = (shape.layers, shape.query_heads)
    if array.shape != expected:
        hint = ""
        if array.shape == shape.kv_grid and shape.kv_heads != shape.query_heads:
            hint = (
                " They look like per-KV-head scores: pass one score per QUERY head; the GQA sum "
                "over each KV group happens in the allocation (docs/method.md §5, step 2)."
            )
        raise ScoreShapeError(
            f"head scores have shape {array.shape} but the model needs (layers, query_heads) = {expected} "
            f"(layers={shape.layers}, query_heads={shape.query_heads}, kv_heads={shape.kv_heads}).{hint}"
        )
    _check_finite_non_negative(array, "head scores", "(layer, head)")
    if not array.any():
        raise InvalidScoresError(
            "head scores are all zero: no head ever attended to the annotated region, so there is "
            "nothing to allocate by. Step 03 matched no generated token to a region: its scoring_report.json "
            "(tokens_matched of tokens_generated, tokens_skipped by reason) and token_matches.csv say why "
            "(load_head_scores on its head_scores.json explains it); rescore, or use RandomAllocation."
        )
    return array


def normalise_head_scores(scores: np.ndarray) -> np.ndarray:
    """s~ = S / sum(S) over ALL heads of all layers (docs/method.md §5, step 1): (L, H) -> (L, H).

    The sum is Python's sequential sum in layer-major order, as the original computes it
    (``head_score_list / sum(head_score_list)``), so ties at .5 round as they do there."""
    scores = np.asarray(scores, dtype=np.float64)
    total = sum(scores.ravel().tolist())
    if not total > 0:
        raise InvalidScoresError(f"head scores must have a positive sum to be normalised, got {total}")
    return scores / total


def kv_group_sum(normalised: np.ndarray, kv_heads: int) -> np.ndarray:
    """sigma[l, g] = sum of s~[l, h] over the query heads h with h // (H / H_kv) == g
    (docs/method.md §5, step 2): (L, H) -> (L, H_kv)."""
    normalised = np.asarray(normalised, dtype=np.float64)
    if normalised.ndim != 2:
        raise ScoreShapeError(f"normalised scores must have shape (layers, query_heads), got {normalised.shape}")
    layers, heads = normalised.shape
    shape = ModelShape(layers, heads, kv_heads)  # validates divisibility
    return normalised.reshape(layers, kv_heads, shape.group_size).sum(axis=-1)


def uniform_floor(selected_budget: int, ratio: float) -> int:
    """m = floor(r * b): the uniform part every KV head gets (docs/method.md §5, step 3).

    Computed on the float product, as the original's ``int(base_capacity * ratio)``: for
    b = 100 and r = 0.29 the product is 28.999999999999996, so m = 28, not 29."""
    b = check_int("selected_budget", selected_budget, 1, error=InvalidParameterError)
    return math.floor(b * check_fraction("ratio", ratio, error=InvalidParameterError))


def sparsemm_caps(sigma: np.ndarray, selected_budget: int, ratio: float) -> np.ndarray:
    """cap[l, g] = round(sigma[l, g] * P + m), round-half-to-even (docs/method.md §5, steps 3-4).

    Args:
        sigma: (layers, kv_heads) GQA-summed normalised scores, non-negative, summing to 1.
        selected_budget: b = B - w.
        ratio: r, the uniform share; m = floor(r * b) and the pool is P = (b - m) * L * H_kv.

    Returns:
        int64 (layers, kv_heads), every entry >= m; the sum is within (L * H_kv) // 2 of b * L * H_kv
        (each cap's rounding moves it by at most 0.5).
    """
    sigma = _as_float_array(sigma, "sigma")
    if sigma.ndim != 2:
        raise ScoreShapeError(f"sigma must have shape (layers, kv_heads), got {sigma.shape}")
    _check_finite_non_negative(sigma, "sigma", "(layer, kv_head)")
    if not math.isclose(float(sigma.sum()), 1.0, abs_tol=1e-6):
        raise InvalidScoresError(
            f"sigma must sum to 1 (got {float(sigma.sum()):.6g}): build it with "
            f"kv_group_sum(normalise_head_scores(scores), kv_heads)"
        )
    m = uniform_floor(selected_budget, ratio)
    pool = (selected_budget - m) * sigma.size
    return np.round(sigma * pool + m).astype(np.int64)


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split the integer ``total`` in proportion to ``weights`` (1-D, >= 0, positive sum): floor
    of each exact share, then one more to the largest fractional parts (ties: lower index)."""
    raw = total * (weights / weights.sum())
    shares = np.floor(raw).astype(np.int64)
    # 0 <= left < len(weights): the computed raw shares sum to total * (1 + O(len * eps)), far below
    # total + 1 for any token count, so the floors never overshoot.
    left = total - int(shares.sum())
    shares[np.argsort(-(raw - shares), kind="stable")[:left]] += 1
    return shares


def redistribute_saturated(caps: ArrayLike, weights: ArrayLike, available: int) -> np.ndarray:
    """The ``saturation="redistribute"`` variant (docs/method.md §5: "a redistributing variant is a
    named option"): what saturated heads cannot use goes to the others, total kept.

    A head is saturated when its cap reaches ``available`` = n - w (it keeps everything). Each
    round cuts saturated heads to ``available`` and splits their surplus over the unsaturated heads
    in proportion to ``weights`` (largest-remainder rounding, ties to the lower flat index; equal
    shares if all their weights are 0); rounds repeat until no head exceeds ``available``. Each
    round saturates at least one more head or ends, so it stops after at most L * H_kv rounds.

    Args:
        caps: int (layers, kv_heads), e.g. from :func:`sparsemm_caps`.
        weights: float (layers, kv_heads), >= 0: the scores sigma the caps came from.
        available: n - w, the tokens a head can select from (>= 0).

    Returns:
        int64 (layers, kv_heads) with every entry <= available and >= min(cap, available), and
        sum == min(sum(caps), available * L * H_kv).
    """
    caps = _as_caps(caps)
    weights = _as_float_array(weights, "weights")
    if weights.shape != caps.shape:
        raise ScoreShapeError(f"weights have shape {weights.shape} but caps have shape {caps.shape}")
    _check_finite_non_negative(weights, "weights", "index")
    available = check_int("available", available, 0, error=InvalidParameterError)
    out = caps.ravel().copy()
    flat_weights = weights.ravel()
    while True:
        over = out > available
        surplus = int((out[over] - available).sum())
        out[over] = available
        open_heads = np.flatnonzero(out < available)
        if surplus == 0 or open_heads.size == 0:  # stable, or every head full (surplus is lost)
            break
        share_weights = flat_weights[open_heads]
        if not share_weights.sum() > 0:
            share_weights = np.ones(open_heads.size)
        out[open_heads] += _largest_remainder(surplus, share_weights)
    return out.reshape(caps.shape)


@dataclass(frozen=True)
class _BudgetedAllocation:
    """Shared fields of the methods with a budget B (window included) and a window w."""

    budget: int
    window: int = 32

    name: ClassVar[str] = ""
    _required: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        _check_budget(self.budget, self.window)

    @property
    def required_inputs(self) -> frozenset[str]:
        """Keyword inputs ``capacities`` needs besides the shape (head_scores, attention, prompt_len)."""
        return self._required

    @property
    def selected_budget(self) -> int:
        """b = B - w: selected tokens per KV head on average (docs/method.md §5)."""
        return self.budget - self.window

    def total_budget(self, shape: ModelShape | tuple[int, int, int]) -> int:
        """B * L * H_kv: prompt tokens the whole cache stores on a long prompt, windows included."""
        shape = _as_shape(shape)
        return self.budget * shape.layers * shape.kv_heads

    def _uniform_capacities(
        self, shape: ModelShape | tuple[int, int, int], *, skip_if_shorter_than: int | None
    ) -> HeadCapacities:
        """b = B - w selected tokens for every KV head, int64 (layers, kv_heads)."""
        shape = _as_shape(shape)
        caps = np.full(shape.kv_grid, self.selected_budget, dtype=np.int64)
        return HeadCapacities(caps, self.window, self.name, skip_if_shorter_than=skip_if_shorter_than)


@dataclass(frozen=True)
class _ScoreProportional(_BudgetedAllocation, ABC):
    """SparseMM's formula (docs/method.md §5, steps 1-4), shared by SparseMM and the random ablation."""

    ratio: float = 0.1
    saturation: Saturation = "fidelity"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("ratio", self.ratio, error=InvalidParameterError)
        if self.saturation not in SATURATION_MODES:
            raise InvalidParameterError(
                f"saturation must be one of {SATURATION_MODES}, got {self.saturation!r}: 'fidelity' reproduces "
                f"the original (surplus of saturated heads is lost), 'redistribute' hands it to the others"
            )

    @property
    def floor_capacity(self) -> int:
        """m = floor(r * b)."""
        return uniform_floor(self.selected_budget, self.ratio)

    def pool(self, shape: ModelShape | tuple[int, int, int]) -> int:
        """P = (b - m) * L * H_kv: the part shared in proportion to the scores."""
        shape = _as_shape(shape)
        return (self.selected_budget - self.floor_capacity) * shape.layers * shape.kv_heads

    @property
    def required_inputs(self) -> frozenset[str]:
        """The method's inputs, plus ``prompt_len`` when ``saturation="redistribute"``."""
        extra = {"prompt_len"} if self.saturation == "redistribute" else set()
        return self._required | extra

    @abstractmethod
    def _head_scores(self, shape: ModelShape, head_scores: ArrayLike | None) -> ArrayLike:
        """The (layers, query_heads) scores the caps follow: given (SparseMM) or drawn (random)."""

    def kv_scores(self, shape: ModelShape | tuple[int, int, int], head_scores: ArrayLike | None = None) -> np.ndarray:
        """sigma, float64 (layers, kv_heads): the GQA-summed normalised scores the caps follow."""
        shape = _as_shape(shape)
        scores = validate_head_scores(self._head_scores(shape, head_scores), shape)
        return kv_group_sum(normalise_head_scores(scores), shape.kv_heads)

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """Per-KV-head capacities, int64 (layers, kv_heads), window excluded.

        ``prompt_len`` is needed only with ``saturation="redistribute"`` (fidelity caps are
        static); ``attention`` is not used."""
        shape = _as_shape(shape)
        sigma = self.kv_scores(shape, head_scores)
        caps = sparsemm_caps(sigma, self.selected_budget, self.ratio)
        if self.saturation == "redistribute":
            why = "saturation='redistribute' moves what heads with cap >= n - w cannot use"
            n = check_int("prompt_len", _require(prompt_len, "prompt_len", type(self).__name__, why), 1, error=InvalidParameterError)
            caps = redistribute_saturated(caps, sigma, max(n - self.window, 0))
        return HeadCapacities(caps, self.window, self.name, skip_if_shorter_than=self.budget)


@dataclass(frozen=True)
class SparseMMAllocation(_ScoreProportional):
    """SparseMM (docs/method.md §5): budgets proportional to the visual head scores.

    With b = B - w, the scores S (layers, query_heads) are normalised over all heads, s~ = S / sum(S);
    summed over each KV group, sigma[l, g]; every KV head gets the uniform part m = floor(r * b) and
    a share of the pool P = (b - m) * L * H_kv: cap[l, g] = round(sigma[l, g] * P + m), rounding half
    to even. Each head stores cap selected tokens plus the last w. The allocation is static. With
    ``saturation="fidelity"`` (default, the original) a head whose cap reaches n - w keeps every
    token and its surplus is lost; ``"redistribute"`` hands that surplus to the unsaturated heads in
    proportion to sigma (needs ``prompt_len``), keeping the total. As in the original, a prompt
    shorter than B is not compressed at all (see :func:`effective_kept`).

    Needs ``head_scores`` (layers, query_heads), e.g. step 03's head_scores.json averaged per head.
    """

    name: ClassVar[str] = "sparsemm"
    _required: ClassVar[frozenset[str]] = frozenset({"head_scores"})

    def _head_scores(self, shape: ModelShape, head_scores: ArrayLike | None) -> ArrayLike:
        return _require(head_scores, "head_scores", "SparseMMAllocation",
                        "visual head scores of shape (layers, query_heads) from step 03")


@dataclass(frozen=True)
class RandomAllocation(_ScoreProportional):
    """Random-allocation ablation (docs/method.md §5): SparseMM's formula on uniform random scores.

    The scores are ``numpy.random.default_rng(seed).random((layers, query_heads))``, U[0, 1) per
    query head; everything else (normalisation, GQA sum, m, P, rounding, saturation) is
    :class:`SparseMMAllocation`'s. The original draws them unseeded (``random.random()``); here a
    seed makes the ablation reproducible. ``head_scores`` is ignored.
    """

    seed: int = 0

    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0, error=InvalidParameterError)

    def random_scores(self, shape: ModelShape | tuple[int, int, int]) -> np.ndarray:
        """The seeded random scores, float64 (layers, query_heads), in [0, 1)."""
        shape = _as_shape(shape)
        return np.random.default_rng(self.seed).random((shape.layers, shape.query_heads))

    def _head_scores(self, shape: ModelShape, head_scores: ArrayLike | None) -> np.ndarray:
        return self.random_scores(shape)


@dataclass(frozen=True)
class SnapKVAllocation(_BudgetedAllocation):
    """SnapKV (docs/method.md §5, baselines): every KV head keeps b = B - w selected tokens plus the
    last w; prompts shorter than B are not compressed. Needs no input beyond the shape."""

    name: ClassVar[str] = "snapkv"

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """b for every KV head, int64 (layers, kv_heads); the other inputs are not used."""
        return self._uniform_capacities(shape, skip_if_shorter_than=self.budget)


def pyramidkv_caps(budget: int, window: int, layers: int, prompt_len: int, beta: int = 20) -> np.ndarray:
    """PyramidKV's per-layer capacities (docs/method.md §5, baselines), int64 (layers,), window excluded.

    base = B - w; min = base // beta; max = 2 * base - min; if max >= n - w then max = n - w and
    min = 2 * base - max; steps = (max - min) // (L - 1) (Python floor division: negative when
    base > n - w); layer l selects max - l * steps. Negative values (only when n <= w, where nothing
    precedes the window) are clipped to 0.
    """
    _check_budget(budget, window)
    layers = check_int(
        "layers", layers, 2, error=InvalidParameterError, hint="PyramidKV interpolates between layers: it needs L >= 2."
    )
    n = check_int("prompt_len", prompt_len, 1, error=InvalidParameterError)
    beta = check_int("beta", beta, 1, error=InvalidParameterError)
    base = budget - window
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = 2 * base - max_num
    steps = (max_num - min_num) // (layers - 1)
    caps = max_num - np.arange(layers, dtype=np.int64) * steps
    return np.maximum(caps, 0)


@dataclass(frozen=True)
class PyramidKVAllocation(_BudgetedAllocation):
    """PyramidKV (docs/method.md §5, baselines, beta = 20): capacities fall linearly with depth.

    base = B - w, min = base // beta, max = 2 * base - min, so the layers average about base; when
    max >= n - w the top is lowered to n - w and min = 2 * base - max. With steps = (max - min) //
    (L - 1), layer l selects max - l * steps tokens (plus the window) in every KV head. The
    capacities depend on the prompt length: needs ``prompt_len``.
    """

    beta: int = 20

    name: ClassVar[str] = "pyramidkv"
    _required: ClassVar[frozenset[str]] = frozenset({"prompt_len"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("beta", self.beta, 1, error=InvalidParameterError)

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """Layer l's capacity in each of its KV heads, int64 (layers, kv_heads)."""
        shape = _as_shape(shape)
        n = _require(prompt_len, "prompt_len", "PyramidKVAllocation",
                     "its top layer's capacity is lowered to n - w when 2 * base - min >= n - w")
        per_layer = pyramidkv_caps(self.budget, self.window, shape.layers, n, self.beta)
        caps = np.repeat(per_layer[:, None], shape.kv_heads, axis=1)
        return HeadCapacities(caps, self.window, self.name)


def adakv_caps(head_scores_sorted: ArrayLike, selected_budget: int, alpha: float = 0.2) -> np.ndarray:
    """AdaKV's capacities for ONE layer (docs/method.md §5, baselines): (kv_heads, n - w) -> (kv_heads,).

    Args:
        head_scores_sorted: float (kv_heads, n - w): each KV head's SnapKV scores of the keys before
            the window (window-averaged attention, GQA-averaged, pooled), sorted descending per head.
        selected_budget: b = B - w.
        alpha: the floor share; every head gets at least about floor(alpha * b).

    Rule: each head's sorted scores are scaled by its top-b mass / its total mass; the layer-wide
    top H_kv * b scaled entries are counted per head, c_g (sum c_g = H_kv * b); cap_g =
    round(c_g * (1 - alpha) + floor(alpha * b)), half to even, computed in float32 as the original's
    torch expression is (an int tensor times a Python float is float32). Ties among scaled entries go
    to the lower head index (torch.topk leaves them unspecified). When b > n - w the original does
    not compress: every head keeps all n - w.

    Returns:
        int64 (kv_heads,), each <= n - w (the total may differ from H_kv * b by the rounding).
    """
    scores = _as_float_array(head_scores_sorted, "head_scores_sorted")
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ScoreShapeError(
            f"head_scores_sorted must have shape (kv_heads, n - w) with n - w >= 1, got {scores.shape}"
        )
    _check_finite_non_negative(scores, "head_scores_sorted", "(kv_head, position)")
    if (np.diff(scores, axis=-1) > 0).any():
        raise InvalidScoresError(
            "head_scores_sorted must be sorted in descending order along the last axis; "
            "pass np.sort(scores, axis=-1)[:, ::-1] (or torch.sort(scores, dim=-1, descending=True).values)"
        )
    b = check_int("selected_budget", selected_budget, 1, error=InvalidParameterError)
    alpha = check_fraction("alpha", alpha, error=InvalidParameterError)
    kv_heads, n_ctx = scores.shape
    if b > n_ctx:
        return np.full(kv_heads, n_ctx, dtype=np.int64)
    total = scores.sum(axis=-1, keepdims=True)
    top = scores[:, :b].sum(axis=-1, keepdims=True)
    weight = np.divide(top, total, out=np.zeros_like(top), where=total > 0)
    scaled = (scores * weight).ravel()
    chosen = np.argsort(-scaled, kind="stable")[: kv_heads * b]
    return adakv_round(np.bincount(chosen // n_ctx, minlength=kv_heads), b, alpha)


def adakv_round(counts: ArrayLike, selected_budget: int, alpha: float) -> np.ndarray:
    """AdaKV's last step (:func:`adakv_caps`): cap_g = round(c_g * (1 - alpha) + floor(alpha * b)),
    half to even, in float32 as the original's torch expression; int64 (kv_heads,)."""
    floor = math.floor(selected_budget * alpha)
    caps32 = np.asarray(counts).astype(np.float32) * np.float32(1 - alpha) + np.float32(floor)
    return np.round(caps32).astype(np.int64)


@dataclass(frozen=True)
class AdaKVAllocation(_BudgetedAllocation):
    """AdaKV (docs/method.md §5, baselines, floor alpha = 0.2): data-dependent per-layer budgets.

    In each layer, at prefill, each KV head's sorted SnapKV scores are scaled by its top-b mass over
    its total mass, the layer-wide top H_kv * b entries are counted per head (c_g), and
    cap_g = round(c_g * (1 - alpha) + floor(alpha * b)) (+ the window); see :func:`adakv_caps`.
    Needs ``attention``: float (layers, kv_heads, n - w), the pooled window attention of the prompt.
    """

    alpha: float = 0.2

    name: ClassVar[str] = "adakv"
    _required: ClassVar[frozenset[str]] = frozenset({"attention"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("alpha", self.alpha, error=InvalidParameterError)

    def layer_capacities(self, layer_scores: ArrayLike) -> np.ndarray:
        """One layer: float (kv_heads, n - w) unsorted scores -> int64 (kv_heads,)."""
        scores = _as_float_array(layer_scores, "attention scores")
        if scores.ndim != 2:
            raise ScoreShapeError(f"one layer's attention scores must be (kv_heads, n - w), got {scores.shape}")
        return adakv_caps(np.sort(scores, axis=-1)[:, ::-1], self.selected_budget, self.alpha)

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """int64 (layers, kv_heads). ``attention``: float (layers, kv_heads, n - w); ``prompt_len``
        is optional and, when given, must equal n - w + window."""
        shape = _as_shape(shape)
        scores = _as_float_array(
            _require(attention, "attention", "AdaKVAllocation",
                     "per-KV-head pooled window attention of the prompt, shape (layers, kv_heads, n - w)"),
            "attention scores",
        )
        if scores.ndim != 3 or scores.shape[:2] != shape.kv_grid:
            raise ScoreShapeError(
                f"attention scores have shape {scores.shape} but the model needs (layers, kv_heads, n - w) "
                f"with (layers, kv_heads) = {shape.kv_grid}"
            )
        n = None if prompt_len is None else check_int("prompt_len", prompt_len, 1, error=InvalidParameterError)
        if n is not None and n - self.window != scores.shape[2]:
            raise ScoreShapeError(
                f"attention scores cover {scores.shape[2]} keys but prompt_len - window = "
                f"{prompt_len} - {self.window} = {prompt_len - self.window}"
            )
        caps = np.stack([self.layer_capacities(layer) for layer in scores])
        return HeadCapacities(caps, self.window, self.name, skip_if_shorter_than=self.budget)


def streaming_llm_positions(prompt_len: int, capacity: int, window: int, sink: int = 4) -> np.ndarray:
    """Prompt positions StreamingLLM selects besides the window, int64 (min(capacity, n - w),).

    The first ``sink`` tokens (attention sinks) and the ``capacity - sink`` tokens just before the
    window, so that with the window the head keeps sink + the most recent (B - sink) tokens. A
    prompt with n - w <= capacity keeps all its n - w positions."""
    n = check_int("prompt_len", prompt_len, 1, error=InvalidParameterError)
    capacity = check_int("capacity", capacity, 0, error=InvalidParameterError)
    window = check_int("window", window, 0, error=InvalidParameterError)
    sink = check_int("sink", sink, 0, error=InvalidParameterError)
    if sink > capacity:
        raise InvalidParameterError(f"sink={sink} exceeds the capacity {capacity}: keep sink <= B - w")
    available = max(n - window, 0)
    if available <= capacity:
        return np.arange(available, dtype=np.int64)
    recent = capacity - sink
    return np.concatenate([np.arange(sink), np.arange(available - recent, available)]).astype(np.int64)


@dataclass(frozen=True)
class StreamingLLMAllocation(_BudgetedAllocation):
    """StreamingLLM (docs/method.md §5, baselines; not in the original, a common peer): every KV head
    keeps the first ``sink`` tokens and the most recent ones, B tokens in all: b = B - w selected
    (``sink`` sinks + the b - sink tokens before the window, see :func:`streaming_llm_positions`)
    plus the window. Same capacities as SnapKV; only the selection rule differs (by position)."""

    sink: int = 4

    name: ClassVar[str] = "streamingllm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink", self.sink, 0, error=InvalidParameterError)
        if self.sink > self.selected_budget:
            raise InvalidParameterError(
                f"sink={self.sink} exceeds b = B - w = {self.selected_budget}: raise the budget or lower sink"
            )

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """b for every KV head, int64 (layers, kv_heads); the other inputs are not used."""
        return self._uniform_capacities(shape, skip_if_shorter_than=None)


@dataclass(frozen=True)
class FullKV:
    """FullKV (docs/method.md §5, baselines): no compression, every KV head stores all n prompt tokens.

    Expressed as capacities n with a window of 0, so that the cache engine and the KV-byte
    accounting (docs/method.md §7) treat every method alike. Needs ``prompt_len``."""

    name: ClassVar[str] = "fullkv"
    required_inputs: ClassVar[frozenset[str]] = frozenset({"prompt_len"})

    def capacities(
        self,
        shape: ModelShape | tuple[int, int, int],
        *,
        head_scores: ArrayLike | None = None,
        attention: ArrayLike | None = None,
        prompt_len: int | None = None,
    ) -> HeadCapacities:
        """n for every KV head, int64 (layers, kv_heads), window 0."""
        shape = _as_shape(shape)
        given = _require(prompt_len, "prompt_len", "FullKV", "it stores all n prompt tokens")
        n = check_int("prompt_len", given, 1, error=InvalidParameterError)
        return HeadCapacities(np.full(shape.kv_grid, n, dtype=np.int64), 0, self.name)


# ------------------------------------------------------------------------------------ registry

Allocation = Union[
    SparseMMAllocation,
    RandomAllocation,
    SnapKVAllocation,
    PyramidKVAllocation,
    AdaKVAllocation,
    StreamingLLMAllocation,
    FullKV,
]

ALLOCATION_METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        SparseMMAllocation,
        RandomAllocation,
        SnapKVAllocation,
        PyramidKVAllocation,
        AdaKVAllocation,
        StreamingLLMAllocation,
        FullKV,
    )
}


def make_allocation(name: str, **kwargs: Any) -> Allocation:
    """The method registered under ``name`` (case-insensitive), built with ``kwargs``.

    >>> make_allocation("sparsemm", budget=256).selected_budget
    224
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ALLOCATION_METHODS:
        raise UnknownAllocationMethodError(
            f"unknown allocation method {name!r}; known methods: {', '.join(sorted(ALLOCATION_METHODS))}"
        )
    return build_with_known_fields(ALLOCATION_METHODS[key], kwargs)


def build_with_known_fields(cls: type, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)`` for a method dataclass, with an error listing its parameters when
    ``kwargs`` names one it does not take (shared by the allocation and compression registries)."""
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InvalidParameterError(
            f"{cls.__name__} does not take {', '.join(unknown)}; its parameters are: "
            f"{', '.join(accepted) if accepted else '(none)'}"
        )
    return cls(**kwargs)
