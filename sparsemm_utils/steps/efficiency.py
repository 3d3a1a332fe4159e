"""Step 06, ``notebooks/06_efficiency.ipynb``: decode latency, peak memory and KV bytes against
context length (docs/method.md §7).

The measurements themselves (the protocol, one fresh process per (model, method, context), the
timer, the memory meter, the analytic KV bytes, ``results.csv`` and ``analytic_kv.csv``) are
:mod:`sparsemm_utils.efficiency`; this module declares the step around them: its artifacts
(:data:`STEP`), the notebook's parameters (:class:`Config`, which builds the
:class:`~sparsemm_utils.efficiency.EfficiencyProtocol`), the benchmark targets
(:func:`efficiency_targets`: ``targets.csv``), what the run shows against the paper
(:func:`findings`: ``findings.csv``), both written by :func:`write_outputs`, and the step without
its notebook::

    python -m sparsemm_utils.steps.efficiency --run-dir runs/cpu --models qwen2-vl-7b llava-next-vicuna-7b \\
        --layers 2 --vocab depth_scaled --contexts 1024 2048 4096 8192 --decode-steps 20 --generate-tokens 32 \\
        --threads 1 --extend-positions     # Vicuna's checkpoint has 4096 positions; RoPE extends on the fly
    python -m sparsemm_utils.steps.efficiency --run-dir runs/gpu --models llava-next-vicuna-7b \\
        --extend-positions                                     # the paper's protocol, on a GPU

Each (model, method, context) is a real prefill plus a generation in a fresh process, so on a CPU
the prefill's cost, quadratic in the context, bounds the contexts; the decode
step alone, up to 32K on a CPU, is :mod:`sparsemm_utils.decode_benchmark`'s.

The paper's numbers were measured at 32K tokens, at full depth, in bf16 on a GPU: a finding that
compares with them holds or fails only for a run measured the same way
(:func:`~sparsemm_utils.efficiency.comparable_to_paper` at 32768 tokens); any other run reports its
numbers beside the paper's and says why they differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..allocation import uniform_floor
from ..artifacts import Artifact, StepSpec
from ..efficiency import (
    ANALYTIC_FILE,
    BASELINES,
    PAPER_CONTEXTS,
    RESULTS_FILE,
    STATIC_FULLKV,
    EfficiencyError,
    EfficiencyProtocol,
    InvalidEfficiencyConfigError,
    MeasurementFailedError,
    add_protocol_arguments,
    comparable_to_paper,
    load_analytic,
    load_results,
    protocol_from_args,
    run_efficiency,
)
from ..findings import Finding, findings_frame, findings_markdown, read_findings
from ..paper_efficiency import PAPER_CONTEXT, PAPER_SPARSEMM_FLAT_MS, paper_efficiency_frame, paper_speedup
from ..real_shapes import get_real_shape
from ..reference_numbers import REFERENCE_MODELS, reference_model_id

__all__ = [
    "NAME",
    "RESULTS",
    "ANALYTIC_KV",
    "TARGETS",
    "FINDINGS",
    "STEP",
    "FLAT_LATENCY_TARGET",
    "Config",
    "read_targets",
    "efficiency_targets",
    "format_targets",
    "head_lengths_sentence",
    "findings",
    "write_outputs",
    "PAPER_GPU_PROTOCOL",
    "DRY_RUN_CHANGES",
    "paper_protocol_config",
    "run_step",
    "main",
]

NAME = "06_efficiency"
#: The flatness target: SparseMM's slowest / fastest decode step over the contexts.
FLAT_LATENCY_TARGET: float = 1.25
_TARGET_FLAGS = ("flat", "speedup_met", "kv_bytes_match")


def read_targets(path: str | Path) -> pd.DataFrame:
    """``targets.csv`` as written by :func:`write_outputs` (``flat``, ``speedup_met`` and
    ``kv_bytes_match`` True, False or None)."""
    frame = pd.read_csv(path, dtype={flag: object for flag in _TARGET_FLAGS})
    for flag in _TARGET_FLAGS:
        frame[flag] = [None if pd.isna(v) else str(v) == "True" for v in frame[flag]]
    return frame


RESULTS: Artifact[pd.DataFrame] = Artifact(
    NAME, RESULTS_FILE, "one row per (model, method, context) measurement: latency, peak memory, KV bytes",
    reader=load_results,
)
ANALYTIC_KV: Artifact[pd.DataFrame] = Artifact(
    NAME, ANALYTIC_FILE, "analytic KV bytes of the full-depth real shapes at every context (bf16)", reader=load_analytic
)
TARGETS: Artifact[pd.DataFrame] = Artifact(NAME, "targets.csv", "the benchmark targets: flatness, speed-up, KV bytes", reader=read_targets)
FINDINGS: Artifact[pd.DataFrame] = Artifact(NAME, "findings.csv", "step 06's findings against the paper", reader=read_findings)

STEP = StepSpec(
    NAME,
    "Efficiency: decode latency, peak memory and KV bytes against context",
    inputs=(),
    outputs=(RESULTS, ANALYTIC_KV, TARGETS, FINDINGS),
)


# --------------------------------------------------------------------------------------------
# the notebook's parameters


@dataclass
class Config:
    """Parameters of notebook 06 (validated in ``__post_init__``); the defaults are
    ``configs/tiny.yaml``'s.

    ``run_dir``: the run folder; ``model_id``: names the real shape when ``models`` is empty
    (e.g. ``"Qwen/Qwen2-VL-7B-Instruct"`` -> qwen2-vl-7b; the tiny reader has no real shape, so
    its run names ``models``). Every other field is the
    :class:`~sparsemm_utils.efficiency.EfficiencyProtocol`'s of the same name (docs/method.md §7),
    validated there; ``protocol`` is the result, after a check that the run can happen on this
    machine (:meth:`~sparsemm_utils.efficiency.EfficiencyProtocol.check_runnable`)."""

    run_dir: str = "runs/tiny"
    model_id: str = "data/tiny_reader"
    seed: int = 0
    models: Sequence[str] = ("qwen2-vl-2b",)
    methods: Sequence[str] = ("fullkv", STATIC_FULLKV, "sparsemm")
    contexts: Sequence[int] = (256, 512, 1024, 2048)
    budget: int = 256
    window: int = 32
    ratio: float = 0.1
    layers: int | None = 2
    vocab: str = "depth_scaled"
    decode_steps: int = 8
    decode_warmup: int = 1
    generate_tokens: int = 16
    dtype: str = "auto"
    device: str = "cpu"
    decode_attention: str = "auto"
    head_scores: str = "skewed"
    extend_positions: bool = False
    threads: int | None = 1
    timeout_s: float | None = 900
    protocol: EfficiencyProtocol = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise InvalidEfficiencyConfigError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise InvalidEfficiencyConfigError(f"model_id must be a non-empty string, got {self.model_id!r}")
        models = self.models
        if isinstance(models, (list, tuple)) and not models:
            try:
                models = (get_real_shape(self.model_id).name,)
            except KeyError:
                raise InvalidEfficiencyConfigError(
                    f"model_id {self.model_id!r} is not one of the real models this step can time; set models=[...] to "
                    f"real shapes (e.g. ['qwen2-vl-7b', 'llava-next-vicuna-7b']): speed does not depend on the "
                    f"weights, so the tiny model's run times the real shapes with random weights"
                ) from None
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EfficiencyProtocol)}
        values["models"] = models
        self.protocol = EfficiencyProtocol.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
        self.protocol.check_runnable()
        for f in dataclasses.fields(EfficiencyProtocol):  # the normalised values (short shape names, tuples)
            setattr(self, f.name, getattr(self.protocol, f.name))


# --------------------------------------------------------------------------------------------
# targets and findings


def efficiency_targets(results: pd.DataFrame) -> pd.DataFrame:
    """The benchmark targets, per model and compressing method (reported, never asserted):

    - ``spread``: slowest / fastest mean decode step over the contexts; flat when <= 1.25
      (:data:`FLAT_LATENCY_TARGET`; the paper: SparseMM 37-45 ms from 2K to 32K).
    - ``speedup``: FullKV / method decode latency at the longest context measured, beside
      ``paper_speedup`` (docs/method.md §7, SparseMM at 32K; None for other methods, models or
      contexts); ``speedup_met`` when ``speedup >= paper_speedup`` (NA when there is no paper value).
    - ``kv_bytes_match``: every measured ``kv_bytes`` equals ``kv_bytes_analytic`` (NA when no
      row has an analytic value).
    - ``speedup_static``: FullKV on a preallocated ``StaticCache`` (``fullkv_static``) / method at
      the longest context (NaN when the run has no ``fullkv_static``). ``fullkv``'s
      ``DynamicCache`` copies each layer's whole cache at every step (``torch.cat``), a cost that
      grows with n besides attention's; the StaticCache writes the new token in place, so this
      ratio is the method's gain over a full cache without that copy.

    Each baseline has a row too: ``fullkv`` (its KV check) and ``fullkv_static`` (its KV check and
    ``speedup`` = DynamicCache / StaticCache: what the copy costs).
    """
    columns = ["model", "method", "contexts", "spread", "flat", "longest_context", "speedup", "paper_speedup",
               "speedup_met", "kv_bytes_match", "speedup_static"]
    rows = []
    for model, group in results.groupby("model", sort=False):
        full = group[group["method"] == "fullkv"].set_index("context_len")["decode_ms_per_token"]
        static = group[group["method"] == STATIC_FULLKV].set_index("context_len")["decode_ms_per_token"]
        for method, sub in group[~group["method"].isin(BASELINES)].groupby("method", sort=False):
            sub = sub.sort_values("context_len")
            ms = sub["decode_ms_per_token"].to_numpy(dtype=float)
            longest = int(sub["context_len"].iloc[-1])
            speedup = float(full[longest] / ms[-1]) if longest in full.index else math.nan
            paper = paper_speedup(model) if method == "sparsemm" and longest == PAPER_CONTEXT else None
            analytic = sub["kv_bytes_analytic"] if "kv_bytes_analytic" in sub else pd.Series(dtype="Int64")
            has = analytic.notna()
            rows.append(
                {
                    "model": model, "method": method, "contexts": len(sub), "spread": float(ms.max() / ms.min()),
                    "flat": bool(ms.max() / ms.min() <= FLAT_LATENCY_TARGET), "longest_context": longest,
                    "speedup": speedup, "paper_speedup": paper,
                    "speedup_met": None if paper is None or math.isnan(speedup) else bool(speedup >= paper),
                    "kv_bytes_match": None if not has.any() else bool((sub["kv_bytes"][has] == analytic[has]).all()),
                    "speedup_static": float(static[longest] / ms[-1]) if longest in static.index else math.nan,
                }
            )
    # the baselines' own KV checks; the StaticCache's speed-up over the DynamicCache
    for baseline in BASELINES:
        for model, group in results[results["method"] == baseline].groupby("model", sort=False):
            longest = int(group["context_len"].max())
            ms = group.set_index("context_len")["decode_ms_per_token"]
            full = results[(results["model"] == model) & (results["method"] == "fullkv")].set_index("context_len")
            speedup = 1.0 if baseline == "fullkv" else (
                float(full.loc[longest, "decode_ms_per_token"] / ms[longest]) if longest in full.index else math.nan
            )
            rows.append(
                {
                    "model": model, "method": baseline, "contexts": len(group), "spread": math.nan, "flat": None,
                    "longest_context": longest, "speedup": speedup, "paper_speedup": None, "speedup_met": None,
                    "kv_bytes_match": bool((group["kv_bytes"] == group["kv_bytes_analytic"]).all()),
                    "speedup_static": 1.0 if baseline == STATIC_FULLKV else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=columns)


def format_targets(targets: pd.DataFrame) -> str:
    """The targets as printed lines (what the command line prints after a run)."""
    lines = []
    for row in targets.itertuples(index=False):
        if row.method == "fullkv":
            lines.append(f"{row.model} fullkv: measured KV bytes == analytic: {row.kv_bytes_match}")
            continue
        if row.method == STATIC_FULLKV:
            lines.append(
                f"{row.model} {STATIC_FULLKV}: FullKV (DynamicCache) / FullKV (StaticCache) at n={row.longest_context}: "
                f"{row.speedup:.2f}x (the DynamicCache's per-step copy of the whole cache); measured KV bytes == analytic: "
                f"{row.kv_bytes_match}"
            )
            continue
        static = "" if pd.isna(row.speedup_static) else f"; FullKV (StaticCache) / {row.method}: {row.speedup_static:.2f}x"
        paper = "" if row.paper_speedup is None or pd.isna(row.paper_speedup) else (
            f" (paper {row.paper_speedup:.2f}x: {'met' if row.speedup_met else 'NOT met'})"
        )
        lines.append(
            f"{row.model} {row.method}: decode latency spread over {row.contexts} contexts {row.spread:.2f}x "
            f"({'flat' if row.flat else 'NOT flat'}, target <= {FLAT_LATENCY_TARGET}); FullKV / {row.method} at "
            f"n={row.longest_context}: {row.speedup:.2f}x{paper}{static}; KV bytes == analytic: {row.kv_bytes_match}"
        )
    return "\n".join(lines)


def head_lengths_sentence(stored: np.ndarray, *, budget: int, window: int, ratio: float, context: int) -> str:
    """What the tokens stored per KV head (``stored``: int (layers, kv_heads), SparseMM's caps at
    ``context`` tokens) say, in one paragraph: range and mean against B, how many heads hold the
    least (and whether that is the uniform share m = floor(r (B - w)) plus the window w,
    docs/method.md §5), and the rows a decode step reads padded to each layer's longest head
    against the rows stored."""
    stored = np.asarray(stored)
    if stored.ndim != 2 or stored.size == 0:
        raise ValueError(f"stored must be a non-empty (layers, kv_heads) array, got shape {stored.shape}")
    heads, low, high = stored.size, int(stored.min()), int(stored.max())
    at_low = int((stored == low).sum())
    floor = uniform_floor(budget - window, ratio) + window
    why = f" (the uniform share m = {floor - window} plus the window w = {window})" if low == floor else ""
    padded = int((stored.max(axis=1) * stored.shape[1]).sum())
    return (
        f"At n = {context}, the {heads} KV heads store {low}-{high} tokens each (mean {stored.mean():.1f}; B = {budget}): "
        f"the longest holds {high / budget:.1f}x B, and {at_low} of {heads} ({at_low / heads:.0%}) hold the least, "
        f"{low}{why}. A layout padded to each layer's longest head reads {padded:,} rows per decode step, "
        f"{padded / stored.sum():.1f}x the {int(stored.sum()):,} a variable-length kernel reads."
    )


def _setting(rows: pd.DataFrame) -> str:
    """E.g. "2 of 28 layers, float32, cpu Intel(R) Xeon(R) ..."."""
    first = rows.iloc[0]
    depth = f"{int(first['layers'])} of {int(first['full_layers'])} layers, " if "layers" in rows else ""
    dtype = f"{first['dtype']}, " if "dtype" in rows else ""
    return f"{depth}{dtype}{str(first['device']).split(' (')[0]}"


def _paper_models(column: str) -> str:
    """Every model of the paper's table with a number of ``column`` ("speedup" or "memory")."""
    parts = []
    for short, hub in REFERENCE_MODELS.items():
        if column == "speedup":
            parts.append(f"{paper_speedup(hub):.2f}x ({short})")
        else:
            ref = paper_efficiency_frame(hub).set_index("method")["peak_mem_gb"]
            parts.append(f"{ref['fullkv']} -> {ref['sparsemm']} GB ({short})")
    return ", ".join(parts)


