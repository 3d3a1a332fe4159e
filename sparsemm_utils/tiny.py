"""The tiny reader: a small Qwen2-VL trained here, on CPU, to read the synthetic documents.

No pretrained multimodal model can be downloaded in this project's world, and a random-weight
model has no visual heads (docs/design.md, "The offline world"). The default run therefore uses a
``Qwen2VLForConditionalGeneration`` of the real class and the real image geometry (14 px patches
merged 2 x 2, SparseMM's pixel bounds, docs/method.md §3) trained from scratch by this module to read
the grid documents of step 01 (:class:`~sparsemm_utils.reader_tasks.ReaderDocSpec`). The shipped
checkpoint lives in ``data/tiny_reader`` (``save_pretrained`` of model and processor, a model
card, the training logs) and loads with ``sparsemm_utils.models.load_model("data/tiny_reader")``.

Model (:class:`ReaderModelSpec`): text width 128, 4 layers, 8 query heads and 4 KV heads
(head_dim 16, M-RoPE sections [2, 3, 3]), MLP 512, ``rope_theta = 10``; vision tower depth 2,
width 64, 4 heads; the character-level tokenizer of :func:`~sparsemm_utils.tiny_models.build_char_tokenizer`.
``rope_theta = 10`` matters: with head_dim 16 and the usual 10^6 the width section's rotary
frequencies are ~10^-4 rad per token, so neighbouring columns are indistinguishable; at 10 they
are 0.13-0.24 rad (docs/tiny_reader.md).

Training (:class:`TrainConfig`, :func:`train_reader`), deterministic for a seed on CPU:

- data: every step renders fresh pages from the stream ``seed`` (document ``j`` of step ``s`` is
  ``render_document(cfg, s * batch_size + j)``); held-out pages come from other seeds
  (:data:`HELDOUT_SEED` for the benchmark, :data:`VALIDATION_SEED` for the monitor);
- tasks (:mod:`sparsemm_utils.reader_tasks`): ``ocr`` (the study's OCR prompt), ``line``
  ("Read line k."), ``value`` ("Value of KEY?"); one task per step (a batch then has similar
  lengths, so little padding), drawn with ``task_weights``; loss on the answer tokens only;
- curriculum: pages with ``easy_lines`` lines only for the first ``easy_until`` of the run, then
  the share of full pages ramps linearly to ``full_fraction`` at ``ramp_until``;
- auxiliary glyph loss: a linear head on the vision tower's merged output (the LLM's visual
  input embeddings) predicts the character drawn in each visual token (0 = none), weight
  ``aux_weight``;
- auxiliary position loss: a second linear head reads each visual token's hidden state after
  decoder layer ``position_layer`` and predicts its row and column in the merged grid, weight
  ``position_weight`` (:class:`AuxiliaryHeads` says why: a token that knows its row lets a
  question find a line by content);
- auxiliary pointer loss: a third linear head reads the hidden state after decoder layer
  ``pointer_layer`` at each answer step and predicts the row and column of the visual token the
  next answer character is drawn in, weight ``pointer_weight`` (the answer must stay on the line
  its key was found on); ``pointer_blanks`` extends it to the steps that emit a space, a line
  break or the end;
- auxiliary key pointer loss: a fourth linear head reads the hidden state after
  decoder layer ``key_layer`` at the prompt steps of a value question after the key and predicts
  the row and column of the key's last glyph, weight ``key_weight``. The heads are NOT part of
  the Qwen2-VL checkpoint: they are saved apart (``training/aux_head.safetensors``) and never
  used at inference;
- AdamW (betas 0.9/0.95, weight decay 0.05), linear warm-up then cosine decay to
  ``min_lr_ratio`` of the peak, gradient clipping 1.0, fp32 (bf16 autocast is slower on CPUs
  without native bf16);
- shared prefix: the tokens before the image (system prompt, ``<|vision_start|>``) are the same
  in every sequence, so they are run once per batch and their keys/values broadcast to the batch
  (exactly the same loss and gradients as running them per sequence, about a quarter less work).

Evaluation (:func:`evaluate_reader`): greedy decoding with the full KV cache through the standard
path (:func:`sparsemm_utils.prompts.build_inputs`, ``model.generate``), batch 1; exact match and
character accuracy (``1 - sum of edit distances / sum of answer lengths``) per task.

A second stage (``init_from``) continues from a saved reader with a fresh optimizer (its model card
then lists every stage). The shipped reader is one run of the defaults of :class:`TrainConfig`
(6,500 steps, 60 minutes on 2 CPU cores; its model card has the command and the measurements).

CLI (the shipped reader, every option spelled out though each is the default, then its measurement)::

    python -m sparsemm_utils.tiny train --out data/tiny_reader --work-dir runs/tiny_reader_key/work \
        --no-resume --steps 6500 --lr 8e-4 --threads 2 --data-workers 0 --task-weights 0.28 0.2 0.52 \
        --position-weight 0.1 --position-start 0.1 --pointer-weight 0.6 --pointer-layer 3 \
        --pointer-start 0.1 --pointer-blanks --key-weight 0.3 --key-layer 2 --key-start 0.1 --eval-docs 200
    python -m sparsemm_utils.tiny evaluate --model data/tiny_reader --docs 200
    python -m sparsemm_utils.tiny card --model data/tiny_reader     # rebuild the model card
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fast_pixels import with_lookup_pixels
from .reader_tasks import (
    TASK_TYPES,
    VALUE_PROMPT,
    ReaderDocSpec,
    ReaderQuestion,
    NoQuestionError,
    char_classes,
    collate,
    draw_question,
    memoized_document_lines,
    questions_for_document,
    value_keys,
    value_question,
)
from .runs import repo_root

__all__ = [
    "DEFAULT_READER_DIR",
    "HELDOUT_SEED",
    "VALIDATION_SEED",
    "TinyReaderError",
    "TrainConfigError",
    "CheckpointMismatchError",
    "ReaderModelSpec",
    "TrainConfig",
    "TrainResult",
    "build_reader",
    "count_parameters",
    "learning_rate",
    "easy_page_probability",
    "step_task",
    "step_samples",
    "reader_losses",
    "linear_patch_embedding",
    "AuxiliaryHeads",
    "POSITION_CLASSES",
    "POSITION_LABEL_SMOOTHING",
    "visual_positions",
    "train_reader",
    "save_reader",
    "read",
    "evaluate_reader",
    "heldout_documents",
    "reader_doc_spec",
    "summarize_records",
    "value_error_sources",
    "value_accuracy_by_keys",
    "write_model_card",
    "rewrite_model_card",
    "STEP",
    "ReaderNotebookConfig",
    "training_logs",
    "main",
]

#: Where the shipped checkpoint lives (``load_model(DEFAULT_READER_DIR)``).
DEFAULT_READER_DIR: Path = repo_root() / "data" / "tiny_reader"
#: Document stream of the held-out benchmark (the model card's numbers). Training uses ``seed``
#: (0 by default); streams of different seeds share no page (``default_rng([seed, index])``).
HELDOUT_SEED: int = 10_000
#: Document stream of the monitor evaluated during training (not the benchmark's).
VALIDATION_SEED: int = 20_000

_CHECKPOINT = "checkpoint.pt"
_TRAIN_LOG = "training_log.csv"
_EVAL_LOG = "validation_log.csv"
_PREVIOUS_STAGE = "previous_stage"
#: The reader's targets (issue 3), restated in the model card next to the measured numbers.
TARGET_EXACT = 0.90
TARGET_CHARS = 0.98


class TinyReaderError(RuntimeError):
    """Base class of this module's errors."""


class TrainConfigError(ValueError):
    """A training parameter is invalid; the message names it and the accepted values."""


class CheckpointMismatchError(TinyReaderError):
    """A checkpoint to resume from was written with another training configuration."""


# --------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class ReaderModelSpec:
    """Sizes of the reader (a ``Qwen2VLForConditionalGeneration``; module docstring).

    ``text_*``: the language model (head_dim = ``text_hidden / text_heads``); ``vision_*``: the
    vision tower (patch 14, merge 2, temporal patch 2 are fixed: the real geometry);
    ``rope_theta``: the base of the language model's M-RoPE."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_intermediate: int = 512
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    rope_theta: float = 10.0

    def __post_init__(self) -> None:
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise TrainConfigError(f"ReaderModelSpec.rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        self.tiny_spec()  # validates the sizes (InvalidTinySpecError names the bad one)

    def tiny_spec(self):
        from .tiny_models import TinySpec

        return TinySpec(
            text_hidden=self.text_hidden,
            text_layers=self.text_layers,
            text_heads=self.text_heads,
            text_kv_heads=self.text_kv_heads,
            text_intermediate=self.text_intermediate,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            vision_heads=self.vision_heads,
            vision_intermediate=self.vision_intermediate,
        )


def build_reader(spec: ReaderModelSpec | None = None, *, seed: int = 0):
    """A fresh (untrained) reader and its processor: ``(Qwen2VLForConditionalGeneration, processor)``.

    The processor is :func:`~sparsemm_utils.tiny_models.build_tiny_processor` (character tokenizer,
    Qwen2-VL image processor with SparseMM's pixel bounds); the model is float32, sdpa, in train
    mode, with weights drawn under ``torch.manual_seed(seed)`` (the global RNG is restored) and
    greedy generation stopping at ``<|im_end|>`` / ``<|endoftext|>``."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from .tiny_models import build_char_tokenizer, build_tiny_processor, tiny_config

    spec = spec or ReaderModelSpec()
    tokenizer = build_char_tokenizer("qwen2_vl")
    processor = build_tiny_processor("qwen2_vl", tokenizer)
    config = tiny_config("qwen2_vl", tokenizer, spec.tiny_spec())
    config.text_config.rope_parameters["rope_theta"] = float(spec.rope_theta)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"), do_sample=False
    )
    return model.to(torch.float32).train(), processor


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total", "vision", "text"}`` parameter counts (text = everything outside the vision tower)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"total": total, "vision": vision, "text": total - vision}


