"""The reader's training loop (:func:`train_reader`), its learning-rate schedule and its release
(:func:`save_reader`).

A run writes into its work folder a log row per step (:data:`TRAIN_LOG`), the monitor's results
(:data:`VALIDATION_LOG`), its config and resumable checkpoints (:data:`CHECKPOINT_FILE`);
:func:`save_reader` copies the logs into the release folder's ``training/``, and keeps the
``training/`` folder of the reader a second stage started from in :data:`PREVIOUS_STAGE_DIR`;
:func:`training_logs` reads a released reader's logs back, every stage joined.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Qwen2VLForConditionalGeneration

from sparsemm_utils.tiny_reader.batches import StepBatches, char_classes, validation_batches
from sparsemm_utils.tiny_reader.config import CheckpointMismatchError, TinyReaderError, TrainConfig, TrainConfigError
from sparsemm_utils.tiny_reader.curriculum import easy_page_probability, step_task
from sparsemm_utils.tiny_reader.losses import reader_losses
from sparsemm_utils.tiny_reader.model import AuxiliaryHeads, build_reader, linear_patch_embedding

__all__ = [
    "CHECKPOINT_FILE",
    "TRAIN_LOG",
    "VALIDATION_LOG",
    "PREVIOUS_STAGE_DIR",
    "TrainResult",
    "learning_rate",
    "train_reader",
    "save_reader",
    "training_logs",
]

#: Files of a work folder (and, but the checkpoint, of a release's ``training/``).
CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_LOG = "training_log.csv"
VALIDATION_LOG = "validation_log.csv"
#: Subfolder of a release's ``training/`` that holds the stage it was trained from (``init_from``).
PREVIOUS_STAGE_DIR = "previous_stage"


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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


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
    ckpt_path = work / CHECKPOINT_FILE
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
        for name in (TRAIN_LOG, VALIDATION_LOG):
            _truncate_csv(work / name, start - 1)
    else:
        for name in (TRAIN_LOG, VALIDATION_LOG, CHECKPOINT_FILE):
            (work / name).unlink(missing_ok=True)
    (work / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    val_batches = validation_batches(cfg, processor, classes) if cfg.validate_every else {}
    model.train()
    last: dict[str, float] = {}
    validation: dict[str, float] = {}
    end = cfg.steps if stop_after is None else min(cfg.steps, max(int(stop_after), start))
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="training the reader", disable=not progress)
    window: list[dict[str, float]] = []
    loader = torch.utils.data.DataLoader(
        StepBatches(cfg, processor, classes),
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
        _append_csv(work / TRAIN_LOG, last)
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
            _append_csv(work / VALIDATION_LOG, {"step": step, **validation})
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    training = out / "training"
    training.mkdir(exist_ok=True)
    if aux_head is not None:
        save_file({k: v.contiguous() for k, v in aux_head.state_dict().items()}, str(training / "aux_head.safetensors"))
    if work_dir is not None:
        for name in (TRAIN_LOG, VALIDATION_LOG, "train_config.json"):
            src = Path(work_dir) / name
            if src.exists():
                shutil.copyfile(src, training / name)
        config_path = Path(work_dir) / "train_config.json"
        if config_path.exists():
            cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
            previous = training / PREVIOUS_STAGE_DIR
            if previous.exists():
                shutil.rmtree(previous)
            if cfg.init_from is not None:
                # the stage this one started from: its logs (and, recursively, its own previous stage)
                shutil.copytree(cfg.init_source() / "training", previous, ignore=shutil.ignore_patterns("aux_head.safetensors"))
    return out


def training_logs(reader_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(training_log, validation_log)`` of a saved reader as DataFrames, every training stage
    included (``training/`` and, oldest first, ``training/previous_stage/...``): ``step`` and
    ``elapsed`` (seconds of optimizer wall time) continue across stages and a ``stage`` column
    (1, 2, ...) tells them apart. The validation log is ``None`` when no stage recorded one."""
    folders = []
    folder = Path(reader_dir) / "training"
    while (folder / TRAIN_LOG).is_file():
        folders.append(folder)
        folder = folder / PREVIOUS_STAGE_DIR
    if not folders:
        raise FileNotFoundError(
            f"{Path(reader_dir) / 'training' / TRAIN_LOG} is missing: this reader was not saved by save_reader with its work folder"
        )
    logs, vals = [], []
    step0, elapsed0 = 0, 0.0
    for stage, folder in enumerate(reversed(folders), start=1):
        log = pd.read_csv(folder / TRAIN_LOG)
        log["stage"] = stage
        log["step"] += step0
        log["elapsed"] += elapsed0
        if (folder / VALIDATION_LOG).is_file():
            val = pd.read_csv(folder / VALIDATION_LOG)
            val["stage"] = stage
            val["step"] += step0
            vals.append(val)
        logs.append(log)
        step0, elapsed0 = int(log["step"].iloc[-1]) + 1, float(log["elapsed"].iloc[-1])
    return pd.concat(logs, ignore_index=True), (pd.concat(vals, ignore_index=True) if vals else None)
