"""Command line: ``python -m sparsemm_utils.exercises {build,list}`` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import EXERCISES, exercises_dir, stale_notebooks, write_notebooks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.exercises", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write notebooks/exercises/ from the full notebooks and the catalog")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed notebook is stale")
    build.add_argument("--solutions", type=Path, metavar="DIR",
                       help="write the solution versions (stub replaced by the library's reference) into DIR instead")
    build.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    sub.add_parser("list", help="list the exercises")
    args = parser.parse_args(argv)

    if args.command == "list":
        for ex in EXERCISES:
            low, high = ex.minutes
            print(f"{ex.filename:40s} {low}-{high} min  {ex.checker}({ex.function})  {ex.title}")
        return 0
    if args.check:
        problems = stale_notebooks(args.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m sparsemm_utils.exercises build` and commit notebooks/exercises/", file=sys.stderr)
            return 1
        print(f"{len(EXERCISES)} exercise notebooks are up to date")
        return 0
    out = args.solutions if args.solutions is not None else exercises_dir(args.root)
    for path in write_notebooks(EXERCISES, out, solution=args.solutions is not None, root=args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
