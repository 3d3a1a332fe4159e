"""One prefill per prompt, compressed by every method, decoded together (docs/method.md §5).

Every KV-compression method of :mod:`sparsemm_utils.compression` compresses the cache AFTER the
prefill, whose own attention uses the full keys (docs/method.md §5), so the prefill is the same
for all of them: its output, the first generated token, and the post-RoPE keys and values every
method selects from. This module computes it once per prompt and lets each method compress it:

1. :func:`shared_prefill`: one forward over the prompt through ``model.generate`` (so the inputs,
   positions, logits processors and stopping criteria are exactly generate's), with sdpa attention
   that records, per layer, the post-RoPE keys and values of all n prompt positions and the
   post-RoPE queries of the last ``query_window`` positions (all SnapKV / AdaKV scoring reads,
   docs/method.md §5), plus the logits and the token of the first generated step and the position
   ids of the prompt's last token (Qwen's M-RoPE deltas included).
2. :func:`compress_prefill`: one method's decisions on that prefill, by the SAME selection code as
   the batch-1 path (:meth:`~sparsemm_utils.compression.PrefillDecisions.select`: the caps, the
   n < B skip, AdaKV's data-dependent caps, SnapKV's top-cap or StreamingLLM's sinks + recent).
3. :func:`decode_rows`: the compressed caches of R methods as the R rows of one
   :class:`~sparsemm_utils.kv_cache.BatchedPerHeadKVCache` (per-(row, KV head) lengths, packed),
   decoded greedily in lockstep: every row starts from the prefill's first token; a row leaves the
   batch when it emits an end-of-sequence token or reaches ``max_new_tokens`` (its KV bytes and
   tokens are recorded then, as batch-1 generation would end there).

:func:`shared_generate` chains the three.

Several prompts at once: :func:`prefill_batch` runs the prefill of B prompts as ONE left-padded
batch through ``model.generate`` (:func:`~sparsemm_utils.prompts.batch_inputs`; generate positions
each prompt from the attention mask, M-RoPE included) and hands back each prompt's prefill
without its padding; :func:`decode_batch` decodes the rows of every prompt in one
:class:`~sparsemm_utils.kv_cache.BatchedPerHeadKVCache`, each row at its own positions;
:func:`shared_generate_batch` chains them (step 05's ``batch_size``). One method over a batch of
prompts, through ``model.generate`` itself (prefill and decode): :func:`compressed_generate_batch`. Each row's tokens equal
``compressed_generate(loaded, press, inputs, max_new_tokens=T, do_sample=False)`` for its press
alone, and its KV bytes equal that run's (tests/integration/test_shared_prefill.py); the only
numerical difference is that the decoder's matrix products run on R rows at once.

Methods that change the prefill itself cannot share it: the head-mask ablation (it zeroes
queries during the prefill) and FastV (it drops image tokens inside it) raise
:class:`PrefillNotShareableError`; run them with ``compressed_generate`` /
``fastv_generate_at_budget``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.attention_hooks import AttentionHook, NoActiveStateError, text_attention, text_attention_implementation
from sparsemm_utils.compression import (
    COMPRESSION_HOOK,
    COMPRESSION_METHODS,
    CompressionError,
    CompressionSession,
    FullKVPress,
    HeadMaskAblation,
    PER_HEAD_ATTENTION,
    PrefillDecisions,
    _check_generation_inputs,
    _decode_reserve,
    model_shape,
    per_head_attention,
    snapkv_window_scores,
)
from sparsemm_utils.fastv import FastVAtBudget, FastVPress
from sparsemm_utils.kv_cache import DECODE_BLOCK, BatchedPerHeadKVCache, PerHeadKVCache, analytic_kv_bytes, decode_reserve_for
from sparsemm_utils.prompts import batch_inputs
from sparsemm_utils.validate import check_int
from sparsemm_utils.varlen_attention import register_backend_attention, resolve_backend

__all__ = [
    "SHARED_PREFILL_ATTENTION",
    "SharedPrefillError",
    "PrefillNotShareableError",
    "NoActiveSharedPrefillError",
    "LayerPrefill",
    "SharedPrefill",
    "PrefillBatch",
    "CompressedPrefill",
    "PressGeneration",
    "check_shareable",
    "shared_prefill",
    "prefill_batch",
    "compress_prefill",
    "decode_rows",
    "decode_batch",
    "shared_generate",
    "shared_generate_batch",
    "compressed_generate_batch",
]

#: Name the recording prefill attention is registered under (AttentionInterface + mask interface).
SHARED_PREFILL_ATTENTION = "sparsemm_shared_prefill"


class SharedPrefillError(CompressionError):
    """Base class of this module's errors."""


