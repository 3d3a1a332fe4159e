"""The evaluation sweep: accuracy against KV budget, for every method on every benchmark (docs/method.md §6).

Step 05 (:mod:`sparsemm_utils.steps.eval`) runs it. The sweep runs each *cell* (benchmark, method, budget) over the benchmark's samples: greedy
decoding, batch 1 (``batch_size`` questions at once give the same answers, :func:`run_sweep`),
the method compressing the prompt's KV cache (docs/method.md §5), then the
benchmark's metrics and aggregates as the chosen lmms-eval version computes them, from the
stripped answer to the reported numbers (:mod:`sparsemm_utils.lmms_protocol`). Methods without a budget
(FullKV and the head-mask ablations) run once per benchmark, with ``budget`` left empty.

Methods (:data:`EVAL_METHODS`) carry the original scripts' names (``scripts/eval/*.sh``:
sparsemm, fullkv, adakv, snapkv, pyramidkv, mask, mask_random; plus random and streamingllm)
and map onto the compression framework's presses (:mod:`sparsemm_utils.compression`). ``fastv``
is the token-level peer (step 07, :class:`sparsemm_utils.fastv.FastVAtBudget`): at budget B it
drops image tokens after layer ``fastv_k`` until it stores no more KV bytes than a head-level
method at B, where it can (each answer records the ratio, the target and whether it was reachable).

The generation callable is injected (:class:`Generate`): ``generate(sample, spec, method,
budget)`` returns the model's answer (a ``str`` or a :class:`Generation`). :class:`ModelGenerator`
is the real one (``compressed_generate`` on a loaded model); tests pass a fake, so the sweep's
bookkeeping is tested without a model.

Files (in ``out_dir``, step 05's folder; the artifact contract of docs/design.md):

- ``results.csv``: model, benchmark, method, budget, metric, score, n_samples; one row per metric
  and per lmms-eval aggregate (OCRBench's /1000 score and categories, MMBench's circular score,
  ChartQA's splits) of each finished cell (``budget`` empty for budget-free methods). A cell's
  rows are appended when the cell finishes, so the file only ever holds finished cells.
- ``predictions.jsonl``: one JSON object per (cell, sample), appended as soon as the sample is
  answered: model, benchmark, method, budget, sample_id, prediction (stripped, as lmms-eval
  scores it), answers, scores (MMBench: options), and when the generator reports them
  prompt_tokens, kv_bytes, seconds (``raw_output`` when a stop string or the strip changed the
  answer).
- ``sweep.json``: what the sweep was run with (model, settings, the scoring protocol and its
  lmms-eval commit under ``settings["scoring"]``) and each benchmark's sample set
  (count, sha256 of the sample ids, skipped rows by reason).
- ``sweep_ledger.jsonl``: the sha256 of every line the sweep wrote into ``results.csv`` and
  ``predictions.jsonl`` (without its line ending), appended right after the line itself:
  ``{"file", "line", "sha256"}``.

Resuming: a rerun into the same folder first checks both files against the ledger
(:func:`verify_ledger`): a line edited or deleted since the sweep wrote it raises
:class:`SweepTamperedError` naming the file, the line, both hashes and what to do, so an edited
score is never kept as a finished cell; lines after the last recorded one (a crash between
writing a line and recording it, or a truncated last line left by a crash mid-write) are dropped
and regenerated. The sweep then skips every cell already in ``results.csv`` and, inside an
unfinished cell, every sample already in ``predictions.jsonl``. A rerun with another model, other
settings, or another sample set for a benchmark already there raises :class:`SweepMismatchError`
(so does a folder whose files have no ledger, e.g. one written by an older version): use a fresh
folder, or ``on_mismatch="archive"`` (notebook 05's default), which moves the earlier sweep's files
into ``superseded/<UTC time>/`` (with a ``reason.txt``) and starts afresh: nothing is lost, and a
rerun of the chain after a change upstream (a retrained model, new head scores) does not stop
there. New benchmarks, methods or budgets extend the sweep.

Sharding (:mod:`sparsemm_utils.sharding`): ``run_sweep(..., shard=Shard(i, n))`` into
``<out>/shards/<i>-of-<n>/`` answers only the samples at positions ``k % n == i`` of each
benchmark (every cell of them), writes their ``predictions.jsonl`` with its ledger and no
``results.csv`` (a cell is finished only over all shards), and resumes like any sweep. The
single-process ``run_sweep`` into ``<out>`` then merges the shard folders first
(:func:`merge_shards`: every (cell, sample) exactly once, from the shard that owns it, every
shard with this sweep's model, settings and sample sets, every shard's ledger intact), writing
``predictions.jsonl`` in the single-process order; it then finds every answer there and writes
``results.csv`` exactly as a single-process run does.

Re-scoring (:func:`rescore_sweep`; ``python -m sparsemm_utils.steps.eval rescore`` writes its
files): a finished sweep's answers scored again under another protocol (or a sweep written before
answers were stripped, scored as today), without generating anything.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .benchmarks import BenchmarkSpec, EvalSample, SkipReport, get_benchmark
from .lmms_protocol import DEFAULT_LMMS_EVAL, LmmsProtocol, aggregates, get_protocol, scored_answer, scoring_context
from .compression import compressed_generate, make_press
from .fastv import FastVAtBudget, fastv_generate_at_budget
from .prompts import build_inputs
from .shared_prefill import shared_generate_batch
from .sharding import MERGED_DIR, SHARDS_DIR, Shard, ShardError, retire_shards, shard_folders
from .statistics import bootstrap_interval, paired_bootstrap_interval
from .validate import check_choice, check_int

__all__ = [
    "PAPER_BUDGETS",
    "REFERENCE_PROMPT_TOKENS",
    "RESULTS_COLUMNS",
    "RESULTS_FILE",
    "PREDICTIONS_FILE",
    "SWEEP_FILE",
    "LEDGER_FILE",
    "SUPERSEDED_DIR",
    "ON_MISMATCH",
    "EvaluationError",
    "UnknownMethodError",
    "MissingMethodSettingError",
    "SweepMismatchError",
    "SweepTamperedError",
    "ResultsFileError",
    "EvalMethod",
    "EVAL_METHODS",
    "get_method",
    "is_random_mask",
    "MASK_RANDOM_DRAW",
    "SHAREABLE_PRESSES",
    "press_for",
    "check_budgets",
    "Cell",
    "sweep_cells",
    "Generation",
    "Generate",
    "SweepResult",
    "run_sweep",
    "merge_shards",
    "read_results",
    "read_predictions",
    "predictions_frame",
    "verify_ledger",
    "Rescored",
    "rescore_records",
    "rescore_sweep",
    "scaled_budgets",
    "prompt_tokens",
    "ModelGenerator",
]

#: The paper's budgets B (window included), docs/method.md §6.
PAPER_BUDGETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
#: A typical prompt of the paper's runs, in tokens: docs/method.md §5 quotes ~2400 (LLaVA-NeXT, DocVQA).
REFERENCE_PROMPT_TOKENS: int = 2400
#: The artifact contract's columns (docs/design.md); the last five are the uncertainty of the score:
#: its 95% bootstrap interval over the questions, and for a budgeted method its paired difference
#: from SparseMM at the same budget (SparseMM minus the method, same questions resampled together)
#: with that difference's interval (empty where there is nothing to compare).
LEGACY_RESULTS_COLUMNS: tuple[str, ...] = ("model", "benchmark", "method", "budget", "metric", "score", "n_samples")
RESULTS_COLUMNS: tuple[str, ...] = (
    *LEGACY_RESULTS_COLUMNS, "ci_low", "ci_high", "sparsemm_minus_method", "diff_ci_low", "diff_ci_high"
)
RESULTS_FILE = "results.csv"
PREDICTIONS_FILE = "predictions.jsonl"
SWEEP_FILE = "sweep.json"
LEDGER_FILE = "sweep_ledger.jsonl"
SUPERSEDED_DIR = "superseded"
#: What :func:`run_sweep` does with an earlier sweep of other settings in its folder.
ON_MISMATCH: tuple[str, ...] = ("error", "archive")
#: How argument errors name a budget (it counts the window, docs/method.md §5).
_BUDGET = "budget (tokens per KV head, window included)"


# --------------------------------------------------------------------------------------------
# errors


class EvaluationError(ValueError):
    """Base class of this module's errors."""


