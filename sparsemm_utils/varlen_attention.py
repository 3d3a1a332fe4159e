"""Decode attention over a per-head variable-length KV cache in ONE kernel call per layer.

:class:`~sparsemm_utils.kv_cache.PerHeadKVLayer` keeps a different number of tokens in every KV
head, packed into one ``(capacity, head_dim)`` buffer per layer: head h owns rows
``[start[h], start[h] + room[h])``, of which the first ``length[h]`` are in use. Its own
:meth:`~sparsemm_utils.kv_cache.PerHeadKVLayer.attend` (the *reference* path) runs one
``scaled_dot_product_attention`` per KV head: correct everywhere, but 32 kernel launches per
layer and 1,024 per token on LLaVA-NeXT-Vicuna-7B (MHA), whose launch overhead at batch 1 can
exceed the time of the attention itself on a GPU. docs/method.md §7's latency claim (SparseMM decodes in flat time from 2K to 32K
tokens) needs the cache read in one call. Two such paths, neither needing a flash-attn build nor a
custom CUDA extension:

- ``"flash"``: torch's own variable-length attention, :func:`torch.nn.attention.varlen.varlen_attn`
  (FlashAttention-2 kernels shipped inside PyTorch; CUDA, fp16/bf16, compute capability >= 8.0).
  Each KV head is one "sequence" of the batch: its G = H / H_kv query heads are the sequence's
  query heads (``enable_gqa``), ``cu_seq_k`` are the segment starts and ``seqused_k`` the rows in
  use, so the kernel reads the packed buffer in place, reserve rows skipped, nothing copied.
  Single-token steps only (what greedy decoding runs); a multi-token step takes the padded path.
- ``"padded"``: one sdpa over the segments gathered into ``(H_kv, max_len, head_dim)`` with a
  key-padding (and, for q > 1, causal) mask. Runs on any device and dtype; it copies
  H_kv x max_len rows per step, so it pays for the longest head (a skewed SparseMM allocation
  can make max_len several times the mean). It is the GPU fallback (float32, GPUs older than
  sm 80); on a CPU the reference loop is faster (see :func:`resolve_backend`).

:func:`varlen_attn_emulation` re-implements ``varlen_attn``'s documented semantics in plain torch,
so the arguments the flash path builds are tested on CPU; the kernel itself is tested where CUDA
exists (``tests/integration/test_varlen_attention.py``, skipped elsewhere).

Use: inside :func:`sparsemm_utils.compression.compression`, :func:`use_decode_backend` switches
the language model to an attention function that runs the prefill exactly as the per-head
attention of :mod:`sparsemm_utils.compression` does (full keys, then compression) and decodes
with the chosen backend; it reads the compression session through
:data:`~sparsemm_utils.compression.COMPRESSION_HOOK`, and the compression context restores the
model's attention on exit.
:func:`compressed_generate_with` is ``compressed_generate`` with a backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from sparsemm_utils.attention_hooks import AttentionFunction, set_text_attention
from sparsemm_utils.compression import (
    COMPRESSION_HOOK,
    GenerationResult,
    _check_generation_inputs,
    _decode_reserve,
    compression,
    per_head_attention,
)
from sparsemm_utils.kv_cache import DECODE_BLOCK, CacheStateError, PerHeadKVCache, PerHeadKVLayer, UnsupportedBatchError
from sparsemm_utils.validate import check_choice

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the flash path reports itself unavailable
    varlen_attn = None

__all__ = [
    "DECODE_BACKENDS",
    "VarlenAttentionError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "PackedSegments",
    "FlashVarlenArguments",
    "packed_segments",
    "flash_varlen_arguments",
    "varlen_attn_emulation",
    "flash_decode",
    "padded_decode",
    "decode_attend",
    "flash_unavailable_reason",
    "resolve_backend",
    "attention_name",
    "use_decode_backend",
    "register_backend_attention",
    "compression_with_backend",
    "compressed_generate_with",
]

Backend = Literal["reference", "padded", "flash"]
#: The decode paths: the per-head loop of kv_cache (reference), one padded sdpa, torch's varlen flash.
DECODE_BACKENDS: tuple[str, ...] = ("reference", "padded", "flash")
_ATTENTION_PREFIX = "sparsemm_per_head_"


class VarlenAttentionError(RuntimeError):
    """Base class of this module's errors."""


