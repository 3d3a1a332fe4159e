"""Capture each decode step's attention row without materialising N x N attention (docs/method.md §4).

The visual-head rule of docs/method.md §4 looks, for every generated token t, at ONE attention row
per (layer, query head): the row of the query that produced t. Token t_0 comes out of the
prefill, so its query is the last prompt position; token t_i (i > 0) comes out of decode step i,
whose single query is t_{i-1}. Everything else the reference path computes (``eager`` attention
with ``output_attentions=True``: a (batch, heads, N, N) tensor per layer at prefill) is thrown
away by the rule. This module keeps only what the rule needs:

- :func:`row_capture_attention` is an attention function registered with transformers'
  ``AttentionInterface`` under :data:`ROW_CAPTURE_ATTENTION` and applied to the LANGUAGE model only
  (the vision tower keeps ``sdpa``; :mod:`sparsemm_utils.attention_hooks`). It computes
  the layer's output with ``sdpa`` (memory linear in N on the prefill) and, while a
  :class:`RowRecorder` is active (:func:`recording`, i.e. :data:`ROW_CAPTURE_HOOK`), the softmax row of the LAST query of the
  call, (heads, N): O(H * N) memory instead of O(H * N^2). The row is reduced at once (argmax,
  top-k positions, attention mass on the image, optionally the image slice) so nothing of size N
  outlives the call.
- The reference path (:func:`generate_with_rows` with ``method="reference"``) switches the language
  model to ``eager``, generates with ``output_attentions=True`` and feeds the last row of every
  returned attention tensor through the same :class:`RowRecorder`, so both paths produce the same
  :class:`CapturedAttention` and can be compared number for number.

Both paths run ``generate()`` with the prefill's KV cache: decode step i attends to the
``prompt_len + i`` keys of the prompt and the tokens before it. The original's issue #10 was
scoring decode steps run WITHOUT that cache (each step saw only itself); every capture records
the key length of each step and :meth:`CapturedAttention.check_key_lengths` rejects a capture that
did not attend to the whole prefix.

Shapes: ``T`` generated tokens, ``L`` text layers, ``H`` QUERY heads (GQA models: one row per
query head, the KV head is shared within a group), ``N_t`` keys at step t, ``k`` top positions.
The original scoring scripts generate one prompt at a time; :func:`generate_batch_with_rows` runs
B prompts as one left-padded batch and gives each prompt the capture it has alone
(:class:`BatchRowRecorder`: each row without its padding keys, and only the steps up to the
prompt's own end of sequence; docs/deviations.md "Several documents at once").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sparsemm_utils.attention_hooks import (
    SELECTION_DTYPES,
    AttentionFunction,
    AttentionHook,
    original_attention_logits,
    text_attention,
)
from sparsemm_utils.models import LoadedModel
from sparsemm_utils.validate import check_choice, check_int, is_int

__all__ = [
    "ROW_CAPTURE_ATTENTION",
    "CAPTURE_METHODS",
    "AttentionCaptureError",
    "CaptureShapeError",
    "MissingPrefillCacheError",
    "CaptureSpec",
    "CapturedAttention",
    "RowRecorder",
    "BatchRowRecorder",
    "last_query_attention",
    "row_capture_attention",
    "ROW_CAPTURE_HOOK",
    "register_row_capture",
    "recording",
    "active_recorder",
    "record_eager_attentions",
    "generate_with_rows",
    "generate_batch_with_rows",
    "stop_token_ids",
]

#: Name under which :func:`row_capture_attention` is registered (AttentionInterface + mask "sdpa").
ROW_CAPTURE_ATTENTION = "sparsemm_row_capture"
#: ``"streamed"``: the row capture (default); ``"reference"``: eager + output_attentions.
CAPTURE_METHODS: tuple[str, ...] = ("streamed", "reference")

CaptureMethod = Literal["streamed", "reference"]


class AttentionCaptureError(RuntimeError):
    """The attention rows could not be captured as the scoring rule needs them."""


class CaptureShapeError(AttentionCaptureError, ValueError):
    """A row or a capture has the wrong shape (batch > 1, wrong head count, layers out of step)."""


class MissingPrefillCacheError(AttentionCaptureError):
    """A decode step did not attend to the whole prefix: generation ran without the prefill's KV
    cache (the original's issue #10), so its attention rows cannot be scored."""


# ----------------------------------------------------------------------------------- the row


def last_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    selection_dtype: str = "float32",
) -> torch.Tensor:
    """Softmax attention row of the LAST query of a call, per query head: (batch, H, N).

    ``query`` (batch, H, q, d) post-RoPE; ``key`` (batch, H_kv, N, d) as the cache returned it
    (H a multiple of H_kv: query head h reads KV head h // (H / H_kv), as ``repeat_kv`` lays it
    out, without copying the keys); ``attention_mask`` None (no masking: the last query of a
    causal call sees every key), boolean (batch, 1, q, N) with True = attend (the ``sdpa`` mask),
    or additive float (batch, 1, q, N) (the ``eager`` mask); ``scaling`` defaults to d ** -0.5.

    ``selection_dtype="float32"`` (the default): Q K^T * scaling in the model's dtype, mask,
    softmax in float32, and the row stays float32 (so a bf16 model's rounding ties do not occur).
    ``"model"``: as the original's eager attention (LLaVA-NeXT's ``modeling_llama.py``, the
    Qwen2-VL of its time): Q K^T / sqrt(d) in the model's dtype
    (:func:`~sparsemm_utils.attention_hooks.original_attention_logits`), mask, softmax in float32
    cast back to the model's dtype; the hit rule then ranks that row (docs/method.md §4,
    docs/deviations.md "Selection scores").
    """
    check_choice("selection_dtype", selection_dtype, SELECTION_DTYPES)
    if query.ndim != 4 or key.ndim != 4:
        raise CaptureShapeError(
            f"query and key must be (batch, heads, seq, head_dim), got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    batch, heads, _, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != dim or heads % kv_heads:
        raise CaptureShapeError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} do not fit together: same batch and head_dim, "
            f"and query heads ({heads}) a multiple of KV heads ({kv_heads}) are required"
        )
    scale = dim**-0.5 if scaling is None else scaling
    group = heads // kv_heads
    last = query[:, :, -1, :].reshape(batch, kv_heads, group, dim)
    if selection_dtype == "model":
        keys = key[:, :, None].expand(batch, kv_heads, group, n_keys, dim).reshape(batch, heads, n_keys, dim)
        logits = original_attention_logits(query[:, :, -1:, :], keys, scaling).reshape(batch, heads, n_keys)
    else:
        logits = (torch.matmul(last, key.transpose(-1, -2)) * scale).reshape(batch, heads, n_keys).float()
    if attention_mask is not None:
        mask_row = attention_mask[:, :, -1, :]  # (batch, 1, N), broadcast over heads
        if mask_row.shape[-1] != n_keys:
            mask_row = mask_row[..., :n_keys]
        if mask_row.dtype == torch.bool:
            logits = logits.masked_fill(~mask_row, float("-inf"))
        else:
            logits = logits + mask_row.to(logits.dtype)
    if selection_dtype == "model":
        return torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.softmax(logits, dim=-1)


