"""Peak memory and time of the scoring pass (step 03), streamed row capture versus the eager
reference, against sequence length, on CPU.

The model is the tiny Qwen2-VL of the real class (4 layers, 8 query heads on 2 KV heads, the real
image-processor geometry); a LARGE image makes the sequence long: a page of ``28 gh x 28 gw``
pixels becomes ``gh x gw`` visual tokens, chosen so that prompt + image reach the target N
(1K, 2K, 4K, 8K by default). The scoring pass is what step 03 runs per sample:
``attention_capture.generate_with_rows`` (prefill + ``--new-tokens`` greedy decode steps, with
the rows the rule needs), vision tower and processor output included.

- ``streamed``: the row capture (sdpa for the output, one (heads, N) row per layer and step):
  memory should grow LINEARLY in N.
- ``reference``: eager attention + ``output_attentions=True``, which keeps the (heads, N, N)
  prefill weights of every layer: 4 layers x 8 heads x N^2 x 4 bytes = 2 GiB at 8K, plus the
  eager softmax's transients, so it grows QUADRATICALLY.

Each (method, N) runs once, in its own fresh process (model built, one small warm-up pass, freed
heap trimmed); its peak is the process's peak resident memory during the pass (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) minus its resident memory just before; the pass
starts at the processor (its pixel patches count) and ends when the rows are reduced. A reference run whose predicted peak exceeds
``--reference-budget`` of the memory available at start is not run (the machine is shared);
its prediction is printed instead and marked. It prints; it asserts nothing:

    .venv/bin/python benchmarks/head_scoring_memory.py
    .venv/bin/python benchmarks/head_scoring_memory.py --lengths 1024 2048 --new-tokens 2

About 2-4 minutes with the defaults on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/meminfo")


def grid_for(n_image_tokens: int) -> tuple[int, int]:
    """(grid_h, grid_w) with grid_h * grid_w close to ``n_image_tokens``, nearly square."""
    grid_w = max(8, round(math.sqrt(n_image_tokens)))
    grid_h = max(8, round(n_image_tokens / grid_w))
    return grid_h, grid_w


def child(method: str, target: int, new_tokens: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import numpy as np
    import torch
    from PIL import Image

    from sparsemm_utils.attention_capture import CaptureSpec, generate_with_rows
    from sparsemm_utils.models import load_model
    from sparsemm_utils.prompts import build_inputs, image_token_span

    torch.set_num_threads(threads)
    loaded = load_model("tiny-random/qwen2_vl")
    small = Image.new("RGB", (224, 224), "white")
    text_tokens = build_inputs(loaded, small)["input_ids"].shape[1] - 64  # 224 px: 8 x 8 = 64 image tokens
    grid_h, grid_w = grid_for(target - text_tokens)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (28 * grid_h, 28 * grid_w, 3), dtype=np.uint8))
    # warm-up on the small page (kernels, thread pools), not measured
    generate_with_rows(loaded, build_inputs(loaded, small), max_new_tokens=2, method=method)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is live memory
    baseline = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    inputs = build_inputs(loaded, image)  # the processor's pixel patches are part of the pass
    span = image_token_span(inputs["input_ids"], loaded.image_token_id)
    spec = CaptureSpec(top_k=5, image_span=span)
    ids, captured = generate_with_rows(loaded, inputs, max_new_tokens=new_tokens, spec=spec, method=method)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    n = int(inputs["input_ids"].shape[1])
    return {
        "method": method,
        "n": n,
        "image_tokens": span[1],
        "grid": [grid_h, grid_w],
        "new_tokens": int(len(ids)),
        "peak_bytes": peak - baseline,
        "baseline_bytes": baseline,
        "seconds": seconds,
        "layers": loaded.num_layers,
        "heads": loaded.num_heads,
    }


def predicted_reference_bytes(n: int, layers: int = 4, heads: int = 8) -> int:
    """The reference's attention weights alone: every layer's (heads, N, N) float32 prefill weights
    kept by output_attentions, plus one layer's eager transients (logits and softmax, 2 more)."""
    return (layers + 2) * heads * n * n * 4


