"""Reading tasks of the tiny reader (sparsemm_utils.reader_tasks): lines, questions, and the training
batches built from them (sparsemm_utils.tiny_reader.batches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils.patch_mapping import QwenVLPatchMapper
from sparsemm_utils.prompts import OCR_PROMPT
from sparsemm_utils.random_models import build_char_tokenizer, build_tiny_processor
from sparsemm_utils.reader_tasks import (
    READER_CHARSET,
    TASK_TYPES,
    NoQuestionError,
    ReaderDocSpec,
    ReaderQuestion,
    ReaderTaskError,
    document_lines,
    draw_question,
    line_question,
    make_task_dataset,
    ocr_question,
    questions_for_document,
    value_keys,
    value_question,
)
from sparsemm_utils.tiny_reader.batches import (
    CollationError,
    answer_char_boxes,
    answer_pointer_labels,
    char_classes,
    collate,
    key_pointer_label,
    visual_char_labels,
)


def grid_doc(lines: list[tuple[int, int, str]], cols: int = 8, rows: int = 4, doc_id: int = 0) -> dict:
    """A hand-made grid document: each ``(row, col, text)`` puts ``text`` one character per 28 px
    cell from cell ``(row, col)``; a character's box is the cell shrunk by 4 px on every side."""
    chunks, chars = [], []
    for row, col, text in lines:
        boxes = []
        for k, ch in enumerate(text):
            if ch == " ":
                continue
            x0, y0 = (col + k) * 28 + 4, row * 28 + 4
            box = [[float(x0), float(y0)], [float(x0 + 20), float(y0 + 20)]]
            boxes.append(box)
            chars.append({"char": ch, "coord": box, "chunk_index": len(chunks)})
        union = [[min(b[0][0] for b in boxes), min(b[0][1] for b in boxes)], [max(b[1][0] for b in boxes), max(b[1][1] for b in boxes)]]
        chunks.append({"chunk": text, "coord": union})
    image = Image.new("RGB", (cols * 28, rows * 28), "white")
    return {"doc_id": doc_id, "image": image, "2_coord": chunks, "char_coord": chars, "source": "synthetic"}


# A page of 4 rows; rows 0, 2, 3 hold text, row 1 is empty.
DOC = grid_doc([(0, 1, "K7 93A"), (2, 0, "AB CD EF"), (3, 2, "Q")])


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("qwen2_vl", build_char_tokenizer("qwen2_vl"))


# ------------------------------------------------------------------------------ lines, questions


def test_document_lines_by_hand():
    lines = document_lines(DOC)
    assert [l.text for l in lines] == ["K7 93A", "AB CD EF", "Q"]
    assert lines[1].words == ("AB", "CD", "EF")
    # "AB CD EF" starts at cell (2, 0): characters A, B in cells 0, 1 (x 4..24, 32..52), C, D in
    # cells 3, 4, E, F in 6, 7; rows: y 2*28 + 4 = 60 .. 80. Word boxes are unions of characters.
    assert lines[1].word_boxes == ((4.0, 60.0, 52.0, 80.0), (88.0, 60.0, 136.0, 80.0), (172.0, 60.0, 220.0, 80.0))
    assert lines[1].box == (4.0, 60.0, 220.0, 80.0)


def test_word_chunks_of_one_row_are_grouped_into_one_line():
    # word-level chunks: "AB" and "CD" on row 0, "EF" on row 2 -> two lines
    doc = grid_doc([(0, 0, "AB"), (0, 3, "CD"), (2, 0, "EF")])
    assert [l.text for l in document_lines(doc)] == ["AB CD", "EF"]


def test_ocr_question_reads_every_line_top_to_bottom():
    q = ocr_question(DOC)
    assert q.task == "ocr" and q.prompt == OCR_PROMPT
    assert q.answer == "K7 93A\nAB CD EF\nQ"
    assert len(q.evidence) == 3


def test_line_question_counts_lines_with_text_not_rows():
    # line 2 is the text on row 2 (row 1 is empty and does not count)
    q = line_question(DOC, 2)
    assert (q.prompt, q.answer, q.detail) == ("Read line 2.", "AB CD EF", {"line": 2})
    assert line_question(DOC, 3).answer == "Q"
    for bad in (0, 4, -1, True, 1.0):
        with pytest.raises(NoQuestionError):
            line_question(DOC, bad)


