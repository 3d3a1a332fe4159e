"""Reproduce the accuracy in data/tiny_reader/MODEL_CARD.md (a benchmark, not a fast test).

Loads the shipped reader exactly like a real checkpoint (``sparsemm_utils.models.load_model``),
renders the same held-out pages as the model card (``training/eval_results.json``: number of
pages and seed), reads them with greedy decoding and the full KV cache (batch 1), and compares
exact match and character accuracy per task with the card's numbers.

    .venv/bin/python benchmarks/tiny_reader_accuracy.py                # all pages of the card
    .venv/bin/python benchmarks/tiny_reader_accuracy.py --docs 50      # a quicker subset
    .venv/bin/python benchmarks/tiny_reader_accuracy.py --out /tmp/reader_eval.json

Exit status 0 when every task's numbers agree with the card within ``--tolerance`` (default
0.01, room for float differences between CPUs; on the machine that trained it they are equal),
1 otherwise. With ``--docs`` smaller than the card's, only the printout is produced (no check).
About 3 minutes for 200 pages (561 questions) on 2 quiet CPU cores, 8 on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsemm_utils.models import load_model
from sparsemm_utils.reader_tasks import heldout_documents
from sparsemm_utils.tiny_reader.accuracy import evaluate_reader
from sparsemm_utils.tiny_reader.config import DEFAULT_READER_DIR, reader_doc_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_READER_DIR), help="reader folder (default data/tiny_reader)")
    parser.add_argument("--docs", type=int, default=None, help="held-out pages (default: as many as the card)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", default=None, help="write the summary and every record as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    card_path = model_dir / "training" / "eval_results.json"
    if not card_path.is_file():
        raise SystemExit(f"{card_path} is missing: train the reader first (python -m sparsemm_utils.tiny_reader train)")
    card = json.loads(card_path.read_text())
    n_docs = args.docs or card["n_docs"]
    loaded = load_model(model_dir)
    docs = heldout_documents(n_docs, reader_doc_spec(model_dir), seed=card["seed"])
    result = evaluate_reader(loaded, docs, seed=card["seed"])
    print(f"{n_docs} held-out pages (seed {card['seed']}), {result['seconds']:.0f} s")
    print(f"{'task':<6} {'n':>4} {'exact':>7} {'card':>7} {'chars':>7} {'card':>7}")
    ok = True
    for task, s in result["summary"].items():
        c = card["summary"].get(task, {})
        print(f"{task:<6} {s['n']:>4} {s['exact_match']:>7.3f} {c.get('exact_match', float('nan')):>7.3f} "
              f"{s['char_accuracy']:>7.4f} {c.get('char_accuracy', float('nan')):>7.4f}")
        if n_docs == card["n_docs"]:
            ok &= bool(c) and abs(s["exact_match"] - c["exact_match"]) <= args.tolerance
            ok &= bool(c) and abs(s["char_accuracy"] - c["char_accuracy"]) <= args.tolerance
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if n_docs != card["n_docs"]:
        print(f"(subset of the card's {card['n_docs']} pages: not compared)")
        return 0
    print("matches the model card" if ok else "DIFFERS from the model card")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
