"""Benchmark specs, lmms-eval's prompts and the loaders, on the hub-schema fixtures in data/fixtures."""

from __future__ import annotations

import dataclasses
import io
import shutil

import datasets
import pytest
from PIL import Image

from sparsemm_utils.benchmark_fixtures import fixture_dir, fixture_rows
from sparsemm_utils.benchmarks import (
    BENCHMARKS,
    GENERAL_BENCHMARKS,
    OCR_BENCHMARKS,
    SHORT_ANSWER_POST_PROMPT,
    BenchmarkError,
    BenchmarkSamples,
    BenchmarkSchemaError,
    BenchmarkSpec,
    BenchmarkUnavailableError,
    EvalSample,
    UnknownBenchmarkError,
    UnreadableImageError,
    get_benchmark,
    load_benchmark,
    score_prediction,
)
from sparsemm_utils.model_types import SUPPORTED_MODEL_TYPES

HUB_BENCHMARKS = [n for n, s in BENCHMARKS.items() if s.hub_id is not None]


@pytest.fixture(scope="module")
def loaded() -> dict[str, BenchmarkSamples]:
    return {name: load_benchmark(name, source=fixture_dir(name)) for name in HUB_BENCHMARKS}


# ---------------------------------------------------------------------------------- registry


def test_registry_holds_the_papers_benchmarks():
    assert OCR_BENCHMARKS == ("docvqa", "textvqa", "ocrbench", "chartqa", "textcaps")
    assert GENERAL_BENCHMARKS == ("mmbench", "gqa", "vqav2")
    assert "reader_docqa" in BENCHMARKS
    assert get_benchmark(" DocVQA ") is BENCHMARKS["docvqa"]
    assert get_benchmark(BENCHMARKS["gqa"]) is BENCHMARKS["gqa"]


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UnknownBenchmarkError, match="known benchmarks: docvqa, textvqa, ocrbench, chartqa"):
        get_benchmark("nocaps")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metrics": ("bleu",)}, "unknown metric"),
        ({"metrics": ()}, "at least one metric"),
        ({"question_column": "query"}, "reads columns \\['query'\\]"),
        ({"kind": "video"}, "kind must be"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"doc_to_text": "fancy"}, "doc_to_text"),
        ({"name": "DocVQA"}, "lowercase"),
        ({"metric_fields": ("category",)}, "metric_fields"),
        ({"task_limits": {"line": 0}}, "task_limits\\['line'\\]"),
        ({"task_limits": {"line": 8}}, "needs the question type in extra_columns"),
    ],
)
def test_spec_validation(change, message):
    with pytest.raises(BenchmarkError, match=message):
        dataclasses.replace(BENCHMARKS["docvqa"], **change)


def test_specs_match_lmms_eval_task_yamls():
    """Values read from lmms-eval's task YAMLs (see the module docstring for the files)."""
    expect = {  # name: (hub id, config, split, max_new_tokens, metric)
        "docvqa": ("lmms-lab/DocVQA", "DocVQA", "validation", 128, "anls"),
        "textvqa": ("lmms-lab/textvqa", None, "validation", None, "vqa_accuracy"),
        "ocrbench": ("echo840/OCRBench", None, "test", 128, "ocrbench_accuracy"),
        "chartqa": ("lmms-lab/ChartQA", None, "test", 16, "relaxed_accuracy"),
        "mmbench": ("lmms-lab/MMBench", "en", "dev", 1024, "mmbench_choice"),
        "gqa": ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev", 16, "exact_match"),
        "vqav2": ("lmms-lab/VQAv2", None, "validation", 16, "vqav2_accuracy"),
    }
    for name, (hub, config, split, limit, metric) in expect.items():
        spec = BENCHMARKS[name]
        assert (spec.hub_id, spec.config, spec.split, spec.max_new_tokens, spec.metric) == (hub, config, split, limit, metric)


def test_generation_limit_falls_back_to_the_wrapper_default():
    textvqa = BENCHMARKS["textvqa"]  # its YAML sets no max_new_tokens
    assert textvqa.generation_limit("qwen2_vl") == 128
    assert textvqa.generation_limit("llava_next") == 1024
    # every supported family has a default (the newer ones by analogy, docs/models.md)
    assert {t: textvqa.generation_limit(t) for t in SUPPORTED_MODEL_TYPES if t not in ("qwen2_vl", "llava_next")} == {
        "qwen2_5_vl": 128, "qwen3_vl": 128, "llava_onevision": 1024, "internvl": 1024
    }
    assert BENCHMARKS["chartqa"].generation_limit("llava_next") == 16  # the task's own limit wins
    with pytest.raises(BenchmarkError, match="model types"):
        textvqa.generation_limit("gpt2")