def test_value_keys_need_two_words_and_a_unique_first_word():
    # "K7 93A" -> key K7 (line 1); "AB CD EF" -> key AB (line 2); "Q" has one word: no key
    assert value_keys(DOC) == {"K7": 1, "AB": 2}
    doc = grid_doc([(0, 0, "K7 93A"), (1, 0, "K7 X"), (2, 0, "AB C")])
    assert value_keys(doc) == {"AB": 3}  # K7 starts two lines: ambiguous, not a key


def test_value_question_answers_the_rest_of_the_line():
    q = value_question(DOC, "AB")
    assert (q.prompt, q.answer, q.detail) == ("Value of AB?", "CD EF", {"key": "AB", "line": 2})
    # evidence: the union of the value's words CD (x 88..136) and EF (x 172..220)
    assert q.evidence == ((88.0, 60.0, 220.0, 80.0),)
    assert value_question(DOC, "K7").answer == "93A"
    with pytest.raises(NoQuestionError, match="not a key"):
        value_question(DOC, "Q")


def test_draw_question_and_errors():
    rng = np.random.default_rng(0)
    assert draw_question(DOC, "ocr", rng).answer == ocr_question(DOC).answer
    assert draw_question(DOC, "line", rng).answer in {"K7 93A", "AB CD EF", "Q"}
    assert draw_question(DOC, "value", rng).answer in {"93A", "CD EF"}
    with pytest.raises(ReaderTaskError, match="task must be one of"):
        draw_question(DOC, "count", rng)
    single = grid_doc([(0, 0, "ABC")])
    with pytest.raises(NoQuestionError, match="key-value"):
        draw_question(single, "value", rng)
    with pytest.raises(ReaderTaskError, match="2_coord"):
        document_lines({"doc_id": 0})


def test_questions_for_document_is_deterministic_and_skips_what_cannot_be_asked():
    a = questions_for_document(DOC, seed=3)
    b = questions_for_document(DOC, seed=3)
    assert a == b and [q.task for q in a] == list(TASK_TYPES)
    single = grid_doc([(0, 0, "ABC")])
    assert [q.task for q in questions_for_document(single)] == ["ocr", "line"]


# ------------------------------------------------------------------------------ documents


def test_reader_doc_spec_validation():
    with pytest.raises(ReaderTaskError, match="more lines than"):
        ReaderDocSpec(rows=(4, 5), lines=(2, 5))
    with pytest.raises(ReaderTaskError, match="32 visual tokens"):
        ReaderDocSpec(cols=(7, 10), rows=(4, 5))
    with pytest.raises(ReaderTaskError, match="charset"):
        ReaderDocSpec(charset="AB C")
    with pytest.raises(ReaderTaskError, match="pair"):
        ReaderDocSpec(cols=8)


def test_reader_doc_spec_pages_are_grid_pages_of_the_requested_size():
    spec = ReaderDocSpec()
    cfg = spec.generator_config(seed=1)
    assert cfg.layout == "grid" and cfg.charset == READER_CHARSET
    # widths 224..307 round down to 8, 9 or 10 cells of 28 px; heights 112..167 to 4 or 5
    assert cfg.page_width_range == (224, 307) and cfg.page_height_range == (112, 167)
    sizes = {spec.render(1, i)["image"].size for i in range(40)}
    assert sizes <= {(w, h) for w in (224, 252, 280) for h in (112, 140)}
    assert len({w for w, _ in sizes}) == 3
    params = spec.step01_params()
    assert params["layout"] == "grid" and params["page_width_range"] == [224, 307]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6))