class PrefillNotShareableError(SharedPrefillError):
    """A method whose prefill differs from the model's own (head masks, FastV)."""


class NoActiveSharedPrefillError(NoActiveStateError):
    """The recording prefill ran outside :func:`shared_prefill`."""


# ---------------------------------------------------------------------------------- the prefill


@dataclass(frozen=True, eq=False)
class LayerPrefill:
    """What one decoder layer's prefill leaves for the methods' selection.

    Attributes:
        keys: ``(1, H_kv, n, d)`` post-RoPE keys of the prompt (what the cache stores).
        values: ``(1, H_kv, n, d)`` values.
        window_query: ``(1, H, m, d)`` post-RoPE queries of the last m = min(query_window, n)
            prompt positions (SnapKV's window attention, docs/method.md §5).
        scaling: the layer's softmax scale.
    """

    keys: torch.Tensor
    values: torch.Tensor
    window_query: torch.Tensor
    scaling: float | None
    _scores: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def window_scores(self, window: int, kernel_size: int, selection_dtype: str = "float32") -> torch.Tensor:
        """:func:`~sparsemm_utils.compression.snapkv_window_scores` of this layer for window w,
        ``kernel_size`` and ``selection_dtype``, float32 ``(H_kv, n - w)``, computed once per
        (w, kernel, dtype) and shared by every method that asks (do not modify it)."""
        key = (int(window), int(kernel_size), str(selection_dtype))
        if key not in self._scores:
            m = int(self.window_query.shape[2])
            if window > m:
                raise SharedPrefillError(
                    f"SnapKV with window w={window} needs the last {window} prompt queries, the prefill recorded {m}: "
                    f"call shared_prefill(..., query_window={window}) (or larger)"
                )
            self._scores[key] = snapkv_window_scores(
                self.window_query[:, :, m - window :], self.keys, self.scaling, kernel_size, selection_dtype
            )
        return self._scores[key]


@dataclass(frozen=True, eq=False)
class SharedPrefill:
    """One prompt's prefill, shared by every method (see the module docstring).

    Attributes:
        input_ids: ``(1, n)`` prompt ids.
        layers: one :class:`LayerPrefill` per decoder layer.
        shape: the language model's (layers, query_heads, kv_heads).
        query_window: queries recorded per layer (the largest window a method may use).
        first_logits: float32 ``(vocab,)`` raw logits of the first generated token.
        first_token: that token (greedy, after ``generate``'s logits processors).
        last_position_ids: position ids of the prompt's last token as ``generate`` feeds them
            (``(4, 1, 1)`` text + M-RoPE for Qwen2-VL / Qwen2.5-VL, ``(1, 1)`` for LLaVA-NeXT), or
            None for a model that takes none; decode step t feeds ``last_position_ids + t``.
        max_new_tokens: the generation limit the stopping criteria were built for.
        logits_processor, stopping_criteria: what ``generate`` prepared for this prompt (greedy).
    """

    input_ids: torch.Tensor
    layers: tuple[LayerPrefill, ...]
    shape: ModelShape
    query_window: int
    first_logits: torch.Tensor
    first_token: int
    last_position_ids: torch.Tensor | None
    max_new_tokens: int
    logits_processor: LogitsProcessorList = field(repr=False)
    stopping_criteria: StoppingCriteriaList = field(repr=False)

    @property
    def prompt_len(self) -> int:
        """n, the prompt's tokens."""
        return int(self.input_ids.shape[1])

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prompt's ``(keys, values)``, each ``(1, H_kv, n, d)``."""
        return [(layer.keys, layer.values) for layer in self.layers]


@dataclass(eq=False)
class _Recorder:
    """The recording prefill's state: per layer, the last queries and the scale."""

    query_window: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scalings: dict[int, float | None] = field(default_factory=dict)


def _observe(recorder: _Recorder, layer_idx: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: Any) -> None:
    if layer_idx in recorder.queries:
        raise SharedPrefillError(f"layer {layer_idx} ran twice in one shared prefill; it records one forward pass")
    m = min(recorder.query_window, int(query.shape[2]))
    recorder.queries[layer_idx] = query[:, :, query.shape[2] - m :].detach().clone()
    recorder.scalings[layer_idx] = scaling


PREFILL_HOOK: AttentionHook[_Recorder] = AttentionHook(
    "sparsemm_shared_prefill",
    context="a shared prefill",
    usage="use sparsemm_utils.shared_prefill.shared_prefill(loaded, inputs, max_new_tokens=...)",
    missing_error=NoActiveSharedPrefillError,
    nested_error=SharedPrefillError,
)