def test_a_question_type_can_have_its_own_limit():
    """study_docqa mixes question types as lmms-eval would keep separate tasks: reading a whole
    page may take 96 tokens, a line or a value at most 32; other benchmarks are unaffected."""
    study, image = get_benchmark("study_docqa"), Image.new("RGB", (8, 8))
    sample = lambda task: EvalSample("0", image, "q", ("a",), {"task": task})  # noqa: E731
    assert [study.sample_limit(sample(t), "llava_next") for t in ("ocr", "line", "value")] == [96, 32, 32]
    assert study.sample_limit(EvalSample("0", image, "q", ("a",), {}), "llava_next") == 96  # no type: the benchmark's
    assert get_benchmark("reader_docqa").sample_limit(sample("line"), "qwen2_vl") == 64  # the tiny reader's: one limit
    assert BENCHMARKS["chartqa"].sample_limit(sample("line"), "qwen2_vl") == 16
    with pytest.raises(TypeError):
        study.task_limits["line"] = 8  # frozen like the spec


def test_postprocess_cuts_at_stop_strings():
    assert BENCHMARKS["textvqa"].postprocess("stop ASSISTANT: no") == "stop "
    assert BENCHMARKS["docvqa"].postprocess("stop ASSISTANT: no") == "stop ASSISTANT: no"  # no until


# ---------------------------------------------------------------------------------- prompts


def test_prompts_follow_doc_to_text(loaded):
    # DocVQA: question + "\nAnswer the question using a single word or phrase."
    assert loaded["docvqa"][0].question == "What is the memo number?" + SHORT_ANSWER_POST_PROMPT
    # TextVQA: str.capitalize() lowers every other letter: 'SALE' -> 'sale', 'OFF' -> 'off'
    assert loaded["textvqa"][1].question == "What does 'sale' mean here, 'sale' or 'off'?" + SHORT_ANSWER_POST_PROMPT
    assert loaded["textvqa"][1].extra["raw_question"] == "What does 'SALE' mean here, 'SALE' or 'OFF'?"
    # OCRBench: the question stripped, nothing added
    assert loaded["ocrbench"][2].question == "What is the date?"
    # ChartQA, GQA: plain (ChartQA's own post-prompt); VQAv2 val: post_prompt ""
    assert loaded["chartqa"][0].question == "What were the sales in 2019?\nAnswer the question with a single word."
    assert loaded["gqa"][0].question == "Is the text black?" + SHORT_ANSWER_POST_PROMPT
    assert loaded["vqav2"][0].question == "How many apples are there?"


def test_mmbench_prompt_hint_and_options(loaded):
    post = "\nAnswer with the option's letter from the given choices directly."  # the YAML's, after "\n"
    mm = loaded["mmbench"]
    # no hint (None): "{question} {options}\n{post}"; all four options
    assert mm[0].question == (
        "Which word is written in the image? There are several options:\nA. CAT\nB. DOG\nC. BIRD\nD. FISH\n" + post
    )
    # a hint: "{hint} {question} {options}"; options C, D missing (None) are left out
    assert mm[1].question == (
        "The background is white. What colour is the text? There are several options:\nA. black\nB. red\n" + post
    )
    # the hint "nan" counts as no hint; the option "nan" is left out of the prompt
    assert mm[2].question == "Which number is shown? There are several options:\nA. 1\nB. 2\nC. 3\n" + post
    assert mm[2].extra["options"] == {"A": "1", "B": "2", "C": "3", "D": "nan"}