# ------------------------------------------------------------------------------ the recorder


@dataclass(frozen=True)
class CaptureSpec:
    """What a :class:`RowRecorder` keeps of each row (one row = (H, N_t) for one layer and step).

    ``top_k``: how many top positions per head to keep (sorted by weight, descending; the argmax
    is always kept separately, first maximum on ties with ``selection_dtype="float32"``). ``image_span``: ``(start, count)`` of the
    image tokens (absolute positions); with it, the attention mass on the image per head is
    recorded. ``image_steps``: keep the image slice of the row, (H, count) as float16, for the
    first ``image_steps`` tokens (0: none): the explorer's data. ``keep_rows``: keep every full
    row as float32 (tests and tiny inputs only: it is the N x T memory this module avoids).
    ``selection_dtype``: the dtype the streamed rows are computed in (:func:`last_query_attention`:
    ``"float32"``, or ``"model"`` as the original's eager attention, whose argmax is then taken as
    the original takes it, ``topk(1)``, which on a tie may pick another maximum than the first).
    """

    top_k: int = 1
    image_span: tuple[int, int] | None = None
    image_steps: int = 0
    keep_rows: bool = False
    selection_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int("top_k", self.top_k, 1)
        check_choice("selection_dtype", self.selection_dtype, SELECTION_DTYPES)
        if self.image_span is not None:
            span = tuple(self.image_span)
            if len(span) != 2 or not all(is_int(v) for v in span):
                raise ValueError(f"image_span must be (start, count) ints, got {self.image_span!r}")
            if span[0] < 0 or span[1] < 1:
                raise ValueError(f"image_span needs start >= 0 and count >= 1, got {self.image_span!r}")
            object.__setattr__(self, "image_span", (int(span[0]), int(span[1])))
        check_int("image_steps", self.image_steps, 0)
        if self.image_steps and self.image_span is None:
            raise ValueError("image_steps > 0 needs image_span=(start, count) to know which keys are the image")