class UnknownBackendError(VarlenAttentionError, ValueError):
    """A backend name that is not ``"auto"`` or one of :data:`DECODE_BACKENDS`."""


class BackendUnavailableError(VarlenAttentionError):
    """The backend asked for cannot run here (e.g. ``"flash"`` on a CPU or in float32)."""


# ------------------------------------------------------------------------------------ the layout


@dataclass(frozen=True)
class PackedSegments:
    """One layer's packed per-head storage, read in place.

    Attributes:
        keys, values: ``(capacity, head_dim)`` buffers (the layer's own, not copies).
        starts: first row of each KV head's segment, H_kv ints.
        lengths: rows in use per KV head (kept prompt tokens + generated ones), H_kv ints.
        rooms: rows reserved per KV head (``lengths`` + free decode reserve), H_kv ints; segments
            are contiguous (``starts[h + 1] == starts[h] + rooms[h]``) unless rows were dropped
            with ``select_rows(..., compact=False)``; the flash path compacts the layer first.
    """

    keys: torch.Tensor
    values: torch.Tensor
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    rooms: tuple[int, ...]

    @property
    def num_kv_heads(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys.shape[1])


def packed_segments(layer: PerHeadKVLayer) -> PackedSegments:
    """The packed buffers and segment table of a compressed :class:`PerHeadKVLayer`.

    Reads the layer's storage (documented in :mod:`sparsemm_utils.kv_cache`: one buffer per layer,
    head h at ``[start[h], start[h] + room[h])``); ``tests/unit/test_efficiency_varlen.py`` checks
    every segment against the layer's public :meth:`~PerHeadKVLayer.head_keys` views, so a change
    of the storage breaks a test rather than this path."""
    if not isinstance(layer, PerHeadKVLayer):
        raise TypeError(f"expected a PerHeadKVLayer, got {type(layer).__name__}")
    if not layer.is_compressed:
        raise CacheStateError(
            f"layer {layer.layer_idx}: decode attention needs a compressed prefill (run the prefill first)"
        )
    return PackedSegments(
        keys=layer._k,
        values=layer._v,
        starts=tuple(layer._starts),
        lengths=tuple(layer._lengths),
        rooms=tuple(layer._rooms),
    )


def _check_query(query: torch.Tensor, segments: PackedSegments) -> tuple[int, int, int, int]:
    if query.ndim != 4 or query.shape[0] != 1:
        raise UnsupportedBatchError(f"query must be (1, heads, q, head_dim), got {tuple(query.shape)}")
    _, heads, q_len, dim = query.shape
    if dim != segments.head_dim:
        raise ValueError(f"query head_dim {dim} != the cache's {segments.head_dim}")
    if heads % segments.num_kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {segments.num_kv_heads} KV heads")
    if q_len > min(segments.lengths):
        raise CacheStateError(
            f"{q_len} new tokens but a head stores only {min(segments.lengths)}: the update that appends the new "
            f"tokens must run before the attention"
        )
    return heads, q_len, dim, heads // segments.num_kv_heads


