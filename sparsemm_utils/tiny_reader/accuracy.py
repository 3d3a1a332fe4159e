"""How well a reader reads: greedy answers on held-out pages (:func:`evaluate_reader`) and their
summaries (:func:`summarize_records`, :func:`error_breakdown`, :func:`value_accuracy_by_keys`,
:func:`value_error_sources`).

No training code is imported here: step 05's offline benchmark, FastV and the vision-drop
ablation of step 07 score a reader with these functions. Held-out pages come from
:func:`sparsemm_utils.reader_tasks.heldout_documents`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsemm_utils.metrics import levenshtein
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.reader_tasks import (
    HELDOUT_SEED,
    TASK_TYPES,
    VALUE_PROMPT,
    NoQuestionError,
    ReaderDocSpec,
    questions_for_document,
    value_keys,
    value_question,
)
from sparsemm_utils.tiny_reader.config import TinyReaderError

__all__ = [
    "read",
    "summarize_records",
    "error_breakdown",
    "value_accuracy_by_keys",
    "value_error_sources",
    "evaluate_reader",
]


@torch.no_grad()
def read(loaded: Any, image: Any, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy answer of a loaded reader (:class:`~sparsemm_utils.models.LoadedModel`) to
    ``prompt`` about ``image``, with the full KV cache, batch 1, through the standard path
    (:func:`~sparsemm_utils.prompts.build_inputs` then ``generate``); special tokens dropped."""
    inputs = build_inputs(loaded, image, prompt)
    generated = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    return loaded.processor.tokenizer.decode(new, skip_special_tokens=True)


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task (and ``"all"``): ``n``, ``exact_match`` (share of predictions equal to the
    answer), ``char_accuracy`` (``max(0, 1 - sum(edit distance) / sum(len(answer)))``) and
    ``mean_char_accuracy`` (mean over questions of ``max(0, 1 - edit / len(answer))``).
    Each record needs ``task``, ``answer``, ``prediction``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["task"], []).append(r)
    groups = {t: groups[t] for t in [*TASK_TYPES, *sorted(set(groups) - set(TASK_TYPES))] if t in groups}
    if records:
        groups["all"] = list(records)
    out = {}
    for task, rows in groups.items():
        edits = [levenshtein(r["prediction"], r["answer"]) for r in rows]
        lengths = [max(len(r["answer"]), 1) for r in rows]
        out[task] = {
            "n": len(rows),
            "exact_match": sum(r["prediction"] == r["answer"] for r in rows) / len(rows),
            "char_accuracy": max(0.0, 1 - sum(edits) / sum(lengths)),
            "mean_char_accuracy": float(np.mean([max(0.0, 1 - e / n) for e, n in zip(edits, lengths)])),
        }
    return out


def error_breakdown(records: Sequence[Mapping[str, Any]], task: str) -> dict[str, Any]:
    """How the answers of ``task`` go wrong: ``n`` questions, ``wrong`` answers, of which
    ``wrong_length`` have another length than the answer (read past the word's end, or stopped
    early) and ``same_length`` the right length with wrong characters; ``by_answer_length``
    {answer length: (questions, exact match)}. Each record needs ``task``, ``answer``, ``prediction``."""
    rows = [r for r in records if r["task"] == task]
    wrong = [r for r in rows if r["prediction"] != r["answer"]]
    lengths = sorted({len(r["answer"]) for r in rows})
    by_length = {}
    for n in lengths:
        group = [r for r in rows if len(r["answer"]) == n]
        by_length[n] = (len(group), sum(r["prediction"] == r["answer"] for r in group) / len(group))
    same = sum(len(r["prediction"]) == len(r["answer"]) for r in wrong)
    return {"n": len(rows), "wrong": len(wrong), "wrong_length": len(wrong) - same, "same_length": same, "by_answer_length": by_length}


def value_accuracy_by_keys(records: Sequence[Mapping[str, Any]], docs: Mapping[int, Mapping[str, Any]]) -> dict[int, tuple[int, int]]:
    """Exact match of ``value`` answers by how many keys their page holds
    (:func:`~sparsemm_utils.reader_tasks.value_keys`): ``{keys: (questions, right answers)}``.
    On a one-key page the answer is the second word of the only key-value line, whatever the key;
    only pages with two keys or more show whether the reader matches the key it is asked about.
    ``docs``: {doc_id: step-01 row with ``2_coord``}."""
    out: dict[int, list[int]] = {}
    for r in records:
        if r["task"] != "value":
            continue
        n = len(value_keys(docs[r["doc_id"]]))
        cell = out.setdefault(n, [0, 0])
        cell[0] += 1
        cell[1] += int(r["prediction"] == r["answer"])
    return {n: (q, right) for n, (q, right) in sorted(out.items())}