@dataclass
class CapturedAttention:
    """What the rule needs of the attention rows of T generated tokens (see module docstring).

    - ``argmax`` int64 (T, L, H): absolute key position of each head's largest weight.
    - ``top_positions`` int64 (T, L, H, k) and ``top_weights`` float32 (T, L, H, k): the k largest,
      descending.
    - ``key_lengths`` int64 (T,): N_t, the keys the query of step t attended to.
    - ``image_mass`` float32 (T, L, H) or None: attention weight summed over the image tokens.
    - ``image_attention`` float16 (T', L, H, n_img) or None: the image slice of the rows of the
      first T' = min(T, image_steps) tokens.
    - ``rows``: list of T float32 arrays (L, H, N_t) when ``keep_rows`` was set, else None.
    """

    argmax: np.ndarray
    top_positions: np.ndarray
    top_weights: np.ndarray
    key_lengths: np.ndarray
    image_mass: np.ndarray | None = None
    image_attention: np.ndarray | None = None
    rows: list[np.ndarray] | None = None
    image_span: tuple[int, int] | None = None

    @property
    def num_steps(self) -> int:
        return int(self.argmax.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, query heads)."""
        return int(self.argmax.shape[1]), int(self.argmax.shape[2])

    def check_key_lengths(self, prompt_len: int) -> None:
        """Raise :class:`MissingPrefillCacheError` unless step t attended to ``prompt_len + t`` keys
        (the prompt and every generated token before t): the prefill's KV cache was used."""
        expected = int(prompt_len) + np.arange(self.num_steps)
        if self.key_lengths.shape != expected.shape or not np.array_equal(self.key_lengths, expected):
            bad = int(np.flatnonzero(self.key_lengths != expected)[0]) if self.key_lengths.shape == expected.shape else 0
            got = self.key_lengths[bad] if self.key_lengths.size else None
            raise MissingPrefillCacheError(
                f"step {bad} attended to {got} keys, expected {expected[bad] if expected.size else '?'} "
                f"(prompt of {prompt_len} tokens + {bad} generated): decoding did not use the prefill's KV cache, "
                "the bug of the original's issue #10. Generate with use_cache=True and the cache the prefill "
                "returned (generate_with_rows does)."
            )