def _index_tensor(values: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small integer tensor on ``device``. On a GPU it is staged in pinned memory and copied
    asynchronously: a copy from pageable memory would synchronise the stream, in every layer of
    every decode step."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------- flash path


@dataclass(frozen=True)
class FlashVarlenArguments:
    """What :func:`torch.nn.attention.varlen.varlen_attn` receives for one single-token step.

    ``query`` ``(H_kv, G, d)``: sequence h is KV head h, holding one token whose G query heads are
    the group's (query head h * G + g); ``key`` / ``value`` ``(capacity, 1, d)``: the packed
    buffers as one KV head; ``cu_seq_q`` = 0..H_kv and ``cu_seq_k`` = starts + [capacity] (int32,
    H_kv + 1); ``seqused_k`` = lengths (int32, H_kv); ``max_q`` = 1; ``max_k`` = max(rooms)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    seqused_k: torch.Tensor
    enable_gqa: bool

    def as_kwargs(self) -> dict[str, Any]:
        return dict(
            query=self.query, key=self.key, value=self.value, cu_seq_q=self.cu_seq_q, cu_seq_k=self.cu_seq_k,
            max_q=self.max_q, max_k=self.max_k, seqused_k=self.seqused_k, enable_gqa=self.enable_gqa,
        )


def flash_varlen_arguments(segments: PackedSegments, query: torch.Tensor) -> FlashVarlenArguments:
    """The ``varlen_attn`` arguments that attend a single-token ``query`` ``(1, H, 1, d)`` over the
    packed segments (see :class:`FlashVarlenArguments`)."""
    heads, q_len, dim, group = _check_query(query, segments)
    if q_len != 1:
        raise ValueError(f"the flash varlen path takes single-token steps, got {q_len} tokens")
    device = segments.keys.device
    kv_heads = segments.num_kv_heads
    return FlashVarlenArguments(
        query=query[0, :, 0, :].reshape(kv_heads, group, dim).contiguous(),
        key=segments.keys.unsqueeze(1),
        value=segments.values.unsqueeze(1),
        cu_seq_q=torch.arange(kv_heads + 1, dtype=torch.int32, device=device),
        cu_seq_k=_index_tensor((*segments.starts, segments.capacity), device, torch.int32),
        max_q=1,
        max_k=max(segments.rooms),
        seqused_k=_index_tensor(segments.lengths, device, torch.int32),
        enable_gqa=group > 1,
    )


def varlen_attn_emulation(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch re-implementation of ``torch.nn.attention.varlen.varlen_attn`` (non-causal, no
    window, no paging), following its documentation, to test the flash path's arguments on CPU.

    Sequence i has queries ``query[cu_seq_q[i]:cu_seq_q[i + 1]]`` ``(T_q_i, H_q, d)`` and keys
    ``key[cu_seq_k[i] : cu_seq_k[i] + used_i]`` ``(T_k_i, H_kv, d)`` with used_i = ``seqused_k[i]``
    (default the whole slot); query head j reads KV head j // (H_q / H_kv) (``enable_gqa``).
    Checks what the kernel requires (int32 offsets, lengths within ``max_q`` / ``max_k``, used rows
    within the slot). Returns ``(T_q, H_q, d)``, float math in float32, cast back."""
    for name, t in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)) + ((("seqused_k", seqused_k),) if seqused_k is not None else ()):
        if t.dtype != torch.int32 or t.ndim != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if query.ndim != 3 or key.ndim != 3 or key.shape != value.shape:
        raise ValueError(f"query (T_q, H_q, d), key/value (T_k, H_kv, d) expected, got {tuple(query.shape)}, {tuple(key.shape)}")
    n = cu_seq_q.numel() - 1
    if cu_seq_k.numel() != n + 1 or (seqused_k is not None and seqused_k.numel() != n):
        raise ValueError("cu_seq_q, cu_seq_k (N + 1) and seqused_k (N) disagree on the batch size N")
    if int(cu_seq_q[-1]) != query.shape[0] or int(cu_seq_k[-1]) != key.shape[0] or int(cu_seq_q[0]) or int(cu_seq_k[0]):
        raise ValueError("cu_seq_q / cu_seq_k must run from 0 to T_q / T_k")
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not (enable_gqa and hq % hkv == 0):
        raise ValueError(f"H_q={hq} and H_kv={hkv} need enable_gqa=True and H_q % H_kv == 0")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(query)
    for i in range(n):
        q0, q1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        k0, k1 = int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        used = k1 - k0 if seqused_k is None else int(seqused_k[i])
        if not (0 <= q1 - q0 <= max_q and 0 <= k1 - k0 <= max_k and 0 <= used <= k1 - k0):
            raise ValueError(f"sequence {i}: lengths q={q1 - q0}, slot={k1 - k0}, used={used} exceed max_q/max_k or the slot")
        q = query[q0:q1].float().transpose(0, 1)  # (H_q, T_q_i, d)
        k = key[k0 : k0 + used].float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # (H_q, used, d)
        v = value[k0 : k0 + used].float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        out[q0:q1] = (attn @ v).transpose(0, 1).to(out.dtype)
    return out


