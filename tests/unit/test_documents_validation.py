"""Step 01 validation: every kind of bad input is skipped and reported, or raised (never silent)."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils.document_dataset import (
    FEATURES,
    BadDocumentError,
    DocumentConfigError,
    DocumentError,
    SchemaMismatchError,
    _check_box,
    content_fingerprint,
    load_documents,
    save_documents,
    validate_rows,
)


def png(width: int = 100, height: int = 50) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y1]]


def make_ds(rows: list[dict]) -> datasets.Dataset:
    """rows: partial dicts; defaults give a valid 100x50 document with one chunk "AB"."""
    full = []
    for i, r in enumerate(rows):
        full.append(
            {
                "doc_id": r.get("doc_id", i),
                "image": r.get("image", png()),
                "2_coord": r.get("2_coord", [{"chunk": "AB", "coord": box(10, 10, 30, 20)}]),
                "char_coord": r.get("char_coord", []),
                "source": r.get("source", "synthetic"),
            }
        )
    return datasets.Dataset.from_list(full, features=FEATURES)


# ---- the box rule, by hand --------------------------------------------------------------------


def test_check_box_by_hand():
    # image 100 x 50 = closed rectangle [0, 100] x [0, 50]
    assert _check_box(box(10, 10, 30, 20), 100, 50) == (box(10.0, 10.0, 30.0, 20.0), None, "")
    assert _check_box(box(0, 0, 100, 50), 100, 50)[1] is None  # touching the edges is inside
    assert _check_box(box(5, 5, 5, 9), 100, 50)[1] is None  # degenerate (zero width) is valid, as in step 02
    # partly outside: x0 = -5 -> 0, y1 = 60 -> 50
    clipped, reason, _ = _check_box(box(-5, 10, 30, 60), 100, 50)
    assert (clipped, reason) == (box(0.0, 10.0, 30.0, 50.0), "box_partly_outside_image")
    assert _check_box(box(101, 10, 120, 20), 100, 50)[:2] == (None, "box_outside_image")  # right of the image
    assert _check_box(box(10, -20, 30, -1), 100, 50)[:2] == (None, "box_outside_image")  # above it
    assert _check_box(box(30, 10, 10, 20), 100, 50)[:2] == (None, "inverted_box")
    assert _check_box(box(10, 20, 30, 10), 100, 50)[:2] == (None, "inverted_box")
    assert _check_box([[10, 10]], 100, 50)[:2] == (None, "malformed_box")
    assert _check_box(None, 100, 50)[:2] == (None, "malformed_box")
    assert _check_box(box(10, float("nan"), 30, 20), 100, 50)[:2] == (None, "malformed_box")


# ---- each bad input: skip (counted, reported) and raise --------------------------------------

BAD_CASES = {
    "unreadable_image": ({"image": {"bytes": b"not an image at all", "path": None}}, "row"),
    "empty_chunk_text": ({"2_coord": [{"chunk": "  ", "coord": box(10, 10, 30, 20)}]}, "chunk"),
    "inverted_box": ({"2_coord": [{"chunk": "AB", "coord": box(30, 10, 10, 20)}]}, "chunk"),
    "box_outside_image": ({"2_coord": [{"chunk": "AB", "coord": box(200, 10, 230, 20)}]}, "chunk"),
    "malformed_box": ({"2_coord": [{"chunk": "AB", "coord": [[10, 10]]}]}, "chunk"),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_input_is_skipped_counted_and_reported(reason):
    bad, level = BAD_CASES[reason]
    ds = make_ds([{}, bad, {}])
    clean, report = validate_rows(ds, progress=False)
    issues = [i for i in report.issues if i.reason == reason]
    assert len(issues) == 1
    assert (issues[0].row, issues[0].doc_id, issues[0].level, issues[0].action) == (1, 1, level, "skipped")
    assert report.to_dict()["by_reason"][reason] == 1
    if level == "row":
        assert clean["doc_id"] == [0, 2] and report.skipped_rows == 1 and report.documents == 2
    else:  # the chunk goes; the document, now chunkless, stays (it scores 0) and is noted
        assert clean["doc_id"] == [0, 1, 2] and report.skipped_chunks == 1 and report.chunks == 2
        assert clean["2_coord"][1] == []
        assert [(i.row, i.reason, i.action) for i in report.issues if i.reason == "no_chunks"] == [(1, "no_chunks", "kept")]


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_input_raises_with_row_and_reason(reason):
    bad, level = BAD_CASES[reason]
    with pytest.raises(BadDocumentError) as err:
        validate_rows(make_ds([{}, bad]), on_bad="raise", progress=False)
    assert (err.value.row, err.value.doc_id, err.value.reason) == (1, 1, reason)
    message = str(err.value)
    assert message.startswith(f"row 1 (doc_id 1): {reason.replace('_', ' ')}") and "on_bad='skip'" in message
    if level == "chunk":
        assert "2_coord[0]" in message


def test_truncated_image_is_caught_by_a_full_decode():
    data = png(200, 100)["bytes"]
    clean, report = validate_rows(make_ds([{"image": {"bytes": data[: len(data) // 2], "path": None}}]), progress=False)
    assert len(clean) == 0 and [i.reason for i in report.issues] == ["unreadable_image"]


def test_partly_outside_box_is_clipped_and_counted():
    ds = make_ds([{"2_coord": [{"chunk": "AB", "coord": box(-5, 10, 30, 60)}]}])
    clean, report = validate_rows(ds, progress=False)
    assert clean["2_coord"][0] == [{"chunk": "AB", "coord": box(0.0, 10.0, 30.0, 50.0)}]
    assert report.clipped_boxes == 1 and report.skipped_chunks == 0
    assert report.issues[0].action == "clipped" and report.issues[0].reason == "box_partly_outside_image"
    with pytest.raises(BadDocumentError, match="box partly outside image"):
        validate_rows(ds, on_bad="raise", progress=False)


def test_duplicate_or_missing_doc_id_is_skipped():
    clean, report = validate_rows(make_ds([{"doc_id": 4}, {"doc_id": 4}, {"doc_id": None}]), progress=False)
    assert clean["doc_id"] == [4]
    assert [(i.row, i.reason) for i in report.issues] == [(1, "duplicate_doc_id"), (2, "missing_doc_id")]


def test_characters_follow_their_chunks_and_are_renumbered():
    # chunks: 0 "AB" (good), 1 " " (empty: skipped), 2 "C" (good) -> kept chunks "AB" (new 0), "C" (new 1)
    # chars: A->0, B->0, X->1 (parent skipped), C->2 (-> 1), Q->2 ('Q' not in "C"), Z->7 (no chunk 7),
    #        "" ->0 (not one character), B->0 with an inverted box
    # expected: chars A(0), B(0), C(1); skipped: 5 character entries
    ds = make_ds(
        [
            {
                "2_coord": [
                    {"chunk": "AB", "coord": box(10, 10, 30, 20)},
                    {"chunk": " ", "coord": box(40, 10, 50, 20)},
                    {"chunk": "C", "coord": box(60, 10, 70, 20)},
                ],
                "char_coord": [
                    {"char": "A", "coord": box(10, 10, 20, 20), "chunk_index": 0},
                    {"char": "B", "coord": box(20, 10, 30, 20), "chunk_index": 0},
                    {"char": "X", "coord": box(40, 10, 50, 20), "chunk_index": 1},
                    {"char": "C", "coord": box(60, 10, 70, 20), "chunk_index": 2},
                    {"char": "Q", "coord": box(60, 10, 70, 20), "chunk_index": 2},
                    {"char": "Z", "coord": box(60, 10, 70, 20), "chunk_index": 7},
                    {"char": "", "coord": box(60, 10, 70, 20), "chunk_index": 0},
                    {"char": "B", "coord": box(30, 10, 20, 20), "chunk_index": 0},
                ],
            }
        ]
    )
    clean, report = validate_rows(ds, progress=False)
    assert [c["chunk"] for c in clean["2_coord"][0]] == ["AB", "C"]
    assert [(c["char"], c["chunk_index"]) for c in clean["char_coord"][0]] == [("A", 0), ("B", 0), ("C", 1)]
    assert [(i.level, i.index, i.reason) for i in report.issues] == [
        ("chunk", 1, "empty_chunk_text"),
        ("char", 2, "parent_chunk_skipped"),
        ("char", 4, "char_not_in_chunk"),
        ("char", 5, "bad_chunk_index"),
        ("char", 6, "bad_char_text"),
        ("char", 7, "inverted_box"),
    ]
    assert (report.chunks, report.characters, report.text_characters) == (2, 3, 3)
    assert (report.skipped_chunks, report.skipped_characters) == (1, 5)


def test_report_counts_and_json_shape():
    ds = make_ds([{}, {"image": {"bytes": b"junk", "path": None}}, {"2_coord": [{"chunk": "A B", "coord": box(1, 1, 9, 9)}]}])
    _, report = validate_rows(ds, progress=False)
    d = report.to_dict()
    assert {k: d[k] for k in ("input_rows", "documents", "chunks", "characters", "text_characters")} == {
        "input_rows": 3, "documents": 2, "chunks": 2, "characters": 0, "text_characters": 4  # "AB" + "AB"
    }
    assert d["sources"] == {"synthetic": 2} and d["skipped_rows"] == 1
    assert d["issues"] == [
        {"row": 1, "doc_id": 1, "level": "row", "index": None, "reason": "unreadable_image",
         "detail": d["issues"][0]["detail"], "action": "skipped"}
    ]
    assert "UnidentifiedImageError" in d["issues"][0]["detail"]
    json.dumps(d)  # serialisable
    assert "Skipped: 1 rows" in report.summary()


def test_image_read_from_path_when_bytes_are_absent(tmp_path):
    path = tmp_path / "page.png"
    path.write_bytes(png(60, 40)["bytes"])
    clean, report = validate_rows(make_ds([{"image": {"bytes": None, "path": str(path)}}]), progress=False)
    assert report.issues == [] and clean.cast_column("image", datasets.Image(decode=False))["image"][0]["bytes"] == path.read_bytes()


def test_validate_rejects_wrong_schema_and_on_bad():
    with pytest.raises(SchemaMismatchError, match=r"missing \['char_coord', 'source'\]"):
        validate_rows(datasets.Dataset.from_dict({"doc_id": [0], "image": [png()], "2_coord": [[]]}), progress=False)
    with pytest.raises(SchemaMismatchError, match="must be a datasets.Dataset"):
        validate_rows([{"doc_id": 0}], progress=False)
    with pytest.raises(DocumentConfigError, match="on_bad must be one of"):
        validate_rows(make_ds([{}]), on_bad="warn", progress=False)


@settings(max_examples=100, deadline=None)
@given(
    x0=st.floats(-50, 150), y0=st.floats(-50, 100), w=st.floats(-20, 120), h=st.floats(-20, 80),
)
def test_box_check_invariants(x0, y0, w, h):
    coord = box(x0, y0, x0 + w, y0 + h)
    out, reason, _ = _check_box(coord, 100, 50)
    if reason in (None, "box_partly_outside_image"):
        (a, b), (c, d) = out
        # a kept box lies in the image and inside the original box
        assert 0 <= a <= c <= 100 and 0 <= b <= d <= 50
        assert x0 <= a and c <= x0 + w and y0 <= b and d <= y0 + h
        if reason is None:
            assert out == coord
    else:
        assert out is None and reason in ("inverted_box", "box_outside_image")
        (_, _), (x1, y1) = coord
        assert (reason == "inverted_box") == (x1 < x0 or y1 < y0)


# ---- save / load -------------------------------------------------------------------------------


def test_save_refuses_a_foreign_folder_and_replaces_a_saved_dataset(tmp_path):
    ds = make_ds([{}, {}])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(DocumentError, match="refusing to overwrite"):
        save_documents(ds, tmp_path / "notes")
    save_documents(make_ds([{}, {}, {}]), tmp_path / "docs")
    save_documents(ds, tmp_path / "docs")
    assert len(load_documents(tmp_path / "docs")) == 2


def test_load_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run step 01 \(OCR annotation\) first"):
        load_documents(tmp_path / "nothing")
    datasets.Dataset.from_dict({"doc_id": [1], "text": ["x"]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(SchemaMismatchError, match="needs exactly"):
        load_documents(tmp_path / "other")


def test_fingerprint_follows_content():
    a, b = make_ds([{}]), make_ds([{}])
    assert content_fingerprint(a) == content_fingerprint(b)
    assert content_fingerprint(make_ds([{"doc_id": 9}])) != content_fingerprint(a)