def test_rendered_pages_host_consistent_questions(seed, index):
    spec = ReaderDocSpec()
    doc = spec.render(seed, index)
    lines = document_lines(doc)
    assert spec.lines[0] <= len(lines) <= spec.lines[1]
    ocr = ocr_question(doc).answer
    # every character box is one character of the OCR answer, in reading order
    assert "".join(c["char"] for c in doc["char_coord"]) == ocr.replace("\n", "").replace(" ", "")
    for k in range(1, len(lines) + 1):
        assert line_question(doc, k).answer == ocr.split("\n")[k - 1]
    for key, k in value_keys(doc).items():
        q = value_question(doc, key)
        assert lines[k - 1].text == f"{key} {q.answer}"
    # every glyph lies in exactly one visual token: one label per character, none ignored
    labels = visual_char_labels(doc, QwenVLPatchMapper(), char_classes())
    assert (labels > 0).sum() == len(doc["char_coord"]) and (labels >= 0).all()
    # every answer character points at the visual token that shows that very character
    classes = char_classes()
    asked = [ocr_question(doc)] + [line_question(doc, k) for k in range(1, len(lines) + 1)]
    grid_w = QwenVLPatchMapper().describe(*doc["image"].size)["grid_w"]
    for q in asked + [value_question(doc, key) for key in value_keys(doc)]:
        pointers = answer_pointer_labels(doc, q, QwenVLPatchMapper())
        blanks = answer_pointer_labels(doc, q, QwenVLPatchMapper(), blanks=True)
        assert len(pointers) == len(blanks) == len(q.answer) + 1 and pointers[-1] == -100
        for i, (ch, token) in enumerate(zip([*q.answer, None], pointers)):
            if ch is not None and ch not in " \n":
                assert labels[token] == classes[ch] and blanks[i] == token
                continue
            assert token == -100
            # a blank step points at the empty cell right of the glyph before it, on the same row
            before = pointers[i - 1] if i and q.answer[i - 1] not in " \n" else -100
            if before == -100 or before % grid_w == grid_w - 1:
                assert blanks[i] == -100
            else:
                assert blanks[i] == before + 1 and labels[blanks[i]] == 0


def test_make_task_dataset_columns_and_determinism():
    ds = make_task_dataset(5, 4)
    assert ds.column_names == ["question_id", "doc_id", "task", "prompt", "answer", "evidence", "detail", "image", "2_coord", "char_coord"]
    assert ds["question_id"] == list(range(len(ds)))
    again = make_task_dataset(5, 4)
    assert ds["answer"] == again["answer"] and ds["prompt"] == again["prompt"]
    other = make_task_dataset(6, 4)
    assert ds["answer"] != other["answer"]
    row = ds[0]
    assert row["task"] == "ocr" and isinstance(row["image"], Image.Image)
    assert isinstance(json.loads(row["detail"]), dict)
    only = make_task_dataset(5, 4, tasks=("line",))
    assert set(only["task"]) == {"line"} and len(only) == 4
    with pytest.raises(ReaderTaskError):
        make_task_dataset(5, 0)
    with pytest.raises(ReaderTaskError, match="task must be one of"):
        make_task_dataset(5, 2, tasks=("ocr", "sum"))


# ------------------------------------------------------------------------------ batches


def test_char_classes():
    assert char_classes("XY") == {"X": 1, "Y": 2}
    assert len(char_classes()) == len(READER_CHARSET) == 26


def test_visual_char_labels_by_hand():
    # 8 x 4 page: "K7 93A" from cell (0, 1): K at token 1, 7 at 2, 9 at 4, 3 at 5, A at 6;
    # "AB CD EF" on row 2: tokens 16, 17, 19, 20, 22, 23; "Q" at (3, 2): token 26.
    labels = visual_char_labels(DOC, QwenVLPatchMapper(), char_classes("K793ABCDEFQ"))
    expected = np.zeros(32, dtype=np.int64)
    for pos, ch in zip((1, 2, 4, 5, 6, 16, 17, 19, 20, 22, 23, 26), "K793AABCDEFQ"):
        expected[pos] = "K793ABCDEFQ".index(ch) + 1
    np.testing.assert_array_equal(labels, expected)


def test_visual_char_labels_ignore_ambiguous_tokens():
    doc = grid_doc([(0, 0, "AB")])
    # a box spanning cells 0 and 1 of row 1 (x 20..40) -> tokens 8 and 9 ignored;
    # a character outside the classes ("Z") -> its token ignored too
    doc["char_coord"].append({"char": "A", "coord": [[20.0, 32.0], [40.0, 50.0]], "chunk_index": 0})
    doc["char_coord"].append({"char": "Z", "coord": [[60.0, 60.0], [70.0, 70.0]], "chunk_index": 0})
    labels = visual_char_labels(doc, QwenVLPatchMapper(), char_classes("AB"))
    assert labels[0] == 1 and labels[1] == 2
    assert labels[8] == labels[9] == -100 and labels[8 * 2 + 2] == -100
    assert (np.delete(labels, [0, 1, 8, 9, 18]) == 0).all()


