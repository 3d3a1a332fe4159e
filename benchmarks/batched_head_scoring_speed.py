"""Step 03's capture on the tiny reader at several batch sizes: documents per second, same captures.

Steps 01 and 03 of ``configs/tiny.yaml`` as a pipeline run builds them (its 48 documents, 32 new
tokens, top-k, explorer settings; :func:`sparsemm_utils.pipeline.step_config`), step 02's
regions mapped in memory, then :func:`sparsemm_utils.head_scoring_capture.capture_documents`
once per batch size: batch 1 is step 03 today (one greedy generation with the streamed row
capture per document), batch b generates b documents as one left-padded batch
(:func:`~sparsemm_utils.head_scoring_capture.capture_batch`). Prints documents per CPU second and
per wall second and checks every batch size gave batch 1's tokens, positions and
``head_scores.json`` bytes. Timings are machine-dependent and never asserted.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/batched_head_scoring_speed.py --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sparsemm_utils.head_scoring_capture import SampleCapture, capture_documents, score_captures
from sparsemm_utils.head_scoring_files import write_head_scores_json
from sparsemm_utils.models import load_model
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.pipeline import step_config
from sparsemm_utils.steps import head_scoring, ocr_annotation

ROOT = Path(__file__).resolve().parents[1]


def same_capture(a: SampleCapture, b: SampleCapture) -> bool:
    """Same document, tokens, argmax and top positions and key lengths."""
    return (a.doc_id, a.tokens.ids) == (b.doc_id, b.tokens.ids) and all(
        np.array_equal(getattr(a.captured, name), getattr(b.captured, name)) for name in ("argmax", "top_positions", "key_lengths")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--documents", type=int, default=None, help="the first n documents (default: the config's n_samples)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        documents = ocr_annotation.build_documents(step_config(ocr_annotation.STEP, args.config, tmp), progress=False)
        cfg = step_config(head_scoring.STEP, args.config, tmp)
        if args.documents is not None:
            cfg = replace(cfg, n_samples=args.documents)
        loaded = load_model(cfg.model_id, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
        regions = map_documents(documents, loaded.processor, loaded.model_type)
        n = len(documents) if cfg.n_samples is None else min(cfg.n_samples, len(documents))
        # warm-up (untimed): two documents at batch 2 and at batch 1
        for b in (2, 1):
            capture_documents(loaded, documents, regions, replace(cfg, n_samples=2, batch_size=b), progress=False)
        rows, base, failed = [], None, False
        for b in args.batch_sizes:
            cpu, wall = time.process_time(), time.perf_counter()
            samples = capture_documents(loaded, documents, regions, replace(cfg, batch_size=b), progress=False)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            result = score_captures(samples, cfg.match, cfg.selection, cfg.top_k)
            scores = write_head_scores_json(result.sample_scores, Path(tmp) / f"head_scores_{b}.json").read_bytes()
            base = base or (cpu, wall, samples, scores)
            same = scores == base[3] and all(same_capture(x, y) for x, y in zip(samples, base[2], strict=True))
            failed |= not same
            rows.append((b, n / cpu, n / wall, base[0] / cpu, base[1] / wall, cpu, wall, same))
    print(f"{cfg.model_id}, {n} documents, max_new_tokens {cfg.max_new_tokens}, top_k {cfg.top_k}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'doc/s CPU':>9} {'doc/s wall':>10} {'x CPU':>6} {'x wall':>6} {'CPU s':>7} {'wall s':>7}  same head_scores.json as batch 1")
    for b, dc, dw, xc, xw, cpu, wall, same in rows:
        print(f"{b:>5} {dc:>9.2f} {dw:>10.2f} {xc:>5.2f}x {xw:>5.2f}x {cpu:>7.1f} {wall:>7.1f}  {'yes' if same else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
