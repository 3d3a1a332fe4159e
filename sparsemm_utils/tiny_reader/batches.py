"""Training batches of the reader: token labels, the auxiliary heads' targets, and the
collated batches of every training step.

A batch (:func:`collate`) holds the chat of :func:`sparsemm_utils.prompts.build_inputs` (system
prompt, image, prompt) followed by the answer and ``<|im_end|>``; ``labels`` keep the answer
tokens and the closing ``<|im_end|>`` only (``-100`` elsewhere: loss on the answer only), and
``aux_labels`` give each visual token the character drawn inside it (0 = no character), for the
reader's auxiliary glyph loss; ``pointer_labels`` and ``key_labels`` are the targets of the
pointer and key heads (:class:`~sparsemm_utils.tiny_reader.model.AuxiliaryHeads`).

:class:`StepBatches` builds the batch of each training step from the curriculum
(:func:`~sparsemm_utils.tiny_reader.curriculum.step_samples`) through the faster, bit-identical
data path (:mod:`~sparsemm_utils.tiny_reader.fast_pixels`, one token mapper,
:func:`~sparsemm_utils.reader_tasks.memoized_document_lines`); :func:`validation_batches` those
of the training monitor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from sparsemm_utils.patch_mapping import mapper_from_processor
from sparsemm_utils.prompts import build_messages
from sparsemm_utils.reader_tasks import (
    READER_CHARSET,
    TASK_TYPES,
    VALIDATION_SEED,
    Line,
    ReaderQuestion,
    ReaderTaskError,
    coord_box,
    document_lines,
    memoized_document_lines,
    questions_for_document,
)
from sparsemm_utils.tiny_reader.config import TrainConfig
from sparsemm_utils.tiny_reader.curriculum import step_samples
from sparsemm_utils.tiny_reader.fast_pixels import with_lookup_pixels

__all__ = [
    "CollationError",
    "char_classes",
    "visual_char_labels",
    "answer_char_boxes",
    "answer_pointer_labels",
    "key_pointer_label",
    "collate",
    "StepBatches",
    "validation_batches",
]


class CollationError(ReaderTaskError):
    """A batch cannot be built (empty batch, wrong processor, inconsistent prompt layout)."""


def char_classes(charset: str = READER_CHARSET) -> dict[str, int]:
    """Class ids of the auxiliary glyph loss: 0 = no character, then ``charset`` in order."""
    return {c: i for i, c in enumerate(charset, start=1)}


def visual_char_labels(doc: Mapping[str, Any], mapper: Any, classes: Mapping[str, int]) -> np.ndarray:
    """The character drawn in each visual token of ``doc``'s image, ``(grid_h * grid_w,)`` int64,
    row-major (the order of the ``<|image_pad|>`` tokens, docs/method.md §3).

    A token holds class 0 when no character box maps to it, ``classes[char]`` when exactly one
    box maps to it and that box maps to it alone, and -100 (ignored by the loss) otherwise
    (boxes over several tokens or tokens under several boxes, impossible on grid pages, or a
    character outside ``classes``). ``mapper``: a
    :class:`~sparsemm_utils.patch_mapping.QwenVLPatchMapper` with the processor's geometry."""
    width, height = doc["image"].size
    labels = np.zeros(mapper.num_tokens(width, height), dtype=np.int64)
    hits = np.zeros_like(labels)
    for entry in doc.get("char_coord") or []:
        positions = mapper.map_box(coord_box(entry["coord"]), width=width, height=height)
        hits[positions] += 1
        if len(positions) == 1 and entry["char"] in classes:
            labels[positions[0]] = classes[entry["char"]]
        else:
            labels[positions] = -100
    labels[hits > 1] = -100
    return labels


def _text_char_boxes(line: Line, text: str) -> list[tuple[float, float, float, float] | None]:
    """The box of each character of ``text``, a suffix of ``line.text`` (``None`` for spaces)."""
    if not line.text.endswith(text):
        raise ReaderTaskError(
            f"the answer {text!r} is not read from the line {line.text!r} its question names; build questions with "
            "ocr_question / line_question / value_question on the same document"
        )
    skipped = sum(1 for c in line.text[: len(line.text) - len(text)] if c != " ")
    boxes = iter(line.char_boxes[skipped:])
    return [None if c == " " else next(boxes) for c in text]


