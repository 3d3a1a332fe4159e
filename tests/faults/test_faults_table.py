"""docs/faults.md lists every case of this folder: each row names a test that exists, and each
test here appears in the table (or among its no-false-alarm checks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from sparsemm_utils.runs import repo_root

HERE = Path(__file__).parent
TABLE = repo_root() / "docs" / "faults.md"


def _tests() -> dict[str, set[str]]:
    """file name -> names of its test functions."""
    found = {}
    for path in sorted(HERE.glob("test_faults_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return found


def test_every_row_names_an_existing_test_and_every_test_is_listed():
    text = TABLE.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    numbers = [int(line.split("|")[1]) for line in rows]
    assert numbers == list(range(1, len(rows) + 1)) and len(rows) >= 40
    tests = _tests()
    named = set()
    for file, name in re.findall(r"`(test_faults_\w+\.py)::(test_\w+)", text):
        assert name in tests.get(file, set()), f"docs/faults.md names {file}::{name}, which does not exist"
        named.add((file, name))
    for file, names in tests.items():
        if file == Path(__file__).name:
            continue
        missing = [n for n in names if (file, n) not in named]
        assert not missing, f"{file}: {missing} are not in docs/faults.md"
