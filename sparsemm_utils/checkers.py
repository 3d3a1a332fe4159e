"""Checkers for the course exercises: a student's function against the library's reference.

The repository is also used to teach (README, "Teaching with this repo"): for the five rules a
student learns most from, an exercise notebook (``notebooks/exercises/``, built by
``python -m sparsemm_utils.exercises build``) asks for one function, and the checker here runs it
on several cases and says which case failed and why.

======================  ===========================  =============================================
checker                 the student writes           the rule (and the reference it is compared to)
======================  ===========================  =============================================
:func:`check_map_box`   ``map_box(box, width,        docs/method.md §3, Qwen2-VL: box -> visual-token
                        height, geometry)``          positions (``QwenVLPatchMapper.map_box``)
:func:`check_hit_rule`  ``hit_rule(token_texts,      docs/method.md §4: the OCR hit rule, s_n of one
                        chunk_texts, chunk_regions,  sample (``SubstringMatch`` +
                        attention_rows)``            ``score_attention_rows``)
:func:`check_allocation` ``allocate(head_scores,     docs/method.md §5 steps 1-4: SparseMM's caps
                        kv_heads, budget, window,    (``SparseMMAllocation.capacities``)
                        ratio)``
:func:`check_snapkv_selection` ``snapkv_select(      docs/method.md §5, token selection: which prompt
                        query, key, caps, window,    positions each KV head keeps
                        kernel_size)``               (``snapkv_scores`` + ``topk_positions``)
:func:`check_anls`      ``anls(prediction,           docs/method.md §6: ANLS of one question
                        answers)``                   (``metrics.anls``)
======================  ===========================  =============================================

Every checker runs hand-worked cases first (their expected values are literals worked out in the
comments, not computed by the library, so a wrong reference would be caught too) and then
``n_random`` randomized cases drawn from ``numpy.random.default_rng(seed)`` whose expected values
come from the reference. Randomized cases are drawn away from ties and rounding boundaries (a
float64 student and the float32 reference must not disagree by an ulp). The student's function
receives copies of the inputs, so it cannot change a case by mutating it.

A checker returns a :class:`CheckReport` (printed when ``verbose``); when a case fails it raises
:class:`CheckFailed` (an ``AssertionError``) whose message names the first failing case, its
inputs, the expected and the returned value, what differs, and what the case is about
(``raise_on_failure=False`` returns the report instead). The ``reference_*`` functions have the
students' signatures and call the library; the meta-test (``tests/unit/test_checkers.py``) runs
every checker against them (must pass) and against deliberately wrong versions (must fail).
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .allocation import ModelShape, SparseMMAllocation
from .compression import snapkv_scores, topk_positions
from .head_scoring_rule import GeneratedTokens, SubstringMatch, score_attention_rows
from .metrics import anls
from .patch_mapping import QwenVLGeometry, QwenVLPatchMapper
from .validate import check_int

__all__ = [
    "CheckerError",
    "CheckFailed",
    "Case",
    "CaseResult",
    "CheckReport",
    "CHECKERS",
    "REFERENCES",
    "check_map_box",
    "check_hit_rule",
    "check_allocation",
    "check_snapkv_selection",
    "check_anls",
    "reference_map_box",
    "reference_hit_rule",
    "reference_allocation",
    "reference_snapkv_selection",
    "reference_anls",
]


# ---------------------------------------------------------------------------------------- errors


class CheckerError(ValueError):
    """A checker was called wrongly (not a function, a bad ``n_random`` or ``seed``)."""


class CheckFailed(AssertionError):
    """The student's function disagrees with the reference on at least one case.

    ``report`` is the full :class:`CheckReport`; the message describes the first failing case.
    """

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(report.failure_message())


# ----------------------------------------------------------------------------------- the running


@dataclass(frozen=True)
class Case:
    """One input of a checker: ``args`` are passed positionally to the student's function.

    ``name``: shown in the report ("hand 2: box on exact cell boundaries", "random 7");
    ``expected``: the right answer; ``about``: what the case exercises (printed when it fails).
    """

    name: str
    args: tuple[Any, ...]
    expected: Any
    about: str = ""


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case: ``problem`` says what differs (empty when it passed)."""

    case: Case
    passed: bool
    got: Any = None
    problem: str = ""