def answer_char_boxes(doc: Mapping[str, Any], question: ReaderQuestion) -> list[tuple[float, float, float, float] | None]:
    """Where each character of ``question.answer`` is drawn: one entry per character, the box
    ``(x0, y0, x1, y1)`` of that very glyph on the page, ``None`` for a space or a line break
    (drawn nowhere). ``ocr`` answers walk every line, ``line`` answers line ``detail["line"]``,
    ``value`` answers the words after the key on line ``detail["line"]``.

    Worked example: on a page whose second line is ``"K7 93A"``, "Value of K7?" answers
    ``"93A"`` and this returns the boxes of the line's 3rd, 4th and 5th glyphs.
    Raises :class:`ReaderTaskError` for a document without character boxes (``char_coord``)."""
    lines = document_lines(doc)
    if any(l.char_boxes is None for l in lines):
        raise ReaderTaskError(
            "the document has no character boxes for every line ('char_coord'): answer pointers need a "
            "step-01 grid document"
        )
    if question.task != "ocr":
        k = int(question.detail.get("line", 0))
        if not 1 <= k <= len(lines):
            raise ReaderTaskError(
                f"the question names line {k} but the document has {len(lines)} lines; build questions on the same document"
            )
        return _text_char_boxes(lines[k - 1], question.answer)
    if question.answer != "\n".join(l.text for l in lines):
        raise ReaderTaskError(
            f"the answer {question.answer!r} is not this document's OCR text; build questions with ocr_question on the same document"
        )
    out: list[tuple[float, float, float, float] | None] = []
    for i, line in enumerate(lines):
        out += ([None] if i else []) + _text_char_boxes(line, line.text)
    return out


def answer_pointer_labels(doc: Mapping[str, Any], question: ReaderQuestion, mapper: Any, *, blanks: bool = False) -> np.ndarray:
    """The visual token to read each answer token from: ``(len(answer) + 1,)`` int64, one entry
    per answer character and a last one for the closing ``<|im_end|>``; the targets of the
    reader's auxiliary *pointer* loss (:class:`sparsemm_utils.tiny_reader.model.AuxiliaryHeads`).

    A drawn character points at the row-major index (``<|image_pad|>`` order) of the one token its
    glyph's box maps to (-100 for a glyph over several tokens: none on grid pages). A space, a
    line break and the closing ``<|im_end|>`` are drawn nowhere: -100, or with ``blanks`` the
    token right of the previous glyph (the blank cell that shows the word or line has ended),
    -100 when that glyph is in the last column or has no token of its own.

    Worked example (8 x 4 page, tokens ``row * 8 + col``; ``"CD EF"`` on row 2 from column 3):
    ``[19, 20, -100, 22, 23, -100]``; with ``blanks`` ``[19, 20, 21, 22, 23, -100]`` (F sits in
    the last column, so the end has no cell to its right)."""
    width, height = doc["image"].size
    out = np.full(len(question.answer) + 1, -100, dtype=np.int64)
    for i, box in enumerate(answer_char_boxes(doc, question)):
        if box is not None:
            positions = mapper.map_box(box, width=width, height=height)
            if len(positions) == 1:
                out[i] = int(positions[0])
    if blanks:
        grid_w = int(mapper.describe(width, height)["grid_w"])
        previous = -100
        for i, ch in enumerate([*question.answer, None]):  # None: the closing <|im_end|>
            if ch is None or ch in " \n":
                out[i] = previous + 1 if previous >= 0 and previous % grid_w != grid_w - 1 else -100
            else:
                previous = int(out[i])
    return out


