"""Step 02's module (sparsemm_utils.steps.patch_mapping): its declaration, its Config, the
outputs it writes and its findings, on hand-made documents and records (no model, no notebook).

The documents are 280 x 140 pages, which Qwen2-VL keeps at their size: a 5 x 10 grid of 28 px
tokens, 50 image tokens, position = row * 10 + col (docs/method.md §3)."""

from __future__ import annotations

import copy

import pytest
from PIL import Image

from sparsemm_utils import patch_mapping as pm
from sparsemm_utils.findings import FINDINGS_COLUMNS
from sparsemm_utils.patch_mapping import LlavaNextPatchMapper, PatchMappingError, QwenVLPatchMapper, load_regions
from sparsemm_utils.runs import MissingUpstreamError
from sparsemm_utils.steps import ocr_annotation
from sparsemm_utils.steps.patch_mapping import (
    FINDINGS,
    MAPPING_REPORT,
    REGIONS,
    STEP,
    Config,
    findings,
    mapping_report,
    write_outputs,
)


def _page(doc_id: int, chunks: list, chars: list) -> dict:
    return {
        "doc_id": doc_id,
        "image": Image.new("RGB", (280, 140), "white"),
        "2_coord": [{"chunk": text, "coord": coord} for text, coord in chunks],
        "char_coord": [{"char": c, "coord": coord, "chunk_index": i} for c, coord, i in chars],
    }


def _records(mapper=None) -> list[dict]:
    """Two pages mapped by the library:

    - page 0: chunk "AB" at (30, 10, 60, 40): columns 1..2, rows 0..1 -> [1, 2, 11, 12]; chunk
      "gone" lies outside the image (skipped, no positions); char "A" (30, 10, 40, 40) -> [1, 11],
      char "B" (50, 10, 55, 20) -> [1];
    - page 1: chunk "CD" at (0, 0, 56, 28): columns 0..2, rows 0..1 -> 6 tokens; chunk "EF" at
      (28, 0, 56, 28): columns 1..2, rows 0..1 -> [1, 2, 11, 12], inside "CD"'s region.
    """
    mapper = mapper or QwenVLPatchMapper()
    pages = [
        _page(
            0,
            [("AB", [[30.0, 10.0], [60.0, 40.0]]), ("gone", [[300.0, 10.0], [310.0, 20.0]])],
            [("A", [[30.0, 10.0], [40.0, 40.0]], 0), ("B", [[50.0, 10.0], [55.0, 20.0]], 0)],
        ),
        _page(1, [("CD", [[0.0, 0.0], [56.0, 28.0]]), ("EF", [[28.0, 0.0], [56.0, 28.0]])], []),
    ]
    return [pm.map_document(p, mapper, "qwen2_vl", image_token_start=15, num_image_tokens=50) for p in pages]


def test_step_declares_its_inputs_and_outputs():
    assert STEP.name == "02_patch_mapping" and STEP.needs == ("01_ocr_annotation",)
    assert STEP.inputs == (ocr_annotation.DOCUMENTS,)
    assert STEP.output_names == ("regions.jsonl", "mapping_report.json", "findings.csv")
    assert all(a.step == STEP.name and a.reader is not None for a in STEP.outputs)
    assert STEP.notebook_path().is_file()


def test_config_validation():
    cfg = Config()
    assert (cfg.run_dir, cfg.model_id, cfg.seed, cfg.variant) == ("runs/tiny", "data/tiny_reader", 0, "fidelity")
    assert Config(variant="base_and_crop").variant == "base_and_crop"
    for kwargs, match in [
        (dict(variant="nope"), "variant must be one of 'fidelity', 'base_and_crop'"),
        (dict(figure_doc_index=-1), "figure_doc_index must be an int >= 0"),
        (dict(figure_chunk_index=1.0), "figure_chunk_index must be an int >= 0"),
        (dict(seed=True), "seed must be an int >= 0"),
        (dict(model_id=""), "model_id must be a non-empty string"),
        (dict(run_dir=""), "run_dir must be a non-empty path"),
    ]:
        with pytest.raises(PatchMappingError, match=match):
            Config(**kwargs)
    assert issubclass(PatchMappingError, ValueError)


def test_hand_example_records():
    first, second = _records()
    assert [c["positions"] for c in first["chunks"]] == [[1, 2, 11, 12], []]
    assert [c["positions"] for c in first["chars"]] == [[1, 11], [1]]
    assert [c["positions"] for c in second["chunks"]] == [[0, 1, 2, 10, 11, 12], [1, 2, 11, 12]]