def _timing_noise(rows: pd.DataFrame) -> float:
    """The timing noise of these measurements as a ratio, the larger of: one measurement's mean
    step over its fastest step (``decode_ms_min``), and, per method, a shorter context's mean step
    over a longer context's (no method's cache shrinks as n grows, so a step that gets faster with
    n was slowed by the machine). A quiet machine stays near 1."""
    noise = 1.0
    if "decode_ms_min" in rows and rows["decode_ms_min"].notna().any():
        noise = max(noise, float((rows["decode_ms_per_token"] / rows["decode_ms_min"]).max()))
    for _, sub in rows.groupby("method", sort=False):
        ms = sub.sort_values("context_len")["decode_ms_per_token"].to_numpy(dtype=float)
        slowest_before = np.maximum.accumulate(ms)
        noise = max(noise, float((slowest_before / ms).max()))
    return noise


def _ms_series(rows: pd.DataFrame) -> str:
    """The mean decode steps in context order, e.g. "30.0, 31.0"."""
    return ", ".join(f"{ms:.1f}" for ms in rows["decode_ms_per_token"])


def _short(model: str) -> str:
    hub = reference_model_id(model)
    return next((short for short, full in REFERENCE_MODELS.items() if full == hub), model)


def findings(results: pd.DataFrame, analytic: pd.DataFrame | None = None) -> list[Finding]:
    """What this run shows against docs/method.md §7, per model (SparseMM against FullKV):

    - the decode speed-up FullKV / SparseMM at the longest context measured, beside the paper's at
      32K (1.87x for LLaVA-NeXT-Vicuna-7B); holds / fails only for a run comparable with the
      paper (full depth, GPU) at 32768 tokens, else cannot tell (the text says how it differs).
      FullKV is transformers' ``DynamicCache`` (as in ``generate`` and the paper's code); when the
      run has ``fullkv_static``, the ratio against the preallocated ``StaticCache`` is given beside,
      with the reason they differ (the verdict stays on the DynamicCache ratio).
      n: the timed decode steps behind each mean. Headline.
    - SparseMM's decode time is flat in context while FullKV's grows: fails when SparseMM's
      slowest / fastest step over the contexts exceeds 1.25 (:data:`FLAT_LATENCY_TARGET`); holds
      when it does not and FullKV's does; cannot tell when both stay flat (contexts too short to
      separate them). n: the contexts. Headline.

    Neither timing verdict is given when the timing noise exceeds that same 1.25: a measurement's
    mean step over its fastest (``decode_ms_min``), or a method's step at a shorter context over
    its step at a longer one (no cache shrinks as n grows, so only the machine's load can make a
    longer context faster). On a loaded machine the noise is as large as the effect, and one
    measurement per context cannot separate them.
    - SparseMM's peak memory is below FullKV's at the longest context: as the speed-up, decided
      only for a run comparable with the paper at 32768 tokens. n: the two measurements.
    - the measured KV bytes equal docs/method.md §7's analytic count, every method with static caps
      (AdaKV has none); with ``analytic`` (``analytic_kv.csv``), the full-depth bytes at the
      longest context beside. n: the measurements with an analytic value.

    ``results``: ``results.csv`` (:func:`~sparsemm_utils.efficiency.load_results`)."""
    out: list[Finding] = []
    for model, rows in results.groupby("model", sort=False):
        shape = str(rows["shape"].iloc[0]) if "shape" in rows else model
        full = rows[rows["method"] == "fullkv"].set_index("context_len").sort_index()
        sparse = rows[rows["method"] == "sparsemm"].set_index("context_len").sort_index()
        common = sorted(set(full.index) & set(sparse.index))
        if not common:
            continue
        longest, setting = int(common[-1]), _setting(rows)
        comparable = comparable_to_paper(rows) and longest == PAPER_CONTEXT
        differs = "" if comparable else (
            f"; not comparable with the paper (32768 tokens, full depth, bf16 on a GPU): here {longest} tokens, {setting}"
        )
        noise = _timing_noise(rows[rows["method"].isin(["fullkv", "sparsemm"])])
        noisy = noise > FLAT_LATENCY_TARGET
        noted = (
            f"; timing noise reaches {noise:.2f}x here (a measurement's mean over its fastest step, or a shorter "
            f"context's step over a longer one's, which the cache cannot cause), more than the {FLAT_LATENCY_TARGET}x "
            f"tolerance: the machine's load is as large as the effect, so it cannot tell"
            if noisy else ""
        )  # fmt: skip
        paper_ratio = paper_speedup(model)
        f_ms, s_ms = float(full.loc[longest, "decode_ms_per_token"]), float(sparse.loc[longest, "decode_ms_per_token"])
        steps = int(sparse["decode_steps"].iloc[0]) if "decode_steps" in sparse else len(common)
        paper_text = (
            f"{paper_ratio:.2f}x for {_short(model)} at 32K, full depth, bf16 on a GPU (docs/method.md §7)"
            if paper_ratio is not None else
            f"at 32K, full depth, bf16 on a GPU: {_paper_models('speedup')} (docs/method.md §7); the paper does not time {shape}"
        )  # fmt: skip
        static = rows[rows["method"] == STATIC_FULLKV].set_index("context_len")["decode_ms_per_token"]
        fair = (
            f"; against FullKV on a preallocated StaticCache ({float(static[longest]):.1f} ms) {float(static[longest]) / s_ms:.2f}x: "
            f"transformers' DynamicCache, FullKV's cache above, appends by torch.cat and so copies each layer's whole "
            f"cache at every step, which the StaticCache (written in place) does not"
            if longest in static.index else ""
        )  # fmt: skip
        out.append(
            Finding(
                NAME, f"SparseMM decodes faster than FullKV at long contexts ({shape})", paper_text,
                f"FullKV / SparseMM = {f_ms / s_ms:.2f}x at n = {longest} ({f_ms:.1f} -> {s_ms:.1f} ms per token, "
                f"means of {steps} timed steps each){fair}{differs}{noted}",
                steps, bool(f_ms / s_ms >= paper_ratio) if comparable and paper_ratio is not None and not noisy else None,
                headline=True,
            )
        )  # fmt: skip

        s_spread = float(sparse["decode_ms_per_token"].max() / sparse["decode_ms_per_token"].min())
        f_spread = float(full["decode_ms_per_token"].max() / full["decode_ms_per_token"].min())
        if len(sparse) < 2 or noisy:
            flat = None
        elif s_spread > FLAT_LATENCY_TARGET:
            flat = False
        else:
            flat = True if f_spread > FLAT_LATENCY_TARGET else None
        both = (
            f": both within {FLAT_LATENCY_TARGET}x, so these contexts are too short to tell a flat SparseMM from a growing FullKV"
            if flat is None and len(sparse) >= 2 and not noisy else noted
        )  # fmt: skip
        lo, hi = PAPER_SPARSEMM_FLAT_MS
        out.append(
            Finding(
                NAME, f"SparseMM's decode time stays flat in context while FullKV's grows ({shape})",
                f"SparseMM {lo:g}-{hi:g} ms per token from 2K to 32K ({hi / lo:.2f}x) (docs/method.md §7)",
                f"slowest / fastest mean decode step over {len(sparse)} contexts ({int(sparse.index[0])}-{int(sparse.index[-1])} "
                f"tokens): SparseMM {s_spread:.2f}x ({_ms_series(sparse)} ms), FullKV {f_spread:.2f}x ({_ms_series(full)} ms); "
                f"flat means <= {FLAT_LATENCY_TARGET}x; one measurement per context{both}",
                len(sparse), flat, headline=True,
            )
        )  # fmt: skip

        f_peak, s_peak = float(full.loc[longest, "peak_mem_bytes"]), float(sparse.loc[longest, "peak_mem_bytes"])
        kind = f", {sparse['peak_mem_kind'].iloc[0]}" if "peak_mem_kind" in sparse else ""
        ref = paper_efficiency_frame(model).set_index("method")["peak_mem_gb"] if paper_ratio is not None else None
        out.append(
            Finding(
                NAME, f"SparseMM's peak memory is below FullKV's at long contexts ({shape})",
                f"{ref['fullkv']} -> {ref['sparsemm']} GB for {_short(model)} at 32K on a GPU (docs/method.md §7)"
                if ref is not None else f"at 32K on a GPU: {_paper_models('memory')} (docs/method.md §7)",
                f"at n = {longest}: FullKV {f_peak / 2**30:.2f} GiB, SparseMM {s_peak / 2**30:.2f} GiB{kind}{differs}",
                2, bool(s_peak < f_peak) if comparable else None,
            )
        )  # fmt: skip

    if "kv_bytes_analytic" in results and results["kv_bytes_analytic"].notna().any():
        has = results[results["kv_bytes_analytic"].notna()]
        equal = int((has["kv_bytes"] == has["kv_bytes_analytic"]).sum())
        none = sorted(set(results.loc[results["kv_bytes_analytic"].isna(), "method"]))
        text = (
            f"{equal} of {len(has)} measurements ({', '.join(dict.fromkeys(has['method']))}) hold exactly the analytic bytes"
            + (f"; no analytic value for {', '.join(none)} (caps chosen from the prompt's attention)" if none else "")
        )
        if analytic is not None and not analytic.empty:
            for model, rows in analytic.dropna(subset=["kv_bytes"]).groupby("model", sort=False):
                at = rows[rows["context_len"] == rows["context_len"].max()].set_index("method")["kv_bytes"].astype(float)
                if {"fullkv", "sparsemm"} <= set(at.index):
                    text += (
                        f"; at full depth in {rows['dtype'].iloc[0]} and n = {int(rows['context_len'].max())}, {rows['shape'].iloc[0]}'s "
                        f"SparseMM cache holds {at['sparsemm'] / 2**20:.1f} MiB against FullKV's {at['fullkv'] / 2**20:.1f} MiB "
                        f"({at['sparsemm'] / at['fullkv']:.0%})"
                    )
        out.append(
            Finding(
                NAME, "The cache holds the analytic KV bytes",
                "KV bytes = sum over layers and KV heads of stored tokens x head_dim x 2 x bytes per element (docs/method.md §7)",
                text, len(has), equal == len(has),
            )
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# outputs and the command line


def write_outputs(cfg: Config, results: pd.DataFrame, analytic: pd.DataFrame | None = None) -> list[Finding]:
    """Write what the step leaves in ``<cfg.run_dir>/06_efficiency/`` besides the measurements' own
    files (which :func:`~sparsemm_utils.efficiency.run_efficiency` writes as it goes):
    ``targets.csv`` (:func:`efficiency_targets`, :data:`TARGETS`) and ``findings.csv``
    (:func:`findings`, :data:`FINDINGS`). Returns the findings."""
    STEP.folder(cfg.run_dir, create=True)
    efficiency_targets(results).to_csv(TARGETS.path(cfg.run_dir), index=False)
    found = findings(results, analytic)
    findings_frame(found).to_csv(FINDINGS.path(cfg.run_dir), index=False)
    return found


#: The paper's protocol on a GPU (docs/method.md §7): the real shapes at full depth with random
#: weights in bf16, 2K-32K tokens (beyond Vicuna's 4096 checkpoint positions), B = 256, r = 0.1,
#: w = 32, 100 timed decode steps, peak memory over 512 generated tokens; both full-cache baselines.
PAPER_GPU_PROTOCOL: dict[str, object] = dict(
    methods=("fullkv", STATIC_FULLKV, "sparsemm"), contexts=PAPER_CONTEXTS, budget=256, window=32, ratio=0.1,
    layers=None, vocab="real", decode_steps=100, decode_warmup=2, generate_tokens=512, dtype="bfloat16",
    device="cuda", decode_attention="auto", head_scores="skewed", extend_positions=True, threads=None, timeout_s=1800,
)
#: What a CPU dry run of :data:`PAPER_GPU_PROTOCOL` changes: the same processes, files and code
#: paths at 1 layer, float32, a depth-scaled vocabulary, 64-128 tokens and a few steps.
DRY_RUN_CHANGES: dict[str, object] = dict(
    device="cpu", dtype="float32", layers=1, vocab="depth_scaled", contexts=(64, 128), budget=48, window=8,
    decode_steps=2, decode_warmup=1, generate_tokens=4, threads=1, timeout_s=600,
)


def paper_protocol_config(
    run_dir: str | Path, *, models: Sequence[str] = tuple(REFERENCE_MODELS), dry_run: bool = False, **changes: object
) -> Config:
    """Step 06's :class:`Config` for the paper's protocol on a GPU (:data:`PAPER_GPU_PROTOCOL`) on
    ``models`` (default: the three the paper times), or with ``dry_run`` its CPU check
    (:data:`DRY_RUN_CHANGES`); ``changes``: any other field (e.g. ``contexts``). Raises
    :class:`~sparsemm_utils.efficiency.DeviceNotAvailableError` without a GPU unless ``dry_run``."""
    values = {**PAPER_GPU_PROTOCOL, **(DRY_RUN_CHANGES if dry_run else {}), **changes}
    return Config(run_dir=str(run_dir), models=list(models), **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})


def run_step(cfg: Config, log: Callable[[str], None] = print) -> tuple[pd.DataFrame, list[Finding]]:
    """Every measurement of ``cfg`` in a fresh process into ``<run_dir>/06_efficiency/``, then
    :func:`write_outputs`; logs each row, the targets and the findings. Returns (results, findings)."""
    log(f"efficiency: {cfg.protocol}")
    results = run_efficiency(cfg.protocol, STEP.folder(cfg.run_dir, create=True), log=log)
    found = write_outputs(cfg, results, ANALYTIC_KV.read(cfg.run_dir))
    log(format_targets(efficiency_targets(results)))
    log(findings_markdown(found))
    log(f"wrote {', '.join(str(a.path(cfg.run_dir)) for a in STEP.outputs)}")
    return results, found


def _print(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The step without its notebook (:func:`run_step`); exit code 2 with the reason on bad input
    or a failed measurement."""
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.steps.efficiency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="the run folder (results go to <run-dir>/06_efficiency)")
    parser.add_argument("--config-json", default=None, help="a config.json of an earlier run; flags override it")
    add_protocol_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_step(Config(run_dir=args.run_dir, **protocol_from_args(args).to_dict()), _print)
    except (EfficiencyError, MeasurementFailedError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
