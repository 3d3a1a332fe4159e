"""Notebooks are committed thin and clean (docs/design.md): outputs stripped, kernelspec python3,
one `parameters` cell holding literals only (with run_dir), a markdown header first and open
questions last, and one notebook per registered step."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from sparsemm_utils.pipeline import STEPS, declared_parameters, load_config
from sparsemm_utils.runs import repo_root

NOTEBOOKS = sorted((repo_root() / "notebooks").glob("*.ipynb"))


def test_every_registered_step_has_a_notebook_and_vice_versa():
    registered = {s.name for s in STEPS}
    present = {p.stem for p in NOTEBOOKS}
    # 00_tiny_reader (when present) is a standalone notebook outside the chain
    assert registered <= present, f"missing notebooks: {sorted(registered - present)}"
    extra = {p for p in present - registered if not p.startswith("00_")}
    assert not extra, f"notebooks not in the pipeline registry: {sorted(extra)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("#")
    assert nb.cells[-1].cell_type == "markdown" and "open question" in nb.cells[-1].source.lower()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_holds_literals_only(path: Path):
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    tree = ast.parse(tagged[0].source)
    names = set()
    for node in tree.body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"{path.name}: only assignments in the parameters cell"
        value = node.value
        ast.literal_eval(value)  # raises for anything but a literal
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names |= {t.id for t in targets}
    assert "run_dir" in names


@pytest.mark.parametrize("path", sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_the_config_cell_rejects_parameters_the_notebook_does_not_declare(path):
    cells = [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]
    config_cells = [c.source for c in cells if "cfg = Config(" in c.source]
    assert config_cells, f"{path.name} builds no Config"
    source = config_cells[0]
    assert source.index("reject_unknown_parameters(Config)") < source.index("cfg = Config(")


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_parameters_cell_defaults_are_the_default_runs(step):
    """Opened in JupyterLab, a chain notebook's parameters cell is the offline default run
    (configs/study.yaml, run_dir runs/study): Run All redoes the step `make reproduce` ran, with
    the same parameters, instead of a different one over its outputs."""
    config = load_config(repo_root() / "configs" / "study.yaml")
    declared = declared_parameters(step.notebook_path())
    expected = {k: v for k, v in config.params.items() if k in declared} | dict(config.steps.get(step.name, {}))
    differ = {k: (declared.get(k), v) for k, v in expected.items() if _plain(declared.get(k)) != _plain(v)}
    assert not differ, f"{step.name}: parameters cell (left) differs from configs/study.yaml (right): {differ}"
    assert declared["run_dir"] == "runs/study"


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
