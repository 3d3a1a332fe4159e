"""Training the study model's vision front end and adapters (data/study_model/MODEL_CARD.md).

Two stages, both on the project's synthetic pages (:mod:`.pages`, stream :data:`.pages.TRAIN_SEED`):

1. **Alignment** (no language-model forward pass): the vision tower and projector learn to turn
   each glyph cell into the language model's own input embedding of that character (``" "`` for
   an empty cell). Loss per cell: squared error relative to the target embedding's squared norm
   (glyph cells weighted 1, empty cells ``empty_weight``), plus a cross-entropy that ranks the
   target's embedding first among the page characters' embeddings (dot products, as the tied LM
   head scores tokens). After it, a page reaches the frozen language model as the text it shows,
   laid out row by row with a newline after each row.
2. **Tasks**: the whole model answers reading questions (:mod:`sparsemm_utils.reader_tasks`:
   read everything with the study's OCR prompt, read line k, value of KEY); cross-entropy on the
   answer tokens trains the LoRA adapters, the vision tower, the projector and ``image_newline``,
   with the alignment loss kept at ``align_weight``. One task per step, drawn with
   ``task_weights``.

Nothing in either loss looks at attention, and the adapters sit on every layer alike: which
heads end up reading the image is left to training (docs/method.md §4).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparsemm_utils.reader_tasks import STUDY_PAGES, TASK_TYPES
from sparsemm_utils.validate import check_fraction, check_int

from .architecture import StudyModelSpec, lora_modules
from .pages import TRAIN_SEED, TaskBatch, cell_targets, char_token_id, draw_samples, task_batch

__all__ = [
    "StudyTrainConfig",
    "StudyTrainingError",
    "image_features",
    "alignment_loss",
    "answer_loss",
    "train_alignment",
    "train_tasks",
    "learning_rate_factor",
    "alignment_similarity",
]


class StudyTrainingError(ValueError):
    """A training configuration or state is invalid."""


@dataclass(frozen=True)
class StudyTrainConfig:
    """The recipe (defaults: the shipped study model; data/study_model/MODEL_CARD.md)."""

    seed: int = 0
    align_steps: int = 800
    align_batch: int = 16
    align_lr: float = 1e-3
    empty_weight: float = 0.25
    task_steps: int = 300
    task_batch: int = 8
    lora_lr: float = 3e-4
    vision_lr: float = 1e-4
    warmup: int = 30
    final_lr_fraction: float = 0.1
    align_weight: float = 0.5
    task_weights: tuple[float, float, float] = (0.3, 0.3, 0.4)
    grad_clip: float = 1.0
    threads: int = 2
    validation_every: int = 300
    validation_docs: int = 20
    spec: StudyModelSpec = field(default_factory=StudyModelSpec)

    def __post_init__(self) -> None:
        own = "StudyTrainConfig"
        for name in ("seed", "align_steps", "task_steps", "warmup", "validation_every", "validation_docs"):
            check_int(f"{own}.{name}", getattr(self, name), 0, error=StudyTrainingError)
        for name in ("align_batch", "task_batch", "threads"):
            check_int(f"{own}.{name}", getattr(self, name), 1, error=StudyTrainingError)
        for name in ("align_lr", "lora_lr", "vision_lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise StudyTrainingError(f"{own}.{name} must be a number > 0, got {value!r}")
        for name in ("empty_weight", "final_lr_fraction"):
            check_fraction(f"{own}.{name}", getattr(self, name), error=StudyTrainingError)
        if not isinstance(self.align_weight, (int, float)) or self.align_weight < 0:
            raise StudyTrainingError(f"{own}.align_weight must be >= 0, got {self.align_weight!r}")
        weights = tuple(float(w) for w in self.task_weights)
        if len(weights) != len(TASK_TYPES) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise StudyTrainingError(
                f"{own}.task_weights must be {len(TASK_TYPES)} non-negative weights for {TASK_TYPES} with a positive sum, "
                f"got {self.task_weights!r}"
            )
        object.__setattr__(self, "task_weights", weights)
        if isinstance(self.spec, Mapping):
            object.__setattr__(self, "spec", StudyModelSpec.from_dict(self.spec))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["task_weights"] = list(self.task_weights)
        out["spec"] = self.spec.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "StudyTrainConfig":
        raw = dict(raw)
        raw["task_weights"] = tuple(raw.get("task_weights", cls.task_weights))
        raw["spec"] = StudyModelSpec.from_dict(raw.get("spec", {}))
        return cls(**raw)


def image_features(model: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """(B, tokens, hidden): the LLM-ready image tokens of each page (base image, then the crop grid
    with a newline token after each row), as LLaVA-NeXT packs them."""
    out = model.model.get_image_features(
        pixel_values, image_sizes, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    return torch.stack(list(out))


def _grid(features: torch.Tensor, spec: StudyModelSpec, rows: int, cols: int) -> torch.Tensor:
    """(B, rows, cols, hidden): the crop-grid tokens of packed features (base and newlines left out)."""
    base = spec.grid**2
    return features[:, base:].reshape(features.shape[0], rows, cols + 1, -1)[:, :, :cols]


def alignment_loss(
    features: torch.Tensor, targets: torch.Tensor, embeddings: torch.Tensor, candidates: torch.Tensor, space_id: int,
    spec: StudyModelSpec, empty_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The alignment loss of packed ``features`` (B, tokens, hidden) against ``targets`` (B, rows,
    cols) token ids: relative squared error to ``embeddings[targets]`` plus cross-entropy over the
    ``candidates`` ids (dot-product scores), glyph cells weighted 1 and empty cells ``empty_weight``.
    Returns the loss and diagnostics (glyph accuracy, relative errors)."""
    rows, cols = targets.shape[1:]
    grid = _grid(features, spec, rows, cols)
    target = embeddings[targets]
    relative = ((grid - target) ** 2).sum(-1) / (target**2).sum(-1)
    glyph = targets != space_id
    weight = torch.where(glyph, 1.0, empty_weight)
    logits = grid.reshape(-1, grid.shape[-1]) @ embeddings[candidates].T
    labels = (targets.reshape(-1, 1) == candidates[None]).float().argmax(-1)
    ce = F.cross_entropy(logits, labels, reduction="none")
    flat_weight = weight.reshape(-1)
    loss = (relative * weight).sum() / weight.sum() + (ce * flat_weight).sum() / flat_weight.sum()
    hit = logits.argmax(-1) == labels
    stats = {
        "glyph_accuracy": float(hit[glyph.reshape(-1)].float().mean()) if glyph.any() else float("nan"),
        "empty_accuracy": float(hit[~glyph.reshape(-1)].float().mean()) if (~glyph).any() else float("nan"),
        "glyph_rel_error": float(relative[glyph].detach().mean()) if glyph.any() else float("nan"),
        "empty_rel_error": float(relative[~glyph].detach().mean()) if (~glyph).any() else float("nan"),
    }
    return loss, stats


