"""Measuring decode latency, peak memory and KV bytes against context length (docs/method.md §7).

Step 06 (:mod:`sparsemm_utils.steps.efficiency`) runs these measurements. The paper's protocol
(:class:`EfficiencyProtocol`), and how it is run here:

- **Input**: a text-only prompt of n random token ids (n = 2K .. 32K), batch 1; SparseMM at
  B = 256, r = 0.1, w = 32 (every method of :mod:`sparsemm_utils.compression` can be timed).
- **Two full-cache baselines** (:data:`BASELINES`): ``fullkv``, transformers' ``DynamicCache``,
  which appends a token with ``torch.cat`` and so copies each layer's whole cache at every step
  (the cost grows with n even where attention is cheap), and ``fullkv_static``, transformers'
  preallocated ``StaticCache`` of n + new-token rows per layer, written in place (attention over
  its rows, the unused ones masked): the fair baseline. Both give the same tokens.
- **Model**: the real model's language-model shapes with random weights
  (:mod:`sparsemm_utils.real_shapes`): speed and memory depend on shapes, not on weight values.
  On a GPU, the full-size shapes in bf16 reproduce the paper's table; on a CPU, a few of the real
  layers (``layers``) and a depth-scaled vocabulary (``vocab="depth_scaled"``) in float32, and
  what is reported is the ratio FullKV / method.
- **One generation per measurement**, greedy, ``max(generate_tokens, 1 + decode_warmup +
  decode_steps)`` new tokens (512 in the paper; EOS suppressed so every run generates as many).
  A logits processor (:class:`StepTimer`) stamps the time whenever a step's logits are ready
  (after a CUDA synchronise), so one ``generate`` gives: **prefill_s**, from the call to the first
  logits (the prompt's forward pass, compression included); **decode_ms_per_token**, the MEAN
  duration of ``decode_steps`` single-token steps after ``decode_warmup`` untimed ones (the first
  step meets kernels and shapes it has not seen); **kv_bytes**, the cache's bytes right after the
  prefill (docs/method.md §7's sum of kept tokens x head_dim x 2 x element size), beside
  ``kv_bytes_analytic`` from the method's capacities, and ``kv_reserve_bytes``, the per-head
  cache's free decode rows then (its most: at most one block of
  :data:`~sparsemm_utils.kv_cache.DECODE_BLOCK` rows per KV head, :mod:`sparsemm_utils.kv_cache`;
  empty for transformers' own cache), so ``peak_mem_bytes - kv_reserve_bytes`` is the peak
  without the reserve; **peak_mem_bytes** over the whole
  generation: ``torch.cuda.max_memory_allocated`` on a GPU (weights included, as the paper), the
  peak resident set size of the process on a CPU (reset through ``/proc/self/clear_refs`` before
  the generation; weights, activations and the Python runtime included).
- **A fresh process per (model, method, context)** (:func:`run_efficiency` spawns
  ``python -m sparsemm_utils.efficiency measure ...``): the original's issue #9 was patched state
  leaking from one method into the next; here nothing can, and every peak is the method's own.
- **The device** is recorded in every row.

Decode attention of the compressed caches: ``decode_attention="auto"`` takes torch's own
variable-length flash attention on a GPU (one kernel per layer, :mod:`sparsemm_utils.varlen_attention`;
the padded one-sdpa path where flash cannot run) and the per-head reference loop on a CPU.

Command line (the whole step without its notebook: ``python -m sparsemm_utils.steps.efficiency``)::

    python -m sparsemm_utils.efficiency analytic --models llava-next-vicuna-7b qwen2-vl-7b
    python -m sparsemm_utils.efficiency measure --model qwen2-vl-2b --method sparsemm --context 2048 --layers 2

Outputs of :func:`run_efficiency` in ``out_dir``: ``results.csv`` (:data:`RESULT_COLUMNS` first,
then :data:`EXTRA_COLUMNS`), ``analytic_kv.csv`` (:data:`ANALYTIC_COLUMNS`: analytic KV bytes of
the FULL-depth real shapes at each context, in the paper's bf16), ``config.json`` (the validated
configuration) and ``measurements/*.json`` (one row per fresh process); :func:`load_results` and
:func:`load_analytic` read the two tables back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.compression import COMPRESSION_METHODS, make_press, model_shape
from sparsemm_utils.kv_cache import analytic_kv_bytes, cache_kv_bytes, decode_reserve_for
from sparsemm_utils.real_shapes import (
    RealShape,
    build_random_model,
    depth_scaled_vocab,
    get_real_shape,
    random_prompt,
    weights_bytes,
)
from sparsemm_utils.validate import check_choice, check_fraction, check_int
from sparsemm_utils.varlen_attention import DECODE_BACKENDS, compression_with_backend

__all__ = [
    "RESULT_COLUMNS",
    "EXTRA_COLUMNS",
    "ANALYTIC_COLUMNS",
    "RESULTS_FILE",
    "ANALYTIC_FILE",
    "EFFICIENCY_METHODS",
    "STATIC_FULLKV",
    "BASELINES",
    "PAPER_CONTEXTS",
    "SKEWED_SCORE_POWER",
    "EfficiencyError",
    "InvalidEfficiencyConfigError",
    "ContextTooLongError",
    "DeviceNotAvailableError",
    "MeasurementFailedError",
    "EfficiencyProtocol",
    "synthetic_head_scores",
    "resolve_device",
    "resolve_dtype",
    "describe_device",
    "PeakMemory",
    "StepTimer",
    "make_method",
    "baseline_cache",
    "analytic_method_kv_bytes",
    "analytic_kv_table",
    "measure",
    "run_efficiency",
    "load_results",
    "load_analytic",
    "comparable_to_paper",
    "add_protocol_arguments",
    "protocol_from_args",
    "main",
]

#: The artifact contract's columns of ``06_efficiency/results.csv`` (docs/design.md), in this order.
RESULT_COLUMNS: tuple[str, ...] = (
    "model", "method", "context_len", "budget", "prefill_s", "decode_ms_per_token", "peak_mem_bytes", "kv_bytes",
    "device",
)
#: Columns written after the contract's (extensions, never renames).
EXTRA_COLUMNS: tuple[str, ...] = (
    "shape", "layers", "full_layers", "vocab_size", "dtype", "decode_attention", "decode_steps", "decode_warmup",
    "generated_tokens", "decode_ms_median", "decode_ms_min", "kv_bytes_analytic", "kv_bytes_final",
    "kv_reserve_bytes", "peak_mem_kind", "weights_bytes", "threads", "head_scores", "seconds",
)
#: The tables :func:`run_efficiency` writes (step 06's artifacts).
RESULTS_FILE = "results.csv"
ANALYTIC_FILE = "analytic_kv.csv"
#: Columns of ``analytic_kv.csv``.
ANALYTIC_COLUMNS: tuple[str, ...] = (
    "model", "shape", "method", "context_len", "budget", "layers", "kv_heads", "head_dim", "dtype", "stored_tokens",
    "kv_bytes",
)
#: FullKV with transformers' preallocated ``StaticCache`` (written in place) instead of the
#: ``DynamicCache`` that ``fullkv`` uses (one ``torch.cat`` of the whole layer per step).
STATIC_FULLKV = "fullkv_static"
#: The full-cache baselines every ratio is taken against: ``fullkv`` (DynamicCache) and
#: :data:`STATIC_FULLKV` (StaticCache); the same attention over the same tokens.
BASELINES: tuple[str, ...] = ("fullkv", STATIC_FULLKV)
#: Methods that can be timed: every method of compression.py except the head-mask ablation
#: (a full cache with zeroed queries: FullKV's cost), plus :data:`STATIC_FULLKV`.
EFFICIENCY_METHODS: tuple[str, ...] = (
    "fullkv", STATIC_FULLKV, *(m for m in COMPRESSION_METHODS if m not in ("head_mask", "fullkv"))
)
#: The paper's context lengths, 2K .. 32K tokens.
PAPER_CONTEXTS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
_DTYPES: Mapping[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------- errors


class EfficiencyError(ValueError):
    """Base class of this module's input errors."""