_PREFILL_ATTENTION = PREFILL_HOOK.observing_sdpa(
    _observe,
    name="shared_prefill_attention",
    doc="sdpa (the prefill of every compressed path) that records each layer's last queries for the shared prefill.",
)


@dataclass(frozen=True, eq=False)
class PrefillBatch:
    """The prefills of B prompts run as one left-padded batch (:func:`prefill_batch`), or of one
    prompt (:meth:`of`), as :func:`decode_batch` decodes them.

    Attributes:
        input_ids: ``(B, n_max)`` the prompts as ``generate`` holds them, left-padded.
        pads: padding positions before each prompt (``n_max - n_b``).
        prompts: one :class:`SharedPrefill` per prompt, WITHOUT its padding (what a batch-1
            prefill of that prompt gives).
        max_new_tokens: the generation limit the stopping criteria were built for.
        logits_processor, stopping_criteria: what ``generate`` prepared for the padded batch
            (they read ``input_ids`` rows of length ``n_max + t``, so the decode keeps the padding).
    """

    input_ids: torch.Tensor
    pads: tuple[int, ...]
    prompts: tuple[SharedPrefill, ...]
    max_new_tokens: int
    logits_processor: LogitsProcessorList = field(repr=False)
    stopping_criteria: StoppingCriteriaList = field(repr=False)

    @classmethod
    def of(cls, prefill: SharedPrefill) -> PrefillBatch:
        """A batch of one, unpadded."""
        return cls(
            prefill.input_ids, (0,), (prefill,), prefill.max_new_tokens, prefill.logits_processor, prefill.stopping_criteria
        )


def _left_pads(input_ids: torch.Tensor, mask: Any) -> tuple[int, ...]:
    """Padding positions before each prompt of a left-padded batch (from its attention mask)."""
    if not isinstance(mask, torch.Tensor):
        return (0,) * int(input_ids.shape[0])
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    pads = tuple(int(input_ids.shape[1]) - int(n) for n in lengths.tolist())
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] >= torch.as_tensor(pads, device=mask.device)[:, None]
    if not torch.equal(mask, expected) or min(lengths.tolist()) < 1:
        raise SharedPrefillError(
            "the attention mask is not a left-padded batch (zeros only before each prompt, at least one token each): "
            "build the batch with sparsemm_utils.prompts.batch_inputs"
        )
    return pads


def _prefill_only(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: Any,
    **model_kwargs: Any,
) -> PrefillBatch:
    """``generate``'s decoding step for :func:`prefill_batch` (its ``custom_generate``): the prefill
    forward exactly as greedy decoding runs it, the first token of every prompt, then stop."""
    recorder = PREFILL_HOOK.active(SHARED_PREFILL_ATTENTION)
    pads = _left_pads(input_ids, model_kwargs.get("attention_mask"))
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    outputs = model(**inputs, return_dict=True)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    scores = logits_processor(input_ids, logits)
    first_tokens = torch.argmax(scores, dim=-1).tolist()
    cache = outputs.past_key_values
    shape = model_shape(model)
    if len(recorder.queries) != shape.layers or len(cache.layers) != shape.layers:
        raise SharedPrefillError(
            f"the prefill recorded {len(recorder.queries)} of {shape.layers} layers: the language model did not run "
            f"the recording attention in every layer"
        )
    positions = model_kwargs.get("position_ids")
    max_new_tokens = int(generation_config.max_new_tokens)
    prompts = []
    for b, pad in enumerate(pads):
        layers = []
        for i, layer in enumerate(cache.layers):
            query = recorder.queries[i]
            m = min(int(query.shape[2]), int(input_ids.shape[1]) - pad)  # the window within this prompt
            layers.append(
                LayerPrefill(
                    layer.keys[b : b + 1, :, pad:], layer.values[b : b + 1, :, pad:],
                    query[b : b + 1, :, query.shape[2] - m :], recorder.scalings[i],
                )
            )  # fmt: skip
        prompts.append(
            SharedPrefill(
                input_ids=input_ids[b : b + 1, pad:],
                layers=tuple(layers),
                shape=shape,
                query_window=recorder.query_window,
                first_logits=logits[b],
                first_token=int(first_tokens[b]),
                last_position_ids=None if positions is None else positions.narrow(-2, b, 1)[..., -1:].clone(),
                max_new_tokens=max_new_tokens,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
            )
        )
    return PrefillBatch(input_ids, pads, tuple(prompts), max_new_tokens, logits_processor, stopping_criteria)


