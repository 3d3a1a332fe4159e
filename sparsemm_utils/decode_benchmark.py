"""Decode-only latency of any real shape over synthetic prefilled caches (docs/method.md §7).

Step 06 (:mod:`sparsemm_utils.efficiency`) runs the paper's protocol: a real prefill and a whole
generation in a fresh process per (model, method, context). On a CPU its quadratic prefill makes
long contexts impractical (171 s at 16K on 2 cores, 32K out of reach), and one process per cell
times each method under a different load. This benchmark times what a decode step costs, and only
that:

- **Synthetic prefilled states**: every layer's cache is filled directly with random keys and
  values of the real shape (1, H_kv, n, head_dim), no prefill is run: one decode step costs the
  same whatever values the cache holds. The compressing method (one, e.g. SparseMM) still
  compresses them as at prefill: SnapKV's scores of w random post-RoPE window queries choose the
  kept tokens, with the caps of :func:`~sparsemm_utils.efficiency.make_method` (SparseMM: the
  skewed synthetic head scores); the baselines (:data:`~sparsemm_utils.efficiency.BASELINES`:
  ``fullkv`` on transformers' ``DynamicCache``, ``fullkv_static`` on the preallocated
  ``StaticCache``) hold all n tokens. All caches are filled from the same random tensors.
- **Methods interleaved step by step**: decode step i of every method runs back to back, so all
  see the same machine load; ``warmup`` untimed steps first, then ``repeats`` rounds of ``steps``
  timed ones (the caches keep growing, one token per step, as in generation).
- **CPU time and wall time** of every step (``time.process_time``: the process's CPU seconds,
  which other processes on a shared machine disturb far less than the wall clock), reported as
  mean, median and min, and the spread of the per-round medians (max / min) as the noise.
- **Full-depth estimate**: forward hooks time each decoder layer and the output projection inside
  every step, so a step splits into per-layer cost c_layer (the mean over the layers run), output
  layer c_head and the fixed rest c_fixed (embedding, final norm, mask, Python). A step of the real
  model is then estimated as c_fixed + L x c_layer + c_head x V / V' (L the real depth, V the real
  vocabulary, V' the run's), per step, and its median reported (``full_depth_cpu_ms``,
  ``full_depth_wall_ms``).

Command (one shape at a time; any of :data:`~sparsemm_utils.real_shapes.REAL_SHAPES`)::

    nice -n 10 python -m sparsemm_utils.decode_benchmark --shape llava-next-vicuna-7b --layers 2 \\
        --contexts 2048 8192 32768 --out runs/decode/vicuna.csv

Memory: the two baselines hold n x H_kv x head_dim x 2 x 4 bytes per layer each in float32
(1 GiB per layer for Vicuna at 32K), DynamicCache's append a transient copy of one layer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from sparsemm_utils.attention_hooks import set_text_attention, text_attention_implementation
from sparsemm_utils.compression import model_shape
from sparsemm_utils.efficiency import (
    BASELINES,
    EFFICIENCY_METHODS,
    InvalidEfficiencyConfigError,
    analytic_method_kv_bytes,
    baseline_cache,
    describe_device,
    make_method,
)
from sparsemm_utils.kv_cache import cache_kv_bytes
from sparsemm_utils.models import LoadedModel
from sparsemm_utils.real_shapes import REAL_SHAPES, RESERVED_TOKEN_IDS, RealShape, build_random_model, depth_scaled_vocab, get_real_shape
from sparsemm_utils.validate import check_choice, check_fraction, check_int
from sparsemm_utils.varlen_attention import DECODE_BACKENDS, compression_with_backend

__all__ = [
    "COLUMNS",
    "DecodeBenchmarkConfig",
    "StageClock",
    "run_decode_benchmark",
    "format_table",
    "main",
]

#: Columns of the benchmark's table, in this order (times in ms per decode step).
COLUMNS: tuple[str, ...] = (
    "shape", "layers", "full_layers", "vocab_size", "full_vocab_size", "method", "context_len", "budget",
    "timed_steps", "repeats", "cpu_ms_mean", "cpu_ms_median", "cpu_ms_min", "wall_ms_mean", "wall_ms_median",
    "wall_ms_min", "cpu_round_spread", "wall_round_spread", "layer_cpu_ms", "head_cpu_ms", "fixed_cpu_ms",
    "full_depth_cpu_ms", "full_depth_wall_ms", "kv_bytes", "kv_bytes_analytic", "decode_attention", "device",
)


@dataclass(frozen=True)
class DecodeBenchmarkConfig:
    """What :func:`run_decode_benchmark` times (validated in ``__post_init__``).

    Args:
        shape: a :class:`~sparsemm_utils.real_shapes.RealShape` or its name (normalised to the shape).
        contexts: prompt lengths n held in the caches (strictly increasing).
        methods: :data:`~sparsemm_utils.efficiency.EFFICIENCY_METHODS`: any baselines and at most
            one compressing method (one compression session at a time).
        layers: decoder layers built (None: the real depth).
        vocab: "depth_scaled" (the output layer keeps its real share of a step) or "real".
        budget, window, ratio, head_scores: the compressing method's B, w, r and SparseMM's
            synthetic scores (as :class:`~sparsemm_utils.efficiency.EfficiencyProtocol`'s).
        steps: timed steps per round; repeats: rounds; warmup: untimed steps before the first.
        decode_attention: the compressed cache's decode path ("auto" or one of
            :data:`~sparsemm_utils.varlen_attention.DECODE_BACKENDS`).
        threads: CPU threads (None: torch's default; 1 on a shared CPU).
        seed: weights, cache states and synthetic scores.
    """

    shape: RealShape | str = "llava-next-vicuna-7b"
    contexts: tuple[int, ...] = (2048, 8192, 32768)
    methods: tuple[str, ...] = ("fullkv", "fullkv_static", "sparsemm")
    layers: int | None = 2
    vocab: Literal["depth_scaled", "real"] = "depth_scaled"
    budget: int = 256
    window: int = 32
    ratio: float = 0.1
    head_scores: Literal["skewed", "uniform"] = "skewed"
    steps: int = 5
    repeats: int = 3
    warmup: int = 2
    decode_attention: str = "auto"
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        err = InvalidEfficiencyConfigError
        object.__setattr__(self, "shape", get_real_shape(self.shape))
        for name in ("contexts", "methods"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise err(f"{name} must be a non-empty list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        contexts = tuple(check_int("each context", n, 1, error=err) for n in self.contexts)
        if any(b <= a for a, b in zip(contexts, contexts[1:])):
            raise err(f"contexts must be strictly increasing, got {list(contexts)}")
        methods = tuple(check_choice("each method", str(m).lower(), EFFICIENCY_METHODS, error=err) for m in self.methods)
        if len(set(methods)) != len(methods):
            raise err(f"methods lists a method twice: {list(methods)}")
        if len(self.compressing) > 1:
            raise err(
                f"methods holds {len(self.compressing)} compressing methods {list(self.compressing)}: one at a time (one "
                f"compression session per model); run the benchmark once per method"
            )
        object.__setattr__(self, "methods", methods)
        self.shape.check_layers(self.layers)
        check_choice("vocab", self.vocab, ("depth_scaled", "real"), error=err)
        check_int("window", self.window, 1, error=err)
        if check_int("budget", self.budget, 2, error=err) <= self.window:
            raise err(f"budget B={self.budget} must exceed the window w={self.window} (docs/method.md §5)")
        check_fraction("ratio", self.ratio, error=err)
        check_choice("head_scores", self.head_scores, ("skewed", "uniform"), error=err)
        check_int("steps", self.steps, 1, error=err)
        check_int("repeats", self.repeats, 1, error=err)
        check_int("warmup", self.warmup, 0, error=err)
        check_choice("decode_attention", self.decode_attention, ("auto", *DECODE_BACKENDS), error=err)
        if self.threads is not None:
            check_int("threads", self.threads, 1, error=err)
        check_int("seed", self.seed, 0, error=err)

    @property
    def compressing(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if str(m).lower() not in BASELINES)

    @property
    def new_tokens(self) -> int:
        """Tokens appended to every cache: warmup + steps x repeats (the StaticCache's spare rows)."""
        return self.warmup + self.steps * self.repeats

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size if self.vocab == "real" else depth_scaled_vocab(self.shape, self.layers)


class StageClock:
    """CPU and wall seconds spent in each decoder layer and in the output layer of ``loaded``'s
    forward passes, through forward pre-hooks and hooks (removed by :meth:`close`).

    After a pass, ``layers`` and ``head`` hold (cpu_s, wall_s) summed over the layers run and for
    the output projection; :meth:`reset` zeroes them before the next pass."""

    def __init__(self, loaded: LoadedModel):
        self._handles: list[Any] = []
        self._started: dict[int, tuple[float, float]] = {}
        self.layers = [0.0, 0.0]
        self.head = [0.0, 0.0]
        for module in loaded.language_model.layers:
            self._watch(module, self.layers)
        self._watch(loaded.model.lm_head, self.head)

    def _watch(self, module: torch.nn.Module, total: list[float]) -> None:
        def pre(mod: torch.nn.Module, *_: Any) -> None:
            self._started[id(mod)] = (time.process_time(), time.perf_counter())

        def post(mod: torch.nn.Module, *_: Any) -> None:
            cpu, wall = self._started.pop(id(mod))
            total[0] += time.process_time() - cpu
            total[1] += time.perf_counter() - wall

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.layers[:] = [0.0, 0.0]
        self.head[:] = [0.0, 0.0]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _random_states(shape: RealShape, n: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values (1, H_kv, n, head_dim) of ``shape``."""
    size = (1, shape.kv_heads, n, shape.head_dim)
    return torch.randn(size, generator=generator, dtype=dtype), torch.randn(size, generator=generator, dtype=dtype)


@contextlib.contextmanager
def _filled_caches(loaded: LoadedModel, config: DecodeBenchmarkConfig, n: int) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Every method's cache holding ``n`` synthetic prompt tokens per layer (the compressing
    method's already compressed), inside the compression session when there is one. Yields
    ({method: cache}, the compressed cache's decode attention name or None)."""
    shape, mshape = config.shape, model_shape(loaded)
    generator = torch.Generator().manual_seed(config.seed + n)
    caches: dict[str, Any] = {
        m: baseline_cache(m, loaded.text_config, n + config.new_tokens) for m in config.methods if m in BASELINES
    }
    if config.compressing:
        method = config.compressing[0]
        press = make_method(method, config, mshape)
        session_cm = compression_with_backend(loaded, press, backend=config.decode_attention, decode_reserve=config.new_tokens)
    else:
        method, session_cm = None, contextlib.nullcontext()
    with session_cm as session:
        for layer_idx in range(mshape.layers):
            keys, values = _random_states(shape, n, generator, loaded.dtype)
            for cache in caches.values():
                cache.update(keys, values, layer_idx)
            if method is not None:
                query = torch.randn((1, shape.query_heads, min(config.window, n), shape.head_dim), generator=generator, dtype=loaded.dtype)
                session.cache.update(keys, values, layer_idx)
                session.prefill_layer(layer_idx, query, keys, shape.head_dim**-0.5)
            del keys, values
        attention = None
        if method is not None:
            caches[method] = session.cache
            attention = text_attention_implementation(loaded.model)  # the per-head attention the session chose
        try:
            yield caches, attention
        finally:
            if attention is not None:
                set_text_attention(loaded.model, attention)  # as the session left it, for its own exit
            caches.clear()


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float))) * 1e3


