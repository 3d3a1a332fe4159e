"""How every attention function of this study reaches the language model (docs/method.md §1).

The row capture of step 03 (:mod:`sparsemm_utils.attention_capture`), the per-head KV compression
of steps 05 and 06 (:mod:`sparsemm_utils.compression`, :mod:`sparsemm_utils.varlen_attention`), and
the layer statistics, vision-drop ablation and FastV of step 07
(:mod:`sparsemm_utils.layer_stats_capture`, :mod:`sparsemm_utils.vision_drop`,
:mod:`sparsemm_utils.fastv`) all change what the language model's attention does, and all do it
through transformers' extension points in the same three moves, written here once:

1. **Register** an attention function under a name together with a mask function
   (:func:`register_text_attention`, or :meth:`AttentionHook.register`). transformers builds an
   attention mask only for names its ``AttentionMaskInterface`` knows; any other name silently
   receives ``attention_mask=None`` (docs/design.md).
2. **Switch** the LANGUAGE model to that name for a block while the vision tower keeps ``sdpa``
   (:func:`text_attention`, built on :func:`set_text_attention`); the previous implementation is
   restored on exit, also after an error. No model class is patched.
3. **Hand over per-call state.** ``generate()`` rejects unknown keyword arguments, so a recorder or
   a compression session reaches the attention function through a context variable. An
   :class:`AttentionHook` holds one: :meth:`AttentionHook.activate` sets it for a block,
   :meth:`AttentionHook.active` reads it inside the function and raises the module's own
   :class:`NoActiveStateError` when the function runs outside the block. A recorder that only
   reads the attention gets its function from :meth:`AttentionHook.observing_sdpa`: ``sdpa``
   itself, plus a look at the inputs while a recorder is active.

An attention function has ``AttentionInterface``'s signature::

    fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)
        -> (output (batch, q, H, d), weights (batch, H, q, N) or None)

with post-RoPE ``query`` (batch, H, q, d) (M-RoPE for Qwen), ``key`` / ``value`` (batch, H_kv, N, d)
as the cache's ``update`` returned them, ``module.layer_idx`` and ``module.num_key_value_groups``.
:func:`allowed_keys` reads the mask it receives (None, boolean or additive) as a (q, N) boolean.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "AttentionFunction",
    "Observer",
    "AttentionNotRegisteredError",
    "AttentionMaskError",
    "NoActiveStateError",
    "AttentionHook",
    "register_text_attention",
    "set_text_attention",
    "text_attention",
    "text_attention_implementation",
    "vision_attention_implementation",
    "allowed_keys",
    "SELECTION_DTYPES",
    "original_attention_logits",
]

#: ``fn(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (output, weights | None)``.
AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

State = TypeVar("State")

#: ``observe(state, layer_idx, query, key, attention_mask, scaling)``: what an observing function
#: hands its active state (see :meth:`AttentionHook.observing_sdpa`).
Observer = Callable[[State, int, torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None"], None]

_BUILTIN_ATTENTION = ("eager",)  # eager is the fallback, not an entry of AttentionInterface


class AttentionNotRegisteredError(ValueError):
    """An attention implementation name is unknown to transformers (or has no mask function)."""


class AttentionMaskError(ValueError):
    """An attention mask that is not the (1, 1 or heads, q, kv) tensor a registered mask function builds."""


class NoActiveStateError(RuntimeError):
    """An attention function that needs per-call state ran outside the block that provides it.
    Each module raises its own subclass (e.g. ``NoActiveCompressionError``)."""


# --------------------------------------------------------------------- registration and switching


def register_text_attention(name: str, fn: AttentionFunction, *, mask: str = "eager") -> None:
    """Register an attention function AND its mask function under ``name``.

    transformers only builds an attention mask for names that ``AttentionMaskInterface`` knows;
    for any other name the function silently receives ``attention_mask=None`` (docs/design.md). This
    registers ``fn`` with ``AttentionInterface`` and the mask function of ``mask`` ("eager": an
    additive float mask (batch, 1, q, kv) with 0 / dtype-min, always materialised; "sdpa": a
    boolean mask, or None when plain causal attention suffices) with ``AttentionMaskInterface``.
    Registering the same pair again changes nothing.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"attention name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (module, query, key, value, attention_mask, **kwargs), got {fn!r}")
    if mask not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise AttentionNotRegisteredError(
            f"mask {mask!r} is not a known mask function; use one of {sorted(AttentionMaskInterface._global_mapping)}"
        )
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])


