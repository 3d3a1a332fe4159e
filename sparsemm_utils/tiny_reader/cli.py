"""The command line of the reader: ``python -m sparsemm_utils.tiny_reader train | card | evaluate``
(:func:`build_parser` lists the options; the package docstring shows the shipped reader's command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sparsemm_utils.models import load_model
from sparsemm_utils.reader_tasks import HELDOUT_SEED, TASK_TYPES, heldout_documents
from sparsemm_utils.runs import repo_root
from sparsemm_utils.tiny_reader.accuracy import evaluate_reader
from sparsemm_utils.tiny_reader.card import rewrite_model_card, write_model_card
from sparsemm_utils.tiny_reader.config import DEFAULT_READER_DIR, TrainConfig, reader_doc_spec
from sparsemm_utils.tiny_reader.training import save_reader, train_reader

__all__ = ["PROG", "train_config_from_args", "build_parser", "main"]

#: How the command is run (recorded with each trained reader, in its model card).
PROG = "python -m sparsemm_utils.tiny_reader"


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``train``'s options: the defaults, with each option given replacing its field."""
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
    """The command line of ``python -m sparsemm_utils.tiny_reader`` (sub-commands train, card, evaluate)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Train or evaluate the tiny reader.")
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
    """Run one sub-command (``argv``: default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)

    if args.command == "train":
        cfg = train_config_from_args(args)
        command = PROG + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        model, processor, aux_head, result = train_reader(cfg, args.work_dir, resume=not args.no_resume)
        save_reader(model, processor, aux_head, args.out, args.work_dir)
        print(f"saved the reader to {args.out} ({result.train_seconds / 60:.1f} min of training)")
        if args.eval_docs:
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
    loaded = load_model(args.model)
    spec = reader_doc_spec(args.model)
    evaluation = evaluate_reader(loaded, heldout_documents(args.docs, spec, args.seed), args.tasks, seed=args.seed)
    print(json.dumps(evaluation["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(evaluation, indent=1) + "\n")
    return 0
