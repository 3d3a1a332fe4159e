"""The study model's pages, questions and training batches.

Pages are the project's grid documents (:class:`~sparsemm_utils.reader_tasks.ReaderDocSpec`):
one glyph per 28 px cell, here 12 x 8 cells (336 x 224 px, the study model's one page size), 3-6
lines of 1-3 words of 1-4 characters. Questions are the reader tasks of
:mod:`sparsemm_utils.reader_tasks` (read everything with the study's OCR prompt, read line k,
value of a key), so step 05's offline benchmark asks the same kinds of question.

:func:`cell_targets` gives each crop-grid token the language model's token id of the glyph in
its cell (the id of ``" "`` for an empty cell): the alignment stage trains the projector to
output the language model's own embedding of that id. :func:`task_batch` builds one training
batch of one task: the chat of :func:`sparsemm_utils.prompts.build_messages` (the study model has
no system turn), the answer and ``<|im_end|>``, labels on the answer only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsemm_utils.prompts import build_messages
from sparsemm_utils.reader_tasks import STUDY_PAGES, TASK_TYPES, NoQuestionError, ReaderDocSpec, ReaderQuestion, draw_question

__all__ = [
    "TRAIN_SEED",
    "PageBatchError",
    "cell_targets",
    "char_token_id",
    "TaskBatch",
    "task_batch",
    "draw_samples",
]

#: Page stream of the training batches (validation: reader_tasks.VALIDATION_SEED; the benchmark:
#: reader_tasks.HELDOUT_SEED; step 01's documents: the config's seed).
TRAIN_SEED = 1


class PageBatchError(ValueError):
    """A page or a batch cannot be built for the study model."""


def char_token_id(tokenizer: Any, char: str) -> int:
    """The language model's token id of one character (SmolLM2 has one token for each glyph and
    for ``" "``)."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1:
        raise PageBatchError(f"{char!r} is {len(ids)} tokens for this tokenizer; a page glyph must be one token")
    return int(ids[0])


def cell_targets(doc: Mapping[str, Any], tokenizer: Any, rows: int, cols: int, cell: int) -> torch.Tensor:
    """(rows, cols) int64: the token id of the glyph drawn in each cell of ``doc`` (its
    ``char_coord`` boxes, placed by their centre), ``" "``'s id where the cell is empty."""
    targets = torch.full((rows, cols), char_token_id(tokenizer, " "), dtype=torch.long)
    for entry in doc.get("char_coord") or []:
        (x0, y0), (x1, y1) = entry["coord"]
        r, c = int(((y0 + y1) / 2) // cell), int(((x0 + x1) / 2) // cell)
        if not (0 <= r < rows and 0 <= c < cols):
            raise PageBatchError(f"character {entry['char']!r} at {entry['coord']} lies outside the {cols}x{rows} grid")
        targets[r, c] = char_token_id(tokenizer, entry["char"])
    return targets


@dataclass
class TaskBatch:
    """One training batch of one task: ``input_ids`` / ``attention_mask`` / ``labels`` (B, N)
    right-padded (labels -100 outside answers), ``pixel_values`` / ``image_sizes`` as the
    processor gives them, ``targets`` (B, rows, cols) for the alignment loss, and the questions."""

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    targets: torch.Tensor
    questions: list[ReaderQuestion]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def draw_samples(
    spec: ReaderDocSpec, seed: int, first_index: int, n: int, task: str, rng: np.random.Generator, *, max_tries: int = 1000
) -> tuple[list[dict[str, Any]], list[ReaderQuestion]]:
    """``n`` (page, question) pairs of ``task`` from stream ``seed`` starting at page
    ``first_index``; pages that cannot host the task are passed over."""
    docs, questions = [], []
    index = first_index
    while len(docs) < n:
        if index - first_index >= max_tries:
            raise PageBatchError(f"{max_tries} pages from index {first_index} hosted only {len(docs)} {task} questions")
        doc = spec.render(seed, index)
        index += 1
        try:
            questions.append(draw_question(doc, task, rng))
        except NoQuestionError:
            continue
        docs.append(doc)
    return docs, questions


def task_batch(processor: Any, docs: Sequence[Mapping[str, Any]], questions: Sequence[ReaderQuestion], cell: int) -> TaskBatch:
    """The batch of (page, question) pairs: prompt (image + question, generation prompt), then the
    answer and ``<|im_end|>``; loss on the answer and ``<|im_end|>`` only."""
    if not docs or len(docs) != len(questions):
        raise PageBatchError(f"a batch needs as many pages as questions (>= 1), got {len(docs)} and {len(questions)}")
    tasks = {q.task for q in questions}
    if len(tasks) != 1 or tasks - set(TASK_TYPES):
        raise PageBatchError(f"a batch holds one task of {TASK_TYPES}, got {sorted(tasks)}")
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [
        processor.apply_chat_template(build_messages(q.prompt, "llava_next", None), add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    encoded = processor(images=[d["image"] for d in docs], text=prompts, return_tensors="pt", padding=True)
    answers = tokenizer([q.answer for q in questions], add_special_tokens=False)["input_ids"]
    sequences, label_rows = [], []
    for i, answer in enumerate(answers):
        prompt = encoded["input_ids"][i][encoded["attention_mask"][i].bool()].tolist()
        sequences.append(prompt + answer + [end])
        label_rows.append([-100] * len(prompt) + answer + [end])
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(docs), width), end, dtype=torch.long)
    labels = torch.full((len(docs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(sequences, label_rows)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    height, page_width = docs[0]["image"].size[1], docs[0]["image"].size[0]
    targets = torch.stack([cell_targets(d, tokenizer, height // cell, page_width // cell, cell) for d in docs])
    return TaskBatch(
        task=tasks.pop(),
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=encoded["pixel_values"],
        image_sizes=encoded["image_sizes"],
        targets=targets,
        questions=list(questions),
    )
