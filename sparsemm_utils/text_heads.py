"""Text-copy heads: the hit rule of docs/method.md §4 applied to copying text from the prompt.

SparseMM scores a head by whether its strongest attention lands on the image region of the token
being read. The same question can be asked of the language model on its own, with no image: give
the page's text in the prompt, ask for it back, and score a head when its strongest attention
lands on the prompt position the current answer token is copied from. Comparing the two score
matrices (:mod:`sparsemm_utils.head_comparison`) asks whether the visual heads are the language
model's own copy heads. The paper reports nothing on text heads; this is this project's addition
(docs/method.md §4, "Text-copy heads").

For one step-01 document (sample n):

1. **The chat.** The page's text (its chunks in reading order, lines joined by ``\\n``:
   :func:`page_text`) is the user turn, followed by ``"\\n\\n"`` and :data:`COPY_INSTRUCTION`;
   no image. The system turn is the one the OCR prompt gets
   (:func:`~sparsemm_utils.prompts.resolve_system_prompt`: the model's own default, else the
   family's). The same text is the assistant's answer, teacher-forced: the whole conversation is
   rendered by the processor's chat template (so the answer sits where the model's answers sit,
   with the family's separators) and run in ONE forward pass, ``eager`` attention in the language
   model with ``output_attentions=True`` (:func:`copy_argmax`).
2. **The source of an answer token.** The rendered chat is tokenized once with character
   offsets. Source tokens are the tokens overlapping the user's copy of the text; answer tokens
   those overlapping the assistant's copy (special tokens and zero-width tokens belong to
   neither). An answer token whose id occurs exactly once among the source tokens has that
   position as its source; one whose id occurs several times there is skipped as
   :data:`DUPLICATE` (a space or a repeated character in a character-level vocabulary), one whose
   id does not occur there as :data:`NOT_IN_SOURCE` (the context tokenized it differently, e.g.
   the first word after another separator). Both are counted (:func:`align_answer`).
3. **The hit.** For every layer l and query head h: j* = argmax over ALL key positions of the
   attention row of the query that produced the answer token, i.e. the row of the position just
   before it (for the first answer token, the last token of the assistant header; for each later
   one, the answer token before it). This is the row the visual rule reads: there the first
   generated token comes from the last prompt position and each later token from the decode step
   whose input is the token before, attending to every earlier position (docs/method.md §4, step
   3); teacher forcing computes the same rows in one causal pass. A head scores 1 when j* is the
   source position: the visual rule with a one-position region, ``1 / |R_t| = 1``
   (:func:`~sparsemm_utils.head_scoring_rule.score_sample` applies it). ``s_n[l, h]`` = the
   number of hits; ``S = mean_n s_n``. :meth:`TextHeadResult.hit_rate` divides the hits by the
   scored tokens instead (the fraction of copied tokens on which the head looks at the source).

Memory: the eager pass materialises the (H, N, N) attention of every layer at once, N the chat's
length in tokens (a page of a few hundred tokens: tens of MB for a 135M model).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention_hooks import text_attention
from .document_dataset import reading_text
from .head_comparison import concentration
from .head_scoring_capture import jsonable
from .head_scoring_rule import (
    MATCHED,
    HeadScoringError,
    NoSamplesError,
    TokenMatch,
    mean_over_samples,
    score_sample,
    top_heads,
)
from .prompts import DEFAULT_SYSTEM_PROMPT, build_messages, resolve_system_prompt
from .validate import check_int

__all__ = [
    "COPY_INSTRUCTION",
    "SCORED",
    "DUPLICATE",
    "NOT_IN_SOURCE",
    "TEXT_SKIP_REASONS",
    "CopyHeadsReference",
    "SMOLLM2_COPY_HEADS",
    "TextHeadsError",
    "page_text",
    "copy_messages",
    "overlapping_tokens",
    "align_answer",
    "CopyChat",
    "build_copy_chat",
    "rows_argmax",
    "copy_argmax",
    "CopySample",
    "score_copy_sample",
    "TextHeadResult",
    "score_copy_documents",
]

#: The instruction after the page's text in the user turn.
COPY_INSTRUCTION = "Copy the text above exactly."

#: Reason of an answer token that was scored.
SCORED = "scored"
#: Why an answer token was not scored.
DUPLICATE = "duplicate_in_source"  # its id occurs more than once among the source tokens
NOT_IN_SOURCE = "not_in_source"  # its id does not occur among the source tokens
TEXT_SKIP_REASONS: tuple[str, ...] = (DUPLICATE, NOT_IN_SOURCE)


@dataclass(frozen=True)
class CopyHeadsReference:
    """A text-copy measurement made outside this run, to set beside it: ``model``
    (``layers`` x ``heads``), ``documents`` copied, the share of the score held by the top 5% /
    10% of heads, and the strongest heads as (layer, head, hit rate or None), strongest first."""

    model: str
    source: str
    layers: int
    heads: int
    documents: int
    top_share: Mapping[float, float]
    top_heads: tuple[tuple[int, int, float | None], ...]

    @property
    def label(self) -> str:
        """How the numbers are labelled wherever they are shown (never as the paper's)."""
        return f"measured on {self.model}'s own copy heads ({self.source})"

    def heads_text(self) -> str:
        """``"L18H6 (0.75), L17H4 (0.70), ..., L17H5"``."""
        return ", ".join(f"L{l}H{h}" + (f" ({r:.2f})" if r is not None else "") for l, h, r in self.top_heads)


#: Issue 20's measurement on SmolLM2-135M, the study model's language model alone: 24 random
#: documents of words and codes, "Copy the text above exactly.", teacher-forced, eager attention,
#: a target token scoring for a head when the head's argmax lands on its unique source position.
SMOLLM2_COPY_HEADS = CopyHeadsReference(
    model="SmolLM2-135M",
    source="issue 20",
    layers=30,
    heads=9,
    documents=24,
    top_share={0.05: 0.67, 0.10: 0.83},
    top_heads=((18, 6, 0.75), (17, 4, 0.70), (23, 2, 0.56), (17, 5, None), (17, 3, None), (18, 7, None)),
)


class TextHeadsError(HeadScoringError):
    """The text-copy chat cannot be built or scored (template, tokenizer, model output)."""


# ------------------------------------------------------------------------------- the chat


def page_text(document: Mapping[str, Any]) -> str:
    """The page's text from a step-01 document (its ``2_coord`` chunks in reading order, lines
    joined by ``\\n``: :func:`~sparsemm_utils.document_dataset.reading_text`)."""
    if "2_coord" not in document:
        raise TextHeadsError(
            f"document {document.get('doc_id')!r} has no '2_coord' chunks: pass the step-01 documents "
            "(steps.ocr_annotation.DOCUMENTS.read(run_dir))"
        )
    return reading_text(document["2_coord"] or [])


def copy_messages(
    text: str,
    model_type: str,
    system_prompt: str | None,
    *,
    instruction: str = COPY_INSTRUCTION,
) -> list[dict]:
    """The copy chat: [system], user ``text + "\\n\\n" + instruction`` (no image), assistant
    ``text``. ``system_prompt`` is used as given (resolve it first)."""
    messages = build_messages(f"{text}\n\n{instruction}", model_type, system_prompt, image=False)
    return [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}]


