"""Step 03: visual head scoring, the OCR hit rule of docs/method.md §4.

The rule, for each sample n (a document image and the OCR prompt), greedy generation, and each
generated token t:

1. ``tau_t``: the token's string. The original keeps the tokenizer's word-boundary marker on
   LLaVA (``convert_ids_to_tokens``: ``"▁the"``) and decodes on Qwen (``processor.decode``:
   ``" the"``); ``token_text="family"`` reproduces that (``"decode"`` / ``"token"`` force one).
2. The chunks of the document whose text contains ``tau_t`` as a substring. Only when exactly
   ONE chunk matches is its region R_t (its visual-token positions from step 02) used; otherwise
   t is skipped. The end-of-sequence token is never scored (the original stops before it).
3. For every layer l and query head h: j* = argmax over ALL key positions (text included) of the
   attention row of the query that produced t. If j* is in R_t: ``s_n[l, h] += 1 / |R_t|``; at
   most one increment per (token, head).

``S[l, h]`` = mean over samples of ``s_n[l, h]``; no other normalisation. File format of the
original: JSON ``{"l-h": [s_1, ..., s_N]}``, keys layer-major.

Named variants (never on by default; the original's crude spots made explicit):

- ``match="char_box"`` (:class:`CharBoxMatch`): instead of "the one chunk that contains the token
  string", align the generated characters with the document's per-character boxes (step 01's
  ``char_coord``, step 02's ``chars``) and use the boxes of the characters the token was aligned
  to. The natural rule for a character-level tokenizer, where one character occurs in many chunks
  and the substring rule skips most tokens.
- ``selection="topk"``: a head hits when ANY of its ``top_k`` largest keys lies in R_t (the
  original's ``hit_score`` has a ``topk`` argument, called with 1); still one increment at most.

Scores are per QUERY head on GQA models: heads of one KV group share keys but not queries.
Capture (:mod:`sparsemm_utils.attention_capture`) is separate from matching: one generation pass
per sample records the argmax and top-k key positions of every head, and every (match,
selection) combination is then scored from the same pass (:func:`score_captures`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from sparsemm_utils.attention_capture import (
    CAPTURE_METHODS,
    CapturedAttention,
    CaptureSpec,
    generate_with_rows,
    stop_token_ids,
)

__all__ = [
    "STEP",
    "MATCH_RULES",
    "SELECTIONS",
    "TOKEN_TEXT_MODES",
    "MATCHED",
    "SKIP_REASONS",
    "PAPER_TOP_SHARE",
    "HeadScoringError",
    "HeadScoringConfigError",
    "HeadScoreFileError",
    "HeadScoreShapeError",
    "InvalidHeadScoresError",
    "RegionMismatchError",
    "NoSamplesError",
    "GeneratedTokens",
    "TokenMatch",
    "SubstringMatch",
    "CharBoxMatch",
    "make_matcher",
    "token_strings",
    "generated_tokens",
    "select_positions",
    "positions_for",
    "head_hits",
    "SampleScore",
    "score_sample",
    "score_attention_rows",
    "mean_over_samples",
    "HeadScoringConfig",
    "SampleCapture",
    "HeadScoringResult",
    "capture_sample",
    "capture_documents",
    "score_captures",
    "compare_variants",
    "compare_with_reference",
    "build_report",
    "head_scores_to_json_dict",
    "write_head_scores_json",
    "load_head_scores",
    "validate_head_scores",
    "head_scores_frame",
    "write_scoring_outputs",
    "cumulative_share",
    "top_share",
    "top_heads",
    "mean_image_mass",
]

STEP = "03_head_scoring"
MATCH_RULES: tuple[str, ...] = ("substring", "char_box")
SELECTIONS: tuple[str, ...] = ("argmax", "topk")
TOKEN_TEXT_MODES: tuple[str, ...] = ("family", "decode", "token")

#: Reason of a token that was scored.
MATCHED = "matched"
#: Why a token was not scored (a ``scoring_report.json`` counts each).
END_OF_SEQUENCE = "end_of_sequence"  # the stop token: the original breaks before scoring it
NO_MATCH = "no_match"  # substring: no chunk contains the token string
AMBIGUOUS = "ambiguous"  # substring: two or more chunks contain it
EMPTY_REGION = "empty_region"  # the matched box maps to no visual token (step 02 skipped it)
WHITESPACE = "whitespace"  # char_box: the token has no non-whitespace character
UNALIGNED = "unaligned"  # char_box: none of its characters aligns with a character box
NO_CHAR_BOXES = "no_char_boxes"  # char_box: the document has no per-character boxes (SynthDoG)
SKIP_REASONS: tuple[str, ...] = (
    END_OF_SEQUENCE,
    NO_MATCH,
    AMBIGUOUS,
    EMPTY_REGION,
    WHITESPACE,
    UNALIGNED,
    NO_CHAR_BOXES,
)

#: docs/method.md §4: on LLaVA-NeXT-Vicuna-7B the top 5% of heads hold ~55% of the normalised
#: score mass, the top 10% ~77%.
PAPER_TOP_SHARE: Mapping[float, float] = {0.05: 0.55, 0.10: 0.77}

_KEY = re.compile(r"^(\d+)-(\d+)$")


# ---------------------------------------------------------------------------------- errors


class HeadScoringError(ValueError):
    """Base class of every step-03 error."""


class HeadScoringConfigError(HeadScoringError):
    """A parameter of :class:`HeadScoringConfig` is invalid."""


class HeadScoreFileError(HeadScoringError):
    """A head-score file cannot be read: not JSON/CSV, bad keys, missing heads, empty lists."""


class HeadScoreShapeError(HeadScoringError):
    """Head scores whose (layers, heads) shape does not match the model (the message names both)."""


class InvalidHeadScoresError(HeadScoringError):
    """Head scores with NaN, infinite or negative values."""


class RegionMismatchError(HeadScoringError):
    """Step 02's regions do not belong to this model/prompt/document (rerun step 02)."""


