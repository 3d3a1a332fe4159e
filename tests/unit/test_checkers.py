"""Meta-test of the exercise checkers (sparsemm_utils/checkers.py).

A checker that cannot fail is a defect (docs/design.md, course material). For every exercise:
- the library's reference passes;
- an independent from-scratch solution (written here the way a student would, numpy and plain
  Python, no library call) passes: the checker is not stricter than the rule;
- several deliberately wrong versions (off-by-one, wrong rounding, per-layer instead of global
  normalisation, a missing GQA average, case-sensitive ANLS, ...) fail, and the message names
  the failing case, its inputs, the expected and the returned value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils import checkers as ck

# ------------------------------------------------------------------ from-scratch student solutions


def solution_map_box(box, width, height, geometry, *, inclusive=True, scale=True, rounding="floor", clip=True, row_major=True):
    """docs/method.md §3 (Qwen2-VL) written as a student would; the flags break it on purpose."""
    x0, y0, x1, y1 = box
    x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
    y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
    resized_h, resized_w = geometry.resized_size(height, width)
    sx, sy = (resized_w / width, resized_h / height) if scale else (1.0, 1.0)
    grid_h, grid_w = resized_h // 28, resized_w // 28
    to_index = math.floor if rounding == "floor" else round

    def indices(lo, hi, n):
        first, last = to_index(lo / 28), to_index(hi / 28)
        if clip:
            first, last = min(first, n - 1), min(last, n - 1)
        return range(first, last + 1 if inclusive else last)

    rows, cols = indices(y0 * sy, y1 * sy, grid_h), indices(x0 * sx, x1 * sx, grid_w)
    if row_major:
        return sorted(r * grid_w + c for r in rows for c in cols)
    return sorted(c * grid_h + r for r in rows for c in cols)


def solution_hit_rule(token_texts, chunk_texts, chunk_regions, attention_rows, *, unique=True, weight="inverse",
                      case_sensitive=True, argmax_over="all"):
    """docs/method.md §4 for one sample; the flags break it on purpose."""
    layers, heads = attention_rows[0].shape[:2]
    scores = np.zeros((layers, heads))
    image = sorted({p for region in chunk_regions for p in region})
    for text, row in zip(token_texts, attention_rows):
        if case_sensitive:
            found = [i for i, chunk in enumerate(chunk_texts) if text in chunk]
        else:
            found = [i for i, chunk in enumerate(chunk_texts) if text.lower() in chunk.lower()]
        if not found or (unique and len(found) != 1):
            continue
        region = set(chunk_regions[found[0]])
        for l in range(layers):
            for h in range(heads):
                if argmax_over == "all":
                    j = int(np.argmax(row[l, h]))
                else:  # the largest IMAGE key only (wrong: text keys must compete too)
                    j = image[int(np.argmax(row[l, h][image]))]
                if j in region:
                    scores[l, h] += 1.0 / len(region) if weight == "inverse" else 1.0
    return scores


def solution_allocation(head_scores, kv_heads, budget, window=32, ratio=0.1, *, normalise="global", group="sum",
                        rounding="half_even", count_window=True, floor_m=True):
    """docs/method.md §5, steps 1-4; the flags break it on purpose."""
    scores = np.asarray(head_scores, dtype=float)
    layers, heads = scores.shape
    b = budget - window if count_window else budget
    m = math.floor(ratio * b) if floor_m else round(ratio * b)
    if normalise == "global":
        norm = scores / scores.sum()
    else:  # per layer (wrong)
        norm = scores / scores.sum(axis=1, keepdims=True)
    grouped = norm.reshape(layers, kv_heads, heads // kv_heads)
    sigma = {"sum": grouped.sum(-1), "mean": grouped.mean(-1), "first": grouped[..., 0]}[group]
    raw = sigma * (b - m) * layers * kv_heads + m
    caps = np.round(raw) if rounding == "half_even" else np.floor(raw + 0.5)
    return caps.astype(int)


def solution_snapkv(query, key, caps, window, kernel_size=5, *, causal=True, pool=True, group="mean",
                    append_window=True, prefix_softmax=False):
    """docs/method.md §5's token selection in float64 numpy; the flags break it on purpose."""
    q = query[0].double().numpy()
    k = key[0].double().numpy()
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    size = heads // kv_heads
    w = window
    per_head = []
    for h in range(heads):
        logits = q[h, n - w:] @ k[h // size].T / math.sqrt(dim)  # (w, n)
        if causal:
            for i in range(w):
                logits[i, n - w + i + 1:] = -np.inf
        if prefix_softmax:
            logits = logits[:, : n - w]
        logits = logits - logits.max(axis=-1, keepdims=True)
        attn = np.exp(logits)
        attn /= attn.sum(axis=-1, keepdims=True)
        per_head.append(attn.mean(axis=0)[: n - w])
    grouped = np.array(per_head).reshape(kv_heads, size, n - w)
    scores = {"mean": grouped.mean(1), "first": grouped[:, 0], "max": grouped.max(1)}[group]
    if pool:
        kernel = np.ones(kernel_size) / kernel_size
        # zero padding of kernel_size // 2 on both sides, as avg_pool1d(padding=k // 2) counts it
        # (np.convolve(mode="same") would return max(len, k) values for a row shorter than k)
        pad = kernel_size // 2
        scores = np.array([np.convolve(np.pad(row, pad), kernel, mode="valid") for row in scores])
    kept = []
    for g, cap in enumerate(caps):
        if cap >= n - w:
            kept.append(list(range(n)))
            continue
        top = sorted(int(j) for j in np.argsort(-scores[g], kind="stable")[:cap])
        kept.append(top + (list(range(n - w, n)) if append_window else []))
    return kept


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def solution_anls(prediction, answers, *, lower=True, lengths="raw", keep_half=True, aggregate="best"):
    """docs/method.md §6; the flags break it on purpose."""

    def norm(s):
        s = " ".join(s.strip().split())
        return s.lower() if lower else s

    qs = []
    for gt in answers:
        a, b = norm(gt), norm(prediction)
        length = max(len(gt), len(prediction)) if lengths == "raw" else max(len(a), len(b))
        nl = 0.0 if length == 0 else _levenshtein(a, b) / length
        qs.append(1 - nl)
    if aggregate == "best":
        q = max(qs)
    else:  # mean over the answers (wrong)
        q = sum(qs) / len(qs)
    if q < 0.5 or (not keep_half and q <= 0.5):
        return 0.0
    return q


def _variant(fn, **flags):
    def wrapped(*args):
        return fn(*args, **flags)

    wrapped.__name__ = f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in flags.items())})"
    return wrapped


