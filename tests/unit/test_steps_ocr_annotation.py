"""Step 01's module (sparsemm_utils.steps.ocr_annotation): its declaration, its Config, the
outputs it writes and its findings, on small hand-made inputs (no model, no notebook)."""

from __future__ import annotations

import datasets
import pytest

from sparsemm_utils.document_dataset import (
    DocumentConfigError,
    Issue,
    ValidationReport,
    content_fingerprint,
    validate_rows,
)
from sparsemm_utils.findings import FINDINGS_COLUMNS, findings_frame
from sparsemm_utils.page_generator import DocumentGeneratorConfig
from sparsemm_utils.runs import MissingUpstreamError
from sparsemm_utils.steps import ocr_annotation as step
from sparsemm_utils.steps.ocr_annotation import (
    ANNOTATION_REPORT,
    DOCUMENTS,
    FINDINGS,
    STEP,
    Config,
    build_documents,
    findings,
    write_outputs,
)

SMALL = dict(n_documents=3, page_width_range=(224, 280), page_height_range=(112, 160))


def test_step_declares_its_outputs():
    assert STEP.name == "01_ocr_annotation" and STEP.needs == ()
    assert STEP.output_names == ("documents", "annotation_report.json", "findings.csv")
    assert STEP.output("documents") is DOCUMENTS and STEP.output("findings.csv") is FINDINGS
    assert all(a.step == STEP.name and a.reader is not None for a in STEP.outputs)
    assert STEP.notebook_path().is_file()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_defaults():
    cfg = Config()
    assert (cfg.source, cfg.n_documents, cfg.on_bad, cfg.dataset_path) == ("synthetic", 48, "skip", None)
    assert (cfg.run_dir, cfg.n_sample_figures) == ("runs/tiny", 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="hub"), "source must be one of 'synthetic', 'synthdog'"),
        (dict(on_bad="ignore"), "on_bad must be one of 'skip', 'raise'"),
        (dict(dataset_path="data/x"), "only read with source='synthdog'"),
        (dict(source="synthdog", dataset_path=""), "dataset_path must be None or a non-empty string"),
        (dict(split=""), "split must be a non-empty string"),
        (dict(n_documents=-3), "n_documents"),
        (dict(run_dir=""), "run_dir must be a non-empty path"),
        (dict(run_dir=3), "run_dir must be a non-empty path"),
        (dict(n_sample_figures=0), "n_sample_figures must be an int >= 1"),
        (dict(n_sample_figures=True), "n_sample_figures must be an int >= 1"),
        (dict(layout="columns"), "layout must be one of"),
    ],
)
def test_invalid_step_parameters(kwargs, match):
    with pytest.raises(DocumentConfigError, match=match):
        Config(**kwargs)


def test_generator_config_drops_the_step_fields():
    cfg = Config(seed=5, layout="grid", on_bad="raise", run_dir="runs/x", n_sample_figures=2)
    gen = cfg.generator_config()
    assert type(gen) is DocumentGeneratorConfig
    assert (gen.seed, gen.layout) == (5, "grid")
    assert not any(hasattr(gen, name) for name in ("on_bad", "source", "run_dir", "n_sample_figures"))


def test_report_parameters_leave_out_the_notebook_only_fields():
    params = step.report_parameters(Config(run_dir="/somewhere", n_sample_figures=2))
    assert "run_dir" not in params and "n_sample_figures" not in params
    assert list(params)[-4:] == ["source", "dataset_path", "split", "on_bad"]
    assert params["font_size_range"] == (16, 24) and params["seed"] == 0


# ----------------------------------------------------------------------------------------------
# write_outputs
# ----------------------------------------------------------------------------------------------


def test_write_outputs_writes_every_declared_output(tmp_path):
    cfg = Config(run_dir=str(tmp_path), **SMALL)
    with pytest.raises(MissingUpstreamError, match="01_ocr_annotation"):
        DOCUMENTS.read(tmp_path)
    clean, report = validate_rows(build_documents(cfg, progress=False), progress=False)
    found = write_outputs(cfg, clean, report)
    assert all(a.exists(tmp_path) for a in STEP.outputs)
    saved = DOCUMENTS.read(tmp_path)
    assert len(saved) == 3 and content_fingerprint(saved) == content_fingerprint(clean)
    summary = ANNOTATION_REPORT.read(tmp_path)
    assert summary["documents"] == 3 and summary["issues"] == [] and summary["config"]["n_documents"] == 3
    assert summary["chunks"] == report.chunks == sum(len(c) for c in clean["2_coord"])
    assert "run_dir" not in summary["config"]
    table = FINDINGS.read(tmp_path)
    assert list(table.columns) == list(FINDINGS_COLUMNS) and len(table) == len(found) == 5
    assert table["holds"].tolist() == findings_frame(found)["holds"].tolist()
    assert table["headline"].sum() == 1


# ----------------------------------------------------------------------------------------------
# findings, on hand-made reports and documents
# ----------------------------------------------------------------------------------------------