def answer_loss(model: Any, batch: TaskBatch, features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the answer tokens (and their ``<|im_end|>``), the LM head applied to the
    answer positions only; returns the loss and the token accuracy."""
    embeds = model.model.language_model.embed_tokens(batch.input_ids)
    image = batch.input_ids == model.config.image_token_index
    if int(image.sum()) != features.shape[0] * features.shape[1]:
        raise StudyTrainingError(
            f"the prompts hold {int(image.sum())} image tokens, the pages give {features.shape[0] * features.shape[1]} features"
        )
    embeds = embeds.masked_scatter(image[..., None].expand_as(embeds), features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    shifted = batch.labels[:, 1:]
    keep = shifted != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits, shifted[keep])
    return loss, float((logits.argmax(-1) == shifted[keep]).float().mean())


def learning_rate_factor(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _vision_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), model.model.image_newline]


def _freeze_language_model(model: Any) -> list[torch.nn.Parameter]:
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    lora = []
    for _, module in lora_modules(model):
        module.lora_a.requires_grad_(True)
        module.lora_b.requires_grad_(True)
        lora += [module.lora_a, module.lora_b]
    return lora


def _candidates(tokenizer: Any) -> torch.Tensor:
    return torch.tensor(sorted({char_token_id(tokenizer, c) for c in STUDY_PAGES.charset} | {char_token_id(tokenizer, " ")}))


def train_alignment(model: Any, processor: Any, cfg: StudyTrainConfig, *, log: Callable[[dict], None] = print) -> pd.DataFrame:
    """Stage 1: the vision tower and projector only (module docstring). Returns the log table."""
    spec, tokenizer = cfg.spec, processor.tokenizer
    _freeze_language_model(model)
    embeddings = model.model.language_model.embed_tokens.weight.detach()
    candidates, space = _candidates(tokenizer), char_token_id(tokenizer, " ")
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.align_lr, weight_decay=0.01)
    rows, cols = STUDY_PAGES.rows[0], STUDY_PAGES.cols[0]
    records, start = [], time.perf_counter()
    model.train()
    for step in range(cfg.align_steps):
        docs = [STUDY_PAGES.render(TRAIN_SEED, step * cfg.align_batch + i) for i in range(cfg.align_batch)]
        pixels = processor.image_processor(images=[d["image"] for d in docs], return_tensors="pt")
        targets = torch.stack([cell_targets(d, tokenizer, rows, cols, spec.cell) for d in docs])
        features = image_features(model, pixels["pixel_values"], pixels["image_sizes"])
        loss, stats = alignment_loss(features, targets, embeddings, candidates, space, spec, cfg.empty_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = {"stage": "align", "step": step, "loss": float(loss), **stats, "seconds": time.perf_counter() - start}
        records.append(record)
        if step % 50 == 0 or step == cfg.align_steps - 1:
            log(record)
    model.eval()
    return pd.DataFrame(records)


def train_tasks(
    model: Any,
    processor: Any,
    cfg: StudyTrainConfig,
    *,
    validate: Callable[[int], dict] | None = None,
    log: Callable[[dict], None] = print,
) -> pd.DataFrame:
    """Stage 2: answers of the reading tasks (module docstring). ``validate(step)`` is called every
    ``validation_every`` steps and at the end; its dict goes into the log. Returns the log table."""
    spec, tokenizer = cfg.spec, processor.tokenizer
    lora = _freeze_language_model(model)
    vision = _vision_parameters(model)
    for p in vision:
        p.requires_grad_(True)
    groups = [{"params": lora, "lr": cfg.lora_lr}, {"params": vision, "lr": cfg.vision_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in groups]
    embeddings = model.model.language_model.embed_tokens.weight.detach()
    candidates, space = _candidates(tokenizer), char_token_id(tokenizer, " ")
    weights = np.asarray(cfg.task_weights) / sum(cfg.task_weights)
    records, start = [], time.perf_counter()
    model.train()
    for step in range(cfg.task_steps):
        rng = np.random.default_rng([cfg.seed, 7, step])
        task = TASK_TYPES[int(rng.choice(len(TASK_TYPES), p=weights))]
        docs, questions = draw_samples(STUDY_PAGES, TRAIN_SEED, 1_000_000 + step * 64, cfg.task_batch, task, rng)
        batch = task_batch(processor, docs, questions, spec.cell)
        factor = learning_rate_factor(step, cfg.task_steps, cfg.warmup, cfg.final_lr_fraction)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        features = image_features(model, batch.pixel_values, batch.image_sizes)
        ce, accuracy = answer_loss(model, batch, features)
        align, stats = alignment_loss(features, batch.targets, embeddings, candidates, space, spec, cfg.empty_weight)
        loss = ce + cfg.align_weight * align
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + vision, cfg.grad_clip)
        optimizer.step()
        record = {
            "stage": "tasks", "step": step, "task": task, "loss": float(loss), "answer_loss": float(ce),
            "token_accuracy": accuracy, "align_loss": float(align), "glyph_accuracy": stats["glyph_accuracy"],
            "tokens": batch.tokens, "seconds": time.perf_counter() - start,
        }
        last = step == cfg.task_steps - 1
        if validate is not None and cfg.validation_every and ((step + 1) % cfg.validation_every == 0 or last):
            model.eval()
            record.update({f"val_{k}": v for k, v in validate(step + 1).items()})
            model.train()
        records.append(record)
        if step % 10 == 0 or last or "val_exact_match" in record:
            log(record)
    model.eval()
    return pd.DataFrame(records)


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@torch.no_grad()
def alignment_similarity(model: Any, processor: Any, doc: Mapping[str, Any], cell: int = 28) -> tuple[list[str], list[str], np.ndarray]:
    """How far a page reaches the language model as its own text: for every glyph cell of ``doc``
    (row-major), the cosine similarity of its projected feature with the LLM's input embedding of
    each page character (the charset, then ``" "``). Returns (the cells' characters, the columns'
    characters, similarity (cells, characters)). Works on a trained or an assembled study model."""
    tokenizer = processor.tokenizer
    pixels = processor.image_processor(images=[doc["image"]], return_tensors="pt")
    features = image_features(model, pixels["pixel_values"], pixels["image_sizes"])[0]
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    width, height = doc["image"].size
    rows, cols = height // cell, width // cell
    grid = features[base:].reshape(rows, cols + 1, -1)[:, :cols]
    targets = cell_targets(doc, tokenizer, rows, cols, cell)
    space = char_token_id(tokenizer, " ")
    chars = list(STUDY_PAGES.charset) + [" "]
    ids = torch.tensor([char_token_id(tokenizer, c) for c in chars])
    embeddings = model.get_input_embeddings().weight[ids].float()
    glyph = targets != space
    cells = grid[glyph].float()
    similarity = F.normalize(cells, dim=-1) @ F.normalize(embeddings, dim=-1).T
    names = [tokenizer.decode([int(i)]) for i in targets[glyph].tolist()]
    return names, chars, similarity.numpy()