def text_attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation the language model's layers use (its config's ``_attn_implementation``)."""
    return model.config.get_text_config()._attn_implementation


def vision_attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation of the vision tower."""
    return model.config.vision_config._attn_implementation


def set_text_attention(model: PreTrainedModel, name: str, *, allow_missing_mask: bool = False) -> None:
    """Use attention implementation ``name`` in the language model only; the vision tower keeps sdpa.

    ``name``: "sdpa", "eager", or a name registered with :func:`register_text_attention`. A name
    registered with ``AttentionInterface`` but not ``AttentionMaskInterface`` raises (its function
    would get no mask) unless ``allow_missing_mask=True``.
    """
    valid = set(_BUILTIN_ATTENTION) | set(ALL_ATTENTION_FUNCTIONS.valid_keys())
    if name not in valid:
        raise AttentionNotRegisteredError(
            f"attention implementation {name!r} is not registered: call "
            f"sparsemm_utils.attention_hooks.register_text_attention({name!r}, fn) first (known: {sorted(valid)})"
        )
    if name not in _BUILTIN_ATTENTION and name not in ALL_MASK_ATTENTION_FUNCTIONS and not allow_missing_mask:
        raise AttentionNotRegisteredError(
            f"attention {name!r} has no mask function, so it would receive attention_mask=None: register it with "
            f"register_text_attention({name!r}, fn) (which registers both), or pass allow_missing_mask=True"
        )
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
    if text_attention_implementation(model) != name:  # defensive: a class whose sub-config keys differ
        raise AttentionNotRegisteredError(
            f"{type(model).__name__}: the language model did not switch to {name!r} "
            f"(it uses {text_attention_implementation(model)!r})"
        )