class UnknownMethodError(EvaluationError, LookupError):
    """A method name not in :data:`EVAL_METHODS`; the message lists the known ones."""


class MissingMethodSettingError(EvaluationError):
    """A method needs a setting the sweep was not given (e.g. SparseMM's head scores)."""


class SweepMismatchError(EvaluationError):
    """The output folder holds a sweep run with another model, settings or sample set."""


class ResultsFileError(EvaluationError):
    """``results.csv`` is not in the artifact contract's format."""


class SweepTamperedError(EvaluationError):
    """A line of ``results.csv`` or ``predictions.jsonl`` is not what the sweep wrote (its ledger
    records another sha256, or the line is gone): the message names the file, the line, both
    hashes and what to do."""


# --------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class EvalMethod:
    """One method of the sweep: the press it builds (:data:`sparsemm_utils.compression.COMPRESSION_METHODS`,
    or ``"fastv"``: :class:`sparsemm_utils.fastv.FastVAtBudget`), whether it takes a budget, its
    fixed press arguments, the sweep settings it takes (``window``, ``ratio``, ``head_scores``,
    ``seed``, ``fraction``, ``fastv_k``: required) and its ``options`` (passed on when the sweep
    gives them, else the press's default: ``selection_dtype``)."""

    name: str
    press: str
    budgeted: bool
    takes: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    options: tuple[str, ...] = ()

    @property
    def needs_head_scores(self) -> bool:
        return "head_scores" in self.takes


#: The options of the methods that select by window attention (compression.snapkv_window_scores).
_SCORING = ("selection_dtype",)

#: The sweep's methods, under the original scripts' names.
EVAL_METHODS: Mapping[str, EvalMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            EvalMethod("fullkv", "fullkv", False, label="FullKV"),
            EvalMethod("sparsemm", "sparsemm", True, ("window", "ratio", "head_scores"), label="SparseMM", options=_SCORING),
            EvalMethod("adakv", "adakv", True, ("window",), label="AdaKV", options=_SCORING),
            EvalMethod("snapkv", "snapkv", True, ("window",), label="SnapKV", options=_SCORING),
            EvalMethod("pyramidkv", "pyramidkv", True, ("window",), label="PyramidKV", options=_SCORING),
            EvalMethod("random", "random", True, ("window", "ratio", "seed"), label="Random allocation", options=_SCORING),
            EvalMethod("streamingllm", "streamingllm", True, ("window",), label="StreamingLLM"),
            EvalMethod("mask", "head_mask", False, ("fraction", "head_scores"), {"selection": "top"}, "Mask top visual heads"),
            EvalMethod("mask_random", "head_mask", False, ("fraction", "seed"), {"selection": "random"}, "Mask random heads"),
            EvalMethod("fastv", "fastv", True, ("fastv_k",), label="FastV"),
        )
    }
)


#: ``mask_random_<k>``: one more draw of the random head mask, with seed ``k`` (the paper's ablation
#: compares the top visual heads with several draws of random heads).
MASK_RANDOM_DRAW = re.compile(r"^mask_random_(\d{1,3})$")
#: Methods whose compression happens after a prefill with the full keys: one prefill per question
#: serves them all (:func:`sparsemm_utils.shared_prefill.shared_generate`). The head masks and
#: FastV change the prefill itself and run one by one.
SHAREABLE_PRESSES: frozenset[str] = frozenset({"fullkv", "sparsemm", "adakv", "snapkv", "pyramidkv", "random", "streamingllm"})