class RowRecorder:
    """Collects the reduced attention rows of one generation (batch 1), layer by layer.

    ``add(layer_idx, row)`` is called once per layer per forward pass, in any layer order; the
    t-th call for a layer belongs to step t. :meth:`finish` checks that every layer saw the same
    number of steps and stacks the results into a :class:`CapturedAttention`.
    """

    def __init__(self, num_layers: int, num_heads: int, spec: CaptureSpec | None = None):
        check_int("num_layers", num_layers, 1)
        check_int("num_heads", num_heads, 1)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.spec = spec or CaptureSpec()
        self._argmax: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._top_pos: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._top_w: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._lengths: list[list[int]] = [[] for _ in range(self.num_layers)]
        self._mass: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._image: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._rows: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def add(self, layer_idx: int, row: torch.Tensor) -> None:
        """Record one row: ``row`` (H, N) or (1, H, N) float attention weights of the last query."""
        if row.ndim == 3:
            if row.shape[0] != 1:
                raise CaptureShapeError(
                    f"the scoring capture supports batch size 1 (as the original scripts), got a row batch of {row.shape[0]}"
                )
            row = row[0]
        if row.ndim != 2 or row.shape[0] != self.num_heads:
            raise CaptureShapeError(
                f"expected a row of shape ({self.num_heads}, N) (one per query head), got {tuple(row.shape)}"
            )
        if not 0 <= layer_idx < self.num_layers:
            raise CaptureShapeError(f"layer_idx {layer_idx} is outside 0..{self.num_layers - 1}")
        row = row.detach()
        n_keys = int(row.shape[-1])
        k = min(self.spec.top_k, n_keys)
        weights, positions = torch.topk(row, k, dim=-1)
        if k < self.spec.top_k:  # fewer keys than k: pad with -1 (never a position)
            pad = self.spec.top_k - k
            positions = torch.cat([positions, positions.new_full((self.num_heads, pad), -1)], dim=-1)
            weights = torch.cat([weights, weights.new_zeros((self.num_heads, pad))], dim=-1)
        if self.spec.selection_dtype == "model":  # the original's hit rule ranks with topk(1): its choice on ties
            best = torch.topk(row, 1, dim=-1).indices[:, 0]
        else:
            best = torch.argmax(row, dim=-1)
        self._argmax[layer_idx].append(best)
        self._top_pos[layer_idx].append(positions)
        self._top_w[layer_idx].append(weights.float())
        self._lengths[layer_idx].append(n_keys)
        if self.spec.image_span is not None:
            start, count = self.spec.image_span
            if start + count > n_keys:
                raise CaptureShapeError(
                    f"image_span {self.spec.image_span} reaches beyond the {n_keys} keys of the row: the span must "
                    "come from this prompt (prompts.image_token_span)"
                )
            image = row[:, start : start + count]
            self._mass[layer_idx].append(image.float().sum(dim=-1))
            if len(self._image[layer_idx]) < self.spec.image_steps:
                self._image[layer_idx].append(image.to(torch.float16))
        if self.spec.keep_rows:
            self._rows[layer_idx].append(row.float().cpu())

    @property
    def selection_dtype(self) -> str:
        """The dtype the rows are computed in (``spec.selection_dtype``)."""
        return self.spec.selection_dtype

    @property
    def steps_recorded(self) -> int:
        """Rows recorded for layer 0 so far."""
        return len(self._argmax[0])

    def finish(self, steps: int | None = None) -> CapturedAttention:
        """Stack everything into a :class:`CapturedAttention` (numpy, on the CPU).

        ``steps``: keep only the first ``steps`` steps of every layer (None: all). A prompt of a
        batch that reached its end of sequence before the others keeps running through the
        batch's forward passes; its later rows are not its own and are dropped here."""
        if steps is not None:
            check_int("steps", steps, 0)
            if steps > self.steps_recorded:
                raise CaptureShapeError(f"cannot keep {steps} steps: {self.steps_recorded} were recorded")
            for lists in (self._argmax, self._top_pos, self._top_w, self._lengths, self._mass, self._image, self._rows):
                for layer in lists:
                    del layer[steps:]
        counts = [len(a) for a in self._argmax]
        if len(set(counts)) != 1:
            raise CaptureShapeError(
                f"layers recorded different numbers of steps ({counts}): a forward pass was interrupted or the "
                "recorder was shared between generations; use one RowRecorder per generation"
            )
        steps = counts[0]
        lengths = np.asarray(self._lengths, dtype=np.int64).reshape(self.num_layers, steps)
        if steps and not (lengths == lengths[0]).all():
            raise CaptureShapeError(f"layers saw different key lengths at the same step: {lengths.tolist()}")
        k = self.spec.top_k

        def stack(per_layer: list[list[torch.Tensor]], trailing: tuple[int, ...], dtype: Any) -> np.ndarray:
            if steps == 0 or not per_layer[0]:
                return np.zeros((len(per_layer[0]), self.num_layers, self.num_heads) + trailing, dtype=dtype)
            out = torch.stack([torch.stack(layer) for layer in per_layer], dim=1)  # (T, L, H, ...)
            return out.cpu().numpy().astype(dtype, copy=False)

        image_mass = image = None
        if self.spec.image_span is not None:
            image_mass = stack(self._mass, (), np.float32)
            if self.spec.image_steps:
                image = stack(self._image, (self.spec.image_span[1],), np.float16)
        rows = None
        if self.spec.keep_rows:
            rows = [np.stack([self._rows[layer][t].numpy() for layer in range(self.num_layers)]) for t in range(steps)]
        return CapturedAttention(
            argmax=stack(self._argmax, (), np.int64),
            top_positions=stack(self._top_pos, (k,), np.int64),
            top_weights=stack(self._top_w, (k,), np.float32),
            key_lengths=lengths[0] if steps else np.zeros(0, dtype=np.int64),
            image_mass=image_mass,
            image_attention=image,
            rows=rows,
            image_span=self.spec.image_span,
        )