def overlapping_tokens(offsets: Sequence[Sequence[int]], span: tuple[int, int], skip: Iterable[int] = ()) -> np.ndarray:
    """Positions (int64, ascending) of the tokens whose character range [s, e) overlaps ``span``
    = [start, stop); zero-width tokens and positions in ``skip`` (special tokens) left out."""
    start, stop = span
    skipped = set(int(p) for p in skip)
    return np.asarray(
        [p for p, (s, e) in enumerate(offsets) if e > s and s < stop and e > start and p not in skipped], dtype=np.int64
    )


def align_answer(
    ids: Sequence[int], source_positions: Sequence[int], answer_positions: Sequence[int]
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The source position of each answer token (step 2 of the module docstring).

    ``ids`` (N,): the chat's token ids; ``source_positions`` (S,) / ``answer_positions`` (T,):
    absolute positions, every answer position after every source position. Returns ``targets``
    int64 (T,): the source position, -1 when skipped; ``reasons`` (T,): :data:`SCORED`,
    :data:`DUPLICATE` or :data:`NOT_IN_SOURCE`.
    """
    ids = np.asarray(ids, dtype=np.int64)
    source = np.asarray(source_positions, dtype=np.int64)
    answer = np.asarray(answer_positions, dtype=np.int64)
    for name, positions in (("source", source), ("answer", answer)):
        if positions.ndim != 1 or (positions.size and (positions.min() < 0 or positions.max() >= ids.size)):
            raise TextHeadsError(f"{name} positions must be a 1-d array of positions in 0..{ids.size - 1}")
    if source.size and answer.size and answer.min() <= source.max():
        raise TextHeadsError(
            f"the answer (from position {int(answer.min())}) must come after the source (up to position "
            f"{int(source.max())}): a query can only look back"
        )
    counts = Counter(int(i) for i in ids[source])
    first = {}
    for position in source:
        first.setdefault(int(ids[position]), int(position))
    targets = np.full(answer.size, -1, dtype=np.int64)
    reasons = []
    for t, position in enumerate(answer):
        token = int(ids[position])
        if counts.get(token, 0) == 1:
            targets[t] = first[token]
            reasons.append(SCORED)
        else:
            reasons.append(DUPLICATE if counts.get(token, 0) > 1 else NOT_IN_SOURCE)
    return targets, tuple(reasons)


@dataclass(frozen=True)
class CopyChat:
    """One document's teacher-forced copy chat, tokenized.

    ``input_ids`` int64 (N,); ``source_positions`` (S,) and ``answer_positions`` (T,): absolute
    positions of the user's and the assistant's copy of ``text``; ``targets`` int64 (T,): each
    answer token's source position (-1: skipped); ``reasons`` (T,): why (see :func:`align_answer`).
    """

    doc_id: Any
    text: str
    input_ids: np.ndarray
    source_positions: np.ndarray
    answer_positions: np.ndarray
    targets: np.ndarray
    reasons: tuple[str, ...]

    @property
    def query_positions(self) -> np.ndarray:
        """The query row that produced each answer token: the position before it, (T,)."""
        return self.answer_positions - 1


def build_copy_chat(
    loaded: Any,
    text: str,
    *,
    doc_id: Any = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = COPY_INSTRUCTION,
) -> CopyChat:
    """The copy chat of ``text`` for ``loaded`` (a :class:`~sparsemm_utils.models.LoadedModel`),
    rendered by its processor's chat template and tokenized by its (fast) tokenizer with the
    tokenizer's own special tokens, as :func:`~sparsemm_utils.prompts.build_inputs` does."""
    if not isinstance(text, str) or not text.strip():
        raise TextHeadsError(f"document {doc_id!r}: the text to copy must be a non-empty string, got {text!r}")
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise TextHeadsError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the alignment needs character offsets "
            "(return_offsets_mapping); load the model's tokenizer.json"
        )
    system = resolve_system_prompt(loaded, loaded.model_type, system_prompt)
    messages = copy_messages(text, loaded.model_type, system, instruction=instruction)
    rendered = loaded.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    user = f"{text}\n\n{instruction}"
    user_start = rendered.find(user)
    answer_start = rendered.find(text, user_start + len(user)) if user_start >= 0 else -1
    if answer_start < 0:
        raise TextHeadsError(
            f"document {doc_id!r}: the chat template did not render the user text and the answer verbatim "
            f"({rendered[:200]!r}...): the copy measurement needs a template that keeps message text as given"
        )
    encoding = tokenizer(rendered, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    special_ids = set(tokenizer.all_special_ids)
    special = [p for p, token in enumerate(ids) if int(token) in special_ids]
    offsets = encoding["offset_mapping"]
    source = overlapping_tokens(offsets, (user_start, user_start + len(text)), special)
    answer = overlapping_tokens(offsets, (answer_start, answer_start + len(text)), special)
    if source.size == 0 or answer.size == 0:
        raise TextHeadsError(f"document {doc_id!r}: no token covers the source or the answer text {text[:60]!r}")
    targets, reasons = align_answer(ids, source, answer)
    return CopyChat(doc_id, text, ids, source, answer, targets, reasons)


def rows_argmax(attentions: Sequence[torch.Tensor], query_positions: Sequence[int], *, heads: int | None = None) -> np.ndarray:
    """j* of the given query rows: int64 (T, L, H), the argmax over ALL N key positions of row
    ``query_positions[t]`` of each layer's attention (the first maximum on ties, as
    ``torch.argmax``; masked future keys have weight 0 and never win).

    ``attentions``: L tensors (1, H, N, N), e.g. ``output_attentions=True``'s; ``heads``: the
    expected H (None: not checked)."""
    if not attentions:
        raise TextHeadsError("no attention tensors given (run the model with output_attentions=True)")
    first = tuple(attentions[0].shape)
    for layer, a in enumerate(attentions):
        shape = tuple(a.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[2] != shape[3] or shape != first or (heads is not None and shape[1] != heads):
            raise TextHeadsError(
                f"layer {layer}'s attention has shape {shape}; expected (1, {heads or 'H'}, N, N) in every layer "
                f"(batch 1, query heads, queries, keys; layer 0 has {first})"
            )
    rows = torch.as_tensor(np.asarray(query_positions, dtype=np.int64), device=attentions[0].device)
    if rows.ndim != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= first[2])):
        raise TextHeadsError(f"query positions must be a 1-d list of rows in 0..{first[2] - 1}")
    argmax = torch.stack([a[0, :, rows, :].float().argmax(dim=-1) for a in attentions])  # (L, H, T)
    return argmax.permute(2, 0, 1).cpu().numpy().astype(np.int64)