# ---------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "name, ids, skipped",
    [
        ("docvqa", ["57344", "57345", "57346"], {"no answers": 1, "no image": 1, "unreadable image": 1}),
        ("textvqa", ["34602", "34603", "34604"], {"no answers": 1, "no image": 1}),
        ("ocrbench", ["0", "1", "2"], {"no answers": 1, "no image": 1}),  # no id column: row index
        ("chartqa", ["0", "1", "2"], {"no answers": 1, "no image": 1}),
        ("mmbench", ["0", "1", "2"], {"no answers": 1, "no image": 1}),
        ("gqa", ["20968379", "20968380", "20968381"], {"no answers": 1, "no image": 1}),
        ("vqav2", ["262148000", "262148001", "262148002"], {"no answers": 1, "no image": 1}),
    ],
)
def test_fixture_loads_with_counted_skips(loaded, name, ids, skipped):
    samples = loaded[name]
    assert samples.sample_ids == ids
    assert len(samples) == len(ids) and [s.sample_id for s in samples] == ids
    assert dict(samples.skips.counts) == skipped
    assert samples.skips.n_rows == len(ids) + sum(skipped.values())
    assert samples.skips.n_samples == len(ids)
    for s in samples:
        assert isinstance(s.image, Image.Image) and s.image.mode == "RGB"
        assert s.answers and all(isinstance(a, str) for a in s.answers)


def test_skip_report_names_the_rows(loaded):
    report = loaded["docvqa"].skips
    assert report.examples == {"no answers": ["57347"], "no image": ["57348"], "unreadable image": ["57349"]}
    text = str(report)
    assert "3 samples from 6 rows" in text and "1 unreadable image (e.g. 57349)" in text
    assert report.as_dict()["skipped"] == {"no answers": 1, "no image": 1, "unreadable image": 1}


def test_answers_and_metric_fields(loaded):
    assert loaded["docvqa"][0].answers == ("4711", "No. 4711")
    assert loaded["chartqa"][1].answers == ("12%",)  # a single string becomes a one-element tuple
    assert loaded["vqav2"][0].answers == ("2",) * 6 + ("two",) * 3 + ("3",)  # from the answer dicts
    assert loaded["ocrbench"][1].extra["category"] == "Handwritten Mathematical Expression Recognition"
    assert loaded["mmbench"][0].answers == ("B",)


def test_gqa_images_are_joined_on_image_id(loaded):
    rows = fixture_rows("gqa")["testdev_balanced_images"]
    expected = Image.open(io.BytesIO(rows[0]["image"]["bytes"])).convert("RGB")
    sample = loaded["gqa"][1]  # imageId n161313
    assert sample.extra["imageId"] == "n161313"
    assert sample.image.tobytes() == expected.tobytes()


def test_limit_keeps_the_first_rows():
    first_two = load_benchmark("docvqa", source=fixture_dir("docvqa"), limit=2)
    assert first_two.sample_ids == ["57344", "57345"] and first_two.skips.n_rows == 2
    four = load_benchmark("docvqa", source=fixture_dir("docvqa"), limit=4)  # rows 0-3: row 3 has no answers
    assert four.sample_ids == ["57344", "57345", "57346"] and dict(four.skips.counts) == {"no answers": 1}
    with pytest.raises(BenchmarkError, match=r"limit \(or None\) must be an int >= 1"):
        load_benchmark("docvqa", source=fixture_dir("docvqa"), limit=0)


def test_a_parquet_file_and_a_dataset_are_sources_too():
    parquet = fixture_dir("chartqa") / "data" / "test-00000-of-00001.parquet"
    assert load_benchmark("chartqa", source=parquet).sample_ids == ["0", "1", "2"]
    ds = datasets.Dataset.from_parquet(str(parquet))
    assert len(load_benchmark("chartqa", source=ds)) == 3


