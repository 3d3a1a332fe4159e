"""``python -m sparsemm_utils.study_model``: train the study model's parts, assemble the model.

    python -m sparsemm_utils.study_model train --out data/study_model     # both stages (see --help)
    python -m sparsemm_utils.study_model validate --recipe "what changed" --record data/study_model/recipes.json
    python -m sparsemm_utils.study_model assemble                         # -> build/study_model/
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from sparsemm_utils.models import LoadedModel
from sparsemm_utils.reader_tasks import STUDY_PAGES, TASK_TYPES, VALIDATION_SEED
from sparsemm_utils.tiny_reader.accuracy import evaluate_reader

from .architecture import StudyModelSpec, build_processor, build_study_model, merge_lora, trained_state
from .assemble import (
    ASSEMBLED_DIR,
    CONFIG_FILE,
    LOG_FILE,
    PARTS_DIR,
    SPEC_FILE,
    TRAINED_FILE,
    VALIDATION_FILE,
    assemble,
    build_from_parts,
    ensure_assembled,
)
from .card import write_card
from .backbone import BACKBONE, load_backbone
from .training import StudyTrainConfig, train_alignment, train_tasks
from .validation import validate_recipe

__all__ = ["main", "train", "validate_parts"]


def _validator(model, processor, cfg: StudyTrainConfig, history: list):
    docs = [STUDY_PAGES.render(VALIDATION_SEED, i) | {"doc_id": i} for i in range(cfg.validation_docs)]
    loaded = LoadedModel(model=model, processor=processor, model_type="llava_next", name_or_path="study model (training)")

    def validate(step: int) -> dict:
        result = evaluate_reader(loaded, docs, TASK_TYPES, seed=VALIDATION_SEED, max_new_tokens=96, progress=False)
        history.append({"step": step, **result})
        flat = {"exact_match": result["summary"]["all"]["exact_match"]}
        for task, summary in result["summary"].items():
            flat[f"{task}_exact"] = summary["exact_match"]
            flat[f"{task}_chars"] = summary["char_accuracy"]
        return flat

    return validate


def train(cfg: StudyTrainConfig, out: Path, *, log=print) -> dict:
    """Train both stages from the pinned backbone and write the parts, logs and validation results
    into ``out``. Returns a summary (minutes per stage, final validation)."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, lm = load_backbone()
    processor = build_processor(tokenizer, cfg.spec)
    model = build_study_model(lm, processor, cfg.spec, seed=cfg.seed)
    del lm
    history: list = []
    t0 = time.perf_counter()
    align_log = train_alignment(model, processor, cfg, log=lambda r: log(_short(r)))
    t1 = time.perf_counter()
    task_log = train_tasks(model, processor, cfg, validate=_validator(model, processor, cfg, history), log=lambda r: log(_short(r)))
    t2 = time.perf_counter()
    save_file(trained_state(model), str(out / TRAINED_FILE))
    (out / SPEC_FILE).write_text(json.dumps(cfg.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    pd.concat([align_log, task_log], ignore_index=True).to_csv(out / LOG_FILE, index=False)
    summary = {
        "alignment_minutes": round((t1 - t0) / 60, 2),
        "task_minutes": round((t2 - t1) / 60, 2),
        "training_minutes": round((t2 - t0) / 60, 2),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "backbone": f"{BACKBONE.distribution}=={BACKBONE.version}",
        "validation_seed": VALIDATION_SEED,
        "validation": history,
    }
    (out / VALIDATION_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    write_card(out)
    return summary


def validate_parts(parts: Path, *, recipe: str, command: str = "") -> dict:
    """:func:`.validation.validate_recipe` on the model built from ``parts`` (adapters merged), with
    the recipe's training minutes from its ``validation.json``."""
    model, processor, _ = build_from_parts(parts)
    merge_lora(model)
    loaded = LoadedModel(model=model, processor=processor, model_type="llava_next", name_or_path=str(parts))
    trained = json.loads((Path(parts) / VALIDATION_FILE).read_text(encoding="utf-8")) if (Path(parts) / VALIDATION_FILE).is_file() else {}
    result = validate_recipe(loaded)
    return {"recipe": recipe, "command": command, "training_minutes": trained.get("training_minutes"), **result}


def _short(record: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _config_from_args(args: argparse.Namespace) -> StudyTrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(StudyTrainConfig) if f.name != "spec" and getattr(args, f.name, None) is not None}
    spec = StudyModelSpec(lora_rank=args.lora_rank) if args.lora_rank is not None else StudyModelSpec()
    return StudyTrainConfig(**values, spec=spec)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.study_model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the vision front end and adapters (defaults: the shipped recipe)")
    tr.add_argument("--out", type=Path, default=PARTS_DIR, help="parts folder to write (default %(default)s)")
    defaults = StudyTrainConfig()
    for f in fields(StudyTrainConfig):
        if f.name in ("spec",):
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            tr.add_argument(f"--{f.name.replace('_', '-')}", type=float, nargs=len(value), default=None, help=f"default {list(value)}")
        else:
            tr.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    tr.add_argument("--lora-rank", type=int, default=None, help=f"default {StudyModelSpec().lora_rank}")
    va = sub.add_parser("validate", help="judge trained parts on validation pages (heads, FullKV, SparseMM vs random)")
    va.add_argument("--parts", type=Path, default=PARTS_DIR)
    va.add_argument("--recipe", required=True, help="what this recipe changed (one line, for the model card)")
    va.add_argument("--command", dest="train_command", default="", help="the training command that made the parts")
    va.add_argument("--record", type=Path, default=None, help="append the result to this JSON list (e.g. data/study_model/recipes.json)")
    va.add_argument("--threads", type=int, default=2)
    cd = sub.add_parser("card", help="(re)write <parts>/MODEL_CARD.md from the files beside it")
    cd.add_argument("--parts", type=Path, default=PARTS_DIR)
    asm = sub.add_parser("assemble", help="join the pinned backbone and the trained parts into a model folder")
    asm.add_argument("--out", type=Path, default=ASSEMBLED_DIR)
    asm.add_argument("--parts", type=Path, default=PARTS_DIR)
    asm.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    if args.command == "train":
        cfg = _config_from_args(args)
        summary = train(cfg, args.out)
        print(json.dumps({k: v for k, v in summary.items() if k != "validation"}, indent=2))
        return 0
    if args.command == "card":
        print(write_card(args.parts))
        return 0
    if args.command == "validate":
        torch.set_num_threads(args.threads)
        result = validate_parts(args.parts, recipe=args.recipe, command=args.train_command)
        if args.record is not None:
            records = json.loads(args.record.read_text(encoding="utf-8")) if args.record.is_file() else []
            records.append(result)
            args.record.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2))
        return 0
    folder = assemble(args.out, args.parts) if args.force else ensure_assembled(args.out, args.parts)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