def get_method(name: str) -> EvalMethod:
    """The method registered under ``name``, or a draw ``mask_random_<k>`` of the random head mask
    (seed ``k``); :class:`UnknownMethodError` lists the known ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in EVAL_METHODS:
        return EVAL_METHODS[key]
    match = MASK_RANDOM_DRAW.match(key) if isinstance(key, str) else None
    if match:
        seed = int(match.group(1))
        return EvalMethod(key, "head_mask", False, ("fraction",), {"selection": "random", "seed": seed}, f"Mask random heads (draw {seed})")
    raise UnknownMethodError(
        f"unknown method {name!r}; known methods: {', '.join(EVAL_METHODS)}, and mask_random_<k> (a random-mask draw with seed k)"
    )


def is_random_mask(method: str) -> bool:
    """``mask_random`` or one of its draws ``mask_random_<k>``."""
    return method == "mask_random" or bool(MASK_RANDOM_DRAW.match(method))


def press_for(method: str, budget: int | None, **settings: Any) -> Any:
    """The press (:mod:`sparsemm_utils.compression`) of ``method`` at ``budget`` (None for the
    budget-free methods), built from the ``settings`` the method takes (:class:`EvalMethod`)."""
    m = get_method(method)
    if m.budgeted and budget is None:
        raise EvaluationError(f"method {m.name!r} needs a budget")
    if not m.budgeted and budget is not None:
        raise EvaluationError(f"method {m.name!r} takes no budget (it keeps the full cache), got {budget!r}")
    kwargs: dict[str, Any] = dict(m.fixed)
    for key in m.takes:
        if settings.get(key) is None:
            hint = " (step 03's head_scores.json)" if key == "head_scores" else ""
            raise MissingMethodSettingError(f"method {m.name!r} needs the setting {key!r}{hint}; none was given")
        kwargs[key] = settings[key]
    kwargs.update({key: settings[key] for key in m.options if settings.get(key) is not None})
    if m.budgeted:
        kwargs["budget"] = check_int(_BUDGET, budget, 1, error=EvaluationError)
    if m.press == "fastv":
        return FastVAtBudget(budget=kwargs["budget"], k=kwargs["fastv_k"])
    return make_press(m.press, **kwargs)


# --------------------------------------------------------------------------------------------
# cells and generation


@dataclass(frozen=True)
class Cell:
    """One (benchmark, method, budget) of the sweep; ``budget`` None for budget-free methods."""

    benchmark: str
    method: str
    budget: int | None

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.benchmark, self.method, self.budget)

    def __str__(self) -> str:
        return f"{self.benchmark} / {self.method}" + ("" if self.budget is None else f" @ {self.budget}")


def check_budgets(budgets: Iterable[int]) -> tuple[int, ...]:
    """The budgets as ints, duplicates removed, ascending; :class:`EvaluationError` for a budget
    that is not an int >= 1."""
    return tuple(sorted({check_int(_BUDGET, b, 1, error=EvaluationError) for b in budgets}))


def sweep_cells(benchmarks: Iterable[str], methods: Iterable[str], budgets: Iterable[int]) -> list[Cell]:
    """Every cell, benchmark-major, then method, then budget (ascending); a budget-free method
    gets one cell per benchmark."""
    budgets = check_budgets(budgets)
    cells = []
    for b in benchmarks:
        name = get_benchmark(b).name
        for method in methods:
            m = get_method(method)
            if m.budgeted and not budgets:
                raise EvaluationError(f"method {m.name!r} needs budgets; none were given")
            for budget in budgets if m.budgeted else [None]:
                cells.append(Cell(name, m.name, budget))
    return cells


@dataclass(frozen=True)
class Generation:
    """A generator's answer: ``text`` and, when known, the prompt length, the KV bytes of the
    cache after generation (docs/method.md §7), the seconds it took, and ``details``: what the method
    decided for this prompt (JSON-able; FastV's ratio and budget match), kept in ``predictions.jsonl``
    as ``method_details``."""

    text: str
    prompt_tokens: int | None = None
    kv_bytes: int | None = None
    seconds: float | None = None
    details: Mapping[str, Any] | None = None


class Generate(Protocol):
    """The injected generation callable: the answer of the model to ``sample`` under ``method``
    at ``budget`` (None for budget-free methods); ``spec`` gives the generation limit."""

    def __call__(self, sample: EvalSample, spec: BenchmarkSpec, method: str, budget: int | None) -> str | Generation: ...


def generate_group(generate: Any, sample: EvalSample, spec: BenchmarkSpec, cells: Sequence["Cell"]) -> Iterator[tuple["Cell", Generation]]:
    """The answers of one sample under several cells, as ``(cell, generation)`` pairs: all at once
    through ``generate.many(sample, spec, [(method, budget), ...])`` when the generator has it (one
    shared prefill for the methods that allow it), else one call per cell, each yielded as soon as
    it is answered (so a crash loses no finished answer)."""
    many = getattr(generate, "many", None)
    if many is None:
        for cell in cells:
            out = generate(sample, spec, cell.method, cell.budget)
            yield cell, out if isinstance(out, Generation) else Generation(out)
        return
    answers = list(many(sample, spec, [(c.method, c.budget) for c in cells]))
    if len(answers) != len(cells):
        raise EvaluationError(f"the generator returned {len(answers)} answers for {len(cells)} cells")
    for cell, out in zip(cells, answers):
        yield cell, out if isinstance(out, Generation) else Generation(out)


def generate_batch(
    generate: Any, spec: BenchmarkSpec, queue: Sequence[tuple[EvalSample, Sequence["Cell"]]]
) -> Iterator[tuple[EvalSample, "Cell", Generation]]:
    """The answers of several samples, each under its cells, as ``(sample, cell, generation)`` in
    order (sample by sample, cell by cell): all at once through
    ``generate.many_batch(samples, spec, [[(method, budget), ...] per sample])`` when there are
    several samples and the generator has it, else :func:`generate_group` per sample."""
    many_batch = getattr(generate, "many_batch", None)
    if many_batch is None or len(queue) == 1:
        for sample, cells in queue:
            for cell, out in generate_group(generate, sample, spec, cells):
                yield sample, cell, out
        return
    answers = list(many_batch([s for s, _ in queue], spec, [[(c.method, c.budget) for c in cells] for _, cells in queue]))
    if len(answers) != len(queue) or any(len(a) != len(cells) for a, (_, cells) in zip(answers, queue)):
        raise EvaluationError(f"the generator's many_batch returned answers for {[len(a) for a in answers]} cells, not {[len(c) for _, c in queue]}")
    for (sample, cells), outs in zip(queue, answers):
        for cell, out in zip(cells, outs):
            yield sample, cell, out if isinstance(out, Generation) else Generation(out)


# --------------------------------------------------------------------------------------------
# files


def read_results(path: str | Path) -> pd.DataFrame:
    """``results.csv`` as a frame (``budget`` nullable Int64); an absent file gives an empty frame.
    :class:`ResultsFileError` when its header is not :data:`RESULTS_COLUMNS`."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        frame = pd.DataFrame({c: pd.Series(dtype="object") for c in RESULTS_COLUMNS})
        frame["budget"] = frame["budget"].astype("Int64")
        return frame
    numeric = {c: ["", "nan"] for c in ("score", *RESULTS_COLUMNS[len(LEGACY_RESULTS_COLUMNS):])}
    frame = pd.read_csv(path, dtype={"model": str, "benchmark": str, "method": str, "metric": str}, keep_default_na=False, na_values={"budget": [""], **numeric})
    if tuple(frame.columns) == LEGACY_RESULTS_COLUMNS:  # written before the intervals existed
        for column in RESULTS_COLUMNS[len(LEGACY_RESULTS_COLUMNS):]:
            frame[column] = np.nan
    if tuple(frame.columns) != RESULTS_COLUMNS:
        raise ResultsFileError(f"{path} has columns {list(frame.columns)}; the artifact contract is {list(RESULTS_COLUMNS)}")
    frame["budget"] = pd.to_numeric(frame["budget"], errors="coerce").astype("Int64")
    for column in ("score", *RESULTS_COLUMNS[len(LEGACY_RESULTS_COLUMNS):]):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["n_samples"] = pd.to_numeric(frame["n_samples"]).astype(int)
    return frame


def _append_results(path: Path, rows: Sequence[Mapping[str, Any]], ledger: "_Ledger") -> None:
    new = not path.is_file() or path.stat().st_size == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULTS_COLUMNS))
    if new:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in RESULTS_COLUMNS})
    with open(path, "a", newline="", encoding="utf-8") as f:
        ledger.append(f, RESULTS_FILE, buffer.getvalue())