def test_answer_char_boxes_by_hand():
    # "Value of K7?" -> "93A": the glyphs in cells (0, 4), (0, 5), (0, 6), shrunk by 4 px
    assert answer_char_boxes(DOC, value_question(DOC, "K7")) == [
        (116.0, 4.0, 136.0, 24.0), (144.0, 4.0, 164.0, 24.0), (172.0, 4.0, 192.0, 24.0)
    ]
    # spaces and line breaks are drawn nowhere
    boxes = answer_char_boxes(DOC, value_question(DOC, "AB"))  # "CD EF"
    assert [b is None for b in boxes] == [False, False, True, False, False]
    assert boxes[3] == (172.0, 60.0, 192.0, 80.0)  # E in cell (2, 6)
    assert len(answer_char_boxes(DOC, ocr_question(DOC))) == len("K7 93A\nAB CD EF\nQ")
    no_chars = dict(DOC, char_coord=[])
    with pytest.raises(ReaderTaskError, match="character boxes"):
        answer_char_boxes(no_chars, ocr_question(DOC))
    # a question of another page: its answer is not on the line it names
    other = grid_doc([(0, 0, "AB"), (1, 0, "CD EFGH")])
    same_length = ReaderQuestion("ocr", OCR_PROMPT, "K7 93A\nAB CD EG\nQ", ())  # one character off
    for wrong in (value_question(other, "CD"), line_question(other, 2), ocr_question(other), same_length):
        with pytest.raises(ReaderTaskError, match="is not"):
            answer_char_boxes(DOC, wrong)
    with pytest.raises(ReaderTaskError, match="names line 4 but the document has 3 lines"):
        answer_char_boxes(DOC, ReaderQuestion("line", "Read line 4.", "X", (), {"line": 4}))


def test_answer_pointer_labels_by_hand():
    # 8 x 4 page (one merged token per 28 px cell): tokens are row * 8 + column.
    # "K7 93A" from cell (0, 1): K 1, 7 2, 9 4, 3 5, A 6; "AB CD EF" on row 2: 16, 17, 19, 20, 22, 23; "Q" at 26.
    # One entry per answer token: the characters, then the closing <|im_end|> (drawn nowhere).
    mapper = QwenVLPatchMapper()
    assert answer_pointer_labels(DOC, value_question(DOC, "K7"), mapper).tolist() == [4, 5, 6, -100]
    assert answer_pointer_labels(DOC, value_question(DOC, "AB"), mapper).tolist() == [19, 20, -100, 22, 23, -100]
    assert answer_pointer_labels(DOC, line_question(DOC, 3), mapper).tolist() == [26, -100]
    assert answer_pointer_labels(DOC, ocr_question(DOC), mapper).tolist() == [
        1, 2, -100, 4, 5, 6, -100, 16, 17, -100, 19, 20, -100, 22, 23, -100, 26, -100
    ]
    # blanks: a space, line break or the end points at the empty cell right of the glyph before it
    # ("93A" ends at A, token 6 -> 7; "CD EF": the space after D (20) -> 21; F is in the last column 7)
    assert answer_pointer_labels(DOC, value_question(DOC, "K7"), mapper, blanks=True).tolist() == [4, 5, 6, 7]
    assert answer_pointer_labels(DOC, value_question(DOC, "AB"), mapper, blanks=True).tolist() == [19, 20, 21, 22, 23, -100]
    assert answer_pointer_labels(DOC, line_question(DOC, 3), mapper, blanks=True).tolist() == [26, 27]
    assert answer_pointer_labels(DOC, ocr_question(DOC), mapper, blanks=True).tolist() == [
        1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, -100, 26, 27
    ]
    # a glyph whose box straddles two tokens has no single token to point at, nor does the blank after it
    doc = grid_doc([(0, 0, "AB")])
    doc["char_coord"][1]["coord"] = [[20.0, 4.0], [40.0, 24.0]]
    assert answer_pointer_labels(doc, line_question(doc, 1), mapper).tolist() == [0, -100, -100]
    assert answer_pointer_labels(doc, line_question(doc, 1), mapper, blanks=True).tolist() == [0, -100, -100]


