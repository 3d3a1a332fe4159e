"""Per-token decode latency against context length over synthetic prefilled caches, any real shape.

The benchmark is :mod:`sparsemm_utils.decode_benchmark` (this file runs its command line; see its
docstring for what is timed and how): the caches are filled with random keys and values instead
of running a prefill, FullKV (``DynamicCache``), FullKV on a preallocated ``StaticCache`` and one
compressing method (SparseMM by default) alternate step by step, and CPU time and wall time are
reported per step with a full-depth estimate from the measured per-layer and fixed costs.

    nice -n 10 .venv/bin/python benchmarks/decode_latency.py --shape llava-next-vicuna-7b --layers 2 \\
        --contexts 2048 8192 32768
    .venv/bin/python benchmarks/decode_latency.py --shape qwen2-vl-7b --contexts 1024 4096 --steps 3 --repeats 2
"""

from __future__ import annotations

from sparsemm_utils.decode_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
