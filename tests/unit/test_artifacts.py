"""Typed artifacts and step declarations (sparsemm_utils.artifacts)."""

from __future__ import annotations

import json

import pytest

from sparsemm_utils.artifacts import Artifact, ArtifactReadError, StepSpec
from sparsemm_utils.runs import MissingUpstreamError


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


SCORES = Artifact("03_head_scoring", "head_scores.json", "visual head scores", reader=_read_json)
DOCS = Artifact("01_ocr_annotation", "documents", "the documents")
REGIONS = Artifact("02_patch_mapping", "regions.jsonl", "the regions")


def test_an_artifact_knows_its_path_and_reads_itself(tmp_path):
    assert SCORES.key == "03_head_scoring/head_scores.json"
    assert SCORES.path(tmp_path) == tmp_path / "03_head_scoring" / "head_scores.json"
    assert not SCORES.exists(tmp_path)
    (tmp_path / "03_head_scoring").mkdir()
    SCORES.path(tmp_path).write_text('{"0-0": [1.0]}', encoding="utf-8")
    assert SCORES.read(tmp_path) == {"0-0": [1.0]}


def test_a_missing_artifact_names_the_step_that_writes_it(tmp_path):
    with pytest.raises(MissingUpstreamError, match=r"written by step 03_head_scoring.*--to 03_head_scoring"):
        SCORES.read(tmp_path)


def test_an_unreadable_artifact_names_the_file_and_the_rerun(tmp_path):
    folder = tmp_path / "03_head_scoring"
    folder.mkdir()
    SCORES.path(tmp_path).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactReadError, match=r"head_scores.json.*cannot be read.*--from 03_head_scoring"):
        SCORES.read(tmp_path)


def test_an_artifact_without_reader_says_how_to_open_it(tmp_path):
    with pytest.raises(TypeError, match="no reader"):
        DOCS.read(tmp_path)


def test_a_step_needs_the_steps_of_its_inputs_in_order():
    step = StepSpec("03_head_scoring", "scoring", inputs=(REGIONS, DOCS, REGIONS), outputs=(SCORES,))
    assert step.needs == ("01_ocr_annotation", "02_patch_mapping")
    assert step.number == "03"
    assert step.output_names == ("head_scores.json",)
    assert step.output("head_scores.json") is SCORES
    with pytest.raises(KeyError, match="declares no output 'x.csv'"):
        step.output("x.csv")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "head_scoring"}, "NN_name"),
        ({"name": "3_head_scoring"}, "NN_name"),
        ({"name": "03_head_scoring", "outputs": (DOCS,)}, "outputs of other steps"),
        ({"name": "03_head_scoring", "inputs": (SCORES,)}, "its own outputs"),
        ({"name": "03_head_scoring", "outputs": (SCORES, SCORES)}, "output twice"),
    ],
)
def test_a_malformed_step_declaration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepSpec(title="t", **kwargs)


def test_a_step_folder_is_created_on_request(tmp_path):
    step = StepSpec("01_ocr_annotation", "annotation", outputs=(DOCS,))
    assert step.folder(tmp_path) == tmp_path / "01_ocr_annotation"
    assert not step.folder(tmp_path).exists()
    assert step.folder(tmp_path, create=True).is_dir()