SOLUTIONS = {
    "map_box": solution_map_box,
    "hit_rule": solution_hit_rule,
    "allocation": solution_allocation,
    "snapkv_selection": solution_snapkv,
    "anls": solution_anls,
}

# (exercise, wrong flags, a hand case that must catch it: the wrong version fails there)
WRONG = [
    ("map_box", {"inclusive": False}, "hand 1"),
    ("map_box", {"scale": False}, "hand 6"),
    ("map_box", {"rounding": "round"}, "hand 3"),
    ("map_box", {"clip": False}, "hand 3"),
    ("map_box", {"row_major": False}, "hand 1"),
    ("hit_rule", {"unique": False}, "hand 1"),
    ("hit_rule", {"weight": "one"}, "hand 1"),
    ("hit_rule", {"case_sensitive": False}, "hand 1"),
    ("hit_rule", {"argmax_over": "image"}, "hand 1"),
    ("allocation", {"normalise": "per_layer"}, "hand 2"),
    ("allocation", {"group": "mean"}, "hand 2"),
    ("allocation", {"group": "first"}, "hand 2"),
    ("allocation", {"rounding": "half_up"}, "hand 1"),
    ("allocation", {"count_window": False}, "hand 1"),
    ("allocation", {"floor_m": False}, "hand 3"),
    ("snapkv_selection", {"pool": False}, "hand 1"),
    ("snapkv_selection", {"group": "first"}, "hand 3"),
    ("snapkv_selection", {"append_window": False}, "hand 1"),
    ("snapkv_selection", {"causal": False}, "hand 5"),
    ("snapkv_selection", {"prefix_softmax": True}, "random"),
    ("anls", {"lower": False}, "hand 1"),
    ("anls", {"lengths": "normalized"}, "hand 7"),
    ("anls", {"keep_half": False}, "hand 4"),
    ("anls", {"aggregate": "mean"}, "hand 6"),
]


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("exercise", sorted(ck.CHECKERS))
def test_reference_passes(exercise):
    report = ck.CHECKERS[exercise](ck.REFERENCES[exercise], verbose=False)
    assert report.passed
    assert sum(r.case.name.startswith("hand") for r in report.results) >= 1
    assert sum(r.case.name.startswith("random") for r in report.results) >= 20


@pytest.mark.parametrize("exercise", sorted(ck.CHECKERS))
def test_a_from_scratch_solution_passes(exercise):
    report = ck.CHECKERS[exercise](SOLUTIONS[exercise], verbose=False)
    assert report.passed, str(report)


@pytest.mark.parametrize(("exercise", "flags", "caught_by"), WRONG, ids=[f"{e}-{next(iter(f))}" for e, f, _ in WRONG])
def test_a_wrong_version_fails_with_a_useful_message(exercise, flags, caught_by):
    wrong = _variant(SOLUTIONS[exercise], **flags)
    with pytest.raises(ck.CheckFailed) as info:
        ck.CHECKERS[exercise](wrong, verbose=False)
    report = info.value.report
    failing = [r.case.name for r in report.failures]
    assert any(name.startswith(caught_by) for name in failing), failing
    message = str(info.value)
    first = report.failures[0]
    assert f"First failing case: {first.case.name}" in message
    for label in ("inputs:", "expected:", "got:", "problem:", "what it checks:"):
        assert label in message, label
    for name in report.arg_names:
        assert f"{name} = " in message
    assert first.problem and first.problem in message
    assert isinstance(info.value, AssertionError)


