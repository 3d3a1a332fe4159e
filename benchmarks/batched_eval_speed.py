"""Step 05's sweep on the tiny reader at several batch sizes: questions per second, same answers.

The sweep of ``configs/tiny.yaml``'s step 05 (its methods, budgets, window, FastV's K; head
scores seeded random, as speed does not depend on them) over the first N questions of its
offline benchmark (``reader_docqa`` on the held-out page stream), run by
:func:`sparsemm_utils.evaluation.run_sweep` with :class:`~sparsemm_utils.evaluation.ModelGenerator`
into a temporary folder once per batch size. Batch 1 is step 05 today: one shared prefill per
question for the methods that allow it, all its cells decoded together, FastV one by one;
batch b answers b questions at once (one left-padded prefill and one decode of every
(question, cell) row, :func:`sparsemm_utils.shared_prefill.shared_generate_batch`; FastV still
one by one). Prints questions per CPU second and per wall second for the whole sweep and, with
``--shareable-only``, for the cells that share a prefill, and checks every batch size wrote the
same predictions (every field but ``seconds``) as batch 1. Timings are machine-dependent and
never asserted.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/batched_eval_speed.py --questions 64 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sparsemm_utils.compression import model_shape
from sparsemm_utils.evaluation import ModelGenerator, read_predictions, run_sweep
from sparsemm_utils.models import load_model
from sparsemm_utils.steps.eval import Config

ROOT = Path(__file__).resolve().parents[1]
#: Methods of step 05 that run one by one (they change the prefill).
NOT_SHAREABLE = ("fastv", "mask", "mask_random")


def step05_config(config: Path, questions: int, shareable_only: bool) -> Config:
    """Step 05's Config of ``config`` with enough documents for ``questions`` questions (2-3 per page)."""
    raw = yaml.safe_load(config.read_text())
    step = dict(raw["steps"]["05_eval"])
    if shareable_only:
        step["methods"] = [m for m in step["methods"] if m not in NOT_SHAREABLE]
    step["n_documents"] = max(1, -(-questions // 2))
    step["limit"] = questions
    step.pop("batch_size", None)
    return Config(model_id=raw["params"]["model_id"], **step)


def sweep(
    cfg: Config, generator: ModelGenerator, samples: dict, batch_size: int, out: Path
) -> tuple[float, float, list]:
    """One sweep into ``out``; returns (CPU seconds, wall seconds, predictions without ``seconds``)."""
    cpu, wall = time.process_time(), time.perf_counter()
    run_sweep(
        out, model=cfg.model_id, benchmarks=samples, methods=cfg.methods, budgets=cfg.budgets, generate=generator,
        settings={}, progress=False, log=None, batch_size=batch_size,
    )  # fmt: skip
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    records, _ = read_predictions(out / "predictions.jsonl")
    return cpu, wall, [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=64, help="questions of reader_docqa (default 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument(
        "--shareable-only", action="store_true", help="also time the sweep without FastV and the head masks"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    modes = [False, True] if args.shareable_only else [False]
    loaded = None
    rows = []
    failed = False
    for shareable in modes:
        cfg = step05_config(Path(args.config), args.questions, shareable)
        loaded = loaded or load_model(cfg.model_id)
        shape = model_shape(loaded)
        scores = np.random.default_rng(0).random((shape.layers, shape.query_heads))
        samples = cfg.load_benchmarks()
        n = sum(len(s) for s in samples.values())
        generator = ModelGenerator(loaded, cfg.press_settings(scores), max_new_tokens=cfg.max_new_tokens)
        label = "shareable cells" if shareable else "step 05 sweep"
        with tempfile.TemporaryDirectory() as tmp:
            # warm-up (untimed): one question at the largest batch size's code path and at batch 1
            warm = {k: [v[0], v[1]] for k, v in samples.items()}
            sweep(cfg, generator, warm, 2, Path(tmp) / "warm2")
            sweep(cfg, generator, warm, 1, Path(tmp) / "warm1")
            base = None
            for b in args.batch_sizes:
                cpu, wall, predictions = sweep(cfg, generator, samples, b, Path(tmp) / f"b{b}")
                base = base or (cpu, wall, predictions)
                same = predictions == base[2]
                failed |= not same
                speed = (n / cpu, n / wall, base[0] / cpu, base[1] / wall)
                rows.append((label, len(cfg.methods), n, b, *speed, cpu, wall, same))
    print(f"{cfg.model_id}, {cfg.benchmarks[0]}, max_new_tokens per benchmark limit; torch threads {torch.get_num_threads()}")
    print(f"{'sweep':<16} {'methods':>7} {'questions':>9} {'batch':>5} {'q/s CPU':>8} {'q/s wall':>8} {'x CPU':>6} {'x wall':>6} "
          f"{'CPU s':>7} {'wall s':>7}  same answers as batch 1")
    for label, methods, n, b, qc, qw, xc, xw, cpu, wall, same in rows:
        print(f"{label:<16} {methods:>7} {n:>9} {b:>5} {qc:>8.2f} {qw:>8.2f} {xc:>5.2f}x {xw:>5.2f}x {cpu:>7.1f} {wall:>7.1f}  {'yes' if same else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