def test_collate_masks_everything_but_the_answer(processor):
    q_value = value_question(DOC, "AB")
    doc2 = grid_doc([(1, 0, "XY")], cols=9, doc_id=1)
    q_line = line_question(doc2, 1)
    batch = collate(processor, [(DOC, q_value), (doc2, q_line)], classes=char_classes())
    tok = processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # 8x4 = 32 and 9x4 = 36 visual tokens
    assert batch["image_grid_thw"].tolist() == [[1, 8, 16], [1, 8, 18]]
    assert int((ids[0] == processor.image_token_id).sum()) == 32
    # labels: the answer and <|im_end|>, nothing else (padding included)
    assert tok.decode(ids[0][labels[0] != -100]) == "CD EF<|im_end|>"
    assert tok.decode(ids[1][labels[1] != -100]) == "XY<|im_end|>"
    assert int((labels[1] != -100).sum()) == 3  # "X", "Y", "<|im_end|>"
    assert bool((mask == 0).any()) and bool((labels[mask == 0] == -100).all())  # padding never a target
    # the answer ends each unpadded sequence
    n0 = int(mask[0].sum())
    assert tok.decode(ids[0][:n0]).endswith("Value of AB?<|im_end|>\n<|im_start|>assistant\nCD EF<|im_end|>")
    # shared prefix: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    # = 1 + 7 ("system\n") + 28 + 1 + 1 ("\n") + 1 + 5 ("user\n") + 1 = 45 tokens
    assert int(batch["prefix_len"]) == 45
    assert ids[0, 45] == processor.image_token_id and ids[0, 44] != processor.image_token_id
    # aux labels: 32 + 36 tokens, K at token 1 of the first image, X at token 9 of the second
    aux = batch["aux_labels"]
    assert aux.shape == (68,)
    classes = char_classes()
    assert aux[1] == classes["K"] and aux[32 + 9] == classes["X"] and aux[32 + 10] == classes["Y"]
    assert "aux_labels" not in collate(processor, [(DOC, q_value)])
    assert "pointer_labels" not in batch


def test_collate_pointer_labels_sit_one_step_before_each_character(processor):
    q_value = value_question(DOC, "AB")  # "CD EF": tokens 19, 20, -, 22, 23 of image 1
    doc2 = grid_doc([(1, 0, "XY")], cols=9, doc_id=1)  # 9 x 4 page: X at token 9, Y at 10 of image 2
    batch = collate(processor, [(DOC, q_value), (doc2, line_question(doc2, 1))], pointers=True)
    ids, mask, pointer = batch["input_ids"], batch["attention_mask"], batch["pointer_labels"]
    assert pointer.shape == ids.shape
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    # sequence 0 ends "...assistant\nCD EF<|im_end|>": position t carries the token of character t + 1,
    # so the pointers start at the "\n" before the answer and stop before its last character
    assert pointer[0, n0 - 7 : n0 - 2].tolist() == [19, 20, -100, 22, 23]
    assert processor.tokenizer.decode(ids[0, n0 - 6 : n0 - 1]) == "CD EF"
    assert pointer[1, n1 - 4 : n1 - 2].tolist() == [9, 10]
    assert int((pointer != -100).sum()) == 4 + 2  # nothing else, padding included
    # with blanks the space and the closing <|im_end|> point too: the space after D at 21; the end
    # of "EF" has no cell (F in the last column); "XY" ends at Y (10), so <|im_end|> looks at 11
    blanks = collate(processor, [(DOC, q_value), (doc2, line_question(doc2, 1))], pointers=True, pointer_blanks=True)
    pointer = blanks["pointer_labels"]
    assert pointer[0, n0 - 7 : n0 - 1].tolist() == [19, 20, 21, 22, 23, -100]
    assert pointer[1, n1 - 4 : n1 - 1].tolist() == [9, 10, 11]
    assert int((pointer != -100).sum()) == 5 + 3