@dataclass
class CheckReport:
    """All case results of one checker run, in order (hand-worked cases first)."""

    exercise: str
    function: str
    arg_names: tuple[str, ...]
    results: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line: how many cases passed, and the names of the failing ones."""
        n = len(self.results)
        if self.passed:
            return f"{self.exercise}: all {n} cases passed ({self.function})"
        names = ", ".join(r.case.name for r in self.failures[:6])
        more = f" and {len(self.failures) - 6} more" if len(self.failures) > 6 else ""
        return f"{self.exercise}: {len(self.failures)} of {n} cases FAILED ({self.function}): {names}{more}"

    def failure_message(self) -> str:
        """The summary, then the first failing case in full: inputs, expected, got, why."""
        if self.passed:
            return self.summary()
        first = self.failures[0]
        lines = [self.summary(), "", f"First failing case: {first.case.name}"]
        if first.case.about:
            lines.append(f"  what it checks: {first.case.about}")
        lines.append("  inputs:")
        for name, value in zip(self.arg_names, first.case.args):
            lines.append(f"    {name} = {_describe(value)}")
        lines.append(f"  expected: {_describe(first.case.expected)}")
        lines.append(f"  got:      {_describe(first.got)}")
        lines.append(f"  problem:  {first.problem}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.failure_message()


def _describe(value: Any, limit: int = 40) -> str:
    """A compact, readable rendering of a case input or result for the report."""
    if hasattr(value, "detach") and hasattr(value, "shape"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size <= limit:
            body = np.array2string(value, precision=5, separator=", ", max_line_width=100)
            return body.replace("\n", "\n              ") + f"  (shape {value.shape}, {value.dtype})"
        return f"array of shape {value.shape}, dtype {value.dtype}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        shapes = sorted({v.shape for v in value})
        return f"list of {len(value)} arrays, shapes {shapes[0]} .. {shapes[-1]}"
    text = repr(value)
    return text if len(text) <= 400 else text[:400] + " ..."


def _problem_from_exception(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "the function raised NotImplementedError: the stub is not filled in yet"
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}: {last.line or ''})"
    return f"the function raised {type(exc).__name__}: {exc}{where}"


def _check_function(fn: Any, name: str) -> None:
    if not callable(fn):
        raise CheckerError(f"{name} expects your function itself (e.g. {name}(my_function)), got {fn!r}")


def _check_options(n_random: Any, seed: Any) -> tuple[int, int]:
    """A checker's ``n_random`` (random cases to add) and ``seed``, each an int >= 0."""
    return check_int("n_random", n_random, 0, error=CheckerError), check_int("seed", seed, 0, error=CheckerError)


def _run(
    exercise: str,
    fn: Callable[..., Any],
    arg_names: tuple[str, ...],
    cases: Sequence[Case],
    compare: Callable[[Any, Any, Case], str],
    *,
    raise_on_failure: bool,
    verbose: bool,
) -> CheckReport:
    """Run ``fn`` on every case (inputs deep-copied); ``compare(expected, got, case)`` returns ''
    when they agree, else what differs."""
    report = CheckReport(exercise, getattr(fn, "__name__", repr(fn)), arg_names)
    for case in cases:
        args = copy.deepcopy(case.args)
        try:
            got = fn(*args)
        except Exception as exc:  # any error of the student's code is a failed case, not a crash
            report.results.append(CaseResult(case, False, None, _problem_from_exception(exc)))
            continue
        try:
            problem = compare(case.expected, got, case)
        except Exception as exc:  # an unusable return value (wrong type, ragged lists, ...)
            problem = f"the returned value cannot be compared ({type(exc).__name__}: {exc})"
        report.results.append(CaseResult(case, not problem, got, problem))
    if raise_on_failure and not report.passed:
        raise CheckFailed(report)  # its message starts with the summary
    if verbose:
        print(report.summary() if report.passed else report.failure_message())
    return report


# ------------------------------------------------------------------------------------- map_box


MAP_BOX_ARGS = ("box", "width", "height", "geometry")


def reference_map_box(box: Sequence[float], width: int, height: int, geometry: Any = None) -> list[int]:
    """The library's Qwen2-VL box -> positions (docs/method.md §3), with the exercise's signature.

    ``box`` ``(x0, y0, x1, y1)`` in original-image pixels; ``geometry`` a
    :class:`~sparsemm_utils.patch_mapping.QwenVLGeometry` (default: the original settings).
    Returns the sorted positions relative to the first image token.
    """
    mapper = QwenVLPatchMapper(geometry if geometry is not None else QwenVLGeometry())
    return mapper.map_box(tuple(box), width=width, height=height).tolist()


