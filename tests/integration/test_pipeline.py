"""The pipeline's rules on a registry of small fake notebooks (fast: no model involved).

Rules under test (docs/design.md, "How data flows"): manifest per step with params, input/output
sha256, versions, commit, device, timings; skip when params and input hashes are unchanged;
--from/--to; a missing upstream output names the step to run; a failing cell stops the chain
with an error naming the step and the cell; index.html links every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.artifacts import Artifact, StepSpec
from sparsemm_utils.manifest import Manifest, sha256_file
from sparsemm_utils.real_shapes import REAL_SHAPES, get_real_shape, gpu_memory
from sparsemm_utils.runs import MissingUpstreamError

pytestmark = pytest.mark.slow

VALUE = Artifact("01_make", "value.txt", "the number")
DOUBLE = Artifact("02_double", "double.txt", "twice the number")
FAKE_STEPS = (
    StepSpec("01_make", "write a number", outputs=(VALUE,)),
    StepSpec("02_double", "double it", inputs=(VALUE,), outputs=(DOUBLE,)),
    StepSpec("03_fail", "raise on purpose", inputs=(DOUBLE,)),
)


@pytest.fixture()
def fake_repo(tmp_path: Path, write_notebook) -> Path:
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    write_notebook(
        root / "notebooks" / "01_make.ipynb",
        'run_dir = "runs/dev"\nvalue = 1\nseed = 0',
        [
            "from pathlib import Path\nout = Path(run_dir) / '01_make'\nout.mkdir(parents=True, exist_ok=True)",
            "(out / 'value.txt').write_text(str(value))",
        ],
    )
    write_notebook(
        root / "notebooks" / "02_double.ipynb",
        'run_dir = "runs/dev"\nmodel_id = "none"',
        [
            "from pathlib import Path\nv = int((Path(run_dir) / '01_make' / 'value.txt').read_text())",
            "(Path(run_dir) / '02_double' / 'double.txt').write_text(str(2 * v))",
        ],
    )
    write_notebook(
        root / "notebooks" / "03_fail.ipynb",
        'run_dir = "runs/dev"',
        ["x = 1", "raise ValueError('deliberate failure for the test')"],
    )
    return root


def _config(tmp_path: Path, value: int = 1, **extra) -> pl.PipelineConfig:
    steps = {"01_make": {"value": value, **extra}}
    return pl.PipelineConfig(name="fake", params={"seed": 0, "model_id": "unused"}, steps=steps)


def _run(config, run, root, **kw):
    return pl.run_pipeline(config, run, steps=FAKE_STEPS, root=root, log=lambda _: None, **kw)


def test_runs_writes_manifests_then_skips_then_reruns_what_changed(tmp_path, fake_repo):
    run = tmp_path / "run"
    results = _run(_config(tmp_path, 3), run, fake_repo, to_step="02")
    assert [r.status for r in results] == ["ran", "ran"]
    assert (run / "02_double" / "double.txt").read_text() == "6"

    manifest = Manifest.read(run / "01_make")
    assert manifest.status == "ok"
    # shared params reach a step only when its notebook declares them (01 declares seed, not model_id)
    assert manifest.params == {"seed": 0, "value": 3, "run_dir": str(run)}
    assert [o.path for o in manifest.outputs] == ["01_make/value.txt"]
    assert manifest.outputs[0].sha256 == sha256_file(run / "01_make" / "value.txt")
    assert manifest.inputs[0].path == "repo:notebooks/01_make.ipynb"
    assert any(i.path == "repo:sparsemm_utils/pipeline.py" for i in manifest.inputs)
    assert manifest.packages["torch"].startswith("2.13.0")
    assert manifest.device and manifest.git_commit and manifest.seconds > 0
    assert (run / "01_make" / "01_make.ipynb").is_file() and (run / "01_make" / "01_make.html").is_file()
    downstream = Manifest.read(run / "02_double")
    assert any(i.path == "01_make/value.txt" for i in downstream.inputs)

    again = _run(_config(tmp_path, 3), run, fake_repo, to_step="02")
    assert [r.status for r in again] == ["skipped", "skipped"]

    # a changed parameter reruns its step, and the changed output reruns the step that reads it
    changed = _run(_config(tmp_path, 5), run, fake_repo, to_step="02")
    assert [r.status for r in changed] == ["ran", "ran"]
    assert changed[0].message == "parameters changed: value"
    assert changed[1].message == "inputs changed: 01_make/value.txt"
    assert (run / "02_double" / "double.txt").read_text() == "10"

    # --force reruns a range even when unchanged; --from restricts it
    forced = _run(_config(tmp_path, 5), run, fake_repo, from_step="02_double", to_step="02", force=True)
    assert [(r.step, r.status) for r in forced] == [("02_double", "ran")]

    # an output edited by hand is detected and the step reruns
    (run / "02_double" / "double.txt").write_text("999")
    healed = _run(_config(tmp_path, 5), run, fake_repo, to_step="02")
    assert [r.status for r in healed] == ["skipped", "ran"]
    assert healed[1].message == "outputs missing or modified since the last run"

    index = (run / "index.html").read_text()
    assert "01_make/01_make.html" in index and "02_double/01_make" not in index
    assert "03_fail" in index and "not run yet" in index


def test_missing_upstream_names_the_step_to_run(tmp_path, fake_repo):
    with pytest.raises(MissingUpstreamError, match="01_make") as info:
        _run(_config(tmp_path), tmp_path / "run", fake_repo, from_step="02")
    assert "--to 01_make" in str(info.value)


def test_deleted_upstream_output_is_named(tmp_path, fake_repo):
    run = tmp_path / "run"
    _run(_config(tmp_path), run, fake_repo, to_step="01")
    (run / "01_make" / "value.txt").unlink()
    with pytest.raises(MissingUpstreamError, match="01_make/value.txt"):
        _run(_config(tmp_path), run, fake_repo, from_step="02", to_step="02")


def test_failing_cell_stops_the_chain_naming_step_and_cell(tmp_path, fake_repo, capsys):
    run = tmp_path / "run"
    with pytest.raises(pl.StepFailedError) as info:
        _run(_config(tmp_path), run, fake_repo)
    message = str(info.value)
    assert info.value.step == "03_fail"
    assert "03_fail" in message and "ValueError" in message and "deliberate failure" in message
    assert "cell" in message and "raise ValueError" in message
    manifest = Manifest.read(run / "03_fail")
    assert manifest.status == "failed" and "deliberate failure" in manifest.error
    assert "failed" in (run / "index.html").read_text()

    # the command line exits non-zero and prints the same message
    cfg = tmp_path / "fake.yaml"
    cfg.write_text("name: fake\nparams: {seed: 0}\nsteps:\n  01_make: {value: 1}\n")
    code = pl.main(["--config", str(cfg), "--run-dir", str(run)], steps=FAKE_STEPS, root=fake_repo)
    assert code == 1
    assert "03_fail" in capsys.readouterr().err


def test_undeclared_parameter_is_an_error(tmp_path, fake_repo):
    with pytest.raises(pl.PipelineConfigError, match="does not declare"):
        _run(_config(tmp_path, bogus=1), tmp_path / "run", fake_repo)


def test_config_validation(tmp_path):
    with pytest.raises(pl.PipelineConfigError, match="unknown step"):
        pl.PipelineConfig(name="x", steps={"99_nope": {}}).check_steps(pl.STEPS)
    with pytest.raises(pl.PipelineConfigError, match="run_dir"):
        pl.PipelineConfig(name="x", params={"run_dir": "a"})
    with pytest.raises(pl.PipelineConfigError, match="does not exist"):
        pl.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstepz: {}\n")
    with pytest.raises(pl.PipelineConfigError, match="stepz"):
        pl.load_config(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(pl.PipelineConfigError, match="not valid YAML"):
        pl.load_config(bad)
    with pytest.raises(pl.PipelineConfigError, match="unknown step"):
        pl.select_steps("42")
    with pytest.raises(pl.PipelineConfigError, match="comes after"):
        pl.select_steps("02", "01")


def test_registry_is_consistent():
    names = [s.name for s in pl.STEPS]
    assert names == sorted(names) and len(set(names)) == len(names)
    numbers = [int(step.number) for step in pl.STEPS]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1, "step numbers must increase from 01"
    for i, step in enumerate(pl.STEPS):
        assert set(step.needs) <= set(names[:i]), f"{step.name} needs a later or unknown step"
        assert step.notebook_path().is_file(), f"notebook of {step.name} is missing"


def test_shipped_configs_load_and_name_registered_steps():
    for path in sorted((pl.repo_root() / "configs").glob("*.yaml")):
        config = pl.load_config(path)
        config.check_steps(pl.STEPS)


def test_real_model_configs_cover_every_shape_and_state_its_gpu_memory():
    # one config per real shape (qwen2-vl-2b is a step 06 timing shape only), each naming the memory
    # gpu_memory computes from the shape and the command that computes it
    by_model = {}
    for path in sorted((pl.repo_root() / "configs").glob("*.yaml")):
        model_id = pl.load_config(path).params.get("model_id", "")
        if model_id in {s.hub_id for s in REAL_SHAPES.values()}:
            by_model[model_id] = path
    assert set(by_model) == {s.hub_id for s in REAL_SHAPES.values()} - {"Qwen/Qwen2-VL-2B-Instruct"}
    for model_id, path in by_model.items():
        shape = get_real_shape(model_id)
        header = path.read_text()
        assert path.stem == shape.name and f"hf download {model_id}\n" in header
        assert f"# {gpu_memory(shape).line()};\n#   computed by: python -m sparsemm_utils.real_shapes {shape.name}\n" in header
        assert f"{shape.layers} layers, {shape.query_heads} query heads, {shape.kv_heads} KV heads" in header


def test_list_command(capsys):
    assert pl.main(["--list"]) == 0
    out = capsys.readouterr().out
    for step in pl.STEPS:
        assert step.name in out


def test_resumable_step_keeps_its_folder_and_others_start_clean(tmp_path, fake_repo, write_notebook):
    write_notebook(
        fake_repo / "notebooks" / "01_append.ipynb",
        'run_dir = "runs/dev"\nvalue = 1',
        [
            "from pathlib import Path\nout = Path(run_dir) / '01_append'",
            "with open(out / 'log.txt', 'a') as fh:\n    fh.write(f'{value}\\n')",
        ],
    )
    run = tmp_path / "run"
    for resumable, expected in ((True, "1\n2\n"), (False, "2\n")):
        steps = (StepSpec("01_append", "append", outputs=(Artifact("01_append", "log.txt", "the log"),), resumable=resumable),)
        folder = run / ("resumable" if resumable else "plain")
        for value in (1, 2):
            config = pl.PipelineConfig(name="fake", steps={"01_append": {"value": value}})
            pl.run_pipeline(config, folder, steps=steps, root=fake_repo, log=lambda _: None)
        assert (folder / "01_append" / "log.txt").read_text() == expected


def test_the_registry_check_catches_a_retyped_name():
    value = Artifact("01_make", "value.txt", "the number")
    typo = Artifact("01_make", "valeu.txt", "the number, misspelled")
    pl.check_registry((StepSpec("01_make", "m", outputs=(value,)), StepSpec("02_use", "u", inputs=(value,))))
    with pytest.raises(pl.PipelineConfigError, match="does not declare among its outputs"):
        pl.check_registry((StepSpec("01_make", "m", outputs=(value,)), StepSpec("02_use", "u", inputs=(typo,))))
    with pytest.raises(pl.PipelineConfigError, match="does not come before it"):
        pl.check_registry((StepSpec("02_use", "u", inputs=(value,)), StepSpec("01_make", "m", outputs=(value,))))


def test_every_notebook_has_a_step_module_and_every_step_module_a_notebook():
    import importlib

    notebooks = {p.stem for p in (pl.repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    modules = {p.stem for p in (pl.repo_root() / "sparsemm_utils" / "steps").glob("*.py")} - {"__init__"}
    assert {n.split("_", 1)[1] for n in notebooks} == modules
    for name in notebooks:
        module = importlib.import_module(f"sparsemm_utils.steps.{name.split('_', 1)[1]}")
        assert module.STEP.name == name and module.STEP.notebook_path().is_file()
