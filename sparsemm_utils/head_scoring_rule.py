"""The OCR hit rule of docs/method.md §4, on arrays: which heads look at what is being read.

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

``S[l, h]`` = mean over samples of ``s_n[l, h]``; no other normalisation. Scores are per QUERY
head on GQA models: heads of one KV group share keys but not queries.

Named variants (never on by default; the original's crude spots made explicit):

- ``match="char_box"`` (:class:`CharBoxMatch`): instead of "the one chunk that contains the token
  string", align the generated characters with the document's per-character boxes (step 01's
  ``char_coord``, step 02's ``chars``) and use the boxes of the characters the token was aligned
  to. The natural rule for a character-level tokenizer, where one character occurs in many chunks
  and the substring rule skips most tokens.
- ``selection="topk"``: a head hits when ANY of its ``top_k`` largest keys lies in R_t (the
  original's ``hit_score`` has a ``topk`` argument, called with 1); still one increment at most.

Everything here is pure: token strings, matches, selected key positions and scores in, scores
out. The generation that produces them is :mod:`sparsemm_utils.head_scoring_capture`; the files
S is saved in are :mod:`sparsemm_utils.head_scoring_files`. The checks and summaries of a score
matrix S (:func:`validate_head_scores`, :func:`cumulative_share`, :func:`top_share`,
:func:`top_heads`) are here too, since every reader of S uses them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .validate import check_choice, check_fraction, check_int

__all__ = [
    "MATCH_RULES",
    "SELECTIONS",
    "TOKEN_TEXT_MODES",
    "MATCHED",
    "END_OF_SEQUENCE",
    "NO_MATCH",
    "AMBIGUOUS",
    "EMPTY_REGION",
    "WHITESPACE",
    "UNALIGNED",
    "NO_CHAR_BOXES",
    "SKIP_REASONS",
    "PAPER_TOP_SHARE",
    "PAPER_TOP_HEADS",
    "PAPER_LAYERS",
    "HeadScoringError",
    "HeadScoringConfigError",
    "HeadScoreShapeError",
    "InvalidHeadScoresError",
    "NoSamplesError",
    "GeneratedTokens",
    "TokenMatch",
    "SubstringMatch",
    "CharBoxMatch",
    "Matcher",
    "make_matcher",
    "token_strings",
    "generated_tokens",
    "select_positions",
    "head_hits",
    "SampleScore",
    "score_sample",
    "score_attention_rows",
    "mean_over_samples",
    "validate_head_scores",
    "cumulative_share",
    "top_share",
    "top_heads",
]

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
#: docs/method.md §4: the five strongest heads (layer, head) on LLaVA-NeXT-Vicuna-7B, strongest first,
#: of its :data:`PAPER_LAYERS` text layers (docs/method.md §1).
PAPER_TOP_HEADS: tuple[tuple[int, int], ...] = ((14, 24), (15, 14), (15, 12), (21, 30), (16, 19))
PAPER_LAYERS: int = 32


# ---------------------------------------------------------------------------------- errors


class HeadScoringError(ValueError):
    """Base class of every step-03 error."""


class HeadScoringConfigError(HeadScoringError):
    """A step-03 parameter is invalid (a field of step 03's ``Config``, a rule or selection name)."""


class HeadScoreShapeError(HeadScoringError):
    """Head scores whose (layers, heads) shape does not match the model (the message names both)."""


class InvalidHeadScoresError(HeadScoringError):
    """Head scores with NaN, infinite or negative values."""


class NoSamplesError(HeadScoringError):
    """There is nothing to average: no sample was scored."""


# ---------------------------------------------------------------------------- token strings


@dataclass(frozen=True)
class GeneratedTokens:
    """The T tokens of one greedy generation.

    ``ids`` (T,) token ids; ``texts``: tau_t, the string the substring rule matches (per
    ``token_text`` mode); ``pieces``: ``tokenizer.decode([id])`` of each token (what the
    character alignment reads); ``stop``: True for end-of-sequence tokens (never scored);
    ``decoded``: the tokenizer's decoding of the non-stop ids together (None: the pieces joined).
    """

    ids: tuple[int, ...]
    texts: tuple[str, ...]
    pieces: tuple[str, ...]
    stop: tuple[bool, ...]
    decoded: str | None = None

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
        """The generated text, stop tokens left out: ``decoded`` when the tokenizer gave it (a
        SentencePiece tokenizer drops the leading space of a lone ``"▁word"`` piece, so the pieces
        joined lose the spaces between words), else the pieces joined."""
        if self.decoded is not None:
            return self.decoded
        return "".join(p for p, s in zip(self.pieces, self.stop) if not s)

    @classmethod
    def from_texts(cls, texts: Sequence[str], stop: Sequence[bool] | None = None) -> GeneratedTokens:
        """Tokens given by their strings only (tests, hand examples): ids 0..T-1, pieces = texts."""
        stop = tuple(bool(s) for s in (stop if stop is not None else [False] * len(texts)))
        return cls(tuple(range(len(texts))), tuple(texts), tuple(texts), stop)


def token_strings(tokenizer: Any, ids: Sequence[int], model_type: str, mode: str = "family") -> list[str]:
    """tau_t for each id (docs/method.md §4, step 1).

    ``mode="family"`` (the original): LLaVA-NeXT ``convert_ids_to_tokens`` (keeps the
    word-boundary marker, e.g. ``"▁the"``), Qwen ``decode([id])`` (``" the"``). ``"decode"`` and
    ``"token"`` force one of the two for every family.
    """
    check_choice("token_text", mode, TOKEN_TEXT_MODES, error=HeadScoringConfigError)
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
        decoded=tokenizer.decode([i for i in ids if i not in stop_set]),
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
    check_choice("match", name, MATCH_RULES, error=HeadScoringConfigError)
    return SubstringMatch() if name == "substring" else CharBoxMatch()


# --------------------------------------------------------------------------------- the rule


def select_positions(rows: Sequence[np.ndarray], selection: str = "argmax", top_k: int = 1) -> np.ndarray:
    """Key positions each head selects, from full attention rows (the pure form of the capture).

    ``rows``: T arrays of shape (L, H, N_t) (N_t may grow with t). Returns int64 (T, L, H, k):
    ``"argmax"``: k = 1, the first maximum on ties (``np.argmax``, as ``torch.argmax``);
    ``"topk"``: the ``top_k`` largest, descending, ties by lower position (a stable sort;
    ``torch.topk`` does not promise an order for ties). Rows shorter than k are padded with -1.
    """
    check_choice("selection", selection, SELECTIONS, error=HeadScoringConfigError)
    k = 1 if selection == "argmax" else check_int("top_k", top_k, 1, error=HeadScoringConfigError)
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


# ------------------------------------------------------------------------- checks and summaries of S


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
    fraction = check_fraction("fraction", fraction)
    fractions, shares = cumulative_share(scores)
    return float(np.interp(fraction, fractions, shares))


def top_heads(scores: np.ndarray, n: int = 5) -> list[tuple[int, int, float]]:
    """The ``n`` highest-scoring heads as (layer, head, score), descending (ties layer-major)."""
    scores = validate_head_scores(scores)
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    heads = scores.shape[1]
    return [(int(i // heads), int(i % heads), float(flat[i])) for i in order]