def shared_prefill(loaded: Any, inputs: Mapping[str, Any], *, max_new_tokens: int, query_window: int = 32) -> SharedPrefill:
    """Prefill one prompt once for every method (docs/method.md §5: compression follows the prefill).

    Runs ``loaded.model.generate(**inputs, max_new_tokens=..., do_sample=False)`` up to its first
    token, with the language model on sdpa (the prefill attention of every compressed path, and
    FullKV's on an sdpa model) recording what the methods' selection reads.

    Args:
        loaded: a :class:`~sparsemm_utils.models.LoadedModel` whose language model uses sdpa.
        inputs: one prompt (batch 1, no padding), e.g. :func:`sparsemm_utils.prompts.build_inputs`.
        max_new_tokens: the generation limit of the decode that follows (>= 1).
        query_window: prompt queries recorded per layer, at least the largest window w of the
            methods that will compress this prefill (docs/method.md §5: default 32).
    """
    max_new_tokens, query_window = _checked_limits(max_new_tokens, query_window)
    _check_generation_inputs(inputs, {"max_new_tokens": max_new_tokens})
    return _run_prefill(loaded, inputs, max_new_tokens, query_window).prompts[0]


def prefill_batch(
    loaded: Any, prompts: Sequence[Mapping[str, Any]], *, max_new_tokens: int, query_window: int = 32
) -> PrefillBatch:
    """:func:`shared_prefill` of B prompts in ONE forward pass: ``generate`` on their left-padded
    batch (:func:`~sparsemm_utils.prompts.batch_inputs`; it positions every prompt from the
    attention mask, M-RoPE included), each prompt's keys, values, window queries, first logits
    and first token then taken without its padding. ``prompts``: each batch 1, unpadded (e.g.
    :func:`~sparsemm_utils.prompts.build_inputs`). The only numerical difference from B batch-1
    prefills is that the matrix products run on the padded batch at once
    (tests/integration/test_shared_prefill.py checks the tokens are the same)."""
    max_new_tokens, query_window = _checked_limits(max_new_tokens, query_window)
    if not prompts:
        raise SharedPrefillError("prefill_batch needs at least one prompt")
    for prompt in prompts:
        _check_generation_inputs(prompt, {"max_new_tokens": max_new_tokens})
    return _run_prefill(loaded, batch_inputs(loaded, prompts), max_new_tokens, query_window)


def _checked_limits(max_new_tokens: Any, query_window: Any) -> tuple[int, int]:
    return (
        check_int("max_new_tokens", max_new_tokens, 1, error=SharedPrefillError),
        check_int("query_window", query_window, 1, error=SharedPrefillError),
    )


def _run_prefill(loaded: Any, inputs: Mapping[str, Any], max_new_tokens: int, query_window: int) -> PrefillBatch:
    model = loaded.model
    implementation = text_attention_implementation(model)
    if implementation != "sdpa":
        raise SharedPrefillError(
            f"the language model uses {implementation!r} attention; the shared prefill runs sdpa, as every compressed "
            f"path's prefill does, so FullKV would prefill differently: load the model with sdpa "
            f"(sparsemm_utils.models.load_model does) or set_text_attention(model, 'sdpa')"
        )
    name = PREFILL_HOOK.register(SHARED_PREFILL_ATTENTION, _PREFILL_ATTENTION)
    cache = DynamicCache(config=model.config.get_text_config())
    with PREFILL_HOOK.activate(_Recorder(query_window)), text_attention(model, name):
        return model.generate(
            **inputs, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=_prefill_only
        )


# ------------------------------------------------------------------------------ the compression


@dataclass(frozen=True, eq=False)
class CompressedPrefill:
    """One method's compression of a :class:`SharedPrefill`.

    Attributes:
        press: the method.
        decisions: its caps, skipped layers and saturation (as the batch-1 session records them).
        positions: per layer, H_kv sorted int64 tensors (the prompt positions each KV head keeps),
            or None where the layer keeps all n tokens in every head.
    """

    press: Any
    decisions: PrefillDecisions
    positions: tuple[list[torch.Tensor] | None, ...]