def key_pointer_label(doc: Mapping[str, Any], question: ReaderQuestion, mapper: Any) -> int:
    """The visual token that shows the last character of a ``value`` question's key: the row-major
    index (``<|image_pad|>`` order) of the one token its glyph's box maps to, -100 for a glyph
    over several tokens (none on grid pages). The target of the reader's auxiliary *key pointer*
    loss (:class:`sparsemm_utils.tiny_reader.model.AuxiliaryHeads`): the prompt steps after the key name the
    row the key was found on, before the answer starts.

    Worked example (8 x 4 page, tokens ``row * 8 + col``; ``"K7 93A"`` on row 1 from column 0):
    "Value of K7?" -> the ``7`` at column 1 -> ``9``. Raises :class:`ReaderTaskError` for other
    tasks and for documents without character boxes."""
    if question.task != "value":
        raise ReaderTaskError(f"key pointers are defined for value questions only, got a {question.task!r} question")
    lines = document_lines(doc)
    k = int(question.detail.get("line", 0))
    key = question.detail.get("key")
    if not 1 <= k <= len(lines) or not lines[k - 1].words or lines[k - 1].words[0] != key:
        raise ReaderTaskError(f"the question's key {key!r} does not start line {k} of this document; build it with value_question on the same document")
    boxes = lines[k - 1].char_boxes
    if boxes is None:
        raise ReaderTaskError("the document has no character boxes for the key's line ('char_coord'): key pointers need a step-01 grid document")
    width, height = doc["image"].size
    positions = mapper.map_box(boxes[len(key) - 1], width=width, height=height)
    return int(positions[0]) if len(positions) == 1 else -100