def _as_int_list(got: Any) -> list[int]:
    if hasattr(got, "detach"):
        got = got.detach().cpu().numpy()
    array = np.asarray(list(got) if not isinstance(got, np.ndarray) else got)
    if array.ndim != 1:
        raise TypeError(f"expected a flat sequence of ints, got an array of shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise TypeError(f"expected ints, got dtype {array.dtype}")
    return [int(v) for v in array]


def _compare_positions(expected: Sequence[int], got: Any, case: Case) -> str:
    got_list = _as_int_list(got)
    if got_list == list(expected):
        return ""
    exp_set, got_set = set(expected), set(got_list)
    if exp_set == got_set:
        if len(got_list) != len(set(got_list)):
            return "the right positions, but some appear more than once: return each position once"
        return "the right positions, but not sorted: return them in increasing order"
    parts = []
    missing = sorted(exp_set - got_set)
    extra = sorted(got_set - exp_set)
    if missing:
        parts.append(f"missing {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:12]}{' ...' if len(extra) > 12 else ''}")
    return "; ".join(parts)


def _near_cell_edge(box: Sequence[float], width: int, height: int, geometry: Any) -> bool:
    """True when a scaled coordinate lies within 1e-6 px of a multiple of 28 (then ``x * W_r / W``
    and ``x * (W_r / W)``, or ``floor(x / 28)`` and ``x // 28``, may disagree by one ulp)."""
    h_r, w_r = geometry.resized_size(height, width)
    f = geometry.factor
    for value, size, resized in zip(box, (width, height, width, height), (w_r, h_r, w_r, h_r)):
        clipped = min(max(value, 0.0), size)
        scaled = clipped * resized / size
        if abs(scaled / f - round(scaled / f)) * f < 1e-6:
            return True
    return False


def _map_box_cases(n_random: int, seed: int) -> list[Case]:
    original = QwenVLGeometry()  # min_pixels 32*28^2, max_pixels 16384*28^2 (docs/method.md §3)
    small = QwenVLGeometry(min_pixels=28 * 28, max_pixels=4 * 28 * 28)  # forces a downscale
    cases = [
        # 280 x 140 px is already a multiple of 28 within [min, max]: no resize, grid 5 rows x 10 cols.
        # cols 30//28 = 1 .. 60//28 = 2, rows 10//28 = 0 .. 40//28 = 1 -> 0*10+1, 0*10+2, 1*10+1, 1*10+2.
        Case("hand 1: a box inside the image", ((30, 10, 60, 40), 280, 140, original), [1, 2, 11, 12],
             "rows floor(y0/28)..floor(y1/28) and columns floor(x0/28)..floor(x1/28), position row * grid_w + col"),
        # cols 28//28 = 1 .. 56//28 = 2 and rows 1 .. 2, BOTH ends inclusive -> 11, 12, 21, 22
        # (an exclusive end would give only 11).
        Case("hand 2: a box on exact cell boundaries", ((28, 28, 56, 56), 280, 140, original), [11, 12, 21, 22],
             "the ranges are inclusive at both ends (x1 = 56 lies in column 2)"),
        # x1 = 280 = W gives column 280//28 = 10 = grid_w: clipped to the last column 9; y1 = 140 gives
        # row 5 = grid_h, clipped to row 4. cols 250//28 = 8 .. 9, row 120//28 = 4 -> 48, 49.
        Case("hand 3: a box touching the right and bottom edges", ((250, 120, 280, 140), 280, 140, original), [48, 49],
             "an index equal to grid_w (grid_h) must be clipped to grid_w - 1 (grid_h - 1), not wrap to the next row"),
        # a point: column 100//28 = 3, row 50//28 = 1 -> 1*10 + 3 = 13.
        Case("hand 4: a zero-size box (a point)", ((100, 50, 100, 50), 280, 140, original), [13],
             "a degenerate box still covers the one token under it"),
        # clipped to (0, 0, 20, 10) first: column 0, row 0 -> 0.
        Case("hand 5: a box sticking out of the image", ((-20, -5, 20, 10), 280, 140, original), [0],
             "clip the box to [0, W] x [0, H] before mapping it"),
        # 112 x 112 px, max_pixels = 4 * 28^2: smart_resize gives 56 x 56 (grid 2 x 2), scale 0.5.
        # The box becomes (15, 15, 20, 20): column 0, row 0 -> 0 (unscaled it would be column 1, row 1 -> 3).
        Case("hand 6: an image the processor downscales", ((30, 30, 40, 40), 112, 112, small), [0],
             "scale the box by resized/original size (geometry.resized_size) before dividing by 28"),
    ]
    rng = np.random.default_rng(seed)
    geometries = (original, small, QwenVLGeometry(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28))
    i = 0
    while i < n_random:
        geometry = geometries[int(rng.integers(len(geometries)))]
        width, height = int(rng.integers(60, 900)), int(rng.integers(60, 900))
        # OCR-like boxes: mostly small, some sticking out of the image, always touching it
        x0 = rng.uniform(-0.05 * width, width)
        y0 = rng.uniform(-0.05 * height, height)
        x1 = max(x0 + rng.exponential(0.15 * width), 0.0)
        y1 = max(y0 + rng.exponential(0.05 * height), 0.0)
        box = (round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2))
        if _near_cell_edge(box, width, height, geometry):
            continue
        i += 1
        cases.append(Case(f"random {i} (seed {seed})", (box, width, height, geometry),
                          reference_map_box(box, width, height, geometry), "a random box on a random image size"))
    return cases


def check_map_box(
    fn: Callable[..., Any], *, n_random: int = 30, seed: int = 0, raise_on_failure: bool = True, verbose: bool = True
) -> CheckReport:
    """Check ``fn(box, width, height, geometry) -> positions`` against the Qwen2-VL rule (docs/method.md §3).

    ``box`` is ``(x0, y0, x1, y1)`` in original-image pixels (floats), ``width`` / ``height`` the
    original image size, ``geometry`` a :class:`~sparsemm_utils.patch_mapping.QwenVLGeometry`
    (``geometry.resized_size(height, width)`` gives the processor's ``(H_r, W_r)``, 28 px per token).
    ``fn`` returns the sorted positions relative to the first image token (a list or 1-D array).
    """
    _check_function(fn, "check_map_box")
    n_random, seed = _check_options(n_random, seed)
    return _run("map_box (docs/method.md §3)", fn, MAP_BOX_ARGS, _map_box_cases(n_random, seed), _compare_positions,
                raise_on_failure=raise_on_failure, verbose=verbose)


# ------------------------------------------------------------------------------------- hit rule


HIT_RULE_ARGS = ("token_texts", "chunk_texts", "chunk_regions", "attention_rows")


def reference_hit_rule(
    token_texts: Sequence[str],
    chunk_texts: Sequence[str],
    chunk_regions: Sequence[Sequence[int]],
    attention_rows: Sequence[np.ndarray],
) -> np.ndarray:
    """The library's s_n for one sample (docs/method.md §4), with the exercise's signature.

    ``token_texts`` (T,) the generated tokens' strings; ``chunk_texts`` (C,) the OCR chunks;
    ``chunk_regions`` (C,) each chunk's ABSOLUTE key positions; ``attention_rows`` T arrays
    (L, H, N_t): the attention of the query that produced token t over all its N_t keys.
    Returns float64 (L, H).
    """
    record = {
        "image_token_start": 0,
        "chunks": [{"chunk": text, "positions": [int(p) for p in region]} for text, region in zip(chunk_texts, chunk_regions)],
    }
    matches = SubstringMatch().match(GeneratedTokens.from_texts(list(token_texts)), record)
    return score_attention_rows([np.asarray(r) for r in attention_rows], matches)


