"""Notebook parameters injected by papermill are checked against the step's Config."""

from dataclasses import dataclass

import pytest

from sparsemm_utils.parameters import UnknownParameterError, injected_parameter_names, reject_unknown_parameters


@dataclass
class Config:
    run_dir: str = "runs/tiny"
    n_documents: int = 48


def test_no_injected_cell_means_nothing_to_check():
    assert injected_parameter_names(["a = 1", "print(a)"]) is None
    reject_unknown_parameters(Config, history=["a = 1"])


def test_the_last_injected_cell_is_read():
    history = ["run_dir = 'x'", "# Parameters\nrun_dir = 'a'\n", "# Parameters\nrun_dir = 'b'\nn_documents = 3\n"]
    assert injected_parameter_names(history) == ["run_dir", "n_documents"]
    reject_unknown_parameters(Config, history=history)


def test_a_misspelled_parameter_stops_with_a_did_you_mean():
    history = ["# Parameters\nrun_dir = 'a'\nn_document = 3\n"]
    with pytest.raises(UnknownParameterError, match=r"'n_document' \(did you mean 'n_documents'\?\)"):
        reject_unknown_parameters(Config, history=history)


def test_only_a_dataclass_is_accepted():
    with pytest.raises(TypeError, match="Config dataclass"):
        reject_unknown_parameters({"run_dir": 1}, history=[])