def copy_argmax(loaded: Any, chat: CopyChat) -> np.ndarray:
    """j* for every answer token, layer and query head: int64 (T, L, H) (:func:`rows_argmax` at
    ``chat.query_positions``). One teacher-forced forward, eager attention in the language model
    with ``output_attentions=True`` (its implementation is restored afterwards)."""
    model = loaded.model
    input_ids = torch.as_tensor(chat.input_ids, device=model.device)[None]
    with torch.no_grad(), text_attention(model, "eager"):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True, use_cache=False)
    attentions = out.attentions or ()
    if len(attentions) != loaded.num_layers:
        raise TextHeadsError(
            f"{type(model).__name__} returned attentions for {len(attentions)} layers; its language model has "
            f"{loaded.num_layers} (it must run eager attention with output_attentions=True)"
        )
    return rows_argmax(attentions, chat.query_positions, heads=loaded.num_heads)


# ---------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CopySample:
    """One document's copy chat, the j* of its answer tokens (T, L, H), its hits (T, L, H) bool
    and s_n (L, H) float64 (hits summed over scored tokens)."""

    chat: CopyChat
    argmax: np.ndarray
    hits: np.ndarray
    scores: np.ndarray
    seconds: float

    @property
    def tokens_scored(self) -> int:
        return int(np.count_nonzero(self.chat.targets >= 0))


