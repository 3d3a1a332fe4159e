"""Step 06 with the paper's protocol on a GPU: the rows of ``06_efficiency/`` at full depth.

The paper (docs/method.md §7) times decoding at 2K-32K tokens, batch 1, SparseMM at B = 256, on
the full-size models in bf16 on a GPU. This runs exactly that protocol
(:data:`sparsemm_utils.steps.efficiency.PAPER_GPU_PROTOCOL`): the real language-model shapes at
full depth with random weights (speed and memory do not depend on the weights' values), FullKV on
transformers' ``DynamicCache`` and on a preallocated ``StaticCache``, and SparseMM; 100 timed
decode steps, peak memory (``torch.cuda.max_memory_allocated``) over 512 generated tokens, one
fresh process per (model, method, context). It writes step 06's files in step 06's schema
(``results.csv`` with the GPU named in ``device``, ``analytic_kv.csv``, ``targets.csv``,
``findings.csv``, ``config.json``, ``measurements/*.json``) into ``<run-dir>/06_efficiency/``, so
``notebooks/06_efficiency.ipynb``'s tables and the findings read them as any run's, and the
findings hold or fail against the paper's numbers (the run is comparable: full depth, GPU, 32K).

    python benchmarks/gpu_paper_protocol.py --run-dir runs/gpu_paper                 # all three models
    python benchmarks/gpu_paper_protocol.py --run-dir runs/gpu_vicuna --models llava-next-vicuna-7b
    python benchmarks/gpu_paper_protocol.py --run-dir /tmp/dry --dry-run --models qwen2-vl-2b   # CPU check

Without a GPU it stops before any process starts, saying so. ``--dry-run`` runs the same code on
the CPU at 1 layer, float32, 64-128 tokens and a few steps (:data:`DRY_RUN_CHANGES`), to check an
installation before a GPU is rented. Each measurement of the full protocol builds a 7B model and
generates 512 tokens, so expect roughly a minute per (model, method, context) cell (45 cells for
the three models; run one model per call where GPU time is counted).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparsemm_utils.efficiency import EfficiencyError, MeasurementFailedError
from sparsemm_utils.reference_numbers import REFERENCE_MODELS
from sparsemm_utils.steps.efficiency import DRY_RUN_CHANGES, PAPER_GPU_PROTOCOL, paper_protocol_config, run_step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="results go to <run-dir>/06_efficiency")
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS), help="real shapes (default: the paper's three)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help=f"default {list(PAPER_GPU_PROTOCOL['contexts'])} ({list(DRY_RUN_CHANGES['contexts'])} with --dry-run)")
    parser.add_argument("--device", default=None, help="cuda or cuda:<i> (default cuda; cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="the same path on the CPU at a tiny depth and context")
    args = parser.parse_args(argv)
    changes = {k: v for k, v in (("contexts", args.contexts), ("device", args.device)) if v is not None}
    try:
        cfg = paper_protocol_config(args.run_dir, models=args.models, dry_run=args.dry_run, **changes)
        run_step(cfg, lambda line: print(line, flush=True))
    except (EfficiencyError, MeasurementFailedError, KeyError) as exc:
        hint = "" if args.dry_run else " (no GPU here? --dry-run checks the same path on the CPU)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