def _compare_scores(expected: np.ndarray, got: Any, case: Case, atol: float = 1e-9) -> str:
    if hasattr(got, "detach"):
        got = got.detach().cpu().numpy()
    got_array = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got_array.shape != expected.shape:
        return f"wrong shape {got_array.shape}: expected {expected.shape}"
    bad = ~np.isclose(got_array, expected, rtol=0, atol=atol)
    if not bad.any():
        return ""
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} of {bad.size} entries differ; first at {where}: expected "
            f"{expected[where]:.6g}, got {got_array[where]:.6g}")


def _peaked_rows(spec: Mapping[tuple[int, int, int], tuple[int, ...]], steps: int, layers: int, heads: int, keys: int) -> list[np.ndarray]:
    """Attention rows (L, H, N) per token: 0.01 everywhere, then +0.5, +0.3, ... at the positions
    ``spec[(t, l, h)]`` lists (the first is the argmax), renormalised to sum to 1."""
    rows = []
    for t in range(steps):
        row = np.full((layers, heads, keys), 0.01)
        for l in range(layers):
            for h in range(heads):
                for bump, j in zip((0.5, 0.3, 0.2), spec[(t, l, h)]):
                    row[l, h, j] += bump
        rows.append(row / row.sum(axis=-1, keepdims=True))
    return rows


def _hit_rule_cases(n_random: int, seed: int) -> list[Case]:
    # Hand case. Chunks "cat" (region {10, 11}), "Dog" ({12, 13, 14}), "cot" ({15}); 16 keys.
    # Tokens: "ca" -> only "cat" (|R| = 2); "o" -> "Dog" AND "cot": ambiguous, skipped;
    # "Do" -> only "Dog" (|R| = 3); "x" -> no chunk, skipped; "d" -> no chunk (the match is
    # case-sensitive: "Dog" has a capital D), skipped.
    # argmax per token t = 0..4 (second-largest in brackets where it matters):
    #   L0H0: 10, 12, 13, 0, 12   -> hits at t0 (1/2) and t2 (1/3): 5/6
    #   L0H1:  3, 15, 14, 14, 13  -> hit at t2 only: 1/3
    #   L1H0: 11,  5, 2 (then 12), 7, 1 -> hit at t0: 1/2 (t2's argmax 2 is a text key: a miss,
    #                                      although the largest IMAGE key 12 is in the region)
    #   L1H1:  0, 11,  9, 10, 14  -> nothing: 0
    argmax = {
        (0, 0): (10, 12, 13, 0, 12),
        (0, 1): (3, 15, 14, 14, 13),
        (1, 0): (11, 5, 2, 7, 1),
        (1, 1): (0, 11, 9, 10, 14),
    }
    spec = {(t, l, h): (argmax[(l, h)][t],) for (l, h) in argmax for t in range(5)}
    spec[(2, 1, 0)] = (2, 12)
    rows = _peaked_rows(spec, 5, 2, 2, 16)
    cases = [
        Case("hand 1: unique, ambiguous, missing and case-sensitive matches",
             (["ca", "o", "Do", "x", "d"], ["cat", "Dog", "cot"], [[10, 11], [12, 13, 14], [15]], rows),
             np.array([[5 / 6, 1 / 3], [1 / 2, 0.0]]),
             "a token counts only when exactly ONE chunk contains it (case-sensitive); a hit adds 1/|R|; "
             "the argmax runs over ALL keys, text included"),
    ]
    # Hand case 2: keys grow by one per generated token (N_t = 6 + t), one layer, one head.
    # Chunks "ab" ({2, 3}) and "cd" ({4}). Tokens "a", "cd", "b": argmax 3, 4, 5 (key 5 is the
    # first generated token, a text key) -> 1/2 + 1/1 + 0 = 1.5.
    rows2 = []
    for t, j in enumerate((3, 4, 5)):
        row = np.full((1, 1, 6 + t), 0.02)
        row[0, 0, j] = 0.9
        rows2.append(row / row.sum(axis=-1, keepdims=True))
    cases.append(Case("hand 2: rows that grow by one key per generated token",
                      (["a", "cd", "b"], ["ab", "cd"], [[2, 3], [4]], rows2), np.array([[1.5]]),
                      "each token has its own row length N_t; a region of one token is worth a full point"))
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdeAB "))
    for i in range(n_random):
        layers, heads = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        n_chunks = int(rng.integers(1, 5))
        chunks = ["".join(rng.choice(alphabet, int(rng.integers(2, 7)))) for _ in range(n_chunks)]
        image_start, n_image = int(rng.integers(2, 6)), int(rng.integers(n_chunks + 2, 3 * n_chunks + 8))
        order = rng.permutation(n_image)
        cuts = np.sort(rng.choice(np.arange(1, n_image), n_chunks - 1, replace=False)) if n_chunks > 1 else []
        regions = [sorted(int(image_start + p) for p in part) for part in np.split(order, cuts)]
        steps = int(rng.integers(3, 12))
        tokens = []
        for _ in range(steps):
            source = chunks[int(rng.integers(n_chunks))]
            start = int(rng.integers(len(source)))
            token = source[start:start + int(rng.integers(1, 4))]
            if rng.random() < 0.15:
                token = token.swapcase()
            if rng.random() < 0.1:
                token = "z" + token
            tokens.append(token)
        prompt_len = image_start + n_image + int(rng.integers(1, 5))
        rows = []
        for t in range(steps):
            row = rng.dirichlet(np.full(prompt_len + t, 0.5), size=(layers, heads))
            peaks = rng.random((layers, heads)) < 0.6
            for l, h in zip(*np.nonzero(peaks)):
                region = regions[int(rng.integers(n_chunks))]
                row[l, h, region[int(rng.integers(len(region)))]] += 1.5
            rows.append(row / row.sum(axis=-1, keepdims=True))
        args = (tokens, chunks, regions, rows)
        cases.append(Case(f"random {i + 1} (seed {seed})", args, reference_hit_rule(*args),
                          "random chunks, tokens (some ambiguous, some case-swapped) and attention rows"))
    return cases