def check_shareable(press: Any) -> None:
    """Raise :class:`PrefillNotShareableError` for a method whose prefill is not the model's own
    (FastV, the head-mask ablation) and for anything that is not a method of
    :data:`~sparsemm_utils.compression.COMPRESSION_METHODS`."""
    if isinstance(press, (FastVAtBudget, FastVPress)):
        raise PrefillNotShareableError(
            "FastV drops image tokens INSIDE the prefill (after layer K), so its prefill differs from every other "
            "method's and cannot be shared: run it alone with sparsemm_utils.fastv.fastv_generate_at_budget"
        )
    if isinstance(press, HeadMaskAblation):
        raise PrefillNotShareableError(
            "the head-mask ablation zeroes the query of chosen heads during the prefill itself, so its prefill differs "
            "from every other method's and cannot be shared: run it alone with compressed_generate"
        )
    name = getattr(press, "name", None)
    if name not in COMPRESSION_METHODS or not isinstance(press, COMPRESSION_METHODS[name]):
        raise PrefillNotShareableError(
            f"press must be one of the KV-compression methods of sparsemm_utils.compression "
            f"({', '.join(sorted(set(COMPRESSION_METHODS) - {HeadMaskAblation.name}))}), built e.g. with "
            f"make_press('snapkv', budget=64); got {press!r}"
        )


def compress_prefill(prefill: SharedPrefill, press: Any) -> CompressedPrefill:
    """What ``press`` keeps of ``prefill``, layer by layer, decided by
    :meth:`~sparsemm_utils.compression.PrefillDecisions.select` exactly as the batch-1 path decides
    (FullKV keeps everything and, as its batch-1 session, assigns no caps)."""
    check_shareable(press)
    press.validate_for(prefill.shape)
    decisions = PrefillDecisions(press, prefill.shape)
    if isinstance(press, FullKVPress):
        decisions.prompt_len = prefill.prompt_len
        return CompressedPrefill(press, decisions, (None,) * prefill.shape.layers)
    scores = press.selection == "snapkv"  # StreamingLLM reads no queries
    if scores and press.window > prefill.query_window and prefill.prompt_len > prefill.query_window:
        raise SharedPrefillError(
            f"{press.name} with window w={press.window} scores with the last w prompt queries, but the prefill recorded "
            f"{prefill.query_window}: call shared_prefill(..., query_window={press.window}) (or larger)"
        )
    positions = tuple(
        decisions.select(i, layer.window_query, layer.keys, layer.scaling, scorer=layer.window_scores)
        for i, layer in enumerate(prefill.layers)
    )
    return CompressedPrefill(press, decisions, positions)


# ----------------------------------------------------------------------------------- the decode


@dataclass(frozen=True, eq=False)
class PressGeneration:
    """One method's greedy generation from a shared prefill (what ``compressed_generate`` returns
    for it alone, minus the cache object).

    Attributes:
        press: the method.
        decisions: the caps it assigned, its skipped layers (:meth:`saturated` from them).
        sequences: ``(1, n + new tokens)`` prompt and generated ids (``GenerationResult.sequences``).
        kv_bytes: docs/method.md §7's KV bytes its cache held when its generation ended.
        stored_tokens: int64 (layers, kv_heads) tokens each KV head stored then.
        kept_prompt_tokens: int64 (layers, kv_heads) prompt tokens each KV head kept.
    """

    press: Any
    decisions: PrefillDecisions
    sequences: torch.Tensor
    kv_bytes: int
    stored_tokens: np.ndarray
    kept_prompt_tokens: np.ndarray

    @property
    def prompt_len(self) -> int:
        return int(self.decisions.prompt_len)

    @property
    def new_tokens(self) -> torch.Tensor:
        """``(new tokens,)`` the generated ids."""
        return self.sequences[0, self.prompt_len :]

    @property
    def assigned(self) -> np.ndarray:
        return self.decisions.assigned

    @property
    def skipped_layers(self) -> list[int]:
        return self.decisions.skipped_layers

    def saturated(self) -> np.ndarray:
        """bool (layers, kv_heads): heads whose cap reached n - w (docs/method.md §5)."""
        return self.decisions.saturated()