class NoSamplesError(HeadScoringError):
    """There is nothing to average: no sample was scored."""


# ---------------------------------------------------------------------------- token strings


@dataclass(frozen=True)
class GeneratedTokens:
    """The T tokens of one greedy generation.

    ``ids`` (T,) token ids; ``texts``: tau_t, the string the substring rule matches (per
    ``token_text`` mode); ``pieces``: ``tokenizer.decode([id])`` of each token (what the
    character alignment reads); ``stop``: True for end-of-sequence tokens (never scored).
    """

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    pieces: tuple[str, ...]
    stop: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.texts) == len(self.pieces) == len(self.stop) == n):
            raise ValueError(
                f"ids, texts, pieces and stop must have one entry per token, got lengths "
                f"{n}, {len(self.texts)}, {len(self.pieces)}, {len(self.stop)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text(self) -> str:
        """The generated text (decoded pieces joined, stop tokens left out)."""
        return "".join(p for p, s in zip(self.pieces, self.stop) if not s)

    @classmethod
    def from_texts(cls, texts: Sequence[str], stop: Sequence[bool] | None = None) -> GeneratedTokens:
        """Tokens given by their strings only (tests, hand examples): ids 0..T-1, pieces = texts."""
        stop = tuple(bool(s) for s in (stop if stop is not None else [False] * len(texts)))
        return cls(tuple(range(len(texts))), tuple(texts), tuple(texts), stop)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise HeadScoringConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def token_strings(tokenizer: Any, ids: Sequence[int], model_type: str, mode: str = "family") -> list[str]:
    """tau_t for each id (docs/method.md §4, step 1).

    ``mode="family"`` (the original): LLaVA-NeXT ``convert_ids_to_tokens`` (keeps the
    word-boundary marker, e.g. ``"▁the"``), Qwen ``decode([id])`` (``" the"``). ``"decode"`` and
    ``"token"`` force one of the two for every family.
    """
    _check_choice("token_text", mode, TOKEN_TEXT_MODES)
    if mode == "family":
        mode = "token" if model_type == "llava_next" else "decode"
    ids = [int(i) for i in ids]
    if mode == "token":
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([i]) for i in ids]


def generated_tokens(
    tokenizer: Any, ids: Sequence[int], model_type: str, *, stop_ids: Iterable[int] = (), mode: str = "family"
) -> GeneratedTokens:
    """:class:`GeneratedTokens` for generated ``ids`` (``stop_ids``: the end-of-sequence ids)."""
    stop_set = {int(s) for s in stop_ids}
    ids = [int(i) for i in ids]
    return GeneratedTokens(
        ids=tuple(ids),
        texts=tuple(token_strings(tokenizer, ids, model_type, mode)),
        pieces=tuple(tokenizer.decode([i]) for i in ids),
        stop=tuple(i in stop_set for i in ids),
    )