def check_hit_rule(
    fn: Callable[..., Any], *, n_random: int = 30, seed: int = 0, raise_on_failure: bool = True, verbose: bool = True
) -> CheckReport:
    """Check ``fn(token_texts, chunk_texts, chunk_regions, attention_rows) -> s_n`` (docs/method.md §4).

    For every token t: the chunks containing ``token_texts[t]`` as a substring (case-sensitive);
    only when exactly one does, with region R (its ``chunk_regions`` entry, absolute key
    positions), j* = argmax over all keys of ``attention_rows[t][l, h]`` (an (L, H, N_t) array) and
    ``s[l, h] += 1 / |R|`` when j* is in R. ``fn`` returns s as an (L, H) array of floats.
    """
    _check_function(fn, "check_hit_rule")
    n_random, seed = _check_options(n_random, seed)
    return _run("hit_rule (docs/method.md §4)", fn, HIT_RULE_ARGS, _hit_rule_cases(n_random, seed), _compare_scores,
                raise_on_failure=raise_on_failure, verbose=verbose)


# ----------------------------------------------------------------------------------- allocation


ALLOCATION_ARGS = ("head_scores", "kv_heads", "budget", "window", "ratio")


def reference_allocation(head_scores: np.ndarray, kv_heads: int, budget: int, window: int = 32, ratio: float = 0.1) -> np.ndarray:
    """The library's SparseMM caps (docs/method.md §5, steps 1-4), with the exercise's signature.

    ``head_scores`` (L, H) visual scores S; returns int64 (L, kv_heads): the tokens each KV head
    selects, the window excluded.
    """
    scores = np.asarray(head_scores, dtype=np.float64)
    shape = ModelShape(scores.shape[0], scores.shape[1], kv_heads)
    allocation = SparseMMAllocation(budget=budget, window=window, ratio=ratio)
    return np.array(allocation.capacities(shape, head_scores=scores).selected)


def _compare_caps(expected: np.ndarray, got: Any, case: Case) -> str:
    if hasattr(got, "detach"):
        got = got.detach().cpu().numpy()
    got_array = np.asarray(got)
    if got_array.shape != expected.shape:
        return f"wrong shape {got_array.shape}: expected (layers, kv_heads) = {expected.shape}"
    if got_array.dtype.kind == "f":
        if not np.all(got_array == np.round(got_array)):
            return "caps must be whole numbers of tokens (round them, half to even)"
        got_array = got_array.astype(np.int64)
    elif got_array.dtype.kind not in "iu":
        return f"caps must be integers, got dtype {got_array.dtype}"
    bad = got_array != expected
    if not bad.any():
        return ""
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} of {bad.size} caps differ; first at (layer, kv_head) = {where}: expected "
            f"{expected[where]}, got {got_array[where]}; sum expected {int(expected.sum())}, got {int(got_array.sum())}")


def _near_half(values: np.ndarray, tol: float = 1e-7) -> bool:
    frac = np.abs(values - np.floor(values) - 0.5)
    return bool((frac < tol).any())


def _allocation_cases(n_random: int, seed: int) -> list[Case]:
    cases = [
        # L = 1, H = H_kv = 2, B = 42, w = 32 -> b = 10; m = floor(0.1 * 10) = 1; P = (10 - 1) * 1 * 2 = 18.
        # s~ = [1, 3] / 4 = [0.25, 0.75]; caps = round(0.25 * 18 + 1) = round(5.5) = 6 (half to even),
        # round(0.75 * 18 + 1) = round(14.5) = 14 (half to even; half-up would give 15).
        Case("hand 1: rounding half to even", (np.array([[1.0, 3.0]]), 2, 42, 32, 0.1), np.array([[6, 14]]),
             "cap = round(sigma * P + m) rounds .5 to the even integer (numpy's round), b = B - w"),
        # L = 2, H = 4, H_kv = 2 (query heads 0,1 -> KV head 0; 2,3 -> KV head 1); B = 52, w = 32 -> b = 20;
        # m = floor(2.0) = 2; P = (20 - 2) * 2 * 2 = 72. S sums to 4: s~ = [[.25, 0, 0, .25], [.5, 0, 0, 0]];
        # GQA sums: sigma = [[.25, .25], [.5, 0]]; caps = [[.25*72+2, .25*72+2], [.5*72+2, 0+2]] = [[20, 20], [38, 2]].
        Case("hand 2: grouped-query attention", (np.array([[1.0, 0, 0, 1], [2, 0, 0, 0]]), 2, 52, 32, 0.1),
             np.array([[20, 20], [38, 2]]),
             "normalise over ALL heads of all layers, then SUM the normalised scores of the query heads sharing a KV head"),
        # L = 2, H = H_kv = 2, B = 42, w = 32 -> b = 10; r = 0.15: m = floor(1.5) = 1; P = (10 - 1) * 4 = 36.
        # s~ = [[1, 1], [1, 5]] / 8 = [[.125, .125], [.125, .625]]; caps = round(4.5 + 1) = 6 (x3) and
        # round(22.5 + 1) = round(23.5) = 24. (m = round(1.5) = 2 would give P = 32 and [[6, 6], [6, 22]].)
        Case("hand 3: the uniform part is floored", (np.array([[1.0, 1.0], [1.0, 5.0]]), 2, 42, 32, 0.15),
             np.array([[6, 6], [6, 24]]), "m = floor(r * b), the pool P = (b - m) * L * H_kv"),
    ]
    rng = np.random.default_rng(seed)
    i = 0
    while len(cases) < 3 + n_random:
        layers, kv_heads, group = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        window = int(rng.choice([4, 8, 16, 32]))
        budget = window + int(rng.integers(1, 300))
        ratio = float(rng.choice([0.0, 0.1, 0.2, 0.5]))
        scores = rng.gamma(0.6, 1.0, size=(layers, kv_heads * group))
        scores[rng.random(scores.shape) < 0.2] = 0.0
        if not scores.sum() > 0:
            continue
        b = budget - window
        m = math.floor(b * ratio)
        sigma = (scores / scores.sum()).reshape(layers, kv_heads, group).sum(-1)
        if _near_half(sigma * (b - m) * layers * kv_heads + m):
            continue  # a cap this close to k + 0.5 would be decided by float rounding, not by the rule
        i += 1
        args = (scores, kv_heads, budget, window, ratio)
        cases.append(Case(f"random {i} (seed {seed})", args, reference_allocation(*args),
                          f"random scores, {layers} layers, {kv_heads} KV heads x {group} query heads, B = {budget}, "
                          f"w = {window}, r = {ratio}"))
    return cases