def collate(
    processor: Any,
    samples: Sequence[tuple[Mapping[str, Any], ReaderQuestion]],
    *,
    classes: Mapping[str, int] | None = None,
    mapper: Any = None,
    pointers: bool = False,
    pointer_blanks: bool = False,
    key_pointers: bool = False,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch of ``(document, question)`` pairs for a Qwen2-VL reader.

    Each sequence is the chat of :func:`sparsemm_utils.prompts.build_inputs` (system prompt,
    image, ``question.prompt``, generation prompt) followed by ``question.answer`` and
    ``<|im_end|>``. Returns the processor's tensors (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``: (B, L); ``pixel_values``: (patches, 1176); ``image_grid_thw``: (B, 3))
    plus ``labels`` (B, L): the token ids of the answer and its closing ``<|im_end|>``, -100
    elsewhere (padding included); ``prefix_len``: a 0-d tensor, the number of leading tokens
    shared by every sequence (everything before the first image token); and, when ``classes``
    is given, ``aux_labels`` (sum of visual tokens,): :func:`visual_char_labels` of each image,
    concatenated in batch order (``mapper``: default, the processor's own geometry); and, when
    ``pointers`` is set, ``pointer_labels`` (B, L): at position ``t`` whose next token ``t + 1``
    is an answer token, the visual token it is read from (:func:`answer_pointer_labels`, with
    ``blanks=pointer_blanks``; row-major within that sample's image), -100 elsewhere (position
    ``t`` predicts token ``t + 1``)."""
    if not samples:
        raise CollationError("cannot collate an empty batch")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise CollationError(f"collate needs a Qwen2-VL processor (image processor + tokenizer), got {type(processor).__name__}")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts, images, prompts = [], [], []
    chats: dict[str, str] = {}  # a batch repeats its task's few prompts: render each chat once
    for doc, q in samples:
        if q.prompt not in chats:
            chats[q.prompt] = processor.apply_chat_template(build_messages(q.prompt, "qwen2_vl"), add_generation_prompt=True, tokenize=False)
        prompt = chats[q.prompt]
        prompts.append(prompt)
        texts.append(prompt + q.answer + "<|im_end|>")
        image = doc["image"]
        if not isinstance(image, Image.Image):
            raise CollationError(f"document {doc.get('doc_id')} has no decoded PIL image (got {type(image).__name__})")
        images.append(image.convert("RGB"))
    answer_ids = [ids + [eos] for ids in tokenizer([q.answer for _, q in samples], add_special_tokens=False)["input_ids"]]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    lengths = mask.sum(dim=1).tolist()
    for i, (n, ans) in enumerate(zip(lengths, answer_ids)):
        tail = ids[i, n - len(ans) : n].tolist()
        if tail != ans:
            raise CollationError(
                f"sample {i}: the last {len(ans)} tokens {tail} are not the answer's {ans}; the chat template or "
                "tokenizer does not end the sequence with the answer"
            )
        labels[i, n - len(ans) : n] = ids[i, n - len(ans) : n]
    image_id = processor.image_token_id
    firsts = (ids == image_id).int().argmax(dim=1)
    if not bool((firsts == firsts[0]).all()) or not bool((ids[:, : int(firsts[0])] == ids[0, : int(firsts[0])]).all()):
        raise CollationError("the sequences do not share the tokens before the image (different system prompts?)")
    out = dict(batch)
    out["labels"] = labels
    out["prefix_len"] = torch.tensor(int(firsts[0]))
    if (classes is not None or pointers or key_pointers) and mapper is None:
        mapper = mapper_from_processor(processor, "qwen2_vl")
    if pointers:
        pointer = torch.full_like(ids, -100)
        for i, ((doc, q), n, ans) in enumerate(zip(samples, lengths, answer_ids)):
            start = n - len(ans)  # first answer token; the character tokenizer gives one token per character
            if len(ans) - 1 != len(q.answer):
                raise CollationError(f"sample {i}: answer pointers need one token per answer character, got {len(ans) - 1} for {q.answer!r}")
            pointer[i, start - 1 : n - 1] = torch.from_numpy(answer_pointer_labels(doc, q, mapper, blanks=pointer_blanks))
        out["pointer_labels"] = pointer
    if key_pointers:
        key_labels = torch.full_like(ids, -100)
        for i, ((doc, q), n, ans) in enumerate(zip(samples, lengths, answer_ids)):
            if q.task != "value":
                continue
            start = n - len(ans)
            # the key, the rest of the question and the generation prompt end the prompt
            key, chat = str(q.detail["key"]), prompts[i]
            tail = tokenizer(chat[chat.rindex(q.prompt) + q.prompt.rindex(key) :], add_special_tokens=False)["input_ids"]
            key_end = start - len(tail) + len(tokenizer(key, add_special_tokens=False)["input_ids"]) - 1
            if ids[i, start - len(tail) : start].tolist() != tail:
                raise CollationError(f"sample {i}: the prompt does not end with the key {key!r} of {q.prompt!r} and the generation prompt")
            key_labels[i, key_end : start - 1] = key_pointer_label(doc, q, mapper)
        out["key_labels"] = key_labels
    if classes is not None:
        aux = [visual_char_labels(doc, mapper, classes) for doc, _ in samples]
        counts = (batch["image_grid_thw"].prod(dim=1) // 4).tolist()
        if [len(a) for a in aux] != counts:
            raise CollationError(f"visual token counts {[len(a) for a in aux]} disagree with the processor's {counts}")
        out["aux_labels"] = torch.from_numpy(np.concatenate(aux))
    return out


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset over step indices: item ``s`` is the collated batch of step ``s``
    (so a DataLoader worker can build batches ahead of the optimizer, deterministically).
    Pixels go through :func:`~sparsemm_utils.tiny_reader.fast_pixels.with_lookup_pixels` (the same
    ``pixel_values``, faster) and the token mapper is built once."""

    def __init__(self, cfg: TrainConfig, processor: Any, classes: Mapping[str, int]) -> None:
        self.cfg, self.processor, self.classes = cfg, with_lookup_pixels(processor), classes
        self.mapper = mapper_from_processor(processor, "qwen2_vl")

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        with memoized_document_lines():
            return collate(
                self.processor, step_samples(self.cfg, step), classes=self.classes, mapper=self.mapper,
                pointers=self.cfg.pointer_weight > 0, pointer_blanks=self.cfg.pointer_blanks, key_pointers=self.cfg.key_weight > 0,
            )


def validation_batches(cfg: TrainConfig, processor: Any, classes: Mapping[str, int]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The monitor's batches: pages ``0 .. validation_docs - 1`` of :data:`~sparsemm_utils.reader_tasks.VALIDATION_SEED`, one
    question per task they can host, batched per task."""
    by_task: dict[str, list] = {t: [] for t in TASK_TYPES}
    for index in range(cfg.validation_docs):
        doc = cfg.doc_spec.render(VALIDATION_SEED, index)
        for q in questions_for_document(doc, TASK_TYPES, seed=VALIDATION_SEED):
            by_task[q.task].append((doc, q))
    return {
        t: [collate(processor, pairs[i : i + cfg.batch_size], classes=classes) for i in range(0, len(pairs), cfg.batch_size)]
        for t, pairs in by_task.items()
        if pairs
    }
