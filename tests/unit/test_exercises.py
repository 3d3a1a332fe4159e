"""The exercise notebooks (notebooks/exercises/) have one source: the full notebooks plus the
specs in sparsemm_utils/exercises/catalog.py. The committed notebooks must equal a fresh build,
be clean and shaped like every notebook of the repo, and their stubs must fail their checker until
filled in while the library's answer passes it."""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path

import nbformat
import pytest

from sparsemm_utils import checkers as ck
from sparsemm_utils.exercises import (
    EXERCISES,
    SOLUTION_TAG,
    STUB_TAG,
    ExerciseSourceError,
    ExerciseSpecError,
    build_notebook,
    exercise,
    exercises_dir,
    stale_notebooks,
)
from sparsemm_utils.exercises import on_run
from sparsemm_utils.exercises.__main__ import main
from sparsemm_utils.runs import MissingUpstreamError, repo_root

IDS = [ex.key for ex in EXERCISES]


def _read(ex):
    return nbformat.read(str(exercises_dir() / ex.filename), as_version=4)


def test_committed_notebooks_equal_a_fresh_build():
    problems = stale_notebooks()
    assert problems == [], "\n".join(problems) + "\nrun `python -m sparsemm_utils.exercises build`"


def test_the_five_exercises_of_the_course():
    assert [ex.key for ex in EXERCISES] == list(ck.CHECKERS)
    assert [ex.filename for ex in EXERCISES] == [
        "02_map_box_exercise.ipynb",
        "03_hit_rule_exercise.ipynb",
        "04_allocation_exercise.ipynb",
        "04_snapkv_selection_exercise.ipynb",
        "05_anls_exercise.ipynb",
    ]
    with pytest.raises(KeyError, match="known"):
        exercise("nope")


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_notebook_is_clean_and_shaped_like_the_others(ex):
    nb = _read(ex)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"] == {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    header = nb.cells[0]
    assert header.cell_type == "markdown" and header.source.startswith(f"# Exercise {ex.number}")
    low, high = ex.minutes
    assert f"About {low}-{high} minutes" in header.source
    for part in ("**What you build.**", "**Inputs.**", "**Outputs.**", "**Runtime.**"):
        assert part in header.source
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Open questions")
    assert 2 <= sum(line[:2] in {f"{i}." for i in range(1, 10)} for line in last.source.splitlines()) <= 4


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_parameters_cell_holds_literals_that_the_config_accepts(ex):
    nb = _read(ex)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    values = {}
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    assert values["run_dir"] == "runs/dev" and values["model_id"] == "tiny-random/qwen2_vl"
    config_class = getattr(on_run, ex.config_class)
    assert set(values) == {f.name for f in dataclasses.fields(config_class)}
    config_class(**values)  # the defaults validate


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_background_is_the_full_notebooks_own_text(ex):
    full = nbformat.read(str(repo_root() / "notebooks" / f"{ex.source}.ipynb"), as_version=4)
    sources = [c.source for c in _read(ex).cells if c.cell_type == "markdown"]
    for heading in ex.background:
        originals = [c.source for c in full.cells if c.cell_type == "markdown" and c.source.startswith(heading)]
        assert len(originals) == 1
        assert originals[0] in sources


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_the_stub_fails_its_checker_until_filled_in(ex):
    nb = _read(ex)
    stubs = [c for c in nb.cells if STUB_TAG in c.metadata.get("tags", [])]
    assert len(stubs) == 1
    namespace: dict = {}
    exec(compile(stubs[0].source, f"<{ex.key} stub>", "exec"), namespace)
    checks = [c for c in nb.cells if c.cell_type == "code" and f"{ex.checker}({ex.function})" in c.source]
    assert len(checks) == 1
    report = ck.CHECKERS[ex.key](namespace[ex.function], n_random=1, raise_on_failure=False, verbose=False)
    assert report.results and not any(r.passed for r in report.results)
    assert all("stub is not filled in yet" in r.problem for r in report.failures)


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_the_solution_build_passes_its_checker(ex):
    nb = build_notebook(ex, solution=True)
    assert not [c for c in nb.cells if STUB_TAG in c.metadata.get("tags", [])]
    (solution,) = [c for c in nb.cells if SOLUTION_TAG in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(solution.source, namespace)
    assert ck.CHECKERS[ex.key](namespace[ex.function], n_random=3, verbose=False).passed


def test_a_renamed_heading_in_the_full_notebook_is_a_clear_error():
    ex = dataclasses.replace(exercise("map_box"), background=("## A heading that is not there",))
    with pytest.raises(ExerciseSourceError, match=r"02_patch_mapping.ipynb has no markdown cell starting with '## A heading"):
        build_notebook(ex)


def test_cli_check_build_and_solutions(tmp_path, capsys):
    root = tmp_path / "repo"
    shutil.copytree(repo_root() / "notebooks", root / "notebooks")
    assert main(["build", "--check", "--root", str(root)]) == 0
    stale = root / "notebooks" / "exercises" / EXERCISES[0].filename
    stale.write_text(stale.read_text().replace("YOUR CODE HERE", "edited by hand"))
    (root / "notebooks" / "exercises" / "99_orphan_exercise.ipynb").write_text("{}")
    assert main(["build", "--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{EXERCISES[0].filename} differs from a fresh build" in err and "99_orphan_exercise.ipynb is not built" in err
    (root / "notebooks" / "exercises" / "99_orphan_exercise.ipynb").unlink()
    assert main(["build", "--root", str(root)]) == 0
    assert main(["build", "--check", "--root", str(root)]) == 0
    assert main(["build", "--solutions", str(tmp_path / "solutions"), "--root", str(root)]) == 0
    written = sorted(p.name for p in (tmp_path / "solutions").iterdir())
    assert written == sorted(ex.filename for ex in EXERCISES)
    assert main(["list"]) == 0
    assert "check_snapkv_selection(snapkv_select)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key": "nope"}, "has no checker"),
        ({"source": "patch_mapping"}, "step name like"),
        ({"minutes": (30, 20)}, r"minutes \(low, high\) must satisfy 1 <= min <= max, got \(30, 20\)"),
        ({"background": ()}, "at least one background cell"),
        ({"stub": "def map_box(): pass"}, "must raise NotImplementedError"),
        ({"stub": "def other():\n    raise NotImplementedError"}, "must define map_box()"),
        ({"stub": "def map_box(:"}, "not valid Python"),
        ({"config_class": "NoSuchConfig"}, "has no 'NoSuchConfig'"),
        ({"parameters": (("run_dir", "x"),)}, "always parameters"),
        ({"parameters": (("n_documents", object()),)}, "must be a literal"),
        ({"open_questions": ("only one?",)}, "2 to 4 open questions"),
    ],
)
def test_a_bad_spec_is_rejected(changes, message):
    with pytest.raises(ExerciseSpecError, match=message):
        dataclasses.replace(exercise("map_box"), **changes)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: on_run.MapBoxRunConfig(n_documents=0), "n_documents must be an int >= 1"),
        (lambda: on_run.HitRuleRunConfig(max_new_tokens=True), "max_new_tokens must be an int"),
        (lambda: on_run.AllocationRunConfig(budgets=[16], window=32), r"budgets\[...\] must be an int >= 33"),
        (lambda: on_run.AllocationRunConfig(budgets=[]), "at least one budget"),
        (lambda: on_run.AllocationRunConfig(ratio=1.5), r"ratio must lie in \[0, 1\], got 1.5"),
        (lambda: on_run.SnapKVRunConfig(kernel_size=4), "must be odd"),
        (lambda: on_run.AnlsRunConfig(max_predictions=0), "max_predictions must be an int >= 1"),
        (lambda: on_run.ExerciseRunConfig(run_dir=""), "run_dir must be a non-empty path"),
        (lambda: on_run.ExerciseRunConfig(seed=-1), "seed must be an int >= 0"),
    ],
)
def test_run_configs_reject_bad_parameters(factory, message):
    with pytest.raises(on_run.ExerciseRunError, match=message):
        factory()


