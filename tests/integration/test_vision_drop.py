"""LLaVA-Mini's layer-range vision drop (docs/method.md §8) on tiny models: an empty range is the
unmodified model, a range over every layer is a model that never sees the image through its keys,
and the two readings drop the layers they say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sparsemm_utils import vision_drop as vd
from sparsemm_utils.attention_hooks import text_attention
from sparsemm_utils.models import load_model, text_attention_implementation
from sparsemm_utils.prompts import build_inputs, image_token_span

GREEDY = dict(max_new_tokens=8, do_sample=False)


def _image(seed: int, size: tuple[int, int] = (280, 224)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ pure rules


def test_readings_by_hand():
    # 4 layers, range 1-2: "inside" drops layers 1 and 2; "from" drops 1, 2 and 3
    assert vd.VisionDrop(1, 2, "inside").layers(4) == (1, 2)
    assert vd.VisionDrop(1, 2, "from").layers(4) == (1, 2, 3)
    assert vd.VisionDrop(3, 3, "inside").layers(4) == vd.VisionDrop(3, 3, "from").layers(4) == (3,)
    assert vd.VisionDrop(0, 3).layer_range == "0-3"


def test_layer_ranges_by_hand():
    # LLaVA-Mini on 32 layers: 1-4, 5-8, ..., 29-32 (1-based) = (0, 3), ..., (28, 31)
    ranges = vd.layer_ranges(32, 4)
    assert ranges[0] == (0, 3) and ranges[-1] == (28, 31) and len(ranges) == 8
    assert vd.layer_ranges(28, 8) == [(0, 7), (8, 15), (16, 23), (24, 27)]  # Qwen2-VL-7B: last range shorter
    conditions = vd.drop_conditions(4, 2)
    assert [(c.first, c.last, c.reading) for c in conditions] == [
        (0, 1, "inside"), (2, 3, "inside"), (0, 1, "from"), (2, 3, "from")
    ]


def test_bad_ranges_are_refused():
    with pytest.raises(vd.InvalidLayerRangeError, match="first <= last"):
        vd.VisionDrop(3, 1)
    with pytest.raises(vd.InvalidLayerRangeError, match="first <= last"):
        vd.VisionDrop(-1, 2)
    with pytest.raises(vd.VisionDropError, match="reading"):
        vd.VisionDrop(0, 1, "after")
    with pytest.raises(vd.InvalidLayerRangeError, match="beyond the model's last layer"):
        vd.VisionDrop(2, 4).layers(4)
    with pytest.raises(vd.InvalidLayerRangeError, match="size must be an int >= 1, got 0"):
        vd.layer_ranges(4, 0)


# ------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def qwen():
    loaded = load_model("tiny-random/qwen2_vl", seed=0)
    a = build_inputs(loaded, _image(1))
    b = build_inputs(loaded, _image(2))  # same size: same positions, different pixels
    return loaded, a, b


def _logits(loaded, inputs, drop):
    with torch.no_grad():
        if drop == "plain":
            return loaded.model(**inputs).logits[0]
        with vd.vision_drop(loaded, drop):
            return loaded.model(**inputs).logits[0]


@pytest.mark.slow
def test_empty_range_is_the_unmodified_model(qwen):
    loaded, a, _ = qwen
    plain = loaded.model.generate(**a, **GREEDY, output_logits=True, return_dict_in_generate=True)
    with vd.vision_drop(loaded, None) as session:
        dropped = loaded.model.generate(**a, **GREEDY, output_logits=True, return_dict_in_generate=True)
    assert session.layers == frozenset() and session.prefills == 1
    assert torch.equal(plain.sequences, dropped.sequences)
    for x, y in zip(plain.logits, dropped.logits):
        assert torch.equal(x, y)
    assert text_attention_implementation(loaded.model) == "sdpa"  # restored


@pytest.mark.slow
def test_every_layer_dropped_is_a_model_that_never_sees_the_image(qwen):
    loaded, a, b = qwen
    start, count = image_token_span(a["input_ids"], loaded.image_token_id)
    text = slice(start + count, None)
    every = vd.VisionDrop(0, loaded.num_layers - 1)
    la_, lb_ = _logits(loaded, a, every), _logits(loaded, b, every)
    # the text after the image is the same whatever the image: nothing of it reaches the text
    assert torch.equal(la_[text], lb_[text])
    # ... while the unmodified model does read it
    assert not torch.allclose(_logits(loaded, a, "plain")[text], _logits(loaded, b, "plain")[text])
    # decode steps hide the vision keys too: identical greedy steps for both images
    with vd.vision_drop(loaded, every):
        ga = loaded.model.generate(**a, **GREEDY, output_logits=True, return_dict_in_generate=True)
        gb = loaded.model.generate(**b, **GREEDY, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ga.sequences[:, a["input_ids"].shape[1]:], gb.sequences[:, b["input_ids"].shape[1]:])
    for x, y in zip(ga.logits, gb.logits):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_only_text_queries_lose_the_vision_keys(qwen):
    loaded, a, _ = qwen
    start, count = image_token_span(a["input_ids"], loaded.image_token_id)
    plain = _logits(loaded, a, "plain")
    dropped = _logits(loaded, a, vd.VisionDrop(0, loaded.num_layers - 1))
    # tokens before the image never saw it, and the vision tokens' own rows are untouched
    assert torch.equal(plain[: start + count], dropped[: start + count])
    assert not torch.allclose(plain[start + count :], dropped[start + count :])


@pytest.mark.slow
def test_the_two_readings_differ_and_compose(qwen):
    loaded, a, _ = qwen
    last = loaded.num_layers - 1
    inside = _logits(loaded, a, vd.VisionDrop(1, 1, "inside"))
    from_1 = _logits(loaded, a, vd.VisionDrop(1, 1, "from"))
    assert not torch.allclose(inside, from_1)
    # "from 1" drops layers 1..L-1, the same as "inside 1..L-1"
    assert torch.equal(from_1, _logits(loaded, a, vd.VisionDrop(1, last, "inside")))
    # dropping a layer changes the text positions' output
    assert not torch.allclose(inside, _logits(loaded, a, "plain"))


@pytest.mark.slow
def test_llava_next_every_layer_dropped():
    loaded = load_model("tiny-random/llava_next", seed=0)
    a = build_inputs(loaded, _image(1, (64, 48)))
    b = build_inputs(loaded, _image(2, (64, 48)))
    start, count = image_token_span(a["input_ids"], loaded.image_token_id)
    every = vd.VisionDrop(0, loaded.num_layers - 1, "from")
    la_, lb_ = _logits(loaded, a, every), _logits(loaded, b, every)
    assert torch.equal(la_[start + count :], lb_[start + count :])


def test_context_errors(qwen):
    loaded, a, _ = qwen
    with vd.vision_drop(loaded, None):
        with pytest.raises(vd.VisionDropError, match="nested"):
            with vd.vision_drop(loaded, None):
                pass
    with pytest.raises(vd.VisionDropError, match="VisionDrop or None"):
        with vd.vision_drop(loaded, (0, 1)):
            pass
    with pytest.raises(vd.InvalidLayerRangeError, match="beyond"):
        with vd.vision_drop(loaded, vd.VisionDrop(0, loaded.num_layers)):
            pass
    vd.register_vision_drop()
    with text_attention(loaded.model, vd.VISION_DROP_ATTENTION), torch.no_grad():
        with pytest.raises(vd.NoActiveVisionDropError, match="outside a vision_drop"):
            loaded.model(**a)
    assert text_attention_implementation(loaded.model) == "sdpa"


def test_evaluate_vision_drop_runs_each_layer_set_once(qwen, monkeypatch):
    loaded, _, _ = qwen
    calls = []

    def fake_evaluate_reader(model, documents, tasks, *, seed, max_new_tokens, progress):
        session = vd.VISION_DROP_HOOK.active()
        calls.append(tuple(sorted(session.layers)))
        acc = 1.0 - 0.1 * len(session.layers)  # a number that tells the conditions apart
        summary = {t: {"n": 2, "exact_match": acc, "char_accuracy": acc, "mean_char_accuracy": acc} for t in tasks}
        summary["all"] = {"n": 2 * len(tasks), "exact_match": acc, "char_accuracy": acc, "mean_char_accuracy": acc}
        return {"summary": summary, "records": [], "seconds": 0.0}

    monkeypatch.setattr("sparsemm_utils.vision_drop.evaluate_reader", fake_evaluate_reader)
    last = loaded.num_layers - 1
    drops = [None, vd.VisionDrop(0, 0, "inside"), vd.VisionDrop(last, last, "inside"), vd.VisionDrop(last, last, "from"),
             vd.VisionDrop(0, 0, "from")]
    table = vd.evaluate_vision_drop(loaded, ["doc"], drops, tasks=("ocr",), progress=False)
    # the last range is the same layer set in both readings: evaluated once
    assert calls == [(), (0,), (last,), tuple(range(loaded.num_layers))]
    assert list(table.columns) == [
        "reading", "layer_range", "first_layer", "last_layer", "dropped_layers", "task",
        "exact_match", "char_accuracy", "mean_char_accuracy", "n",
    ]
    overall = table[table.task == "all"].set_index(["reading", "layer_range"])["char_accuracy"]
    assert overall[("none", "none")] == pytest.approx(1.0)
    assert overall[("inside", f"{last}-{last}")] == overall[("from", f"{last}-{last}")] == pytest.approx(0.9)
    assert overall[("from", "0-0")] == pytest.approx(1.0 - 0.1 * loaded.num_layers)
    assert table[(table.reading == "from") & (table.layer_range == "0-0")]["dropped_layers"].iloc[0] == f"0-{last}"
    assert isinstance(table, pd.DataFrame) and set(table.task) == {"ocr", "all"}