def _summary(config: DecodeBenchmarkConfig, mshape_layers: int, record: dict[str, list[float]]) -> dict[str, float]:
    """Mean / median / min of the timed steps, the spread of the rounds' medians, and the stage
    split with the full-depth estimate (docs in the module)."""
    out: dict[str, float] = {}
    for clock in ("cpu", "wall"):
        total = np.asarray(record[clock])
        out[f"{clock}_ms_mean"] = float(total.mean()) * 1e3
        out[f"{clock}_ms_median"] = float(np.median(total)) * 1e3
        out[f"{clock}_ms_min"] = float(total.min()) * 1e3
        rounds = [np.median(total[r * config.steps : (r + 1) * config.steps]) for r in range(config.repeats)]
        out[f"{clock}_round_spread"] = float(max(rounds) / min(rounds)) if min(rounds) > 0 else float("nan")
        layers, head = np.asarray(record[f"{clock}_layers"]), np.asarray(record[f"{clock}_head"])
        fixed = total - layers - head
        scale_head = config.shape.vocab_size / config.vocab_size
        estimate = fixed + config.shape.layers * layers / mshape_layers + head * scale_head
        out[f"full_depth_{clock}_ms"] = float(np.median(estimate)) * 1e3
        if clock == "cpu":
            out["layer_cpu_ms"] = float(np.median(layers / mshape_layers)) * 1e3
            out["head_cpu_ms"] = float(np.median(head)) * 1e3
            out["fixed_cpu_ms"] = float(np.median(fixed)) * 1e3
    return out


