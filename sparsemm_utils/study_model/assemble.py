"""Joining the pinned backbone and the parts trained here into one ordinary model folder.

``data/study_model/`` ships only what was trained here (``trained.safetensors``: vision tower,
projector, ``image_newline``, LoRA adapters; ``spec.json``: the architecture), a few MB. The 135M
backbone comes from the pinned package (:mod:`.backbone`). :func:`assemble` builds the study model
from both, folds the adapters into the language model's weights, and saves a plain
``LlavaNextForConditionalGeneration`` folder (``save_pretrained``) with its processor, so the
chain loads it with :func:`sparsemm_utils.models.load_model` like any other checkpoint (about
550 MB in float32; built once, ``build/study_model/`` by default, and rebuilt only when the parts
or the backbone change: ``assembled_from.json`` records their sha256).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sparsemm_utils.manifest import sha256_file
from sparsemm_utils.runs import repo_root

from .architecture import StudyModelError, StudyModelSpec, build_processor, build_study_model, load_trained_state, merge_lora
from .backbone import BACKBONE, load_backbone

__all__ = [
    "PARTS_DIR",
    "ASSEMBLED_DIR",
    "TRAINED_FILE",
    "SPEC_FILE",
    "RECORD_FILE",
    "LOG_FILE",
    "VALIDATION_FILE",
    "CONFIG_FILE",
    "RECIPES_FILE",
    "CARD_FILE",
    "StudyPartsError",
    "read_spec",
    "build_from_parts",
    "assemble",
    "ensure_assembled",
]

#: The shipped trained parts (relative to the repository root).
PARTS_DIR = Path("data/study_model")
#: Where `make reproduce` assembles the model (git-ignored).
ASSEMBLED_DIR = Path("build/study_model")
TRAINED_FILE = "trained.safetensors"
SPEC_FILE = "spec.json"
RECORD_FILE = "assembled_from.json"
#: What training writes beside the parts (read by the model card).
LOG_FILE = "training_log.csv"
VALIDATION_FILE = "validation.json"
CONFIG_FILE = "train_config.json"
RECIPES_FILE = "recipes.json"
CARD_FILE = "MODEL_CARD.md"


class StudyPartsError(FileNotFoundError):
    """The trained parts are missing or unreadable."""


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path


def read_spec(parts: str | Path = PARTS_DIR) -> StudyModelSpec:
    """The architecture the parts were trained for (``spec.json``)."""
    path = _resolve(parts) / SPEC_FILE
    if not path.is_file():
        raise StudyPartsError(f"{path} is missing: {_resolve(parts)} is not a study-model parts folder (train one with "
                              f"`python -m sparsemm_utils.study_model train`)")
    try:
        return StudyModelSpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise StudyPartsError(f"{path} is not a valid study-model spec: {exc}") from exc


def build_from_parts(parts: str | Path = PARTS_DIR, *, backbone: tuple[Any, Any] | None = None) -> tuple[Any, Any, StudyModelSpec]:
    """``(model, processor, spec)``: the study model with the trained parts loaded, adapters not
    yet merged (what training and tests use). ``backbone``: ``(tokenizer, lm)`` already loaded."""
    folder = _resolve(parts)
    spec = read_spec(folder)
    trained = folder / TRAINED_FILE
    if not trained.is_file():
        raise StudyPartsError(f"{trained} is missing (the trained vision tower, projector and adapters)")
    try:
        state = load_file(str(trained))
    except Exception as exc:  # safetensors raises its own error type for a truncated file
        raise StudyPartsError(f"{trained} cannot be read ({exc}); restore it from git (`git checkout {PARTS_DIR}`)") from exc
    tokenizer, lm = backbone or load_backbone()
    processor = build_processor(tokenizer, spec)
    model = build_study_model(lm, processor, spec)
    load_trained_state(model, state)
    return model, processor, spec


def _record(parts: Path) -> dict[str, str]:
    return {
        "backbone": f"{BACKBONE.distribution}=={BACKBONE.version} {BACKBONE.filename} sha256 {BACKBONE.sha256}",
        "trained_sha256": sha256_file(parts / TRAINED_FILE),
        "spec_sha256": sha256_file(parts / SPEC_FILE),
    }


def assemble(out: str | Path = ASSEMBLED_DIR, parts: str | Path = PARTS_DIR, *, log: Callable[[str], None] = print) -> Path:
    """Build the study model from ``parts`` and the pinned backbone, merge the adapters, and save
    model + processor to ``out`` (written to a temporary folder first, then moved into place)."""
    parts, out = _resolve(parts), _resolve(out)
    model, processor, _ = build_from_parts(parts)
    merged = merge_lora(model)
    log(f"assembled the study model: {merged} LoRA adapters merged into the language model")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / RECORD_FILE).write_text(json.dumps(_record(parts), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def ensure_assembled(out: str | Path = ASSEMBLED_DIR, parts: str | Path = PARTS_DIR, *, log: Callable[[str], None] = print) -> Path:
    """``out`` when it was assembled from the current parts and backbone, else :func:`assemble`."""
    parts, out = _resolve(parts), _resolve(out)
    record = out / RECORD_FILE
    if record.is_file():
        try:
            if json.loads(record.read_text(encoding="utf-8")) == _record(parts):
                log(f"{out} is up to date with {parts}")
                return out
        except ValueError:
            pass
    if not (parts / TRAINED_FILE).is_file():
        raise StudyModelError(f"no trained parts in {parts}: train them first (`python -m sparsemm_utils.study_model train`)")
    return assemble(out, parts, log=log)

