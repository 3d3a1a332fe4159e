"""Step 03: visual head scoring (notebook ``03_head_scoring``, docs/method.md §4).

The step generates greedily for each document, records every head's attention
(:mod:`sparsemm_utils.head_scoring_capture`), scores the heads with the OCR hit rule
(:mod:`sparsemm_utils.head_scoring_rule`, which states the rule and its named variants) and writes
the original's ``head_scores.json`` beside ``head_scores.csv`` (:mod:`sparsemm_utils.head_scoring_files`),
``scoring_report.json``, ``token_matches.csv`` and ``findings.csv``. This module declares the step
(:data:`STEP`, its artifacts), its parameters (:class:`Config`), its report, the writing of its
outputs (:func:`write_outputs`) and the paper's claims checked on the run (:func:`findings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..artifacts import Artifact, StepSpec
from ..attention_capture import CAPTURE_METHODS
from ..findings import Finding, findings_frame, read_findings
from ..head_scoring_capture import HeadScoringResult, SampleCapture, jsonable
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
from ..prompts import OCR_PROMPT
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
    "SHARE_TOLERANCE",
    "Config",
    "build_report",
    "write_outputs",
    "middle_layers",
    "findings",
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

STEP = StepSpec(
    NAME,
    "Visual head scoring: the OCR hit rule per attention head",
    inputs=(ocr_annotation.DOCUMENTS, patch_mapping.REGIONS),
    outputs=(HEAD_SCORES, HEAD_SCORES_CSV, SCORING_REPORT, TOKEN_MATCHES, FINDINGS),
)

#: How far (in share points) this run's top-share may fall below the paper's and still count as
#: "as concentrated as the paper's" in :func:`findings`.
SHARE_TOLERANCE = 0.10


@dataclass
class Config:
    """Parameters of step 03 (notebook ``03_head_scoring``), validated.

    ``max_new_tokens``: greedy generation length (docs/method.md §2: 1024). ``n_samples``: score the
    first n documents (None: all). ``match``: ``"substring"`` (docs/method.md §4) | ``"char_box"``;
    ``selection``: ``"argmax"`` (docs/method.md §4) | ``"topk"`` with ``top_k`` (also the number of top
    positions captured, so every variant can be scored from one pass). ``token_text``: see
    :func:`~sparsemm_utils.head_scoring_rule.token_strings`. ``capture``: ``"streamed"`` (row capture) | ``"reference"`` (eager +
    output_attentions, N^2 memory). ``prompt``: the user text (docs/method.md §2: the OCR prompt).
    ``explorer_samples`` / ``explorer_tokens``: keep the image attention of the first tokens of
    the first samples for figures and the explorer. ``reference_check_samples``: samples on which
    the notebook compares the streamed rows with the eager reference (0: skip; the reference needs
    H x N^2 memory per layer). ``dtype``/``device``: passed to ``load_model``. ``threads``: torch
    CPU threads (0: torch's default; 1 is fastest for tiny models on a shared CPU, where idle
    OpenMP threads spin against other processes).
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
    prompt: str | None = None
    explorer_samples: int = 2
    explorer_tokens: int = 48
    reference_check_samples: int = 1
    figure_sample_index: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise HeadScoringConfigError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise HeadScoringConfigError(f"model_id must be a non-empty string, got {self.model_id!r}")
        check_int("seed", self.seed, 0, error=HeadScoringConfigError)
        check_int("max_new_tokens", self.max_new_tokens, 1, error=HeadScoringConfigError)
        if self.n_samples is not None:
            check_int("n_samples (or None for all documents)", self.n_samples, 1, error=HeadScoringConfigError)
        check_choice("match", self.match, MATCH_RULES, error=HeadScoringConfigError)
        check_choice("selection", self.selection, SELECTIONS, error=HeadScoringConfigError)
        check_int("top_k", self.top_k, 1, error=HeadScoringConfigError)
        check_choice("token_text", self.token_text, TOKEN_TEXT_MODES, error=HeadScoringConfigError)
        check_choice("capture", self.capture, CAPTURE_METHODS, error=HeadScoringConfigError)
        if self.prompt is None:
            self.prompt = OCR_PROMPT
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise HeadScoringConfigError(f"prompt must be a non-empty string, got {self.prompt!r}")
        for name in ("explorer_samples", "explorer_tokens", "reference_check_samples", "figure_sample_index", "threads"):
            check_int(name, getattr(self, name), 0, error=HeadScoringConfigError)
        if not isinstance(self.dtype, str) or not isinstance(self.device, str):
            raise HeadScoringConfigError(f"dtype and device must be strings, got {self.dtype!r}, {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (for ``scoring_report.json``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


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
) -> dict[str, Path]:
    """Write every output of step 03 into ``<cfg.run_dir>/03_head_scoring/``: ``head_scores.json``
    (original format, from ``result.sample_scores`` (N, L, H)), ``head_scores.csv``,
    ``scoring_report.json`` (``result.summary()`` updated with ``report``, e.g. :func:`build_report`),
    ``token_matches.csv`` (:meth:`HeadScoringResult.token_table`; ``samples`` gives the token ids
    and texts) and ``findings.csv`` (:func:`findings`). Returns file name -> path."""
    STEP.folder(cfg.run_dir, create=True)
    paths = {artifact.name: artifact.path(cfg.run_dir) for artifact in STEP.outputs}
    write_head_scores_json(result.sample_scores, paths[HEAD_SCORES.name])
    head_scores_frame(result.scores).to_csv(paths[HEAD_SCORES_CSV.name], index=False)
    full = {**result.summary(), **(dict(report) if report else {})}
    paths[SCORING_REPORT.name].write_text(json.dumps(full, indent=2, default=jsonable) + "\n", encoding="utf-8")
    result.token_table(samples).to_csv(paths[TOKEN_MATCHES.name], index=False)
    table = findings_frame(findings(result.scores, {"model_id": cfg.model_id, **full}))
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


def findings(scores: np.ndarray, report: Mapping[str, Any]) -> list[Finding]:
    """The paper's claims about visual heads (docs/method.md §4) beside this run's numbers.

    ``scores``: S (L, H), e.g. ``HEAD_SCORES.read(run_dir)``; ``report``: ``scoring_report.json``
    (``SCORING_REPORT.read(run_dir)``; it needs ``model_id``, ``match``, ``selection``, ``samples``,
    ``tokens_generated``, ``tokens_matched``, ``tokens_skipped`` and ``samples_with_no_match``).

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
    return result
