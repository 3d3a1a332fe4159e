"""The original data's adapter (docs/method.md §2), on the local fixture in the hub's schema."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest

from sparsemm_utils.document_dataset import FEATURES, SchemaMismatchError, validate_rows
from sparsemm_utils.synthdog import (
    FIXTURE_DIR,
    FIXTURE_GENERATOR,
    SYNTHDOG_COLUMNS,
    SYNTHDOG_FEATURES,
    NotEnoughRowsError,
    SynthdogError,
    build_synthdog_fixture,
    fixture_rows,
    load_synthdog,
    read_synthdog_rows,
)
from sparsemm_utils.steps.ocr_annotation import Config, build_documents

PARQUET = FIXTURE_DIR / "data" / "train-00000-of-00001.parquet"


def test_fixture_has_the_hub_layout_and_schema():
    assert (FIXTURE_DIR / "README.md").is_file() and PARQUET.is_file()
    stream = datasets.load_dataset(str(FIXTURE_DIR), split="train", streaming=True)
    assert stream.features == SYNTHDOG_FEATURES  # parsed from the README's dataset_info, as on the hub
    assert tuple(stream.column_names) == SYNTHDOG_COLUMNS
    assert SYNTHDOG_COLUMNS == ("image", "ground_truth", "2_coord", "4_coord", "2_coord_norm", "4_coord_norm")
    # 2_coord is a list of structs (not a JSON string) with float64 [[xmin, ymin], [xmax, ymax]]
    assert SYNTHDOG_FEATURES["2_coord"] == datasets.List(
        {"chunk": datasets.Value("string"), "coord": datasets.List(datasets.List(datasets.Value("float64")))}
    )


def test_committed_fixture_matches_its_builder():
    stream = datasets.load_dataset(str(FIXTURE_DIR), split="train", streaming=True)
    stream = stream.cast_column("image", datasets.Image(decode=False))
    assert [dict(r) for r in stream] == [
        {**r, "image": {"bytes": r["image"]["bytes"], "path": None}} for r in fixture_rows()
    ]


def test_rows_come_in_dataset_order_with_the_hub_fields():
    rows = read_synthdog_rows(6, str(FIXTURE_DIR))
    expected = fixture_rows()
    assert [r["2_coord"] for r in rows] == [r["2_coord"] for r in expected]
    r0 = rows[0]
    assert json.loads(r0["ground_truth"])["gt_parse"]["text_sequence"].split("\n")[0] == r0["2_coord"][0]["chunk"]
    # the normalised boxes are the pixel boxes divided by (w, h); 4_coord holds the 4 corners
    docs = load_synthdog(1, str(FIXTURE_DIR))
    w, h = docs[0]["image"].size
    (x0, y0), (x1, y1) = r0["2_coord"][0]["coord"]
    assert r0["2_coord_norm"][0]["coord"] == [[x0 / w, y0 / h], [x1 / w, y1 / h]]
    assert r0["4_coord"][0]["coord"] == [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def test_load_synthdog_converts_to_the_step_schema():
    ds = load_synthdog(4, str(FIXTURE_DIR))
    assert ds.features == FEATURES
    assert ds["doc_id"] == [0, 1, 2, 3]  # doc_id = index in dataset order
    assert ds["source"] == ["synthdog"] * 4 and ds["char_coord"] == [[], [], [], []]
    assert ds["2_coord"] == [r["2_coord"] for r in fixture_rows()[:4]]
    # image bytes are the original JPEG bytes, not re-encoded
    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    assert [r["bytes"] for r in raw] == [r["image"]["bytes"] for r in fixture_rows()[:4]]
    assert raw[0]["bytes"][:2] == b"\xff\xd8"  # JPEG


def test_first_n_rows_are_a_prefix():
    assert load_synthdog(2, str(FIXTURE_DIR))["2_coord"] == load_synthdog(5, str(FIXTURE_DIR))["2_coord"][:2]


def test_corrupt_image_in_the_fixture_is_reported():
    clean, report = validate_rows(load_synthdog(6, str(FIXTURE_DIR)), progress=False)
    assert report.documents == 5 and clean["doc_id"] == [0, 1, 2, 3, 4]
    assert [(i.row, i.doc_id, i.reason, i.action) for i in report.issues] == [(5, 5, "unreadable_image", "skipped")]
    assert "truncated" in report.issues[0].detail
    assert report.characters == 0 and report.chunks == sum(len(c) for c in clean["2_coord"]) > 0


def test_other_local_forms_read_the_same_rows(tmp_path):
    from_parquet = load_synthdog(3, str(PARQUET))
    datasets.Dataset.from_list(fixture_rows(), features=SYNTHDOG_FEATURES).save_to_disk(str(tmp_path / "saved"))
    from_disk = load_synthdog(3, str(tmp_path / "saved"))
    assert from_parquet["2_coord"] == from_disk["2_coord"] == load_synthdog(3, str(FIXTURE_DIR))["2_coord"]


def test_build_documents_reads_the_fixture_by_relative_path():
    cfg = Config(source="synthdog", n_documents=2, dataset_path="data/fixtures/synthdog_en_detection")
    ds = build_documents(cfg, progress=False)
    assert ds["doc_id"] == [0, 1] and ds["source"] == ["synthdog", "synthdog"]


def test_adapter_errors(tmp_path):
    with pytest.raises(NotEnoughRowsError, match="has 6 rows, fewer than n_rows=7; ask for at most 6"):
        load_synthdog(7, str(FIXTURE_DIR))
    with pytest.raises(SynthdogError, match="n_rows must be an int >= 1"):
        load_synthdog(0, str(FIXTURE_DIR))
    with pytest.raises(FileNotFoundError, match="(?s)no dataset at .*hf download nnethercott/synthdog-en-detection"):
        load_synthdog(1, str(tmp_path / "missing"))
    with pytest.raises(SynthdogError, match="only the 'train' split"):
        load_synthdog(1, str(PARQUET), split="test")
    datasets.Dataset.from_dict({"image": [None], "text": ["x"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(SchemaMismatchError, match=r"lacking \['2_coord'\]"):
        load_synthdog(1, str(tmp_path / "other.parquet"))


def test_hub_id_offline_gives_download_instructions():
    code = (
        "from sparsemm_utils.synthdog import load_synthdog, SynthdogUnavailableError\n"
        "try:\n    load_synthdog(2)\nexcept SynthdogUnavailableError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR cannot reach the hub dataset 'nnethercott/synthdog-en-detection'" in out.stdout, out.stderr
    assert "hf download nnethercott/synthdog-en-detection README.md data/train-00000-of-00010.parquet" in out.stdout
    assert "dataset_path='data/synthdog-en-detection'" in out.stdout


def test_fixture_builder_validates_and_writes_corrupt_rows(tmp_path):
    with pytest.raises(SynthdogError, match=r"corrupt_rows \[9\]"):
        build_synthdog_fixture(tmp_path / "f", corrupt_rows=(9,))
    out = build_synthdog_fixture(tmp_path / "f", corrupt_rows=(0, 2))
    _, report = validate_rows(load_synthdog(FIXTURE_GENERATOR.n_documents, str(out)), progress=False)
    assert [i.row for i in report.issues if i.reason == "unreadable_image"] == [0, 2]
    shutil.rmtree(out)
