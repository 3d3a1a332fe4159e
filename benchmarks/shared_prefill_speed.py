"""Step 05's sweep on the tiny reader: per-cell ``compressed_generate`` vs one shared prefill + batched decode.

For N questions of the tiny reader's offline benchmark (``reader_docqa``, documents of the held-out
stream as step 05 draws them) and the methods x budgets of ``configs/tiny.yaml``'s step 05 (FastV
excluded: it changes the prefill itself, so it cannot share one), every question is answered by
every (method, budget) cell twice, in one process, the two paths alternating which goes first:

- per cell: ``compressed_generate(loaded, press, inputs, max_new_tokens=limit, do_sample=False)``,
  a prefill and a batch-1 greedy decode per cell (what step 05 runs today);
- shared: ``shared_generate(loaded, presses, inputs, max_new_tokens=limit)`` (one prefill, every
  cell's compressed cache a row of one batched decode), once per decode backend asked for.

It checks that both give every cell the same tokens and KV bytes, and prints questions per second
(CPU time and wall clock) and the speed-up. Timings are machine-dependent and never asserted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shared_prefill_speed.py --questions 30
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shared_prefill_speed.py --questions 30 --backends reference padded
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from sparsemm_utils.benchmarks import get_benchmark, load_benchmark, make_reader_benchmark
from sparsemm_utils.compression import compressed_generate, make_press, model_shape
from sparsemm_utils.head_scoring_files import load_head_scores
from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.reader_tasks import HELDOUT_SEED
from sparsemm_utils.shared_prefill import shared_generate

ROOT = Path(__file__).resolve().parents[1]
#: Methods of step 05 that cannot share a prefill (they change it): left out of both paths.
NOT_SHAREABLE = ("fastv", "mask", "mask_random")
BUDGET_FREE = ("fullkv",)


@dataclass
class Timing:
    """Accumulated CPU and wall seconds of one path."""

    cpu: float = 0.0
    wall: float = 0.0
    questions: int = 0
    mismatches: list[str] = field(default_factory=list)

    def rate(self) -> tuple[float, float]:
        """Questions per CPU second and per wall second."""
        return self.questions / self.cpu, self.questions / self.wall


def step05_cells(config: Path) -> tuple[list[tuple[str, int | None]], dict]:
    """(method, budget) cells of the config's step 05 (budget None for FullKV) and its settings."""
    step = yaml.safe_load(config.read_text())["steps"]["05_eval"]
    cells = []
    for method in step["methods"]:
        if method in NOT_SHAREABLE:
            continue
        cells += [(method, None)] if method in BUDGET_FREE else [(method, int(b)) for b in step["budgets"]]
    return cells, step


def presses_for(cells: list[tuple[str, int | None]], window: int, head_scores: np.ndarray) -> list:
    """The press of each cell as step 05 builds it (window w, ratio 0.1, seed 0, the head scores)."""
    extra = {"sparsemm": {"head_scores": head_scores, "ratio": 0.1}, "random": {"ratio": 0.1, "seed": 0}}
    out = []
    for method, budget in cells:
        kwargs = {} if budget is None else {"budget": budget, "window": window, **extra.get(method, {})}
        out.append(make_press(method, **kwargs))
    return out


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=30, help="questions of reader_docqa to answer (default 30)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--model", default=None, help="model (default: the config's model_id)")
    parser.add_argument("--head-scores", default=None, help="step 03's head_scores.json (default: seeded random scores)")
    parser.add_argument("--backends", nargs="+", default=["auto"], help="decode backends of the shared path to time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = Path(args.config)
    cells, step = step05_cells(config)
    model_id = args.model or yaml.safe_load(config.read_text())["params"]["model_id"]
    loaded = load_model(model_id)
    shape = model_shape(loaded)
    if args.head_scores:
        head_scores = load_head_scores(args.head_scores, (shape.layers, shape.query_heads))
    else:
        head_scores = np.random.default_rng(0).random((shape.layers, shape.query_heads))
    presses = presses_for(cells, int(step["window"]), head_scores)
    spec = get_benchmark("reader_docqa")
    limit = spec.generation_limit(loaded.model_type)
    documents = max(1, -(-args.questions // 2))  # 2-3 questions per page
    samples = list(load_benchmark("reader_docqa", source=make_reader_benchmark(documents, HELDOUT_SEED)))[: args.questions]
    prompts = [build_inputs(loaded, s.image, s.question) for s in samples]
    print(
        f"{model_id}: {len(prompts)} questions (prompts {min(p['input_ids'].shape[1] for p in prompts)}-"
        f"{max(p['input_ids'].shape[1] for p in prompts)} tokens, max_new_tokens {limit}), {len(cells)} cells each: "
        f"{', '.join(f'{m}@{b}' if b else m for m, b in cells)}; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    def per_cell(inputs):
        return [compressed_generate(loaded, p, inputs, max_new_tokens=limit, do_sample=False) for p in presses]

    def shared(inputs, backend):
        return shared_generate(loaded, presses, inputs, max_new_tokens=limit, backend=backend)

    per_cell(prompts[0])  # warm-up, untimed
    for backend in args.backends:
        shared(prompts[0], backend)
    timings = {"per cell": Timing(), **{f"shared ({b})": Timing() for b in args.backends}}
    for q, inputs in enumerate(prompts):
        order = list(timings) if q % 2 == 0 else list(reversed(timings))
        outputs = {}
        for name in order:
            if name == "per cell":
                result, cpu, wall = timed(lambda: per_cell(inputs))
            else:
                result, cpu, wall = timed(lambda: shared(inputs, name[len("shared (") : -1]))
            outputs[name] = result
            timing = timings[name]
            timing.cpu, timing.wall, timing.questions = timing.cpu + cpu, timing.wall + wall, timing.questions + 1
        for name in timings:
            if name == "per cell":
                continue
            for (method, budget), a, b in zip(cells, outputs["per cell"], outputs[name]):
                if not torch.equal(a.sequences, b.sequences) or int(a.kv_bytes) != int(b.kv_bytes):
                    timings[name].mismatches.append(f"question {q} {method}@{budget}")

    base_cpu, base_wall = timings["per cell"].rate()
    print(f"{'path':<20} {'q/s (CPU)':>10} {'q/s (wall)':>11} {'speed-up (CPU)':>15} {'speed-up (wall)':>16}  cells identical")
    for name, timing in timings.items():
        cpu_rate, wall_rate = timing.rate()
        same = "-" if name == "per cell" else ("yes" if not timing.mismatches else f"NO: {len(timing.mismatches)}")
        print(
            f"{name:<20} {cpu_rate:>10.2f} {wall_rate:>11.2f} {cpu_rate / base_cpu:>14.2f}x {wall_rate / base_wall:>15.2f}x  {same}"
        )
    mismatched = [m for t in timings.values() for m in t.mismatches]
    for m in mismatched[:10]:
        print("  differs:", m)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
