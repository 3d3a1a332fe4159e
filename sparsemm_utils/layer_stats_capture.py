"""Recording where a model's attention goes, layer by layer, in one forward pass (docs/method.md §8).

The statistics of :mod:`sparsemm_utils.category_attention` need every layer's attention over the
whole sequence. :func:`analyse_sample` gets them from a model: greedy generation with the standard
path gives the response; one forward pass over prompt + response with the attention function
:func:`layer_stats_attention` (registered under :data:`LAYER_STATS_ATTENTION`, language model only,
:mod:`sparsemm_utils.attention_hooks`) then computes every layer's output with ``sdpa`` (the
model's own numbers) and, on the side, hands query and keys to the active
:class:`LayerStatsRecorder` (:func:`recording_layer_stats`). The recorder computes the softmax
attention rows in chunks of ``chunk_size`` queries (float32) and reduces them at once to per-row
category masses, entropies and per-head masses: memory O(H * chunk * N) per layer, never
(L, H, N, N).

Shapes: ``L`` layers, ``H`` query heads, ``H_kv`` KV heads, ``N`` tokens (prompt + response),
``C = 3`` categories.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from sparsemm_utils.attention_hooks import AttentionFunction, AttentionHook, allowed_keys, text_attention
from sparsemm_utils.category_attention import (
    LayerStats,
    category_entropy_rows,
    category_mass,
    check_labels,
    visible_key_counts,
)
from sparsemm_utils.models import LoadedModel
from sparsemm_utils.token_categories import CATEGORIES, AttentionShapeError, LayerAnalysisError, token_categories
from sparsemm_utils.validate import check_int

__all__ = [
    "LAYER_STATS_ATTENTION",
    "LAYER_STATS_HOOK",
    "LayerStatsRecorder",
    "layer_stats_attention",
    "register_layer_stats",
    "recording_layer_stats",
    "forward_inputs_with_response",
    "analyse_sample",
]

#: Name of :func:`layer_stats_attention` in transformers' AttentionInterface.
LAYER_STATS_ATTENTION = "sparsemm_layer_stats"


class LayerStatsRecorder:
    """Collects :class:`LayerStats` of one sequence while the model runs (one forward pass).

    ``labels``: ``(N,)`` category codes of the positions (:func:`token_categories`);
    ``prompt_len``; ``chunk_size``: query rows per softmax chunk. :meth:`add` is called by
    :func:`layer_stats_attention` once per layer; :meth:`finish` checks every layer was seen.
    """

    def __init__(self, labels: Any, prompt_len: int, num_layers: int, num_heads: int, *, chunk_size: int = 256):
        labels = np.asarray(labels)
        check_labels(labels, labels.size, len(CATEGORIES), "labels")
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("chunk_size", chunk_size)):
            check_int(name, value, 1, error=LayerAnalysisError)
        self.labels = labels.astype(np.int8)
        self.prompt_len = int(prompt_len)
        self.num_layers, self.num_heads, self.chunk_size = int(num_layers), int(num_heads), int(chunk_size)
        n, c = self.labels.size, len(CATEGORIES)
        self.mass = np.full((num_layers, n, c), np.nan)
        self.entropy = np.full((num_layers, n, c), np.nan)
        self.visible = np.zeros((num_layers, n, c), dtype=np.int64)
        self.head_mass = np.full((num_layers, num_heads, n, c), np.nan, dtype=np.float32)
        self._seen = np.zeros(num_layers, dtype=bool)

    @torch.no_grad()
    def add(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """Reduce one layer's attention. ``query`` ``(1, H, q, d)`` post-RoPE, ``key`` ``(1, H_kv, N, d)``."""
        if query.ndim != 4 or key.ndim != 4 or query.shape[0] != 1 or key.shape[0] != 1:
            raise AttentionShapeError(
                f"batch size 1 only: query (1, H, q, d) and key (1, H_kv, N, d), got {tuple(query.shape)}, {tuple(key.shape)}"
            )
        _, heads, q_len, dim = query.shape
        kv_heads, n_keys = key.shape[1], key.shape[2]
        if heads != self.num_heads or heads % kv_heads:
            raise AttentionShapeError(f"expected {self.num_heads} query heads (a multiple of {kv_heads} KV heads), got {heads}")
        if n_keys != self.labels.size:
            raise AttentionShapeError(
                f"layer {layer_idx} attends to {n_keys} keys but the recorder has labels for {self.labels.size} positions: "
                "run ONE forward pass over the whole sequence (prompt + response) without a cache"
            )
        if not 0 <= layer_idx < self.num_layers:
            raise AttentionShapeError(f"layer_idx {layer_idx} outside 0..{self.num_layers - 1}")
        scale = dim**-0.5 if scaling is None else float(scaling)
        group = heads // kv_heads
        allowed = allowed_keys(attention_mask, q_len, n_keys, query.device)
        keys_t = key[0].float().transpose(-1, -2)[:, None]  # (H_kv, 1, d, N)
        offset = n_keys - q_len
        labels = self.labels
        for start in range(0, q_len, self.chunk_size):
            stop = min(start + self.chunk_size, q_len)
            q = query[0, :, start:stop].float().reshape(kv_heads, group, stop - start, dim)
            logits = (q @ keys_t).reshape(heads, stop - start, n_keys) * scale
            logits = logits.masked_fill(~allowed[start:stop][None], float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # (H, c, N) float32
            mean = probs.mean(dim=0)  # (c, N)
            rows = slice(offset + start, offset + stop)
            self.mass[layer_idx, rows] = category_mass(mean, labels).double().cpu().numpy()
            self.entropy[layer_idx, rows] = category_entropy_rows(mean.double(), labels).cpu().numpy()
            self.visible[layer_idx, rows] = visible_key_counts(mean, labels).round().long().cpu().numpy()
            self.head_mass[layer_idx, :, rows] = category_mass(probs, labels).cpu().numpy()
        self._seen[layer_idx] = True

    def finish(self) -> LayerStats:
        """The collected statistics; every layer must have been recorded once, over every row."""
        missing = np.flatnonzero(~self._seen).tolist()
        if missing:
            raise LayerAnalysisError(
                f"layers {missing} were never recorded: the forward pass did not use {LAYER_STATS_ATTENTION!r} "
                "(run it inside recording_layer_stats() with attention_hooks.text_attention(model, register_layer_stats()))"
            )
        if np.isnan(self.mass).any():
            raise LayerAnalysisError(
                "some query rows were never recorded: the forward pass must cover every position (no cache)"
            )
        return LayerStats(
            labels=self.labels,
            prompt_len=self.prompt_len,
            mass=self.mass,
            entropy=self.entropy,
            visible=self.visible,
            head_mass=self.head_mass,
        )


#: The recorder :func:`layer_stats_attention` feeds. Without one the function is plain sdpa, so
#: there is no "no active recorder" error; blocks nest (the inner recorder wins).
LAYER_STATS_HOOK: AttentionHook[LayerStatsRecorder] = AttentionHook(
    "sparsemm_layer_stats",
    context="a recording_layer_stats() block",
    usage="wrap the forward pass in `with sparsemm_utils.layer_stats_capture.recording_layer_stats(recorder):`",
)


def recording_layer_stats(recorder: LayerStatsRecorder) -> AbstractContextManager[LayerStatsRecorder]:
    """Make :func:`layer_stats_attention` feed ``recorder`` inside the block."""
    return LAYER_STATS_HOOK.activate(recorder)


layer_stats_attention: AttentionFunction = LAYER_STATS_HOOK.observing_sdpa(
    LayerStatsRecorder.add,
    name="layer_stats_attention",
    doc="""``sdpa`` attention that also hands the layer's attention to the active recorder
    (:meth:`LayerStatsRecorder.add`).

    The output is ``sdpa_attention_forward``'s (the model computes exactly what it computes with
    ``sdpa``); without an active :class:`LayerStatsRecorder` this IS sdpa.""",
)


def register_layer_stats() -> str:
    """Register :func:`layer_stats_attention` (mask function ``sdpa``); returns its name. Idempotent."""
    return LAYER_STATS_HOOK.register(LAYER_STATS_ATTENTION, layer_stats_attention)


def forward_inputs_with_response(inputs: Mapping[str, Any], sequence: torch.Tensor) -> dict[str, Any]:
    """Model inputs for one forward pass over ``sequence`` ``(1, N)`` = the prompt of ``inputs``
    followed by generated tokens: ``input_ids`` replaced, ``attention_mask`` all ones,
    ``mm_token_type_ids`` (Qwen) extended with 0 (text); image tensors kept."""
    prompt_len = int(inputs["input_ids"].shape[1])
    if sequence.ndim != 2 or sequence.shape[0] != 1 or sequence.shape[1] < prompt_len:
        raise AttentionShapeError(f"sequence must be (1, N >= {prompt_len}), got {tuple(sequence.shape)}")
    if not torch.equal(sequence[:, :prompt_len].to(inputs["input_ids"].device), inputs["input_ids"]):
        raise AttentionShapeError("sequence does not start with the prompt's input_ids")
    extra = sequence.shape[1] - prompt_len
    out = {k: v for k, v in inputs.items()}
    out["input_ids"] = sequence.to(inputs["input_ids"].device)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs and inputs["mm_token_type_ids"] is not None:
        tt = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros((1, extra))], dim=1)
    return out