def score_copy_sample(chat: CopyChat, argmax: np.ndarray, seconds: float = 0.0) -> CopySample:
    """The rule on one sample: a scored token t is a region of one position, its source;
    ``argmax`` (T, L, H) from :func:`copy_argmax` (step 3 of the module docstring)."""
    argmax = np.asarray(argmax, dtype=np.int64)
    if argmax.ndim != 3 or argmax.shape[0] != chat.targets.size:
        raise TextHeadsError(
            f"argmax must be (answer tokens, layers, heads) with {chat.targets.size} tokens, got shape {argmax.shape}"
        )
    matches = [
        TokenMatch(MATCHED, np.asarray([target], dtype=np.int64)) if target >= 0 else TokenMatch(reason)
        for target, reason in zip(chat.targets, chat.reasons)
    ]
    scored = score_sample(matches, argmax[..., None])
    return CopySample(chat, argmax, scored.hits, scored.scores, float(seconds))


@dataclass
class TextHeadResult:
    """Text-copy scores over samples: ``samples`` (one :class:`CopySample` each, in document
    order) and the documents left out because they hold no text (``doc_ids_without_text``)."""

    samples: list[CopySample]
    doc_ids_without_text: list[Any]
    instruction: str = COPY_INSTRUCTION

    @property
    def sample_scores(self) -> np.ndarray:
        """s_n (N, L, H) float64: hits per sample (the rule with |R_t| = 1)."""
        if not self.samples:
            raise NoSamplesError("no document was scored for text-copy heads")
        return np.stack([s.scores for s in self.samples])

    @property
    def scores(self) -> np.ndarray:
        """S (L, H): the mean over samples of the hits."""
        return mean_over_samples(self.sample_scores)

    @property
    def doc_ids(self) -> list[Any]:
        return [s.chat.doc_id for s in self.samples]

    @property
    def tokens_scored(self) -> int:
        return sum(s.tokens_scored for s in self.samples)

    def hit_rate(self) -> np.ndarray:
        """(L, H) float64: each head's hits over all samples / the scored tokens of all samples
        (zeros when no token was scored)."""
        hits = np.sum([s.hits.sum(axis=0) for s in self.samples], axis=0).astype(np.float64)
        return hits / self.tokens_scored if self.tokens_scored else np.zeros_like(hits)

    def reason_counts(self) -> dict[str, int]:
        """Answer tokens per reason: :data:`SCORED` and every skip reason (zeros included)."""
        counts = Counter(r for s in self.samples for r in s.chat.reasons)
        return {SCORED: counts.get(SCORED, 0), **{r: counts.get(r, 0) for r in TEXT_SKIP_REASONS}}

    def summary(self) -> dict[str, Any]:
        """Counts, the strongest heads (score S and hit rate) and the concentration: the
        ``text_heads`` part of step 03's ``scoring_report.json``."""
        counts = self.reason_counts()
        scores = self.scores
        rate = self.hit_rate()
        shares = concentration(scores)
        return {
            "instruction": self.instruction,
            "samples": len(self.samples),
            "doc_ids_without_text": [jsonable(d) for d in self.doc_ids_without_text],
            "answer_tokens": sum(counts.values()),
            "tokens_scored": counts[SCORED],
            "tokens_skipped": {r: counts[r] for r in TEXT_SKIP_REASONS},
            "samples_with_no_scored_token": sum(s.tokens_scored == 0 for s in self.samples),
            "score_total": float(scores.sum()),
            "top_heads": [
                {"layer": l, "head": h, "score": s, "hit_rate": float(rate[l, h])}
                for l, h, s in (top_heads(scores, 6) if shares else [])
            ],
            "top_5pct_share": shares[0.05] if shares else None,
            "top_10pct_share": shares[0.10] if shares else None,
            "seconds": float(sum(s.seconds for s in self.samples)),
        }


