"""The zero-match case on a real-class model (docs/faults.md, "Inputs"): a random-weight Qwen2-VL
reads nothing, no head ever hits a region (its few tokens that happen to match a chunk are not
looked at), and step 04's first read of the scores says so with step 03's counts instead of a bare
"head scores are all zero"."""

from __future__ import annotations

import pytest

from sparsemm_utils import head_scoring_capture as capture
from sparsemm_utils.head_scoring_files import load_head_scores
from sparsemm_utils.head_scoring_rule import InvalidHeadScoresError
from sparsemm_utils.models import load_model
from sparsemm_utils.page_generator import DocumentGeneratorConfig, generate_documents
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.steps import head_scoring as step03

pytestmark = pytest.mark.slow


def test_step_03_matching_no_token_is_explained_where_step_04_reads_the_scores(tmp_path):
    documents = generate_documents(
        DocumentGeneratorConfig(n_documents=2, seed=3, page_width_range=(224, 280), page_height_range=(112, 168)),
        progress=False,
    )
    loaded = load_model("tiny-random/qwen2_vl")
    regions = map_documents(documents, loaded.processor, "qwen2_vl")
    cfg = step03.Config(run_dir=str(tmp_path), max_new_tokens=4, n_samples=2, explorer_samples=0, top_k=2, text_heads=False)
    samples = capture.capture_documents(loaded, documents, regions, cfg, progress=False)
    variants = capture.compare_variants(samples, cfg.top_k)
    result = variants["substring/argmax"]
    step03.write_outputs(cfg, result, step03.build_report(cfg, loaded, samples, variants), samples=samples)
    generated = sum(len(s.tokens) for s in samples)
    assert result.scores.sum() == 0 and generated > 0  # random weights read nothing
    # what notebook 04 does first with step 03's file
    with pytest.raises(InvalidHeadScoresError) as info:
        load_head_scores(step03.HEAD_SCORES.require(tmp_path), shape=(loaded.num_layers, loaded.num_heads))
    message = str(info.value)
    matched = result.summary()["tokens_matched"]
    assert f"step 03 matched {matched} of {generated} generated tokens over 2 samples" in message
    assert "random or untrained weights" in message and "token_matches.csv" in message