@contextlib.contextmanager
def text_attention(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Use attention ``name`` in the language model inside the block (:func:`set_text_attention`);
    the previous implementation is restored on exit, also after an error."""
    previous = text_attention_implementation(model)
    set_text_attention(model, name)
    try:
        yield
    finally:
        set_text_attention(model, previous)


# ------------------------------------------------------------------------------- per-call state


class AttentionHook(Generic[State]):
    """The per-call state of one family of attention functions, and those functions' names.

    Args:
        name: the context variable's name (``"sparsemm_compression"``).
        context: what provides the state, as the error messages say it (``"a compression context"``).
        usage: what to do instead, appended to the "no active state" message (e.g. the function
            that opens the block).
        missing_error: the module's own :class:`NoActiveStateError` subclass, raised by
            :meth:`active` when no state is active.
        nested_error: raised by :meth:`activate` when a state is already active; None lets blocks
            nest (the inner state shadows the outer one until its block ends).

    A hook is typed by its state: ``AttentionHook[CompressionSession](...)``. The state lives in a
    ``contextvars.ContextVar``, so each thread and asyncio task sees its own.
    """

    def __init__(
        self,
        name: str,
        *,
        context: str,
        usage: str,
        missing_error: type[NoActiveStateError] = NoActiveStateError,
        nested_error: type[Exception] | None = None,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a hook needs a non-empty name, got {name!r}")
        if not (isinstance(missing_error, type) and issubclass(missing_error, NoActiveStateError)):
            raise TypeError(f"missing_error must be a subclass of NoActiveStateError, got {missing_error!r}")
        if nested_error is not None and not (isinstance(nested_error, type) and issubclass(nested_error, Exception)):
            raise TypeError(f"nested_error must be an exception class or None, got {nested_error!r}")
        self.name = name
        self.context = context
        self.usage = usage
        self.missing_error = missing_error
        self.nested_error = nested_error
        self._state: contextvars.ContextVar[State | None] = contextvars.ContextVar(name, default=None)
        self._functions: dict[str, AttentionFunction] = {}

    def __repr__(self) -> str:
        return f"AttentionHook({self.name!r}, functions={sorted(self._functions)})"

    @property
    def functions(self) -> Mapping[str, AttentionFunction]:
        """The attention functions registered through this hook, by name (read-only)."""
        return MappingProxyType(self._functions)

    def register(self, name: str, function: AttentionFunction, *, mask: str = "sdpa") -> str:
        """Register ``function`` under ``name`` (:func:`register_text_attention` with mask function
        ``mask``; "sdpa", the default, is None whenever plain causal attention suffices, so nothing
        N x N is materialised) as one of this hook's functions, and return ``name``.

        Idempotent: registering the same function under the same name again changes nothing. A
        different function under a name this hook already holds raises ``ValueError`` (one name,
        two meanings)."""
        known = self._functions.get(name)
        if known is not None and known is not function:
            raise ValueError(
                f"hook {self.name!r} already registered {known.__name__!r} under {name!r}; "
                f"refusing to replace it with {getattr(function, '__name__', function)!r}"
            )
        register_text_attention(name, function, mask=mask)
        self._functions[name] = function
        return name

    def current(self) -> State | None:
        """The active state, or None outside every :meth:`activate` block."""
        return self._state.get()

    def active(self, function: str | None = None) -> State:
        """The active state; raises ``missing_error`` naming ``function`` (the attention function
        asking) when there is none."""
        state = self._state.get()
        if state is None:
            who = f"the attention function {function!r}" if function else f"hook {self.name!r}"
            raise self.missing_error(f"{who} ran outside {self.context}: {self.usage}")
        return state

    def observing_sdpa(self, observe: Observer, *, name: str, doc: str) -> AttentionFunction:
        """An attention function that IS ``sdpa_attention_forward`` (same output, returns
        ``(output, None)``) and, while a state is active, also calls
        ``observe(state, module.layer_idx, query, key, attention_mask, scaling)`` with the call's
        post-RoPE ``query`` (batch, H, q, d), ``key`` (batch, H_kv, N, d) and mask. Without an active state it
        is plain sdpa, so a recorder needs no "no active state" error. ``name`` / ``doc``: the
        function's ``__name__`` and docstring."""

        def attention(
            module: torch.nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            scaling: float | None = None,
            dropout: float = 0.0,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            output, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            state = self._state.get()
            if state is not None:
                observe(state, int(module.layer_idx), query, key, attention_mask, scaling)
            return output, None

        attention.__name__ = attention.__qualname__ = name
        attention.__doc__ = doc
        return attention

    @contextlib.contextmanager
    def activate(self, state: State) -> Iterator[State]:
        """Make ``state`` the active state inside the block; the previous one (None or, where
        nesting is allowed, the outer block's) comes back on exit, also after an error."""
        if state is None:
            raise ValueError(f"hook {self.name!r}: the state to activate must not be None")
        if self.nested_error is not None and self._state.get() is not None:
            raise self.nested_error(f"{self.context} is already active; nested contexts are not supported")
        token = self._state.set(state)
        try:
            yield state
        finally:
            self._state.reset(token)


# ------------------------------------------------------------------------------------ the mask


def allowed_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: Any) -> torch.Tensor:
    """Boolean ``(q, kv)``: which keys each query may attend to, from the mask transformers built.

    ``None`` (sdpa's plain causal case): query i is position ``kv - q + i`` and sees keys
    ``0 .. kv - q + i`` (a fresh or dynamic cache; not a pre-allocated static cache). A boolean
    ``(1, 1, q, >=kv)`` mask is used as is (True = attend); an additive float mask is True where
    it is above half the dtype's minimum.
    """
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return torch.arange(kv_len, device=device)[None, :] <= rows
    if attention_mask.ndim != 4 or attention_mask.shape[0] != 1:
        raise AttentionMaskError(f"expected a (1, 1 or heads, q, kv) attention mask, got {tuple(attention_mask.shape)}")
    mask = attention_mask[0, 0, -q_len:, :kv_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


# ------------------------------------------------------------------- the original's attention


#: Where a rule reads attention weights (SnapKV-style selection, docs/method.md §5; the hit rule,
#: docs/method.md §4): ``"float32"`` (the project's default: the softmax stays float32) or
#: ``"model"`` (the original code's: logits in the model's dtype, the softmax in float32 cast back
#: to the model's dtype).
SELECTION_DTYPES: tuple[str, ...] = ("float32", "model")


def original_attention_logits(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """``Q K^T`` scaled as the original code's eager attention does it (``selection_dtype="model"``).

    ``query`` ``(..., q, d)`` and ``key`` ``(..., N, d)`` (broadcastable leading dimensions) in the
    model's dtype; returns ``(..., q, N)`` in that dtype: ``matmul(Q, K^T) / math.sqrt(d)``, as
    SparseMM's ``calcul_attn_sore`` / ``SnapKVCluster.update_kv`` and LLaVA-NeXT's eager attention
    compute it (a division, whose bf16 rounding can differ from a product with ``d ** -0.5``). A
    ``scaling`` other than ``d ** -0.5`` (a model with its own softmax scale) multiplies instead.
    """
    dim = query.shape[-1]
    logits = torch.matmul(query, key.transpose(-1, -2))
    if scaling is None or math.isclose(float(scaling), dim**-0.5, rel_tol=1e-9):
        return logits / math.sqrt(dim)
    return logits * float(scaling)