def test_mapping_report_by_hand():
    report = mapping_report(_records(), QwenVLPatchMapper())
    assert report["step"] == "02_patch_mapping" and report["mapper"] == "QwenVLPatchMapper"
    assert (report["n_documents"], report["n_chunks"], report["n_chunks_mapped"]) == (2, 4, 3)
    assert (report["n_chars"], report["n_chars_mapped"], report["n_skipped"]) == (2, 2, 1)
    assert report["skipped"][0]["doc_id"] == 0 and report["skipped"][0]["kind"] == "chunk"
    assert report["tokens_per_chunk"] == {"count": 3, "min": 4, "median": 4.0, "mean": 4.6667, "max": 6}
    assert report["tokens_per_char"] == {"count": 2, "min": 1, "median": 1.5, "mean": 1.5, "max": 2}
    assert report["image_tokens_per_document"]["mean"] == 50.0
    assert report["variant"] == "fidelity" and report["geometry_settings"]["min_pixels"] == 32 * 28 * 28
    empty = mapping_report([], LlavaNextPatchMapper())
    assert empty["tokens_per_chunk"] == {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    assert empty["geometry_settings"]["base_size"] == 336


def test_write_outputs_round_trip(tmp_path):
    with pytest.raises(MissingUpstreamError, match="02_patch_mapping"):
        REGIONS.read(tmp_path)
    records, mapper = _records(), QwenVLPatchMapper()
    found = write_outputs(Config(run_dir=str(tmp_path)), records, mapper)
    assert all(a.exists(tmp_path) for a in STEP.outputs)
    assert REGIONS.read(tmp_path) == records == load_regions(STEP.folder(tmp_path))
    assert len(REGIONS.path(tmp_path).read_text().splitlines()) == 2
    assert MAPPING_REPORT.read(tmp_path) == mapping_report(records, mapper)
    table = FINDINGS.read(tmp_path)
    assert list(table.columns) == list(FINDINGS_COLUMNS) and len(table) == len(found) == 5
    assert table["claim"].tolist() == [f.claim for f in found]
    assert table["headline"].tolist() == [True, False, False, False, False]


def test_findings_by_hand():
    agree, rule, mapped, finer, chance = findings(_records(), QwenVLPatchMapper())
    assert agree.headline and agree.holds is True and agree.n == 2
    assert agree.this_run == "2 of 2 documents agree (qwen2_vl); image tokens per page: median 50 (50-50)"
    assert rule.holds is True and rule.this_run.startswith("QwenVLPatchMapper, variant 'fidelity': rows floor(y0/28)")
    # 3 of 4 chunk boxes ("gone" lies outside the page), 2 of 2 character boxes
    assert mapped.holds is False and mapped.n == 6
    assert mapped.this_run == (
        "3 of 4 chunk boxes and 2 of 2 character boxes have a region; 1 skipped (outside the image or malformed)"
    )
    # chunks 4, 6, 4 tokens (mean 4.67); characters 2, 1 (mean 1.5), both inside "AB"'s region
    assert finer.holds is True and finer.n == 2
    assert "per chunk region: median 4 (4-6), mean 4.67" in finer.this_run
    assert "per character region: median 1.5 (1-2), mean 1.50" in finer.this_run
    assert "2 of 2 character regions lie inside their chunk's" in finer.this_run
    # covered: page 0 {1, 2, 11, 12}, page 1 {0, 1, 2, 10, 11, 12} -> 10 of 100 tokens;
    # chance: mean(4/50, 6/50, 4/50) = 9.3 %
    assert chance.holds is None and chance.n == 3
    assert chance.this_run.startswith("10 of 100 image tokens (10.0%) lie in some chunk region")
    assert "probability 9.3% on average (n = 3 chunks)" in chance.this_run


def test_findings_see_a_count_mismatch_a_variant_and_stray_characters():
    records = _records()
    bad = copy.deepcopy(records)
    bad[1]["num_image_tokens"] = 49  # as if another processor had laid out the image
    agree = findings(bad, QwenVLPatchMapper())[0]
    assert agree.holds is False and agree.this_run.startswith("1 of 2 documents agree")
    assert agree.this_run.endswith("documents that disagree: [1]")
    # a character whose region leaves its chunk's breaks the "finer" claim
    stray = copy.deepcopy(records)
    stray[0]["chars"][1]["positions"] = [40]
    assert findings(stray, QwenVLPatchMapper())[3].holds is False
    # no character boxes (the original data): cannot tell
    bare = copy.deepcopy(records)
    for r in bare:
        r["chars"] = []
    assert findings(bare, QwenVLPatchMapper())[3].holds is None
    # the LLaVA-NeXT base_and_crop variant is not the paper's rule
    rule = findings([], LlavaNextPatchMapper(variant="base_and_crop"))[1]
    assert rule.holds is False and "plus the base-grid tokens under the box" in rule.this_run


def test_findings_of_an_empty_run():
    agree, _, mapped, finer, chance = findings([], QwenVLPatchMapper())
    assert agree.holds is False and agree.n == 0 and agree.this_run == "0 of 0 documents agree (no model)"
    assert mapped.holds is None and finer.holds is None and chance.this_run == "no mapped chunk regions"