# ----------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class TokenMatch:
    """How one generated token was matched.

    ``reason``: :data:`MATCHED` or one of :data:`SKIP_REASONS`. ``region``: the ABSOLUTE key
    positions of R_t, int64 sorted unique (empty unless matched). ``source``: the chunk index
    (substring) or the character indices (char_box) the region came from.
    """

    reason: str
    region: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    source: tuple[int, ...] = ()

    @property
    def matched(self) -> bool:
        return self.reason == MATCHED


def _absolute(record: Mapping[str, Any], relative: Iterable[int]) -> np.ndarray:
    start = int(record["image_token_start"])
    return np.unique(np.asarray(list(relative), dtype=np.int64)) + start


@dataclass(frozen=True)
class SubstringMatch:
    """docs/method.md §4, step 2 (the default): the region of the ONE chunk containing tau_t.

    ``tau_t in chunk`` is plain Python substring search, case-sensitive, as in the original: an
    empty tau_t is in every chunk (unique only in a one-chunk document), a space is in every
    multi-word chunk. A chunk whose box step 02 could not map (empty ``positions``) gives
    :data:`EMPTY_REGION` (the original would count it and never hit: the same scores).
    """

    name: ClassVar[str] = "substring"

    def match(self, tokens: GeneratedTokens, record: Mapping[str, Any]) -> list[TokenMatch]:
        chunks = record.get("chunks") or []
        texts = [c.get("chunk") or "" for c in chunks]
        out = []
        for tau, stop in zip(tokens.texts, tokens.stop):
            if stop:
                out.append(TokenMatch(END_OF_SEQUENCE))
                continue
            hits = [i for i, text in enumerate(texts) if tau in text]
            if not hits:
                out.append(TokenMatch(NO_MATCH))
            elif len(hits) > 1:
                out.append(TokenMatch(AMBIGUOUS, source=tuple(hits)))
            elif not chunks[hits[0]].get("positions"):
                out.append(TokenMatch(EMPTY_REGION, source=(hits[0],)))
            else:
                out.append(TokenMatch(MATCHED, _absolute(record, chunks[hits[0]]["positions"]), (hits[0],)))
        return out


@dataclass(frozen=True)
class CharBoxMatch:
    """Named variant: the boxes of the document characters the token's characters align to.

    The non-whitespace characters of the generated text (``tokens.pieces`` joined, stop tokens
    left out) are aligned with the document's non-whitespace characters in reading order (step
    02's ``chars``) by ``difflib.SequenceMatcher`` (longest matching blocks, no junk heuristic):
    a misread or an inserted character stays unaligned, the rest keeps its place. A token's region
    is the union of the regions of the characters it aligned to. Skips: :data:`WHITESPACE` (a
    space or newline token), :data:`UNALIGNED`, :data:`EMPTY_REGION`, :data:`NO_CHAR_BOXES` (a
    document without per-character boxes, e.g. SynthDoG), :data:`END_OF_SEQUENCE`.
    """

    name: ClassVar[str] = "char_box"

    def match(self, tokens: GeneratedTokens, record: Mapping[str, Any]) -> list[TokenMatch]:
        chars = record.get("chars") or []
        gen_chars: list[str] = []
        owner: list[int] = []  # token index of each generated non-whitespace character
        for t, (piece, stop) in enumerate(zip(tokens.pieces, tokens.stop)):
            if stop:
                continue
            for ch in piece:
                if not ch.isspace():
                    gen_chars.append(ch)
                    owner.append(t)
        truth = [str(c.get("char") or "") for c in chars]
        aligned: dict[int, int] = {}
        if chars and gen_chars:
            matcher = difflib.SequenceMatcher(None, gen_chars, truth, autojunk=False)
            for block in matcher.get_matching_blocks():
                for offset in range(block.size):
                    aligned[block.a + offset] = block.b + offset
        per_token: dict[int, list[int]] = {}
        has_chars: set[int] = set()
        for g, t in enumerate(owner):
            has_chars.add(t)
            if g in aligned:
                per_token.setdefault(t, []).append(aligned[g])
        out = []
        for t, stop in enumerate(tokens.stop):
            if stop:
                out.append(TokenMatch(END_OF_SEQUENCE))
            elif t not in has_chars:
                out.append(TokenMatch(WHITESPACE))
            elif not chars:
                out.append(TokenMatch(NO_CHAR_BOXES))
            elif t not in per_token:
                out.append(TokenMatch(UNALIGNED))
            else:
                idx = tuple(per_token[t])
                positions = [p for i in idx for p in (chars[i].get("positions") or [])]
                if not positions:
                    out.append(TokenMatch(EMPTY_REGION, source=idx))
                else:
                    out.append(TokenMatch(MATCHED, _absolute(record, positions), idx))
        return out