def value_error_sources(
    records: Sequence[Mapping[str, Any]],
    docs: Mapping[int, Mapping[str, Any]],
    *,
    charset: str | None = None,
    cell_size: int = 28,
) -> dict[str, Any]:
    """Where the wrong characters of wrong ``value`` answers come from, on grid pages.

    For each wrong ``value`` record (``doc_id``, ``prompt`` "Value of KEY?", ``answer``,
    ``prediction``), character ``i`` of the prediction should have been read from the cell ``i``
    columns right of the value's first cell (the first cell of the value's words, as
    :func:`~sparsemm_utils.reader_tasks.value_question` finds them). A character
    that differs from that cell (empty cells included) is a *wrong character*; it is *from another
    line* when the same glyph is drawn on another line of the page, and its *column distance* is
    the smallest ``|column - expected column|`` over those cells. ``chance`` is the share a glyph
    drawn uniformly from ``charset`` (other than the expected one) would be from another line.

    ``docs``: {doc_id: step-01 row with ``2_coord`` and ``char_coord``}. Returns ``wrong_answers``,
    ``wrong_characters``, ``from_other_line``, ``same_column``, ``within_one_column``,
    ``chance``. Worked example in the tests: lines "AB C" (row 0) and "DE FG" (row 1) from column 0,
    "Value of AB?" answered "CG": 'C' is right, 'G' (expected: the empty cell at column 4) is
    drawn at column 4 of the other line, so 1 wrong character, from another line, same column."""
    charset = charset or ReaderDocSpec().charset
    prefix, suffix = VALUE_PROMPT.split("{key}")
    out = {"wrong_answers": 0, "wrong_characters": 0, "from_other_line": 0, "same_column": 0, "within_one_column": 0}
    chance_sum = 0.0
    for r in records:
        if r["task"] != "value" or r["prediction"] == r["answer"]:
            continue
        doc = docs[r["doc_id"]]
        key = r["prompt"][len(prefix) : len(r["prompt"]) - len(suffix)]
        try:  # the value's words, as the question was built (reader_tasks.value_question)
            x0, y0, _, y1 = value_question(doc, key).evidence[0]
        except NoQuestionError as err:
            raise TinyReaderError(f"doc {r['doc_id']}: no line starts with the word {key!r}; pass the pages the records were read from") from err
        row, c0 = int((y0 + y1) / 2 // cell_size), int(x0 // cell_size)
        cells: dict[tuple[int, int], str] = {}
        for e in doc.get("char_coord") or []:
            (cx0, cy0), (cx1, cy1) = e["coord"]
            cells[(int((cy0 + cy1) / 2 // cell_size), int((cx0 + cx1) / 2 // cell_size))] = e["char"]
        out["wrong_answers"] += 1
        for i, ch in enumerate(r["prediction"]):
            expected = cells.get((row, c0 + i))
            if ch == expected:
                continue
            out["wrong_characters"] += 1
            others = [c for (rr, c), v in cells.items() if rr != row and v == ch]
            other_glyphs = {v for (rr, _), v in cells.items() if rr != row and v != expected}
            chance_sum += len(other_glyphs & set(charset)) / max(len(set(charset) - {expected}), 1)
            if others:
                out["from_other_line"] += 1
                distance = min(abs(c - (c0 + i)) for c in others)
                out["same_column"] += distance == 0
                out["within_one_column"] += distance <= 1
    out["chance"] = chance_sum / out["wrong_characters"] if out["wrong_characters"] else 0.0
    return out


def evaluate_reader(
    loaded: Any,
    documents: Any,
    tasks: Sequence[str] = TASK_TYPES,
    *,
    seed: int = HELDOUT_SEED,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy full-cache accuracy of a loaded reader on step-01 ``documents`` (a ``Dataset`` or a
    sequence of rows with PIL images), one question per task of ``tasks`` each document can host
    (:func:`~sparsemm_utils.reader_tasks.questions_for_document` with ``seed``).

    Returns ``{"summary": {task: {n, exact_match, char_accuracy, mean_char_accuracy}, "all":
    ...}, "records": [{doc_id, task, prompt, answer, prediction, exact, edit_distance}, ...],
    "seconds": wall time}``."""
    t0 = time.perf_counter()
    records = []
    n = len(documents)
    for i in tqdm(range(n), desc="reading held-out documents", disable=not progress):
        doc = documents[i]
        for q in questions_for_document(doc, tasks, seed=seed):
            pred = read(loaded, doc["image"], q.prompt, max_new_tokens=max_new_tokens)
            records.append(
                {
                    "doc_id": int(doc["doc_id"]),
                    "task": q.task,
                    "prompt": q.prompt,
                    "answer": q.answer,
                    "prediction": pred,
                    "exact": pred == q.answer,
                    "edit_distance": levenshtein(pred, q.answer),
                }
            )
    return {"summary": summarize_records(records), "records": records, "seconds": time.perf_counter() - t0}
