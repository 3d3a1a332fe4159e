"""Step 03 on the tiny models of the real classes: the streamed row capture (AttentionInterface,
language model only) agrees with the eager + output_attentions reference to float tolerance, the
scores follow the rule on a real capture, the prefill cache is checked, and the whole
documents -> regions -> scores path runs."""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsemm_utils import attention_capture as ac
from sparsemm_utils import head_scoring_capture as capture
from sparsemm_utils import head_scoring_files as files
from sparsemm_utils import head_scoring_rule as rule
from sparsemm_utils.attention_hooks import text_attention
from sparsemm_utils.head_explorer import HeadExplorer, explorer_samples
from sparsemm_utils.models import load_model, text_attention_implementation, vision_attention_implementation
from sparsemm_utils.page_generator import DocumentGeneratorConfig, generate_documents
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.prompts import build_inputs, image_token_span
from sparsemm_utils.reader_tasks import ReaderDocSpec
from sparsemm_utils.steps import head_scoring as step03

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl", "llava_onevision", "internvl")


@pytest.fixture(scope="module")
def models():
    return {mt: load_model(f"tiny-random/{mt}") for mt in MODEL_TYPES}


def page() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (112, 224, 3), dtype=np.uint8))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streamed_rows_equal_the_eager_reference(models, model_type):
    loaded = models[model_type]
    inputs = build_inputs(loaded, page(), model_type=model_type)
    prompt_len = inputs["input_ids"].shape[1]
    spec = ac.CaptureSpec(top_k=3, image_span=image_token_span(inputs["input_ids"], loaded.image_token_id),
                          image_steps=2, keep_rows=True)
    ids_s, streamed = ac.generate_with_rows(loaded, inputs, max_new_tokens=5, spec=spec, method="streamed")
    ids_r, reference = ac.generate_with_rows(loaded, inputs, max_new_tokens=5, spec=spec, method="reference")
    assert ids_s.tolist() == ids_r.tolist()
    assert streamed.key_lengths.tolist() == (prompt_len + np.arange(len(ids_s))).tolist()
    assert streamed.shape == (loaded.num_layers, loaded.num_heads)  # per QUERY head (Qwen: 8 on 2 KV heads)
    for t in range(len(ids_s)):
        np.testing.assert_allclose(streamed.rows[t], reference.rows[t], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(streamed.argmax, reference.argmax)
    np.testing.assert_allclose(streamed.image_mass, reference.image_mass, atol=1e-5)
    # the language model is back on sdpa; the vision tower never left it
    assert text_attention_implementation(loaded.model) == "sdpa"
    assert vision_attention_implementation(loaded.model) == "sdpa"


def test_scores_on_a_real_capture_follow_the_rule(models):
    loaded = models["qwen2_vl"]
    inputs = build_inputs(loaded, page(), model_type="qwen2_vl")
    start, count = image_token_span(inputs["input_ids"], loaded.image_token_id)
    spec = ac.CaptureSpec(top_k=2, image_span=(start, count))
    ids, captured = ac.generate_with_rows(loaded, inputs, max_new_tokens=6, spec=spec)
    tokens = rule.generated_tokens(loaded.tokenizer, ids, "qwen2_vl", stop_ids=ac.stop_token_ids(loaded))
    # one chunk made of the first generated character, its region the whole image
    record = {"doc_id": 0, "image_token_start": start, "chunks": [{"chunk": tokens.texts[0], "positions": list(range(count))}]}
    result = capture.score_captures(
        [capture.SampleCapture(0, tokens, captured, record, inputs["input_ids"].shape[1], 0.0)], "substring", "argmax"
    )
    # by the rule: every token whose text is in the chunk adds [argmax in the image] / |R| per head
    expected = np.zeros((loaded.num_layers, loaded.num_heads))
    for t, text in enumerate(tokens.texts):
        if text in record["chunks"][0]["chunk"] and not tokens.stop[t]:
            expected += ((captured.argmax[t] >= start) & (captured.argmax[t] < start + count)) / count
    np.testing.assert_allclose(result.scores, expected)
    assert result.reason_counts()[rule.MATCHED] >= 1


def test_decoding_without_the_prefill_cache_is_caught(models):
    """The original's issue #10, reproduced: a decode step fed without past_key_values."""
    loaded = models["qwen2_vl"]
    inputs = build_inputs(loaded, page(), model_type="qwen2_vl")
    recorder = ac.RowRecorder(loaded.num_layers, loaded.num_heads)
    with torch.no_grad(), text_attention(loaded.model, ac.register_row_capture()), ac.recording(recorder):
        first = loaded.model(**inputs).logits[0, -1].argmax().view(1, 1)
        loaded.model(input_ids=first, use_cache=False)  # no cache: the step sees only itself
    with pytest.raises(ac.MissingPrefillCacheError, match="issue #10"):
        recorder.finish().check_key_lengths(inputs["input_ids"].shape[1])


def test_attention_is_restored_after_an_error(models):
    loaded = models["llava_next"]
    with pytest.raises(RuntimeError, match="boom"):
        with text_attention(loaded.model, "eager"):
            raise RuntimeError("boom")
    assert text_attention_implementation(loaded.model) == "sdpa"


@pytest.fixture(scope="module")
def documents():
    return generate_documents(DocumentGeneratorConfig(n_documents=2, seed=3, page_width_range=(224, 280),
                                                      page_height_range=(112, 168)), progress=False)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl", "llava_onevision", "internvl"])
def test_documents_to_scores_and_explorer(models, documents, tmp_path, model_type):
    loaded = models[model_type]
    regions = map_documents(documents, loaded.processor, model_type)
    cfg = step03.Config(run_dir=str(tmp_path), max_new_tokens=4, n_samples=2, explorer_samples=1, explorer_tokens=3, top_k=2)
    samples = capture.capture_documents(loaded, documents, regions, cfg, progress=False)
    assert [len(s.tokens) for s in samples] == [4, 4]
    assert samples[0].captured.image_attention.shape[:3] == (3, loaded.num_layers, loaded.num_heads)
    assert samples[1].captured.image_attention is None
    variants = capture.compare_variants(samples, cfg.top_k)
    result = variants["substring/argmax"]
    paths = step03.write_outputs(cfg, result, step03.build_report(cfg, loaded, samples, variants), samples=samples)
    # a tiny-random model matches no token, so its scores are all zero: allocation would refuse them
    scores = files.load_head_scores(paths["head_scores.json"], shape=loaded, allow_zero=True)
    np.testing.assert_allclose(scores, result.scores)
    # a tiny-random model: the claims about visual heads cannot be told
    assert [h is None for h in step03.FINDINGS.read(tmp_path)["holds"]] == [False, True, True, True]
    explorer = HeadExplorer(explorer_samples(samples, result, documents, loaded.processor, model_type), result.scores)
    assert len(explorer.samples) == 1 and explorer.static_figure(max_steps=2) is not None
    check = capture.compare_with_reference(loaded, documents[0], regions[0], cfg)
    assert check["tokens_equal"] and check["argmax_equal"] == 1.0 and check["max_abs_row_diff"] < 1e-6


def test_regions_from_another_model_are_rejected(models, documents):
    regions = map_documents(documents, models["llava_next"].processor, "llava_next")
    cfg = step03.Config(max_new_tokens=2, n_samples=1)
    with pytest.raises(capture.RegionMismatchError, match="rerun step 02"):
        capture.capture_documents(models["qwen2_vl"], documents, regions, cfg, progress=False)
    shifted = [{**r, "model_type": "qwen2_vl", "image_token_start": r["image_token_start"] + 1} for r in regions]
    with pytest.raises(capture.RegionMismatchError, match="wrong keys"):
        capture.capture_documents(models["qwen2_vl"], documents, shifted, cfg, progress=False)
    with pytest.raises(capture.RegionMismatchError, match="no record"):
        capture.capture_documents(models["qwen2_vl"], documents, [], cfg, progress=False)


@pytest.fixture(scope="module")
def reader():
    return load_model("data/tiny_reader", seed=0)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava_next", "tiny_reader"])
def test_a_batch_of_documents_captures_what_each_captures_alone(models, reader, tmp_path, monkeypatch, model_type):
    """Step 03's batch_size (issue 23 item 1): 4 documents of different prompt lengths as a
    left-padded batch of 3 and one of 1, one ending before the others, give each document its
    batch-1 capture: tokens, top positions, key lengths, hits, and the same head_scores.json bytes."""
    if model_type == "tiny_reader":
        loaded, new_tokens = reader, 24
        documents = generate_documents(ReaderDocSpec().generator_config(seed=2, n_documents=4), progress=False)
    else:
        loaded, new_tokens = models[model_type], 6
        documents = generate_documents(DocumentGeneratorConfig(n_documents=4, seed=5, page_width_range=(224, 336),
                                                               page_height_range=(112, 224)), progress=False)
    regions = map_documents(documents, loaded.processor, loaded.model_type)
    alone_cfg = step03.Config(run_dir=str(tmp_path / "alone"), max_new_tokens=new_tokens, n_samples=4, explorer_samples=2,
                              explorer_tokens=3, top_k=3)
    batch_cfg = replace(alone_cfg, run_dir=str(tmp_path / "batch"), batch_size=3)
    if model_type == "qwen2_vl":  # a random model never ends by itself: end the first document at its 2nd token
        first = capture.capture_documents(loaded, [documents[0]], regions, replace(alone_cfg, n_samples=1), progress=False)
        monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", first[0].tokens.ids[1])
    alone = capture.capture_documents(loaded, documents, regions, alone_cfg, progress=False)
    batched = capture.capture_documents(loaded, documents, regions, batch_cfg, progress=False)
    if model_type == "qwen2_vl":  # the eager reference over a padded batch too (its pad keys carry weight 0)
        reference = capture.capture_documents(loaded, documents, regions, replace(batch_cfg, capture="reference"), progress=False)
        assert [r.tokens.ids for r in reference] == [s.tokens.ids for s in alone]
        assert all(np.array_equal(r.captured.argmax, s.captured.argmax) for r, s in zip(reference, alone, strict=True))
    assert len({s.prompt_len for s in alone[:3]}) > 1  # the first batch is padded
    if model_type != "llava_next":  # (the random LLaVA-NeXT repeats one token whatever the page: it cannot end early)
        assert len({len(s.tokens) for s in alone[:3]}) > 1 and min(len(s.tokens) for s in alone[:3]) < new_tokens  # one ends early
    for one, many in zip(alone, batched, strict=True):
        assert (many.doc_id, many.prompt_len, many.tokens.ids, many.tokens.texts) == (one.doc_id, one.prompt_len, one.tokens.ids, one.tokens.texts)
        a, b = one.captured, many.captured
        for name in ("argmax", "top_positions", "key_lengths"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        # weights: the rounding of matrix products over a padded batch (a few float32 ulps), never a rank
        np.testing.assert_allclose(b.top_weights, a.top_weights, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.image_mass, a.image_mass, rtol=0, atol=1e-5)
        assert (a.image_attention is None) == (b.image_attention is None)
        if a.image_attention is not None:
            np.testing.assert_allclose(b.image_attention.astype(np.float32), a.image_attention.astype(np.float32), atol=1e-3)
    results = {name: capture.compare_variants(samples, alone_cfg.top_k) for name, samples in (("alone", alone), ("batch", batched))}
    for variant, result in results["alone"].items():
        other = results["batch"][variant]
        assert all(np.array_equal(h1, h2) for h1, h2 in zip(result.hits, other.hits, strict=True)), variant
        np.testing.assert_array_equal(other.sample_scores, result.sample_scores)
    paths = [files.write_head_scores_json(results[name]["substring/argmax"].sample_scores, tmp_path / f"{name}.json") for name in results]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    if model_type == "tiny_reader":
        assert results["alone"]["substring/argmax"].sample_scores.sum() > 0  # the reader reads: heads are hit



def test_the_batch_benchmark_captures_the_same_head_scores(capsys):
    """benchmarks/batched_head_scoring_speed.py on 3 documents at batch 1 and 2 (timings printed, never asserted)."""
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "batched_head_scoring_speed.py"))
    assert bench["main"](["--documents", "3", "--batch-sizes", "1", "2"]) == 0  # 1 when a capture differs from batch 1
    out = capsys.readouterr().out
    assert "3 documents" in out and out.count(" yes") == 2