def _supports_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def decode_rows(
    loaded: Any, prefill: SharedPrefill, rows: Sequence[CompressedPrefill], *, backend: str = "auto"
) -> list[PressGeneration]:
    """Greedy decoding of every compression of ``prefill`` side by side, one cache row each
    (:func:`decode_batch` of a batch of one prompt).

    All rows start from ``prefill.first_token``; each step feeds every active row its last token
    (positions ``prefill.last_position_ids + step``, the same for all rows), applies ``generate``'s
    logits processors to the float32 logits and takes the argmax; ``generate``'s stopping
    criteria (end-of-sequence tokens, ``max_new_tokens``) end a row, whose tokens and KV bytes are
    recorded then and which leaves the batch.

    Args:
        loaded: the :class:`~sparsemm_utils.models.LoadedModel` that ran the prefill.
        prefill: from :func:`shared_prefill`.
        rows: from :func:`compress_prefill` on ``prefill``, one per method (any order, repeats allowed).
        backend: decode attention over the rows' segments: "reference", "padded", "flash"
            (:mod:`sparsemm_utils.varlen_attention`) or "auto": flash where it runs, else
            "padded" whenever several rows decode (one sdpa over the R x H_kv segments per layer
            instead of R x H_kv calls; with the tiny reader's 107-151-token prompts and 21 rows,
            one torch thread, ``benchmarks/shared_prefill_speed.py --questions 30 --backends
            reference padded`` measured 6.47 questions per CPU second against 3.95 for the
            per-segment loop), else
            :func:`~sparsemm_utils.varlen_attention.resolve_backend`'s choice.

    Returns:
        One :class:`PressGeneration` per row, in the order of ``rows``.
    """
    if not rows:
        raise SharedPrefillError("decode_rows needs at least one compressed prefill (compress_prefill(prefill, press))")
    return decode_batch(loaded, PrefillBatch.of(prefill), [rows], backend=backend)[0]


@torch.no_grad()
def decode_batch(
    loaded: Any, batch: PrefillBatch, rows: Sequence[Sequence[CompressedPrefill]], *, backend: str = "auto"
) -> list[list[PressGeneration]]:
    """Greedy decoding of the compressions of SEVERAL prompts side by side, one cache row each
    (:class:`~sparsemm_utils.kv_cache.BatchedPerHeadKVCache` of per-(row, KV head) lengths, rows
    of one prompt after another: no row pays for another prompt's length or another method's).

    As :func:`decode_rows`, with each row fed at its own prompt's positions
    (``last_position_ids + step``) and its ``input_ids`` kept left-padded as ``generate`` keeps a
    padded batch (the processors and stopping criteria were built for it); the sequences returned
    are without the padding, as a batch-1 generation returns them.

    Args:
        batch: from :func:`prefill_batch` (or :meth:`PrefillBatch.of` one prefill).
        rows: per prompt of ``batch``, its rows (:func:`compress_prefill` on that prompt's
            prefill; a prompt may have none).
        backend: as :func:`decode_rows`.

    Returns:
        Per prompt, one :class:`PressGeneration` per row, in the order of ``rows``.
    """
    if len(rows) != len(batch.prompts):
        raise SharedPrefillError(f"rows gives {len(rows)} prompts' rows, the batch holds {len(batch.prompts)} prompts")
    flat: list[tuple[int, CompressedPrefill]] = []
    for p, (prefill, prompt_rows) in enumerate(zip(batch.prompts, rows)):
        for row in prompt_rows:
            if not isinstance(row, CompressedPrefill) or row.decisions.prompt_len != prefill.prompt_len:
                raise SharedPrefillError(
                    f"every row must be compress_prefill(prefill, press) of THIS prefill (prompt {p}: "
                    f"n = {prefill.prompt_len}), got {row!r}"
                )
            flat.append((p, row))
    results: list[list[PressGeneration | None]] = [[None] * len(prompt_rows) for prompt_rows in rows]
    if not flat:
        return results  # type: ignore[return-value]
    model = loaded.model
    resolved = resolve_backend(backend, model.device, model.dtype)
    backend = "padded" if backend == "auto" and resolved == "reference" and len(flat) > 1 else resolved
    cache = BatchedPerHeadKVCache.from_prefills(
        [(batch.prompts[p].states(), [row.positions for row in prompt_rows]) for p, prompt_rows in enumerate(rows) if prompt_rows],
        decode_reserve=decode_reserve_for(batch.max_new_tokens),
    )
    prompt_of = [p for p, _ in flat]
    index = [i for prompt_rows in rows for i in range(len(prompt_rows))]  # each row's place among its prompt's rows
    ids = batch.input_ids[prompt_of]  # padded prompts, on the prompt's device, as generate keeps them
    first = torch.tensor([[batch.prompts[p].first_token] for p in prompt_of], dtype=ids.dtype, device=ids.device)
    ids = torch.cat([ids, first], dim=1)
    done = batch.stopping_criteria(ids, torch.stack([batch.prompts[p].first_logits for p in prompt_of]))
    last = None
    if batch.prompts[0].last_position_ids is not None:
        last = torch.cat([batch.prompts[p].last_position_ids for p in prompt_of], dim=-2).to(model.device)
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    active = list(range(len(flat)))  # the row of `flat` that each cache row decodes
    session = CompressionSession(None, batch.prompts[0].shape, cache)  # decode-only: the decisions are the rows'
    step = 0
    with COMPRESSION_HOOK.activate(session), text_attention(model, register_backend_attention(backend)):
        while True:
            finished = torch.nonzero(done).flatten().tolist()
            if finished:
                row_bytes, stored, kept = cache.row_kv_bytes(), cache.stored_tokens(), cache.kept_prompt_tokens()
                for i in finished:
                    p, row = flat[active[i]]
                    results[p][index[active[i]]] = PressGeneration(
                        row.press, row.decisions, ids[i : i + 1, batch.pads[p] :].clone(), int(row_bytes[i]), stored[i], kept[i]
                    )
                keep = torch.nonzero(~done).flatten().tolist()
                if not keep:
                    break
                cache.select_rows(keep, compact=False)  # compacts when the dropped rows outnumber the kept
                ids = ids[keep]
                active = [active[i] for i in keep]
                if last is not None:
                    last = last[..., keep, :]
            step += 1
            outputs = model(
                input_ids=ids[:, -1:].to(model.device), position_ids=None if last is None else last + step,
                past_key_values=cache, use_cache=True, return_dict=True, **extra,
            )
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=ids.device)
            scores = batch.logits_processor(ids, logits)
            ids = torch.cat([ids, torch.argmax(scores, dim=-1, keepdim=True).to(ids.dtype)], dim=1)
            done = batch.stopping_criteria(ids, scores)
    return results  # type: ignore[return-value]


