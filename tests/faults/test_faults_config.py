"""Fault cases of the run's configuration (docs/faults.md, "Config"): each is checked against the
real notebooks and step Configs before anything runs, so none of them leaves a step folder."""

from __future__ import annotations

import re
from pathlib import Path

import papermill as pm
import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.parameters import MAX_DOCUMENTS, MAX_NEW_TOKENS
from sparsemm_utils.runs import repo_root
from sparsemm_utils.steps import attention_by_layer, head_scoring, ocr_annotation
from sparsemm_utils.steps import eval as eval_step

TINY = (repo_root() / "configs" / "tiny.yaml").read_text()


def _refused(tmp_path: Path, text: str, *expected: str, to_step: str | None = None) -> str:
    """Run the real pipeline on the config ``text``: it must stop with PipelineConfigError holding
    every ``expected`` string, with no step folder created."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    run = tmp_path / "run"
    with pytest.raises(pl.PipelineConfigError) as info:
        pl.run_pipeline(path, run, to_step=to_step, log=lambda _: None)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    assert not run.exists() or not any(run.glob("0*")), "a step ran before the config was checked"
    return message


def test_a_misspelled_shared_parameter_is_named_with_a_did_you_mean(tmp_path):
    _refused(tmp_path, TINY.replace("  model_id: data/tiny_reader", "  modle_id: data/tiny_reader"),
             "shared parameter(s) ['modle_id'] (did you mean 'model_id'?) are declared by no step's notebook")


def test_an_empty_config_file_is_refused(tmp_path):
    _refused(tmp_path, "", "is empty: it must hold at least `params:` and `steps:`")


def test_a_duplicate_yaml_key_is_refused(tmp_path):
    text = TINY.replace("    n_documents: 48\n", "    n_documents: 48\n    n_documents: 4\n", 1)
    _refused(tmp_path, text, "key 'n_documents' is written twice in one mapping", "YAML would silently keep the last one")


def test_a_value_of_the_wrong_type_is_refused(tmp_path):
    _refused(tmp_path, TINY.replace("    n_documents: 48\n", '    n_documents: "48"\n', 1),
             "steps.01_ocr_annotation.n_documents = '48': expected int like the notebook's default 48, got str")


@pytest.mark.parametrize(
    "text, expected",
    [("name: x\nparams: 5\nsteps: {}\n", "params must be a mapping of parameter: value"),
     ("name: x\nparams: {}\nsteps: [a, b]\n", "steps must be a mapping of step name"),
     ("name: x\nsteps:\n  01_ocr_annotation: 5\n", "section steps.01_ocr_annotation must be a mapping"),
     ("name: x\nparams: {run_dir: runs/x}\n", "run_dir is set by the pipeline (--run-dir)"),
     ("name: [unclosed\n", "is not valid YAML"),
     ("name: x\nstep: {}\n", "unknown top-level key(s) ['step'] (did you mean 'steps'?)"),
     ("name: x\nsteps:\n  03_head_scorng: {}\n", "unknown step(s) ['03_head_scorng'] (did you mean '03_head_scoring'?)")],
    ids=["params-not-a-mapping", "steps-a-list", "section-not-a-mapping", "run-dir-in-config", "yaml-syntax",
         "unknown-top-level-key", "misspelled-step"],
)  # fmt: skip
def test_a_malformed_config_is_refused(tmp_path, text, expected):
    _refused(tmp_path, text, expected)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(pl.PipelineConfigError, match="does not exist"):
        pl.run_pipeline(tmp_path / "nope.yaml", tmp_path / "run")


def test_an_undeclared_key_of_the_last_step_stops_before_step_01(tmp_path):
    _refused(tmp_path, TINY.replace("    benchmark_documents: 3\n", "    benchmark_document: 3\n"),
             "steps.07_attention_by_layer sets ['benchmark_document'] (did you mean 'benchmark_documents'?)")


def test_a_size_above_its_bound_in_step_05_stops_before_step_01(tmp_path):
    text = TINY.replace("    n_documents: 4\n", "    n_documents: 100000000\n")
    _refused(tmp_path, text, "step 05_eval refuses its parameters", f"n_documents = 100000000 is above this step's bound of {MAX_DOCUMENTS}",
             "allow_large = True", "nothing has run")
    # the override lifts it (the Configs are built; nothing runs here)
    lifted = pl.load_config(_write(tmp_path, text.replace("    n_documents: 100000000\n", "    n_documents: 100000000\n    allow_large: true\n")))
    declared = pl.declared_parameters_of(pl.STEPS, repo_root())
    pl.check_step_configs(lifted, pl.STEPS[:5], tmp_path / "run", declared)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lifted.yaml"
    path.write_text(text)
    return path


def test_an_unknown_method_in_step_05_stops_before_step_01(tmp_path):
    _refused(tmp_path, TINY.replace("    methods: [fullkv, sparsemm,", "    methods: [fullkv, sparsemn,"),
             "step 05_eval refuses its parameters (UnknownMethodError", "'sparsemn'")


@pytest.mark.parametrize("step, after", [("05_eval", "    fastv_k: 1\n"), ("03_head_scoring", "    selection: argmax\n")])
def test_a_misspelled_selection_dtype_stops_before_step_01(tmp_path, step, after):
    _refused(tmp_path, TINY.replace(after, after + "    selection_dtype: bf16\n", 1),
             f"step {step} refuses its parameters", "selection_dtype must be one of", "'bf16'")


def test_a_step_range_backwards_is_refused(tmp_path):
    with pytest.raises(pl.PipelineConfigError, match="--from 05 comes after --to 02"):
        pl.run_pipeline(repo_root() / "configs" / "tiny.yaml", tmp_path / "run", from_step="05", to_step="02")


@pytest.mark.parametrize("path", sorted((repo_root() / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_configs_pass_every_check(tmp_path, path):
    """No false alarm: e.g. `06_efficiency.layers: null` (all layers) against the notebook's int
    default. Step 06 of the GPU configs is left out: its Config checks that a GPU is there."""
    config = pl.load_config(path)
    declared = pl.declared_parameters_of(pl.STEPS, repo_root())
    config.check_against(declared)
    steps = [s for s in pl.STEPS if path.stem == "tiny" or s.name != "06_efficiency"]
    pl.check_step_configs(config, steps, tmp_path / "run", declared)


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "make, name, bound",
    [(lambda **k: ocr_annotation.Config(n_documents=100_000_000, **k), "n_documents", MAX_DOCUMENTS),
     (lambda **k: head_scoring.Config(n_samples=1_000_000, **k), "n_samples", MAX_DOCUMENTS),
     (lambda **k: head_scoring.Config(text_samples=1_000_000, **k), "text_samples", MAX_DOCUMENTS),
     (lambda **k: head_scoring.Config(max_new_tokens=100_000, **k), "max_new_tokens", MAX_NEW_TOKENS),
     (lambda **k: eval_step.Config(n_documents=100_000_000, **k), "n_documents", MAX_DOCUMENTS),
     (lambda **k: eval_step.Config(max_new_tokens=100_000, **k), "max_new_tokens", MAX_NEW_TOKENS),
     (lambda **k: attention_by_layer.Config(benchmark_documents=1_000_000, **k), "benchmark_documents", MAX_DOCUMENTS),
     (lambda **k: attention_by_layer.Config(n_samples=1_000_000, **k), "n_samples", MAX_DOCUMENTS)],
    ids=["01-n_documents", "03-n_samples", "03-text_samples", "03-max_new_tokens", "05-n_documents",
         "05-max_new_tokens", "07-benchmark_documents", "07-n_samples"],
)  # fmt: skip
def test_a_size_above_its_bound_is_refused_unless_allowed(make, name, bound):
    with pytest.raises(ValueError, match=re.escape(f"is above this step's bound of {bound}") + ".*allow_large = True") as info:
        make()
    assert name in str(info.value)
    make(allow_large=True)  # the explicit override


@pytest.mark.parametrize(
    "cls", [ocr_annotation.Config, head_scoring.Config, eval_step.Config, attention_by_layer.Config], ids=["01", "03", "05", "07"]
)
def test_allow_large_must_be_a_bool(cls):
    with pytest.raises(ValueError, match="allow_large must be True or False, got str 'yes'"):
        cls(allow_large="yes")


# ------------------------------------------------------------------------------ papermill -p


@pytest.mark.slow
def test_papermill_given_a_misspelled_parameter_stops_the_notebook(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(
            str(ocr_annotation.STEP.notebook_path()), str(tmp_path / "out.ipynb"),
            parameters={"run_dir": str(tmp_path / "run"), "n_document": 3}, cwd=str(repo_root()), progress_bar=False,
        )  # fmt: skip
    assert info.value.ename == "UnknownParameterError"
    assert "papermill was given 'n_document' (did you mean 'n_documents'?)" in info.value.evalue
    assert not (tmp_path / "run").exists()
