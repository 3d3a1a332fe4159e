"""Step 03's recording: generate greedily for each document and record every head's attention.

Capture (:mod:`sparsemm_utils.attention_capture`) is separate from matching: one generation pass
per sample records the argmax and top-k key positions of every query head (and, for the first
samples, their attention over the image), and every (match, selection) combination of the hit
rule (:mod:`sparsemm_utils.head_scoring_rule`, docs/method.md §4) is then scored from the same
pass (:func:`score_captures`, :func:`compare_variants`). :func:`compare_with_reference` checks the
streamed capture against eager attention on one document.

The functions read their settings from step 03's config
(:class:`sparsemm_utils.steps.head_scoring.Config`); :class:`CaptureSettings` names the
fields they use, so this module does not depend on the step.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .attention_capture import CapturedAttention, CaptureSpec, generate_batch_with_rows, stop_token_ids
from .head_scoring_rule import (
    MATCH_RULES,
    MATCHED,
    SELECTIONS,
    SKIP_REASONS,
    GeneratedTokens,
    HeadScoringConfigError,
    HeadScoringError,
    NoSamplesError,
    TokenMatch,
    generated_tokens,
    make_matcher,
    mean_over_samples,
    score_sample,
    top_heads,
    top_share,
)
from .prompts import batch_inputs, build_inputs, image_token_span
from .sharding import Shard, ShardError, load_item, merge_items, open_shard, save_item
from .validate import check_choice

__all__ = [
    "RegionMismatchError",
    "CaptureSettings",
    "SampleCapture",
    "capture_sample",
    "capture_batch",
    "capture_documents",
    "capture_identity",
    "positions_for",
    "HeadScoringResult",
    "score_captures",
    "compare_variants",
    "compare_with_reference",
    "mean_image_mass",
    "jsonable",
]


class RegionMismatchError(HeadScoringError):
    """Step 02's regions do not belong to this model/prompt/document (rerun step 02)."""


class CaptureSettings(Protocol):
    """The settings this module reads (fields of step 03's ``Config``): the
    ``prompt``, greedy ``max_new_tokens``, the ``top_k`` positions captured, the ``token_text``
    mode, the ``capture`` method, how many documents (``n_samples``, None: all) and which keep
    their image attention (``explorer_samples`` x ``explorer_tokens``), and the ``match`` /
    ``selection`` variant :func:`compare_with_reference` scores, and the ``selection_dtype`` the
    attention rows are computed in (:class:`~sparsemm_utils.attention_capture.CaptureSpec`).

    Optional: ``shards_dir``, the folder whose ``shards/`` :func:`capture_documents` merges
    (step 03's ``Config.shards_dir``; docs/design.md "Sharded runs"), and ``batch_size``, the
    documents :func:`capture_documents` generates for at once (default 1)."""

    prompt: str | None
    max_new_tokens: int
    top_k: int
    token_text: str
    capture: str
    n_samples: int | None
    explorer_samples: int
    explorer_tokens: int
    match: str
    selection: str
    selection_dtype: str


@dataclass
class SampleCapture:
    """One sample's generation and attention capture (independent of the matching rule)."""

    doc_id: Any
    tokens: GeneratedTokens
    captured: CapturedAttention
    record: Mapping[str, Any]
    prompt_len: int
    seconds: float

    @property
    def stopped_at_eos(self) -> bool:
        return bool(self.tokens.stop) and self.tokens.stop[-1]


def _check_record(record: Mapping[str, Any], model_type: str, doc_id: Any, start: int, count: int) -> None:
    if record.get("model_type") != model_type:
        raise RegionMismatchError(
            f"document {doc_id!r}: step 02 (regions.jsonl) mapped its boxes for {record.get('model_type')!r} but the "
            f"model is {model_type!r}; rerun step 02_patch_mapping with the same model_id"
        )
    expected = (int(record["image_token_start"]), int(record["num_image_tokens"]))
    if (start, count) != expected:
        raise RegionMismatchError(
            f"document {doc_id!r}: the prompt's image tokens start at {start} ({count} tokens) but step 02's "
            f"regions.jsonl records {expected[0]} ({expected[1]} tokens): the regions would point at the wrong keys. Rerun step "
            "02_patch_mapping with the same model_id and processor settings (and the OCR prompt)."
        )


