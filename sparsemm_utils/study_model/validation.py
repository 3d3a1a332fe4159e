"""Judging a study-model recipe on validation pages only (never on step 05's benchmark).

A recipe is worth shipping when its visual heads are concentrated, it reads well with the full
cache, and SparseMM's head budgets beat random budgets at low budgets. :func:`validate_recipe`
measures the three on pages of :data:`sparsemm_utils.reader_tasks.VALIDATION_SEED` (the stream
training monitors, disjoint from the training stream and from the benchmark's held-out stream),
with the library's own step-03 rule and compression methods:

- head scores: the hit rule (docs/method.md §4: substring match, argmax) on the OCR answers of the
  first ``score_docs`` validation pages; the share of the top 5% and top 10% of heads;
- accuracy: greedy answers of the three reading tasks on ``question_docs`` other validation pages,
  FullKV and every method of ``methods`` at every budget of ``budgets`` (one shared prefill per
  question, :func:`sparsemm_utils.shared_prefill.shared_generate`), scored by ANLS and exact match;
- SparseMM minus random allocation at each budget, with a paired bootstrap 95% interval over the
  questions.

The result is one row of the model card's table of recipes (:mod:`.card`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsemm_utils.compression import make_press
from sparsemm_utils.head_scoring_capture import capture_documents, score_captures
from sparsemm_utils.head_scoring_rule import top_heads, top_share
from sparsemm_utils.metrics import anls
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.prompts import OCR_PROMPT, build_inputs
from sparsemm_utils.reader_tasks import STUDY_PAGES, TASK_TYPES, VALIDATION_SEED, questions_for_document
from sparsemm_utils.shared_prefill import shared_generate
from sparsemm_utils.statistics import paired_bootstrap_interval

__all__ = ["ValidationCapture", "validate_recipe", "QUESTION_OFFSET"]

#: Validation pages for questions start here, after the pages used for head scores.
QUESTION_OFFSET = 1000


@dataclass(frozen=True)
class ValidationCapture:
    """The step-03 capture settings used on validation pages (the fields
    :class:`sparsemm_utils.head_scoring_capture.CaptureSettings` names)."""

    prompt: str | None = OCR_PROMPT
    max_new_tokens: int = 96
    top_k: int = 1
    token_text: str = "decode"
    capture: str = "streamed"
    n_samples: int | None = None
    explorer_samples: int = 0
    explorer_tokens: int = 1
    match: str = "substring"
    selection: str = "argmax"
    selection_dtype: str = "float32"


def validate_recipe(
    loaded: Any,
    *,
    score_docs: int = 24,
    question_docs: int = 24,
    budgets: Sequence[int] = (12, 16, 24),
    window: int = 8,
    methods: Sequence[str] = ("sparsemm", "random", "snapkv"),
    max_new_tokens: int = 96,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure a recipe on validation pages (module docstring). Returns a JSON-able dict."""
    t0 = time.perf_counter()
    docs = [STUDY_PAGES.render(VALIDATION_SEED, i) | {"doc_id": i} for i in range(score_docs)]
    regions = map_documents(docs, loaded, loaded.model_type)
    captures = capture_documents(loaded, docs, regions, ValidationCapture(n_samples=score_docs, max_new_tokens=max_new_tokens), progress=False)
    scored = score_captures(captures, "substring", "argmax")
    scores = scored.sample_scores.mean(axis=0)
    matched = sum(m.matched for sample in scored.matches for m in sample)
    total = sum(len(sample) for sample in scored.matches)
    heads = {
        "top5_share": float(top_share(scores, 0.05)),
        "top10_share": float(top_share(scores, 0.10)),
        "top_heads": [[int(l), int(h), round(float(s), 4)] for l, h, s in top_heads(scores, 8)],
        "tokens_matched": int(matched),
        "tokens_generated": int(total),
        "score_docs": score_docs,
    }
    log(f"validation heads: top 5% {heads['top5_share']:.3f}, top 10% {heads['top10_share']:.3f} ({matched} of {total} tokens matched)")
    cells = [("fullkv", None)] + [(m, b) for b in budgets for m in methods]
    presses = [make_press("fullkv")] + [
        make_press(m, budget=b, window=window, **({"head_scores": scores} if m == "sparsemm" else {})) for m, b in cells[1:]
    ]
    rows = []
    for i in range(question_docs):
        doc = STUDY_PAGES.render(VALIDATION_SEED, QUESTION_OFFSET + i) | {"doc_id": QUESTION_OFFSET + i}
        for q in questions_for_document(doc, TASK_TYPES, seed=VALIDATION_SEED):
            inputs = build_inputs(loaded, doc["image"], q.prompt)
            n = int(inputs["input_ids"].shape[1])
            for (method, budget), out in zip(cells, shared_generate(loaded, presses, inputs, max_new_tokens=max_new_tokens)):
                text = loaded.tokenizer.decode(out.sequences[0, n:], skip_special_tokens=True).strip()
                rows.append({"task": q.task, "method": method, "budget": budget, "anls": anls(text, [q.answer]),
                             "exact": float(text == q.answer), "prompt_tokens": n})  # fmt: skip
    by_cell: dict[tuple[str, int | None], list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["method"], r["budget"]), []).append(r)
    full = by_cell[("fullkv", None)]
    accuracy = {
        "n_questions": len(full),
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in full])),
        "fullkv_anls": float(np.mean([r["anls"] for r in full])),
        "fullkv_exact": float(np.mean([r["exact"] for r in full])),
        "fullkv_by_task": {t: float(np.mean([r["anls"] for r in full if r["task"] == t])) for t in TASK_TYPES},
        "cells": {f"{m}@{b}": float(np.mean([r["anls"] for r in v])) for (m, b), v in by_cell.items() if b is not None},
    }
    comparisons = {}
    for b in budgets:
        if ("sparsemm", b) in by_cell and ("random", b) in by_cell:
            a = np.array([r["anls"] for r in by_cell[("sparsemm", b)]])
            c = np.array([r["anls"] for r in by_cell[("random", b)]])
            low, high = paired_bootstrap_interval(a, c, seed=0)
            comparisons[str(b)] = {"sparsemm_minus_random": float((a - c).mean()), "ci95": [low, high]}
    log(f"validation FullKV ANLS {accuracy['fullkv_anls']:.3f} over {accuracy['n_questions']} questions; "
        + "; ".join(f"B={b}: SparseMM - random {v['sparsemm_minus_random']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for b, v in comparisons.items()))  # fmt: skip
    return {"heads": heads, "accuracy": accuracy, "sparsemm_vs_random": comparisons, "window": window,
            "budgets": list(budgets), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