def check_allocation(
    fn: Callable[..., Any], *, n_random: int = 30, seed: int = 0, raise_on_failure: bool = True, verbose: bool = True
) -> CheckReport:
    """Check ``fn(head_scores, kv_heads, budget, window, ratio) -> caps`` (docs/method.md §5, steps 1-4).

    ``head_scores`` (L, H) float; ``kv_heads`` H_kv (query head h belongs to KV head
    h // (H / H_kv)); ``budget`` B (window included); ``window`` w; ``ratio`` r. ``fn`` returns the
    int caps (L, H_kv), the window excluded: cap = round(sigma * P + m), half to even.
    """
    _check_function(fn, "check_allocation")
    n_random, seed = _check_options(n_random, seed)
    return _run("allocation (docs/method.md §5)", fn, ALLOCATION_ARGS, _allocation_cases(n_random, seed), _compare_caps,
                raise_on_failure=raise_on_failure, verbose=verbose)


# ----------------------------------------------------------------------------- SnapKV selection


SNAPKV_ARGS = ("query", "key", "caps", "window", "kernel_size")


def reference_snapkv_selection(query: Any, key: Any, caps: Sequence[int], window: int, kernel_size: int = 5) -> list[list[int]]:
    """The library's SnapKV selection (docs/method.md §5), with the exercise's signature.

    ``query`` (1, H, n, d) and ``key`` (1, H_kv, n, d) torch tensors (post-RoPE); ``caps`` (H_kv,)
    selected tokens per KV head. Returns H_kv sorted lists of the prompt positions each keeps.
    """
    n = int(key.shape[-2])
    scores = snapkv_scores(query, key, window, None, kernel_size)
    return [p.tolist() for p in topk_positions(scores, list(caps), n, window)]


def _compare_selection(expected: list[list[int]], got: Any, case: Case) -> str:
    got_heads = list(got)
    if len(got_heads) != len(expected):
        return f"expected one list of positions per KV head ({len(expected)}), got {len(got_heads)}"
    for g, (exp, head) in enumerate(zip(expected, got_heads)):
        problem = _compare_positions(exp, head, case)
        if problem:
            return f"KV head {g} (cap {case.args[2][g]}): {problem}"
    return ""


def _qk(values: Sequence[Sequence[float]]) -> Any:
    """(H, n) scalars -> a (1, H, n, 1) float32 tensor (head_dim 1 keeps the hand cases readable)."""
    return torch.tensor(values, dtype=torch.float32)[None, :, :, None]


def _selection_margin_ok(query: Any, key: Any, caps: Sequence[int], window: int, kernel_size: int) -> bool:
    """True when every KV head's cap-th and (cap+1)-th largest scores are clearly apart, so the
    selection does not depend on float rounding or on how ties are broken."""
    scores = snapkv_scores(query, key, window, None, kernel_size).double().numpy()
    for row, cap in zip(scores, caps):
        if 0 < cap < row.size:
            ordered = np.sort(row)[::-1]
            if ordered[cap - 1] - ordered[cap] < 1e-5 * max(abs(ordered[cap - 1]), 1e-12):
                return False
    return True


