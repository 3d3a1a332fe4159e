"""A KV cache that keeps a different number of tokens in every KV head, and stores only those.

docs/method.md §5 compresses the prompt's KV cache once, at prefill, to ``cap[l, g] + w`` tokens in
KV head g of layer l; decoding then appends every new token to every head and evicts nothing.
docs/method.md §7 defines the bytes such a cache holds: the sum over layers and KV heads of kept
tokens x head_dim x 2 (K and V) x bytes per element. This module is the storage half of that
(which tokens to keep is decided in :mod:`sparsemm_utils.compression`).

Storage design (one :class:`PerHeadKVLayer` per decoder layer)
----------------------------------------------------------------
- **Packed per head.** A layer owns one key buffer and one value buffer of shape
  ``(capacity, head_dim)``. KV head h owns the contiguous segment
  ``[start[h], start[h] + room[h])`` of both, of which the first ``length[h]`` rows are in use:
  its kept prompt tokens (in prompt order) followed by the tokens generated since.
  No padding to the longest head: a head with 40 tokens next to one with 900 costs 40 rows.
- **Rows.** A layer may hold R rows decoding side by side (:class:`BatchedPerHeadKVCache`,
  filled by :meth:`PerHeadKVLayer.load_rows` from a shared prefill, or by
  :meth:`PerHeadKVLayer.load_prompts` from the prefills of several prompts of different lengths,
  :mod:`sparsemm_utils.shared_prefill`): segment ``r * H_kv + h`` is KV head h of row r, packed
  like the others, so rows pay only for what they keep, never for another row's prompt length
  or padding. A prefill's own cache (:class:`PerHeadKVCache`) has one row.
- **Appends without copying the cache, a reserve bounded by a block.** ``room[h] = length[h] +
  block`` leaves every head ``block`` free rows (the layer's ``decode_reserve``, default
  :data:`DECODE_BLOCK`) after compression; a decode step writes its new key and value into row
  ``start[h] + length[h]`` of every head (one ``index_copy_``, O(H_kv x head_dim)). When a head's
  free rows run out, the layer is re-packed with ``block`` fresh free rows per head (or the
  step's token count, if larger): every head appends at the same rate, so T decode steps
  re-pack ceil((T - block) / block) times, once per block of steps (amortised O(1) re-packs per
  step, each copying the layer's rows in use once). Rows reserved but unused never exceed
  ``block`` per head, whatever the generation limit: with the paper's 512 new tokens a
  reserve sized to the limit would hold 512 free rows per head, twice what a 256-token budget
  keeps. ``compressed_generate`` sizes the block with :func:`decode_reserve_for`
  (``min(max_new_tokens - 1, block)``: a short generation re-packs nothing). Dropping rows
  (:meth:`PerHeadKVLayer.select_rows`) compacts the kept ones into new buffers.
- **Honest byte accounting.** :meth:`PerHeadKVLayer.kv_bytes` counts rows in use only
  (docs/method.md §7's formula); :meth:`PerHeadKVLayer.allocated_bytes` counts the buffers
  (rows in use + the decode reserve); :meth:`PerHeadKVLayer.slack_bytes` is their difference.
  The kept prompt positions (one int64 per kept prompt token, for inspection and tests) are
  bookkeeping, counted in neither.
- **Logical length.** ``get_seq_length`` reports the number of tokens the layer has SEEN (prompt
  + generated), not how many it keeps: ``generate`` and Qwen's M-RoPE deltas derive positions
  from it, and keys are stored after RoPE, so evicting tokens never shifts the positions of the
  ones kept or of those generated later. Rows decode in lockstep, so they share it.

Protocol (what the attention function of :mod:`sparsemm_utils.compression` relies on)
--------------------------------------------------------------------------------------
1. Prefill: ``update(K, V)`` on an empty layer keeps the full ``(1, H_kv, n, d)`` tensors as
   *pending* and returns them unchanged, so the prefill's own attention uses the full keys
   (docs/method.md §5). The attention function then calls :meth:`PerHeadKVLayer.compress` with the
   prompt positions each head keeps (or :meth:`PerHeadKVLayer.keep_all`), which packs them and
   drops the full tensors. (A shared prefill instead packs R rows at once with
   :meth:`PerHeadKVLayer.load_rows`.)
2. Decode: ``update(k, v)`` appends the ``t`` new tokens to every head (of every row) and returns
   them (only them). The heads' stored tokens have different lengths, so no
   ``(R, H_kv, len, d)`` tensor exists: attention over the cache goes through
   :meth:`PerHeadKVLayer.attend`, one ``scaled_dot_product_attention`` per (row, KV head) over its
   own segment (views, no copies), or the one-call paths of :mod:`sparsemm_utils.varlen_attention`.
   Using the cache with any other attention function is an error caught at the next update.

A prefill through this cache runs one prompt at a time (batch size 1, as the original SparseMM and
AdaKV code), or a left-padded batch of ``generate`` made for it (``prefill_batch``,
:meth:`PerHeadKVLayer.compress_batch`, :func:`sparsemm_utils.shared_prefill.compressed_generate_batch`);
the prefills of several prompts also combine by :meth:`BatchedPerHeadKVCache.from_prefills`. Beam search, cropping
and repeating rows raise :class:`UnsupportedCacheOperationError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from sparsemm_utils.validate import check_int

__all__ = [
    "KVCacheError",
    "CacheStateError",
    "UnsupportedBatchError",
    "UnsupportedCacheOperationError",
    "InvalidPositionsError",
    "PerHeadKVLayer",
    "PerHeadKVCache",
    "BatchedPerHeadKVCache",
    "DECODE_BLOCK",
    "decode_reserve_for",
    "analytic_kv_bytes",
    "cache_kv_bytes",
]


#: Free rows per KV head a layer grants at compression and again each time a head runs out
#: (the bound on its reserved-but-unused rows; see the module docstring).
DECODE_BLOCK = 64


def decode_reserve_for(max_new_tokens: int, block: int = DECODE_BLOCK) -> int:
    """The decode reserve (free rows per KV head, :class:`PerHeadKVLayer`'s ``decode_reserve``) for a
    generation of ``max_new_tokens``: its decode steps append ``max_new_tokens - 1`` tokens (the
    last one generated is never fed back), capped at ``block``. Example: 10 new tokens, block 64
    -> 9 (no re-pack); 512 new tokens, block 64 -> 64 (7 re-packs, at most 64 free rows per head)."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    block = check_int("block", block, 0)
    return min(max(max_new_tokens - 1, 0), block)


# ---------------------------------------------------------------------------------------- errors


class KVCacheError(RuntimeError):
    """Base class of the errors raised by this module."""


class CacheStateError(KVCacheError):
    """The cache was used out of protocol (e.g. decoded before the prefill was compressed)."""


class UnsupportedBatchError(KVCacheError, ValueError):
    """A prefill batch larger than 1 (per-head compression runs one prompt at a time, as the
    original), or a decode batch that does not match the cache's rows."""


class UnsupportedCacheOperationError(KVCacheError, NotImplementedError):
    """An operation ``generate`` uses for beam search, assisted decoding or batching."""


class InvalidPositionsError(KVCacheError, ValueError):
    """The prompt positions handed to :meth:`PerHeadKVLayer.compress` are malformed."""


def analytic_kv_bytes(stored_tokens: Any, head_dim: int, dtype: torch.dtype) -> int:
    """docs/method.md §7's analytic KV bytes: sum(stored_tokens) x head_dim x 2 (K and V) x element size.

    ``stored_tokens``: int array of any shape, e.g. (layers, kv_heads): tokens each KV head stores.
    Example: 2 layers x 2 KV heads storing [[3, 5], [4, 4]] tokens, head_dim 16, float32:
    16 tokens x 16 x 2 x 4 bytes = 2048."""
    stored = np.asarray(stored_tokens)
    if stored.dtype.kind not in "iu" or (stored < 0).any():
        raise ValueError(f"stored_tokens must be non-negative integers, got {stored!r}")
    check_int("head_dim", head_dim, 1)
    return int(stored.sum()) * int(head_dim) * 2 * torch.empty((), dtype=dtype).element_size()


def cache_kv_bytes(cache: Cache) -> int:
    """Bytes of keys and values a transformers cache holds (docs/method.md §7).

    A :class:`PerHeadKVCache` (or :class:`BatchedPerHeadKVCache`) reports its rows in use (:meth:`PerHeadKVCache.kv_bytes`); any other
    cache whose layers hold ``keys`` / ``values`` tensors (``DynamicCache``, FullKV) reports their
    sizes, i.e. n x H_kv x head_dim x 2 x element size per layer."""
    if isinstance(cache, _PackedCache):
        return cache.kv_bytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------- layer


def _segment_rows(starts: Sequence[int], lengths: Sequence[int], device: Any) -> torch.Tensor:
    """Buffer rows ``start .. start + length - 1`` of every segment, concatenated (int64)."""
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.int64, device=device)
    # row j of the concatenation belongs to segment s: start[s] + (j - first row of s in the concatenation)
    offsets = torch.as_tensor(list(starts), dtype=torch.int64, device=device) - (torch.cumsum(lengths_t, 0) - lengths_t)
    return torch.arange(int(lengths_t.sum()), device=device) + torch.repeat_interleave(offsets, lengths_t)