def read_predictions(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of ``predictions.jsonl`` and the number of lines dropped: a last line that is
    not valid JSON (a crash mid-write) is dropped; an invalid line elsewhere raises."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        return [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    records, dropped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                dropped += 1
                continue
            raise ResultsFileError(f"{path} line {i + 1} is not valid JSON; the file is corrupt, rerun into a fresh folder")
    return records, dropped


def predictions_frame(records: str | Path | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``predictions.jsonl`` (a path or its records) flattened: one row per (cell, sample) with
    model, benchmark, method, budget (Int64), sample_id, prediction, prompt_tokens, kv_bytes,
    seconds, a ``score_<metric>`` column per metric, a column per ``extra`` field and a
    ``detail_<field>`` column per ``method_details`` field (FastV's ratio and budget match)."""
    if isinstance(records, (str, Path)):
        records, _ = read_predictions(records)
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("model", "benchmark", "method", "budget", "sample_id", "prediction", "prompt_tokens", "kv_bytes", "seconds")}
        row.update({f"score_{m}": v for m, v in (r.get("scores") or {}).items()})
        row.update(r.get("extra") or {})
        row.update({f"detail_{k}": v for k, v in (r.get("method_details") or {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["budget"] = pd.to_numeric(frame["budget"], errors="coerce").astype("Int64")
    return frame


# --------------------------------------------------------------------------------------------
# the ledger: what the sweep wrote, line by line

#: The files whose every line the ledger records.
_LEDGERED: tuple[str, ...] = (RESULTS_FILE, PREDICTIONS_FILE)


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``data`` (each with its b"\\n") and the unterminated rest."""
    parts = data.split(b"\n")
    return [part + b"\n" for part in parts[:-1]], parts[-1]


def _line_sha256(line: bytes) -> str:
    """sha256 of a line without its line ending (a file re-saved with other line endings holds the
    same lines)."""
    return hashlib.sha256(line.rstrip(b"\r\n")).hexdigest()


class _Ledger:
    """Appends to ``sweep_ledger.jsonl`` one ``{"file", "line", "sha256"}`` record per line written
    into a ledgered file, right after the line itself is on disk (a crash in between leaves a line
    without a record, which the next run drops). ``counts``: lines already recorded per file."""

    def __init__(self, out: Path, counts: Mapping[str, int]):
        self.path = out / LEDGER_FILE
        self.counts = {name: int(counts.get(name, 0)) for name in _LEDGERED}

    def append(self, handle: Any, name: str, text: str) -> None:
        """Write ``text`` (whole lines) to ``handle``, the open file ``name``, then record its lines."""
        handle.write(text)
        handle.flush()
        lines, rest = _split_lines(text.encode("utf-8"))
        if rest:
            raise EvaluationError(f"internal: a write to {name} must end with a newline, got {rest[-40:]!r}")
        records = []
        for line in lines:
            self.counts[name] += 1
            records.append(json.dumps({"file": name, "line": self.counts[name], "sha256": _line_sha256(line)}) + "\n")
        with open(self.path, "a", encoding="utf-8", newline="") as ledger:
            ledger.write("".join(records))
            ledger.flush()


def _describe_line(name: str, line: bytes) -> str:
    """What a ledgered line holds, for error messages: the cell and sample of a prediction, the row
    of a result."""
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    if name == PREDICTIONS_FILE:
        try:
            record = json.loads(text)
            return (
                f" (cell {record.get('benchmark')}/{record.get('method')}@{record.get('budget')}, "
                f"sample {record.get('sample_id')})"
            )
        except (ValueError, AttributeError):
            pass
    return f" (it now reads {text[:120]!r})"


def _restart_hint(out: Path) -> str:
    files = ", ".join((RESULTS_FILE, PREDICTIONS_FILE, LEDGER_FILE, SWEEP_FILE))
    return (
        f"The sweep does not resume on edited results (a finished cell would keep the edited value). Restore the "
        f"file, or start the sweep afresh: move {files} out of {out} (e.g. into {out / SUPERSEDED_DIR}/) and rerun "
        "step 05 (`python -m sparsemm_utils.pipeline --config <config.yaml> --run-dir <run> --from 05_eval --to "
        "05_eval`)"
    )


def verify_ledger(out_dir: str | Path, *, repair: bool = False) -> dict[str, tuple[int, int]]:
    """Check ``results.csv`` and ``predictions.jsonl`` in ``out_dir`` against ``sweep_ledger.jsonl``
    line by line (module docstring). Returns {file: (lines verified, unrecorded lines after them)}.

    Raises :class:`SweepTamperedError` when a recorded line differs from its sha256 or is gone, or
    the ledger itself is malformed, and :class:`SweepMismatchError` when the files hold lines but
    there is no ledger (they cannot be verified). With ``repair``, what follows the last recorded
    line of each file (and an unfinished last ledger line) is cut off: a crash left it there."""
    out = Path(out_dir)
    ledger_path = out / LEDGER_FILE
    data = {name: (out / name).read_bytes() if (out / name).is_file() else b"" for name in _LEDGERED}
    if not any(data.values()):  # nothing to verify: an old ledger (if any) describes files no longer there
        if repair and ledger_path.is_file():
            ledger_path.write_bytes(b"")
        return {name: (0, 0) for name in _LEDGERED}
    if not ledger_path.is_file():
        raise SweepMismatchError(
            f"{out} holds {' and '.join(n for n in _LEDGERED if data[n])} but no {LEDGER_FILE} (written by an older "
            "version of the sweep, or deleted): its results cannot be verified, so they are not resumed; use another "
            "output folder (or on_mismatch='archive')"
        )
    ledger_lines, ledger_rest = _split_lines(ledger_path.read_bytes())
    recorded: dict[str, list[str]] = {name: [] for name in _LEDGERED}
    for number, raw in enumerate(ledger_lines, start=1):
        try:
            entry = json.loads(raw)
            name, line, digest = entry["file"], int(entry["line"]), str(entry["sha256"])
            if name not in recorded or line != len(recorded[name]) + 1:
                raise ValueError(f"expected line {len(recorded.get(name, [])) + 1} of {name}")
        except (ValueError, KeyError, TypeError) as exc:
            raise SweepTamperedError(
                f"{ledger_path} line {number} is not a record the sweep writes ({exc}): the ledger was edited. "
                + _restart_hint(out)
            ) from None
        recorded[name].append(digest)
    status = {}
    for name in _LEDGERED:
        path = out / name
        lines, rest = _split_lines(data[name])
        digests = recorded[name]
        for number, (line, digest) in enumerate(zip(lines, digests), start=1):
            now = _line_sha256(line)
            if now != digest:
                raise SweepTamperedError(
                    f"{path} line {number} is not what the sweep wrote{_describe_line(name, line)}: its ledger "
                    f"{ledger_path} records sha256 {digest[:16]}..., the line now has {now[:16]}... (edited after the "
                    "sweep wrote it). " + _restart_hint(out)
                )
        if len(lines) < len(digests):
            raise SweepTamperedError(
                f"{path} has {len(lines)} complete line(s) but the sweep wrote {len(digests)} (its ledger {ledger_path} "
                f"records each): line {len(lines) + 1} onward was deleted or cut off. " + _restart_hint(out)
            )
        extra = len(lines) - len(digests) + (1 if rest else 0)
        status[name] = (len(digests), extra)
        if repair and extra:
            with open(path, "r+b") as handle:
                handle.truncate(sum(len(line) for line in lines[: len(digests)]))
    if repair and ledger_rest:
        with open(ledger_path, "r+b") as handle:
            handle.truncate(sum(len(line) for line in ledger_lines))
    return status


def _budget_key(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return int(value)


def _sample_ids(samples: Sequence[EvalSample]) -> list[str]:
    ids = getattr(samples, "sample_ids", None)
    return list(ids) if ids is not None else [s.sample_id for s in samples]


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the full ``results`` frame of the folder, the cells it ran and
    those it found finished, the number of samples generated now and reused, and the folder."""

    results: pd.DataFrame
    ran: list[Cell]
    skipped: list[Cell]
    generated: int
    reused: int
    out_dir: Path


def _reconcile_manifest(
    path: Path, model: str, settings: Mapping[str, Any], sets: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    manifest = {"model": model, "settings": _jsonable(dict(settings)), "benchmarks": {}}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("model") != model:
            raise SweepMismatchError(
                f"{path.parent} holds a sweep of model {old.get('model')!r}, not {model!r}: use another output folder"
            )
        if old.get("settings") != manifest["settings"]:
            raise SweepMismatchError(
                f"{path.parent} holds a sweep run with settings {old.get('settings')}, this run has "
                f"{manifest['settings']}: use another output folder (or delete it to start over)"
            )
        manifest["benchmarks"] = dict(old.get("benchmarks", {}))
    for name, info in sets.items():
        previous = manifest["benchmarks"].get(name)
        if previous is not None and previous.get("sample_ids_sha256") != info["sample_ids_sha256"]:
            raise SweepMismatchError(
                f"{path.parent} holds results of benchmark {name!r} on another sample set ({previous.get('n_samples')} "
                f"samples then, {info['n_samples']} now; a changed limit or source?): use another output folder"
            )
        manifest["benchmarks"][name] = dict(info)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _archive_sweep(out: Path, reason: str) -> Path:
    """Move ``results.csv``, ``predictions.jsonl``, ``sweep.json`` and the ledger into ``superseded/<UTC time>/``
    with a ``reason.txt``; returns that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = out / SUPERSEDED_DIR / stamp
    target.mkdir(parents=True)
    for name in (RESULTS_FILE, PREDICTIONS_FILE, SWEEP_FILE, LEDGER_FILE):
        if (out / name).exists():
            (out / name).rename(target / name)
    (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
    return target


def run_sweep(
    out_dir: str | Path,
    *,
    model: str,
    benchmarks: Mapping[str, Sequence[EvalSample]],
    methods: Sequence[str],
    budgets: Sequence[int],
    generate: Generate,
    settings: Mapping[str, Any] | None = None,
    skips: Mapping[str, SkipReport] | None = None,
    method_limits: Mapping[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    on_mismatch: str = "error",
    shard: Shard | None = None,
    lmms_eval: str | LmmsProtocol = DEFAULT_LMMS_EVAL,
    batch_size: int = 1,
) -> SweepResult:
    """Run every unfinished cell of benchmarks x methods x budgets (module docstring).

    Args:
        out_dir: the folder of ``results.csv``, ``predictions.jsonl`` and ``sweep.json``.
        model: the model's name in ``results.csv`` (e.g. its hub id).
        benchmarks: {benchmark name: its samples} (e.g. :func:`~sparsemm_utils.benchmarks.load_benchmark`);
            a :class:`~sparsemm_utils.benchmarks.BenchmarkSamples` brings its skip report along.
        methods / budgets: the sweep's methods (:data:`EVAL_METHODS`) and budgets.
        generate: the generation callable (:class:`Generate`).
        settings: JSON-able description of everything else that shapes the answers (window, ratio,
            head-score hash, generation options...), recorded in ``sweep.json`` and compared on reruns.
        skips: skip reports of benchmarks given as plain sequences.
        method_limits: {method: n}: that method answers only the first n samples of each benchmark
            (e.g. the head-mask ablation on a subset; record it in ``settings``).
        progress: show a tqdm bar over the samples still to generate.
        log: where one line per cell goes (None: silent).
        on_mismatch: when the folder holds a sweep of another model, settings or sample set:
            "error" raises :class:`SweepMismatchError`; "archive" moves its files into
            ``superseded/<UTC time>/`` (module docstring) and starts afresh.
        shard: answer only this shard's samples, into a shard folder (module docstring,
            "Sharding"); its ``results`` are empty. Without it, shard folders under ``out_dir``
            are merged first (:func:`merge_shards`).
        lmms_eval: the scoring protocol, "0.3" or "current" (:mod:`sparsemm_utils.lmms_protocol`):
            each answer is stripped and scored, each cell aggregated, as that lmms-eval does;
            recorded in ``sweep.json`` with the lmms-eval commit. The samples' prompts must
            have been built with its specs (``protocol.spec(name)``).
        batch_size: samples answered at once (:func:`generate_batch`: one batched prefill and
            decode for the shareable methods when the generator has ``many_batch``). The answers
            are those of batch 1, written in the same order (sample by sample, cell by cell)
            after each batch, so a crash loses at most one batch's answers.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, str) or not model:
        raise EvaluationError(f"model must be a non-empty string (its name in results.csv), got {model!r}")
    check_choice("on_mismatch", on_mismatch, ON_MISMATCH, error=EvaluationError)
    batch_size = check_int("batch_size", batch_size, 1, error=EvaluationError)
    say = log or (lambda message: None)
    protocol = get_protocol(lmms_eval)
    specs = {name: protocol.spec(name) for name in benchmarks}
    if any(spec.name != name for name, spec in specs.items()):
        raise EvaluationError(f"benchmarks must be keyed by their registry names, got {list(benchmarks)}")
    cells = sweep_cells(benchmarks, methods, budgets)
    ids = {name: _sample_ids(samples) for name, samples in benchmarks.items()}
    for name, sample_ids in ids.items():
        if not sample_ids:
            report = getattr(benchmarks[name], "skips", None) or (skips or {}).get(name)
            raise EvaluationError(f"benchmark {name!r} has no sample to evaluate" + (f" ({report})" if report else ""))
        if len(set(sample_ids)) != len(sample_ids):
            raise EvaluationError(f"benchmark {name!r} has duplicate sample ids; they must be unique")
    sets = {}
    for name, sample_ids in ids.items():
        report = getattr(benchmarks[name], "skips", None) or (skips or {}).get(name)
        sets[name] = {
            "n_samples": len(sample_ids),
            "sample_ids_sha256": _ids_digest(sample_ids),
            "skipped": dict(report.counts) if report is not None else {},
            "n_rows": report.n_rows if report is not None else len(sample_ids),
        }
    limits = {get_method(m).name: check_int(f"method_limits[{m!r}]", n, 1, error=EvaluationError) for m, n in (method_limits or {}).items()}

    def cell_ids(cell: Cell) -> list[str]:
        return ids[cell.benchmark][: limits.get(cell.method, len(ids[cell.benchmark]))]

    if shard is None:
        merged = merge_shards(out, model=model, settings=_with_protocol(settings, protocol), sets=sets, cells=cells, cell_ids=cell_ids)
        if merged:
            say(f"merged {merged} answers of the shard folders into {out / PREDICTIONS_FILE} (the shards are kept in {out / MERGED_DIR})")
    settings = dict(settings or {}) if shard is None else {**(settings or {}), "shard": str(shard)}
    results_path = out / RESULTS_FILE
    try:
        _reconcile_manifest(out / SWEEP_FILE, model, _with_protocol(settings, protocol), sets)
        verify_ledger(out)
        others = sorted(set(read_results(results_path)["model"]) - {model})
        if others:
            raise SweepMismatchError(f"{results_path} holds results of model(s) {others}, not {model!r}: use another folder")
    except SweepMismatchError as exc:
        if on_mismatch == "error":
            raise
        moved = _archive_sweep(out, str(exc))
        say(f"{exc}\n-> moved the earlier sweep's files to {moved} and started afresh")
        _reconcile_manifest(out / SWEEP_FILE, model, _with_protocol(settings, protocol), sets)
    verified = verify_ledger(out, repair=True)
    for name, (_, extra) in verified.items():
        if extra:
            say(f"dropped {extra} line(s) at the end of {name} that the ledger does not record (a run stopped mid-write)")
    ledger = _Ledger(out, {name: kept for name, (kept, _) in verified.items()})
    done = read_results(results_path)
    finished = {(b, m, _budget_key(k)) for b, m, k in zip(done["benchmark"], done["method"], done["budget"])}

    predictions_path = out / PREDICTIONS_FILE
    records, _ = read_predictions(predictions_path)
    by_cell: dict[tuple[str, str, int | None], dict[str, dict[str, Any]]] = {}
    for r in records:
        by_cell.setdefault((r["benchmark"], r["method"], _budget_key(r["budget"])), {})[str(r["sample_id"])] = r

    def owned(cell: Cell) -> list[str]:
        return [sid for k, sid in enumerate(cell_ids(cell)) if shard is None or shard.owns(k)]

    pending = [c for c in cells if c.key not in finished]
    skipped = [c for c in cells if c.key in finished]
    todo = sum(len(owned(c)) - len(set(owned(c)) & set(by_cell.get(c.key, {}))) for c in pending)
    if skipped:
        say(f"{len(skipped)} of {len(cells)} cells already in {RESULTS_FILE}: skipped")
    generated = reused = 0
    bar = tqdm(total=todo, desc="evaluating", unit="answer", disable=not progress)

    def answer(spec: BenchmarkSpec, context: Any, queue: Sequence[tuple[EvalSample, Sequence[Cell]]], pred_file: Any) -> int:
        """Generate and record the answers due for a batch of samples; returns how many."""
        bar.set_postfix_str(f"{spec.name} {queue[-1][0].sample_id}")
        t0, count = time.perf_counter(), 0
        for sample, cell, gen in generate_batch(generate, spec, queue):
            record = _prediction_record(model, cell, sample, spec, gen, time.perf_counter() - t0, protocol, context)
            t0 = time.perf_counter()
            ledger.append(pred_file, PREDICTIONS_FILE, json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
            by_cell[cell.key][sample.sample_id] = record
            count += 1
            bar.update(1)
        return count

    try:
        with open(predictions_path, "a", encoding="utf-8", newline="") as pred_file:
            for bench in dict.fromkeys(c.benchmark for c in pending):
                spec, samples = specs[bench], benchmarks[bench]
                context = _scoring_context(spec, samples)
                bench_cells = [c for c in pending if c.benchmark == bench]
                for c in bench_cells:
                    by_cell.setdefault(c.key, {})

                queue: list[tuple[EvalSample, list[Cell]]] = []  # up to batch_size samples with answers due
                for i, sample_id in enumerate(ids[bench]):
                    if shard is not None and not shard.owns(i):
                        continue
                    due = [c for c in bench_cells if i < len(cell_ids(c))]
                    missing = [c for c in due if sample_id not in by_cell[c.key]]
                    reused += len(due) - len(missing)
                    if missing:
                        sample = samples[i]
                        if sample.sample_id != sample_id:
                            raise EvaluationError(f"benchmark {bench!r}: sample {i} changed id while the sweep ran")
                        queue.append((sample, missing))
                    if len(queue) == batch_size:
                        generated += answer(spec, context, queue, pred_file)
                        queue = []
                if queue:
                    generated += answer(spec, context, queue, pred_file)
                if shard is not None:
                    continue  # a shard holds part of each cell: the merge writes the results
                rows = [row for c in bench_cells for row in _result_rows(model, spec, [c], cell_ids(c), by_cell)]
                _append_results(results_path, rows, ledger)
                for row in rows:
                    if row["metric"] == spec.metrics[0]:
                        cell = Cell(bench, row["method"], row["budget"])
                        say(f"{cell}: {row['metric']} = {row['score']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] over {row['n_samples']} samples")
    finally:
        bar.close()
    ran = pending
    return SweepResult(read_results(results_path), ran, skipped, generated, reused, out)


def _shard_answers(folder: Path, shard: Shard, model: str, settings: Mapping[str, Any], sets: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The answers of one shard folder, after checking that it is a shard of this sweep and that
    its ledger holds every line of it."""
    rerun = f"rerun it (`--shard {shard}`: it resumes)"
    if not (folder / SWEEP_FILE).is_file():
        raise ShardError(f"shard {shard} ({folder}) has no {SWEEP_FILE}: it never started; {rerun}")
    manifest = json.loads((folder / SWEEP_FILE).read_text(encoding="utf-8"))
    recorded = dict(manifest.get("settings", {}))
    if recorded.pop("shard", None) != str(shard):
        raise ShardError(f"{folder} is named shard {shard} but its {SWEEP_FILE} records shard {manifest.get('settings', {}).get('shard')!r}")
    if manifest.get("model") != model or recorded != _jsonable(dict(settings)):
        raise ShardError(
            f"shard {shard} ({folder}) ran model {manifest.get('model')!r} with settings {recorded}; this sweep is "
            f"{model!r} with {_jsonable(dict(settings))}: rerun the shards with this config (move {folder.parent} away first)"
        )
    for name, info in sets.items():
        theirs = manifest.get("benchmarks", {}).get(name, {}).get("sample_ids_sha256")
        if theirs != info["sample_ids_sha256"]:
            raise ShardError(
                f"shard {shard} ({folder}) answered benchmark {name!r} on another sample set (sha256 {str(theirs)[:12]}..., "
                f"this sweep {info['sample_ids_sha256'][:12]}...): rerun the shards with this config"
            )
    status = verify_ledger(folder)  # SweepTamperedError when a recorded line was edited
    if any(extra for _, extra in status.values()):
        raise ShardError(f"shard {shard} ({folder}) stopped mid-write (lines its ledger does not record); {rerun}")
    return read_predictions(folder)[0]


def merge_shards(
    out_dir: str | Path,
    *,
    model: str,
    settings: Mapping[str, Any],
    sets: Mapping[str, Mapping[str, Any]],
    cells: Sequence[Cell],
    cell_ids: Callable[[Cell], Sequence[str]],
) -> int:
    """Merge the shard folders under ``out_dir`` (:func:`~sparsemm_utils.sharding.shard_folders`)
    into its ``predictions.jsonl`` and ledger, in the order a single-process sweep writes them
    (benchmark, sample, cell); returns the number of answers (0 when there are no shards).

    Checked first, each failure a :class:`~sparsemm_utils.sharding.ShardError` naming the shard to
    rerun: the shards form one set ``0..n-1``; each ran this ``model``, ``settings`` and sample
    ``sets`` (``sweep.json``) and its ledger verifies; each expected (cell, sample) of ``cells``
    (samples ``cell_ids(cell)``) is answered exactly once, by the shard owning its position, and
    nothing else is. ``out_dir`` must hold no answers yet. The shard folders then move to
    ``<out_dir>/shards.merged/``."""
    out = Path(out_dir)
    folders = shard_folders(out)
    if not folders:
        return 0
    held = [name for name in (RESULTS_FILE, PREDICTIONS_FILE) if (out / name).is_file() and (out / name).stat().st_size]
    if held:
        raise ShardError(
            f"{out} holds {' and '.join(held)} already and shard folders to merge in {out / SHARDS_DIR}: keep one of "
            f"the two (move the other away) and rerun"
        )
    answers: dict[tuple[tuple[str, str, int | None], str], tuple[Shard, dict[str, Any]]] = {}
    for shard, folder in folders.items():
        for record in _shard_answers(folder, shard, model, settings, sets):
            key = ((record["benchmark"], record["method"], _budget_key(record["budget"])), str(record["sample_id"]))
            if key in answers:
                raise ShardError(
                    f"sample {key[1]} of cell {key[0]} is answered by shard {answers[key][0]} and by shard {shard}: the "
                    "shards overlap; rerun them into a fresh run folder"
                )
            answers[key] = (shard, record)
    count = next(iter(folders)).count
    order: list[tuple[tuple[str, str, int | None], str]] = []
    missing: dict[Shard, int] = {}
    for bench in dict.fromkeys(c.benchmark for c in cells):
        bench_cells = [c for c in cells if c.benchmark == bench]
        longest = max(len(cell_ids(c)) for c in bench_cells)
        ids = next(cell_ids(c) for c in bench_cells if len(cell_ids(c)) == longest)
        for k, sample_id in enumerate(ids):
            owner = Shard(k % count, count)
            for cell in (c for c in bench_cells if k < len(cell_ids(c))):
                key = (cell.key, sample_id)
                if key not in answers:
                    missing[owner] = missing.get(owner, 0) + 1
                elif answers[key][0] != owner:
                    raise ShardError(f"sample {sample_id} (position {k}) of cell {cell} belongs to shard {owner}, but shard {answers[key][0]} answered it")
                order.append(key)
    if missing:
        which = ", ".join(f"{shard} ({n} answers)" for shard, n in sorted(missing.items(), key=lambda item: item[0].index))
        raise ShardError(f"the shards are incomplete: {which} missing; rerun each (`--shard i/n`: it resumes), then merge")
    unexpected = set(answers) - set(order)
    if unexpected:
        cell, sample_id = sorted(unexpected, key=str)[0]
        raise ShardError(
            f"the shards hold {len(unexpected)} answers this sweep does not ask for (e.g. sample {sample_id} of cell {cell}): "
            "they ran other benchmarks, methods or budgets; rerun them with this config"
        )
    for name in (SWEEP_FILE, LEDGER_FILE):  # no answers are here (checked above): nothing they describe remains
        (out / name).unlink(missing_ok=True)
    ledger = _Ledger(out, {})
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8", newline="") as handle:
        ledger.append(handle, PREDICTIONS_FILE, "".join(json.dumps(answers[key][1], ensure_ascii=False) + "\n" for key in order))
    retire_shards(out)
    return len(order)


def _with_protocol(settings: Mapping[str, Any] | None, protocol: LmmsProtocol) -> dict[str, Any]:
    """The sweep's settings with its scoring protocol (and lmms-eval commit) recorded."""
    return {**(settings or {}), "scoring": protocol.as_dict()}


def _scoring_context(spec: BenchmarkSpec, samples: Sequence[EvalSample]) -> dict[str, Any]:
    """:func:`~sparsemm_utils.lmms_protocol.scoring_context` of a benchmark's samples (a
    ``BenchmarkSamples`` gives its answers without decoding images); empty when none is needed."""
    if not spec.metric_fields or "corpus" not in spec.metric_fields:
        return {}
    all_answers = getattr(samples, "all_answers", None)
    return scoring_context(spec, all_answers() if all_answers is not None else [s.answers for s in samples])


def _prediction_record(
    model: str, cell: "Cell", sample: EvalSample, spec: BenchmarkSpec, gen: Generation, seconds: float,
    protocol: LmmsProtocol, context: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    if not isinstance(gen.text, str):
        raise EvaluationError(f"the generator returned {type(gen.text).__name__} for {cell}, not a str")
    scored = scored_answer(spec, gen.text, sample, protocol, context)
    prediction = scored["prediction"]
    record: dict[str, Any] = {
        "model": model, "benchmark": cell.benchmark, "method": cell.method, "budget": cell.budget,
        "sample_id": sample.sample_id, "prediction": prediction, "answers": list(sample.answers),
        "scores": scored["scores"],
        "extra": {k: v for k, v in sample.extra.items() if k != "raw_question" and isinstance(v, (str, int, float, bool))},
        "prompt_tokens": gen.prompt_tokens, "kv_bytes": gen.kv_bytes,
        "seconds": round(gen.seconds if gen.seconds is not None else seconds, 4),
    }  # fmt: skip
    if "options" in scored:
        record["options"] = scored["options"]
    if prediction != gen.text:
        record["raw_output"] = gen.text
    if gen.details:
        record["method_details"] = dict(gen.details)
    return record


def _result_rows(
    model: str, spec: BenchmarkSpec, cells: Sequence["Cell"], sample_ids: Sequence[str], by_cell: Mapping[Any, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per reported number of each finished cell (:func:`~sparsemm_utils.lmms_protocol.aggregates`:
    the mean of each metric, and lmms-eval's own aggregates such as OCRBench's /1000 score): the
    number, its 95% bootstrap interval over its units (scaled as the number), and for a budgeted
    method other than SparseMM the paired difference SparseMM minus the method at the same budget
    with its interval (when SparseMM's cell there is complete). ``n_samples``: the questions."""
    rows = []
    for cell in cells:
        reference = by_cell.get((cell.benchmark, "sparsemm", cell.budget), {})
        paired = cell.budget is not None and cell.method != "sparsemm" and all(s in reference for s in sample_ids)
        theirs = {a.metric: a for a in aggregates(spec, [by_cell[cell.key][s] for s in sample_ids])}
        ours = {a.metric: a for a in aggregates(spec, [reference[s] for s in sample_ids])} if paired else {}
        for metric, agg in theirs.items():
            low, high = (agg.scale * v for v in bootstrap_interval(agg.values, seed=0))
            row = {
                "model": model, "benchmark": cell.benchmark, "method": cell.method, "budget": cell.budget,
                "metric": metric, "score": agg.score, "n_samples": len(sample_ids), "ci_low": low, "ci_high": high,
            }  # fmt: skip
            if metric in ours and ours[metric].values.size == agg.values.size:
                d_low, d_high = (agg.scale * v for v in paired_bootstrap_interval(ours[metric].values, agg.values, seed=0))
                diff = agg.scale * float((ours[metric].values - agg.values).mean())
                row.update({"sparsemm_minus_method": diff, "diff_ci_low": d_low, "diff_ci_high": d_high})
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Rescored:
    """A sweep scored again (:func:`rescore_records`): ``records``, its prediction records with
    ``prediction`` and ``scores`` as the protocol gives them (``raw_output``: the model's text
    where the strip or a stop string changed it); ``results``, the results table
    (:data:`RESULTS_COLUMNS`) over them."""

    protocol: LmmsProtocol
    records: list[dict[str, Any]]
    results: pd.DataFrame


def rescore_records(records: Sequence[Mapping[str, Any]], *, lmms_eval: str | LmmsProtocol = DEFAULT_LMMS_EVAL) -> Rescored:
    """Prediction records scored again under ``lmms_eval``: each record's model text
    (``raw_output`` where the record has one, else ``prediction``: records written before answers
    were stripped hold the model's text there) goes through the protocol's strip and metrics
    (:func:`~sparsemm_utils.lmms_protocol.scored_answer`), then each cell (benchmark, method,
    budget; in the order the records first name them) is aggregated over its samples (in record
    order) with its intervals and SparseMM's paired differences, exactly as :func:`run_sweep` writes
    ``results.csv``. Nothing is generated and no image is needed: a record keeps the answers and
    the scalar fields the metrics read."""
    protocol = get_protocol(lmms_eval)
    if not records:
        raise EvaluationError("no prediction records to re-score: the sweep answered nothing yet")
    models = sorted({str(r.get("model")) for r in records})
    if len(models) != 1:
        raise EvaluationError(f"the records come from {len(models)} models {models}; re-score one model's sweep at a time")
    by_bench: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_bench.setdefault(str(record["benchmark"]), []).append(record)
    rows: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for bench, bench_records in by_bench.items():
        spec = protocol.spec(bench)
        samples = {}
        for r in bench_records:
            extra = dict(r.get("extra") or {})
            if "options" in r:
                extra["options"] = dict(r["options"])
            samples.setdefault(str(r["sample_id"]), EvalSample(str(r["sample_id"]), None, "", tuple(r["answers"]), extra))
        context = scoring_context(spec, [s.answers for s in samples.values()])
        by_cell: dict[tuple[str, str, int | None], dict[str, dict[str, Any]]] = {}
        for r in bench_records:
            raw = r.get("raw_output", r["prediction"])
            record = {k: v for k, v in r.items() if k != "raw_output"}
            record.update(scored_answer(spec, raw, samples[str(r["sample_id"])], protocol, context))
            if record["prediction"] != raw:
                record["raw_output"] = raw
            by_cell.setdefault((bench, str(r["method"]), _budget_key(r["budget"])), {})[str(r["sample_id"])] = record
            out.append(record)
        for key, answered in by_cell.items():
            rows += _result_rows(models[0], spec, [Cell(*key)], list(answered), by_cell)
    frame = pd.DataFrame([{k: row.get(k) for k in RESULTS_COLUMNS} for row in rows], columns=list(RESULTS_COLUMNS))
    frame["budget"] = pd.to_numeric(frame["budget"], errors="coerce").astype("Int64")
    return Rescored(protocol, out, frame)


def rescore_sweep(folder: str | Path, *, lmms_eval: str | LmmsProtocol = DEFAULT_LMMS_EVAL) -> Rescored:
    """:func:`rescore_records` of a sweep folder's ``predictions.jsonl``, after checking it against
    its ledger (:func:`verify_ledger`: an edited answer raises :class:`SweepTamperedError`)."""
    folder = Path(folder)
    if not (folder / PREDICTIONS_FILE).is_file():
        raise EvaluationError(f"{folder} has no {PREDICTIONS_FILE}: give a step-05 folder (e.g. runs/study/05_eval)")
    verify_ledger(folder)
    return rescore_records(read_predictions(folder)[0], lmms_eval=lmms_eval)


# --------------------------------------------------------------------------------------------
# budgets


def scaled_budgets(
    prompt_tokens: float,
    *,
    window: int,
    budgets: Sequence[int] = PAPER_BUDGETS,
    reference_prompt_tokens: float = REFERENCE_PROMPT_TOKENS,
) -> tuple[int, ...]:
    """The paper's budgets scaled to shorter prompts: ``max(window + 1, round(B * prompt_tokens /
    reference_prompt_tokens))`` for each B, duplicates removed, ascending.

    The paper's budgets are a share of a ~2400-token prompt (64 is 2.7%, 2048 is 85%); a tiny
    model's prompts are ~100 tokens, where B = 64 would already keep most of the prompt. Example:
    ``scaled_budgets(120, window=8)`` -> (9, 13, 26, 51, 102): 64 * 120 / 2400 = 3.2 and
    128 * 0.05 = 6.4 both rise to the floor 9; 256 * 0.05 = 12.8 -> 13; 512 -> 25.6 -> 26;
    1024 -> 51.2 -> 51; 2048 -> 102.4 -> 102."""
    if not (isinstance(prompt_tokens, (int, float)) and prompt_tokens > 0):
        raise EvaluationError(f"prompt_tokens must be a positive number, got {prompt_tokens!r}")
    if not (isinstance(reference_prompt_tokens, (int, float)) and reference_prompt_tokens > 0):
        raise EvaluationError(f"reference_prompt_tokens must be a positive number, got {reference_prompt_tokens!r}")
    check_int("window", window, 0, error=EvaluationError)
    scale = prompt_tokens / reference_prompt_tokens
    checked = (check_int(_BUDGET, b, 1, error=EvaluationError) for b in budgets)
    return tuple(sorted({max(window + 1, round(b * scale)) for b in checked}))


# --------------------------------------------------------------------------------------------
# the real generator


def prompt_tokens(loaded: Any, samples: Sequence[EvalSample], n: int = 8) -> list[int]:
    """Prompt lengths in tokens (image tokens and chat template included) of the first ``n``
    samples, as :class:`ModelGenerator` builds the prompts."""
    check_int("n", n, 1, error=EvaluationError)
    chosen = [samples[i] for i in range(min(n, len(samples)))]
    return [int(build_inputs(loaded, s.image, s.question)["input_ids"].shape[1]) for s in chosen]


@dataclass
class ModelGenerator:
    """:class:`Generate` on a loaded model (:class:`~sparsemm_utils.models.LoadedModel`): the
    prompt of :func:`~sparsemm_utils.prompts.build_inputs` (the family's chat template, system
    prompt, the image, then ``sample.question``), greedy decoding up to the benchmark's limit
    for this model family (:meth:`~sparsemm_utils.benchmarks.BenchmarkSpec.generation_limit`),
    the method's press through :func:`~sparsemm_utils.compression.compressed_generate` (FastV through
    :func:`~sparsemm_utils.fastv.fastv_generate_at_budget`), the new tokens decoded without special
    tokens. ``settings``: what :func:`press_for` needs (``window``, ``ratio``, ``head_scores``
    (layers, query_heads), ``seed``, ``fraction``, ``fastv_k``).
    ``max_new_tokens``: a cap below the benchmark's limit, for smoke runs only (it changes the
    answers: record it in the sweep's settings)."""

    loaded: Any
    settings: Mapping[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    _presses: dict[tuple[str, int | None], Any] = field(default_factory=dict, repr=False)

    def press(self, method: str, budget: int | None) -> Any:
        key = (method, budget)
        if key not in self._presses:
            self._presses[key] = press_for(method, budget, **self.settings)
        return self._presses[key]

    def __call__(self, sample: EvalSample, spec: BenchmarkSpec, method: str, budget: int | None) -> Generation:
        return self.answer(sample, method, budget, self._limit(spec, sample))

    def answer(self, sample: EvalSample, method: str, budget: int | None, limit: int) -> Generation:
        """One answer of ``method`` at ``budget`` to ``sample`` (its image and ``question``, the
        text given to the model), greedy, at most ``limit`` new tokens (the caller's limit: a
        benchmark's in :meth:`__call__`, an lmms-eval request's in the lmms-eval adapter)."""
        press = self.press(method, budget)
        t0 = time.perf_counter()
        inputs = build_inputs(self.loaded, sample.image, sample.question)
        n = int(inputs["input_ids"].shape[1])
        details = None
        if isinstance(press, FastVAtBudget):
            result = fastv_generate_at_budget(self.loaded, press, inputs, max_new_tokens=limit, do_sample=False)
            details = {"fastv_k": press.k, **asdict(result.match)}
        else:
            result = compressed_generate(self.loaded, press, inputs, max_new_tokens=limit, do_sample=False)
        return self._generation(result.sequences[0, n:], n, int(result.kv_bytes), time.perf_counter() - t0, details)

    def _generation(self, new: Any, n: int, kv_bytes: int, seconds: float, details: Mapping[str, Any] | None = None) -> Generation:
        text = self.loaded.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Generation(text, prompt_tokens=n, kv_bytes=kv_bytes, seconds=seconds, details=details)

    def _limit(self, spec: BenchmarkSpec, sample: EvalSample) -> int:
        limit = spec.sample_limit(sample, self.loaded.model_type)
        if self.max_new_tokens is not None:
            limit = min(limit, check_int("max_new_tokens", self.max_new_tokens, 1, error=EvaluationError))
        return limit

    def many(self, sample: EvalSample, spec: BenchmarkSpec, cells: Sequence[tuple[str, int | None]]) -> list[Generation]:
        """The answers of one sample under several (method, budget) cells, in order. The methods of
        :data:`SHAREABLE_PRESSES` share one prefill and decode together
        (:func:`~sparsemm_utils.shared_prefill.shared_generate`: token for token what
        :func:`~sparsemm_utils.compression.compressed_generate` gives each alone); the head masks and
        FastV run one by one. ``seconds`` of a shared answer is the group's time divided by its size."""
        return self.many_batch([sample], spec, [cells])[0]

    def many_batch(
        self, samples: Sequence[EvalSample], spec: BenchmarkSpec, cells: Sequence[Sequence[tuple[str, int | None]]]
    ) -> list[list[Generation]]:
        """:meth:`many` of several samples at once: ``cells[b]`` are sample b's cells. The shareable
        cells of all samples with the same generation limit run as ONE batch
        (:func:`~sparsemm_utils.shared_prefill.shared_generate_batch`: one left-padded prefill, every
        (sample, cell) a row of one decode; token for token what each gives alone); the head masks
        and FastV run one by one. ``seconds`` of a shared answer is its batch's time divided by the
        batch's answers."""
        if len(cells) != len(samples):
            raise EvaluationError(f"cells gives {len(cells)} samples' cells for {len(samples)} samples")
        shared = [[j for j, (m, _) in enumerate(own) if get_method(m).press in SHAREABLE_PRESSES] for own in cells]
        out: list[list[Generation | None]] = [[None] * len(own) for own in cells]
        by_limit: dict[int, list[int]] = {}
        for b, sample in enumerate(samples):
            if shared[b]:
                by_limit.setdefault(self._limit(spec, sample), []).append(b)
        for limit, members in by_limit.items():
            t0 = time.perf_counter()
            prompts = [build_inputs(self.loaded, samples[b].image, samples[b].question) for b in members]
            presses = [[self.press(*cells[b][j]) for j in shared[b]] for b in members]
            results = shared_generate_batch(self.loaded, presses, prompts, max_new_tokens=limit)
            seconds = (time.perf_counter() - t0) / sum(len(own) for own in presses)
            for b, inputs, rows in zip(members, prompts, results):
                n = int(inputs["input_ids"].shape[1])
                for j, result in zip(shared[b], rows):
                    out[b][j] = self._generation(result.sequences[0, n:], n, int(result.kv_bytes), seconds)
        for b, own in enumerate(cells):
            for j, (method, budget) in enumerate(own):
                if out[b][j] is None:
                    out[b][j] = self(samples[b], spec, method, budget)
        return out  # type: ignore[return-value]