def flash_decode(
    segments: PackedSegments, query: torch.Tensor, scaling: float | None = None, *, kernel: Any = None
) -> torch.Tensor:
    """One ``varlen_attn`` call over every KV head of the layer for a single-token ``query``
    ``(1, H, 1, d)``; returns ``(1, 1, H, d)`` (transformers' attention output layout).
    ``kernel``: the varlen function (default torch's; tests pass :func:`varlen_attn_emulation`)."""
    if kernel is None:
        if varlen_attn is None:  # pragma: no cover - torch < 2.10
            raise BackendUnavailableError(f"torch {torch.__version__} has no torch.nn.attention.varlen")
        kernel = varlen_attn
    args = flash_varlen_arguments(segments, query)
    out = kernel(**args.as_kwargs(), scale=scaling)  # (H_kv, G, d)
    heads, dim = query.shape[1], query.shape[-1]
    return out.reshape(1, 1, heads, dim)


# ---------------------------------------------------------------------------------- padded path


#: From this many segments on, :func:`padded_decode` pads each of :data:`PADDED_BUCKETS` groups of
#: segments (sorted by length) to its own longest instead of all to the longest one.
PADDED_BUCKET_MIN_SEGMENTS = 64
PADDED_BUCKETS = 4


def padded_decode(segments: PackedSegments, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """One sdpa over the segments gathered into ``(H_kv, max_len, d)``, masked.

    ``query`` ``(1, H, q, d)``: the G query heads of KV group h (heads h*G .. h*G + G - 1) become
    G x q query rows of batch entry h; new token i of q sees the head's rows
    0 .. length[h] - q + i (causal among the new tokens, which the update has just appended).
    Returns ``(1, q, H, d)``.

    Many segments of skewed lengths (a batch of prompts x methods: FullKV rows next to B = 16
    rows) are split into :data:`PADDED_BUCKETS` groups of similar length, one sdpa each, so a
    short segment is not padded to the longest one."""
    heads, q_len, dim, group = _check_query(query, segments)
    kv_heads = segments.num_kv_heads
    if kv_heads < PADDED_BUCKET_MIN_SEGMENTS:
        return _padded_sdpa(segments, query, scaling)
    order = sorted(range(kv_heads), key=segments.lengths.__getitem__)
    out = query.new_empty((heads, q_len, dim))
    for chunk in np.array_split(np.asarray(order), PADDED_BUCKETS):
        part = PackedSegments(
            segments.keys, segments.values, tuple(segments.starts[h] for h in chunk),
            tuple(segments.lengths[h] for h in chunk), tuple(segments.rooms[h] for h in chunk),
        )  # fmt: skip
        heads_of = torch.as_tensor((chunk[:, None] * group + np.arange(group)[None, :]).reshape(-1), device=query.device)
        out[heads_of] = _padded_sdpa(part, query[:, heads_of], scaling)[0].transpose(0, 1)
    return out.transpose(0, 1).unsqueeze(0)


def _padded_sdpa(segments: PackedSegments, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """:func:`padded_decode` of one group of segments, all padded to its longest."""
    heads, q_len, dim, group = _check_query(query, segments)
    device = segments.keys.device
    kv_heads = segments.num_kv_heads
    lengths = _index_tensor(segments.lengths, device, torch.int64)
    starts = _index_tensor(segments.starts, device, torch.int64)
    max_len = max(segments.lengths)
    offsets = torch.arange(max_len, device=device)
    rows = starts[:, None] + offsets[None, :]  # (H_kv, max_len)
    rows = torch.where(offsets[None, :] < lengths[:, None], rows, starts[:, None])  # padding reads a valid row
    flat = rows.reshape(-1)
    keys = segments.keys.index_select(0, flat).view(kv_heads, 1, max_len, dim)  # (H_kv, 1, max_len, d)
    values = segments.values.index_select(0, flat).view(kv_heads, 1, max_len, dim)
    token = torch.arange(q_len, device=device).repeat(group)  # query row g * q + i is new token i
    visible = offsets[None, None, :] <= (lengths[:, None, None] - q_len + token[None, :, None])  # (H_kv, G*q, max_len)
    rows_q = query[0].reshape(kv_heads, 1, group * q_len, dim)
    out = F.scaled_dot_product_attention(rows_q, keys, values, attn_mask=visible.unsqueeze(1), scale=scaling)
    return out.reshape(heads, q_len, dim).transpose(0, 1).unsqueeze(0)


# ------------------------------------------------------------------------------------- dispatch


def flash_unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why the flash varlen path cannot run on ``device`` in ``dtype`` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it needs a CUDA device (got {device}; torch {torch.__version__})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention needs float16 or bfloat16, got {dtype}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"FlashAttention-2 needs compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}"
    if varlen_attn is None:  # pragma: no cover - torch < 2.10
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """``"auto"`` -> ``"flash"`` where it can run (CUDA, fp16/bf16, sm >= 80); else ``"padded"`` on
    a GPU (one kernel per layer instead of one per KV head); else ``"reference"``: on a CPU the
    per-head loop is the fastest (a kernel launch costs little there, while the padded gather copies
    H_kv x the longest head: 8K-token prompt, 32 KV heads of skewed lengths 55..2160, one thread:
    3.7 ms per layer for the loop, over 40 ms for the gather alone). An explicit name is checked:
    ``"flash"`` where it cannot run raises :class:`BackendUnavailableError`."""
    check_choice("backend", backend, ("auto", *DECODE_BACKENDS), error=UnknownBackendError)
    if backend == "auto":
        if flash_unavailable_reason(device, dtype) is None:
            return "flash"
        return "padded" if torch.device(device).type == "cuda" else "reference"
    if backend == "flash":
        reason = flash_unavailable_reason(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"the flash varlen decode path cannot run here: {reason}. Use backend='auto' (flash where it can run, "
                f"else the reference path) or 'padded' (one sdpa per layer, any device and dtype)."
            )
    return backend


def decode_attend(layer: PerHeadKVLayer, query: torch.Tensor, scaling: float | None, backend: str) -> torch.Tensor:
    """Attention of the newest tokens over what every KV head of ``layer`` stores, by ``backend``
    (an explicit one of :data:`DECODE_BACKENDS`). ``query`` ``(rows, H, q, d)`` (rows = the
    layer's rows, 1 for a prompt's own cache); returns ``(rows, q, H, d)``. ``"flash"`` serves
    single-token steps; a multi-token step takes the padded path.

    Several rows (:class:`~sparsemm_utils.kv_cache.BatchedPerHeadKVCache`) go through the one-call
    paths as ONE row of rows x H query heads: segment r * H_kv + h is KV head h of row r, and query
    head r * H + j of the flattened row reads segment (r * H + j) // G = r * H_kv + j // G, its own."""
    check_choice("backend", backend, DECODE_BACKENDS, error=UnknownBackendError)
    if backend == "reference":
        return layer.attend(query, scaling)
    segments = packed_segments(layer)
    if query.ndim != 4 or query.shape[0] != layer.rows:
        raise UnsupportedBatchError(f"query must be ({layer.rows}, heads, q, head_dim), got {tuple(query.shape)}")
    rows, heads, q_len, dim = query.shape
    flat = query.reshape(1, rows * heads, q_len, dim)
    if backend == "flash" and q_len == 1:
        layer.compact()  # cu_seq_k needs segments that tile the buffer
        out = flash_decode(packed_segments(layer), flat, scaling)
    else:
        out = padded_decode(segments, flat, scaling)
    return out.view(q_len, rows, heads, dim).transpose(0, 1)  # (1, q, rows * H, d) -> (rows, q, H, d)


def attention_name(backend: str) -> str:
    """The name the attention function of ``backend`` is registered under."""
    check_choice("backend", backend, DECODE_BACKENDS, error=UnknownBackendError)
    return f"{_ATTENTION_PREFIX}{backend}"


def _attention_function(backend: str) -> AttentionFunction:
    name = attention_name(backend)

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
        layer = COMPRESSION_HOOK.active(name).cache.layers[module.layer_idx]
        if layer.has_pending_prefill:  # prefill: exactly the per-head attention of compression.py
            return per_head_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return decode_attend(layer, query, scaling, backend), None

    attention.__name__ = attention.__qualname__ = f"per_head_attention_{backend}"
    attention.__doc__ = f"Per-head attention whose decode steps run the {backend!r} backend (see varlen_attention)."
    return attention


#: One attention function per backend, made once so that registering it again is a no-op.
_BACKEND_ATTENTION: dict[str, AttentionFunction] = {backend: _attention_function(backend) for backend in DECODE_BACKENDS}


def use_decode_backend(model: torch.nn.Module, backend: str) -> str:
    """Switch the language model of ``model`` to the per-head attention decoding with ``backend``
    (resolved with :func:`resolve_backend` for the model's device and dtype). Call it inside
    :func:`~sparsemm_utils.compression.compression` with a compressing method: the context
    restores the previous attention on exit. Returns the backend used."""
    backend = resolve_backend(backend, model.device, model.dtype)
    set_text_attention(model, register_backend_attention(backend))
    return backend


def register_backend_attention(backend: str) -> str:
    """Register the per-head attention function of ``backend`` (an explicit one of
    :data:`DECODE_BACKENDS`; idempotent) and return the name to switch the language model to
    (e.g. with :func:`~sparsemm_utils.attention_hooks.text_attention`). It reads the cache of the
    session active in :data:`~sparsemm_utils.compression.COMPRESSION_HOOK`."""
    check_choice("backend", backend, DECODE_BACKENDS, error=UnknownBackendError)
    return COMPRESSION_HOOK.register(attention_name(backend), _BACKEND_ATTENTION[backend])


@contextmanager
def compression_with_backend(loaded: Any, press: Any, *, backend: str = "auto", decode_reserve: int = DECODE_BLOCK) -> Iterator[Any]:
    """:func:`~sparsemm_utils.compression.compression` whose decode steps use ``backend``; yields the
    session with ``session.decode_backend`` set (None for FullKV and the head-mask ablation, which
    keep transformers' own cache and attention)."""
    with compression(loaded, press, decode_reserve=decode_reserve) as session:
        session.decode_backend = None
        if isinstance(session.cache, PerHeadKVCache):
            session.decode_backend = use_decode_backend(loaded.model, backend)
        yield session


def compressed_generate_with(
    loaded: Any, press: Any, inputs: Mapping[str, Any], *, backend: str = "auto", decode_block: int = DECODE_BLOCK,
    **gen_kwargs: Any,
) -> Any:
    """``compressed_generate`` (same checks, same result type, same decode reserve) with decode steps on ``backend``."""
    _check_generation_inputs(inputs, gen_kwargs)
    reserve = _decode_reserve(loaded, gen_kwargs, decode_block)
    with compression_with_backend(loaded, press, backend=backend, decode_reserve=reserve) as session:
        output = loaded.model.generate(**inputs, past_key_values=session.cache, **gen_kwargs)
    return GenerationResult(output=output, session=session)