class BatchRowRecorder:
    """Hands the rows of a left-padded batch of B prompts to one :class:`RowRecorder` each.

    ``pads[b]``: the padding positions on the left of prompt b (``attention_mask`` is 0 there).
    :meth:`add` takes a (B, H, N) row and gives recorder b ``row[b, :, pads[b]:]``, (H, N - pads[b]):
    the padding keys are masked out of the softmax (weight 0), and dropping them puts every key at
    the absolute position it has in prompt b alone, so image spans, argmax and top-k positions and
    key lengths are those of batch 1 (docs/method.md §4). Each recorder keeps its own
    :class:`CaptureSpec` (image span, explorer steps); they share one ``selection_dtype``.
    """

    def __init__(self, recorders: Sequence[RowRecorder], pads: Sequence[int]):
        if not recorders or len(recorders) != len(pads):
            raise CaptureShapeError(f"one pad per recorder is required, got {len(recorders)} recorders and {len(pads)} pads")
        dtypes = {r.selection_dtype for r in recorders}
        shapes = {(r.num_layers, r.num_heads) for r in recorders}
        if len(dtypes) != 1 or len(shapes) != 1:
            raise CaptureShapeError(
                f"the recorders of one batch need one selection_dtype and one (layers, heads), got {dtypes} and {shapes}"
            )
        self.recorders = list(recorders)
        self.pads = [check_int("pad", p, 0) for p in pads]
        self.num_layers, self.num_heads = shapes.pop()
        self.selection_dtype = dtypes.pop()

    def add(self, layer_idx: int, row: torch.Tensor) -> None:
        """Record one batch row: ``row`` (B, H, N) attention weights of each prompt's last query."""
        if row.ndim != 3 or row.shape[0] != len(self.recorders):
            raise CaptureShapeError(f"expected a row of shape ({len(self.recorders)}, H, N), got {tuple(row.shape)}")
        for recorder, pad, sample in zip(self.recorders, self.pads, row):
            recorder.add(layer_idx, sample[:, pad:])


#: What :func:`row_capture_attention` feeds: one prompt's recorder or a batch's.
Recorder = RowRecorder | BatchRowRecorder