def run_decode_benchmark(
    config: DecodeBenchmarkConfig, *, loaded: LoadedModel | None = None, log: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Time one decode step of every method at every context (see the module doc); one row per
    (context, method), :data:`COLUMNS`. ``loaded``: a model of ``config``'s shape, depth and
    vocabulary already built (default: :func:`~sparsemm_utils.real_shapes.build_random_model`,
    float32 on the CPU). Timings are measured, never asserted."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    shape = config.shape
    if loaded is None:
        loaded = build_random_model(
            shape, layers=config.layers, vocab_size=config.vocab_size,
            max_position_embeddings=max(shape.max_position_embeddings, config.contexts[-1] + config.new_tokens),
            seed=config.seed,
        )
    mshape = model_shape(loaded)
    if (mshape.layers, int(loaded.text_config.vocab_size)) != (shape.check_layers(config.layers), config.vocab_size):
        raise InvalidEfficiencyConfigError(
            f"the model given has {mshape.layers} layers and vocabulary {loaded.text_config.vocab_size}; the config asks "
            f"for {shape.check_layers(config.layers)} and {config.vocab_size}"
        )
    model = loaded.model
    token = torch.tensor([[int(loaded.text_config.vocab_size) - RESERVED_TOKEN_IDS - 1]], device=loaded.device)
    clock = StageClock(loaded)
    rows: list[dict[str, Any]] = []
    try:
        for n in config.contexts:
            with _filled_caches(loaded, config, n) as (caches, compressed_attention):
                kv = {m: cache_kv_bytes(c) for m, c in caches.items()}
                record = {m: {k: [] for k in ("cpu", "wall", "cpu_layers", "wall_layers", "cpu_head", "wall_head")} for m in caches}
                with torch.inference_mode():
                    for step in range(config.warmup + config.steps * config.repeats):
                        position = torch.full((1, 1), n + step, dtype=torch.long, device=loaded.device)
                        for method in config.methods:
                            set_text_attention(model, "sdpa" if method in BASELINES else compressed_attention)
                            clock.reset()
                            cpu, wall = time.process_time(), time.perf_counter()
                            model(input_ids=token, past_key_values=caches[method], position_ids=position, use_cache=True)
                            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                            if step >= config.warmup:
                                r = record[method]
                                r["cpu"].append(cpu), r["wall"].append(wall)
                                r["cpu_layers"].append(clock.layers[0]), r["wall_layers"].append(clock.layers[1])
                                r["cpu_head"].append(clock.head[0]), r["wall_head"].append(clock.head[1])
                for method in config.methods:
                    row = {
                        "shape": shape.name, "layers": mshape.layers, "full_layers": shape.layers,
                        "vocab_size": config.vocab_size, "full_vocab_size": shape.vocab_size, "method": method,
                        "context_len": n, "budget": None if method in BASELINES else config.budget,
                        "timed_steps": config.steps * config.repeats, "repeats": config.repeats,
                        **_summary(config, mshape.layers, record[method]),
                        "kv_bytes": kv[method],
                        "kv_bytes_analytic": analytic_method_kv_bytes(method, config, mshape, shape.head_dim, n, loaded.dtype),
                        "decode_attention": f"sdpa ({type(caches[method]).__name__})" if method in BASELINES else compressed_attention,
                        "device": describe_device(loaded.device),
                    }
                    rows.append(row)
                    if log is not None:
                        log(
                            f"{shape.name} {method:>13} n={n:>6}: CPU {row['cpu_ms_median']:8.1f} ms/step (wall "
                            f"{row['wall_ms_median']:8.1f}; round spread {row['cpu_round_spread']:.2f}), full depth est. "
                            f"{row['full_depth_cpu_ms']:8.1f} ms, KV {kv[method] / 2**20:9.1f} MiB"
                        )
            gc.collect()
    finally:
        clock.close()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("budget", "kv_bytes_analytic"):
        frame[column] = frame[column].astype("Int64")
    return frame


def format_table(frame: pd.DataFrame) -> str:
    """Per context: every method's median CPU and wall ms per step at the run's depth and the
    full-depth estimate, and each baseline / method ratio (CPU time) at both depths."""
    lines = []
    for (shape, n), rows in frame.groupby(["shape", "context_len"], sort=False):
        rows = rows.set_index("method")
        first = rows.iloc[0]
        lines.append(f"{shape} n={n} ({int(first['layers'])} of {int(first['full_layers'])} layers; ms per decode step, median)")
        for method, r in rows.iterrows():
            ratios = "; ".join(
                f"{base} / {method}: {rows.loc[base, 'cpu_ms_median'] / r['cpu_ms_median']:.2f}x run, "
                f"{rows.loc[base, 'full_depth_cpu_ms'] / r['full_depth_cpu_ms']:.2f}x full depth"
                for base in BASELINES
                if base in rows.index and base != method and (base == "fullkv" or method not in BASELINES)
            )
            lines.append(
                f"  {method:>13}: CPU {r['cpu_ms_median']:9.1f}  wall {r['wall_ms_median']:9.1f}  full depth est. CPU "
                f"{r['full_depth_cpu_ms']:9.1f}  (layer {r['layer_cpu_ms']:.1f}, head {r['head_cpu_ms']:.1f}, fixed "
                f"{r['fixed_cpu_ms']:.1f}; round spread {r['cpu_round_spread']:.2f})" + (f"  [{ratios}]" if ratios else "")
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    d = DecodeBenchmarkConfig()
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.decode_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=d.shape.name, help=f"a real shape: {', '.join(REAL_SHAPES)} (default {d.shape.name})")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts))
    parser.add_argument("--methods", nargs="+", default=list(d.methods), help=f"baselines and at most one of {', '.join(EFFICIENCY_METHODS)}")
    parser.add_argument("--layers", type=int, default=d.layers, help=f"decoder layers built (default {d.layers}; 0 = the real depth)")
    parser.add_argument("--vocab", choices=("depth_scaled", "real"), default=d.vocab)
    parser.add_argument("--budget", type=int, default=d.budget)
    parser.add_argument("--window", type=int, default=d.window)
    parser.add_argument("--ratio", type=float, default=d.ratio)
    parser.add_argument("--head-scores", choices=("skewed", "uniform"), default=d.head_scores)
    parser.add_argument("--steps", type=int, default=d.steps, help=f"timed steps per round (default {d.steps})")
    parser.add_argument("--repeats", type=int, default=d.repeats, help=f"rounds (default {d.repeats})")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--decode-attention", choices=("auto", *DECODE_BACKENDS), default=d.decode_attention)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=None, help="write the table as CSV here")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeBenchmarkConfig)}
    values["layers"] = None if args.layers == 0 else args.layers
    try:
        config = DecodeBenchmarkConfig(**values)
    except (InvalidEfficiencyConfigError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"decode benchmark: {config}", flush=True)
    started = time.perf_counter()
    frame = run_decode_benchmark(config, log=lambda line: print(line, flush=True))
    print(format_table(frame))
    print(f"total {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU (process)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