def shared_generate(
    loaded: Any,
    presses: Sequence[Any],
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int,
    backend: str = "auto",
) -> list[PressGeneration]:
    """Greedy generation of one prompt under every method of ``presses``: one :func:`shared_prefill`
    (recording the largest window), :func:`compress_prefill` per method, one :func:`decode_rows`.
    Every method is checked (:func:`check_shareable`, ``validate_for``) before any forward pass.
    Returns one :class:`PressGeneration` per press, in order; each equals
    ``compressed_generate(loaded, press, inputs, max_new_tokens=max_new_tokens, do_sample=False)``."""
    if not presses:
        raise SharedPrefillError("presses is empty: give at least one method (e.g. [FullKVPress(), SnapKVPress(budget=64)])")
    query_window = _checked_presses(loaded, [presses])
    prefill = shared_prefill(loaded, inputs, max_new_tokens=max_new_tokens, query_window=query_window)
    return decode_rows(loaded, prefill, [compress_prefill(prefill, press) for press in presses], backend=backend)


def shared_generate_batch(
    loaded: Any,
    presses: Sequence[Sequence[Any]],
    prompts: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    backend: str = "auto",
) -> list[list[PressGeneration]]:
    """:func:`shared_generate` of B prompts at once: one :func:`prefill_batch` (one forward pass
    over the left-padded prompts), :func:`compress_prefill` per (prompt, method), one
    :func:`decode_batch` of every (prompt, method) row. ``presses[b]``: the methods of prompt b
    (they may differ between prompts). Returns, per prompt, one :class:`PressGeneration` per
    press, in order; each equals ``shared_generate`` of that prompt alone (and so
    ``compressed_generate`` of that press), token for token and byte for byte
    (tests/integration/test_shared_prefill.py)."""
    if len(presses) != len(prompts) or not prompts:
        raise SharedPrefillError(f"give one list of presses per prompt: {len(presses)} lists for {len(prompts)} prompts")
    if not any(presses):
        raise SharedPrefillError("presses is empty: give at least one method (e.g. [FullKVPress(), SnapKVPress(budget=64)])")
    query_window = _checked_presses(loaded, presses)
    batch = prefill_batch(loaded, prompts, max_new_tokens=max_new_tokens, query_window=query_window)
    rows = [[compress_prefill(prefill, press) for press in own] for prefill, own in zip(batch.prompts, presses)]
    return decode_batch(loaded, batch, rows, backend=backend)


def _checked_presses(loaded: Any, presses: Sequence[Sequence[Any]]) -> int:
    """Check every method (:func:`check_shareable`, ``validate_for``) before any forward pass;
    return the query window the prefill must record (the largest w)."""
    shape = model_shape(loaded)
    for own in presses:
        for press in own:
            check_shareable(press)
            press.validate_for(shape)
    return max([int(getattr(press, "window", 0)) for own in presses for press in own] + [1])


# ------------------------------------------------------------------- one method through generate