class InvalidEfficiencyConfigError(EfficiencyError):
    """A parameter of :class:`EfficiencyProtocol` is malformed (the message says which and why)."""


class ContextTooLongError(EfficiencyError):
    """A context (plus the generated tokens) longer than the model's positions."""


class DeviceNotAvailableError(EfficiencyError, RuntimeError):
    """The device asked for is not there (no GPU, or a GPU index beyond the count)."""


class MeasurementFailedError(RuntimeError):
    """A measurement's process failed (out of memory, timeout, ...): the message holds its stderr."""


# ---------------------------------------------------------------------------------------- protocol


def _as_tuple(name: str, value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidEfficiencyConfigError(f"{name} must be a list, got {value!r}")
    if not value:
        raise InvalidEfficiencyConfigError(f"{name} must not be empty")
    return tuple(value)


@dataclass(frozen=True)
class EfficiencyProtocol:
    """What an efficiency run measures and how (docs/method.md §7): the protocol every measurement
    process receives (as ``config.json``). The defaults are the paper's protocol on a GPU; step 06's
    :class:`sparsemm_utils.steps.efficiency.Config` builds one from the notebook's parameters.

    Args:
        models: real shapes to time (names of :data:`~sparsemm_utils.real_shapes.REAL_SHAPES` or hub ids).
        methods: methods of :data:`EFFICIENCY_METHODS`; FullKV (``fullkv``, DynamicCache) is the reference of
            every ratio, ``fullkv_static`` (StaticCache) the second, fair one (:data:`BASELINES`).
        contexts: prompt lengths n in tokens (strictly increasing).
        budget, window, ratio: B (window included), w and SparseMM's uniform share r (docs/method.md §5).
        layers: decoder layers kept (None: the real depth); the same for every model, and at most
            the shallowest model's depth.
        vocab: "real" or "depth_scaled" (the vocabulary shrunk with the depth, so the output layer
            keeps its real share of a step; see :func:`~sparsemm_utils.real_shapes.depth_scaled_vocab`).
        decode_steps: single-token steps averaged (100 in the paper).
        decode_warmup: untimed steps before them.
        generate_tokens: tokens of the generation the peak memory is taken over (512 in the paper).
        dtype: "auto" (bfloat16 on a GPU, float32 on a CPU), "bfloat16", "float16" or "float32".
        device: "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:<i>".
        decode_attention: "auto" or one of :data:`~sparsemm_utils.varlen_attention.DECODE_BACKENDS`.
        head_scores: SparseMM's head scores: "skewed" (seeded ``uniform(0, 1) ** 13``: the top 10%
            of heads hold 77% of the mass, as real visual heads do, docs/method.md §4) or "uniform"
            (every head cap = B - w). Speed does not depend on which heads hold the budget, only on
            how unevenly (see :func:`synthetic_head_scores`).
        extend_positions: let contexts exceed the checkpoint's ``max_position_embeddings`` (the
            paper times LLaVA-NeXT-Vicuna-7B, 4096 positions, at 32K; RoPE is computed on the fly).
        threads: CPU threads of each measurement (None: torch's default). On a CPU shared with other
            work use 1: with more, every small parallel operation waits for a thread whose core another
            process holds (a scheduler time slice each time; seen here as 4 sdpa calls of 30 ms instead
            of 0.04 ms per layer).
        seed: weights, prompts and synthetic scores.
        timeout_s: wall-clock limit of one measurement's process (None: no limit).
    """

    models: tuple[str, ...] = ("llava-next-vicuna-7b",)
    methods: tuple[str, ...] = ("fullkv", STATIC_FULLKV, "sparsemm")
    contexts: tuple[int, ...] = PAPER_CONTEXTS
    budget: int = 256
    window: int = 32
    ratio: float = 0.1
    layers: int | None = None
    vocab: Literal["real", "depth_scaled"] = "real"
    decode_steps: int = 100
    decode_warmup: int = 2
    generate_tokens: int = 512
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    decode_attention: str = "auto"
    head_scores: Literal["skewed", "uniform"] = "skewed"
    extend_positions: bool = False
    threads: int | None = None
    seed: int = 0
    timeout_s: float | None = None

    HEAD_SCORE_KINDS: ClassVar[tuple[str, ...]] = ("skewed", "uniform")

    def __post_init__(self) -> None:
        models = tuple(get_real_shape(m).name for m in _as_tuple("models", self.models))
        if len(set(models)) != len(models):
            raise InvalidEfficiencyConfigError(f"models lists a shape twice: {list(self.models)}")
        object.__setattr__(self, "models", models)
        methods = tuple(str(m).strip().lower() for m in _as_tuple("methods", self.methods))
        for m in methods:
            check_choice("each method", m, EFFICIENCY_METHODS, error=InvalidEfficiencyConfigError)
        if len(set(methods)) != len(methods):
            raise InvalidEfficiencyConfigError(f"methods lists a method twice: {list(self.methods)}")
        object.__setattr__(self, "methods", methods)
        contexts = tuple(check_int("each context", n, 1, error=InvalidEfficiencyConfigError) for n in _as_tuple("contexts", self.contexts))
        if any(b <= a for a, b in zip(contexts, contexts[1:])):
            raise InvalidEfficiencyConfigError(f"contexts must be strictly increasing, got {list(contexts)}")
        object.__setattr__(self, "contexts", contexts)
        check_int("window", self.window, 1, error=InvalidEfficiencyConfigError)
        if check_int("budget", self.budget, 2, error=InvalidEfficiencyConfigError) <= self.window:
            raise InvalidEfficiencyConfigError(
                f"budget B={self.budget} must exceed the window w={self.window} (B counts the window; docs/method.md §5)"
            )
        check_fraction("ratio", self.ratio, error=InvalidEfficiencyConfigError)
        if self.layers is not None:
            check_int("layers", self.layers, 1, error=InvalidEfficiencyConfigError)
            shallowest = min(get_real_shape(m).layers for m in self.models)
            if self.layers > shallowest:
                raise InvalidEfficiencyConfigError(
                    f"layers={self.layers} exceeds the depth of a model ({shallowest}); use None for full depth"
                )
        check_choice("vocab", self.vocab, ("real", "depth_scaled"), error=InvalidEfficiencyConfigError)
        check_int("decode_steps", self.decode_steps, 1, error=InvalidEfficiencyConfigError)
        check_int("decode_warmup", self.decode_warmup, 0, error=InvalidEfficiencyConfigError)
        check_int("generate_tokens", self.generate_tokens, 1, error=InvalidEfficiencyConfigError)
        check_choice("dtype", self.dtype, ("auto", *_DTYPES), error=InvalidEfficiencyConfigError)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise InvalidEfficiencyConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        check_choice("decode_attention", self.decode_attention, ("auto", *DECODE_BACKENDS), error=InvalidEfficiencyConfigError)
        check_choice("head_scores", self.head_scores, self.HEAD_SCORE_KINDS, error=InvalidEfficiencyConfigError)
        if not isinstance(self.extend_positions, bool):
            raise InvalidEfficiencyConfigError(f"extend_positions must be true or false, got {self.extend_positions!r}")
        if self.threads is not None:
            check_int("threads", self.threads, 1, error=InvalidEfficiencyConfigError)
        check_int("seed", self.seed, 0, error=InvalidEfficiencyConfigError)
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0
        ):
            raise InvalidEfficiencyConfigError(f"timeout_s must be a positive number of seconds or None, got {self.timeout_s!r}")

    # ------------------------------------------------------------------ derived

    @property
    def new_tokens(self) -> int:
        """Tokens each generation produces: max(generate_tokens, 1 + decode_warmup + decode_steps)
        (the first token comes from the prefill; each later one is a timed or warm-up step)."""
        return max(self.generate_tokens, 1 + self.decode_warmup + self.decode_steps)

    def shapes(self) -> list[RealShape]:
        return [get_real_shape(m) for m in self.models]

    def depth(self, shape: RealShape) -> int:
        return shape.check_layers(self.layers)

    def vocab_size(self, shape: RealShape) -> int:
        return shape.vocab_size if self.vocab == "real" else depth_scaled_vocab(shape, self.layers)

    def positions(self, shape: RealShape) -> int:
        """The model's ``max_position_embeddings`` for this run: the checkpoint's, or (with
        ``extend_positions``) enough for the longest context plus the generated tokens."""
        needed = self.contexts[-1] + self.new_tokens
        return max(shape.max_position_embeddings, needed) if self.extend_positions else shape.max_position_embeddings

    def check_positions(self, shape: RealShape, context: int | None = None) -> None:
        """Raise :class:`ContextTooLongError` when ``context`` (default: the longest) plus the
        generated tokens exceeds the model's positions."""
        context = self.contexts[-1] if context is None else context
        needed, available = context + self.new_tokens, self.positions(shape)
        if needed > available:
            raise ContextTooLongError(
                f"a context of {context} tokens plus {self.new_tokens} generated ones needs {needed} positions, but "
                f"{shape.name} ({shape.hub_id}) has max_position_embeddings={available}. Use contexts up to "
                f"{available - self.new_tokens}, or extend_positions=True (--extend-positions) to time it beyond, as "
                f"the paper does at 32K: RoPE is computed on the fly, so speed and memory are unaffected."
            )

    def check_runnable(self) -> None:
        """The checks that depend on this machine and the models: the device exists; every context
        fits every model's positions; every method can run on every model's (reduced) shape.
        Raises before anything is built."""
        resolve_device(self.device)
        for shape in self.shapes():
            self.check_positions(shape)
            mshape = shape.model_shape(self.layers)
            for method in self.methods:  # e.g. PyramidKV needs >= 2 layers
                try:
                    make_method(method, self, mshape).validate_for(mshape)
                except ValueError as exc:
                    raise InvalidEfficiencyConfigError(
                        f"{method} cannot run on {shape.name} with {mshape.layers} layer(s): {exc}"
                    ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EfficiencyProtocol:
        """Build from a mapping; unknown keys get an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InvalidEfficiencyConfigError(f"unknown efficiency parameter(s) {unknown}; valid: {', '.join(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ------------------------------------------------------------------------------------ head scores


#: Exponent of the "skewed" synthetic head scores u ** p, u ~ U(0, 1) (see :func:`synthetic_head_scores`).
SKEWED_SCORE_POWER: int = 13


def synthetic_head_scores(shape: ModelShape, kind: str = "skewed", seed: int = 0, *, power: int = SKEWED_SCORE_POWER) -> np.ndarray:
    """Synthetic visual head scores (layers, query_heads) for timing SparseMM at a real shape.

    "skewed": ``default_rng(seed).random((L, H)) ** power``. For u ~ U(0, 1) the heads in the top
    fraction q (u > 1 - q) hold 1 - (1 - q) ** (power + 1) of the mass of u ** power; with
    power = 13 the top 5% hold 1 - 0.95^14 = 51% and the top 10% hold 1 - 0.9^14 = 77%, docs/method.md
    §4's 55% and 77% for LLaVA-NeXT-Vicuna-7B's real scores, so the allocation is about as
    uneven as the real one (speed depends on how uneven, not on which heads). Depth L' < L draws
    the first L' rows of depth L's scores (row-major draws). "uniform": ones (every KV head gets
    B - w)."""
    if kind == "uniform":
        return np.ones((shape.layers, shape.query_heads))
    if kind == "skewed":
        check_int("power", power, 1, error=InvalidEfficiencyConfigError)
        return np.random.default_rng(seed).random((shape.layers, shape.query_heads)) ** power
    raise InvalidEfficiencyConfigError(f"head score kind must be 'skewed' or 'uniform', got {kind!r}")


def make_method(method: str, protocol: EfficiencyProtocol, shape: ModelShape) -> Any:
    """The method dataclass of ``method`` with the protocol's budget, window, ratio and (SparseMM)
    synthetic head scores for ``shape`` (FullKV for both :data:`BASELINES`). ``protocol``: an
    :class:`EfficiencyProtocol` or any object with its ``budget``, ``window``, ``ratio``,
    ``head_scores`` and ``seed``."""
    method = check_choice("method", method, EFFICIENCY_METHODS, error=InvalidEfficiencyConfigError)
    if method in BASELINES:  # the cache differs (baseline_cache), not the method: no compression
        return make_press("fullkv")
    kwargs: dict[str, Any] = {"budget": protocol.budget, "window": protocol.window}
    if method in ("sparsemm", "random"):
        kwargs["ratio"] = float(protocol.ratio)
    if method == "sparsemm":
        kwargs["head_scores"] = synthetic_head_scores(shape, protocol.head_scores, protocol.seed)
    if method == "random":
        kwargs["seed"] = protocol.seed
    return make_press(method, **kwargs)


# ------------------------------------------------------------------------------------- analytic


def baseline_cache(method: str, text_config: Any, max_cache_len: int) -> DynamicCache | StaticCache:
    """The empty cache of a full-cache baseline (:data:`BASELINES`): ``fullkv`` -> a
    ``DynamicCache`` (grows by ``torch.cat``); :data:`STATIC_FULLKV` -> a ``StaticCache`` of
    ``max_cache_len`` rows per layer (the prompt plus every token to be generated; its
    (1, H_kv, max_cache_len, head_dim) tensors are allocated at the first update and written in
    place). ``text_config``: the language model's config."""
    method = check_choice("baseline", method, BASELINES, error=InvalidEfficiencyConfigError)
    if method == STATIC_FULLKV:
        return StaticCache(config=text_config, max_cache_len=check_int("max_cache_len", max_cache_len, 1, error=InvalidEfficiencyConfigError))
    return DynamicCache(config=text_config)


def _stored_tokens(method: str, protocol: Any, shape: ModelShape, context: int) -> np.ndarray | None:
    """Tokens each KV head's cache holds right after a prefill of ``context`` tokens, (layers,
    kv_heads): the method's capacities; the prompt plus the ``protocol.new_tokens`` preallocated
    rows for :data:`STATIC_FULLKV`; None for a data-dependent method (AdaKV)."""
    if method == STATIC_FULLKV:
        return np.full((shape.layers, shape.kv_heads), context + protocol.new_tokens, dtype=np.int64)
    press = make_method(method, protocol, shape)
    if getattr(press, "data_dependent", False):
        return None
    return press.capacities(shape, context).stored(context)


def analytic_method_kv_bytes(
    method: str, protocol: EfficiencyProtocol, shape: ModelShape, head_dim: int, context: int, dtype: torch.dtype
) -> int | None:
    """docs/method.md §7's analytic KV bytes of ``method``'s cache right after a prefill of
    ``context`` tokens: sum over layers and KV heads of stored tokens (the method's capacities,
    ``HeadCapacities.stored``; for :data:`STATIC_FULLKV` the preallocated context + new tokens)
    x head_dim x 2 x element size. None for a data-dependent method (AdaKV: its caps come from
    the prompt's attention)."""
    stored = _stored_tokens(method, protocol, shape, context)
    return None if stored is None else analytic_kv_bytes(stored, head_dim, dtype)


def analytic_kv_table(protocol: EfficiencyProtocol, *, dtype: torch.dtype = torch.bfloat16) -> pd.DataFrame:
    """Analytic KV bytes of every model of ``protocol`` at its FULL depth, for every method and
    context, in ``dtype`` (default bf16, the paper's): :data:`ANALYTIC_COLUMNS`. SparseMM's caps
    use the synthetic head scores of the full-depth shape."""
    rows = []
    for shape in protocol.shapes():
        mshape = shape.model_shape()
        for method in protocol.methods:
            for n in protocol.contexts:
                kv = analytic_method_kv_bytes(method, protocol, mshape, shape.head_dim, n, dtype)
                stored = None if kv is None else int(_stored_tokens(method, protocol, mshape, n).sum())
                rows.append(
                    {
                        "model": shape.hub_id, "shape": shape.name, "method": method, "context_len": n,
                        "budget": None if method in BASELINES else protocol.budget, "layers": shape.layers,
                        "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "dtype": str(dtype).removeprefix("torch."),
                        "stored_tokens": stored, "kv_bytes": kv,
                    }
                )
    frame = pd.DataFrame(rows, columns=list(ANALYTIC_COLUMNS))
    for column in ("budget", "stored_tokens", "kv_bytes"):
        frame[column] = frame[column].astype("Int64")
    return frame


# --------------------------------------------------------------------------------- device, memory


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first GPU when torch sees one, else the CPU; ``"cuda[:i]"`` must exist
    (:class:`DeviceNotAvailableError` otherwise)."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceNotAvailableError(f"device {device!r} is not a torch device: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(
                f"device {device!r} was asked for but torch {torch.__version__} sees no GPU"
                f"{' (a CPU-only build)' if torch.version.cuda is None else ''}: use device='cpu' or 'auto'"
            )
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceNotAvailableError(
                f"device {device!r} was asked for but torch sees {torch.cuda.device_count()} GPU(s) "
                f"(indices 0..{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise DeviceNotAvailableError(f"device {device!r}: only 'cpu' and 'cuda[:i]' are supported")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a GPU (the paper's), float32 on a CPU (bf16 matmuls on a CPU
    without AMX are emulated and would time the emulation); else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[check_choice("dtype", dtype, tuple(_DTYPES), error=InvalidEfficiencyConfigError)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """E.g. ``"cuda:0 NVIDIA H100 80GB HBM3 (torch 2.13.0, CUDA 12.8)"`` or
    ``"cpu Intel(R) Xeon(R) ... (2 threads, torch 2.13.0+cpu)"``."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu {_cpu_name()} ({torch.get_num_threads()} threads, torch {torch.__version__})"


class PeakMemory:
    """The peak memory of a stretch of work on ``device``, in bytes.

    GPU (``kind = "cuda_max_allocated"``): ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` (tensors only: weights, cache, activations; the paper's measure).
    CPU (``"cpu_peak_rss"``): the process's peak resident set size (``VmHWM``), reset to the current
    RSS by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0); it includes the Python runtime and
    memory the allocator keeps. Where that reset is impossible (``"cpu_max_rss_lifetime"``): the
    peak since the process started (``getrusage``), which a fresh process per measurement keeps
    meaningful."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "cpu_max_rss_lifetime"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class StepTimer(LogitsProcessor):
    """A logits processor that stamps the time each generation step's logits are ready.

    Pass it last in ``logits_processor``; call :meth:`start` right before ``generate``. Stamps are
    taken after ``synchronize`` (a CUDA sync on a GPU), so GPU work is counted where it happens.
    ``on_first`` runs once, after the prefill's stamp and outside every timed interval (e.g. to
    read the cache's bytes). Step k (k >= 1) lasts from the end of the processor call k - 1 to the
    stamp of call k: one forward pass of one token plus generate's own bookkeeping."""

    def __init__(self, synchronize: Callable[[], None] | None = None, on_first: Callable[[], None] | None = None):
        self.synchronize = synchronize or (lambda: None)
        self.on_first = on_first
        self.started: float | None = None
        self.arrivals: list[float] = []
        self.departures: list[float] = []

    def start(self) -> None:
        self.synchronize()
        self.started = time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.synchronize()
        self.arrivals.append(time.perf_counter())
        if len(self.arrivals) == 1 and self.on_first is not None:
            self.on_first()
        self.departures.append(time.perf_counter())
        return scores

    @property
    def prefill_s(self) -> float:
        """Seconds from :meth:`start` to the first logits (the prompt's forward pass)."""
        if self.started is None or not self.arrivals:
            raise RuntimeError("StepTimer: no generation was timed (call start() before generate)")
        return self.arrivals[0] - self.started

    def step_seconds(self) -> list[float]:
        """Durations of the single-token decode steps, in order (one fewer than the tokens generated)."""
        return [a - d for a, d in zip(self.arrivals[1:], self.departures[:-1])]


# ------------------------------------------------------------------------------------- measuring


@dataclass
class _Measured:
    kv_bytes: int | None = None
    reserve_bytes: int | None = None

    def after_prefill(self, cache: Any) -> None:
        """The cache's KV bytes and (per-head cache only) its free decode rows right after the prefill."""
        self.kv_bytes = cache_kv_bytes(cache)
        slack = getattr(cache, "slack_bytes", None)
        self.reserve_bytes = slack() if slack is not None else None


def measure(protocol: EfficiencyProtocol, model: str, method: str, context: int) -> dict[str, Any]:
    """One measurement in THIS process (:func:`run_efficiency` calls it in a fresh one each time):
    build ``model``'s shape with random weights, generate ``protocol.new_tokens`` tokens from a random
    prompt of ``context`` tokens with ``method``, and return the row (:data:`RESULT_COLUMNS` +
    :data:`EXTRA_COLUMNS`)."""
    shape = get_real_shape(model)
    if model not in protocol.models and shape.name not in protocol.models:
        raise InvalidEfficiencyConfigError(f"model {model!r} is not in the protocol's models {list(protocol.models)}")
    method = check_choice("method", str(method).lower(), EFFICIENCY_METHODS, error=InvalidEfficiencyConfigError)
    context = check_int("context", context, 1, error=InvalidEfficiencyConfigError)
    protocol.check_positions(shape, context)
    device = resolve_device(protocol.device)
    dtype = resolve_dtype(protocol.dtype, device)
    if device.type == "cpu" and protocol.threads is not None:
        torch.set_num_threads(protocol.threads)
    started = time.perf_counter()
    loaded = build_random_model(
        shape, layers=protocol.layers, vocab_size=protocol.vocab_size(shape), max_position_embeddings=protocol.positions(shape),
        dtype=dtype, device=device, seed=protocol.seed,
    )
    mshape = model_shape(loaded)
    press = make_method(method, protocol, mshape)
    inputs = random_prompt(loaded, context, seed=protocol.seed + context)
    measured = _Measured()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    memory = PeakMemory(device)
    new_tokens = protocol.new_tokens
    reserve = decode_reserve_for(new_tokens)
    with compression_with_backend(loaded, press, backend=protocol.decode_attention, decode_reserve=reserve) as session:
        cache = session.cache
        if method in BASELINES:  # FullKV keeps transformers' attention; only the cache differs
            cache = baseline_cache(method, loaded.text_config, context + new_tokens)
        timer = StepTimer(sync, on_first=lambda: measured.after_prefill(cache))
        memory.reset()
        timer.start()
        output = loaded.model.generate(
            **inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([timer]),
        )
        peak = memory.peak()
        backend = session.decode_backend or f"sdpa ({type(cache).__name__})"
        kv_final = cache_kv_bytes(cache)
    generated = int(output.shape[-1]) - context
    steps = np.asarray(timer.step_seconds()) * 1e3
    timed = steps[protocol.decode_warmup : protocol.decode_warmup + protocol.decode_steps]
    if timed.size != protocol.decode_steps:
        raise MeasurementFailedError(f"expected {protocol.decode_steps} timed decode steps, got {timed.size} (generated {generated})")
    analytic = analytic_method_kv_bytes(method, protocol, mshape, loaded.head_dim, context, dtype)
    return {
        "model": shape.hub_id, "method": method, "context_len": context,
        "budget": None if method in BASELINES else protocol.budget,
        "prefill_s": timer.prefill_s, "decode_ms_per_token": float(timed.mean()), "peak_mem_bytes": peak,
        "kv_bytes": measured.kv_bytes, "device": describe_device(device),
        "shape": shape.name, "layers": mshape.layers, "full_layers": shape.layers, "vocab_size": protocol.vocab_size(shape),
        "dtype": str(dtype).removeprefix("torch."), "decode_attention": backend, "decode_steps": protocol.decode_steps,
        "decode_warmup": protocol.decode_warmup, "generated_tokens": generated,
        "decode_ms_median": float(np.median(timed)), "decode_ms_min": float(timed.min()),
        "kv_bytes_analytic": analytic, "kv_bytes_final": kv_final,
        "kv_reserve_bytes": measured.reserve_bytes, "peak_mem_kind": memory.kind,
        "weights_bytes": weights_bytes(loaded.model), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "head_scores": protocol.head_scores if method == "sparsemm" else None,
        "seconds": time.perf_counter() - started,
    }


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(RESULT_COLUMNS + EXTRA_COLUMNS))
    for column in ("budget", "kv_bytes", "kv_bytes_analytic", "kv_reserve_bytes", "threads"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _measurement_command(config_path: Path, model: str, method: str, context: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "sparsemm_utils.efficiency", "measure", "--config-json", str(config_path),
        "--model", model, "--method", method, "--context", str(context), "--out", str(out),
    ]


def run_efficiency(
    protocol: EfficiencyProtocol, out_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Every (model, context, method) of ``protocol``, each in a fresh process, in that order (the
    methods of one context run back to back, so they see the same machine load). Writes
    ``results.csv`` after every measurement (an interrupted run keeps what it measured),
    ``analytic_kv.csv``, ``config.json`` and ``measurements/*.json`` into ``out_dir``; returns the
    results frame. A failed measurement raises :class:`MeasurementFailedError` with its stderr and
    the command that reproduces it."""
    protocol.check_runnable()
    out = Path(out_dir)
    (out / "measurements").mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(protocol.to_dict(), indent=2) + "\n", encoding="utf-8")
    analytic_kv_table(protocol).to_csv(out / ANALYTIC_FILE, index=False)
    jobs = [(m, n, method) for m in protocol.models for n in protocol.contexts for method in protocol.methods]
    rows: list[dict[str, Any]] = []
    iterator = tqdm(jobs, desc="measurements", disable=not progress)
    for model, n, method in iterator:
        iterator.set_postfix_str(f"{model} {method} n={n}")
        row_path = out / "measurements" / f"{model}__{method}__{n}.json"
        command = _measurement_command(config_path, model, method, n, row_path)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=protocol.timeout_s, cwd=os.getcwd())
        except subprocess.TimeoutExpired as exc:
            raise MeasurementFailedError(
                f"{model} {method} at n={n} ran past timeout_s={protocol.timeout_s}; rerun it alone with:\n  {' '.join(command)}"
            ) from exc
        if done.returncode != 0 or not row_path.is_file():
            raise MeasurementFailedError(
                f"{model} {method} at n={n} failed (exit code {done.returncode}; -9 often means out of memory). "
                f"Rerun it alone with:\n  {' '.join(command)}\nstderr (end):\n{done.stderr[-3000:]}"
            )
        row = json.loads(row_path.read_text(encoding="utf-8"))
        rows.append(row)
        _frame(rows).to_csv(out / RESULTS_FILE, index=False)
        if log is not None:
            log(
                f"{row['shape']:>22} {method:>12} n={n:>6}: prefill {row['prefill_s']:7.2f} s, decode "
                f"{row['decode_ms_per_token']:8.2f} ms/token, peak {row['peak_mem_bytes'] / 2**30:6.2f} GiB, "
                f"KV {row['kv_bytes'] / 2**20:9.2f} MiB"
            )
    return _frame(rows)


def comparable_to_paper(rows: pd.DataFrame) -> bool:
    """True when ``rows`` (one model's) were measured as the paper's were: full depth, on a GPU."""
    if rows.empty:
        return False
    full_depth = "layers" not in rows or bool((rows["layers"] == rows["full_layers"]).all())
    on_gpu = rows["device"].astype(str).str.startswith("cuda").all()
    return bool(full_depth and on_gpu)


def load_analytic(path: str | Path) -> pd.DataFrame:
    """Read an ``analytic_kv.csv`` written by :func:`run_efficiency` (:data:`ANALYTIC_COLUMNS`;
    ``budget``, ``stored_tokens`` and ``kv_bytes`` nullable Int64)."""
    frame = pd.read_csv(path)
    missing = [c for c in ANALYTIC_COLUMNS if c not in frame.columns]
    if missing:
        raise EfficiencyError(f"{path} lacks the columns {missing} of 06_efficiency/analytic_kv.csv")
    for column in ("budget", "stored_tokens", "kv_bytes"):
        frame[column] = frame[column].astype("Int64")
    return frame


def load_results(path: str | Path) -> pd.DataFrame:
    """Read a ``results.csv`` written by :func:`run_efficiency`; checks the contract's columns."""
    frame = pd.read_csv(path)
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if missing:
        raise EfficiencyError(f"{path} lacks the columns {missing} of 06_efficiency/results.csv (docs/design.md)")
    for column in ("budget", "kv_bytes", "kv_bytes_analytic"):
        if column in frame.columns:
            frame[column] = frame[column].astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------- CLI


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`EfficiencyProtocol` (``--decode-steps`` for ``decode_steps``),
    each defaulting to None (unset: the protocol's default, or ``--config-json``'s value)."""
    d = EfficiencyProtocol()
    parser.add_argument("--models", nargs="+", default=None, help=f"real shapes (default {list(d.models)})")
    parser.add_argument("--methods", nargs="+", default=None, help=f"methods (default {list(d.methods)}; any of {', '.join(EFFICIENCY_METHODS)})")
    parser.add_argument("--contexts", nargs="+", type=int, default=None, help=f"prompt lengths (default {list(d.contexts)})")
    parser.add_argument("--budget", type=int, default=None, help=f"B, window included (default {d.budget})")
    parser.add_argument("--window", type=int, default=None, help=f"w (default {d.window})")
    parser.add_argument("--ratio", type=float, default=None, help=f"SparseMM's r (default {d.ratio})")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: the real depth)")
    parser.add_argument("--vocab", choices=("real", "depth_scaled"), default=None)
    parser.add_argument("--decode-steps", type=int, default=None, help=f"timed decode steps (default {d.decode_steps})")
    parser.add_argument("--decode-warmup", type=int, default=None, help=f"untimed steps first (default {d.decode_warmup})")
    parser.add_argument("--generate-tokens", type=int, default=None, help=f"generation length for peak memory (default {d.generate_tokens})")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), default=None)
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:<i> (default auto)")
    parser.add_argument("--decode-attention", choices=("auto", *DECODE_BACKENDS), default=None)
    parser.add_argument("--head-scores", choices=EfficiencyProtocol.HEAD_SCORE_KINDS, default=None)
    parser.add_argument("--extend-positions", action="store_true", default=None, help="allow contexts beyond the checkpoint's positions")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=None, help="limit per measurement process")


def protocol_from_args(args: argparse.Namespace) -> EfficiencyProtocol:
    """The protocol of ``args.config_json`` (when given) with the flags that were set on top."""
    values: dict[str, Any] = {}
    if getattr(args, "config_json", None):
        values.update(json.loads(Path(args.config_json).read_text(encoding="utf-8")))
    for f in dataclasses.fields(EfficiencyProtocol):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return EfficiencyProtocol.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.efficiency", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("measure", help="one measurement in this process; prints (and with --out writes) its row")
    one.add_argument("--model", required=True)
    one.add_argument("--method", required=True)
    one.add_argument("--context", type=int, required=True)
    one.add_argument("--out", default=None, help="write the row as JSON here")
    one.add_argument("--config-json", default=None)
    add_protocol_arguments(one)
    analytic = sub.add_parser("analytic", help="print the analytic KV bytes of the full-depth shapes")
    analytic.add_argument("--dtype-bytes", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    analytic.add_argument("--config-json", default=None)
    add_protocol_arguments(analytic)
    args = parser.parse_args(argv)
    try:
        if args.command == "measure":
            if args.models is None and not args.config_json:
                args.models = [args.model]
            protocol = protocol_from_args(args)
            row = measure(protocol, args.model, args.method, args.context)
            text = json.dumps(row, indent=2)
            if args.out:
                Path(args.out).write_text(text + "\n", encoding="utf-8")
            print(text)
            return 0
        table = analytic_kv_table(protocol_from_args(args), dtype=_DTYPES[args.dtype_bytes])
        table["kv_GiB"] = table["kv_bytes"].astype(float) / 2**30
        print(table.to_string(index=False))
        return 0
    except (EfficiencyError, MeasurementFailedError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