#: The recorder :func:`row_capture_attention` feeds. Without one the function is plain sdpa, so
#: there is no "no active recorder" error; blocks nest (the inner recorder wins).
ROW_CAPTURE_HOOK: AttentionHook[Recorder] = AttentionHook(
    "sparsemm_row_recorder",
    context="a recording() block",
    usage="wrap the forward/generate call in `with sparsemm_utils.attention_capture.recording(recorder):`",
)


def active_recorder() -> Recorder | None:
    """The recorder :func:`row_capture_attention` currently feeds, or None."""
    return ROW_CAPTURE_HOOK.current()


def recording(recorder: Recorder) -> AbstractContextManager[Recorder]:
    """Make ``recorder`` receive the rows of every :func:`row_capture_attention` call inside the
    block (``generate()`` rejects unknown kwargs, so per-call state travels this way)."""
    return ROW_CAPTURE_HOOK.activate(recorder)


# ----------------------------------------------------------------- the attention function


def _record_row(
    recorder: Recorder,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> None:
    with torch.no_grad():
        row = last_query_attention(query, key, attention_mask, scaling=scaling, selection_dtype=recorder.selection_dtype)
    recorder.add(layer_idx, row)


row_capture_attention: AttentionFunction = ROW_CAPTURE_HOOK.observing_sdpa(
    _record_row,
    name="row_capture_attention",
    doc="""``sdpa`` attention that also hands the last query's row to the active :class:`RowRecorder`.

    Signature of transformers' ``AttentionInterface``: ``query`` (batch, H, q, d) post-RoPE,
    ``key``/``value`` (batch, H_kv, N, d) as the cache returned them, ``attention_mask`` as the
    ``sdpa`` mask function built it (None or boolean). Returns ``(output, None)`` exactly as
    ``sdpa_attention_forward`` does; without an active recorder it IS sdpa.
    """,
)


def register_row_capture() -> str:
    """Register :func:`row_capture_attention` (with the ``sdpa`` mask function) and return its name.
    Idempotent."""
    return ROW_CAPTURE_HOOK.register(ROW_CAPTURE_ATTENTION, row_capture_attention)


# ------------------------------------------------------------------------------ generation


def record_eager_attentions(attentions: Sequence[Sequence[torch.Tensor]], recorder: Recorder) -> Recorder:
    """Feed ``generate(..., output_attentions=True, return_dict_in_generate=True).attentions`` (one
    tuple per generated token of one (batch, H, q, N) tensor per layer) to ``recorder``: the last
    query row of each. The reference path of :func:`generate_with_rows`."""
    for step in attentions:
        if len(step) != recorder.num_layers:
            raise CaptureShapeError(
                f"a generation step returned attentions for {len(step)} layers, the recorder expects {recorder.num_layers}"
            )
        for layer_idx, weights in enumerate(step):
            recorder.add(layer_idx, weights[:, :, -1, :].float())
    return recorder


def _stop_ids(model: torch.nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generate_with_rows(
    loaded: LoadedModel,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int,
    spec: CaptureSpec | None = None,
    method: CaptureMethod = "streamed",
) -> tuple[np.ndarray, CapturedAttention]:
    """Greedy generation (docs/method.md §2) with the attention rows of every generated token.

    ``inputs``: one prompt (batch 1) from :func:`sparsemm_utils.prompts.build_inputs`.
    ``method``: ``"streamed"`` (the row capture, memory linear in N) or ``"reference"`` (eager +
    ``output_attentions``: the (H, N, N) prefill attention of every layer is materialised).
    Returns the generated token ids (T,) int64 (the end-of-sequence token included when generation
    stopped on it) and their rows' :class:`CapturedAttention` (T steps; step t is the query that
    produced token t). The language model's attention implementation is restored afterwards.
    Raises :class:`MissingPrefillCacheError` if a step did not attend to the whole prefix.
    """
    input_ids = inputs["input_ids"]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise CaptureShapeError(
            f"one prompt at a time: input_ids must be (1, n), got {tuple(input_ids.shape)} (the rule is per sample; "
            "generate_batch_with_rows takes a batch)"
        )
    return generate_batch_with_rows(loaded, inputs, max_new_tokens=max_new_tokens, specs=[spec or CaptureSpec()], method=method)[0]


def generate_batch_with_rows(
    loaded: LoadedModel,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int,
    specs: Sequence[CaptureSpec],
    method: CaptureMethod = "streamed",
) -> list[tuple[np.ndarray, CapturedAttention]]:
    """:func:`generate_with_rows` for B prompts at once, one left-padded batch through ``generate``.

    ``inputs``: B prompts as :func:`sparsemm_utils.prompts.batch_inputs` pads them,
    ``input_ids`` / ``attention_mask`` (B, n_max) with prompt b right-aligned after ``pads[b] =
    n_max - attention_mask[b].sum()`` padding positions (one prompt: as :func:`build_inputs`
    returns it, no mask needed). ``specs[b]``: what to keep of prompt b's rows, its image span in
    prompt b's own positions. Returns, per prompt, its generated ids (T_b,) int64, ending at its
    first end-of-sequence token (later tokens are the batch's padding), and the
    :class:`CapturedAttention` of those T_b steps, each row without the padding keys
    (:class:`BatchRowRecorder`): the capture prompt b has alone, up to the rounding of matrix
    products over a padded batch. Raises :class:`MissingPrefillCacheError` if a step of a prompt
    did not attend to its whole prefix.
    """
    check_choice("method", method, CAPTURE_METHODS)
    check_int("max_new_tokens", max_new_tokens, 1)
    input_ids = inputs["input_ids"]
    batch = len(specs)
    if input_ids.ndim != 2 or input_ids.shape[0] != batch:
        raise CaptureShapeError(f"input_ids must be ({batch}, n), one prompt per spec, got {tuple(input_ids.shape)}")
    width = int(input_ids.shape[1])
    mask = inputs.get("attention_mask")
    if batch > 1 and mask is None:
        raise CaptureShapeError("a batch of prompts needs its attention_mask (prompts.batch_inputs builds it)")
    pads = [0] * batch if mask is None else [width - int(m.sum()) for m in mask]
    recorders = [RowRecorder(loaded.num_layers, loaded.num_heads, spec) for spec in specs]
    recorder = BatchRowRecorder(recorders, pads)
    model = loaded.model
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True)
    with torch.no_grad():
        if method == "streamed":
            with text_attention(model, register_row_capture()), recording(recorder):
                sequences = model.generate(**inputs, **greedy)
        else:
            with text_attention(model, "eager"):
                out = model.generate(**inputs, **greedy, output_attentions=True, return_dict_in_generate=True)
            sequences = out.sequences
            record_eager_attentions(out.attentions, recorder)
            del out
    generated = sequences[:, width:].cpu().numpy().astype(np.int64)
    stops = _stop_ids(model)
    results = []
    for b, (row_recorder, pad) in enumerate(zip(recorders, pads)):
        ids = generated[b]
        if batch > 1:  # a prompt that ended early: its later tokens are padding and its later rows not its own
            ends = [t for t, token in enumerate(ids.tolist()) if token in stops]
            ids = ids[: ends[0] + 1] if ends else ids
        captured = row_recorder.finish(len(ids) if batch > 1 else None)
        if captured.num_steps != ids.shape[0]:
            raise AttentionCaptureError(
                f"captured {captured.num_steps} attention rows for {ids.shape[0]} generated tokens: expected one "
                "forward pass per generated token"
            )
        captured.check_key_lengths(width - pad)
        results.append((ids, captured))
    return results


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """Token ids that end generation (the model's ``generation_config.eos_token_id``)."""
    return _stop_ids(loaded.model)