Matcher = SubstringMatch | CharBoxMatch


def make_matcher(name: str) -> Matcher:
    """The matcher for ``match`` = ``"substring"`` (default) or ``"char_box"``."""
    _check_choice("match", name, MATCH_RULES)
    return SubstringMatch() if name == "substring" else CharBoxMatch()


# --------------------------------------------------------------------------------- the rule


def select_positions(rows: Sequence[np.ndarray], selection: str = "argmax", top_k: int = 1) -> np.ndarray:
    """Key positions each head selects, from full attention rows (the pure form of the capture).

    ``rows``: T arrays of shape (L, H, N_t) (N_t may grow with t). Returns int64 (T, L, H, k):
    ``"argmax"``: k = 1, the first maximum on ties (``np.argmax``, as ``torch.argmax``);
    ``"topk"``: the ``top_k`` largest, descending, ties by lower position (a stable sort;
    ``torch.topk`` does not promise an order for ties). Rows shorter than k are padded with -1.
    """
    _check_choice("selection", selection, SELECTIONS)
    k = 1 if selection == "argmax" else int(top_k)
    if k < 1:
        raise HeadScoringConfigError(f"top_k must be >= 1, got {top_k}")
    out = []
    for row in rows:
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 3:
            raise ValueError(f"each row must be (layers, heads, keys), got shape {row.shape}")
        if selection == "argmax":
            picked = np.argmax(row, axis=-1)[..., None]
        else:
            picked = np.argsort(-row, axis=-1, kind="stable")[..., :k]
            if picked.shape[-1] < k:
                pad = np.full(picked.shape[:-1] + (k - picked.shape[-1],), -1, dtype=np.int64)
                picked = np.concatenate([picked, pad], axis=-1)
        out.append(picked.astype(np.int64))
    if not out:
        raise ValueError("no rows given")
    return np.stack(out)


def positions_for(captured: CapturedAttention, selection: str = "argmax", top_k: int = 1) -> np.ndarray:
    """The (T, L, H, k) positions of a capture for ``selection`` (argmax: its argmax; topk: the
    first ``top_k`` of its top positions, which must have been captured)."""
    _check_choice("selection", selection, SELECTIONS)
    if selection == "argmax":
        return captured.argmax[..., None]
    available = captured.top_positions.shape[-1]
    if top_k > available:
        raise HeadScoringConfigError(
            f"selection='topk' with top_k={top_k}, but only {available} top positions were captured: capture with "
            f"CaptureSpec(top_k>={top_k}) (HeadScoringConfig.top_k)"
        )
    return captured.top_positions[..., :top_k]