def score_copy_documents(
    loaded: Any,
    documents: Sequence[Mapping[str, Any]],
    n_samples: int | None = None,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str = COPY_INSTRUCTION,
    progress: bool = True,
) -> TextHeadResult:
    """Text-copy scores of the first ``n_samples`` step-01 documents (None: all), in order; a
    document with no text is left out and listed. Deterministic: no sampling anywhere."""
    if n_samples is not None:
        check_int("n_samples (or None for all documents)", n_samples, 1, error=TextHeadsError)
    n = len(documents) if n_samples is None else min(n_samples, len(documents))
    if n == 0:
        raise NoSamplesError("there are no documents to copy: step 01 produced an empty dataset")
    iterator: Iterable[int] = range(n)
    if progress:
        iterator = tqdm(iterator, desc="text-copy heads", total=n)
    samples, without_text = [], []
    for i in iterator:
        document = documents[i]
        text = page_text(document)
        if not text.strip():
            without_text.append(document.get("doc_id"))
            continue
        start = time.perf_counter()
        chat = build_copy_chat(loaded, text, doc_id=document.get("doc_id"), system_prompt=system_prompt, instruction=instruction)
        argmax = copy_argmax(loaded, chat)
        samples.append(score_copy_sample(chat, argmax, time.perf_counter() - start))
    if not samples:
        raise NoSamplesError(f"none of the {n} documents holds text to copy (doc_ids {without_text[:5]}...)")
    return TextHeadResult(samples, without_text, instruction)