def capture_sample(
    loaded: Any,
    document: Mapping[str, Any],
    record: Mapping[str, Any],
    cfg: CaptureSettings,
    *,
    image_steps: int = 0,
    method: str | None = None,
    keep_rows: bool = False,
) -> SampleCapture:
    """Generate for one document and capture its attention rows (``method``: cfg.capture if None)."""
    return capture_batch(loaded, [document], [record], cfg, image_steps=[image_steps], method=method, keep_rows=keep_rows)[0]


def capture_batch(
    loaded: Any,
    documents: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    cfg: CaptureSettings,
    *,
    image_steps: Sequence[int],
    method: str | None = None,
    keep_rows: bool = False,
) -> list[SampleCapture]:
    """Generate for B documents at once (one left-padded batch, :func:`~sparsemm_utils.prompts.batch_inputs`)
    and capture each one's attention rows as it has them alone
    (:func:`~sparsemm_utils.attention_capture.generate_batch_with_rows`).

    ``records[b]``: step 02's record of document b; ``image_steps[b]``: its explorer steps. Each
    sample's ``seconds`` is the batch's time divided by B. One document is :func:`capture_sample`.
    """
    start_time = time.perf_counter()
    prompts, specs = [], []
    for document, record, steps in zip(documents, records, image_steps, strict=True):
        inputs = build_inputs(loaded, document["image"], cfg.prompt, loaded.model_type)
        start, count = image_token_span(inputs["input_ids"], loaded.image_token_id)
        _check_record(record, loaded.model_type, document.get("doc_id"), start, count)
        prompts.append(inputs)
        specs.append(
            CaptureSpec(
                top_k=cfg.top_k,
                image_span=(start, count),
                image_steps=steps,
                keep_rows=keep_rows,
                selection_dtype=cfg.selection_dtype,
            )
        )
    generated = generate_batch_with_rows(
        loaded, batch_inputs(loaded, prompts), max_new_tokens=cfg.max_new_tokens, specs=specs, method=method or cfg.capture
    )
    stops = stop_token_ids(loaded)
    seconds = (time.perf_counter() - start_time) / len(prompts)
    return [
        SampleCapture(
            doc_id=document.get("doc_id"),
            tokens=generated_tokens(loaded.tokenizer, ids, loaded.model_type, stop_ids=stops, mode=cfg.token_text),
            captured=captured,
            record=record,
            prompt_len=int(inputs["input_ids"].shape[1]),
            seconds=seconds,
        )
        for document, record, inputs, (ids, captured) in zip(documents, records, prompts, generated)
    ]


#: The settings that shape a capture (the matching variant does not: it is scored afterwards).
_CAPTURE_FIELDS = (
    "prompt", "max_new_tokens", "top_k", "token_text", "capture", "explorer_samples", "explorer_tokens", "selection_dtype",
)  # fmt: skip