def head_hits(positions: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Bool (L, H): does any of a head's selected positions (L, H, k) lie in ``region``?"""
    return np.isin(np.asarray(positions), np.asarray(region)).any(axis=-1)


@dataclass(frozen=True)
class SampleScore:
    """s_n (L, H) float64 of one sample, and which heads hit at which token (T, L, H) bool."""

    scores: np.ndarray
    hits: np.ndarray


def score_sample(matches: Sequence[TokenMatch], positions: np.ndarray) -> SampleScore:
    """docs/method.md §4, step 3 for one sample: s_n[l, h] = sum over matched tokens t of
    [a selected position of (l, h) at t lies in R_t] / |R_t|.

    ``matches``: T :class:`TokenMatch`; ``positions``: int (T, L, H, k) from
    :func:`select_positions` or :func:`positions_for`.
    """
    positions = np.asarray(positions)
    if positions.ndim != 4:
        raise ValueError(f"positions must be (tokens, layers, heads, k), got shape {positions.shape}")
    if len(matches) != positions.shape[0]:
        raise ValueError(f"{len(matches)} token matches but positions for {positions.shape[0]} tokens")
    scores = np.zeros(positions.shape[1:3], dtype=np.float64)
    hits = np.zeros(positions.shape[:3], dtype=bool)
    for t, m in enumerate(matches):
        if not m.matched:
            continue
        if m.region.size == 0:
            raise ValueError(f"token {t} is marked matched but has an empty region")
        hits[t] = head_hits(positions[t], m.region)
        scores += hits[t] / m.region.size
    return SampleScore(scores, hits)


def score_attention_rows(
    rows: Sequence[np.ndarray], matches: Sequence[TokenMatch], selection: str = "argmax", top_k: int = 1
) -> np.ndarray:
    """s_n (L, H) from full attention rows (T arrays (L, H, N_t)) and token matches."""
    return score_sample(matches, select_positions(rows, selection, top_k)).scores


def mean_over_samples(sample_scores: np.ndarray) -> np.ndarray:
    """S = mean over samples, (N, L, H) -> (L, H) (docs/method.md §4: no other normalisation)."""
    sample_scores = np.asarray(sample_scores, dtype=np.float64)
    if sample_scores.ndim != 3:
        raise ValueError(f"sample scores must be (samples, layers, heads), got shape {sample_scores.shape}")
    if sample_scores.shape[0] == 0:
        raise NoSamplesError("no samples were scored: there is nothing to average (check n_samples and step 01)")
    return sample_scores.mean(axis=0)


# ---------------------------------------------------------------------------------- config


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise HeadScoringConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class HeadScoringConfig:
    """Parameters of step 03 (notebook ``03_head_scoring``), validated.

    ``max_new_tokens``: greedy generation length (docs/method.md §2: 1024). ``n_samples``: score the
    first n documents (None: all). ``match``: ``"substring"`` (docs/method.md §4) | ``"char_box"``;
    ``selection``: ``"argmax"`` (docs/method.md §4) | ``"topk"`` with ``top_k`` (also the number of top
    positions captured, so every variant can be scored from one pass). ``token_text``: see
    :func:`token_strings`. ``capture``: ``"streamed"`` (row capture) | ``"reference"`` (eager +
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
        _int_at_least("seed", self.seed, 0)
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.n_samples is not None:
            _int_at_least("n_samples (or None for all documents)", self.n_samples, 1)
        _check_choice("match", self.match, MATCH_RULES)
        _check_choice("selection", self.selection, SELECTIONS)
        _int_at_least("top_k", self.top_k, 1)
        _check_choice("token_text", self.token_text, TOKEN_TEXT_MODES)
        _check_choice("capture", self.capture, CAPTURE_METHODS)
        if self.prompt is None:
            from sparsemm_utils.prompts import OCR_PROMPT

            self.prompt = OCR_PROMPT
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise HeadScoringConfigError(f"prompt must be a non-empty string, got {self.prompt!r}")
        for name in ("explorer_samples", "explorer_tokens", "reference_check_samples", "figure_sample_index", "threads"):
            _int_at_least(name, getattr(self, name), 0)
        if not isinstance(self.dtype, str) or not isinstance(self.device, str):
            raise HeadScoringConfigError(f"dtype and device must be strings, got {self.dtype!r}, {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values (for ``scoring_report.json``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------- running


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
            f"document {doc_id!r}: step 02 mapped its boxes for {record.get('model_type')!r} but the model is "
            f"{model_type!r}; rerun step 02_patch_mapping with the same model_id"
        )
    expected = (int(record["image_token_start"]), int(record["num_image_tokens"]))
    if (start, count) != expected:
        raise RegionMismatchError(
            f"document {doc_id!r}: the prompt's image tokens start at {start} ({count} tokens) but step 02 recorded "
            f"{expected[0]} ({expected[1]} tokens): the regions would point at the wrong keys. Rerun step "
            "02_patch_mapping with the same model_id and processor settings (and the OCR prompt)."
        )


def capture_sample(
    loaded: Any,
    document: Mapping[str, Any],
    record: Mapping[str, Any],
    cfg: HeadScoringConfig,
    *,
    image_steps: int = 0,
    method: str | None = None,
    keep_rows: bool = False,
) -> SampleCapture:
    """Generate for one document and capture its attention rows (``method``: cfg.capture if None)."""
    from sparsemm_utils.prompts import build_inputs, image_token_span

    start_time = time.perf_counter()
    inputs = build_inputs(loaded, document["image"], cfg.prompt, loaded.model_type)
    start, count = image_token_span(inputs["input_ids"], loaded.image_token_id)
    _check_record(record, loaded.model_type, document.get("doc_id"), start, count)
    spec = CaptureSpec(top_k=cfg.top_k, image_span=(start, count), image_steps=image_steps, keep_rows=keep_rows)
    ids, captured = generate_with_rows(
        loaded, inputs, max_new_tokens=cfg.max_new_tokens, spec=spec, method=method or cfg.capture
    )
    tokens = generated_tokens(loaded.tokenizer, ids, loaded.model_type, stop_ids=stop_token_ids(loaded), mode=cfg.token_text)
    return SampleCapture(
        doc_id=document.get("doc_id"),
        tokens=tokens,
        captured=captured,
        record=record,
        prompt_len=int(inputs["input_ids"].shape[1]),
        seconds=time.perf_counter() - start_time,
    )


def capture_documents(
    loaded: Any,
    documents: Sequence[Mapping[str, Any]],
    regions: Sequence[Mapping[str, Any]],
    cfg: HeadScoringConfig,
    *,
    progress: bool = True,
) -> list[SampleCapture]:
    """Generate and capture for the first ``cfg.n_samples`` documents, in order (docs/method.md §4).

    ``regions``: step 02's records (:func:`sparsemm_utils.patch_mapping.load_regions`), looked up
    by ``doc_id``. The first ``cfg.explorer_samples`` samples also keep the image attention of
    their first ``cfg.explorer_tokens`` tokens.
    """
    by_id = {r["doc_id"]: r for r in regions}
    n = len(documents) if cfg.n_samples is None else min(cfg.n_samples, len(documents))
    if n == 0:
        raise NoSamplesError("there are no documents to score: step 01 produced an empty dataset")
    iterator: Iterable[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"scoring ({cfg.capture})", total=n)
    out = []
    for i in iterator:
        doc = documents[i]
        doc_id = doc.get("doc_id")
        if doc_id not in by_id:
            raise RegionMismatchError(
                f"document {doc_id!r} has no record in step 02's regions.jsonl ({len(by_id)} records): rerun "
                "step 02_patch_mapping on the current step-01 documents"
            )
        image_steps = cfg.explorer_tokens if i < cfg.explorer_samples else 0
        out.append(capture_sample(loaded, doc, by_id[doc_id], cfg, image_steps=image_steps))
    return out


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
            "doc_ids_with_no_match": [_jsonable(d) for d in no_match],
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


def _jsonable(value: Any) -> Any:
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
    _check_choice("selection", selection, SELECTIONS)
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
    loaded: Any, document: Mapping[str, Any], record: Mapping[str, Any], cfg: HeadScoringConfig
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
        "doc_id": _jsonable(document.get("doc_id")),
        "tokens_equal": bool(tokens_equal),
        "steps": int(steps),
        "max_abs_row_diff": max(diffs) if diffs else 0.0,
        "argmax_equal": float((a == b).mean()) if steps else 1.0,
        "scores_equal": scores_equal,
        "seconds_streamed": streamed.seconds,
        "seconds_reference": reference.seconds,
    }


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
                "doc_id": _jsonable(s.doc_id),
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


def compare_variants(samples: Sequence[SampleCapture], top_k: int) -> dict[str, HeadScoringResult]:
    """Every (match, selection) combination scored from the same captures: ``"match/selection"`` ->
    :class:`HeadScoringResult`."""
    return {
        f"{m}/{s}": score_captures(samples, m, s, top_k) for m in MATCH_RULES for s in SELECTIONS
    }


# ---------------------------------------------------------------------------------- files


def head_scores_to_json_dict(sample_scores: np.ndarray) -> dict[str, list[float]]:
    """``{"l-h": [s_1, ..., s_N]}``, layer-major, from (N, L, H) per-sample scores."""
    sample_scores = np.asarray(sample_scores, dtype=np.float64)
    if sample_scores.ndim != 3:
        raise ValueError(f"per-sample scores must be (samples, layers, heads), got shape {sample_scores.shape}")
    _, layers, heads = sample_scores.shape
    return {f"{l}-{h}": [float(v) for v in sample_scores[:, l, h]] for l in range(layers) for h in range(heads)}


def write_head_scores_json(sample_scores: np.ndarray, path: str | Path) -> Path:
    """Write the original format (:func:`head_scores_to_json_dict`)."""
    path = Path(path)
    path.write_text(json.dumps(head_scores_to_json_dict(sample_scores)) + "\n", encoding="utf-8")
    return path


def _expected_shape(shape: Any) -> tuple[int, int] | None:
    if shape is None:
        return None
    if hasattr(shape, "num_layers") and hasattr(shape, "num_heads"):
        return int(shape.num_layers), int(shape.num_heads)
    try:
        layers, heads = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be (layers, heads) or a LoadedModel, got {shape!r}") from None
    return layers, heads


def validate_head_scores(scores: Any, shape: Any = None, *, source: str = "head scores") -> np.ndarray:
    """Float64 (L, H) copy of ``scores``; checks shape (``(layers, heads)`` or a LoadedModel) and
    values: :class:`HeadScoreShapeError` names both shapes, :class:`InvalidHeadScoresError` the
    first bad (layer, head)."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2:
        raise HeadScoreShapeError(f"{source} must be a (layers, heads) matrix, got shape {array.shape}")
    expected = _expected_shape(shape)
    if expected is not None and array.shape != expected:
        raise HeadScoreShapeError(
            f"{source} have {array.shape[0]} layers x {array.shape[1]} heads but the model has {expected[0]} layers x "
            f"{expected[1]} query heads: the scores belong to another model (score it with step 03, or pick the file "
            "made for this model)"
        )
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        l, h = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidHeadScoresError(
            f"{source}: head {l}-{h} has score {array[l, h]!r}; scores must be finite and >= 0 "
            f"({int(bad.sum())} bad value(s) in all). Rerun step 03 or fix the file."
        )
    return array


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeadScoreFileError(f"{path}: head {key!r} holds {value!r}, which is not a number")
    return float(value)


def _load_json_scores(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HeadScoreFileError(f"{path} is not valid JSON ({exc}); expected {{\"l-h\": [s_1, ..., s_N]}}") from exc
    if not isinstance(data, dict) or not data:
        raise HeadScoreFileError(f"{path} must hold a non-empty JSON object {{\"l-h\": [s_1, ..., s_N]}}")
    means: dict[tuple[int, int], float] = {}
    for key, values in data.items():
        parsed = _KEY.match(str(key))
        if parsed is None:
            raise HeadScoreFileError(f"{path}: key {key!r} is not of the form 'layer-head' (e.g. '0-0', '14-24')")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise HeadScoreFileError(f"{path}: head {key!r} has an empty list of scores; nothing to average")
        numbers = [_number(v, key, path) for v in values]
        bad = [v for v in numbers if not math.isfinite(v) or v < 0]
        if bad:
            raise InvalidHeadScoresError(
                f"{path}: head {key!r} has score {bad[0]!r}; scores must be finite and >= 0. Rerun step 03 or fix the file."
            )
        means[(int(parsed.group(1)), int(parsed.group(2)))] = float(np.mean(numbers))
    layers = 1 + max(l for l, _ in means)
    heads = 1 + max(h for _, h in means)
    missing = [f"{l}-{h}" for l in range(layers) for h in range(heads) if (l, h) not in means]
    if missing:
        raise HeadScoreFileError(
            f"{path}: keys cover up to {layers} layers x {heads} heads but {len(missing)} head(s) are missing "
            f"(first: {', '.join(missing[:5])}); every 'l-h' of the grid must be present"
        )
    scores = np.zeros((layers, heads), dtype=np.float64)
    for (l, h), v in means.items():
        scores[l, h] = v
    return scores


def _load_csv_scores(path: Path) -> np.ndarray:
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for unreadable files
        raise HeadScoreFileError(f"{path} is not a readable CSV ({exc})") from exc
    needed = {"layer", "head", "score"}
    if not needed.issubset(frame.columns):
        raise HeadScoreFileError(f"{path} needs columns {sorted(needed)}, has {list(frame.columns)}")
    if frame.duplicated(["layer", "head"]).any():
        raise HeadScoreFileError(f"{path} lists some (layer, head) more than once")
    layers, heads = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    if len(frame) != layers * heads:
        raise HeadScoreFileError(f"{path} has {len(frame)} rows but layers x heads = {layers} x {heads} needs {layers * heads}")
    scores = np.full((layers, heads), np.nan)
    scores[frame["layer"].to_numpy(int), frame["head"].to_numpy(int)] = frame["score"].to_numpy(float)
    return scores


def load_head_scores(path: str | Path, shape: Any = None) -> np.ndarray:
    """Head scores S (L, H) float64 from a step-03 file or an officially shipped one.

    ``.json``: the original format ``{"l-h": [s_1, ..., s_N]}``: lists of any length (each head's
    list is averaged, as the original's loader does with ``np.mean``; a bare number counts as a
    one-element list); heads are placed by their key, so the file's key order does not matter
    (the original relies on layer-major order). ``.csv``: ``head_scores.csv`` (layer, head, score).
    ``shape``: ``(layers, heads)`` or a LoadedModel to check against (None: inferred from the keys).
    Raises :class:`HeadScoreFileError`, :class:`HeadScoreShapeError`, :class:`InvalidHeadScoresError`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "head_scores.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: head scores are written by step {STEP} (notebooks/{STEP}.ipynb)")
    scores = _load_csv_scores(path) if path.suffix.lower() == ".csv" else _load_json_scores(path)
    return validate_head_scores(scores, shape, source=f"head scores in {path}")


def head_scores_frame(scores: np.ndarray) -> pd.DataFrame:
    """``head_scores.csv``: one row per head, layer-major: layer, head, score, rank (1 = highest;
    ties ranked in layer-major order, so ranks are 1..L*H without gaps)."""
    scores = validate_head_scores(scores)
    layers, heads = scores.shape
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(1, flat.size + 1)
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "score": flat,
            "rank": rank,
        }
    )


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
    paths["scoring_report.json"].write_text(json.dumps(full, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    result.token_table(samples).to_csv(paths["token_matches.csv"], index=False)
    return paths


# -------------------------------------------------------------------------------- analysis


def cumulative_share(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative share of the score mass held by the top heads (docs/method.md §4's figure).

    Heads sorted by score, descending: returns ``fractions`` = k / n and ``shares`` = (sum of the
    top k) / (sum of all), for k = 0..n (both (n + 1,)). Needs a positive total.
    """
    flat = np.sort(validate_head_scores(scores).ravel())[::-1]
    total = flat.sum()
    if not total > 0:
        raise InvalidHeadScoresError("all head scores are zero: no head ever hit a region, so there is no score mass")
    n = flat.size
    return np.arange(n + 1) / n, np.concatenate([[0.0], np.cumsum(flat) / total])


def top_share(scores: np.ndarray, fraction: float) -> float:
    """Share of the score mass held by the top ``fraction`` of heads, read off the piecewise-linear
    curve of :func:`cumulative_share` (so it is defined for any fraction, also where fraction * n
    is not an integer)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    fractions, shares = cumulative_share(scores)
    return float(np.interp(fraction, fractions, shares))


def top_heads(scores: np.ndarray, n: int = 5) -> list[tuple[int, int, float]]:
    """The ``n`` highest-scoring heads as (layer, head, score), descending (ties layer-major)."""
    scores = validate_head_scores(scores)
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    heads = scores.shape[1]
    return [(int(i // heads), int(i % heads), float(flat[i])) for i in order]


def mean_image_mass(samples: Sequence[SampleCapture]) -> np.ndarray:
    """Mean over samples and generated tokens of each head's attention mass on the image tokens,
    (L, H) float64 (samples weighted equally, like the scores)."""
    masses = [s.captured.image_mass.mean(axis=0) for s in samples if s.captured.image_mass is not None and s.captured.num_steps]
    if not masses:
        raise NoSamplesError("no captured sample recorded image attention mass (capture with an image_span)")
    return np.mean(np.stack(masses), axis=0).astype(np.float64)