@pytest.mark.parametrize("exercise", sorted(ck.CHECKERS))
def test_every_exercise_has_at_least_two_wrong_versions(exercise):
    assert sum(e == exercise for e, _, _ in WRONG) >= 2


def test_hand_case_message_for_map_box_off_by_one():
    """The report of a concrete failure, worked out by hand: the exclusive end drops column 2 and
    row 1 of hand case 1, so of [1, 2, 11, 12] only [1] is returned."""
    report = ck.check_map_box(_variant(solution_map_box, inclusive=False), raise_on_failure=False, verbose=False)
    first = report.failures[0]
    assert first.case.name.startswith("hand 1")
    assert first.got == [1]
    assert first.problem == "missing [2, 11, 12]"


@pytest.mark.parametrize("exercise", sorted(ck.CHECKERS))
def test_the_unfilled_stub_is_reported_as_not_implemented(exercise):
    def stub(*args):
        raise NotImplementedError("write me")

    with pytest.raises(ck.CheckFailed, match="stub is not filled in yet"):
        ck.CHECKERS[exercise](stub, n_random=2, verbose=False)


def test_an_exception_in_the_student_code_names_the_line():
    def crashes(prediction, answers):
        return 1 / 0

    report = ck.check_anls(crashes, n_random=0, raise_on_failure=False, verbose=False)
    assert not report.passed
    problem = report.failures[0].problem
    assert "ZeroDivisionError" in problem and "return 1 / 0" in problem


def test_a_return_value_of_the_wrong_kind_is_a_failure_not_a_crash():
    report = ck.check_allocation(lambda *args: None, n_random=1, raise_on_failure=False, verbose=False)
    assert len(report.failures) == len(report.results) == 4
    assert "wrong shape" in report.failures[0].problem
    report = ck.check_map_box(lambda *args: "0, 1", n_random=0, raise_on_failure=False, verbose=False)
    assert not report.passed and "cannot be compared" in report.failures[0].problem


def test_duplicates_and_order_are_named():
    report = ck.check_map_box(lambda *a: solution_map_box(*a)[::-1], n_random=0, raise_on_failure=False, verbose=False)
    assert "not sorted" in report.failures[0].problem
    report = ck.check_map_box(lambda *a: sorted(solution_map_box(*a) * 2), n_random=0, raise_on_failure=False, verbose=False)
    assert "more than once" in report.failures[0].problem


def test_a_mutating_function_cannot_change_the_cases():
    def mutating(head_scores, kv_heads, budget, window, ratio):
        caps = solution_allocation(head_scores, kv_heads, budget, window, ratio)
        head_scores *= 0  # the student's own copy
        return caps

    assert ck.check_allocation(mutating, verbose=False).passed


def test_verbose_prints_the_summary(capsys):
    ck.check_anls(ck.reference_anls, n_random=3)
    assert "anls (docs/method.md §6): all 12 cases passed (reference_anls)" in capsys.readouterr().out


def test_bad_use_of_a_checker_is_a_clear_error():
    with pytest.raises(ck.CheckerError, match="expects your function itself"):
        ck.check_anls("anls")
    with pytest.raises(ck.CheckerError, match="n_random must be an int >= 0"):
        ck.check_anls(ck.reference_anls, n_random=-1)
    with pytest.raises(ck.CheckerError, match="seed must be an int >= 0"):
        ck.check_anls(ck.reference_anls, seed=1.5)


def test_the_registries_agree():
    assert set(ck.CHECKERS) == set(ck.REFERENCES) == set(SOLUTIONS)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), exercise=st.sampled_from(sorted(ck.CHECKERS)))
def test_any_seed_accepts_the_reference_and_a_correct_solution(seed, exercise):
    """The randomized cases are drawn away from ties and rounding boundaries, so a correct float64
    solution passes on every seed, not just seed 0."""
    check = ck.CHECKERS[exercise]
    assert check(ck.REFERENCES[exercise], n_random=8, seed=seed, verbose=False).passed
    assert check(SOLUTIONS[exercise], n_random=8, seed=seed, verbose=False).passed


def _fingerprint(value) -> str:
    """An exact text form of a case's inputs (arrays and tensors by their bytes)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return f"array{value.shape}{value.dtype}:{value.tobytes().hex()}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fingerprint(v) for v in value) + "]"
    return repr(value)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_random=st.integers(0, 6), exercise=st.sampled_from(sorted(ck.CHECKERS)))
def test_cases_are_deterministic_in_the_seed(seed, n_random, exercise):
    def record(*args):
        calls.append(_fingerprint(args))
        return ck.REFERENCES[exercise](*args)

    calls: list[str] = []
    ck.CHECKERS[exercise](record, n_random=n_random, seed=seed, verbose=False)
    first = list(calls)
    calls.clear()
    ck.CHECKERS[exercise](record, n_random=n_random, seed=seed, verbose=False)
    assert calls == first