def capture_identity(loaded: Any, documents: Sequence[Mapping[str, Any]], regions: Mapping[Any, Mapping[str, Any]], cfg: CaptureSettings, n: int) -> dict[str, Any]:
    """What makes the captures of the first ``n`` documents what they are: the model (name, class,
    dtype), the capture settings and a sha256 of the documents' ids and step-02 records
    (``regions`` by doc_id). Every shard of a sharded run must have the same."""
    pages = [[documents[i].get("doc_id"), regions.get(documents[i].get("doc_id"))] for i in range(n)]
    digest = hashlib.sha256(json.dumps(pages, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return {
        "model": str(getattr(loaded, "name_or_path", "")), "model_type": loaded.model_type,
        "dtype": str(getattr(getattr(loaded, "model", None), "dtype", "")), "n_samples": n,
        "settings": {name: getattr(cfg, name) for name in _CAPTURE_FIELDS}, "documents_sha256": digest,
    }  # fmt: skip


def capture_documents(
    loaded: Any,
    documents: Sequence[Mapping[str, Any]],
    regions: Sequence[Mapping[str, Any]],
    cfg: CaptureSettings,
    *,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[SampleCapture]:
    """Generate and capture for the first ``cfg.n_samples`` documents, in order (docs/method.md §4).

    ``regions``: step 02's records (:func:`sparsemm_utils.patch_mapping.load_regions`), looked up
    by ``doc_id``. The first ``cfg.explorer_samples`` samples also keep the image attention of
    their first ``cfg.explorer_tokens`` tokens. ``cfg.batch_size`` (default 1) documents are
    generated at once (:func:`capture_batch`); each capture is the one the document has alone.

    Sharded runs (docs/design.md "Sharded runs"; ``cfg.shards_dir`` names the folder): with
    ``shard``, only the documents at that shard's positions are captured, each saved into the
    shard's folder as it is done (a rerun resumes) and the shard's captures returned. Without it,
    shard folders found under ``cfg.shards_dir`` are merged instead of capturing
    (:func:`~sparsemm_utils.sharding.merge_items`: all documents there exactly once, made with the
    same :func:`capture_identity`), giving the captures a single process makes.
    """
    by_id = {r["doc_id"]: r for r in regions}
    n = len(documents) if cfg.n_samples is None else min(cfg.n_samples, len(documents))
    if n == 0:
        raise NoSamplesError("there are no documents to score: step 01 produced an empty dataset")
    parent = getattr(cfg, "shards_dir", None)
    if shard is not None and parent is None:
        raise ShardError("a sharded capture needs cfg.shards_dir, the folder of its shards (step 03's Config has it)")
    folder = None
    if parent is not None:
        identity = capture_identity(loaded, documents, by_id, cfg, n)
        if shard is None:
            merged = merge_items(parent, n, identity)
            if merged is not None:
                return merged
        else:
            folder = open_shard(parent, shard, identity)
    positions = [i for i in range(n) if shard is None or shard.owns(i)]
    out: dict[int, SampleCapture] = {}
    for i in positions:
        doc_id = documents[i].get("doc_id")
        if doc_id not in by_id:
            raise RegionMismatchError(
                f"document {doc_id!r} has no record in step 02's regions.jsonl ({len(by_id)} records): rerun "
                "step 02_patch_mapping on the current step-01 documents"
            )
        done = load_item(folder, i) if folder is not None else None
        if done is not None:
            out[i] = done
    todo = [i for i in positions if i not in out]
    size = getattr(cfg, "batch_size", 1)
    bar = None
    if progress:
        bar = tqdm(desc=f"scoring ({cfg.capture})" + (f", shard {shard}" if shard else ""), total=len(positions), initial=len(out))
    for first in range(0, len(todo), size):
        chunk = todo[first : first + size]
        image_steps = [cfg.explorer_tokens if i < cfg.explorer_samples else 0 for i in chunk]
        captured = capture_batch(
            loaded, [documents[i] for i in chunk], [by_id[documents[i].get("doc_id")] for i in chunk], cfg, image_steps=image_steps
        )
        for i, sample in zip(chunk, captured):
            if folder is not None:
                save_item(folder, i, sample)
            out[i] = sample
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [out[i] for i in positions]


def positions_for(captured: CapturedAttention, selection: str = "argmax", top_k: int = 1) -> np.ndarray:
    """The (T, L, H, k) positions of a capture for ``selection`` (argmax: its argmax; topk: the
    first ``top_k`` of its top positions, which must have been captured)."""
    check_choice("selection", selection, SELECTIONS, error=HeadScoringConfigError)
    if selection == "argmax":
        return captured.argmax[..., None]
    available = captured.top_positions.shape[-1]
    if top_k > available:
        raise HeadScoringConfigError(
            f"selection='topk' with top_k={top_k}, but only {available} top positions were captured: capture with "
            f"CaptureSpec(top_k>={top_k}) (step 03's Config.top_k)"
        )
    return captured.top_positions[..., :top_k]


@dataclass
class HeadScoringResult:
    """Scores of one (match, selection) variant over samples, with the per-token bookkeeping.

    ``sample_scores`` (N, L, H) float64: s_n; ``scores`` (L, H): their mean (S).
    ``matches[n][t]``: the :class:`TokenMatch` of token t of sample n; ``hits[n]`` (T, L, H).
    """

    sample_scores: np.ndarray
    doc_ids: list[Any]
    matches: list[list[TokenMatch]]
    hits: list[np.ndarray]
    match: str
    selection: str
    top_k: int

    @property
    def scores(self) -> np.ndarray:
        return mean_over_samples(self.sample_scores)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.sample_scores.shape[1]), int(self.sample_scores.shape[2])

    def reason_counts(self) -> dict[str, int]:
        """Tokens per reason: ``matched`` and every skip reason (zeros included)."""
        counts = Counter(m.reason for sample in self.matches for m in sample)
        return {MATCHED: counts.get(MATCHED, 0), **{r: counts.get(r, 0) for r in SKIP_REASONS}}

    def samples_without_match(self) -> list[Any]:
        """doc_ids of the samples where no token was matched (they score 0 everywhere)."""
        return [d for d, sample in zip(self.doc_ids, self.matches) if not any(m.matched for m in sample)]

    def summary(self) -> dict[str, Any]:
        """Counts and the shape of the result (the variant part of ``scoring_report.json``)."""
        counts = self.reason_counts()
        generated = sum(counts.values())
        region_sizes = [m.region.size for sample in self.matches for m in sample if m.matched]
        no_match = self.samples_without_match()
        scores = self.scores
        total = float(scores.sum())
        return {
            "match": self.match,
            "selection": self.selection,
            "top_k": self.top_k if self.selection == "topk" else 1,
            "samples": len(self.doc_ids),
            "tokens_generated": generated,
            "tokens_matched": counts[MATCHED],
            "tokens_skipped": {r: counts[r] for r in SKIP_REASONS},
            "samples_with_no_match": len(no_match),
            "doc_ids_with_no_match": [jsonable(d) for d in no_match],
            "mean_region_size": float(np.mean(region_sizes)) if region_sizes else None,
            "score_total": total,
            "top_heads": [{"layer": l, "head": h, "score": s} for l, h, s in top_heads(scores, 5)] if total > 0 else [],
            "top_5pct_share": top_share(scores, 0.05) if total > 0 else None,
            "top_10pct_share": top_share(scores, 0.10) if total > 0 else None,
        }

    def token_table(self, samples: Sequence[SampleCapture] | None = None) -> pd.DataFrame:
        """One row per generated token: doc_id, step, token_id, token_text, reason, source,
        region_size, heads_hit (``samples`` gives the token ids and texts)."""
        rows = []
        for n, (doc_id, matches) in enumerate(zip(self.doc_ids, self.matches)):
            tokens = samples[n].tokens if samples is not None else None
            for t, m in enumerate(matches):
                rows.append(
                    {
                        "doc_id": doc_id,
                        "step": t,
                        "token_id": tokens.ids[t] if tokens is not None else None,
                        "token_text": tokens.texts[t] if tokens is not None else None,
                        "reason": m.reason,
                        "source": " ".join(str(s) for s in m.source),
                        "region_size": int(m.region.size),
                        "heads_hit": int(self.hits[n][t].sum()),
                    }
                )
        columns = ["doc_id", "step", "token_id", "token_text", "reason", "source", "region_size", "heads_hit"]
        return pd.DataFrame(rows, columns=columns)


def jsonable(value: Any) -> Any:
    """``value`` as a plain Python value for JSON (a numpy scalar, e.g. a doc_id, becomes its item)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def score_captures(
    samples: Sequence[SampleCapture], match: str = "substring", selection: str = "argmax", top_k: int = 1
) -> HeadScoringResult:
    """Score captured samples with one (match, selection) variant (docs/method.md §4)."""
    if not samples:
        raise NoSamplesError("no captured samples to score")
    matcher = make_matcher(match)
    check_choice("selection", selection, SELECTIONS, error=HeadScoringConfigError)
    sample_scores, matches, hits = [], [], []
    for sample in samples:
        m = matcher.match(sample.tokens, sample.record)
        scored = score_sample(m, positions_for(sample.captured, selection, top_k))
        sample_scores.append(scored.scores)
        matches.append(m)
        hits.append(scored.hits)
    return HeadScoringResult(
        sample_scores=np.stack(sample_scores),
        doc_ids=[s.doc_id for s in samples],
        matches=matches,
        hits=hits,
        match=match,
        selection=selection,
        top_k=int(top_k),
    )


def compare_with_reference(
    loaded: Any, document: Mapping[str, Any], record: Mapping[str, Any], cfg: CaptureSettings
) -> dict[str, Any]:
    """Capture one document with both methods and compare them (the check the notebook shows).

    Both keep their full rows (``keep_rows``), so this needs the reference's H x N^2 memory per
    layer: tiny inputs only. Returns ``tokens_equal`` (same greedy tokens), ``steps``,
    ``max_abs_row_diff`` (largest |streamed - reference| attention weight over all steps, layers,
    heads, keys), ``argmax_equal`` (fraction of (step, layer, head) with the same argmax) and
    ``scores_equal`` (same s_n under cfg's match and selection).
    """
    streamed = capture_sample(loaded, document, record, cfg, method="streamed", keep_rows=True)
    reference = capture_sample(loaded, document, record, cfg, method="reference", keep_rows=True)
    steps = min(streamed.captured.num_steps, reference.captured.num_steps)
    diffs = [
        float(np.abs(streamed.captured.rows[t] - reference.captured.rows[t]).max()) for t in range(steps)
    ]
    a, b = streamed.captured.argmax[:steps], reference.captured.argmax[:steps]
    tokens_equal = streamed.tokens.ids == reference.tokens.ids
    scores_equal = None
    if tokens_equal:
        s1 = score_captures([streamed], cfg.match, cfg.selection, cfg.top_k).sample_scores
        s2 = score_captures([reference], cfg.match, cfg.selection, cfg.top_k).sample_scores
        scores_equal = bool(np.allclose(s1, s2, rtol=0, atol=1e-12))
    return {
        "doc_id": jsonable(document.get("doc_id")),
        "tokens_equal": bool(tokens_equal),
        "steps": int(steps),
        "max_abs_row_diff": max(diffs) if diffs else 0.0,
        "argmax_equal": float((a == b).mean()) if steps else 1.0,
        "scores_equal": scores_equal,
        "seconds_streamed": streamed.seconds,
        "seconds_reference": reference.seconds,
    }


def compare_variants(samples: Sequence[SampleCapture], top_k: int) -> dict[str, HeadScoringResult]:
    """Every (match, selection) combination scored from the same captures: ``"match/selection"`` ->
    :class:`HeadScoringResult`."""
    return {
        f"{m}/{s}": score_captures(samples, m, s, top_k) for m in MATCH_RULES for s in SELECTIONS
    }


def mean_image_mass(samples: Sequence[SampleCapture]) -> np.ndarray:
    """Mean over samples and generated tokens of each head's attention mass on the image tokens,
    (L, H) float64 (samples weighted equally, like the scores)."""
    masses = [s.captured.image_mass.mean(axis=0) for s in samples if s.captured.image_mass is not None and s.captured.num_steps]
    if not masses:
        raise NoSamplesError("no captured sample recorded image attention mass (capture with an image_span)")
    return np.mean(np.stack(masses), axis=0).astype(np.float64)