# --------------------------------------------------------------------------------------------
# training configuration and schedules


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TrainConfigError(message)


@dataclass
class TrainConfig:
    """Everything that determines a training run (module docstring). Same config, same weights.

    - ``steps``, ``batch_size``: optimizer steps and sequences per step;
    - ``seed``: weight initialisation AND the training document stream;
    - ``lr`` (peak), ``warmup_steps``, ``min_lr_ratio``: linear warm-up from 0, then cosine to
      ``min_lr_ratio * lr`` at the last step (:func:`learning_rate`);
    - ``weight_decay``, ``beta1``, ``beta2``, ``grad_clip``: AdamW and global-norm clipping;
    - ``aux_weight``: weight of the auxiliary glyph loss (0 disables it);
    - ``position_weight``, ``position_layer``, ``position_start``: weight of the auxiliary
      position loss (0 disables it), the language-model hidden state it reads (1 = the output of
      the first decoder layer; :class:`AuxiliaryHeads`), and the share of the run after which it
      is switched on (before that the run is exactly the run without it);
    - ``pointer_weight``, ``pointer_layer``, ``pointer_start``: the same for the auxiliary
      pointer loss (:class:`AuxiliaryHeads`: the answer step names the row and column of the
      character it emits next); ``pointer_blanks``: also at the steps that emit a space, a line
      break or the closing ``<|im_end|>``, pointing at the empty cell right of the glyph before it
      (:func:`~sparsemm_utils.reader_tasks.answer_pointer_labels` with ``blanks``);
    - ``key_weight``, ``key_layer``, ``key_start``: the same for the auxiliary key pointer loss
      (:class:`AuxiliaryHeads`: on a value question, the prompt steps after the key name the row
      and column of the key's last glyph); 0 disables it;
    - ``value_multi_key``: probability that the page of a ``value`` question (a full page, not a
      curriculum easy page) must hold two keys or more, so that the answer depends on which key
      is asked (:func:`step_samples`); 0 keeps the natural mix (72 of the 161 held-out value
      questions have two keys or more; :func:`value_accuracy_by_keys`);
    - ``task_weights``: probability of each task of :data:`~sparsemm_utils.reader_tasks.TASK_TYPES`
      per step (:func:`step_task`);
    - ``easy_lines``, ``easy_until``, ``ramp_until``, ``full_fraction``: the curriculum
      (:func:`easy_page_probability`);
    - ``validate_every``, ``validation_docs``: the monitor (teacher-forced exact match on
      ``validation_docs`` pages of :data:`VALIDATION_SEED`, every task); 0 disables it;
    - ``checkpoint_every``: steps between resumable checkpoints (0: none);
    - ``threads``: ``torch.set_num_threads``; ``data_workers``: processes that render batches
      ahead (0: in the training process; the batches are the same either way);
      ``shared_prefix``: run the common prefix once;
    - ``init_from``: start from the weights of a reader saved by :func:`save_reader` (its model and
      auxiliary head; the optimizer starts afresh) instead of random weights: a second training
      stage. Relative paths are taken from the repository root; ``model_spec`` must match.
    """

    steps: int = 6500
    batch_size: int = 24
    seed: int = 0
    lr: float = 8e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_weight: float = 1.0
    position_weight: float = 0.1
    position_layer: int = 1
    position_start: float = 0.1
    pointer_weight: float = 0.6
    pointer_layer: int = 3
    pointer_start: float = 0.1
    pointer_blanks: bool = True
    key_weight: float = 0.3
    key_layer: int = 2
    key_start: float = 0.1
    value_multi_key: float = 1.0
    task_weights: tuple[float, ...] = (0.28, 0.2, 0.52)
    easy_lines: tuple[int, int] = (1, 2)
    easy_until: float = 0.1
    ramp_until: float = 0.4
    full_fraction: float = 0.9
    validate_every: int = 250
    validation_docs: int = 32
    checkpoint_every: int = 250
    threads: int = 2
    data_workers: int = 0
    shared_prefix: bool = True
    init_from: str | None = None
    doc_spec: ReaderDocSpec = field(default_factory=ReaderDocSpec)
    model_spec: ReaderModelSpec = field(default_factory=ReaderModelSpec)

    def __post_init__(self) -> None:
        if isinstance(self.doc_spec, Mapping):
            self.doc_spec = ReaderDocSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.doc_spec.items()})
        if isinstance(self.model_spec, Mapping):
            self.model_spec = ReaderModelSpec(**self.model_spec)
        own = type(self).__name__
        for name in ("steps", "batch_size", "threads"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{own}.{name} must be an integer >= 1, got {v!r}")
        for name in ("seed", "warmup_steps", "validate_every", "validation_docs", "checkpoint_every", "data_workers"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{own}.{name} must be an integer >= 0, got {v!r}")
        _check(self.seed not in (HELDOUT_SEED, VALIDATION_SEED), f"{own}.seed must differ from the held-out seeds {HELDOUT_SEED} and {VALIDATION_SEED}")
        _check(0 < self.lr < 1, f"{own}.lr must be in (0, 1), got {self.lr!r}")
        _check(0 <= self.min_lr_ratio <= 1, f"{own}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _check(self.weight_decay >= 0 and self.grad_clip > 0 and self.aux_weight >= 0,
               f"{own}: weight_decay and aux_weight must be >= 0 and grad_clip > 0")
        for head in ("position", "pointer", "key"):
            weight, start, layer = (getattr(self, f"{head}_{k}") for k in ("weight", "start", "layer"))
            _check(weight >= 0, f"{own}.{head}_weight must be >= 0, got {weight!r}")
            _check(0 <= start <= 1, f"{own}.{head}_start must be in [0, 1], got {start!r}")
            _check(
                isinstance(layer, int) and not isinstance(layer, bool) and 1 <= layer <= self.model_spec.text_layers,
                f"{own}.{head}_layer must be an integer in [1, {self.model_spec.text_layers}] (the output of that decoder layer), "
                f"got {layer!r}",
            )
        _check(0 <= self.value_multi_key <= 1, f"{own}.value_multi_key must be a probability in [0, 1], got {self.value_multi_key!r}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{own}: beta1 and beta2 must be in [0, 1)")
        self.task_weights = tuple(float(w) for w in self.task_weights)
        _check(
            len(self.task_weights) == len(TASK_TYPES) and all(w >= 0 for w in self.task_weights) and sum(self.task_weights) > 0,
            f"{own}.task_weights must be {len(TASK_TYPES)} non-negative numbers (for {list(TASK_TYPES)}) with a positive sum, "
            f"got {self.task_weights!r}",
        )
        self.easy_lines = tuple(int(v) for v in self.easy_lines)  # type: ignore[assignment]
        self.doc_spec.with_lines(self.easy_lines)  # validates the easy pages
        _check(0 <= self.easy_until <= self.ramp_until <= 1, f"{own}: need 0 <= easy_until <= ramp_until <= 1, got {self.easy_until}, {self.ramp_until}")
        _check(0 <= self.full_fraction <= 1, f"{own}.full_fraction must be in [0, 1], got {self.full_fraction!r}")
        if self.init_from is not None:
            _check(isinstance(self.init_from, str) and bool(self.init_from), f"{own}.init_from must be a folder path or None")

    def init_source(self) -> Path:
        """``init_from`` as an absolute path (relative ones are taken from the repository root)."""
        path = Path(self.init_from or "")
        return path if path.is_absolute() else repo_root() / path

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainConfigError(f"unknown training options {unknown}; valid options: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # a config saved before the position (pointer) head existed trained without it (not with today's default)
        values.setdefault("position_weight", 0.0)
        values.setdefault("pointer_weight", 0.0)
        values.setdefault("pointer_blanks", False)
        values.setdefault("key_weight", 0.0)
        values.setdefault("value_multi_key", 0.0)
        return cls(**values)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps``
    during warm-up, then ``lr * (r + (1 - r) * (1 + cos(pi * t)) / 2)`` with ``r = min_lr_ratio``
    and ``t`` going linearly from 0 (first step after warm-up) to 1 (the last step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t)))


def easy_page_probability(cfg: TrainConfig, step: int) -> float:
    """Probability that a training page of step ``step`` is an easy one (``easy_lines`` lines):
    1 until ``easy_until * steps``, then linear down to ``1 - full_fraction`` at
    ``ramp_until * steps``, constant afterwards."""
    a, b = cfg.easy_until * cfg.steps, cfg.ramp_until * cfg.steps
    floor = 1.0 - cfg.full_fraction
    if step < a:
        return 1.0
    if step >= b or b <= a:
        return floor
    return 1.0 + (floor - 1.0) * (step - a) / (b - a)


def step_task(cfg: TrainConfig, step: int) -> str:
    """The task of training step ``step``: drawn from ``task_weights`` with
    ``default_rng([seed, step, 1])``."""
    p = np.asarray(cfg.task_weights) / sum(cfg.task_weights)
    return TASK_TYPES[int(np.random.default_rng([cfg.seed, step, 1]).choice(len(TASK_TYPES), p=p))]


_ATTEMPT_STRIDE = 10**9  # index offset of the next page tried when a page cannot host the task


def step_samples(cfg: TrainConfig, step: int) -> list[tuple[dict[str, Any], ReaderQuestion]]:
    """The ``batch_size`` (page, question) pairs of training step ``step``, all of task
    :func:`step_task`. Sample ``j`` renders page ``step * batch_size + j`` of the stream
    ``cfg.seed`` (easy with probability :func:`easy_page_probability`, decided by
    ``default_rng([seed, index, 2])``), asks its question with ``default_rng([seed, index, 3])``,
    and moves on to page ``index + 10^9`` (then ``+ 2 * 10^9``, ...) when the page cannot host it.

    A ``value`` question on a full page must find two keys or more on it with probability
    ``cfg.value_multi_key`` (decided by ``default_rng([seed, index, 4])``); a page with fewer
    cannot host it. Pages are laid out first and drawn only once accepted (the same pages)."""
    task = step_task(cfg, step)
    p_easy = easy_page_probability(cfg, step)
    easy_spec = cfg.doc_spec.with_lines(cfg.easy_lines)
    out = []
    for j in range(cfg.batch_size):
        index = step * cfg.batch_size + j
        easy = np.random.default_rng([cfg.seed, index, 2]).random() < p_easy
        spec = easy_spec if easy else cfg.doc_spec
        min_keys = 2 if task == "value" and not easy and np.random.default_rng([cfg.seed, index, 4]).random() < cfg.value_multi_key else 1
        rng = np.random.default_rng([cfg.seed, index, 3])
        for attempt in range(64):
            page = index + attempt * _ATTEMPT_STRIDE
            layout = spec.layout(cfg.seed, page)
            text_only = layout.row(draw=False)  # pages are often turned down: draw only the one kept
            if min_keys > 1 and len(value_keys(text_only)) < min_keys:
                continue
            try:
                question = draw_question(text_only, task, rng)
            except NoQuestionError:
                continue
            out.append((layout.row(), question))
            break
        else:  # pragma: no cover - would need 64 pages in a row without a key-value line
            raise TinyReaderError(f"step {step}: 64 pages in a row cannot host a {task!r} question; check doc_spec")
    return out


# --------------------------------------------------------------------------------------------
# the forward pass and its losses


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset over step indices: item ``s`` is the collated batch of step ``s``
    (so a DataLoader worker can build batches ahead of the optimizer, deterministically).
    Pixels go through :func:`~sparsemm_utils.fast_pixels.with_lookup_pixels` (the same
    ``pixel_values``, faster) and the token mapper is built once."""

    def __init__(self, cfg: TrainConfig, processor: Any, classes: Mapping[str, int]) -> None:
        from .patch_mapping import mapper_from_processor

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


class linear_patch_embedding:
    """Context manager: compute the vision tower's patch embedding as a matrix product.

    Qwen2-VL embeds each patch with a ``Conv3d`` whose kernel equals its stride and the patch
    itself (3 x 2 x 14 x 14), i.e. a linear map of the flattened patch; on CPU the convolution's
    backward pass is several times slower than the same product done by ``F.linear``. Inside the
    context the module's forward uses ``F.linear(x, weight.view(embed_dim, -1))``: the same
    parameter, the same function (equal up to float rounding), nothing saved differs."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model.model.visual.patch_embed

    def __enter__(self) -> "linear_patch_embedding":
        pe = self.module
        weight = pe.proj.weight

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
            return nn.functional.linear(flat, weight.view(pe.embed_dim, -1))

        pe.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.module.forward  # back to the class's forward


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


#: Rows (and, apart, columns) of merged visual tokens the position head can name. Reader pages
#: have at most 6 x 11 (167 x 307 px, resized to multiples of 28).
POSITION_CLASSES: int = 16
#: Label smoothing of the position loss. Without it the loss drives its margins up without
#: bound, and a trial run (weight 0.5, from step 0, no smoothing) grew the visual tokens' hidden
#: states from norm 73 to 179 in the first decoder layer (checkpoint of step 1,250): the position
#: drowned the glyph and reading was learned far more slowly (mean answer loss over steps
#: 1,250-1,299: 2.62, against 1.60 in the same run without the position loss).
POSITION_LABEL_SMOOTHING: float = 0.1


class AuxiliaryHeads(nn.Module):
    """The training-only heads (never part of the checkpoint; saved apart, never used at inference).

    - ``glyph``: ``Linear(hidden, n_glyph_classes)`` on the vision tower's merged output
      (the language model's visual input embeddings, (visual tokens, hidden)): which character is
      drawn in each visual token, 0 = none (the issue's suggested aid).
    - ``position`` (``None`` when ``position_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)``
      on the language model's hidden state of each visual token after decoder layer
      ``position_layer``: its row (first half of the logits) and column (second half) in the
      merged grid. The vision tower cannot say where a token is (its rotary attention is
      translation-equivariant and the page background is uniform), but the language model can
      (causal attention over the fixed prefix tokens before the image), and a visual token that
      knows its row lets a question address a line by content ("the line that starts with KEY").
      It was added because a reader trained without it mixed lines on value questions (every wrong
      character a glyph of another line, mostly near the right column: :func:`value_error_sources`).
      Measured against that run (README, "tiny reader"): ``ocr`` exact match 0.915 -> 0.950,
      ``value`` only 0.683 -> 0.696; the line mixing remains.
    - ``pointer`` (``None`` when ``pointer_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)``
      on the language model's hidden state after decoder layer ``pointer_layer`` at every answer
      step that emits a character drawn on the page: the row and column of the visual token that
      character is read from (:func:`~sparsemm_utils.reader_tasks.answer_pointer_labels`). The
      position head taught visual tokens their row, yet value answers still drifted to other lines
      (all wrong characters from another line, mostly within one column): the row found by the
      key match was not carried into each answer step. This head asks for exactly that.
      Measured against the reader without it (README, "tiny reader"): ``value`` exact match
      0.696 -> 0.745 (41 wrong of 161 instead of 49); at the end of training the pointer is right
      at 99% of ``line`` answer steps but 78% of ``value`` ones, so finding the key's line is still
      the weak step. The shipped recipe doubles its weight (0.6), points blanks too
      (``pointer_blanks``) and gives value questions 52% of the steps (line 20%, ocr 28%):
      ``value`` 0.745 -> 0.795, ``ocr`` 0.950 -> 0.955, ``line`` 0.960 -> 0.970, and the pointer is
      right at 85% of ``value`` answer steps (blank steps included) in the last 500 steps.
    - ``key`` (``None`` when ``key_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)`` on the
      hidden state after decoder layer ``key_layer`` at the prompt steps of a value question from
      the key's last character to the step before the answer
      (:func:`~sparsemm_utils.reader_tasks.collate`'s ``key_labels``): the row and column of the
      key's last glyph. The wrong value answers read the right column of the wrong line, so the
      key match itself fails; this head asks for it where it can be computed, before the answer
      step has to use it (an earlier layer than the pointer's, so that the layers after it can
      carry the row to the answer step and read the value there). Measured against the same recipe
      without it (README, "tiny reader"; one run each): ``value`` exact match 0.795 -> 0.826,
      ``ocr`` 0.955 -> 0.960, ``line`` 0.970 -> 0.980, all characters 0.9749 -> 0.9801; the head
      itself is right (row and column) at only 35% of its steps at the end of training.

    ``glyph`` is initialised under ``torch.manual_seed(seed + 1)``, ``position`` under ``seed + 2``,
    ``pointer`` under ``seed + 3`` and ``key`` under ``seed + 4``, so a run without a head has the
    same initial weights as before that head existed."""

    def __init__(
        self, hidden: int, n_glyph_classes: int, *, position: bool, seed: int, pointer: bool = False, key: bool = False
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.glyph = nn.Linear(hidden, n_glyph_classes)
            torch.manual_seed(seed + 2)
            self.position = nn.Linear(hidden, 2 * POSITION_CLASSES) if position else None
            torch.manual_seed(seed + 3)
            self.pointer = nn.Linear(hidden, 2 * POSITION_CLASSES) if pointer else None
            torch.manual_seed(seed + 4)
            self.key = nn.Linear(hidden, 2 * POSITION_CLASSES) if key else None


def visual_positions(image_grid_thw: torch.Tensor, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column in the merged grid of every visual token of a batch, in the order of the
    language model's image tokens (image after image, each in raster order).

    ``image_grid_thw``: (images, 3) patch grid ``(t, h, w)`` of each image. Returns two (visual
    tokens,) long tensors. Worked example: one image of 4 x 6 patches (2 x 3 merged tokens) gives
    rows ``[0, 0, 0, 1, 1, 1]`` and columns ``[0, 1, 2, 0, 1, 2]``."""
    rows, cols = [], []
    for t, h, w in image_grid_thw.tolist():
        gh, gw = h // merge, w // merge
        if gh > POSITION_CLASSES or gw > POSITION_CLASSES:
            raise TinyReaderError(
                f"an image of {gh} x {gw} merged tokens is larger than the position head's {POSITION_CLASSES} rows/columns; "
                "use smaller pages or raise POSITION_CLASSES"
            )
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        rows.append(r.reshape(-1).repeat(t))
        cols.append(c.reshape(-1).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def reader_losses(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    aux_head: AuxiliaryHeads | None = None,
    *,
    shared_prefix: bool = True,
    aux_weight: float = 1.0,
    position_weight: float = 0.0,
    position_layer: int = 1,
    pointer_weight: float = 0.0,
    pointer_layer: int = 3,
    key_weight: float = 0.0,
    key_layer: int = 2,
) -> dict[str, torch.Tensor]:
    """Losses and accuracies of a :func:`~sparsemm_utils.reader_tasks.collate` batch.

    Returns ``lm_loss`` (mean cross-entropy over answer tokens, ``labels != -100``),
    ``aux_loss`` (glyph loss over visual tokens with a label, empty ones included) and
    ``aux_acc`` (its accuracy on the tokens that show a character; both 0 without ``aux_head``,
    ``aux_labels`` or ``aux_weight``), ``pos_loss`` (mean of the row and column cross-entropies
    of :class:`AuxiliaryHeads` ``.position`` over every visual token, read after decoder layer
    ``position_layer``, with label smoothing :data:`POSITION_LABEL_SMOOTHING`) and ``pos_acc``
    (fraction of tokens whose row AND column are right; both 0 without a position head or with
    ``position_weight`` 0), ``ptr_loss`` and ``ptr_acc`` (the same for :class:`AuxiliaryHeads`
    ``.pointer`` at the answer steps with a ``pointer_labels`` target, read after decoder layer
    ``pointer_layer``; 0 without a pointer head, ``pointer_labels`` or ``pointer_weight``),
    ``key_loss`` and ``key_acc`` (the same for ``.key`` at the prompt steps with a ``key_labels``
    target, read after decoder layer ``key_layer``),
    ``token_acc`` (argmax accuracy on answer tokens) and
    ``seq_correct`` (B,) bool: every answer token is the argmax given the true prefix, which is
    exactly when greedy decoding reproduces the answer (teacher-forced exact match).

    ``shared_prefix``: the ``prefix_len`` tokens before the image are identical in every row
    (``collate`` checks it); they are run once with batch 1 and their keys/values expanded to the
    batch. The result equals the plain forward pass up to float rounding."""
    inner = model.model
    lm = inner.language_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"]
    bsz = ids.shape[0]
    vision = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    image_embeds = torch.cat(vision.pooler_output, dim=0)  # (visual tokens, hidden)
    position_ids, _ = inner.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=mask
    )  # (3, B, L)
    want_positions = aux_head is not None and aux_head.position is not None and position_weight > 0
    want_pointers = aux_head is not None and aux_head.pointer is not None and pointer_weight > 0 and "pointer_labels" in batch
    want_keys = aux_head is not None and aux_head.key is not None and key_weight > 0 and "key_labels" in batch
    want_hidden = want_positions or want_pointers or want_keys
    embeds = lm.embed_tokens(ids)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
    if shared_prefix:
        from transformers import DynamicCache

        p = int(batch["prefix_len"])
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=embeds[:1, :p], position_ids=position_ids[:, :1, :p], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys = layer.keys.expand(bsz, -1, -1, -1)
            layer.values = layer.values.expand(bsz, -1, -1, -1)
        lm_out = lm(
            inputs_embeds=embeds[:, p:], position_ids=position_ids[:, :, p:], attention_mask=mask,
            past_key_values=cache, use_cache=True, output_hidden_states=want_hidden,
        )
        targets, suffix_ids = labels[:, p:], ids[:, p:]
        pointers = batch["pointer_labels"][:, p:] if want_pointers else None
        keys = batch["key_labels"][:, p:] if want_keys else None
    else:
        lm_out = lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, use_cache=False,
                    output_hidden_states=want_hidden)
        targets, suffix_ids = labels, ids
        pointers = batch["pointer_labels"] if want_pointers else None
        keys = batch["key_labels"] if want_keys else None
    hidden = lm_out.last_hidden_state
    # position t predicts token t + 1
    pred_mask = targets[:, 1:] != -100  # (B, L' - 1)
    logits = model.lm_head(hidden[:, :-1][pred_mask])  # (answer tokens, vocab)
    gold = targets[:, 1:][pred_mask]
    lm_loss = nn.functional.cross_entropy(logits.float(), gold)
    hit = logits.argmax(-1) == gold
    per_row = torch.zeros(bsz, dtype=torch.long).index_add_(0, pred_mask.nonzero()[:, 0], (~hit).long())
    out = {
        "lm_loss": lm_loss,
        "token_acc": hit.float().mean().detach(),
        "seq_correct": per_row == 0,
        "aux_loss": torch.zeros(()),
        "aux_acc": torch.zeros(()),
        "pos_loss": torch.zeros(()),
        "pos_acc": torch.zeros(()),
        "ptr_loss": torch.zeros(()),
        "ptr_acc": torch.zeros(()),
        "key_loss": torch.zeros(()),
        "key_acc": torch.zeros(()),
    }
    if aux_head is not None and aux_weight > 0 and "aux_labels" in batch:
        aux_labels = batch["aux_labels"]
        valid = aux_labels != -100
        aux_logits = aux_head.glyph(image_embeds[valid])
        out["aux_loss"] = nn.functional.cross_entropy(aux_logits.float(), aux_labels[valid])
        glyph = aux_labels[valid] > 0
        out["aux_acc"] = (aux_logits.argmax(-1)[glyph] == aux_labels[valid][glyph]).float().mean().detach()
    if want_positions:
        visual = lm_out.hidden_states[position_layer][suffix_ids == model.config.image_token_id]  # (visual tokens, hidden)
        rows, cols = visual_positions(batch["image_grid_thw"])
        out["pos_loss"], out["pos_acc"] = _grid_loss(aux_head.position(visual), rows, cols)
    width = batch["image_grid_thw"][:, 2] // 2  # merged columns per sample
    if want_pointers:  # answer steps whose next character is drawn on the page
        out["ptr_loss"], out["ptr_acc"] = _token_grid_loss(aux_head.pointer, lm_out.hidden_states[pointer_layer], pointers, width)
    if want_keys:  # prompt steps of value questions after the key
        out["key_loss"], out["key_acc"] = _token_grid_loss(aux_head.key, lm_out.hidden_states[key_layer], keys, width)
    return out


def _token_grid_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_grid_loss` of ``head`` at the sequence steps that name a visual token: ``hidden``
    (B, L', hidden) the states of one decoder layer, ``targets`` (B, L') a row-major visual-token
    index per step (-100: none), ``width`` (B,) merged columns of each sample's image. Zero loss
    and accuracy when no step has a target."""
    has = targets != -100
    if not bool(has.any()):
        return torch.zeros(()), torch.zeros(())
    w = width.unsqueeze(1).expand_as(targets)[has]
    return _grid_loss(head(hidden[has]), targets[has] // w, targets[has] % w)


def _grid_loss(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy of a row-and-column head: ``logits`` (N, 2 * POSITION_CLASSES), rows then
    columns; ``rows``, ``cols`` (N,). Loss: mean of the two cross-entropies with label smoothing
    :data:`POSITION_LABEL_SMOOTHING`; accuracy: fraction with row AND column right (detached)."""
    logits = logits.float()
    row_logits, col_logits = logits[:, :POSITION_CLASSES], logits[:, POSITION_CLASSES:]
    ce = lambda lg, gold: nn.functional.cross_entropy(lg, gold, label_smoothing=POSITION_LABEL_SMOOTHING)  # noqa: E731
    loss = 0.5 * (ce(row_logits, rows) + ce(col_logits, cols))
    return loss, ((row_logits.argmax(-1) == rows) & (col_logits.argmax(-1) == cols)).float().mean().detach()


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """What :func:`train_reader` did: ``steps`` done so far (``cfg.steps`` when finished), ``train_seconds`` (wall time of the
    optimizer steps, summed over resumed sessions), ``final`` (the last logged row),
    ``validation`` (the last monitor result per task), ``out_dir``."""

    steps: int
    train_seconds: float
    final: dict[str, float]
    validation: dict[str, float]
    out_dir: Path


def _validation_batches(cfg: TrainConfig, processor: Any, classes: Mapping[str, int]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The monitor's batches: pages ``0 .. validation_docs - 1`` of :data:`VALIDATION_SEED`, one
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


@torch.no_grad()
def _validate(model: nn.Module, batches: Mapping[str, list], shared_prefix: bool) -> dict[str, float]:
    model.eval()
    result = {}
    for task, items in batches.items():
        correct = total = 0
        acc_sum = 0.0
        for batch in items:
            with linear_patch_embedding(model):
                out = reader_losses(model, batch, shared_prefix=shared_prefix)
            correct += int(out["seq_correct"].sum())
            total += int(out["seq_correct"].numel())
            acc_sum += float(out["token_acc"]) * int(out["seq_correct"].numel())
        result[f"{task}_exact"] = correct / total
        result[f"{task}_token_acc"] = acc_sum / total
    model.train()
    return result


def _append_csv(path: Path, row: Mapping[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= last_step)


def _load_initial_weights(cfg: TrainConfig, model: nn.Module, aux_head: nn.Module) -> None:
    """Copy the weights of the reader saved at ``cfg.init_from`` into ``model`` and ``aux_head``."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    src = cfg.init_source()
    if not ((src / "config.json").is_file() and (src / "training" / "aux_head.safetensors").is_file()):
        raise TrainConfigError(
            f"init_from={cfg.init_from!r}: {src} is not a reader saved by save_reader (config.json and "
            "training/aux_head.safetensors expected); run the previous training stage first"
        )
    saved = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    theirs, ours = saved.state_dict(), model.state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    if shapes(theirs) != shapes(ours) or (
        saved.config.text_config.rope_parameters != model.config.text_config.rope_parameters
    ):
        raise TrainConfigError(
            f"init_from={cfg.init_from!r} has other model sizes (or rope parameters) than model_spec; use the same model_spec"
        )
    model.load_state_dict(theirs)
    saved_heads = load_file(str(src / "training" / "aux_head.safetensors"))
    if set(saved_heads) == {"weight", "bias"}:  # a reader saved before the position head existed: its glyph head
        saved_heads = {f"glyph.{k}": v for k, v in saved_heads.items()}
    optional = ("position.", "pointer.", "key.")
    absent = tuple(prefix for prefix in optional if getattr(aux_head, prefix[:-1]) is None)
    saved_heads = {k: v for k, v in saved_heads.items() if not (absent and k.startswith(absent))}
    # a position, pointer or key head the previous stage did not have keeps its fresh initialisation (strict=False)
    problem = ""
    try:
        missing, unexpected = aux_head.load_state_dict(saved_heads, strict=False)
        if unexpected or any(not k.startswith(optional) for k in missing):
            problem = f"missing {missing}, unexpected {unexpected}"
    except RuntimeError as err:  # tensors of other shapes
        problem = str(err).splitlines()[-1].strip()
    if problem:
        raise TrainConfigError(
            f"init_from={cfg.init_from!r}: its training/aux_head.safetensors does not fit the auxiliary heads "
            f"({problem}); use the same model_spec and character set"
        )


def train_reader(
    cfg: TrainConfig,
    work_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 10,
    stop_after: int | None = None,
) -> tuple[nn.Module, Any, AuxiliaryHeads, TrainResult]:
    """Train a reader from scratch (or resume ``work_dir/checkpoint.pt``) for ``cfg.steps`` steps.

    Writes into ``work_dir``: ``training_log.csv`` (one row per step: step, task, lr, loss,
    lm_loss, aux_loss, aux_acc, pos_loss, pos_acc, ptr_loss, ptr_acc, key_loss, key_acc, token_acc, seq_acc, grad_norm, p_easy, seconds, elapsed), ``validation_log.csv``
    (step, then ``<task>_exact`` and ``<task>_token_acc``), ``train_config.json``, and a resumable
    ``checkpoint.pt`` every ``checkpoint_every`` steps (model, aux head, optimizer, step, elapsed
    time, config). Returns ``(model, processor, aux_head, result)``; nothing is saved for release
    here (see :func:`save_reader`). A checkpoint written with another config raises
    :class:`CheckpointMismatchError` (``resume=False`` starts over).

    ``stop_after``: end this session after that many steps in total (a checkpoint is written
    there); a later call with ``resume=True`` continues and ends with the same weights as an
    uninterrupted run."""
    from tqdm.auto import tqdm

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    model, processor = build_reader(cfg.model_spec, seed=cfg.seed)
    classes = char_classes(cfg.doc_spec.charset)
    aux_head = AuxiliaryHeads(
        cfg.model_spec.text_hidden, len(classes) + 1, position=cfg.position_weight > 0, pointer=cfg.pointer_weight > 0,
        key=cfg.key_weight > 0, seed=cfg.seed,
    )
    if cfg.init_from is not None:
        _load_initial_weights(cfg, model, aux_head)
    params = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True,
    )
    start, elapsed = 0, 0.0
    ckpt_path = work / _CHECKPOINT
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config"] != cfg.to_dict():
            raise CheckpointMismatchError(
                f"{ckpt_path} was written by another training configuration; use the same options to resume, "
                f"or resume=False (CLI: --no-resume) to start over. Differences: "
                f"{sorted(k for k in cfg.to_dict() if state['config'].get(k) != cfg.to_dict()[k])}"
            )
        model.load_state_dict(state["model"])
        aux_head.load_state_dict(state["aux_head"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        for name in (_TRAIN_LOG, _EVAL_LOG):
            _truncate_csv(work / name, start - 1)
    else:
        for name in (_TRAIN_LOG, _EVAL_LOG, _CHECKPOINT):
            (work / name).unlink(missing_ok=True)
    (work / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    val_batches = _validation_batches(cfg, processor, classes) if cfg.validate_every else {}
    model.train()
    last: dict[str, float] = {}
    validation: dict[str, float] = {}
    end = cfg.steps if stop_after is None else min(cfg.steps, max(int(stop_after), start))
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="training the reader", disable=not progress)
    window: list[dict[str, float]] = []
    loader = torch.utils.data.DataLoader(
        _StepBatches(cfg, processor, classes),
        batch_size=None,
        sampler=range(start, end),
        num_workers=cfg.data_workers,
        worker_init_fn=_worker_init if cfg.data_workers else None,
        prefetch_factor=4 if cfg.data_workers else None,
        persistent_workers=False,
    )
    batches = iter(loader)
    for step in bar:
        t0 = time.perf_counter()
        task = step_task(cfg, step)
        batch = next(batches)
        lr = learning_rate(cfg, step)
        position_weight = cfg.position_weight if step >= cfg.position_start * cfg.steps else 0.0
        pointer_weight = cfg.pointer_weight if step >= cfg.pointer_start * cfg.steps else 0.0
        key_weight = cfg.key_weight if step >= cfg.key_start * cfg.steps else 0.0
        for group in optimizer.param_groups:
            group["lr"] = lr
        with linear_patch_embedding(model):
            out = reader_losses(
                model, batch, aux_head, shared_prefix=cfg.shared_prefix, aux_weight=cfg.aux_weight,
                position_weight=position_weight, position_layer=cfg.position_layer,
                pointer_weight=pointer_weight, pointer_layer=cfg.pointer_layer,
                key_weight=key_weight, key_layer=cfg.key_layer,
            )
        loss = (
            out["lm_loss"] + cfg.aux_weight * out["aux_loss"] + position_weight * out["pos_loss"] + pointer_weight * out["ptr_loss"]
            + key_weight * out["key_loss"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        seconds = time.perf_counter() - t0
        elapsed += seconds
        last = {
            "step": step,
            "task": task,
            "lr": lr,
            "loss": loss.item(),
            "lm_loss": out["lm_loss"].item(),
            "aux_loss": out["aux_loss"].item(),
            "aux_acc": float(out["aux_acc"]),
            "pos_loss": out["pos_loss"].item(),
            "pos_acc": float(out["pos_acc"]),
            "ptr_loss": out["ptr_loss"].item(),
            "ptr_acc": float(out["ptr_acc"]),
            "key_loss": out["key_loss"].item(),
            "key_acc": float(out["key_acc"]),
            "token_acc": float(out["token_acc"]),
            "seq_acc": float(out["seq_correct"].float().mean()),
            "grad_norm": grad_norm,
            "p_easy": easy_page_probability(cfg, step),
            "seconds": seconds,
            "elapsed": elapsed,
        }
        if not math.isfinite(last["loss"]):
            raise TinyReaderError(f"the loss became {last['loss']} at step {step}; lower lr (now {cfg.lr})")
        _append_csv(work / _TRAIN_LOG, last)
        window.append(last)
        if progress and (step + 1) % log_every == 0:
            bar.set_postfix(
                loss=f"{np.mean([w['lm_loss'] for w in window]):.3f}",
                acc=f"{np.mean([w['token_acc'] for w in window]):.3f}",
                aux=f"{np.mean([w['aux_acc'] for w in window]):.3f}",
                pos=f"{np.mean([w['pos_acc'] for w in window]):.3f}",
                ptr=f"{np.mean([w['ptr_acc'] for w in window]):.3f}",
                # the key head only sees value questions: average over those steps of the window
                **({"key": f"{np.mean([w['key_acc'] for w in window if w['task'] == 'value'] or [0.0]):.3f}"}
                   if cfg.key_weight > 0 else {}),
                s=f"{np.mean([w['seconds'] for w in window]):.2f}",
            )
            window = []
        done = step + 1
        if cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.steps):
            validation = _validate(model, val_batches, cfg.shared_prefix)
            _append_csv(work / _EVAL_LOG, {"step": step, **validation})
            if progress:
                bar.write(f"step {done}: " + ", ".join(f"{k}={v:.3f}" for k, v in validation.items()))
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done in (cfg.steps, end):
            state = {
                "config": cfg.to_dict(),
                "step": done,
                "elapsed": elapsed,
                "model": model.state_dict(),
                "aux_head": aux_head.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)
    model.eval()
    result = TrainResult(steps=end, train_seconds=elapsed, final=last, validation=validation, out_dir=work)
    return model, processor, aux_head, result


def save_reader(model: nn.Module, processor: Any, aux_head: nn.Module | None, out_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """Save a trained reader for release: ``save_pretrained`` of model and processor into
    ``out_dir`` (loadable with ``load_model(out_dir)``), the auxiliary head apart into
    ``out_dir/training/aux_head.safetensors`` (not part of the Qwen2-VL checkpoint), and the logs
    and config of ``work_dir`` into ``out_dir/training/``. A reader trained from another one
    (``init_from``) also keeps that one's ``training/`` folder (without its auxiliary head) in
    ``training/previous_stage/``, so the release documents every stage."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    training = out / "training"
    training.mkdir(exist_ok=True)
    if aux_head is not None:
        save_file({k: v.contiguous() for k, v in aux_head.state_dict().items()}, str(training / "aux_head.safetensors"))
    if work_dir is not None:
        for name in (_TRAIN_LOG, _EVAL_LOG, "train_config.json"):
            src = Path(work_dir) / name
            if src.exists():
                shutil.copyfile(src, training / name)
        config_path = Path(work_dir) / "train_config.json"
        if config_path.exists():
            cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
            previous = training / _PREVIOUS_STAGE
            if previous.exists():
                shutil.rmtree(previous)
            if cfg.init_from is not None:
                # the stage this one started from: its logs (and, recursively, its own previous stage)
                shutil.copytree(cfg.init_source() / "training", previous, ignore=shutil.ignore_patterns("aux_head.safetensors"))
    return out


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def read(loaded: Any, image: Any, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy answer of a loaded reader (:class:`~sparsemm_utils.models.LoadedModel`) to
    ``prompt`` about ``image``, with the full KV cache, batch 1, through the standard path
    (:func:`~sparsemm_utils.prompts.build_inputs` then ``generate``); special tokens dropped."""
    from .prompts import build_inputs

    inputs = build_inputs(loaded, image, prompt)
    generated = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    return loaded.processor.tokenizer.decode(new, skip_special_tokens=True)


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task (and ``"all"``): ``n``, ``exact_match`` (share of predictions equal to the
    answer), ``char_accuracy`` (``max(0, 1 - sum(edit distance) / sum(len(answer)))``) and
    ``mean_char_accuracy`` (mean over questions of ``max(0, 1 - edit / len(answer))``).
    Each record needs ``task``, ``answer``, ``prediction``."""
    from .metrics import levenshtein

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
    from tqdm.auto import tqdm

    from .metrics import levenshtein

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


def reader_doc_spec(model_dir: str | Path) -> ReaderDocSpec:
    """The page distribution a saved reader was trained on (``training/train_config.json``),
    or the default :class:`ReaderDocSpec` when the folder has no training config."""
    path = Path(model_dir) / "training" / "train_config.json"
    if not path.is_file():
        return ReaderDocSpec()
    return TrainConfig.from_dict(json.loads(path.read_text())).doc_spec


def heldout_documents(n: int, spec: ReaderDocSpec | None = None, seed: int = HELDOUT_SEED) -> list[dict[str, Any]]:
    """Pages ``0 .. n-1`` of the held-out stream (rows with PIL images)."""
    spec = spec or ReaderDocSpec()
    return [spec.render(seed, i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# the model card


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__}"


def _previous_stages(training: Path) -> list[dict[str, Any]]:
    """Earlier training stages recorded under ``training/previous_stage/`` (oldest first):
    ``{config, steps, seconds, command}`` each."""
    folder = training / _PREVIOUS_STAGE
    if not (folder / "train_config.json").is_file():
        return []
    log = folder / _TRAIN_LOG
    rows = list(csv.DictReader(open(log))) if log.is_file() else []
    results = folder / "eval_results.json"
    command = json.loads(results.read_text()).get("command", "(not recorded)") if results.is_file() else "(not recorded)"
    stage = {
        "config": TrainConfig.from_dict(json.loads((folder / "train_config.json").read_text())),
        "steps": int(rows[-1]["step"]) + 1 if rows else 0,
        "seconds": float(rows[-1]["elapsed"]) if rows else 0.0,
        "command": command,
    }
    return _previous_stages(folder) + [stage]


def _stage_line(i: int, stage: Mapping[str, Any], n: int) -> str:
    c: TrainConfig = stage["config"]
    start = f"from the weights of stage {i - 1} (`init_from={c.init_from}`)" if c.init_from else "from random weights"
    curriculum = (
        f"easy pages ({c.easy_lines[0]}-{c.easy_lines[1]} lines) only for the first {c.easy_until:.0%} of the steps, "
        f"full pages ramped to {c.full_fraction:.0%} at {c.ramp_until:.0%}"
        if c.easy_until or c.ramp_until
        else f"{c.full_fraction:.0%} full pages throughout"
    )
    title = f"Stage {i} of {n}" if n > 1 else "Training run"
    return (
        f"- {title}, {start}: `{stage['command']}`\n"
        f"  {stage['steps']} steps x batch {c.batch_size}, AdamW (peak lr {c.lr:g}, betas ({c.beta1}, {c.beta2}), weight "
        f"decay {c.weight_decay}), {c.warmup_steps} warm-up steps then cosine to {c.min_lr_ratio:g} x lr, gradient clip "
        f"{c.grad_clip}, float32, seed {c.seed} (training pages of stream {c.seed}), {c.threads} thread(s) and "
        f"{c.data_workers} data worker(s); tasks {dict(zip(TASK_TYPES, c.task_weights))}; {curriculum}; "
        f"{stage['seconds'] / 60:.1f} minutes."
    )


# measured: data/tiny_reader as shipped on 2026-11-21 (commit c7b4423), its own eval_results.json
_MULTI_KEY_ALWAYS = (
    " With it at 0.75 (three in four such questions) the same recipe answered 144 of 161 held-out value\n"
    "  questions (89 of 89 one-key, 55 of 72 others); asking every one on a multi-key page is the recipe shipped."
)


def _multi_key_share(p: float) -> str:
    """The model card's words for ``value_multi_key``: nothing when it is 1 (always), else
    ``", with probability p,"``."""
    return "" if p >= 1 else f", with probability {p},"


def write_model_card(
    out_dir: str | Path,
    cfg: TrainConfig,
    result: TrainResult,
    evaluation: Mapping[str, Any],
    *,
    command: str,
    n_docs: int,
    eval_seed: int = HELDOUT_SEED,
) -> Path:
    """Write ``MODEL_CARD.md`` into ``out_dir`` from the measured results (nothing hard-coded):
    the model, tokenizer, data recipe, shaping, training command/time/machine and the held-out
    accuracy per task. Also writes ``training/eval_results.json`` (summary and every record)."""
    import transformers

    from .models import load_model

    out = Path(out_dir)
    loaded = load_model(out)
    counts = count_parameters(loaded.model)
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    summary = evaluation["summary"]
    (out / "training").mkdir(exist_ok=True)
    (out / "training" / "eval_results.json").write_text(
        json.dumps(
            {"n_docs": n_docs, "seed": eval_seed, "command": command, "summary": summary,
             "seconds": evaluation.get("seconds"), "records": evaluation["records"]},
            indent=1,
        ) + "\n"
    )
    spec, ms = cfg.doc_spec, cfg.model_spec
    rows = "\n".join(
        f"| {task} | {s['n']} | {s['exact_match']:.3f} | {s['char_accuracy']:.4f} |" for task, s in summary.items()
    )
    val = ", ".join(f"{k} {v:.3f}" for k, v in result.validation.items()) or "not run"
    stages = _previous_stages(out / "training") + [
        {"config": cfg, "steps": result.steps, "seconds": result.train_seconds, "command": command}
    ]
    first = stages[0]["config"]
    blank_text = (
        " With blanks on, the steps that emit a space, a line break or the closing `<|im_end|>` point too: at the"
        " empty cell right of the glyph before them, where the word or line visibly ends (added because over half"
        " of the wrong value answers had the wrong length: they read on past the value or stopped early)."
        if first.pointer_blanks
        else ""
    )
    total_minutes = sum(st["seconds"] for st in stages) / 60
    stage_text = "\n".join(_stage_line(i, st, len(stages)) for i, st in enumerate(stages, start=1))
    met = [t for t in TASK_TYPES if t in summary and summary[t]["exact_match"] >= TARGET_EXACT]
    missed = [t for t in TASK_TYPES if t in summary and summary[t]["exact_match"] < TARGET_EXACT]
    chars_ok = [t for t in TASK_TYPES if t in summary and summary[t]["char_accuracy"] >= TARGET_CHARS]
    missed_text = ", ".join(f"{t} ({summary[t]['exact_match']:.3f})" for t in missed)
    target_text = (
        f"exact match target met for {', '.join(met) or 'no task'}"
        + (f", missed for {missed_text}" if missed else "")
        + f"; character accuracy target met for {', '.join(chars_ok) or 'no task'}"
        + (f" (all tasks together: {summary['all']['char_accuracy']:.4f})" if "all" in summary else "")
        + f"; training took {total_minutes:.1f} minutes of optimizer wall time"
        + (" (over the 60-minute budget)." if total_minutes > 60 else ".")
    )
    worst = min((t for t in TASK_TYPES if t in summary), key=lambda t: summary[t]["exact_match"], default=None)
    failures = ""
    value_docs: dict[int, Any] = {}  # the held-out pages of the value questions (reader pages are grid pages)
    if "value" in summary:
        wanted = {r["doc_id"] for r in evaluation["records"] if r["task"] == "value"}
        value_docs = {d["doc_id"]: d for d in heldout_documents(max(wanted) + 1, spec, eval_seed) if d["doc_id"] in wanted}
    if worst is not None and summary[worst]["exact_match"] < 1:
        b = error_breakdown(evaluation["records"], worst)
        per_length = ", ".join(f"{n} character(s): {em:.3f} ({k})" for n, (k, em) in b["by_answer_length"].items())
        failures = (
            f"\nWhere it fails most (`{worst}`, the lowest exact match): {b['wrong']} of {b['n']} answers are wrong; "
            f"{b['wrong_length']} have the wrong length (it reads on past the end of the word, or stops early) and "
            f"{b['same_length']} the right length with wrong characters. Exact match by answer length "
            f"(questions): {per_length}.\n"
        )
        if worst == "value":
            src = value_error_sources(evaluation["records"], value_docs, charset=spec.charset, cell_size=spec.cell_size)
            if src["wrong_characters"]:
                failures += (
                    f"Of the {src['wrong_characters']} wrong characters in those answers, {src['from_other_line']} are glyphs drawn on "
                    f"another line of the page ({src['same_column']} at the very column the value should have been read from, "
                    f"{src['within_one_column']} within one column); a glyph drawn at random would be on another line "
                    f"{src['chance']:.0%} of the time. It reads from the wrong line, near the right column "
                    "(`sparsemm_utils.tiny.value_error_sources`).\n"
                )
    if value_docs:
        by_keys = value_accuracy_by_keys(evaluation["records"], value_docs)
        failures += (
            "Value questions by the number of keys on their page (only with two or more does the answer depend on "
            "matching the key asked about; `sparsemm_utils.tiny.value_accuracy_by_keys`): "
            + ", ".join(f"{n} key{'s' if n > 1 else ''}: {right} of {q} right ({right / q:.3f})" for n, (q, right) in by_keys.items())
            + ".\n"
        )
    earlier = ""
    previous_results = out / "training" / _PREVIOUS_STAGE / "eval_results.json"
    if previous_results.is_file():
        prev = json.loads(previous_results.read_text())
        earlier = (
            f"\nThe same measurement after the previous stage alone ({prev['n_docs']} pages, seed {prev['seed']}): "
            + "; ".join(
                f"{t} {s['exact_match']:.3f} exact / {s['char_accuracy']:.4f} characters" for t, s in prev["summary"].items()
            )
            + ".\n"
        )
    multi = len(stages) > 1
    position_text = (
        f"""
- Auxiliary position loss (weight {first.position_weight}, switched on after {first.position_start:.0%} of the steps, label
  smoothing {POSITION_LABEL_SMOOTHING}): a second linear head reads each visual token's hidden state after decoder
  layer {first.position_layer} of the language model and predicts its row and column in the merged grid
  (`sparsemm_utils.tiny.AuxiliaryHeads`). The vision tower cannot know where a token is (its rotary attention is
  translation-equivariant and the page background uniform); the language model can (causal attention over the
  prefix before the image). It was added so that a question could find a line by its content (`value`). Saved
  with the glyph head, never used at inference."""
        if first.position_weight > 0
        else ""
    ) + (
        f"""
- Auxiliary pointer loss (weight {first.pointer_weight}, switched on after {first.pointer_start:.0%} of the steps, label
  smoothing {POSITION_LABEL_SMOOTHING}): a third linear head reads the hidden state after decoder layer
  {first.pointer_layer} at every answer step whose next character is drawn on the page and predicts the row and
  column of the visual token that character is read from (`sparsemm_utils.reader_tasks.answer_pointer_labels`).
  It was added because value answers drifted to other lines (every wrong character a glyph of another line):
  the answer step must carry the row the key was found on.{blank_text} Saved with the other heads, never used at
  inference."""
        if first.pointer_weight > 0
        else ""
    ) + (
        f"""
- Auxiliary key pointer loss (weight {first.key_weight}, switched on after {first.key_start:.0%} of the steps, label
  smoothing {POSITION_LABEL_SMOOTHING}): a fourth linear head reads the hidden state after decoder layer
  {first.key_layer} at the prompt steps of a value question from the key's last character to the step before the
  answer, and predicts the row and column of the key's last glyph (`sparsemm_utils.reader_tasks.key_pointer_label`).
  It was added because the wrong value answers read the right column of the wrong line: the key match itself
  fails. Saved with the other heads, never used at inference."""
        if first.key_weight > 0
        else ""
    )
    multi_key_text = (
        f"""
- Value pages that need their key: a `value` question on a full page is asked{_multi_key_share(first.value_multi_key)}
  only on a page with two keys or more (other pages are passed over, as pages without any key
  always are; `sparsemm_utils.tiny.step_samples`). On a one-key page the answer is simply the second word of the
  only key-value line, whatever the key. It was added because the reader shipped before it (same recipe without
  this) answered 88 of 89 held-out one-key questions right and 45 of 72 others: it had learned that shortcut more
  than the key match.{_MULTI_KEY_ALWAYS if first.value_multi_key >= 1 else ""} Held-out pages keep the natural mix (counts by keys below)."""
        if first.value_multi_key > 0
        else ""
    )
    logs_tail = ";\n  earlier stages in `training/previous_stage/`." if multi else "."
    text = f"""# tiny_reader: a Qwen2-VL trained here to read synthetic documents

A `Qwen2VLForConditionalGeneration` of {counts['total']:,} parameters (vision tower {counts['vision']:,},
language model {counts['text']:,}) trained from random weights on CPU by
`sparsemm_utils.tiny` to read the grid documents of step 01. It exists so that the offline
default run (no model hub) shows the study's phenomenon on a model that really reads: SparseMM's
head scoring, budget allocation and evaluation run on it exactly as on a real checkpoint.
Load it like one: `sparsemm_utils.models.load_model("data/tiny_reader")`.

## Model

- Class `Qwen2VLForConditionalGeneration` (transformers {transformers.__version__}), float32,
  {size_mb:.1f} MB of safetensors.
- Language model: hidden {ms.text_hidden}, {ms.text_layers} layers, {ms.text_heads} query heads, {ms.text_kv_heads} KV heads
  (head_dim {ms.text_hidden // ms.text_heads}), MLP {ms.text_intermediate}, M-RoPE sections
  {loaded.text_config.rope_parameters['mrope_section']}, **rope_theta {ms.rope_theta:g}** (with head_dim 16 the usual
  10^6 leaves the width section almost no column information), untied embeddings.
- Vision tower: depth {ms.vision_layers}, width {ms.vision_hidden}, {ms.vision_heads} heads; the real geometry: 14 px
  patches, 2 x 2 merge, temporal patch 2, SparseMM's pixel bounds (32*28^2 .. 16384*28^2), so one visual
  token per 28 x 28 block.
- Tokenizer: character level (`sparsemm_utils.tiny_models.build_char_tokenizer("qwen2_vl")`,
  {len(loaded.tokenizer)} tokens: `<unk>`, printable ASCII and newline, the Qwen2-VL special tokens), ChatML
  template with the default system prompt "You are a helpful assistant.". Greedy generation stops at
  `<|im_end|>`.

## Data recipe

Pages from `sparsemm_utils.documents.render_document` with the grid layout
(`sparsemm_utils.reader_tasks.ReaderDocSpec`): {spec.cols[0]}-{spec.cols[1]} columns x {spec.rows[0]}-{spec.rows[1]} rows of
{spec.cell_size} px cells ({spec.cols[0] * spec.rows[0]}-{spec.cols[1] * spec.rows[1]} visual tokens), {spec.lines[0]}-{spec.lines[1]} lines on distinct random rows,
{spec.words_per_line[0]}-{spec.words_per_line[1]} words per line of {spec.word_length[0]}-{spec.word_length[1]} characters, one character centred per cell with
+-{spec.jitter} px jitter, DejaVu Sans Mono {spec.font_size} px (shipped in `data/fonts`), alphabet
`{spec.charset}` ({len(spec.charset)} glyphs: upper case and digits without the look-alikes 0/O, 1/I, 5/S,
8/B, 2/Z). Step-01 parameters for the same pages: `{json.dumps(spec.step01_params())}`.

Tasks (`sparsemm_utils.reader_tasks`), loss on the answer tokens and the closing `<|im_end|>` only:

- `ocr`: "Provide all the OCR results of this image." (the study's head-scoring prompt) -> every line,
  top to bottom, joined by newlines;
- `line`: "Read line k." -> the k-th line with text (empty rows do not count);
- `value`: "Value of KEY?" -> the words after KEY on the line it starts (KEY unique among first words).

Training pages come from the stream `seed={cfg.seed}` (page `step * batch + j`), held-out pages from
seed {eval_seed} (benchmark) and {VALIDATION_SEED} (monitor): no page is shared.

## Shaping used (fair aids, all documented)

- Curriculum{" (first stage)" if multi else ""}: for the first {first.easy_until:.0%} of the steps every page has {first.easy_lines[0]}-{first.easy_lines[1]} lines;
  then the share of full pages ramps linearly to {first.full_fraction:.0%} at {first.ramp_until:.0%} of the run.
- Auxiliary glyph loss (weight {first.aux_weight}): a linear head on the vision tower's merged output predicts the
  character in each visual token (or none). It is not part of the checkpoint above: it is saved apart in
  `training/aux_head.safetensors` and never used at inference.{position_text}
- Large glyphs (one character per 28 px visual token), an alphabet without look-alike glyphs.
- Task mix: each step draws one task and its batch holds only that task, so sequences of a batch
  have similar lengths (probabilities{" per stage" if multi else ""} below).{multi_key_text}

## Training

{stage_text}
- Total wall time of the optimizer steps: **{total_minutes:.1f} minutes** on {_machine()} (a virtual
  machine: its speed varies from hour to hour, and other jobs on it slow training down several times).
  {"Each command, run in order" if multi else "The command, run again"} on the same machine, gives the same weights (seeded,
  `torch.set_num_threads` fixed).
- Last monitor values (teacher-forced exact match, which equals greedy exact match, and token accuracy on
  {cfg.validation_docs} validation pages): {val}.
- Logs: `training/training_log.csv` (every step), `training/validation_log.csv`, `training/train_config.json`{logs_tail}

## Measured accuracy

Greedy decoding, full KV cache, batch 1, through `prompts.build_inputs` + `generate`, on {n_docs}
held-out pages (seed {eval_seed}), one question per task each page can host. Character accuracy =
1 - (sum of edit distances) / (sum of answer lengths).

| task | questions | exact match | character accuracy |
|---|---|---|---|
{rows}
{failures}{earlier}

Reproduce: `.venv/bin/python benchmarks/tiny_reader_accuracy.py` (or
`python -m sparsemm_utils.tiny evaluate --model data/tiny_reader --docs {n_docs}`); the per-question
records are in `training/eval_results.json`.

## Against the project's targets

Targets (issue 3): exact match >= {TARGET_EXACT:.0%} on each task and character accuracy >= {TARGET_CHARS:.0%}, training
within 60 minutes on the 2-core machine. Measured: {target_text}

## Limits

It reads only this page distribution (grid pages, this alphabet, this font); it knows no language.
Its attention is the object of study, not its accuracy on real benchmarks.
"""
    path = out / "MODEL_CARD.md"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# notebook 00


STEP = "00_tiny_reader"


@dataclass
class ReaderNotebookConfig:
    """Parameters of notebook ``00_tiny_reader``.

    - ``run_dir``: the run folder (outputs go to ``<run_dir>/00_tiny_reader/``);
    - ``model_id``: the reader to show: a folder written by :func:`save_reader` (the chain's
      ``configs/tiny.yaml`` passes ``data/tiny_reader``; relative paths are taken from the
      repository root); a ``tiny-random/...`` id has no reader behind it, so the shipped one
      (:data:`DEFAULT_READER_DIR`) is shown instead;
    - ``seed``: the seed of a retraining run (``retrain=True``);
    - ``retrain``: train a new reader into ``<run_dir>/00_tiny_reader/reader`` instead of loading
      one (``train_steps`` steps of the shipped recipe, :class:`TrainConfig`'s defaults: 6,500 steps took 55
      minutes on 2 CPU cores);
    - ``n_eval_docs``: held-out pages read greedily (3 questions each);
    - ``n_sample_docs``: pages shown in the figures."""

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
    seed: int = 0
    retrain: bool = False
    train_steps: int = 6500
    n_eval_docs: int = 30
    n_sample_docs: int = 6

    def __post_init__(self) -> None:
        own = type(self).__name__
        _check(isinstance(self.run_dir, str) and bool(self.run_dir), f"{own}.run_dir must be a non-empty string")
        _check(isinstance(self.model_id, str) and bool(self.model_id), f"{own}.model_id must be a non-empty string")
        _check(isinstance(self.retrain, bool), f"{own}.retrain must be True or False, got {self.retrain!r}")
        for name in ("train_steps", "n_eval_docs", "n_sample_docs"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{own}.{name} must be an integer >= 1, got {v!r}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"{own}.seed must be an integer >= 0, got {self.seed!r}")
        if not self.retrain and not self.model_id.startswith("tiny-random/"):
            path = Path(self.model_id)
            path = path if path.is_absolute() else repo_root() / path
            _check(
                (path / "config.json").is_file(),
                f"{own}.model_id={self.model_id!r}: no reader checkpoint at {path} (no config.json); pass a folder "
                "written by `python -m sparsemm_utils.tiny train`, or retrain=True",
            )

    @property
    def reader_dir(self) -> Path:
        """The folder of the reader to load (or to write when ``retrain``)."""
        from .runs import resolve_run_dir

        if self.retrain:
            return resolve_run_dir(self.run_dir) / STEP / "reader"
        if self.model_id.startswith("tiny-random/"):
            return DEFAULT_READER_DIR
        path = Path(self.model_id)
        return path if path.is_absolute() else repo_root() / path


def training_logs(reader_dir: str | Path):
    """``(training_log, validation_log)`` of a saved reader as DataFrames, every training stage
    included (``training/`` and, oldest first, ``training/previous_stage/...``): ``step`` and
    ``elapsed`` continue across stages and a ``stage`` column (1, 2, ...) tells them apart. The
    validation log is ``None`` when no stage recorded one."""
    import pandas as pd

    folders = []
    folder = Path(reader_dir) / "training"
    while (folder / _TRAIN_LOG).is_file():
        folders.append(folder)
        folder = folder / _PREVIOUS_STAGE
    if not folders:
        raise FileNotFoundError(
            f"{Path(reader_dir) / 'training' / _TRAIN_LOG} is missing: this reader was not saved by save_reader with its work folder"
        )
    logs, vals = [], []
    step0, elapsed0 = 0, 0.0
    for stage, folder in enumerate(reversed(folders), start=1):
        log = pd.read_csv(folder / _TRAIN_LOG)
        log["stage"] = stage
        log["step"] += step0
        log["elapsed"] += elapsed0
        if (folder / _EVAL_LOG).is_file():
            val = pd.read_csv(folder / _EVAL_LOG)
            val["stage"] = stage
            val["step"] += step0
            vals.append(val)
        logs.append(log)
        step0, elapsed0 = int(log["step"].iloc[-1]) + 1, float(log["elapsed"].iloc[-1])
    return pd.concat(logs, ignore_index=True), (pd.concat(vals, ignore_index=True) if vals else None)


def rewrite_model_card(model_dir: str | Path = DEFAULT_READER_DIR) -> Path:
    """Rebuild ``MODEL_CARD.md`` of a saved reader from what its ``training/`` folder recorded
    (config, logs, ``eval_results.json``), without training or evaluating again."""
    folder = Path(model_dir) / "training"
    cfg = TrainConfig.from_dict(json.loads((folder / "train_config.json").read_text()))
    saved = json.loads((folder / "eval_results.json").read_text())
    import pandas as pd

    log = pd.read_csv(folder / _TRAIN_LOG)
    validation = pd.read_csv(folder / _EVAL_LOG) if (folder / _EVAL_LOG).is_file() else None
    last_val = {} if validation is None or not len(validation) else {
        k: float(v) for k, v in validation.iloc[-1].items() if k != "step"
    }
    result = TrainResult(
        steps=int(log["step"].iloc[-1]) + 1,
        train_seconds=float(log["elapsed"].iloc[-1]),
        final=log.iloc[-1].to_dict(),
        validation=last_val,
        out_dir=Path(model_dir),
    )
    return write_model_card(model_dir, cfg, result, saved, command=saved["command"], n_docs=saved["n_docs"], eval_seed=saved["seed"])


# --------------------------------------------------------------------------------------------
# CLI


def _train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {}
    for name in ("steps", "batch_size", "seed", "lr", "warmup_steps", "aux_weight", "position_weight", "position_layer", "position_start",
                 "pointer_weight", "pointer_layer", "pointer_start", "key_weight", "key_layer", "key_start", "value_multi_key", "threads", "data_workers", "validate_every", "checkpoint_every", "validation_docs"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    if args.no_shared_prefix:
        overrides["shared_prefix"] = False
    if args.pointer_blanks is not None:
        overrides["pointer_blanks"] = args.pointer_blanks
    if args.init_from is not None:
        overrides["init_from"] = args.init_from
    if args.task_weights is not None:
        overrides["task_weights"] = tuple(args.task_weights)
    for name in ("easy_until", "ramp_until"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return TrainConfig(**overrides)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sparsemm_utils.tiny`` (sub-commands train, card, evaluate)."""
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.tiny", description="Train or evaluate the tiny reader.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a reader, save it, evaluate it and write its model card")
    tr.add_argument("--out", default=str(DEFAULT_READER_DIR), help="release folder (default data/tiny_reader)")
    tr.add_argument("--work-dir", default=str(repo_root() / "runs" / "tiny_reader_train"), help="logs and resumable checkpoints")
    for name, typ in (("steps", int), ("batch-size", int), ("seed", int), ("lr", float), ("warmup-steps", int),
                      ("aux-weight", float), ("position-weight", float), ("position-layer", int), ("position-start", float),
                      ("pointer-weight", float), ("pointer-layer", int), ("pointer-start", float),
                      ("key-weight", float), ("key-layer", int), ("key-start", float), ("value-multi-key", float), ("threads", int), ("data-workers", int), ("validate-every", int), ("checkpoint-every", int),
                      ("validation-docs", int)):
        tr.add_argument(f"--{name}", type=typ, default=None)
    tr.add_argument("--no-shared-prefix", action="store_true")
    tr.add_argument("--pointer-blanks", action=argparse.BooleanOptionalAction, default=None,
                    help="point spaces, line breaks and the end at the blank cell they show (default: on)")
    tr.add_argument("--init-from", default=None, help="start from a saved reader (a second training stage)")
    tr.add_argument("--task-weights", type=float, nargs=3, default=None, metavar=("OCR", "LINE", "VALUE"))
    tr.add_argument("--easy-until", type=float, default=None)
    tr.add_argument("--ramp-until", type=float, default=None)
    tr.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --work-dir and start over")
    tr.add_argument("--eval-docs", type=int, default=200, help="held-out pages for the model card (0: skip)")
    cd = sub.add_parser("card", help="rebuild MODEL_CARD.md from a saved reader's training folder")
    cd.add_argument("--model", default=str(DEFAULT_READER_DIR))
    ev = sub.add_parser("evaluate", help="greedy accuracy of a saved reader on held-out pages")
    ev.add_argument("--model", default=str(DEFAULT_READER_DIR))
    ev.add_argument("--docs", type=int, default=200)
    ev.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ev.add_argument("--tasks", nargs="+", default=list(TASK_TYPES), choices=list(TASK_TYPES))
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--out", default=None, help="write the summary and records as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "train":
        cfg = _train_config_from_args(args)
        command = "python -m sparsemm_utils.tiny " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        model, processor, aux_head, result = train_reader(cfg, args.work_dir, resume=not args.no_resume)
        save_reader(model, processor, aux_head, args.out, args.work_dir)
        print(f"saved the reader to {args.out} ({result.train_seconds / 60:.1f} min of training)")
        if args.eval_docs:
            from .models import load_model

            loaded = load_model(args.out)
            evaluation = evaluate_reader(loaded, heldout_documents(args.eval_docs, cfg.doc_spec), seed=HELDOUT_SEED)
            card = write_model_card(args.out, cfg, result, evaluation, command=command, n_docs=args.eval_docs)
            print(json.dumps(evaluation["summary"], indent=1))
            print(f"wrote {card}")
        return 0

    if args.command == "card":
        print(f"wrote {rewrite_model_card(args.model)}")
        return 0

    torch.set_num_threads(args.threads)
    from .models import load_model

    loaded = load_model(args.model)
    spec = reader_doc_spec(args.model)
    evaluation = evaluate_reader(loaded, heldout_documents(args.docs, spec, args.seed), args.tasks, seed=args.seed)
    print(json.dumps(evaluation["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(evaluation, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