def run_child(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"method": method, "n": n, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_gib(value: float) -> str:
    return f"{value / GIB:7.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=4, help="greedy decode steps after the prefill")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-budget", type=float, default=0.4,
                        help="run the reference only if its predicted peak is below this share of MemAvailable")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.new_tokens, args.threads)))
        return 0

    available, total = _meminfo_bytes("MemAvailable"), _meminfo_bytes("MemTotal")
    print(f"memory: {total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available; threads={args.threads}, "
          f"{args.new_tokens} new tokens per pass; tiny Qwen2-VL (4 layers, 8 query / 2 KV heads)\n")
    rows: dict[tuple[str, int], dict] = {}
    for target in args.lengths:
        for method in ("streamed", "reference"):
            if method == "reference" and predicted_reference_bytes(target) > args.reference_budget * available:
                rows[(method, target)] = {"method": method, "n": target, "skipped": True,
                                          "predicted_bytes": predicted_reference_bytes(target)}
                continue
            rows[(method, target)] = run_child(method, target, args)
            r = rows[(method, target)]
            msg = r.get("error") or f"N={r['n']} peak {fmt_gib(r['peak_bytes'])} GiB in {r['seconds']:.1f} s"
            print(f"  {method:9s} target {target:6d}: {msg}", flush=True)

    print("\n   target       N   streamed GiB   s    reference GiB   s      ratio ref/streamed")
    streamed_points = []
    for target in args.lengths:
        s, r = rows[("streamed", target)], rows[("reference", target)]
        if "error" in s:
            print(f"  {target:7d}  streamed failed: {s['error']}")
            continue
        streamed_points.append((s["n"], s["peak_bytes"]))
        if r.get("skipped"):
            ref_txt = f"{fmt_gib(r['predicted_bytes'])}*      -"
            ratio = r["predicted_bytes"] / s["peak_bytes"]
            ratio_txt = f"{ratio:8.1f}x (* predicted, not run)"
        elif "error" in r:
            ref_txt, ratio_txt = "   failed        ", r["error"]
        else:
            ref_txt = f"{fmt_gib(r['peak_bytes'])}  {r['seconds']:6.1f}"
            ratio_txt = f"{r['peak_bytes'] / s['peak_bytes']:8.1f}x"
        print(f"  {target:7d} {s['n']:7d}  {fmt_gib(s['peak_bytes'])}  {s['seconds']:6.1f}    {ref_txt}   {ratio_txt}")

    measured_ref = [(rows[("reference", t)]["n"], rows[("reference", t)]["peak_bytes"])
                    for t in args.lengths if "peak_bytes" in rows[("reference", t)]]
    if measured_ref:
        print("\nreference: measured vs predicted attention weights ((L + 2) x H x N^2 x 4 bytes):")
        for n, peak in measured_ref:
            print(f"  N={n:6d}: measured {fmt_gib(peak)} GiB, predicted {fmt_gib(predicted_reference_bytes(n))} GiB")

    if len(streamed_points) >= 2:
        ns = [float(n) for n, _ in streamed_points]
        peaks = [float(p) for _, p in streamed_points]
        mean_n, mean_p = sum(ns) / len(ns), sum(peaks) / len(peaks)
        slope = sum((x - mean_n) * (y - mean_p) for x, y in zip(ns, peaks)) / sum((x - mean_n) ** 2 for x in ns)
        intercept = mean_p - slope * mean_n
        ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(ns, peaks))
        ss_tot = sum((y - mean_p) ** 2 for y in peaks) or 1.0
        (n_a, p_a), (n_b, p_b) = streamed_points[-2], streamed_points[-1]
        print(f"\nstreamed: linear fit peak = {intercept / 2**20:.1f} MiB + {slope / 1024:.1f} KiB x N "
              f"(R^2 = {1 - ss_res / ss_tot:.4f}); peak({n_b}) / peak({n_a}) = {p_b / p_a:.2f} for N x {n_b / n_a:.2f} "
              f"(linear: ~{n_b / n_a:.1f}, quadratic: ~{(n_b / n_a) ** 2:.1f})")
        baseline = max(r.get("baseline_bytes", 0) for r in rows.values())
        budget = total - baseline - 1 * GIB  # leave 1 GiB for the system
        longest = (budget - intercept) / slope if slope > 0 else float("inf")
        print(f"longest N the streamed path handles on this {total / GIB:.0f} GiB machine: about {longest:,.0f} tokens "
              f"(linear extrapolation of the fit to {budget / GIB:.1f} GiB = total - process baseline - 1 GiB; not "
              "run). Its time grows with N^2 (the prefill's attention), so that pass would take hours on 2 cores; "
              "the tiny Qwen2-VL also caps one image at 16384 visual tokens (max_pixels), the rest would be text.")
        ref_ns = [n for n, _ in measured_ref]
        if ref_ns:
            ref_budget = total - baseline - 1 * GIB
            ref_longest = math.sqrt(ref_budget / ((4 + 2) * 8 * 4))
            print(f"the reference's weights alone reach that budget at N of about {ref_longest:,.0f} tokens.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