def test_a_run_without_the_upstream_step_names_the_step(tmp_path: Path):
    with pytest.raises(MissingUpstreamError, match="02_patch_mapping"):
        on_run.map_box_on_run(ck.reference_map_box, on_run.MapBoxRunConfig(run_dir=str(tmp_path)))
    with pytest.raises(MissingUpstreamError, match="05_eval"):
        on_run.anls_on_run(ck.reference_anls, on_run.AnlsRunConfig(run_dir=str(tmp_path)))


def test_anls_on_run_compares_with_the_recorded_scores(tmp_path: Path):
    """A hand-made predictions.jsonl: the reference agrees on both rows; a case-sensitive ANLS
    disagrees on the second ("Paris" vs "paris": recorded 1.0, case-sensitive 1 - 1/5 = 0.8)."""
    import json

    folder = tmp_path / "05_eval"
    folder.mkdir()
    records = [
        {"benchmark": "docvqa", "method": "fullkv", "budget": None, "sample_id": "a", "prediction": "abcd",
         "answers": ["abce"], "scores": {"anls": 0.75}},
        {"benchmark": "docvqa", "method": "sparsemm", "budget": 64, "sample_id": "a", "prediction": "Paris",
         "answers": ["paris"], "scores": {"anls": 1.0}},
        {"benchmark": "chartqa", "method": "sparsemm", "budget": 64, "sample_id": "b", "prediction": "3",
         "answers": ["3"], "scores": {"relaxed_accuracy": 1.0}},
    ]  # fmt: skip
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = on_run.AnlsRunConfig(run_dir=str(tmp_path))
    good = on_run.anls_on_run(ck.reference_anls, cfg)
    assert good.agree and len(good.table) == 2 and good.figure is not None
    assert "2 of 2 rows agree" in good.summary()

    def case_sensitive(prediction, answers):
        from sparsemm_utils.metrics import levenshtein

        return max(1 - levenshtein(a.strip(), prediction.strip()) / max(len(a), len(prediction), 1) for a in answers)

    bad = on_run.anls_on_run(case_sensitive, cfg)
    assert not bad.agree
    assert bad.disagreements()["yours"].tolist() == pytest.approx([0.8])


def test_a_model_other_than_the_runs_is_named(tmp_path: Path):
    """The run's step 03 was made with model A; the notebook says B: a clear error naming both."""
    from sparsemm_utils.manifest import Manifest

    folder = tmp_path / "03_head_scoring"
    folder.mkdir()
    Manifest(step="03_head_scoring", title="t", status="ok", params={"model_id": "data/tiny_reader"}, inputs=[]).write(folder)
    cfg = on_run.AllocationRunConfig(run_dir=str(tmp_path), model_id="tiny-random/qwen2_vl")
    with pytest.raises(on_run.ExerciseRunError, match=r"used model_id = 'data/tiny_reader'.*set model_id = 'data/tiny_reader'"):
        on_run.check_run_model(cfg, "03_head_scoring")
    on_run.check_run_model(on_run.AllocationRunConfig(run_dir=str(tmp_path), model_id="data/tiny_reader"), "03_head_scoring")
    on_run.check_run_model(cfg, "02_patch_mapping")  # no manifest: nothing to compare with
