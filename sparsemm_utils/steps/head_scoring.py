"""Step 03: visual head scoring (notebook ``03_head_scoring``, docs/method.md §4).

The step generates greedily for each document, records every head's attention
(:mod:`sparsemm_utils.head_scoring_capture`), scores the heads with the OCR hit rule
(:mod:`sparsemm_utils.head_scoring_rule`, which states the rule and its named variants) and writes
the original's ``head_scores.json`` beside ``head_scores.csv`` (:mod:`sparsemm_utils.head_scoring_files`),
``scoring_report.json``, ``token_matches.csv`` and ``findings.csv``. With ``text_heads`` it also
scores the language model's own text-copy heads on the same documents given as text
(:mod:`sparsemm_utils.text_heads`, docs/method.md §4 "Text-copy heads"), writes them to
``text_head_scores.json`` and compares them with the visual heads
(:mod:`sparsemm_utils.head_comparison`). This module declares the step (:data:`STEP`, its
artifacts), its parameters (:class:`Config`), its report, the writing of its outputs
(:func:`write_outputs`) and the paper's claims checked on the run (:func:`findings`).
:func:`capture_shard` runs the notebook's capture for one shard of a sharded run
(``python -m sparsemm_utils.pipeline ... --shard i/n``, docs/design.md "Sharded runs").
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..artifacts import Artifact, StepSpec
from ..attention_capture import CAPTURE_METHODS
from ..attention_hooks import SELECTION_DTYPES
from ..findings import Finding, findings_frame, read_findings
from ..head_comparison import CONCENTRATION_FRACTIONS, compare_head_scores, rank_correlation, top_count, top_overlap
from ..head_scoring_capture import HeadScoringResult, SampleCapture, capture_documents, jsonable
from ..head_scoring_files import head_scores_frame, load_head_scores, write_head_scores_json
from ..head_scoring_rule import (
    MATCH_RULES,
    PAPER_LAYERS,
    PAPER_TOP_HEADS,
    PAPER_TOP_SHARE,
    SELECTIONS,
    TOKEN_TEXT_MODES,
    HeadScoringConfigError,
    HeadScoringError,
    top_heads,
    top_share,
    validate_head_scores,
)
from ..model_types import is_random_weight_model
from ..models import load_model
from ..parameters import MAX_DOCUMENTS, MAX_NEW_TOKENS, check_allow_large, check_size
from ..prompts import OCR_PROMPT
from ..runs import resolve_run_dir
from ..sharding import Shard
from ..text_heads import SMOLLM2_COPY_HEADS, TextHeadResult
from ..validate import check_choice, check_int
from . import ocr_annotation, patch_mapping

__all__ = [
    "NAME",
    "STEP",
    "HEAD_SCORES",
    "HEAD_SCORES_CSV",
    "SCORING_REPORT",
    "TOKEN_MATCHES",
    "FINDINGS",
    "TEXT_HEAD_SCORES",
    "OPTIONAL_OUTPUTS",
    "SHARE_TOLERANCE",
    "SIGNIFICANCE",
    "TEXT_TOP_FRACTION",
    "MAX_BATCH_SIZE",
    "SHARDS_ROOT",
    "Config",
    "capture_shard",
    "build_report",
    "write_outputs",
    "middle_layers",
    "findings",
    "text_findings",
]

NAME = "03_head_scoring"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_token_matches(path: Path) -> pd.DataFrame:
    # token texts such as "NA", "1" or "\n" stay strings
    return pd.read_csv(path, dtype={"token_text": str, "source": str}, keep_default_na=False)


#: S (layers x query heads), float64: the mean of each head's per-sample list. Read it with the
#: model to check its shape: ``load_head_scores(HEAD_SCORES.require(run_dir), shape=loaded)``.
HEAD_SCORES: Artifact[np.ndarray] = Artifact(
    NAME,
    "head_scores.json",
    'visual head scores S (layers x query heads), the original\'s {"l-h": [s_1, ..., s_N]}',
    reader=load_head_scores,
)
HEAD_SCORES_CSV: Artifact[pd.DataFrame] = Artifact(
    NAME, "head_scores.csv", "visual head scores, one row per head: layer, head, score, rank", reader=pd.read_csv
)
SCORING_REPORT: Artifact[dict] = Artifact(
    NAME,
    "scoring_report.json",
    "the scoring's counts (tokens matched / skipped by reason), top heads, concentration, model and parameters",
    reader=_read_json,
)
TOKEN_MATCHES: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "token_matches.csv",
    "one row per generated token: its text, why it was scored or skipped, the heads it hit",
    reader=_read_token_matches,
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(
    NAME, "findings.csv", "the paper's claims about visual heads beside this run's numbers", reader=read_findings
)

#: The language model's own text-copy scores (layers x query heads) on the same documents given
#: as text, in head_scores.json's format (docs/method.md §4 "Text-copy heads"). Written only with
#: ``Config.text_heads``, hence in :data:`OPTIONAL_OUTPUTS` and not in ``STEP.outputs`` (which the
#: pipeline requires after every run).
TEXT_HEAD_SCORES: Artifact[np.ndarray] = Artifact(
    NAME,
    "text_head_scores.json",
    'text-copy head scores (layers x query heads), {"l-h": [s_1, ..., s_N]}: the hit rule on copying the page text from the prompt',
    reader=functools.partial(load_head_scores, allow_zero=True),  # a model may copy no text at all
)

STEP = StepSpec(
    NAME,
    "Visual head scoring: the OCR hit rule per attention head",
    inputs=(ocr_annotation.DOCUMENTS, patch_mapping.REGIONS),
    outputs=(HEAD_SCORES, HEAD_SCORES_CSV, SCORING_REPORT, TOKEN_MATCHES, FINDINGS),
)
#: Outputs written only when a parameter asks for them (``text_heads``).
OPTIONAL_OUTPUTS: tuple[Artifact, ...] = (TEXT_HEAD_SCORES,)

#: Under the run folder: the shards of the steps whose own folder is set aside on a rerun.
SHARDS_ROOT = ".shards"

#: How far (in share points) this run's top-share may fall below the paper's and still count as
#: "as concentrated as the paper's" in :func:`findings`.
SHARE_TOLERANCE = 0.10
#: The probability below which an overlap or a rank correlation counts as more than chance.
SIGNIFICANCE = 0.05
#: The top fraction of heads whose overlap :func:`findings` reports (visual vs text-copy).
TEXT_TOP_FRACTION = 0.10


#: The largest ``batch_size``: 64 documents of the tiny reader's 32 new tokens; real models' rows
#: and caches grow with the batch, so their configs keep it small.
MAX_BATCH_SIZE = 64


@dataclass
class Config:
    """Parameters of step 03 (notebook ``03_head_scoring``), validated.

    ``max_new_tokens``: greedy generation length (docs/method.md §2: 1024). ``n_samples``: score the
    first n documents (None: all). ``match``: ``"substring"`` (docs/method.md §4) | ``"char_box"``;
    ``selection``: ``"argmax"`` (docs/method.md §4) | ``"topk"`` with ``top_k`` (also the number of top
    positions captured, so every variant can be scored from one pass). ``token_text``: see
    :func:`~sparsemm_utils.head_scoring_rule.token_strings`. ``capture``: ``"streamed"`` (row capture) | ``"reference"`` (eager +
    output_attentions, N^2 memory). ``prompt``: the user text (docs/method.md §2: the OCR prompt).
    ``selection_dtype``: the dtype of the attention rows the hit rule ranks, ``"float32"`` (the
    default) or ``"model"`` (the original's: softmax cast back to the model's dtype, argmax by
    ``topk(1)``; docs/deviations.md "Selection scores").
    ``explorer_samples`` / ``explorer_tokens``: keep the image attention of the first tokens of
    the first samples for figures and the explorer. ``reference_check_samples``: samples on which
    the notebook compares the streamed rows with the eager reference (0: skip; the reference needs
    H x N^2 memory per layer). ``dtype``/``device``: passed to ``load_model``. ``threads``: torch
    CPU threads (0: torch's default; 1 is fastest for tiny models on a shared CPU, where idle
    OpenMP threads spin against other processes). ``text_heads``: also score the language
    model's text-copy heads (:mod:`sparsemm_utils.text_heads`) on the first ``text_samples``
    documents (None: all; issue 20 measured SmolLM2-135M on 24), one eager forward each.
    ``batch_size``: documents generated at once (1..:data:`MAX_BATCH_SIZE`), one left-padded batch
    whose captures are each document's batch-1 capture (docs/deviations.md "Several documents at
    once"). ``allow_large``: lift the bounds on ``n_samples`` / ``text_samples``
    (:data:`~sparsemm_utils.parameters.MAX_DOCUMENTS`) and ``max_new_tokens``
    (:data:`~sparsemm_utils.parameters.MAX_NEW_TOKENS`).
    """

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
    seed: int = 0
    max_new_tokens: int = 1024
    n_samples: int | None = None
    match: str = "substring"
    selection: str = "argmax"
    top_k: int = 5
    token_text: str = "family"
    capture: str = "streamed"
    selection_dtype: str = "float32"
    prompt: str | None = None
    explorer_samples: int = 2
    explorer_tokens: int = 48
    reference_check_samples: int = 1
    figure_sample_index: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0
    text_heads: bool = True
    text_samples: int | None = 24
    batch_size: int = 1
    allow_large: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise HeadScoringConfigError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise HeadScoringConfigError(f"model_id must be a non-empty string, got {self.model_id!r}")
        check_int("seed", self.seed, 0, error=HeadScoringConfigError)
        large = check_allow_large(self.allow_large, error=HeadScoringConfigError)
        check_size("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS, allow_large=large, error=HeadScoringConfigError)
        if self.n_samples is not None:
            check_size("n_samples (or None for all documents)", self.n_samples, MAX_DOCUMENTS, allow_large=large,
                       error=HeadScoringConfigError)
        check_choice("match", self.match, MATCH_RULES, error=HeadScoringConfigError)
        check_choice("selection", self.selection, SELECTIONS, error=HeadScoringConfigError)
        check_int("top_k", self.top_k, 1, error=HeadScoringConfigError)
        check_choice("token_text", self.token_text, TOKEN_TEXT_MODES, error=HeadScoringConfigError)
        check_choice("capture", self.capture, CAPTURE_METHODS, error=HeadScoringConfigError)
        check_choice("selection_dtype", self.selection_dtype, SELECTION_DTYPES, error=HeadScoringConfigError)
        if self.prompt is None:
            self.prompt = OCR_PROMPT
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise HeadScoringConfigError(f"prompt must be a non-empty string, got {self.prompt!r}")
        for name in ("explorer_samples", "explorer_tokens", "reference_check_samples", "figure_sample_index", "threads"):
            check_int(name, getattr(self, name), 0, error=HeadScoringConfigError)
        if not isinstance(self.dtype, str) or not isinstance(self.device, str):
            raise HeadScoringConfigError(f"dtype and device must be strings, got {self.dtype!r}, {self.device!r}")
        if not isinstance(self.text_heads, bool):
            raise HeadScoringConfigError(f"text_heads must be True or False, got {self.text_heads!r}")
        self.batch_size = check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE, error=HeadScoringConfigError)
        if self.text_samples is not None:
            check_size("text_samples (or None for all documents)", self.text_samples, MAX_DOCUMENTS, allow_large=large,
                       error=HeadScoringConfigError)

    @property
    def shards_dir(self) -> Path:
        """``<run_dir>/.shards/03_head_scoring``: the shards of a sharded capture live in its
        ``shards/`` (outside the step folder, which the pipeline sets aside when the step reruns)."""
        return resolve_run_dir(self.run_dir) / SHARDS_ROOT / NAME

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (for ``scoring_report.json``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def capture_shard(cfg: Config, shard: Shard) -> list[SampleCapture]:
    """Notebook 03's capture of its documents, for one shard of a sharded run (``python -m
    sparsemm_utils.pipeline ... --shard i/n``): the same seed, threads, documents, regions and
    model, capturing the documents at the shard's positions into its folder under
    :attr:`Config.shards_dir`; the notebook's ``capture_documents`` merges them."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    documents = ocr_annotation.DOCUMENTS.read(cfg.run_dir)
    regions = patch_mapping.REGIONS.read(cfg.run_dir)
    loaded = load_model(cfg.model_id, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return capture_documents(loaded, documents, regions, cfg, shard=shard)


def build_report(
    cfg: Config,
    loaded: Any,
    samples: Sequence[SampleCapture],
    variants: Mapping[str, HeadScoringResult] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The run-level part of ``scoring_report.json``: model, parameters, per-sample lines (doc_id,
    tokens, whether generation stopped at end-of-sequence, prompt length, seconds, the first 200
    characters of the text), a summary of every variant, and ``extra`` (e.g. the reference check).
    """
    return {
        "model_id": cfg.model_id,
        "model_type": loaded.model_type,
        "layers": loaded.num_layers,
        "query_heads": loaded.num_heads,
        "kv_heads": loaded.num_kv_heads,
        "capture": cfg.capture,
        "config": cfg.to_dict(),
        "samples_stopped_at_eos": sum(s.stopped_at_eos for s in samples),
        "samples_at_max_new_tokens": sum(len(s.tokens) >= cfg.max_new_tokens for s in samples),
        "seconds_generation": float(sum(s.seconds for s in samples)),
        "per_sample": [
            {
                "doc_id": jsonable(s.doc_id),
                "tokens": len(s.tokens),
                "stopped_at_eos": s.stopped_at_eos,
                "prompt_len": s.prompt_len,
                "seconds": round(s.seconds, 4),
                "text": s.tokens.text[:200],
            }
            for s in samples
        ],
        "variants": {name: r.summary() for name, r in (variants or {}).items()},
        **extra,
    }


def write_outputs(
    cfg: Config,
    result: HeadScoringResult,
    report: Mapping[str, Any] | None = None,
    *,
    samples: Sequence[SampleCapture] | None = None,
    text: TextHeadResult | None = None,
) -> dict[str, Path]:
    """Write every output of step 03 into ``<cfg.run_dir>/03_head_scoring/``: ``head_scores.json``
    (original format, from ``result.sample_scores`` (N, L, H)), ``head_scores.csv``,
    ``scoring_report.json`` (``result.summary()`` updated with ``report``, e.g. :func:`build_report`),
    ``token_matches.csv`` (:meth:`HeadScoringResult.token_table`; ``samples`` gives the token ids
    and texts) and ``findings.csv`` (:func:`findings`). With ``text`` (the text-copy scores,
    :func:`sparsemm_utils.text_heads.score_copy_documents`) also ``text_head_scores.json`` (from
    ``text.sample_scores`` (N', L, H)), and the report gains ``text_heads``: ``text.summary()``
    and its ``comparison`` with the visual scores; without ``text`` a ``text_head_scores.json``
    left by an earlier run is removed (it would not belong to these scores). Returns file name -> path."""
    STEP.folder(cfg.run_dir, create=True)
    paths = {artifact.name: artifact.path(cfg.run_dir) for artifact in STEP.outputs}
    write_head_scores_json(result.sample_scores, paths[HEAD_SCORES.name])
    head_scores_frame(result.scores).to_csv(paths[HEAD_SCORES_CSV.name], index=False)
    full = {**result.summary(), **(dict(report) if report else {})}
    text_scores = None
    TEXT_HEAD_SCORES.path(cfg.run_dir).unlink(missing_ok=True)
    if text is not None:
        text_scores = text.scores
        paths[TEXT_HEAD_SCORES.name] = write_head_scores_json(text.sample_scores, TEXT_HEAD_SCORES.path(cfg.run_dir))
        comparison = compare_head_scores(result.scores, text_scores, TEXT_TOP_FRACTION)
        full["text_heads"] = {**text.summary(), "comparison": comparison}
    paths[SCORING_REPORT.name].write_text(json.dumps(full, indent=2, default=jsonable) + "\n", encoding="utf-8")
    result.token_table(samples).to_csv(paths[TOKEN_MATCHES.name], index=False)
    table = findings_frame(findings(result.scores, {"model_id": cfg.model_id, **full}, text_scores))
    table.to_csv(paths[FINDINGS.name], index=False)
    return paths


# -------------------------------------------------------------------------------------- findings

#: The keys of ``scoring_report.json`` :func:`findings` reads.
_REPORT_KEYS = (
    "model_id",
    "match",
    "selection",
    "samples",
    "tokens_generated",
    "tokens_matched",
    "tokens_skipped",
    "samples_with_no_match",
)


def middle_layers(layers: int) -> list[int]:
    """The middle half of ``layers`` text layers: those whose centre (l + 0.5) / L lies in
    [1/4, 3/4] (layers 8-23 of 32; layers 1-2 of 4)."""
    layers = check_int("layers", layers, 1, error=HeadScoringError)
    return [l for l in range(layers) if 0.25 <= (l + 0.5) / layers <= 0.75]


def _ranges(layers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    runs: list[list[int]] = []
    for value in sorted(set(layers)):
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "none"


def _location(heads: Sequence[tuple[int, int]], layers: int) -> tuple[int, str]:
    """How many of ``heads`` sit in the middle half of ``layers`` layers, and a sentence saying so."""
    middle = middle_layers(layers)
    inside = sum(l in middle for l, _ in heads)
    names = ", ".join(f"L{l}H{h}" for l, h in heads)
    text = (
        f"{names} sit in layers {_ranges([l for l, _ in heads])} of {layers}; {inside} of {len(heads)} in the "
        f"middle half (layers {_ranges(middle)})"
    )
    return inside, text


def findings(scores: np.ndarray, report: Mapping[str, Any], text_scores: np.ndarray | None = None) -> list[Finding]:
    """The paper's claims about visual heads (docs/method.md §4) beside this run's numbers.

    ``scores``: S (L, H), e.g. ``HEAD_SCORES.read(run_dir)``; ``report``: ``scoring_report.json``
    (``SCORING_REPORT.read(run_dir)``; it needs ``model_id``, ``match``, ``selection``, ``samples``,
    ``tokens_generated``, ``tokens_matched``, ``tokens_skipped`` and ``samples_with_no_match``).
    ``text_scores``: the text-copy scores (``TEXT_HEAD_SCORES.read(run_dir)``) when the run
    scored them; :func:`text_findings` is then appended (the report needs ``text_heads``).

    1. Every sample has tokens the rule scores (n: generated tokens; the counts by reason).
    2-3. The top 5% / top 10% of heads hold about 55% / 77% of the score (n: heads). Holds when this
       run's share is within :data:`SHARE_TOLERANCE` of the paper's or above.
    4. The strongest heads sit in the middle layers (n: the top heads): holds when most of this run's
       five strongest heads lie in :func:`middle_layers`.

    On a random-weight model (``tiny-random/...``) or all-zero scores claims 2-4 cannot be told
    (``holds=None``): no head is expected to read the image.
    """
    scores = validate_head_scores(scores)
    missing = [key for key in _REPORT_KEYS if key not in report]
    if missing:
        raise HeadScoringError(
            f"the scoring report lacks {missing}: pass scoring_report.json as write_outputs wrote it "
            f"(SCORING_REPORT.read(run_dir)), not a variant's summary alone"
        )
    layers = scores.shape[0]
    n_heads = scores.size
    variant = f"{report['match']}/{report['selection']}"
    samples = int(report["samples"])
    generated, matched = int(report["tokens_generated"]), int(report["tokens_matched"])
    unscored = int(report["samples_with_no_match"])
    skipped = sorted(((int(c), r) for r, c in dict(report["tokens_skipped"]).items() if int(c) > 0), key=lambda cr: (-cr[0], cr[1]))
    skipped_text = ", ".join(f"{c} {r}" for c, r in skipped) or "none"
    rate = f" ({matched / generated:.0%})" if generated else ""
    result = [
        Finding(
            NAME,
            "every sample has generated tokens the hit rule can score",
            "no rate reported; a token found in no OCR chunk or in several is skipped, and a sample with no "
            "matched token adds 0 to every head (docs/method.md §4)",
            f"{matched} of {generated} generated tokens matched one region{rate} with the {variant} rule, in "
            f"{samples - unscored} of {samples} samples; skipped: {skipped_text}",
            n=generated,
            holds=matched > 0 and unscored == 0,
            headline=True,
        )
    ]

    random_weights = is_random_weight_model(report["model_id"])
    total = float(scores.sum())
    if random_weights:
        why = f"the model {report['model_id']} has random weights: no head is expected to read the image"
    elif not total > 0:
        why = "all scores are zero: no head's strongest key ever landed in a matched region"
    else:
        why = ""
    for fraction, paper_share in sorted(PAPER_TOP_SHARE.items()):
        if total > 0:
            share = top_share(scores, fraction)
            this_run = (
                f"{share:.1%} of the score in the top {fraction:.0%} of the {n_heads} heads "
                f"({fraction * n_heads:.1f} heads, read off the cumulative curve; equal heads would give "
                f"{fraction:.0%}); {variant}, {samples} samples" + (f"; {why}" if why else "")
            )
            holds = None if random_weights else bool(share >= paper_share - SHARE_TOLERANCE)
        else:
            this_run, holds = why, None
        result.append(
            Finding(
                NAME,
                f"the top {fraction:.0%} of heads hold about {paper_share:.0%} of the visual score",
                f"{paper_share:.0%} on LLaVA-NeXT-Vicuna-7B (docs/method.md §4)",
                this_run,
                n=n_heads,
                holds=holds,
                headline=fraction == max(PAPER_TOP_SHARE),
            )
        )

    _, paper_text = _location(PAPER_TOP_HEADS, PAPER_LAYERS)
    top = [(l, h) for l, h, s in top_heads(scores, len(PAPER_TOP_HEADS)) if s > 0]
    if top:
        inside, where = _location(top, layers)
        this_run = f"the {len(top)} strongest heads {where}" + (f"; {why}" if why else "")
        holds = None if random_weights else bool(2 * inside > len(top))
    else:
        this_run, holds = why, None
    result.append(
        Finding(
            NAME,
            "the strongest visual heads sit in the middle layers",
            f"{paper_text} (LLaVA-NeXT-Vicuna-7B, docs/method.md §4)",
            this_run,
            n=len(top),
            holds=holds,
        )
    )
    if text_scores is not None:
        result.extend(text_findings(scores, text_scores, report))
    return result


#: The keys of ``scoring_report.json``'s ``text_heads`` :func:`text_findings` reads.
_TEXT_REPORT_KEYS = ("samples", "answer_tokens", "tokens_scored", "tokens_skipped", "top_heads")


def _named(heads: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"L{l}H{h}" for l, h in heads)


def text_findings(scores: np.ndarray, text_scores: np.ndarray, report: Mapping[str, Any]) -> list[Finding]:
    """The language model's own text-copy heads beside its visual heads (docs/method.md §4,
    "Text-copy heads"). The paper reports nothing on text heads: the ``paper`` column says so and
    sets issue 20's measurement on SmolLM2-135M (:data:`~sparsemm_utils.text_heads.SMOLLM2_COPY_HEADS`)
    beside this run, labelled as such.

    ``scores`` / ``text_scores``: the visual and the text-copy S (L, H) of one model; ``report``:
    ``scoring_report.json`` with ``model_id`` and ``text_heads`` (its ``samples``,
    ``answer_tokens``, ``tokens_scored``, ``tokens_skipped``, ``top_heads`` with hit rates).

    1. The copy score is concentrated (n: heads): holds when the text top-10% share is within
       :data:`SHARE_TOLERANCE` of SmolLM2-135M's or above.
    2. Only for a model of SmolLM2-135M's shape (30 x 9 heads, e.g. the study model): most of the
       six copy heads issue 20 names are among this run's top 10% copy heads.
    3. The top :data:`TEXT_TOP_FRACTION` of visual and of text-copy heads overlap beyond chance
       (n: heads): holds when the hypergeometric probability of an overlap this large is below
       :data:`SIGNIFICANCE`.
    4. A head's visual score rises with its copy score (n: heads): holds when Spearman's rho > 0
       and its permutation p-value is below :data:`SIGNIFICANCE`.

    A random-weight model, or all-zero scores, cannot tell (``holds=None``).
    """
    scores = validate_head_scores(scores)
    text_scores = validate_head_scores(text_scores, scores.shape, source="text-copy head scores")
    text = report.get("text_heads")
    missing = [key for key in _TEXT_REPORT_KEYS if not isinstance(text, Mapping) or key not in text]
    if "model_id" not in report or missing:
        raise HeadScoringError(
            f"the scoring report lacks model_id or text_heads {missing}: pass scoring_report.json as write_outputs "
            "wrote it with text= (SCORING_REPORT.read(run_dir))"
        )
    ref = SMOLLM2_COPY_HEADS
    n_heads = scores.size
    layers, heads = scores.shape
    random_weights = is_random_weight_model(report["model_id"])
    copy_zero = not float(text_scores.sum()) > 0
    visual_zero = not float(scores.sum()) > 0
    if random_weights:
        why = f"the model {report['model_id']} has random weights: no head is expected to copy or read"
    elif copy_zero:
        why = "all text-copy scores are zero: no head's strongest key ever landed on a token's source"
    else:
        why = ""
    compare_why = why or ("all visual scores are zero: there are no visual heads to compare" if visual_zero else "")
    suffix = (lambda reason: f"; {reason}" if reason else "")
    not_in_paper = "not in the paper (SparseMM scores visual heads only and reports nothing on text-copy heads)"
    skipped = ", ".join(f"{int(c)} {r}" for r, c in sorted(dict(text["tokens_skipped"]).items()) if int(c) > 0) or "none"
    counts = (
        f"{int(text['tokens_scored'])} of {int(text['answer_tokens'])} answer tokens scored in {int(text['samples'])} "
        f"documents (skipped: {skipped})"
    )
    result = []

    reference_shares = " and ".join(
        f"the top {f:.0%} hold {ref.top_share[f]:.0%}" for f in sorted(ref.top_share)
    )
    if copy_zero:
        this_run, holds = f"{why}; {counts}", None
    else:
        shares = {f: top_share(text_scores, f) for f in CONCENTRATION_FRACTIONS}
        strongest = ", ".join(
            f"L{h['layer']}H{h['head']} ({float(h['hit_rate']):.2f})" for h in list(text["top_heads"])[:3]
        )
        this_run = (
            " and ".join(f"the top {f:.0%} hold {shares[f]:.1%}" for f in CONCENTRATION_FRACTIONS)
            + f" of the copy score of the {n_heads} heads; strongest (hit rate): {strongest}; {counts}"
            + suffix(why)
        )
        holds = None if random_weights else bool(shares[0.10] >= ref.top_share[0.10] - SHARE_TOLERANCE)
    result.append(
        Finding(
            NAME,
            "a few heads do the language model's copying from text",
            f"{not_in_paper}; {ref.label}: {reference_shares} of the copy score of its {ref.layers * ref.heads} heads "
            f"({ref.documents} documents)",
            this_run,
            n=n_heads,
            holds=holds,
        )
    )

    if (layers, heads) == (ref.layers, ref.heads):
        named = [(l, h) for l, h, _ in ref.top_heads]
        k = top_count(n_heads, TEXT_TOP_FRACTION)
        top = {(l, h) for l, h, _ in top_heads(text_scores, k)}
        inside = [head for head in named if head in top]
        this_run = why if copy_zero else (
            f"{len(inside)} of the {len(named)} are among this run's top {k} copy heads"
            + (f" ({_named(inside)})" if inside else "")
            + suffix(why)
        )
        result.append(
            Finding(
                NAME,
                f"the strongest copy heads are {ref.model}'s",
                f"{not_in_paper}; {ref.label}: {ref.heads_text()}",
                this_run,
                n=len(named),
                holds=None if why else bool(2 * len(inside) > len(named)),
            )
        )

    overlap = top_overlap(scores, text_scores, TEXT_TOP_FRACTION)
    if copy_zero or visual_zero:
        this_run, holds = compare_why, None
    else:
        this_run = (
            f"{len(overlap.shared)} of the top {overlap.k} visual heads are among the top {overlap.k} copy heads "
            f"({overlap.overlap:.0%}; two random sets of {overlap.k} of the {n_heads} heads share {overlap.chance:.0%} "
            f"on average, p = {overlap.p_value:.2g} of sharing as many)"
            + (f": {_named(overlap.shared)}" if overlap.shared else "")
            + ("; equal scores at the cut were taken in layer-major order" if overlap.ties_at_cut else "")
            + suffix(compare_why)
        )
        holds = None if compare_why else bool(overlap.p_value < SIGNIFICANCE)
    result.append(
        Finding(
            NAME,
            f"the visual heads are the language model's own copy heads (top {TEXT_TOP_FRACTION:.0%} overlap)",
            not_in_paper,
            this_run,
            n=n_heads,
            holds=holds,
        )
    )

    correlation = rank_correlation(scores, text_scores)
    if math.isnan(correlation.rho):
        this_run, holds = compare_why or "one of the score matrices is constant: its ranks carry no order", None
    else:
        this_run = (
            f"Spearman's rho = {correlation.rho:+.2f} between the visual and the copy scores of the {n_heads} heads "
            f"(two-sided permutation p = {correlation.p_value:.2g}, {correlation.permutations} shuffles)"
            + suffix(compare_why)
        )
        holds = None if compare_why else bool(correlation.rho > 0 and correlation.p_value < SIGNIFICANCE)
    result.append(
        Finding(
            NAME,
            "heads that copy text also read the image (rank correlation)",
            not_in_paper,
            this_run,
            n=n_heads,
            holds=holds,
        )
    )
    return result
