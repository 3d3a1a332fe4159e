"""The tiny reader (sparsemm_utils.tiny_reader): schedules, losses, a short training run, the shipped checkpoint."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsemm_utils.models import load_model
from sparsemm_utils.patch_mapping import QwenVLPatchMapper
from sparsemm_utils.reader_tasks import (
    HELDOUT_SEED,
    TASK_TYPES,
    VALIDATION_SEED,
    document_lines,
    heldout_documents,
    value_keys,
)
from sparsemm_utils.runs import repo_root
from sparsemm_utils.tiny_reader.accuracy import (
    error_breakdown,
    evaluate_reader,
    read,
    summarize_records,
    value_accuracy_by_keys,
    value_error_sources,
)
from sparsemm_utils.tiny_reader.batches import StepBatches, answer_pointer_labels, char_classes, collate, key_pointer_label
from sparsemm_utils.tiny_reader.card import rewrite_model_card, write_model_card
from sparsemm_utils.tiny_reader.cli import build_parser, main, train_config_from_args
from sparsemm_utils.tiny_reader.config import (
    DEFAULT_READER_DIR,
    CheckpointMismatchError,
    ReaderModelSpec,
    TinyReaderError,
    TrainConfig,
    TrainConfigError,
    reader_doc_spec,
)
from sparsemm_utils.tiny_reader.curriculum import easy_page_probability, step_samples, step_task
from sparsemm_utils.tiny_reader.losses import POSITION_LABEL_SMOOTHING, reader_losses, visual_positions
from sparsemm_utils.tiny_reader.model import POSITION_CLASSES, AuxiliaryHeads, build_reader, linear_patch_embedding
from sparsemm_utils.tiny_reader.training import learning_rate, save_reader, train_reader

# A reader small enough to train a few dozen steps in seconds.
SMALL_MODEL = ReaderModelSpec(text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=64,
                              vision_hidden=16, vision_layers=1, vision_heads=2, vision_intermediate=32)


def small_config(**overrides) -> TrainConfig:
    base = dict(steps=30, batch_size=4, lr=2e-3, warmup_steps=3, validate_every=0, checkpoint_every=0,
                data_workers=0, threads=2, model_spec=SMALL_MODEL, pointer_layer=2)
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------ fast: schedules


def test_learning_rate_by_hand():
    cfg = TrainConfig(steps=111, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    # warm-up: lr * (step + 1) / 10
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    # cosine over steps 10 .. 110 (span 100): t = 0 -> lr; t = 0.5 -> lr * (0.1 + 0.9 * 0.5) = 5.5e-4;
    # t = 1 (last step) -> 0.1 * lr
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(5.5e-4)
    assert learning_rate(cfg, 110) == pytest.approx(1e-4)
    lrs = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_easy_page_probability_by_hand():
    cfg = TrainConfig(steps=100, easy_until=0.1, ramp_until=0.4, full_fraction=0.9)
    # 1 before step 10, then linear to 1 - 0.9 = 0.1 at step 40: at step 25 (half-way) 0.55
    assert easy_page_probability(cfg, 0) == 1.0 and easy_page_probability(cfg, 9) == 1.0
    assert easy_page_probability(cfg, 10) == pytest.approx(1.0)
    assert easy_page_probability(cfg, 25) == pytest.approx(0.55)
    assert easy_page_probability(cfg, 40) == pytest.approx(0.1)
    assert easy_page_probability(cfg, 99) == pytest.approx(0.1)


def test_step_task_is_seeded_and_follows_the_weights():
    cfg = TrainConfig(task_weights=(0.5, 0.5, 0.0))
    tasks = [step_task(cfg, s) for s in range(400)]
    assert tasks == [step_task(cfg, s) for s in range(400)]
    assert "value" not in tasks and 150 < tasks.count("ocr") < 250
    other = TrainConfig(seed=1, task_weights=(0.5, 0.5, 0.0))
    assert tasks != [step_task(other, s) for s in range(400)]


def test_step_samples_are_deterministic_and_follow_the_curriculum():
    cfg = TrainConfig(steps=100, batch_size=6, easy_lines=(1, 1), easy_until=0.5, ramp_until=0.5)
    a, b = step_samples(cfg, 3), step_samples(cfg, 3)
    assert [q for _, q in a] == [q for _, q in b]
    assert all(len(document_lines(doc)) == 1 for doc, _ in a)  # easy pages only before step 50
    assert {q.task for _, q in a} == {step_task(cfg, 3)}
    late = step_samples(cfg, 80)  # afterwards 90% full pages (2-4 lines)
    assert any(len(document_lines(doc)) >= 2 for doc, _ in late)


def test_value_pages_hold_two_keys_when_asked_and_only_on_full_pages():
    # steps 0-19 easy pages only (1-2 lines), from step 20 on full pages only (full_fraction 1)
    base = dict(steps=40, batch_size=12, task_weights=(0.0, 0.0, 1.0), easy_until=0.5, ramp_until=0.5, full_fraction=1.0)
    natural, chosen = TrainConfig(**base, value_multi_key=0.0), TrainConfig(**base, value_multi_key=1.0)

    def keys(samples):
        return [len(value_keys(doc)) for doc, _ in samples]

    late = [n for s in (30, 31, 32) for n in keys(step_samples(chosen, s))]
    assert min(late) >= 2
    # the natural stream has one-key pages (about half of them), and value_multi_key 0 is it
    assert 1 in [n for s in (30, 31, 32) for n in keys(step_samples(natural, s))]
    # a question about one of the keys of the page, its answer read on the key's line
    for doc, q in step_samples(chosen, 30):
        key = q.detail["key"]
        assert value_keys(doc)[key] == q.detail["line"]
        assert q.answer == " ".join(document_lines(doc)[q.detail["line"] - 1].words[1:])
    # easy pages are left alone: the curriculum's first pages are the same in both runs
    early_a, early_b = step_samples(natural, 3), step_samples(chosen, 3)
    assert [q for _, q in early_a] == [q for _, q in early_b]
    assert [d["char_coord"] for d, _ in early_a] == [d["char_coord"] for d, _ in early_b]
    # other tasks draw the same pages whatever value_multi_key says
    ocr = dict(base, task_weights=(1.0, 0.0, 0.0))
    assert [q for _, q in step_samples(TrainConfig(**ocr, value_multi_key=0.0), 30)] == [q for _, q in step_samples(TrainConfig(**ocr, value_multi_key=1.0), 30)]


def test_train_config_errors():
    for bad in (dict(steps=0), dict(lr=0.0), dict(task_weights=(1.0, 0.0)), dict(task_weights=(0, 0, 0)),
                dict(easy_until=0.5, ramp_until=0.2), dict(seed=HELDOUT_SEED), dict(seed=VALIDATION_SEED),
                dict(full_fraction=1.5), dict(batch_size=True), dict(position_weight=-0.1), dict(position_layer=0),
                dict(position_layer=5), dict(position_start=1.5), dict(pointer_weight=-1.0), dict(pointer_layer=0),
                dict(pointer_layer=5), dict(pointer_layer=True), dict(pointer_start=-0.1), dict(key_weight=-0.5),
                dict(key_layer=0), dict(key_layer=5), dict(key_start=1.1), dict(value_multi_key=-0.1),
                dict(value_multi_key=1.5)):
        with pytest.raises(TrainConfigError):
            TrainConfig(**bad)
    with pytest.raises(TrainConfigError, match="unknown training options"):
        TrainConfig.from_dict({"steps": 10, "epochs": 3})
    with pytest.raises(TrainConfigError, match="rope_theta"):
        ReaderModelSpec(rope_theta=0.5)
    cfg = TrainConfig(steps=7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # a train_config.json written before the position head existed describes a run without it
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith(("position_", "pointer_"))}
    assert TrainConfig.from_dict(old).position_weight == 0.0 and cfg.position_weight == 0.1
    # ... and one written before the pointer head existed, a run without that one
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("pointer_")}
    assert TrainConfig.from_dict(old).pointer_weight == 0.0 and TrainConfig.from_dict(old).position_weight == 0.1
    assert cfg.pointer_weight == 0.6 and cfg.pointer_layer == 3 and cfg.pointer_blanks is True
    assert cfg.task_weights == (0.28, 0.2, 0.52)  # the shipped recipe (data/tiny_reader/MODEL_CARD.md)
    # ... and one written before blank pointers existed, a run that pointed at characters only
    old = {k: v for k, v in TrainConfig(pointer_blanks=True).to_dict().items() if k != "pointer_blanks"}
    assert TrainConfig.from_dict(old).pointer_blanks is False
    # ... and one written before the key pointer existed, a run without it
    old = {k: v for k, v in TrainConfig(key_weight=0.5).to_dict().items() if not k.startswith("key_")}
    assert TrainConfig.from_dict(old).key_weight == 0.0 and TrainConfig().key_weight == 0.3
    # ... and one written before value pages were chosen for their keys, a run on natural pages
    old = {k: v for k, v in TrainConfig(value_multi_key=1.0).to_dict().items() if k != "value_multi_key"}
    assert TrainConfig.from_dict(old).value_multi_key == 0.0


def test_step_batches_point_blanks_only_when_asked():
    _, processor = build_reader(SMALL_MODEL, seed=0)
    counts = {}
    for blanks in (False, True):
        cfg = small_config(pointer_blanks=blanks)
        batch = StepBatches(cfg, processor, char_classes())[40]
        expected = sum(int((answer_pointer_labels(d, q, QwenVLPatchMapper(), blanks=blanks) != -100).sum()) for d, q in step_samples(cfg, 40))
        counts[blanks] = int((batch["pointer_labels"] != -100).sum())
        assert counts[blanks] == expected
    # every answer ends with <|im_end|>: at least one blank per sequence unless its last glyph is in the last column
    assert counts[True] > counts[False]
    args = build_parser().parse_args(["train", "--pointer-blanks"])
    assert train_config_from_args(args).pointer_blanks is True
    assert train_config_from_args(build_parser().parse_args(["train"])).pointer_blanks is True  # the default
    assert train_config_from_args(build_parser().parse_args(["train", "--no-pointer-blanks"])).pointer_blanks is False


def test_step_batches_carry_key_labels_only_when_asked():
    _, processor = build_reader(SMALL_MODEL, seed=0)
    value_step = next(s for s in range(100) if step_task(small_config(), s) == "value")
    assert "key_labels" not in StepBatches(small_config(key_weight=0.0), processor, char_classes())[value_step]
    cfg = small_config(key_weight=0.5)
    batch = StepBatches(cfg, processor, char_classes())[value_step]
    mapper = QwenVLPatchMapper()
    for i, (doc, q) in enumerate(step_samples(cfg, value_step)):
        marked = batch["key_labels"][i][batch["key_labels"][i] != -100]
        # the key's last character, "?", <|im_end|>, "\n", <|im_start|> and the 9 characters of "assistant"
        assert len(marked) == 14 and bool((marked == key_pointer_label(doc, q, mapper)).all())
    line_step = next(s for s in range(100) if step_task(cfg, s) == "line")
    assert bool((StepBatches(cfg, processor, char_classes())[line_step]["key_labels"] == -100).all())
    args = build_parser().parse_args(["train", "--key-weight", "0.4", "--key-layer", "1", "--key-start", "0.2"])
    got = train_config_from_args(args)
    assert (got.key_weight, got.key_layer, got.key_start) == (0.4, 1, 0.2)


def test_summarize_records_by_hand():
    records = [
        {"task": "ocr", "answer": "AB\nCD", "prediction": "AB\nCD"},  # exact, 0 edits of 5
        {"task": "ocr", "answer": "XYZW", "prediction": "XYW"},  # 1 deletion of 4
        {"task": "line", "answer": "AB", "prediction": "QQQQQ"},  # 5 edits of 2 -> clipped to 0 per question
    ]
    s = summarize_records(records)
    assert s["ocr"] == {"n": 2, "exact_match": 0.5, "char_accuracy": pytest.approx(1 - 1 / 9),
                        "mean_char_accuracy": pytest.approx((1 + 0.75) / 2)}
    assert s["line"]["exact_match"] == 0.0 and s["line"]["char_accuracy"] == 0.0
    # all: 6 edits over 11 answer characters
    assert s["all"]["n"] == 3 and s["all"]["char_accuracy"] == pytest.approx(1 - 6 / 11)
    assert list(s) == ["ocr", "line", "all"]


def test_error_breakdown_by_hand():
    records = [
        {"task": "value", "answer": "V", "prediction": "V7W"},  # read past the word: wrong length
        {"task": "value", "answer": "HVJX", "prediction": "HVDX"},  # right length, one wrong character
        {"task": "value", "answer": "Q", "prediction": "Q"},
        {"task": "value", "answer": "AB", "prediction": "AB"},
        {"task": "ocr", "answer": "Z", "prediction": ""},  # another task: not counted
    ]
    b = error_breakdown(records, "value")
    assert (b["n"], b["wrong"], b["wrong_length"], b["same_length"]) == (4, 2, 1, 1)
    assert b["by_answer_length"] == {1: (2, 0.5), 2: (1, 1.0), 4: (1, 0.0)}


def test_visual_positions_by_hand():
    # image 1: 4 x 6 patches = 2 x 3 merged tokens; image 2: 2 x 4 patches = 1 x 2 merged tokens
    rows, cols = visual_positions(torch.tensor([[1, 4, 6], [1, 2, 4]]))
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert cols.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.raises(TinyReaderError, match="larger than the position head"):
        visual_positions(torch.tensor([[1, 2, 2 * (POSITION_CLASSES + 1)]]))


def test_auxiliary_heads_keep_the_glyph_head_of_a_run_without_positions():
    with_pos = AuxiliaryHeads(32, 27, position=True, seed=5)
    without = AuxiliaryHeads(32, 27, position=False, seed=5)
    torch.manual_seed(6)
    plain = torch.nn.Linear(32, 27)  # the glyph head as it was built before the position head existed
    assert without.position is None and with_pos.position.out_features == 2 * POSITION_CLASSES
    for a, b in zip(with_pos.glyph.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(with_pos.glyph.parameters(), without.glyph.parameters()))
    # the pointer head has its own seed: adding it changes neither of the others
    with_ptr = AuxiliaryHeads(32, 27, position=True, pointer=True, seed=5)
    assert with_pos.pointer is None and with_ptr.pointer.out_features == 2 * POSITION_CLASSES
    assert all(torch.equal(a, b) for a, b in zip(with_ptr.parameters(), with_pos.parameters()))  # glyph, position
    torch.manual_seed(8)
    assert torch.equal(with_ptr.pointer.weight, torch.nn.Linear(32, 2 * POSITION_CLASSES).weight)
    # ... and so has the key pointer head (seed + 4)
    with_key = AuxiliaryHeads(32, 27, position=True, pointer=True, key=True, seed=5)
    assert with_ptr.key is None and with_key.key.out_features == 2 * POSITION_CLASSES
    assert all(torch.equal(a, b) for a, b in zip(with_key.parameters(), with_ptr.parameters()))  # glyph, position, pointer
    torch.manual_seed(9)
    assert torch.equal(with_key.key.weight, torch.nn.Linear(32, 2 * POSITION_CLASSES).weight)


def _grid_doc(doc_id: int, lines: dict[int, tuple[int, str]]) -> dict:
    """A step-01 row (one chunk per line, ``char_coord``): {row: (first column, text)} on 28 px cells."""
    chunks, chars = [], []
    for j, (row, (col0, text)) in enumerate(sorted(lines.items())):
        y = row * 28
        chunks.append({"chunk": text, "coord": [[col0 * 28 + 5.0, y + 4.0], [(col0 + len(text) - 1) * 28 + 20.0, y + 24.0]]})
        for i, ch in enumerate(text):
            if ch != " ":
                x = (col0 + i) * 28
                chars.append({"char": ch, "coord": [[x + 5.0, y + 4.0], [x + 20.0, y + 24.0]], "chunk_index": j})
    return {"doc_id": doc_id, "2_coord": chunks, "char_coord": chars}


def test_value_error_sources_by_hand():
    docs = {
        0: _grid_doc(0, {0: (0, "AB C"), 1: (0, "DE FG")}),
        1: _grid_doc(1, {0: (2, "K QR"), 2: (1, "XYZ")}),
    }
    records = [
        # 'C' right; 'G' should come from the empty cell (row 0, col 4): drawn at col 4 of row 1
        {"task": "value", "doc_id": 0, "prompt": "Value of AB?", "answer": "C", "prediction": "CG"},
        # value "QR" at cols 4-5 of row 0; 'X' (col 1 of row 2: distance 3) and 'Z' (col 3 of row 2: distance 2),
        # then 'A', drawn nowhere
        {"task": "value", "doc_id": 1, "prompt": "Value of K?", "answer": "QR", "prediction": "XZA"},
        {"task": "value", "doc_id": 1, "prompt": "Value of K?", "answer": "QR", "prediction": "QR"},  # right: skipped
        {"task": "line", "doc_id": 0, "prompt": "Read line 1.", "answer": "AB C", "prediction": "AB"},  # other task
    ]
    out = value_error_sources(records, docs, charset="ABCDEFGKQRXYZ")
    assert (out["wrong_answers"], out["wrong_characters"], out["from_other_line"]) == (2, 4, 3)
    assert (out["same_column"], out["within_one_column"]) == (1, 1)
    # chance per wrong character: glyphs on other lines (minus the expected one) / (charset minus the expected one)
    # 'G': {D,E,F,G} / 13; 'X': {X,Y,Z} / 12 (expected Q); 'Z': {X,Y,Z} / 12 (expected R); 'A': {X,Y,Z} / 13 (empty cell)
    assert out["chance"] == pytest.approx((4 / 13 + 3 / 12 + 3 / 12 + 3 / 13) / 4)
    with pytest.raises(TinyReaderError, match="no line starts with the word 'QQ'"):
        value_error_sources([{"task": "value", "doc_id": 0, "prompt": "Value of QQ?", "answer": "C", "prediction": "D"}], docs)


def test_value_accuracy_by_keys_by_hand():
    docs = {
        0: _grid_doc(0, {0: (0, "AB C"), 1: (0, "DE FG")}),  # two keys: AB, DE
        1: _grid_doc(1, {0: (2, "K QR"), 2: (1, "XYZ")}),  # one key: K (XYZ has no value)
        2: _grid_doc(2, {0: (0, "A B"), 1: (0, "A C"), 2: (0, "E F")}),  # A twice: not a key; one key: E
    }
    records = [
        {"task": "value", "doc_id": 0, "prompt": "Value of AB?", "answer": "C", "prediction": "FG"},
        {"task": "value", "doc_id": 0, "prompt": "Value of DE?", "answer": "FG", "prediction": "FG"},
        {"task": "value", "doc_id": 1, "prompt": "Value of K?", "answer": "QR", "prediction": "QR"},
        {"task": "value", "doc_id": 2, "prompt": "Value of E?", "answer": "F", "prediction": "B"},
        {"task": "line", "doc_id": 0, "prompt": "Read line 1.", "answer": "AB C", "prediction": "AB C"},  # other task
    ]
    # one-key pages: K right, E wrong -> (2 questions, 1 right); the two-key page: (2, 1)
    assert value_accuracy_by_keys(records, docs) == {1: (2, 1), 2: (2, 1)}
    assert value_accuracy_by_keys(records[4:], docs) == {}


# ------------------------------------------------------------------------------ slow: model


@pytest.mark.slow
def test_build_reader_has_the_real_class_and_geometry():
    model, processor = build_reader()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    text = model.config.text_config
    assert text.rope_parameters["rope_theta"] == 10.0 and text.rope_parameters["mrope_section"] == [2, 3, 3]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (128, 4, 8, 4)
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    # the language model's rotary frequencies come from theta 10: 10 ** (-i / 8), i = 0 .. 7
    inv = model.model.language_model.rotary_emb.inv_freq
    assert torch.allclose(inv, 10.0 ** (-torch.arange(8) / 8), rtol=1e-5)
    again, _ = build_reader()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_shared_prefix_forward_equals_the_plain_forward():
    cfg = small_config(batch_size=5)
    model, processor = build_reader(SMALL_MODEL, seed=0)
    batch = collate(processor, step_samples(cfg, 40), classes=char_classes(), pointers=True)
    head = AuxiliaryHeads(SMALL_MODEL.text_hidden, 27, position=True, pointer=True, seed=0)
    grads = []
    for shared in (True, False):
        out = reader_losses(model, batch, head, shared_prefix=shared, position_weight=0.5, position_layer=1,
                            pointer_weight=0.5, pointer_layer=2)
        (out["lm_loss"] + out["aux_loss"] + out["pos_loss"] + out["ptr_loss"]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        if shared:
            first = out
    assert first["lm_loss"].item() == pytest.approx(out["lm_loss"].item(), rel=1e-5)
    assert first["pos_loss"].item() == pytest.approx(out["pos_loss"].item(), rel=1e-5)
    assert first["ptr_loss"].item() == pytest.approx(out["ptr_loss"].item(), rel=1e-5)
    assert torch.equal(first["seq_correct"], out["seq_correct"])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the plain path equals transformers' own forward and loss
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "labels")},
               output_hidden_states=True)
    assert hf.loss.item() == pytest.approx(out["lm_loss"].item(), rel=1e-5)
    # the position loss, by hand: the hidden state after decoder layer 1 of every image token, in
    # batch order, against its row and column in the merged grid
    visual = hf.hidden_states[1][batch["input_ids"] == model.config.image_token_id]
    rows, cols = visual_positions(batch["image_grid_thw"])
    assert len(rows) == len(visual) == int((batch["input_ids"] == model.config.image_token_id).sum())
    logits = head.position(visual)
    ce = lambda x, y: torch.nn.functional.cross_entropy(x, y, label_smoothing=POSITION_LABEL_SMOOTHING)  # noqa: E731
    expected = 0.5 * (ce(logits[:, :POSITION_CLASSES], rows) + ce(logits[:, POSITION_CLASSES:], cols))
    assert out["pos_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # without a position weight nothing is computed
    assert reader_losses(model, batch, head, position_weight=0.0)["pos_loss"].item() == 0.0
    # the pointer loss, by hand: at each answer step whose next token is a character on the page,
    # the hidden state after decoder layer 2 against the row and column of that character's token
    ids, width = batch["input_ids"], batch["image_grid_thw"][:, 2] // 2
    states, rows, cols = [], [], []
    for i in range(len(ids)):
        for t in range(ids.shape[1]):
            target = int(batch["pointer_labels"][i, t])
            if target != -100:
                states.append(hf.hidden_states[2][i, t])
                rows.append(target // int(width[i]))
                cols.append(target % int(width[i]))
    logits = head.pointer(torch.stack(states))
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    expected = 0.5 * (ce(logits[:, :POSITION_CLASSES], rows) + ce(logits[:, POSITION_CLASSES:], cols))
    assert out["ptr_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(rows) == sum(sum(c not in " \n" for c in q.answer) for _, q in step_samples(cfg, 40))
    assert reader_losses(model, batch, head, pointer_weight=0.0)["ptr_loss"].item() == 0.0
    unlabelled = {k: v for k, v in batch.items() if k != "pointer_labels"}
    assert reader_losses(model, unlabelled, head, pointer_weight=0.5)["ptr_loss"].item() == 0.0


def test_key_loss_by_hand():
    cfg = small_config(batch_size=4, key_weight=0.5, key_layer=1)
    step = next(s for s in range(200) if step_task(cfg, s) == "value" and easy_page_probability(cfg, s) < 1)
    model, processor = build_reader(SMALL_MODEL, seed=0)
    batch = collate(processor, step_samples(cfg, step), key_pointers=True)
    head = AuxiliaryHeads(SMALL_MODEL.text_hidden, 27, position=False, key=True, seed=0)
    shared = reader_losses(model, batch, head, key_weight=0.5, key_layer=1)
    plain = reader_losses(model, batch, head, shared_prefix=False, key_weight=0.5, key_layer=1)
    assert shared["key_loss"].item() == pytest.approx(plain["key_loss"].item(), rel=1e-5)
    # by hand: the hidden state after decoder layer 1 at each labelled prompt step, against the row
    # and column of the key's last glyph in that sample's merged grid
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")},
               output_hidden_states=True)
    width = batch["image_grid_thw"][:, 2] // 2
    has = batch["key_labels"] != -100
    target = batch["key_labels"][has]
    w = width.unsqueeze(1).expand_as(has)[has]
    logits = head.key(hf.hidden_states[1][has])
    ce = lambda x, y: torch.nn.functional.cross_entropy(x, y, label_smoothing=POSITION_LABEL_SMOOTHING)  # noqa: E731
    expected = 0.5 * (ce(logits[:, :POSITION_CLASSES], target // w) + ce(logits[:, POSITION_CLASSES:], target % w))
    assert shared["key_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(has.sum()) == 14 * 4
    assert reader_losses(model, batch, head, key_weight=0.0)["key_loss"].item() == 0.0
    assert reader_losses(model, batch, AuxiliaryHeads(SMALL_MODEL.text_hidden, 27, position=False, seed=0), key_weight=0.5)["key_loss"].item() == 0.0


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss_and_is_deterministic(tmp_path):
    cfg = small_config()
    model, _, _, result = train_reader(cfg, tmp_path / "a", progress=False)
    log = np.genfromtxt(tmp_path / "a" / "training_log.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert len(log) == 30 and result.steps == 30
    assert log["lm_loss"][-5:].mean() < log["lm_loss"][:5].mean() - 0.5
    assert log["aux_loss"][-5:].mean() < log["aux_loss"][:5].mean()
    pos = log["pos_loss"][log["step"] >= cfg.position_start * cfg.steps]  # switched on after 10% of the run
    assert len(pos) == 27 and (pos > 0).all() and pos[-5:].mean() < pos[:5].mean()
    ptr = log["ptr_loss"][log["step"] >= cfg.pointer_start * cfg.steps]
    assert len(ptr) == 27 and (ptr > 0).all() and ptr[-5:].mean() < ptr[:5].mean()
    again, _, _, _ = train_reader(cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("head", ["position", "pointer", "key"])
def test_an_auxiliary_loss_changes_nothing_before_its_start(tmp_path, head):
    # steps 0-1 of a 4-step run with {head}_start 0.5 are those of a run without that head
    # (value questions only, so that the key pointer has prompt steps to label)
    others = dict(position_weight=0.0, pointer_weight=0.0, key_weight=0.0, task_weights=(0.0, 0.0, 1.0))
    on = small_config(steps=4, **{**others, f"{head}_weight": 0.5, f"{head}_start": 0.5})
    with_head, _, _, _ = train_reader(on, tmp_path / "a", progress=False, stop_after=2)
    without, _, _, _ = train_reader(small_config(steps=4, **others), tmp_path / "b", progress=False, stop_after=2)
    assert all(torch.equal(x, y) for x, y in zip(with_head.state_dict().values(), without.state_dict().values()))
    column = {"position": "pos_loss", "pointer": "ptr_loss", "key": "key_loss"}[head]
    log = np.genfromtxt(tmp_path / "a" / "training_log.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(log[column]) == [0.0, 0.0]
    train_reader(on, tmp_path / "a", progress=False)
    log = np.genfromtxt(tmp_path / "a" / "training_log.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert log[column][2] > 0 and log[column][3] > 0


@pytest.mark.slow
def test_resuming_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    cfg = small_config(steps=6, checkpoint_every=2, validate_every=3, validation_docs=4)
    full, _, _, _ = train_reader(cfg, tmp_path / "full", progress=False)
    train_reader(cfg, tmp_path / "cut", progress=False, stop_after=4)
    assert json.loads((tmp_path / "cut" / "train_config.json").read_text())["steps"] == 6
    resumed, _, _, result = train_reader(cfg, tmp_path / "cut", progress=False)
    assert result.steps == 6
    assert all(torch.equal(x, y) for x, y in zip(full.state_dict().values(), resumed.state_dict().values()))
    rows = (tmp_path / "cut" / "training_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step, none twice
    with pytest.raises(CheckpointMismatchError, match="steps"):
        train_reader(small_config(steps=8, checkpoint_every=2, validate_every=3, validation_docs=4), tmp_path / "cut", progress=False)


@pytest.mark.slow
def test_save_reader_loads_like_a_real_checkpoint(tmp_path):
    cfg = small_config(steps=2)
    model, processor, head, train_result = train_reader(cfg, tmp_path / "work", progress=False)
    out = save_reader(model, processor, head, tmp_path / "reader", tmp_path / "work")
    loaded = load_model(out)
    assert loaded.model_type == "qwen2_vl" and type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert loaded.model.config.text_config.rope_parameters["rope_theta"] == 10.0
    # the auxiliary head is saved apart, not inside the Qwen2-VL checkpoint
    assert (out / "training" / "aux_head.safetensors").is_file()
    assert not any("aux" in k for k in loaded.model.state_dict())
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    assert reader_doc_spec(out) == cfg.doc_spec
    doc = heldout_documents(1)[0]
    answer = read(loaded, doc["image"], "Read line 1.", max_new_tokens=5)
    assert isinstance(answer, str) and len(answer) <= 5
    result = evaluate_reader(loaded, [doc], ("line",), max_new_tokens=5, progress=False)
    assert result["summary"]["line"]["n"] == 1 and len(result["records"]) == 1
    # the model card is written from measured results, and rebuilt identically from the saved files
    card = write_model_card(out, cfg, train_result, result, command="python -m sparsemm_utils.tiny_reader train --steps 2", n_docs=1)
    text = card.read_text()
    s = result["summary"]["line"]
    assert f"| line | 1 | {s['exact_match']:.3f} | {s['char_accuracy']:.4f} |" in text
    assert "`python -m sparsemm_utils.tiny_reader train --steps 2`" in text and "2 steps x batch 4" in text
    assert rewrite_model_card(out).read_text() == text
    # the evaluate CLI reads the same pages the card's numbers came from
    assert main(["evaluate", "--model", str(out), "--docs", "1", "--tasks", "line", "--out", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["records"][0]["answer"] == result["records"][0]["answer"]


@pytest.mark.slow
def test_a_second_stage_starts_from_the_saved_reader_and_its_heads(tmp_path):
    first = small_config(steps=2, position_weight=0.0, pointer_weight=0.0, key_weight=0.0)
    model, processor, head, _ = train_reader(first, tmp_path / "work1", progress=False)
    assert head.position is None and head.pointer is None
    out = save_reader(model, processor, head, tmp_path / "stage1", tmp_path / "work1")
    # a reader saved before the position head existed kept its glyph head under the plain names
    saved = load_file(str(out / "training" / "aux_head.safetensors"))
    assert set(saved) == {"glyph.weight", "glyph.bias"}
    save_file({k.removeprefix("glyph."): v for k, v in saved.items()}, str(out / "training" / "aux_head.safetensors"))
    second = small_config(steps=2, init_from=str(out), position_weight=0.5)
    start, _, start_head, result = train_reader(second, tmp_path / "work2", progress=False, stop_after=0)
    assert result.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert torch.equal(start_head.glyph.weight, head.glyph.weight)
    fresh = AuxiliaryHeads(SMALL_MODEL.text_hidden, len(char_classes()) + 1, position=True, pointer=True, seed=second.seed)
    assert torch.equal(start_head.position.weight, fresh.position.weight)  # new heads: their own initialisation
    assert torch.equal(start_head.pointer.weight, fresh.pointer.weight)
    # a glyph head of another size (another character set) is refused with a clear message
    save_file({"weight": torch.zeros(5, SMALL_MODEL.text_hidden), "bias": torch.zeros(5)}, str(out / "training" / "aux_head.safetensors"))
    with pytest.raises(TrainConfigError, match="does not fit the auxiliary heads"):
        train_reader(second, tmp_path / "work3", progress=False, stop_after=0)


@pytest.mark.slow
def test_linear_patch_embedding_is_the_convolution():
    model, processor = build_reader(SMALL_MODEL)
    x = torch.randn(9, 3 * 2 * 14 * 14)
    conv = model.model.visual.patch_embed(x)
    with linear_patch_embedding(model):
        linear = model.model.visual.patch_embed(x)
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.model.visual.patch_embed)  # restored on exit


# ------------------------------------------------------------------------------ the package's layers


def _fresh_python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a new interpreter that imports this checkout's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root()), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=repo_root(), env=env, check=True)


@pytest.mark.slow
def test_scoring_a_reader_imports_no_training_code():
    """Steps 05 and 07 read held-out pages (reader_tasks) and score readers (accuracy): neither
    may pull in the training loop, its batches, its losses or the model card."""
    out = _fresh_python("-c", "import sys, sparsemm_utils.reader_tasks, sparsemm_utils.tiny_reader.accuracy; "
                              "print(sorted(m for m in sys.modules if m.startswith('sparsemm_utils')))")
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert {"sparsemm_utils.reader_tasks", "sparsemm_utils.tiny_reader.accuracy"} <= loaded
    for module in ("curriculum", "fast_pixels", "batches", "losses", "training", "card", "cli"):
        assert f"sparsemm_utils.tiny_reader.{module}" not in loaded, module


@pytest.mark.slow
def test_the_command_line_runs_as_a_module():
    out = _fresh_python("-m", "sparsemm_utils.tiny_reader", "card", "--help")
    assert out.stdout.startswith("usage: python -m sparsemm_utils.tiny_reader card")


# ------------------------------------------------------------------------------ the shipped reader

needs_checkpoint = pytest.mark.skipif(
    not (DEFAULT_READER_DIR / "config.json").is_file(), reason="the shipped checkpoint data/tiny_reader is missing"
)


@pytest.mark.slow
@needs_checkpoint
def test_shipped_reader_reads_fresh_held_out_documents():
    """The shipped checkpoint loads offline through load_model, exactly like a real one, and reads
    pages it never saw: 12 pages of a seed used neither in training nor by the model card
    (HELDOUT_SEED + 1). Each task must get at least one answer exactly right, and its exact-match
    rate must lie within 3 binomial standard deviations of the card's (measured on 200 pages);
    a reader that does not read scores 0 and fails."""
    loaded = load_model(DEFAULT_READER_DIR)
    card = json.loads((DEFAULT_READER_DIR / "training" / "eval_results.json").read_text())["summary"]
    docs = heldout_documents(12, reader_doc_spec(DEFAULT_READER_DIR), seed=HELDOUT_SEED + 1)
    result = evaluate_reader(loaded, docs, TASK_TYPES, seed=HELDOUT_SEED + 1, progress=False)
    for task in TASK_TYPES:
        s, p = result["summary"][task], card[task]["exact_match"]
        assert any(r["exact"] for r in result["records"] if r["task"] == task), task
        assert s["exact_match"] >= p - 3 * math.sqrt(p * (1 - p) / s["n"]) - 1e-9, (task, s, p)
    assert result["summary"]["all"]["char_accuracy"] >= card["all"]["char_accuracy"] - 0.1


@pytest.mark.slow
@needs_checkpoint
def test_shipped_model_card_matches_its_eval_results():
    card = (DEFAULT_READER_DIR / "MODEL_CARD.md").read_text()
    results = json.loads((DEFAULT_READER_DIR / "training" / "eval_results.json").read_text())
    for task, s in results["summary"].items():
        assert f"| {task} | {s['n']} | {s['exact_match']:.3f} | {s['char_accuracy']:.4f} |" in card
    assert results["command"] in card
    # the README's promise: `python -m sparsemm_utils.tiny_reader train` with no option trains the shipped recipe
    saved = json.loads((DEFAULT_READER_DIR / "training" / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved) == TrainConfig()
    size = sum(p.stat().st_size for p in DEFAULT_READER_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