def test_key_pointer_label_by_hand():
    # 8 x 4 page, tokens row * 8 + column: "K7 93A" from cell (0, 1) puts the key's last glyph, 7, at
    # token 2; "AB CD EF" on row 2 from column 0 puts B at 17
    mapper = QwenVLPatchMapper()
    assert key_pointer_label(DOC, value_question(DOC, "K7"), mapper) == 2
    assert key_pointer_label(DOC, value_question(DOC, "AB"), mapper) == 17
    # a one-character key on row 3 of a 9-column page: Z at (3, 4) -> 3 * 9 + 4
    doc = grid_doc([(1, 0, "XY"), (3, 4, "Z 5")], cols=9)
    assert key_pointer_label(doc, value_question(doc, "Z"), mapper) == 31
    # a key glyph over two tokens has no single token
    straddle = grid_doc([(0, 0, "AB C")])
    straddle["char_coord"][1]["coord"] = [[20.0, 4.0], [40.0, 24.0]]
    assert key_pointer_label(straddle, value_question(straddle, "AB"), mapper) == -100
    with pytest.raises(ReaderTaskError, match="value questions only"):
        key_pointer_label(DOC, line_question(DOC, 1), mapper)
    forged = ReaderQuestion("value", "Value of AB?", "CD EF", (), {"key": "AB", "line": 1})
    with pytest.raises(ReaderTaskError, match="does not start line 1"):
        key_pointer_label(DOC, forged, mapper)
    no_chars = dict(DOC, char_coord=[])
    with pytest.raises(ReaderTaskError, match="no character boxes"):
        key_pointer_label(no_chars, value_question(DOC, "K7"), mapper)


def test_collate_key_labels_cover_the_prompt_after_the_key(processor):
    q_value = value_question(DOC, "AB")  # key "AB": B at token 17 of image 1
    doc2 = grid_doc([(1, 0, "XY")], cols=9, doc_id=1)
    samples = [(DOC, q_value), (doc2, line_question(doc2, 1))]
    batch = collate(processor, samples, key_pointers=True)
    ids, mask, keys = batch["input_ids"], batch["attention_mask"], batch["key_labels"]
    assert keys.shape == ids.shape and "pointer_labels" not in batch
    n0 = int(mask[0].sum())
    tok = processor.tokenizer
    # "...Value of AB?<|im_end|>\n<|im_start|>assistant\nCD EF<|im_end|>": the answer and its end are
    # the last 6 tokens, the "\n" before them is the first answer step (the pointer's), so the key
    # labels run from the B of "AB" to the "t" of "assistant": B ? <|im_end|> \n <|im_start|> a s s i s t a n t
    marked = (keys[0] != -100).nonzero()[:, 0]
    assert marked.tolist() == list(range(n0 - 7 - 14, n0 - 7))
    assert tok.decode(ids[0, marked]) == "B?<|im_end|>\n<|im_start|>assistant"
    assert bool((keys[0, marked] == 17).all())
    assert bool((keys[1] == -100).all())  # a line question has no key
    # no key labels unless asked; with pointers both tensors come, on disjoint steps
    assert "key_labels" not in collate(processor, samples)
    both = collate(processor, samples, key_pointers=True, pointers=True)
    assert not bool(((both["key_labels"] != -100) & (both["pointer_labels"] != -100)).any())
    assert int(both["pointer_labels"][0, n0 - 8]) == -100 and int(both["pointer_labels"][0, n0 - 7]) == 19


def test_collate_errors(processor):
    with pytest.raises(CollationError, match="empty"):
        collate(processor, [])
    with pytest.raises(CollationError, match="processor"):
        collate(processor.tokenizer, [(DOC, ocr_question(DOC))])
    bad = dict(DOC, image=np.zeros((112, 224, 3), dtype=np.uint8))
    with pytest.raises(CollationError, match="PIL"):
        collate(processor, [(bad, ocr_question(DOC))])
    # answer pointers need one token per character: a special token in the answer is one token for ten
    special = ReaderQuestion("line", "Read line 3.", "<|im_end|>", ((0.0, 0.0, 1.0, 1.0),), {"line": 3})
    with pytest.raises(CollationError, match="one token per answer character"):
        collate(processor, [(DOC, special)], pointers=True)


def test_reader_question_is_a_plain_value():
    q = ReaderQuestion("ocr", "p", "a", ((0.0, 0.0, 1.0, 1.0),))
    assert q.detail == {} and q == ReaderQuestion("ocr", "p", "a", ((0.0, 0.0, 1.0, 1.0),))
