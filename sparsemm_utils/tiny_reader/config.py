"""What determines a reader: its sizes (:class:`ReaderModelSpec`) and its training run
(:class:`TrainConfig`), with the package's errors and where the shipped reader lives.

A config is the whole recipe: the same :class:`TrainConfig` on the same machine gives the same
weights (:func:`~sparsemm_utils.tiny_reader.training.train_reader`). It is saved with the reader
(``training/train_config.json``), so :func:`reader_doc_spec` can tell the page distribution a saved
reader was trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sparsemm_utils.random_models import TinySpec
from sparsemm_utils.reader_tasks import HELDOUT_SEED, TASK_TYPES, VALIDATION_SEED, ReaderDocSpec
from sparsemm_utils.runs import repo_root
from sparsemm_utils.validate import check_fraction, check_int

__all__ = [
    "DEFAULT_READER_DIR",
    "TinyReaderError",
    "TrainConfigError",
    "CheckpointMismatchError",
    "ReaderModelSpec",
    "TrainConfig",
    "reader_doc_spec",
]

#: Where the shipped checkpoint lives (``load_model(DEFAULT_READER_DIR)``).
DEFAULT_READER_DIR: Path = repo_root() / "data" / "tiny_reader"


class TinyReaderError(RuntimeError):
    """Base class of the tiny reader's errors."""


class TrainConfigError(ValueError):
    """A training parameter is invalid; the message names it and the accepted values."""


class CheckpointMismatchError(TinyReaderError):
    """A checkpoint to resume from was written with another training configuration."""


@dataclass(frozen=True)
class ReaderModelSpec:
    """Sizes of the reader (a ``Qwen2VLForConditionalGeneration``; :mod:`sparsemm_utils.tiny_reader`).

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

    def tiny_spec(self) -> TinySpec:
        """The same sizes as a :class:`~sparsemm_utils.random_models.TinySpec` (what builds the model)."""
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


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TrainConfigError(message)


@dataclass
class TrainConfig:
    """Everything that determines a training run (:mod:`sparsemm_utils.tiny_reader`). Same config,
    same weights.

    - ``steps``, ``batch_size``: optimizer steps and sequences per step;
    - ``seed``: weight initialisation AND the training document stream;
    - ``lr`` (peak), ``warmup_steps``, ``min_lr_ratio``: linear warm-up from 0, then cosine to
      ``min_lr_ratio * lr`` at the last step
      (:func:`~sparsemm_utils.tiny_reader.training.learning_rate`);
    - ``weight_decay``, ``beta1``, ``beta2``, ``grad_clip``: AdamW and global-norm clipping;
    - ``aux_weight``: weight of the auxiliary glyph loss (0 disables it);
    - ``position_weight``, ``position_layer``, ``position_start``: weight of the auxiliary
      position loss (0 disables it), the language-model hidden state it reads (1 = the output of
      the first decoder layer; :class:`~sparsemm_utils.tiny_reader.model.AuxiliaryHeads`), and
      the share of the run after which it is switched on (before that the run is exactly the run
      without it);
    - ``pointer_weight``, ``pointer_layer``, ``pointer_start``: the same for the auxiliary
      pointer loss (:class:`~sparsemm_utils.tiny_reader.model.AuxiliaryHeads`: the answer step
      names the row and column of the character it emits next); ``pointer_blanks``: also at the
      steps that emit a space, a line break or the closing ``<|im_end|>``, pointing at the empty
      cell right of the glyph before it
      (:func:`~sparsemm_utils.tiny_reader.batches.answer_pointer_labels` with ``blanks``);
    - ``key_weight``, ``key_layer``, ``key_start``: the same for the auxiliary key pointer loss
      (:class:`~sparsemm_utils.tiny_reader.model.AuxiliaryHeads`: on a value question, the prompt
      steps after the key name the row and column of the key's last glyph); 0 disables it;
    - ``value_multi_key``: probability that the page of a ``value`` question (a full page, not a
      curriculum easy page) must hold two keys or more, so that the answer depends on which key
      is asked (:func:`~sparsemm_utils.tiny_reader.curriculum.step_samples`); 0 keeps the natural
      mix of one-key and multi-key pages
      (:func:`~sparsemm_utils.tiny_reader.accuracy.value_accuracy_by_keys` counts them);
    - ``task_weights``: probability of each task of :data:`~sparsemm_utils.reader_tasks.TASK_TYPES`
      per step (:func:`~sparsemm_utils.tiny_reader.curriculum.step_task`);
    - ``easy_lines``, ``easy_until``, ``ramp_until``, ``full_fraction``: the curriculum
      (:func:`~sparsemm_utils.tiny_reader.curriculum.easy_page_probability`);
    - ``validate_every``, ``validation_docs``: the monitor (teacher-forced exact match on
      ``validation_docs`` pages of :data:`~sparsemm_utils.reader_tasks.VALIDATION_SEED`, every
      task); 0 disables it;
    - ``checkpoint_every``: steps between resumable checkpoints (0: none);
    - ``threads``: ``torch.set_num_threads``; ``data_workers``: processes that render batches
      ahead (0: in the training process; the batches are the same either way);
      ``shared_prefix``: run the common prefix once;
    - ``init_from``: start from the weights of a reader saved by
      :func:`~sparsemm_utils.tiny_reader.training.save_reader` (its model and auxiliary head; the
      optimizer starts afresh) instead of random weights: a second training stage. Relative paths are taken from the repository root; ``model_spec`` must match.
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
            setattr(self, name, check_int(f"{own}.{name}", getattr(self, name), 1, error=TrainConfigError))
        for name in ("seed", "warmup_steps", "validate_every", "validation_docs", "checkpoint_every", "data_workers"):
            setattr(self, name, check_int(f"{own}.{name}", getattr(self, name), 0, error=TrainConfigError))
        _check(self.seed not in (HELDOUT_SEED, VALIDATION_SEED), f"{own}.seed must differ from the held-out seeds {HELDOUT_SEED} and {VALIDATION_SEED}")
        _check(0 < self.lr < 1, f"{own}.lr must be in (0, 1), got {self.lr!r}")
        check_fraction(f"{own}.min_lr_ratio", self.min_lr_ratio, error=TrainConfigError)
        _check(self.weight_decay >= 0 and self.grad_clip > 0 and self.aux_weight >= 0,
               f"{own}: weight_decay and aux_weight must be >= 0 and grad_clip > 0")
        for head in ("position", "pointer", "key"):
            weight = getattr(self, f"{head}_weight")
            _check(weight >= 0, f"{own}.{head}_weight must be >= 0, got {weight!r}")
            check_fraction(f"{own}.{head}_start", getattr(self, f"{head}_start"), error=TrainConfigError)
            name = f"{head}_layer"
            setattr(self, name, check_int(f"{own}.{name}", getattr(self, name), 1, self.model_spec.text_layers,
                                          error=TrainConfigError, hint="the output of that decoder layer"))
        check_fraction(f"{own}.value_multi_key", self.value_multi_key, error=TrainConfigError, hint="a probability")
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
        check_fraction(f"{own}.full_fraction", self.full_fraction, error=TrainConfigError)
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


def reader_doc_spec(model_dir: str | Path) -> ReaderDocSpec:
    """The page distribution a saved reader was trained on (``training/train_config.json``),
    or the default :class:`ReaderDocSpec` when the folder has no training config."""
    path = Path(model_dir) / "training" / "train_config.json"
    if not path.is_file():
        return ReaderDocSpec()
    return TrainConfig.from_dict(json.loads(path.read_text())).doc_spec
