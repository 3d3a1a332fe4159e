"""Per-token decode latency against context length, FullKV versus SparseMM at B = 256, on CPU.

The model has Qwen2-VL-7B's attention shape (28 query heads, 4 KV heads, head_dim 128, hidden
3584, M-RoPE sections [16, 24, 24]) and its MLP width (18944), with random weights (speed does
not depend on their values, docs/method.md §7) and ``--layers`` decoder layers (default 2: a 28-layer
fp32 7B model does not fit a laptop-class CPU budget; every layer costs the same, so per-layer
time scales linearly). The prompt's KV states are random tensors of the real shape rather than a
prefill: a 16K-token prefill takes minutes on 2 CPU cores and does not change what one decode
step costs. For SparseMM the prefill's compression still runs as in generation: SnapKV's scores
of random post-RoPE window queries choose the kept tokens, with caps from skewed synthetic head
scores (the decode cost depends on the total B x L x H_kv, not on which heads hold it).

Each context length is timed over ``--steps`` single-token forward passes after ``--warmup``
untimed ones, FullKV (transformers' ``DynamicCache`` + sdpa) and SparseMM (``PerHeadKVCache`` +
the per-head attention of ``sparsemm_utils.compression``) alternating step by step, so that both
see the same load. The figure reported is the fastest
step (as ``timeit`` advises: on a CPU shared with other work, slower steps measure the other work),
the median is printed beside it. It prints; it asserts no timing. Expected shape: FullKV grows with the context (attention reads, and
``DynamicCache`` re-concatenates, n tokens per layer and step), SparseMM stays flat (it reads
about B tokens per KV head whatever n is).

    .venv/bin/python benchmarks/decode_latency.py                         # 1K .. 16K, 2 layers
    .venv/bin/python benchmarks/decode_latency.py --contexts 1024 4096 --steps 3
    .venv/bin/python benchmarks/decode_latency.py --layers 4 --threads 2
    .venv/bin/python benchmarks/decode_latency.py --intermediate 512    # the attention's share alone

About 1-3 minutes with the defaults on 2 idle CPU cores (building the 2-layer model included);
the 16K FullKV cache and the prefill's random states take about 1 GB besides the 1.9 GB model.

This is the quick in-process microbenchmark (no prefill, methods interleaved in one process).
Step 06 (:mod:`sparsemm_utils.efficiency`) runs the paper's protocol: a real prefill, the mean of
the decode steps, peak memory over a generation, one fresh process per measurement. Both share the
real shapes (:mod:`sparsemm_utils.real_shapes`), the synthetic head scores
(:func:`sparsemm_utils.efficiency.synthetic_head_scores`) and the decode paths
(``--decode-attention``, :mod:`sparsemm_utils.varlen_attention`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from sparsemm_utils.compression import SparseMMPress, compression, model_shape
from sparsemm_utils.efficiency import synthetic_head_scores
from sparsemm_utils.kv_cache import cache_kv_bytes
from sparsemm_utils.models import LoadedModel, set_text_attention, text_attention_implementation
from sparsemm_utils.real_shapes import REAL_SHAPES
from sparsemm_utils.random_models import build_tiny
from sparsemm_utils.varlen_attention import DECODE_BACKENDS, use_decode_backend

_QWEN2_VL_7B = REAL_SHAPES["qwen2-vl-7b"]
#: Qwen2-VL-7B-Instruct's language model widths (docs/method.md §1: 28 layers, 28 / 4 heads).
QWEN2_VL_7B_TEXT = dict(
    text_hidden=_QWEN2_VL_7B.hidden,
    text_heads=_QWEN2_VL_7B.query_heads,
    text_kv_heads=_QWEN2_VL_7B.kv_heads,
    text_intermediate=_QWEN2_VL_7B.intermediate,
)


@dataclass
class Row:
    """One context length: ms per decoded token (fastest step; median) and the KV bytes each cache
    holds right after the prefill."""

    context: int
    fullkv_ms: float
    sparsemm_ms: float
    fullkv_kv_bytes: int
    sparsemm_kv_bytes: int
    fullkv_median_ms: float = float("nan")
    sparsemm_median_ms: float = float("nan")


def build_model(layers: int, *, widths: dict | None = None, seed: int = 0) -> LoadedModel:
    """A Qwen2VLForConditionalGeneration with the given text widths (default Qwen2-VL-7B's) and
    ``layers`` decoder layers, random weights, float32, sdpa."""
    model, processor = build_tiny("qwen2_vl", seed=seed, text_layers=layers, **(widths or QWEN2_VL_7B_TEXT))
    return LoadedModel(model=model, processor=processor, model_type="qwen2_vl", name_or_path="benchmark")


def _random_states(shape, n: int, head_dim: int, generator: torch.Generator):
    keys = torch.randn(1, shape.kv_heads, n, head_dim, generator=generator)
    values = torch.randn(1, shape.kv_heads, n, head_dim, generator=generator)
    return keys, values


def _time_interleaved(loaded: LoadedModel, full: DynamicCache, session, n: int, steps: int, warmup: int):
    """Seconds of each timed single-token forward pass, FullKV and SparseMM alternating step by step
    (so that both see the same load on a shared CPU): FullKV runs the stock sdpa attention over
    ``full``, SparseMM the per-head attention over ``session.cache`` (inside its compression context)."""
    model = loaded.model
    token = torch.tensor([[ord("a") % model.config.get_text_config().vocab_size]])
    times: dict[str, list[float]] = {"fullkv": [], "sparsemm": []}
    per_head = text_attention_implementation(model)  # the per-head attention the session switched to
    runs = (("fullkv", "sdpa", full), ("sparsemm", per_head, session.cache))
    with torch.inference_mode():
        for step in range(warmup + steps):
            position = torch.full((1, 1), n + step, dtype=torch.long)
            for name, attention, cache in runs:
                set_text_attention(model, attention)
                start = time.perf_counter()
                model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    set_text_attention(model, per_head)  # as the compression context left it
    return times["fullkv"], times["sparsemm"]


def run_benchmark(
    contexts=(1024, 2048, 4096, 8192, 16384),
    *,
    budget: int = 256,
    window: int = 32,
    layers: int = 2,
    steps: int = 8,
    warmup: int = 2,
    widths: dict | None = None,
    seed: int = 0,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    decode_attention: str = "reference",
) -> list[Row]:
    """Time FullKV and SparseMM decoding at each context length; returns one :class:`Row` each.
    ``decode_attention``: SparseMM's decode path (:data:`~sparsemm_utils.varlen_attention.DECODE_BACKENDS`
    or "auto")."""
    loaded = loaded or build_model(layers, widths=widths, seed=seed)
    shape = model_shape(loaded)
    head_dim = loaded.head_dim
    scaling = head_dim**-0.5
    head_scores = synthetic_head_scores(shape, "skewed", seed, power=8)  # a few heads dominate
    press = SparseMMPress(budget=budget, window=window, head_scores=head_scores)
    text_config = loaded.model.config.get_text_config()
    rows = []
    for n in contexts:
        generator = torch.Generator().manual_seed(seed + n)
        # FullKV: the stock dynamic cache holding n tokens per layer
        full = DynamicCache(config=text_config)
        for layer_idx in range(shape.layers):
            full.update(*_random_states(shape, n, head_dim, generator), layer_idx)
        full_bytes = cache_kv_bytes(full)
        # SparseMM: the same kind of states, compressed at "prefill" by SnapKV with SparseMM's caps
        with compression(loaded, press, decode_reserve=steps + warmup) as session:
            use_decode_backend(loaded.model, decode_attention)
            for layer_idx in range(shape.layers):
                keys, values = _random_states(shape, n, head_dim, generator)
                query = torch.randn(1, shape.query_heads, n, head_dim, generator=generator)
                session.cache.update(keys, values, layer_idx)
                session.prefill_layer(layer_idx, query, keys, scaling)
                del keys, values, query
            sparse_bytes = session.cache.kv_bytes()
            full_s, sparse_s = _time_interleaved(loaded, full, session, n, steps, warmup)
        del full
        row = Row(
            n, min(full_s) * 1e3, min(sparse_s) * 1e3, full_bytes, sparse_bytes,
            float(np.median(full_s)) * 1e3, float(np.median(sparse_s)) * 1e3,
        )
        rows.append(row)
        if progress:
            print(
                f"  n={n:>6}: FullKV {row.fullkv_ms:8.2f} ms/token (median {row.fullkv_median_ms:8.2f}), "
                f"SparseMM {row.sparsemm_ms:8.2f} ms/token (median {row.sparsemm_median_ms:8.2f})",
                flush=True,
            )
    return rows


def format_rows(rows: list[Row]) -> str:
    """A table of the rows, plus the FullKV / SparseMM ratio at the longest context."""
    lines = [
        f"{'context':>8} {'FullKV ms/tok':>14} {'SparseMM ms/tok':>16} {'ratio':>6} {'FullKV KV MiB':>14} "
        f"{'SparseMM KV MiB':>16}   (fastest step; medians: FullKV / SparseMM)"
    ]
    for r in rows:
        lines.append(
            f"{r.context:>8} {r.fullkv_ms:>14.2f} {r.sparsemm_ms:>16.2f} {r.fullkv_ms / r.sparsemm_ms:>6.2f} "
            f"{r.fullkv_kv_bytes / 2**20:>14.2f} {r.sparsemm_kv_bytes / 2**20:>16.2f}   "
            f"({r.fullkv_median_ms:.2f} / {r.sparsemm_median_ms:.2f})"
        )
    longest = max(rows, key=lambda r: r.context)
    sparse = [r.sparsemm_ms for r in rows]
    lines.append(
        f"ratio FullKV / SparseMM at n = {longest.context}: {longest.fullkv_ms / longest.sparsemm_ms:.2f}x; "
        f"SparseMM spread over all contexts: max / min = {max(sparse) / min(sparse):.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per context")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps per context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--intermediate", type=int, default=QWEN2_VL_7B_TEXT["text_intermediate"],
        help="MLP width (default Qwen2-VL-7B's 18944; a small one isolates the attention's share)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-attention", choices=("auto", *DECODE_BACKENDS), default="reference",
                        help="SparseMM's decode path (default: the per-head reference loop)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = dict(QWEN2_VL_7B_TEXT, text_intermediate=args.intermediate)
    print(
        f"Qwen2-VL-7B attention shape (28 q / 4 kv heads, head_dim 128, hidden 3584), MLP {args.intermediate}, "
        f"{args.layers} layers, float32, CPU x{torch.get_num_threads()} threads; SparseMM B={args.budget}, "
        f"w={args.window}; fastest of {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    start = time.perf_counter()
    loaded = build_model(args.layers, widths=widths, seed=args.seed)
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    rows = run_benchmark(
        args.contexts, budget=args.budget, window=args.window, steps=args.steps, warmup=args.warmup,
        seed=args.seed, loaded=loaded, decode_attention=args.decode_attention,
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
