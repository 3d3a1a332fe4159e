"""Step 01 generator (docs/method.md §2, offline data): determinism, geometry, schema."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemm_utils.document_dataset import (
    FEATURES,
    DocumentConfigError,
    content_fingerprint,
    load_documents,
    reading_text,
    save_documents,
    validate_rows,
)
from sparsemm_utils.page_generator import (
    FONTS,
    DocumentGeneratorConfig,
    generate_documents,
    layout_document,
    place_in_cell,
    render_document,
)
from sparsemm_utils.steps.ocr_annotation import Config

SMALL = dict(n_documents=3, page_width_range=(224, 336), page_height_range=(112, 224), lines_per_page_range=(1, 4))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_saved_dataset(tmp_path):
    cfg = DocumentGeneratorConfig(seed=7, **SMALL)
    save_documents(generate_documents(cfg, progress=False), tmp_path / "a")
    save_documents(generate_documents(DocumentGeneratorConfig(seed=7, **SMALL), progress=False), tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == {"data-00000-of-00001.arrow", "dataset_info.json", "state.json"}
    assert a == b  # every file, byte for byte (state.json holds the fingerprint)


def test_different_seed_differs(tmp_path):
    save_documents(generate_documents(DocumentGeneratorConfig(seed=1, **SMALL), progress=False), tmp_path / "a")
    save_documents(generate_documents(DocumentGeneratorConfig(seed=2, **SMALL), progress=False), tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["data-00000-of-00001.arrow"] != b["data-00000-of-00001.arrow"]
    assert a["state.json"] != b["state.json"]


def test_saved_dataset_round_trips_with_schema(tmp_path):
    ds = generate_documents(DocumentGeneratorConfig(**SMALL), progress=False)
    back = load_documents(save_documents(ds, tmp_path / "docs"))
    assert back.features == FEATURES
    assert back["2_coord"] == ds["2_coord"] and back["char_coord"] == ds["char_coord"]
    assert back["doc_id"] == [0, 1, 2] and set(back["source"]) == {"synthetic"}
    assert content_fingerprint(back) == content_fingerprint(ds)


def test_document_k_does_not_depend_on_n_documents():
    few = generate_documents(DocumentGeneratorConfig(**{**SMALL, "n_documents": 2}), progress=False)
    more = generate_documents(DocumentGeneratorConfig(**{**SMALL, "n_documents": 4}), progress=False)
    assert few["2_coord"] == more["2_coord"][:2]
    undecoded = datasets.Image(decode=False)
    assert few.cast_column("image", undecoded)["image"] == more.cast_column("image", undecoded)["image"][:2]


def test_a_layout_is_the_drawn_document_without_its_image():
    grid = DocumentGeneratorConfig(layout="grid", n_documents=3, font_size_range=(20, 26), page_width_range=(224, 300))
    for cfg, index in [(c, i) for c in (DocumentGeneratorConfig(**SMALL), grid) for i in range(3)]:
        drawn = render_document(cfg, index)
        layout = layout_document(cfg, index)
        undrawn = layout.row(draw=False)
        assert undrawn["image"] is None
        assert {k: v for k, v in undrawn.items() if k != "image"} == {k: v for k, v in drawn.items() if k != "image"}
        again = layout.row()
        assert again["image"].size == drawn["image"].size == (layout.width, layout.height)
        assert np.array_equal(np.asarray(again["image"]), np.asarray(drawn["image"]))


def test_word_and_line_levels_share_images_and_words_tile_lines():
    line = render_document(DocumentGeneratorConfig(chunk_level="line", **SMALL), 1)
    word = render_document(DocumentGeneratorConfig(chunk_level="word", **SMALL), 1)
    assert line["image"].tobytes() == word["image"].tobytes()
    # the words of all lines, in order, are the line texts split on spaces
    assert [w["chunk"] for w in word["2_coord"]] == [w for c in line["2_coord"] for w in c["chunk"].split(" ")]
    # each line box is the union of its words' boxes
    i = 0
    for c in line["2_coord"]:
        words = word["2_coord"][i : i + len(c["chunk"].split(" "))]
        i += len(words)
        assert c["coord"][0] == [min(w["coord"][0][0] for w in words), min(w["coord"][0][1] for w in words)]
        assert c["coord"][1] == [max(w["coord"][1][0] for w in words), max(w["coord"][1][1] for w in words)]


def test_place_in_cell_by_hand():
    # ink box (l, t, r, b) = (2, 5, 12, 21): 10 px wide, 16 px high; cell 28; column 1, row 0.
    # centred: ox = 28 + (28 - 10) // 2 - 2 = 35 -> ink x in [37, 47); oy = 0 + (28 - 16) // 2 - 5 = 1
    # -> ink y in [6, 22).
    assert place_in_cell((2, 5, 12, 21), 1, 0, 28) == (35, 1)
    # jitter +10 px right: ox = 45 would put the ink at [47, 57), past the cell's last pixel 55;
    # clamped to ox = 28 + 27 - 12 = 43 -> ink [45, 55): exclusive edge 55 = 28 + 27, floor(55/28) = 1.
    assert place_in_cell((2, 5, 12, 21), 1, 0, 28, dx=10) == (43, 1)
    # column 0, row 2, jitter -10 px up: ox = 0 + 9 - 2 = 7; oy = 56 + 6 - 5 - 10 = 47 -> ink top
    # 52 < 56 (above the cell): clamped to oy = 56 - 5 = 51 -> ink y in [56, 72).
    assert place_in_cell((2, 5, 12, 21), 0, 2, 28, dy=-10) == (7, 51)
    with pytest.raises(DocumentConfigError, match="does not fit"):
        place_in_cell((0, 0, 28, 10), 0, 0, 28)


def test_grid_pages_put_each_character_in_exactly_one_visual_token():
    cfg = DocumentGeneratorConfig(layout="grid", n_documents=6, jitter=6, font_size_range=(20, 26), page_width_range=(224, 300))
    for k in range(cfg.n_documents):
        doc = render_document(cfg, k)
        w, h = doc["image"].size
        assert w % 28 == 0 and h % 28 == 0
        cells = set()
        for c in doc["char_coord"]:
            (x0, y0), (x1, y1) = c["coord"]
            col, row = math.floor(x0 / 28), math.floor(y0 / 28)
            assert (math.floor(x1 / 28), math.floor(y1 / 28)) == (col, row), c  # docs/method.md §3 rule
            cells.add((col, row))
        assert len(cells) == len(doc["char_coord"])  # one character per cell


def test_grid_words_are_separated_by_an_empty_cell():
    cfg = DocumentGeneratorConfig(layout="grid", chunk_level="word", n_documents=4, words_per_line_range=(2, 4))
    for k in range(cfg.n_documents):
        doc = render_document(cfg, k)
        cols = {}
        for c in doc["char_coord"]:
            cols.setdefault(c["chunk_index"], []).append(math.floor(c["coord"][0][0] / 28))
        for i in range(len(doc["2_coord"]) - 1):
            same_row = doc["2_coord"][i]["coord"][0][1] // 28 == doc["2_coord"][i + 1]["coord"][0][1] // 28
            if same_row:
                assert min(cols[i + 1]) - max(cols[i]) == 2


def test_generated_pixels_are_only_paper_where_no_character_box_is():
    doc = render_document(DocumentGeneratorConfig(**SMALL), 0)
    image = doc["image"].convert("L")
    mask = image.copy()
    for c in doc["char_coord"]:
        (x0, y0), (x1, y1) = c["coord"]
        mask.paste(0, (int(x0), int(y0), int(x1), int(y1)))
    paper = image.getpixel((0, 0))
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, paper}  # all ink lies inside some character box


def test_step_config_generates_the_same_as_its_generator_part():
    cfg = Config(**SMALL)
    a = generate_documents(cfg, progress=False)
    b = generate_documents(cfg.generator_config(), progress=False)
    assert content_fingerprint(a) == content_fingerprint(b)
    with pytest.raises(DocumentConfigError, match="source='synthetic'"):
        generate_documents(Config(source="synthdog"), progress=False)


def test_reading_text_by_hand():
    chunks = [
        {"chunk": "AB", "coord": [[0, 0], [20, 10]]},
        {"chunk": "C", "coord": [[30, 2], [40, 12]]},  # centre y 7 <= previous bottom 10: same line
        {"chunk": "D9", "coord": [[0, 20], [20, 30]]},  # centre y 25 > 12: new line
    ]
    assert reading_text(chunks) == "AB C\nD9"
    assert reading_text([]) == ""


layouts = st.sampled_from(["free", "grid"])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    layout=layouts,
    level=st.sampled_from(["line", "word"]),
    charset=st.sampled_from(["ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "AIJW1.", "abgjpqy"]),
    sizes=st.tuples(st.integers(10, 18), st.integers(0, 6)),
    words=st.tuples(st.integers(1, 3), st.integers(0, 4)),
    length=st.tuples(st.integers(1, 5), st.integers(0, 10)),
)
def test_generated_documents_are_valid_and_consistent(seed, layout, level, charset, sizes, words, length):
    cfg = DocumentGeneratorConfig(
        n_documents=1, seed=seed, layout=layout, chunk_level=level, charset=charset,
        font_size_range=(sizes[0], sizes[0] + sizes[1]), page_width_range=(112, 280), page_height_range=(56, 200),
        words_per_line_range=(words[0], words[0] + words[1]), word_length_range=(length[0], length[0] + length[1]),
        lines_per_page_range=(1, 6), margin=4,
    )
    doc = render_document(cfg, 0)
    w, h = doc["image"].size
    assert doc["2_coord"], "every page has at least one chunk"
    for j, chunk in enumerate(doc["2_coord"]):
        chars = [c for c in doc["char_coord"] if c["chunk_index"] == j]
        # the chunk text without spaces is its characters in order
        assert "".join(c["char"] for c in chars) == chunk["chunk"].replace(" ", "")
        if level == "word":
            assert " " not in chunk["chunk"]
        assert set(chunk["chunk"].replace(" ", "")) <= set(charset)
        # the chunk box is the union of its character boxes; every box is inside the page
        (x0, y0), (x1, y1) = chunk["coord"]
        assert [x0, y0] == [min(c["coord"][0][0] for c in chars), min(c["coord"][0][1] for c in chars)]
        assert [x1, y1] == [max(c["coord"][1][0] for c in chars), max(c["coord"][1][1] for c in chars)]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    if layout == "free":
        for c in doc["char_coord"]:
            (x0, y0), (x1, y1) = c["coord"]
            assert cfg.margin <= x0 and x1 <= w - cfg.margin and cfg.margin <= y0 and y1 <= h - cfg.margin


def test_generated_dataset_passes_validation_without_issues():
    ds = generate_documents(DocumentGeneratorConfig(n_documents=6, chunk_level="word"), progress=False)
    clean, report = validate_rows(ds, progress=False)
    assert report.issues == [] and report.documents == 6
    assert report.characters == report.text_characters == sum(len(r) for r in ds["char_coord"])
    assert clean["2_coord"] == ds["2_coord"] and clean["char_coord"] == ds["char_coord"]
    assert content_fingerprint(clean) == content_fingerprint(ds)  # validation keeps the bytes


def test_shipped_font_is_there_with_its_license():
    font = FONTS["dejavu-sans-mono"]
    assert font.is_file() and (font.parent / "LICENSE_DEJAVU.txt").is_file()
    assert "Bitstream" in (font.parent / "LICENSE_DEJAVU.txt").read_text()