def _docs(*pages: list[str]) -> datasets.Dataset:
    """Documents with one chunk per line of each page (only ``2_coord`` is read by findings)."""
    rows = [
        [{"chunk": text, "coord": [[0.0, 30.0 * i], [100.0, 30.0 * i + 20]]} for i, text in enumerate(lines)]
        for lines in pages
    ]
    return datasets.Dataset.from_dict({"2_coord": rows})


def test_findings_of_a_clean_synthetic_run():
    # two pages: "AB CD" + "\n" + "E" (7 characters, the line break counted), "XYZ" (3)
    docs = _docs(["AB CD", "E"], ["XYZ"])
    report = ValidationReport(
        on_bad="skip", input_rows=2, documents=2, chunks=3, characters=7, text_characters=7, sources={"synthetic": 2}
    )
    found = findings(report, docs, Config(seed=4, layout="grid"))
    assert [f.step for f in found] == ["01_ocr_annotation"] * 5
    data, rows, chunks, chars, length = found
    assert data.headline and data.holds is False and data.n == 2
    assert "2 synthetic documents drawn from seed 4 (grid layout, line chunks" in data.this_run
    assert "1000 rows of nnethercott/synthdog-en-detection" in data.paper
    assert rows.holds is True and rows.n == 2 and rows.this_run.startswith("2 of 2 input rows kept, 0 skipped")
    assert chunks.holds is True and chunks.n == 3
    assert chunks.this_run == "3 of 3 chunk boxes kept, 0 skipped, 0 clipped to the page"
    assert chars.holds is True and chars.n == 7
    assert chars.this_run == "7 character boxes for 7 characters of chunk text; 0 skipped, 0 clipped"
    assert length.holds is True and length.n == 2
    assert "median 5 (3-7)" in length.this_run and "2 of 2 pages have at most 1024" in length.this_run


def test_findings_count_skipped_and_clipped_items():
    docs = _docs(["AB"], [])
    issues = [
        Issue(0, 7, "row", None, "unreadable_image", "x", "skipped"),
        Issue(1, 8, "chunk", 0, "inverted_box", "x", "skipped"),
        Issue(1, 8, "chunk", 1, "box_partly_outside_image", "x", "clipped"),
        Issue(1, 8, "char", 3, "bad_char_text", "x", "skipped"),
        Issue(2, 9, "row", None, "no_chunks", "x", "kept"),
    ]
    report = ValidationReport(
        on_bad="skip", input_rows=3, documents=2, chunks=1, characters=1, text_characters=2,
        sources={"synthetic": 2}, issues=issues,
    )
    _, rows, chunks, chars, _ = findings(report, docs, Config())
    assert rows.holds is False and rows.n == 3
    assert rows.this_run == "2 of 3 input rows kept, 1 skipped (1 kept without any chunk)"
    assert chunks.holds is False and chunks.n == 2
    assert chunks.this_run == "1 of 2 chunk boxes kept, 1 skipped, 1 clipped to the page"
    assert chars.holds is False and chars.this_run.startswith("1 character boxes for 2 characters")
    # a clipped box alone (nothing skipped) still means a box did not lie on its page
    only_clipped = ValidationReport(
        on_bad="skip", input_rows=1, documents=1, chunks=1, characters=2, text_characters=2,
        issues=[Issue(0, 1, "chunk", 0, "box_partly_outside_image", "x", "clipped")],
    )
    assert findings(only_clipped, _docs(["AB"]), Config())[2].holds is False


def test_findings_of_the_papers_data_and_of_long_pages():
    long_page = ["W" * 600, "V" * 600]  # 1201 characters with the line break
    docs = _docs(*([["AB"]] * 999 + [long_page]))
    report = ValidationReport(
        on_bad="skip", input_rows=1000, documents=1000, chunks=1001, characters=0, text_characters=2198,
        sources={"synthdog": 1000},
    )
    cfg = Config(source="synthdog", n_documents=1000, dataset_path="data/synthdog-en-detection")
    data, _, _, chars, length = findings(report, docs, cfg)
    assert data.holds is True and data.n == 1000
    assert data.this_run == "1000 synthdog rows (the first 1000 of data/synthdog-en-detection, in dataset order)"
    assert chars.holds is None and chars.this_run.startswith("none: the original data has no character boxes")
    # a page longer than 1024 characters may still fit a subword tokenizer's 1024 tokens: cannot tell
    assert length.holds is None and "999 of 1000 pages have at most 1024" in length.this_run
    assert "(2-1201)" in length.this_run
    # fewer than the paper's rows: the data claim does not hold
    fewer = ValidationReport(on_bad="skip", input_rows=6, documents=5, sources={"synthdog": 5})
    assert findings(fewer, _docs(*([["A"]] * 5)), Config(source="synthdog", n_documents=6))[0].holds is False


def test_findings_of_an_empty_run():
    report = ValidationReport(on_bad="skip", input_rows=0)
    found = findings(report, _docs(), Config())
    assert found[-1].holds is None and found[-1].n == 0 and found[-1].this_run == "no documents"