def _snapkv_cases(n_random: int, seed: int) -> list[Case]:
    ln = math.log
    # Hand 1 (one head, head_dim 1, scaling 1/sqrt(1) = 1): n = 6, w = 2. Keys k_j = ln a_j with
    # a = [1, 2, 1, 4, 1, 1]; window queries q_4 = 1, q_5 = 2, so exp(q k_j) = a_j and a_j^2.
    # Query 4 sees keys 0..4 (causal): a / 9 -> [1, 2, 1, 4, 1] / 9;
    # query 5 sees keys 0..5: a^2 / 24 -> [1, 4, 1, 16, 1, 1] / 24.
    # Mean over the two window queries, prefix keys 0..3: A = [11, 28, 11, 80] / 144.
    # Pooling (kernel 5, padding 2, zeros counted): [50, 130, 130, 119] / 720.
    # cap 2 -> keys 1, 2, then the window 4, 5. Without pooling the top 2 would be keys 3, 1.
    q1 = _qk([[0, 0, 0, 0, 1, 2]])
    k1 = _qk([[ln(1), ln(2), ln(1), ln(4), ln(1), ln(1)]])
    cases = [
        Case("hand 1: pooling decides", (q1, k1, [2], 2, 5), [[1, 2, 4, 5]],
             "average over the window queries (causal inside the window), smooth with avg_pool1d(kernel 5, "
             "padding 2), keep the top-cap positions, then append the window"),
        # Same scores without pooling (kernel 1): A = [11, 28, 11, 80] / 144 -> top 2 = keys 3 and 1.
        Case("hand 2: kernel 1 (no smoothing)", (q1, k1, [2], 2, 1), [[1, 3, 4, 5]],
             "kernel_size = 1 means no smoothing: the top-cap of the averaged attention"),
    ]
    # Hand 3 (GQA: two query heads share one KV head, same keys as above). Head 0 as in hand 1;
    # head 1 has q_4 = -1, q_5 = -2, so it weighs 1/a_j: query 4 -> [1, 1/2, 1, 1/4, 1] / 3.75,
    # query 5 -> [1, 1/4, 1, 1/16, 1, 1] / 4.3125. Head 1's A on keys 0..3 is about
    # [.2493, .0957, .2493, .0406]; head 0's is [.0764, .1944, .0764, .5556]. Their MEAN is about
    # [.1628, .1450, .1628, .2981] -> with kernel 1 and cap 3: keys 3, 0, 2 (+ window 4, 5).
    # Head 0 alone would keep 3, 1 and one of 0/2.
    q3 = _qk([[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, -1, -2]])
    cases.append(Case("hand 3: grouped-query attention averages the group", (q3, k1, [3], 2, 1), [[0, 2, 3, 4, 5]],
                      "a KV head's scores are the MEAN over the query heads of its group"))
    # Hand 4: two KV heads (one query head each), caps 0 and 7 >= n - w = 4: the first keeps only
    # the window [4, 5]; the second keeps all 6 positions (no compression, docs/method.md §5).
    q4 = _qk([[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 1, 2]])
    k4 = _qk([[ln(1), ln(2), ln(1), ln(4), ln(1), ln(1)], [0, 0, 0, 0, 0, 0]])
    cases.append(Case("hand 4: cap 0 and a cap beyond the prompt", (q4, k4, [0, 7], 2, 5), [[4, 5], [0, 1, 2, 3, 4, 5]],
                      "a head always keeps the window; a head with cap >= n - w keeps every position"))
    # Hand 5 (causal mask; n = 5, w = 2, kernel 1): keys k = ln a with a = [4, 1, 1, 1, 64]; window
    # query 3 has q = +1 (weights a_j), query 4 has q = -1 (weights 1 / a_j).
    # With the mask query 3 sees keys 0..3: [4, 1, 1, 1] / 7; query 4 sees 0..4: [1/4, 1, 1, 1, 1/64] / 3.265625.
    # A on keys 0..2: key 0 = (4/7 + 0.076555) / 2 = 0.32399, keys 1, 2 = (1/7 + 0.306220) / 2 = 0.22454
    # -> cap 1 keeps key 0. WITHOUT the mask query 3 also sees key 4 (a = 64): [4, 1, 1] / 71 on the
    # prefix, so key 0 = 0.06645 < keys 1, 2 = 0.16015 and a maskless version keeps key 1 or 2.
    q5 = _qk([[0, 0, 0, 1, -1]])
    k5 = _qk([[ln(4), ln(1), ln(1), ln(1), ln(64)]])
    cases.append(Case("hand 5: the causal mask inside the window", (q5, k5, [1], 2, 1), [[0, 3, 4]],
                      "window query i (position n - w + i) sees keys 0 .. n - w + i only, not the later window keys"))
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    i = 0
    while len(cases) < 5 + n_random:
        kv_heads, group = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        n, window = int(rng.integers(10, 40)), int(rng.integers(2, 9))
        dim, kernel = int(rng.choice([4, 8])), int(rng.choice([1, 3, 5]))
        query = torch.randn(1, kv_heads * group, n, dim, generator=generator) * 1.5
        key = torch.randn(1, kv_heads, n, dim, generator=generator) * 1.5
        caps = [int(c) for c in rng.integers(0, n - window + 3, kv_heads)]
        if not _selection_margin_ok(query, key, caps, window, kernel):
            continue
        i += 1
        args = (query, key, caps, window, kernel)
        cases.append(Case(f"random {i} (seed {seed})", args, reference_snapkv_selection(*args),
                          f"random post-RoPE queries/keys: n = {n}, w = {window}, {kv_heads} KV heads x {group} query "
                          f"heads, d = {dim}, kernel {kernel}"))
    return cases


def check_snapkv_selection(
    fn: Callable[..., Any], *, n_random: int = 25, seed: int = 0, raise_on_failure: bool = True, verbose: bool = True
) -> CheckReport:
    """Check ``fn(query, key, caps, window, kernel_size) -> kept positions`` (docs/method.md §5).

    ``query`` (1, H, n, d), ``key`` (1, H_kv, n, d) float32 torch tensors; ``caps`` H_kv ints.
    A = softmax_fp32(Q[-w:] K^T / sqrt(d)) causal inside the window, mean over the w window
    queries, key columns 0 .. n-w-1, mean over each KV group's query heads, avg_pool1d(kernel,
    padding kernel // 2, stride 1); each KV head keeps its top-cap positions and the last w; a
    head with cap >= n - w keeps all n. ``fn`` returns H_kv sorted position lists.
    """
    _check_function(fn, "check_snapkv_selection")
    n_random, seed = _check_options(n_random, seed)
    return _run("snapkv_selection (docs/method.md §5)", fn, SNAPKV_ARGS, _snapkv_cases(n_random, seed), _compare_selection,
                raise_on_failure=raise_on_failure, verbose=verbose)


