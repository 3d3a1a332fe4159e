"""The lmms-eval scoring protocols end to end (sparsemm_utils.lmms_protocol) on hand-worked
cases; the differential suite (tests/differential/) compares them with lmms-eval's own code."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sparsemm_utils.benchmark_fixtures import fixture_dir
from sparsemm_utils.benchmarks import EvalSample, get_benchmark, load_benchmark
from sparsemm_utils.evaluation import read_predictions, read_results, run_sweep
from sparsemm_utils.lmms_protocol import (
    MMBENCH_RANDOM_SEED,
    PROTOCOLS,
    LmmsProtocolError,
    aggregates,
    answer_text,
    get_protocol,
    mmbench_circular_hits,
    scored_answer,
)


def _sample(answers, sample_id="0", **extra):
    return EvalSample(sample_id, None, "q", tuple(answers), extra)  # type: ignore[arg-type]


def test_protocols_name_their_lmms_eval_commit():
    assert set(PROTOCOLS) == {"0.3", "current"} and get_protocol().name == "0.3"
    for protocol in PROTOCOLS.values():
        assert len(protocol.lmms_eval_commit) == 40
    with pytest.raises(LmmsProtocolError, match="lmms_eval must be one of '0.3', 'current', got '0.4'"):
        get_protocol("0.4")


def test_answers_are_cut_then_stripped():
    textvqa = get_benchmark("textvqa")  # until "ASSISTANT:"
    assert answer_text(textvqa, " stop \nASSISTANT: go") == "stop"
    gqa = get_benchmark("gqa")
    # the cases: GQA "Yes\n" now scores 1; DocVQA's ANLS takes the stripped length
    assert scored_answer(gqa, "Yes\n", _sample(["yes"]), "0.3")["scores"] == {"exact_match": 1.0}
    anls = scored_answer(get_benchmark("docvqa"), "1999 \n", _sample(["1998"]), "0.3")["scores"]["anls"]
    assert anls == pytest.approx(0.75)  # 1 - 1/4, not 1 - 1/6
    chart = scored_answer(get_benchmark("chartqa"), "12%\n", _sample(["12%"], type="human_test"), "0.3")
    assert chart == {"prediction": "12%", "scores": {"relaxed_accuracy": 1.0}}


def test_the_protocols_differ_where_lmms_eval_changed():
    hme = "Handwritten Mathematical Expression Recognition"
    ocr = get_benchmark("ocrbench")
    sample = _sample(["\\frac{A}{B}"], category=hme)
    assert scored_answer(ocr, "\\frac{A}{B}", sample, "0.3")["scores"]["ocrbench_accuracy"] == 0.0
    assert scored_answer(ocr, "\\frac{A}{B}", sample, "current")["scores"]["ocrbench_accuracy"] == 1.0
    vqav2 = get_benchmark("vqav2")
    assert scored_answer(vqav2, "1000", _sample(["1,000"] * 10), "0.3")["scores"]["vqav2_accuracy"] == 0.0
    assert scored_answer(vqav2, "1000", _sample(["1,000"] * 10), "current")["scores"]["vqav2_accuracy"] == 1.0
    assert PROTOCOLS["0.3"].spec("vqav2").post_prompt == ""
    assert PROTOCOLS["current"].spec("vqav2").post_prompt == "\nAnswer the question using a single word or phrase."
    assert PROTOCOLS["current"].spec("docvqa") is get_benchmark("docvqa")


def _records(scores, **extra):
    return [{"sample_id": str(i), "prediction": "", "answers": ["x"], "scores": s, "extra": e} for i, (s, e) in enumerate(zip(scores, extra.get("extra", [{}] * len(scores))))]


def test_ocrbench_final_score_divides_by_1000_and_categories_by_their_size():
    cats = ["Regular Text Recognition", "Regular Text Recognition", "Doc-oriented VQA", "Doc-oriented VQA", "Doc-oriented VQA"]
    hits = [1.0, 0.0, 1.0, 1.0, 0.0]
    records = _records([{"ocrbench_accuracy": h} for h in hits], extra=[{"category": c} for c in cats])
    got = {a.metric: a.score for a in aggregates("ocrbench", records)}
    assert got["ocrbench_accuracy"] == pytest.approx(3 / 5)  # per question asked
    assert got["ocrbench_final_score"] == pytest.approx(3 / 1000)  # lmms-eval's reported number
    assert got["ocrbench_accuracy[Regular Text Recognition]"] == 0.5
    assert got["ocrbench_accuracy[Doc-oriented VQA]"] == pytest.approx(2 / 3)
    assert "ocrbench_accuracy[Key Information Extraction]" not in got  # no question of it in the run


def test_chartqa_splits_beside_the_overall():
    records = _records([{"relaxed_accuracy": v} for v in (1.0, 0.0, 1.0)], extra=[{"type": t} for t in ("human_test", "human_test", "augmented_test")])
    got = {a.metric: a.score for a in aggregates("chartqa", records)}
    assert got == {"relaxed_accuracy": pytest.approx(2 / 3), "relaxed_human_split": 0.5, "relaxed_augmented_split": 1.0}


def _mm(index, prediction, answer, options=("cat", "dog", "tree", "sky")):
    return {"sample_id": str(index), "prediction": prediction, "answers": [answer], "options": dict(zip("ABCD", options)), "scores": {"mmbench_choice": 0.0}, "extra": {}}


def test_mmbench_circular_groups_copies_and_counts_x100():
    records = [
        _mm(0, "A", "A"), _mm(1_000_000, "B", "B"), _mm(2_000_000, "C", "C"),  # all copies right: 1
        _mm(1, "A", "A"), _mm(1_000_001, "C", "B"),  # one copy wrong: 0
        _mm(2, "The answer is (D).", "D"),  # alone and right: 1
        _mm(1_000_003, "A", "A"),  # a copy whose main question is absent: not counted
    ]  # fmt: skip
    mains, hits = mmbench_circular_hits(records)
    assert mains == [0, 1, 2] and hits.tolist() == [1.0, 0.0, 1.0]
    got = {a.metric: a.score for a in aggregates("mmbench", records)}
    assert got["mmbench_circular"] == pytest.approx(200 / 3)


def test_mmbench_unresolved_answers_draw_lmms_evals_random_letter():
    # no rule resolves "I am not sure"; lmms-eval's judge fails offline and it draws
    # "ABCDE"[randint(0, 4)] from random.seed(2680), one draw per unresolved copy, in index order
    rng = random.Random(MMBENCH_RANDOM_SEED)
    first, second = ("ABCDE"[rng.randint(0, 4)] for _ in range(2))
    records = [_mm(0, "I am not sure", first), _mm(1, "I am not sure", "E" if second != "E" else "A")]
    _, hits = mmbench_circular_hits(records)
    assert hits.tolist() == [1.0, 0.0]
    # a resolved wrong copy decides the group before any draw: the next group gets the first draw
    records = [_mm(0, "B", "A"), _mm(1_000_000, "I am not sure", "A"), _mm(1, "I am not sure", first)]
    assert mmbench_circular_hits(records)[1].tolist() == [0.0, 1.0]
    with pytest.raises(LmmsProtocolError, match="lacks its options"):
        mmbench_circular_hits([{"sample_id": "0", "prediction": "A", "answers": ["A"]}])


def test_aggregates_scale_their_unit_values():
    (agg, *_rest) = aggregates("gqa", _records([{"exact_match": 1.0}, {"exact_match": 0.0}]))
    assert agg.metric == "exact_match" and agg.score == 0.5 and agg.values.tolist() == [1.0, 0.0] and agg.scale == 1.0
    with pytest.raises(LmmsProtocolError, match="no record"):
        aggregates("gqa", [])


def test_textcaps_runs_end_to_end_on_its_fixture(tmp_path):
    """TextCaps on its hub-schema fixture through step 05's sweep: the prompt, CIDEr per caption
    against the benchmark's corpus, and the run's CIDEr in results.csv."""
    samples = load_benchmark("textcaps", fixture_dir("textcaps"))
    assert len(samples) == 3 and samples.skips.n_skipped == 2
    assert samples[0].question == "Provide a one-sentence caption for the provided image."
    captions = {samples.sample_ids[0]: "A red sign that says OPEN.\n", samples.sample_ids[1]: "a bottle", samples.sample_ids[2]: ""}

    def generate(sample, spec, method, budget):
        return captions[sample.sample_id]

    result = run_sweep(tmp_path, model="fake", benchmarks={"textcaps": samples}, methods=["fullkv"], budgets=[], generate=generate, progress=False, log=None)
    records, _ = read_predictions(tmp_path / "predictions.jsonl")
    per_image = [r["scores"]["textcaps_cider"] for r in records]
    assert per_image[0] > per_image[1] > 0.0 == per_image[2]  # the empty caption scores 0
    assert records[0]["prediction"] == "A red sign that says OPEN." and records[0]["raw_output"].endswith("\n")
    table = read_results(tmp_path / "results.csv")
    assert table["metric"].tolist() == ["textcaps_cider"] and result.generated == 3
    assert table["score"].iloc[0] == pytest.approx(float(np.mean(per_image)))