@torch.no_grad()
def analyse_sample(
    loaded: LoadedModel,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int = 64,
    chunk_size: int = 256,
) -> tuple[np.ndarray, LayerStats]:
    """Generate a greedy response to one prompt, then measure every layer's attention over
    prompt + response (module docstring).

    ``inputs``: one prompt from :func:`sparsemm_utils.prompts.build_inputs` (batch 1).
    Returns the generated ids ``(T,)`` (end-of-sequence token included when generation stopped
    on it) and the :class:`LayerStats` of the N = prompt + T positions. The language model's
    attention implementation is restored afterwards.
    """
    check_int("max_new_tokens", max_new_tokens, 1, error=LayerAnalysisError)
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise AttentionShapeError(f"one prompt at a time: input_ids must be (1, n), got {tuple(ids.shape)}")
    prompt_len = int(ids.shape[1])
    model = loaded.model
    sequence = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    labels = token_categories(sequence[0], loaded.image_token_id, prompt_len)
    recorder = LayerStatsRecorder(labels, prompt_len, loaded.num_layers, loaded.num_heads, chunk_size=chunk_size)
    with text_attention(model, register_layer_stats()), recording_layer_stats(recorder):
        model(**forward_inputs_with_response(inputs, sequence), use_cache=False, logits_to_keep=1)
    generated = sequence[0, prompt_len:].cpu().numpy().astype(np.int64)
    return generated, recorder.finish()