# ------------------------------------------------------------------------------------------ ANLS


ANLS_ARGS = ("prediction", "answers")


def reference_anls(prediction: str, answers: Sequence[str]) -> float:
    """The library's ANLS of one question (docs/method.md §6, threshold 0.5), the exercise's signature."""
    return anls(prediction, list(answers))


def _compare_float(expected: float, got: Any, case: Case) -> str:
    if isinstance(got, bool) or not isinstance(got, (int, float, np.integer, np.floating)):
        return f"expected a float, got {type(got).__name__}"
    if math.isclose(float(got), expected, rel_tol=0, abs_tol=1e-9):
        return ""
    return f"expected {expected:.6f}, got {float(got):.6f}"


def _anls_cases(n_random: int, seed: int) -> list[Case]:
    cases = [
        # normalised both to "paris": distance 0 -> q = 1.
        Case("hand 1: case does not matter", ("Paris", ["paris"]), 1.0, "both strings are lower-cased"),
        # " ".join(s.strip().lower().split()) gives "new york" on both sides -> 1.
        Case("hand 2: extra whitespace does not matter", ("  new   york ", ["New York"]), 1.0,
             "normalise with ' '.join(s.strip().lower().split())"),
        # "abcd" vs "abce": 1 substitution, max length 4 -> NL = 0.25 -> q = 0.75.
        Case("hand 3: one edit in four characters", ("abcd", ["abce"]), 0.75, "NL = Levenshtein / max length; q = 1 - NL"),
        # "ab" vs "abcd": 2 insertions / 4 = 0.5 -> q = 0.5, kept (only q < 0.5 is set to 0).
        Case("hand 4: exactly at the threshold", ("ab", ["abcd"]), 0.5, "q = 0.5 is kept: only q < 0.5 becomes 0"),
        # "a" vs "abcd": 3 / 4 -> q = 0.25 < 0.5 -> 0.
        Case("hand 5: below the threshold", ("a", ["abcd"]), 0.0, "q < 0.5 is set to 0"),
        # "cat" vs "dog": 3 / 3 -> q = 0; vs "cart": 1 insertion / 4 -> q = 0.75; the best answer counts.
        Case("hand 6: several answers", ("cat", ["dog", "cart"]), 0.75, "q = 1 - min over the answers of NL"),
        # distance between normalised "abc" and "abd" is 1, but the length is that of the RAW strings:
        # max(len("  abc  "), len("abd")) = 7 -> NL = 1/7 -> q = 6/7.
        Case("hand 7: lengths of the raw strings", ("abd", ["  abc  "]), 6 / 7,
             "docs/method.md §6: NL = Levenshtein(normalised) / max(len(raw gt), len(raw pred))"),
        # both empty: length 0 -> NL = 0 -> q = 1.
        Case("hand 8: both empty", ("", [""]), 1.0, "NL is 0 when both strings are empty"),
        # "" vs "abc": 3 / 3 -> q = 0.
        Case("hand 9: empty prediction", ("", ["abc"]), 0.0, "an empty answer is as far as it gets"),
    ]
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcAB  "))

    def word() -> str:
        return "".join(rng.choice(alphabet, int(rng.integers(0, 9))))

    for i in range(n_random):
        answers = [word() for _ in range(int(rng.integers(1, 4)))]
        base = answers[0]
        prediction = word() if rng.random() < 0.3 else "".join(
            c.swapcase() if rng.random() < 0.3 else c for c in base if rng.random() > 0.2
        )
        args = (prediction, answers)
        cases.append(Case(f"random {i + 1} (seed {seed})", args, reference_anls(*args),
                          "random short strings with case changes, spaces and edits"))
    return cases


def check_anls(
    fn: Callable[..., Any], *, n_random: int = 40, seed: int = 0, raise_on_failure: bool = True, verbose: bool = True
) -> CheckReport:
    """Check ``fn(prediction, answers) -> q`` against ANLS as lmms-eval computes it (docs/method.md §6).

    Normalise with ``" ".join(s.strip().lower().split())``; NL = Levenshtein(normalised gt,
    normalised prediction) / max(len(raw gt), len(raw prediction)) (0 when both are empty);
    q = 1 - min over the answers of NL; q = 0 when q < 0.5.
    """
    _check_function(fn, "check_anls")
    n_random, seed = _check_options(n_random, seed)
    return _run("anls (docs/method.md §6)", fn, ANLS_ARGS, _anls_cases(n_random, seed), _compare_float,
                raise_on_failure=raise_on_failure, verbose=verbose)


#: exercise key -> its checker / its reference (the student's signature over the library).
CHECKERS: Mapping[str, Callable[..., CheckReport]] = {
    "map_box": check_map_box,
    "hit_rule": check_hit_rule,
    "allocation": check_allocation,
    "snapkv_selection": check_snapkv_selection,
    "anls": check_anls,
}
REFERENCES: Mapping[str, Callable[..., Any]] = {
    "map_box": reference_map_box,
    "hit_rule": reference_hit_rule,
    "allocation": reference_allocation,
    "snapkv_selection": reference_snapkv_selection,
    "anls": reference_anls,
}
