"""The shipped study model (data/study_model/): its parts assemble with the pinned backbone into an
ordinary model folder that the chain's loader reads, merging the adapters changes no output, and
the assembled model reads validation pages as the training run recorded it did."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemm_utils.models import load_model
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.reader_tasks import STUDY_PAGES, TASK_TYPES, VALIDATION_SEED
from sparsemm_utils.study_model.architecture import merge_lora
from sparsemm_utils.study_model.assemble import (
    PARTS_DIR,
    RECORD_FILE,
    TRAINED_FILE,
    VALIDATION_FILE,
    build_from_parts,
    ensure_assembled,
)
from sparsemm_utils.runs import repo_root
from sparsemm_utils.tiny_reader.accuracy import evaluate_reader

pytestmark = pytest.mark.slow

PARTS = repo_root() / PARTS_DIR


@pytest.fixture(scope="module")
def assembled(study_model):
    return study_model


def test_the_parts_are_small_and_recorded():
    size = (PARTS / TRAINED_FILE).stat().st_size
    assert size < 20e6, f"{TRAINED_FILE} is {size / 1e6:.1f} MB: the shipped parts must stay under 20 MB"


def test_assembling_twice_reuses_the_folder(assembled):
    out, _ = assembled
    assert (out / RECORD_FILE).is_file()
    lines: list[str] = []
    assert ensure_assembled(out, PARTS, log=lines.append) == out
    assert lines == [f"{out} is up to date with {PARTS}"]


def test_merging_the_adapters_changes_no_logit(assembled):
    """The assembled folder (adapters folded into the weights, saved, loaded by load_model) gives
    the logits of the model with the adapters beside the weights."""
    out, _ = assembled
    loaded = load_model(out)
    model, processor, _ = build_from_parts(PARTS)
    model.eval()
    page = STUDY_PAGES.render(VALIDATION_SEED, 0)
    inputs = build_inputs(loaded, page["image"], "Read all the text.")
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merge_lora(model)
        merged = model(**inputs).logits
        saved = loaded.model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=2e-3, rtol=0)
    torch.testing.assert_close(saved, merged, atol=1e-4, rtol=0)


def test_the_assembled_model_reads_as_validation_recorded(assembled):
    """The first two validation pages, answered by the assembled model, give the predictions the
    training run's last validation recorded (greedy decoding; the same pages and questions)."""
    out, _ = assembled
    recorded = json.loads((PARTS / VALIDATION_FILE).read_text(encoding="utf-8"))["validation"][-1]["records"]
    docs = [STUDY_PAGES.render(VALIDATION_SEED, i) | {"doc_id": i} for i in range(2)]
    result = evaluate_reader(load_model(out), docs, TASK_TYPES, seed=VALIDATION_SEED, max_new_tokens=96, progress=False)
    expected = [r for r in recorded if r["doc_id"] < 2]
    assert [(r["prompt"], r["answer"]) for r in result["records"]] == [(r["prompt"], r["answer"]) for r in expected]
    agree = sum(a["prediction"] == b["prediction"] for a, b in zip(result["records"], expected))
    assert agree == len(expected), [(a["prediction"], b["prediction"]) for a, b in zip(result["records"], expected)]