@dataclass(eq=False)
class _BatchSession:
    """The compressed path's state for a left-padded ``generate`` batch: one
    :class:`~sparsemm_utils.compression.PrefillDecisions` per prompt, each deciding on its prompt
    without the padding (what :func:`~sparsemm_utils.compression.per_head_attention` reads)."""

    cache: PerHeadKVCache
    prompts: list[PrefillDecisions]
    pads: tuple[int, ...]

    def prefill_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Each prompt's selection on its own ``(1, H, n_b, d)`` queries and keys, then one packing."""
        positions = []
        for b, (decisions, pad) in enumerate(zip(self.prompts, self.pads)):
            n = int(key.shape[-2]) - pad
            chosen = None
            if not isinstance(decisions.press, FullKVPress):
                chosen = decisions.select(layer_idx, query[b : b + 1, :, pad:], key[b : b + 1, :, pad:], scaling)
            elif layer_idx == 0:
                decisions.prompt_len = n
            everything = torch.arange(n, device=key.device)
            positions.append([everything] * int(key.shape[1]) if chosen is None else chosen)
        self.cache.layers[layer_idx].compress_batch(positions, self.pads)


@torch.no_grad()
def compressed_generate_batch(
    loaded: Any, press: Any, prompts: Sequence[Mapping[str, Any]], *, decode_block: int = DECODE_BLOCK, **gen_kwargs: Any
) -> list[PressGeneration]:
    """``loaded.model.generate`` of B prompts at once, ONE method, the KV cache compressed per prompt.

    The prompts go through ``generate`` as one left-padded batch
    (:func:`~sparsemm_utils.prompts.batch_inputs`: ``generate`` positions each from the attention
    mask); at the prefill each prompt's KV heads keep what the method chooses on that prompt alone
    (:meth:`~sparsemm_utils.compression.PrefillDecisions.select`, as the batch-1 path), packed as
    one row of a :class:`~sparsemm_utils.kv_cache.PerHeadKVCache` per prompt (no padding stored,
    no head pays for another's length, FullKV keeps its own n). Each prompt's tokens equal
    ``compressed_generate(loaded, press, prompt, **gen_kwargs)`` (tests/integration/test_shared_prefill.py);
    ``generate`` keeps a finished prompt in the batch (it feeds it padding), so its sequence is cut
    after its first end-of-sequence token and its KV bytes are those its cache held when its batch-1
    generation ended (kept prompt tokens + the tokens fed back before then).

    Args:
        press: FullKV or a method that compresses after the prefill (:func:`check_shareable`: the
            head-mask ablation and FastV change the prefill itself and run one prompt at a time).
        prompts: each batch 1, unpadded (e.g. :func:`~sparsemm_utils.prompts.build_inputs`).
        decode_block, gen_kwargs: as :func:`~sparsemm_utils.compression.compressed_generate`
            (greedy or sampled, ``max_new_tokens``...).

    Returns:
        One :class:`PressGeneration` per prompt, in order.
    """
    check_shareable(press)
    if not prompts:
        raise SharedPrefillError("compressed_generate_batch needs at least one prompt")
    for prompt in prompts:
        _check_generation_inputs(prompt, gen_kwargs)
    shape = model_shape(loaded)
    press.validate_for(shape)
    model = loaded.model
    inputs = batch_inputs(loaded, prompts)
    pads = _left_pads(inputs["input_ids"], inputs.get("attention_mask"))
    reserve = _decode_reserve(loaded, gen_kwargs, decode_block)
    cache = PerHeadKVCache(shape.layers, decode_reserve=reserve, prefill_batch=len(prompts))
    session = _BatchSession(cache, [PrefillDecisions(press, shape) for _ in prompts], pads)
    name = COMPRESSION_HOOK.register(PER_HEAD_ATTENTION, per_head_attention)
    with COMPRESSION_HOOK.activate(session), text_attention(model, name):
        output = model.generate(**inputs, past_key_values=cache, **gen_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    eos = model.generation_config.eos_token_id
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    kept = np.stack(
        [[[p.numel() for p in layer.prompt_positions(b)] for layer in cache.layers] for b in range(len(prompts))]
    )  # (prompts, layers, kv_heads)
    results = []
    for b, (prompt, decisions) in enumerate(zip(prompts, session.prompts)):
        n = int(prompt["input_ids"].shape[1])
        new = sequences[b, pads[b] + n :].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        generated = ends[0] + 1 if ends else len(new)
        stored = kept[b] + max(generated - 1, 0)  # every head stores the tokens fed back before the last
        results.append(
            PressGeneration(
                press, decisions, sequences[b : b + 1, pads[b] : pads[b] + n + generated].clone(),
                analytic_kv_bytes(stored, loaded.head_dim, model.dtype), stored, kept[b],
            )
        )  # fmt: skip
    return results