def test_the_hf_hub_cache_is_found_without_a_source(tmp_path):
    """A snapshot as `hf download` leaves it: <cache>/datasets--<org>--<name>/snapshots/<sha> + refs/main."""
    repo = tmp_path / "datasets--lmms-lab--ChartQA"
    shutil.copytree(fixture_dir("chartqa"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    samples = load_benchmark("chartqa", hub_cache_dir=tmp_path, datasets_cache_dir=tmp_path / "ds")
    assert samples.sample_ids == ["0", "1", "2"]


def test_absent_data_says_what_to_download(tmp_path):
    with pytest.raises(BenchmarkUnavailableError) as err:
        load_benchmark("docvqa", hub_cache_dir=tmp_path / "hub", datasets_cache_dir=tmp_path / "ds")
    message = str(err.value)
    assert "lmms-lab/DocVQA" in message and "never contacts the hub" in message
    assert 'hf download lmms-lab/DocVQA --repo-type dataset --include "README.md" "DocVQA/validation-*"' in message
    assert "source='data/benchmarks/docvqa'" in message
    with pytest.raises(BenchmarkUnavailableError, match="(?s)no dataset at .*hf download"):
        load_benchmark("docvqa", source=tmp_path / "nowhere")
    with pytest.raises(BenchmarkUnavailableError, match="make_reader_benchmark"):
        load_benchmark("reader_docqa")


def test_wrong_dataset_is_a_schema_error(tmp_path):
    with pytest.raises(BenchmarkSchemaError, match="lacking .*questionId"):
        load_benchmark("docvqa", source=datasets.Dataset.from_parquet(str(fixture_dir("chartqa") / "data" / "test-00000-of-00001.parquet")))
    with pytest.raises(BenchmarkSchemaError, match="cannot read config 'DocVQA'"):
        load_benchmark("docvqa", source=fixture_dir("textvqa"))
    not_parquet = tmp_path / "rows.csv"
    not_parquet.write_text("a,b\n")
    with pytest.raises(BenchmarkError, match="not a .parquet file"):
        load_benchmark("docvqa", source=not_parquet)


def test_an_image_that_fails_to_decode_raises_naming_the_sample():
    # A PNG whose IDAT chunk holds garbage with a correct CRC: PIL's verify() (chunks and CRCs)
    # accepts it, so the loader keeps it; decompressing it fails.
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    png = buf.getvalue()
    at = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[at : at + 4])
    garbage = b"\x00" * length
    chunk = png[at : at + 4] + b"IDAT" + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    truncated = png[:at] + chunk + png[at + 12 + length :]
    ds = datasets.Dataset.from_list(
        [{"type": "human_test", "question": "q?", "answer": "1", "image": {"bytes": truncated, "path": None}}],
        features=datasets.Features(
            {"type": datasets.Value("string"), "question": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}
        ),
    )
    samples = load_benchmark("chartqa", source=ds)
    assert len(samples) == 1
    with pytest.raises(UnreadableImageError, match="benchmark 'chartqa' sample 0"):
        samples[0]


# ---------------------------------------------------------------------------------- scoring


def test_score_prediction_uses_each_benchmarks_metric(loaded):
    # DocVQA ANLS: "4711" equals the first answer
    assert score_prediction("docvqa", "4711", loaded["docvqa"][0]) == {"anls": 1.0}
    # OCRBench HME row: spaces removed on both sides, "x ^ { 2 } + 1" -> "x^{2}+1" found in the prediction
    assert score_prediction("ocrbench", "$x^{2} + 1$", loaded["ocrbench"][1]) == {"ocrbench_accuracy": 1.0}
    # ChartQA "12%" -> 0.12; prediction 0.125: |0.125 - 0.12| / 0.12 = 0.0417 <= 0.05
    assert score_prediction("chartqa", "0.125", loaded["chartqa"][1]) == {"relaxed_accuracy": 1.0}
    # MMBench: the letter B
    assert score_prediction("mmbench", "B", loaded["mmbench"][0]) == {"mmbench_choice": 1.0}
    # VQAv2: "two" -> "2" (number words); 6 of the 10 answers are "2" and 3 are "two" -> all "2": acc 1
    assert score_prediction("vqav2", "two", loaded["vqav2"][0]) == {"vqav2_accuracy": 1.0}
    # GQA exact match, case and punctuation ignored
    assert score_prediction("gqa", "Yes.", loaded["gqa"][0]) == {"exact_match": 1.0}


def test_the_offline_benchmark_loads_and_scores_two_metrics():
    from sparsemm_utils.benchmarks import make_reader_benchmark

    ds = make_reader_benchmark(2, seed=123)
    samples = load_benchmark("reader_docqa", source=ds)
    assert len(samples) == len(ds) and not samples.skips.counts
    first = samples[0]
    assert first.question == ds[0]["prompt"] and first.answers == (ds[0]["answer"],)
    assert first.extra["task"] in ("ocr", "line", "value")
    assert score_prediction("reader_docqa", first.answers[0], first) == {"anls": 1.0, "exact_match": 1.0}
    assert BENCHMARKS["reader_docqa"].generation_limit(None) == 64


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BENCHMARKS["docvqa"].split = "test"  # type: ignore[misc]
    assert isinstance(BENCHMARKS["docvqa"], BenchmarkSpec)