class PerHeadKVLayer(CacheLayerMixin):
    """One decoder layer's KV cache with a different number of stored tokens per KV head, for one
    prompt or for R rows decoding side by side.

    See the module docstring for the storage design and the protocol. Shapes: keys and values
    enter as ``(rows, H_kv, t, head_dim)`` (rows = 1 from a prefill); the packed buffers are
    ``(capacity, head_dim)``; segment ``row * H_kv + head`` holds what KV head ``head`` of row
    ``row`` stores.

    Args:
        decode_reserve: the block: free rows each KV head gets after compression for the tokens
            generated next, granted again (the same number) whenever a head runs out, so no head
            ever holds more than ``decode_reserve`` unused rows (or a multi-token step's count, if
            larger). Rows reserved but unused are reported by :meth:`slack_bytes`, never by
            :meth:`kv_bytes`.
        layer_idx: the decoder layer's index, for error messages.
        prefill_batch: prompts the prefill brings at once (a left-padded batch of ``generate``,
            packed by :meth:`compress_batch`); 1 for :meth:`compress`.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False  # the buffers are sized at compression, not before

    def __init__(
        self, decode_reserve: int = DECODE_BLOCK, layer_idx: int | None = None, *, prefill_batch: int = 1, **kwargs: Any
    ):
        super().__init__()
        self.decode_reserve = check_int("decode_reserve", decode_reserve, 0)
        self.prefill_batch = check_int("prefill_batch", prefill_batch, 1)
        self.layer_idx = layer_idx
        self._clear()

    # ------------------------------------------------------------------ state

    def _clear(self) -> None:
        # CacheLayerMixin's attributes: there is no single (rows, H_kv, len, d) tensor here.
        self.keys = None
        self.values = None
        self.is_initialized = False
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._k: torch.Tensor | None = None  # (capacity, head_dim)
        self._v: torch.Tensor | None = None
        # one entry per segment (row * H_kv + head)
        self._starts: list[int] = []
        self._lengths: list[int] = []
        self._rooms: list[int] = []
        self._prompt_positions: list[torch.Tensor] = []
        self._seen = 0
        self.rows = 0  # rows packed (1 after a prefill's compression)
        self.prompt_len = 0
        self.num_kv_heads = 0
        self.head_dim = 0
        self.repacks = 0  # how many times the layer was re-packed because a head ran out of room

    def _where(self) -> str:
        return f"layer {self.layer_idx}" if self.layer_idx is not None else "this cache layer"

    @property
    def has_pending_prefill(self) -> bool:
        """True between the prefill's ``update`` and :meth:`compress` / :meth:`keep_all`."""
        return self._pending is not None

    @property
    def is_compressed(self) -> bool:
        """True once the prefill has been packed (decode steps may follow)."""
        return self._k is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype, device, H_kv and head_dim from the prefill's keys ``(1, H_kv, n, d)``."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = int(key_states.shape[1]), int(key_states.shape[-1])
        if value_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"{self._where()}: keys and values must share head_dim, got {key_states.shape} and {value_states.shape}"
            )
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.ndim != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"{self._where()}: keys and values must both be (batch, kv_heads, tokens, head_dim), got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        batch = int(key_states.shape[0])
        if not self.is_compressed and batch != self.prefill_batch and self.prefill_batch > 1:
            raise UnsupportedBatchError(
                f"{self._where()}: a prefill of batch size {batch}, but the cache was made for {self.prefill_batch} prompts"
            )
        if not self.is_compressed and batch != self.prefill_batch:
            raise UnsupportedBatchError(
                f"{self._where()}: batch size {batch}: the per-head KV cache prefills one prompt "
                f"(batch size 1, as the original SparseMM/AdaKV code); run prompts one at a time, or decode several "
                f"compressions of one prompt with sparsemm_utils.shared_prefill"
            )
        if self.is_compressed and batch != self.rows:
            raise UnsupportedBatchError(
                f"{self._where()}: batch size {batch}, but the cache holds {self.rows} row(s): decode steps feed one "
                f"token per row"
            )
        if self.is_initialized and (key_states.shape[1], key_states.shape[-1]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"{self._where()}: got {key_states.shape[1]} KV heads of dim {key_states.shape[-1]}, but the cache "
                f"holds {self.num_kv_heads} heads of dim {self.head_dim}"
            )

    # ------------------------------------------------------------------ prefill

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill (empty layer): keep the full keys/values pending and return them unchanged.
        Decode: append the new tokens to every head of every row and return them (only them;
        attend with :meth:`attend`). Inputs ``(rows, H_kv, t, head_dim)``."""
        self._check_states(key_states, value_states)
        if self._pending is not None:
            raise CacheStateError(
                f"{self._where()}: the prefill's keys were never compressed. The per-head cache must be used with "
                f"the per-head attention function (sparsemm_utils.compression.compressed_generate or the "
                f"compression(...) context), which calls compress()/keep_all() during the prefill."
            )
        if not self.is_compressed:
            self.lazy_initialization(key_states, value_states)
            self._pending = (key_states, value_states)
            self._seen = self.prompt_len = int(key_states.shape[-2])
            return key_states, value_states
        self._append(key_states, value_states)
        return key_states, value_states

    def _validated_positions(self, positions: Sequence[torch.Tensor], n: int, row: str = "") -> list[torch.Tensor]:
        if len(positions) != self.num_kv_heads:
            raise InvalidPositionsError(
                f"{self._where()}{row}: got positions for {len(positions)} KV heads, the layer has {self.num_kv_heads}"
            )
        out = []
        for h, pos in enumerate(positions):
            pos = torch.as_tensor(pos)
            if pos.ndim != 1 or pos.dtype not in (torch.int64, torch.int32):
                raise InvalidPositionsError(
                    f"{self._where()}{row}, KV head {h}: positions must be a 1-D integer tensor, got {pos.dtype} of "
                    f"shape {tuple(pos.shape)}"
                )
            out.append(pos.to(device=self.device, dtype=torch.int64))
        # the range and order checks of all heads at once (one sync), the head named on failure
        flat = torch.cat(out)
        starts_new = torch.zeros(flat.numel(), dtype=torch.bool, device=self.device)
        first = np.cumsum([0] + [p.numel() for p in out[:-1]])
        starts_new[torch.as_tensor(first[first < flat.numel()], dtype=torch.int64, device=self.device)] = True
        increasing = (flat[1:] > flat[:-1]) | starts_new[1:]
        if flat.numel() and bool(((flat < 0) | (flat >= n)).any() | ~increasing.all()):
            for h, pos in enumerate(out):
                where = f"{self._where()}{row}, KV head {h}"
                if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n):
                    raise InvalidPositionsError(
                        f"{where}: positions must lie in [0, {n}) (the prompt has {n} tokens), got "
                        f"min {int(pos.min())}, max {int(pos.max())}"
                    )
                if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
                    raise InvalidPositionsError(f"{where}: positions must be strictly increasing (sorted, no duplicates)")
        return out

    def _rows_valid(self, prompts: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[Sequence[Any]]]]) -> bool:
        """One check of every row of every prompt at once (one sync): H_kv 1-D integer position
        tensors per row, each strictly increasing within ``[0, n)`` of its prompt."""
        segments, bounds = [], []
        for keys, _, rows in prompts:
            for row in rows:
                if len(row) != self.num_kv_heads:
                    return False
                for pos in row:
                    pos = torch.as_tensor(pos)
                    if pos.ndim != 1 or pos.dtype not in (torch.int64, torch.int32):
                        return False
                    segments.append(pos.to(device=self.device, dtype=torch.int64))
                    bounds.append(int(keys.shape[-2]))
        lengths = torch.as_tensor([p.numel() for p in segments], dtype=torch.int64, device=self.device)
        flat = torch.cat(segments)
        if not flat.numel():
            return True
        limit = torch.repeat_interleave(torch.as_tensor(bounds, dtype=torch.int64, device=self.device), lengths)
        first = torch.zeros(flat.numel(), dtype=torch.bool, device=self.device)
        offsets = torch.cumsum(lengths, 0) - lengths
        first[offsets[lengths > 0]] = True
        increasing = (flat[1:] > flat[:-1]) | first[1:]
        return not bool(((flat < 0) | (flat >= limit)).any() | ~increasing.all())

    def _pack(self, prompts: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[Sequence[torch.Tensor]]]]) -> None:
        """Pack the rows of kept prompt positions (validated) of one or more prompts: per prompt,
        its ``(1, H_kv, n, d)`` keys and values and its rows; segment s (the s-th (row, head) over
        all prompts, in order) gathers ``keys[0, s % H_kv, positions]`` of its own prompt."""
        heads = self.num_kv_heads
        kept = [pos for _, _, rows in prompts for row in rows for pos in row]
        lengths = [int(p.numel()) for p in kept]
        rooms = [length + self.decode_reserve for length in lengths]
        starts = np.concatenate([[0], np.cumsum(rooms)[:-1]]).astype(int).tolist()
        k_buf = prompts[0][0].new_empty((int(sum(rooms)), self.head_dim))
        v_buf = prompts[0][1].new_empty((int(sum(rooms)), self.head_dim))
        first = 0  # first segment of the current prompt
        for keys, values, rows in prompts:
            count = len(rows) * heads
            segment_kept = kept[first : first + count]
            if sum(lengths[first : first + count]):
                # one gather per prompt (no copy of the whole prompt): (head, position) pairs
                head = torch.cat([torch.full_like(pos, s % heads) for s, pos in enumerate(segment_kept)])
                position = torch.cat(segment_kept)
                target = _segment_rows(starts[first : first + count], lengths[first : first + count], self.device)
                k_buf.index_copy_(0, target, keys[0][head, position].to(k_buf.dtype))
                v_buf.index_copy_(0, target, values[0][head, position].to(v_buf.dtype))
            first += count
        self._k, self._v = k_buf, v_buf
        self._starts, self._lengths, self._rooms = starts, lengths, rooms
        self._prompt_positions = [p.detach().clone() for p in kept]
        self.rows = sum(len(rows) for _, _, rows in prompts)

    def compress(self, positions: Sequence[torch.Tensor]) -> None:
        """Pack the pending prefill, keeping in KV head h only the prompt positions ``positions[h]``.

        Args:
            positions: one 1-D int tensor per KV head (H_kv of them), strictly increasing, in
                [0, n); lengths may differ. Only these tokens are copied; the full prefill
                tensors are released.
        """
        if self._pending is None:
            raise CacheStateError(
                f"{self._where()}: nothing to compress; compress() runs once, right after the prefill's update()"
            )
        keys, values = self._pending
        self._pack([(keys, values, [self._validated_positions(positions, int(keys.shape[-2]))])])
        self._pending = None

    def compress_batch(self, positions: Sequence[Sequence[torch.Tensor]], pads: Sequence[int]) -> None:
        """Pack the pending prefill of a LEFT-PADDED batch of B prompts (``(B, H_kv, n_max, d)``):
        prompt b occupies positions ``pads[b] ..`` of the batch and keeps, in KV head h, its own
        prompt positions ``positions[b][h]`` (in ``[0, n_max - pads[b])``, i.e. without the
        padding). Row b of the layer is prompt b; no padding is stored."""
        if self._pending is None:
            raise CacheStateError(f"{self._where()}: nothing to compress; compress_batch() runs once, right after the prefill")
        keys, values = self._pending
        if len(positions) != keys.shape[0] or len(pads) != keys.shape[0]:
            raise InvalidPositionsError(
                f"{self._where()}: {len(positions)} prompts' positions and {len(pads)} pads for a batch of {keys.shape[0]}"
            )
        prompts = [(keys[b : b + 1, :, pad:], values[b : b + 1, :, pad:], [row]) for b, (pad, row) in enumerate(zip(pads, positions))]
        if not self._rows_valid(prompts):
            for b, (k, _, rows) in enumerate(prompts):
                self._validated_positions(rows[0], int(k.shape[-2]), f", prompt {b}")
            raise InvalidPositionsError(f"{self._where()}: malformed positions")  # not reached: the loop names them
        self._pack([(k, v, [[torch.as_tensor(p).to(self.device, torch.int64) for p in rows[0]]]) for k, v, rows in prompts])
        self._pending = None

    def keep_all(self) -> None:
        """Pack the pending prefill without evicting anything (every head keeps all n tokens)."""
        if self._pending is None:
            raise CacheStateError(f"{self._where()}: nothing to keep; keep_all() runs once, right after the prefill")
        n = int(self._pending[0].shape[-2])
        everything = torch.arange(n, device=self.device)
        self.compress([everything] * self.num_kv_heads)

    def load_rows(
        self, keys: torch.Tensor, values: torch.Tensor, rows: Sequence[Sequence[torch.Tensor] | None]
    ) -> None:
        """Pack R rows from ONE prompt's prefill into an empty layer: row r keeps, in KV head h,
        the prompt positions ``rows[r][h]`` (None: all n). Each row then decodes on its own
        (:meth:`update` with batch R appends one token per row to every head of that row).

        Args:
            keys, values: ``(1, H_kv, n, head_dim)`` post-RoPE prompt states (not modified).
            rows: per row, H_kv 1-D int tensors (strictly increasing, in [0, n)) or None.
        """
        self.load_prompts([(keys, values, rows)])

    def load_prompts(
        self, prompts: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[Sequence[torch.Tensor] | None]]]
    ) -> None:
        """Pack the rows of SEVERAL prompts into an empty layer, prompt after prompt: prompt p gives
        its ``(1, H_kv, n_p, head_dim)`` keys and values and its rows (as :meth:`load_rows`); its
        rows follow those of the prompts before it. No row pays for another prompt's length:
        every (row, KV head) segment holds only what that head of that row keeps.

        The layer has then SEEN the longest prompt (``get_seq_length`` = max n_p): rows of
        different prompts sit at different positions, which the caller feeds explicitly
        (:func:`sparsemm_utils.shared_prefill.decode_batch` does)."""
        if self.is_initialized:
            raise CacheStateError(f"{self._where()}: load_rows() fills an empty layer; call reset() first")
        if not prompts or not all(rows for _, _, rows in prompts):
            raise InvalidPositionsError(f"{self._where()}: load_rows() needs at least one row (per prompt)")
        self._check_states(prompts[0][0], prompts[0][1])
        self.lazy_initialization(prompts[0][0], prompts[0][1])
        checked = []
        for keys, values, rows in prompts:
            self._check_states(keys, values)
            n = int(keys.shape[-2])
            everything = [torch.arange(n, device=self.device)] * self.num_kv_heads
            checked.append((keys, values, [everything if row is None else row for row in rows]))
        if not self._rows_valid(checked):  # name the offending prompt, row and head
            for p, (keys, _, rows) in enumerate(checked):
                where = f", prompt {p}" if len(checked) > 1 else ""
                for r, row in enumerate(rows):
                    self._validated_positions(row, int(keys.shape[-2]), f"{where}, row {r}")
            raise InvalidPositionsError(f"{self._where()}: malformed positions")  # not reached: the loop names them
        self._pack([(k, v, [[torch.as_tensor(p).to(self.device, torch.int64) for p in row] for row in rows]) for k, v, rows in checked])
        self._seen = self.prompt_len = max(int(keys.shape[-2]) for keys, _, _ in prompts)

    # ------------------------------------------------------------------ decode

    def _relayout(self, segments: Sequence[int], rooms: Sequence[int]) -> None:
        """Copy the rows in use of ``segments`` (old indices, in their new order) into fresh
        buffers where segment i gets ``rooms[i]`` rows."""
        lengths = [self._lengths[s] for s in segments]
        starts = np.concatenate([[0], np.cumsum(rooms)[:-1]]).astype(int).tolist() if rooms else []
        capacity = int(sum(rooms))
        k_buf = self._k.new_empty((capacity, self.head_dim))
        v_buf = self._v.new_empty((capacity, self.head_dim))
        if sum(lengths):
            source = _segment_rows([self._starts[s] for s in segments], lengths, self._k.device)
            target = _segment_rows(starts, lengths, self._k.device)
            k_buf.index_copy_(0, target, self._k.index_select(0, source))
            v_buf.index_copy_(0, target, self._v.index_select(0, source))
        self._prompt_positions = [self._prompt_positions[s] for s in segments]
        self._k, self._v = k_buf, v_buf
        self._starts, self._lengths, self._rooms = starts, lengths, list(rooms)

    def _repack(self, needed: int) -> None:
        """Copy every head into a new buffer with ``max(block, needed)`` free rows per head."""
        reserve = max(self.decode_reserve, needed)
        self._relayout(range(len(self._lengths)), [length + reserve for length in self._lengths])
        self.repacks += 1

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        t = int(key_states.shape[-2])
        if any(length + t > room for length, room in zip(self._lengths, self._rooms)):
            self._repack(t)
        rows = torch.tensor(
            [start + length + j for start, length in zip(self._starts, self._lengths) for j in range(t)],
            device=self._k.device,
        )
        # (rows, H_kv, t, d) -> (rows * H_kv * t, d): segment-major like `rows`
        self._k.index_copy_(0, rows, key_states.reshape(-1, self.head_dim).to(self._k.dtype))
        self._v.index_copy_(0, rows, value_states.reshape(-1, self.head_dim).to(self._v.dtype))
        self._lengths = [length + t for length in self._lengths]
        self._seen += t

    def select_rows(self, indices: Sequence[int] | torch.Tensor, *, compact: bool = True) -> None:
        """Keep only the rows ``indices`` (in that order), e.g. to drop finished generations.

        ``compact=True``: the kept rows are compacted into new buffers (each head keeps its free
        decode rows), so the dropped rows' bytes are released now. ``compact=False`` (increasing
        ``indices`` only; others compact anyway): the buffers stay, only the segment table
        forgets the dropped rows, whose bytes stay allocated (counted by :meth:`allocated_bytes`)
        until the next re-pack, or until they outnumber the kept segments' rows, when the layer
        compacts: a decode that drops rows at many steps copies the cache O(log R) times instead
        of once per step."""
        self._require_compressed("select_rows")
        indices = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if len(set(indices)) != len(indices) or any(not 0 <= i < self.rows for i in indices):
            raise ValueError(f"{self._where()}: row indices must be distinct, in [0, {self.rows}), got {indices}")
        heads = self.num_kv_heads
        segments = [r * heads + h for r in indices for h in range(heads)]
        if compact or indices != sorted(indices):
            self._relayout(segments, [self._rooms[s] for s in segments])
        else:
            self._starts = [self._starts[s] for s in segments]
            self._lengths = [self._lengths[s] for s in segments]
            self._rooms = [self._rooms[s] for s in segments]
            self._prompt_positions = [self._prompt_positions[s] for s in segments]
            if int(self._k.shape[0]) > 2 * sum(self._rooms):
                self.compact()
        self.rows = len(indices)

    @property
    def is_contiguous(self) -> bool:
        """True when the segments tile the buffers (no rows of dropped segments between them)."""
        return self._starts == np.concatenate([[0], np.cumsum(self._rooms)[:-1]]).astype(int).tolist() and int(
            self._k.shape[0]
        ) == sum(self._rooms)

    def compact(self) -> None:
        """Release the rows of segments dropped by ``select_rows(..., compact=False)`` (a no-op
        when the segments tile the buffers already)."""
        self._require_compressed("compact")
        if not self.is_contiguous:
            self._relayout(range(len(self._rooms)), self._rooms)

    def _segment(self, head: int, row: int) -> int:
        if not (0 <= head < self.num_kv_heads and 0 <= row < self.rows):
            raise IndexError(f"{self._where()}: no KV head {head} of row {row} ({self.rows} rows x {self.num_kv_heads} heads)")
        return row * self.num_kv_heads + head

    def head_keys(self, head: int, row: int = 0) -> torch.Tensor:
        """The keys KV head ``head`` of row ``row`` stores, ``(length, head_dim)`` (a view, not a copy)."""
        self._require_compressed("head_keys")
        s = self._segment(head, row)
        return self._k[self._starts[s] : self._starts[s] + self._lengths[s]]

    def head_values(self, head: int, row: int = 0) -> torch.Tensor:
        """The values KV head ``head`` of row ``row`` stores, ``(length, head_dim)`` (a view, not a copy)."""
        self._require_compressed("head_values")
        s = self._segment(head, row)
        return self._v[self._starts[s] : self._starts[s] + self._lengths[s]]

    def _require_compressed(self, what: str) -> None:
        if not self.is_compressed:
            raise CacheStateError(f"{self._where()}: {what}() needs a compressed prefill (run the prefill first)")

    def attend(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """Attention of the newest ``q`` tokens of every row over what each KV head of that row stores.

        Query head h reads KV head h // G (G = H / H_kv, as ``repeat_kv`` lays them out). The last
        ``q`` stored tokens of each head are the queries' own tokens (appended by the update just
        before), so query i sees the head's older tokens and new tokens 0..i (causal).

        Args:
            query: ``(rows, H, q, head_dim)``, post-RoPE.
            scaling: softmax scale (default head_dim ** -0.5).

        Returns:
            ``(rows, q, H, head_dim)``, the layout transformers' attention functions return.
        """
        self._require_compressed("attend")
        if query.ndim != 4 or query.shape[0] != self.rows:
            raise UnsupportedBatchError(
                f"{self._where()}: query must be ({self.rows}, heads, q, head_dim) (one row per cached row), got "
                f"{tuple(query.shape)}"
            )
        rows, heads, q_len, dim = query.shape
        if heads % self.num_kv_heads:
            raise ValueError(f"{self._where()}: {heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        group = heads // self.num_kv_heads
        out = query.new_empty((rows, heads, q_len, dim))
        for row in range(rows):
            for h in range(self.num_kv_heads):
                length = self._lengths[self._segment(h, row)]
                keys = self.head_keys(h, row)[None, None]  # (1, 1, length, d)
                values = self.head_values(h, row)[None, None]
                # the G query heads of this group become G * q query rows against one KV head
                rows_q = query[row, h * group : (h + 1) * group].reshape(1, 1, group * q_len, dim)
                mask = None
                if q_len > 1:  # new token i sees keys 0 .. length - q + i
                    visible = torch.arange(length, device=query.device)[None, :] <= (
                        length - q_len + torch.arange(q_len, device=query.device)[:, None]
                    )
                    mask = visible.repeat(group, 1)
                o = F.scaled_dot_product_attention(rows_q, keys, values, attn_mask=mask, scale=scaling)
                out[row, h * group : (h + 1) * group] = o.view(group, q_len, dim)
        return out.transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ accounting

    def lengths(self) -> list[int]:
        """Tokens each KV head stores now (kept prompt tokens + generated ones): H_kv ints for one
        row, rows x H_kv ints (row-major) for several (:meth:`row_lengths` shapes them).
        Before compression: the pending prompt length for every head."""
        if self._pending is not None:
            return [self.prompt_len] * self.num_kv_heads
        return list(self._lengths)

    def row_lengths(self) -> np.ndarray:
        """Tokens each KV head of each row stores now, int64 (rows, H_kv)."""
        self._require_compressed("row_lengths")
        return np.array(self._lengths, dtype=np.int64).reshape(self.rows, self.num_kv_heads)

    def prompt_positions(self, row: int = 0) -> list[torch.Tensor]:
        """Prompt positions each KV head of row ``row`` kept at compression, H_kv sorted int64 tensors
        (generated tokens, at positions n, n + 1, ..., are kept by every head and not listed)."""
        self._require_compressed("prompt_positions")
        return [self._prompt_positions[self._segment(h, row)] for h in range(self.num_kv_heads)]

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size() if self.is_initialized else 0

    def kv_bytes(self) -> int:
        """docs/method.md §7: sum over KV heads (of every row) of stored tokens x head_dim x 2 x element size."""
        return sum(self.lengths()) * self.head_dim * 2 * self._element_size()

    def row_kv_bytes(self) -> np.ndarray:
        """:meth:`kv_bytes` of each row, int64 (rows,)."""
        return self.row_lengths().sum(axis=1) * self.head_dim * 2 * self._element_size()

    def allocated_bytes(self) -> int:
        """Bytes the layer's buffers occupy: stored rows + the unused decode reserve (or, before
        compression, the full prefill tensors it holds)."""
        if self._pending is not None:
            return sum(t.numel() * t.element_size() for t in self._pending)
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def slack_bytes(self) -> int:
        """Reserved but unused bytes: :meth:`allocated_bytes` - :meth:`kv_bytes`."""
        return self.allocated_bytes() - self.kv_bytes()

    # ------------------------------------------------------------------ CacheLayerMixin

    def get_seq_length(self) -> int:
        """Tokens SEEN (prompt + generated), not kept: positions and ``generate`` rely on it. Rows
        decode in lockstep, so every row has seen as many."""
        return self._seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the LOGICAL sequence, as a full cache would report them. The
        mask built from it is used at prefill only (full keys); :meth:`attend` builds its own."""
        return self._seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        raise UnsupportedCacheOperationError("the per-head KV cache does not support offloading")

    def prefetch(self) -> None:
        raise UnsupportedCacheOperationError("the per-head KV cache does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise UnsupportedCacheOperationError(
                "the per-head KV cache cannot be cropped (assisted decoding / speculative rollback are not supported)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedCacheOperationError("the per-head KV cache does not support beam search: use num_beams=1")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise UnsupportedCacheOperationError(
                f"the per-head KV cache cannot repeat its rows {repeats} times "
                "(num_return_sequences / num_beams must be 1)"
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (:meth:`select_rows`)."""
        self.select_rows(indices)

    def __repr__(self) -> str:
        state = "pending prefill" if self._pending is not None else ("compressed" if self.is_compressed else "empty")
        rows = f", rows={self.rows}" if self.rows > 1 else ""
        return f"PerHeadKVLayer(layer={self.layer_idx}, {state}{rows}, lengths={self.lengths() if self.is_initialized else []})"


# ----------------------------------------------------------------------------------------- cache


class _PackedCache(Cache):
    """What the per-head caches share: a transformers ``Cache`` of :class:`PerHeadKVLayer`, one per
    decoder layer, and its byte accounting (docs/method.md §7)."""

    def _require_all_initialized(self, what: str) -> None:
        missing = [i for i, layer in enumerate(self.layers) if not layer.is_initialized]
        if missing:
            raise CacheStateError(f"{what}(): layers {missing} hold nothing yet (run a prefill first)")

    def kv_bytes(self) -> int:
        """docs/method.md §7: sum over layers and KV heads of stored tokens x head_dim x 2 x element size."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes the buffers occupy, decode reserve included."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def slack_bytes(self) -> int:
        """Reserved but unused bytes (the decode reserve not yet filled)."""
        return self.allocated_bytes() - self.kv_bytes()

    @property
    def repacks(self) -> int:
        """Re-packings over all layers (a head ran out of decode reserve)."""
        return sum(layer.repacks for layer in self.layers)


class PerHeadKVCache(_PackedCache):
    """A transformers ``Cache`` of :class:`PerHeadKVLayer`, one per decoder layer of the language model,
    holding one prompt (batch size 1), or ``prefill_batch`` prompts of a left-padded ``generate``
    batch (one row each, :meth:`PerHeadKVLayer.compress_batch`; the accounting methods then report
    every row's heads flattened, and :meth:`PerHeadKVLayer.row_lengths` per row).

    Pass it to ``model.generate(past_key_values=cache)`` together with the per-head attention
    function (``sparsemm_utils.compression.compressed_generate`` does both). Shapes reported by
    the accounting methods are (layers, kv_heads).
    """

    def __init__(self, num_layers: int, *, decode_reserve: int = DECODE_BLOCK, prefill_batch: int = 1):
        num_layers = check_int("num_layers", num_layers, 1)
        super().__init__(
            layers=[PerHeadKVLayer(decode_reserve, layer_idx=i, prefill_batch=prefill_batch) for i in range(num_layers)]
        )

    @classmethod
    def from_config(cls, config: Any, *, decode_reserve: int = DECODE_BLOCK) -> PerHeadKVCache:
        """One layer per decoder layer of ``config``'s text config (``num_hidden_layers``)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(text.num_hidden_layers, decode_reserve=decode_reserve)

    def stored_tokens(self) -> np.ndarray:
        """Tokens each KV head stores now, int64 (layers, kv_heads)."""
        self._require_all_initialized("stored_tokens")
        return np.array([layer.lengths() for layer in self.layers], dtype=np.int64)

    def kept_prompt_tokens(self) -> np.ndarray:
        """Prompt tokens each KV head kept at compression, int64 (layers, kv_heads)."""
        self._require_all_initialized("kept_prompt_tokens")
        return np.array([[p.numel() for p in layer.prompt_positions()] for layer in self.layers], dtype=np.int64)


class BatchedPerHeadKVCache(_PackedCache):
    """R rows decoding side by side: row r is what one method kept of one prompt's shared prefill
    (:mod:`sparsemm_utils.shared_prefill`), with its own number of tokens in every (layer, KV
    head); the rows may come from several prompts of different lengths. Each
    :class:`PerHeadKVLayer` packs segment (row, head) without padding, so no head pays for
    another's length in what is stored; decode steps append one token to every head of every
    row; :meth:`select_rows` drops finished rows (and releases their bytes, at once or amortised).

    Build it with :meth:`from_prefill` (one prompt) or :meth:`from_prefills` (several). Shapes
    reported by the accounting methods are (rows, layers, kv_heads); rows decode in lockstep, each
    at its own prompt's positions, which the caller feeds (``get_seq_length`` is the longest
    prompt's count).
    """

    def __init__(self, num_layers: int, *, decode_reserve: int = DECODE_BLOCK):
        num_layers = check_int("num_layers", num_layers, 1)
        super().__init__(layers=[PerHeadKVLayer(decode_reserve, layer_idx=i) for i in range(num_layers)])

    @classmethod
    def from_prefill(
        cls,
        states: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows: Sequence[Sequence[Sequence[torch.Tensor] | None]],
        *,
        decode_reserve: int = DECODE_BLOCK,
    ) -> BatchedPerHeadKVCache:
        """One cache row per entry of ``rows``, all from the same prompt.

        Args:
            states: per layer, the prompt's post-RoPE ``(keys, values)``, each ``(1, H_kv, n, d)``.
            rows: per row, per layer, H_kv sorted position tensors (what each KV head keeps) or
                None (the layer keeps all n tokens in every head).
            decode_reserve: free rows per (row, KV head) for the tokens generated next, granted
                again whenever a head runs out (the block; :func:`decode_reserve_for`).
        """
        return cls.from_prefills([(states, rows)], decode_reserve=decode_reserve)

    @classmethod
    def from_prefills(
        cls,
        prompts: Sequence[tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], Sequence[Sequence[Sequence[torch.Tensor] | None]]]],
        *,
        decode_reserve: int = DECODE_BLOCK,
    ) -> BatchedPerHeadKVCache:
        """The rows of several prompts, prompt after prompt: per prompt, its ``states`` and ``rows``
        as :meth:`from_prefill` takes them (prompts may differ in length n_p; every (row, layer,
        KV head) stores only what it keeps, :meth:`PerHeadKVLayer.load_prompts`)."""
        if not prompts or not all(rows for _, rows in prompts):
            raise InvalidPositionsError("a batched cache needs at least one row (per prompt)")
        num_layers = len(prompts[0][0])
        for p, (states, rows) in enumerate(prompts):
            if len(states) != num_layers:
                raise InvalidPositionsError(f"prompt {p} has states of {len(states)} layers, prompt 0 of {num_layers}")
            for r, row in enumerate(rows):
                if len(row) != num_layers:
                    raise InvalidPositionsError(f"row {r} gives positions for {len(row)} layers, the prompt has {num_layers}")
        cache = cls(num_layers, decode_reserve=decode_reserve)
        for layer_idx, layer in enumerate(cache.layers):
            layer.load_prompts(
                [(states[layer_idx][0], states[layer_idx][1], [row[layer_idx] for row in rows]) for states, rows in prompts]
            )
        return cache

    @property
    def rows(self) -> int:
        """Rows the cache holds now."""
        return self.layers[0].rows

    def stored_tokens(self) -> np.ndarray:
        """Tokens each KV head of each row stores now, int64 (rows, layers, kv_heads)."""
        self._require_all_initialized("stored_tokens")
        return np.stack([layer.row_lengths() for layer in self.layers], axis=1)

    def kept_prompt_tokens(self) -> np.ndarray:
        """Prompt tokens each KV head of each row kept, int64 (rows, layers, kv_heads)."""
        self._require_all_initialized("kept_prompt_tokens")
        return np.array(
            [[[p.numel() for p in layer.prompt_positions(r)] for layer in self.layers] for r in range(self.rows)],
            dtype=np.int64,
        ).reshape(self.rows, len(self.layers), self.layers[0].num_kv_heads)

    def row_kv_bytes(self) -> np.ndarray:
        """docs/method.md §7's KV bytes of each row, int64 (rows,); they sum to :meth:`kv_bytes`."""
        return np.sum([layer.row_kv_bytes() for layer in self.layers], axis=0).astype(np.int64)

    def select_rows(self, indices: Sequence[int] | torch.Tensor, *, compact: bool = True) -> None:
        """Keep only the rows ``indices`` (in that order) in every layer (:meth:`PerHeadKVLayer.select_rows`)."""
        for layer in self.layers:
            layer.select_rows(indices, compact=compact)
