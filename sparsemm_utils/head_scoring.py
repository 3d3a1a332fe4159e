"""Step 03: visual head scoring (notebook ``03_head_scoring``, docs/method.md §4).

The step generates greedily for each document, records every head's attention
(:mod:`sparsemm_utils.head_scoring_capture`), scores the heads with the OCR hit rule
(:mod:`sparsemm_utils.head_scoring_rule`, which states the rule and its named variants) and writes
the original's ``head_scores.json`` beside ``head_scores.csv`` (:mod:`sparsemm_utils.head_scoring_files`),
a ``scoring_report.json`` and ``token_matches.csv``. This module holds the step's parameters
(:class:`HeadScoringConfig`), its report and the writing of its outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .attention_capture import CAPTURE_METHODS
from .head_scoring_capture import HeadScoringResult, SampleCapture, jsonable
from .head_scoring_files import STEP, head_scores_frame, write_head_scores_json
from .head_scoring_rule import MATCH_RULES, SELECTIONS, TOKEN_TEXT_MODES, HeadScoringConfigError
from .prompts import OCR_PROMPT
from .validate import check_choice, check_int

__all__ = [
    "STEP",
    "HeadScoringConfig",
    "build_report",
    "write_scoring_outputs",
]


@dataclass
class HeadScoringConfig:
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
    cfg: HeadScoringConfig,
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


def write_scoring_outputs(
    result: HeadScoringResult,
    out_dir: str | Path,
    *,
    samples: Sequence[SampleCapture] | None = None,
    report: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the artifacts of step 03 into ``out_dir``: ``head_scores.json`` (original format),
    ``head_scores.csv``, ``scoring_report.json`` (``result.summary()`` updated with ``report``) and
    ``token_matches.csv`` (:meth:`HeadScoringResult.token_table`). Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "head_scores.json": write_head_scores_json(result.sample_scores, out / "head_scores.json"),
        "head_scores.csv": out / "head_scores.csv",
        "scoring_report.json": out / "scoring_report.json",
        "token_matches.csv": out / "token_matches.csv",
    }
    head_scores_frame(result.scores).to_csv(paths["head_scores.csv"], index=False)
    full = {**result.summary(), **(dict(report) if report else {})}
    paths["scoring_report.json"].write_text(json.dumps(full, indent=2, default=jsonable) + "\n", encoding="utf-8")
    result.token_table(samples).to_csv(paths["token_matches.csv"], index=False)
    return paths
