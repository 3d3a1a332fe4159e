"""The real generator on a tiny Qwen2-VL of the real class: the sweep end to end, and the invariant
that a budget covering the whole prompt answers exactly as the full cache (docs/method.md §5)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsemm_utils.benchmarks import BENCHMARKS, load_benchmark, make_reader_benchmark
from sparsemm_utils.evaluation import ModelGenerator, predictions_frame, read_results, run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    from sparsemm_utils.models import load_model

    return load_model("tiny-random/qwen2_vl", seed=0)


@pytest.fixture(scope="module")
def samples():
    return load_benchmark("reader_docqa", source=make_reader_benchmark(1, seed=7))


def test_full_budget_compression_answers_like_the_full_cache(loaded, samples):
    scores = np.random.default_rng(0).random((loaded.num_layers, loaded.num_heads))
    gen = ModelGenerator(loaded, {"window": 8, "ratio": 0.1, "head_scores": scores, "seed": 0, "fraction": 0.1}, max_new_tokens=6)
    spec = BENCHMARKS["reader_docqa"]
    sample = samples[0]
    full = gen(sample, spec, "fullkv", None)
    assert full.prompt_tokens > 64 and full.kv_bytes > 0
    for method in ("sparsemm", "snapkv", "pyramidkv", "adakv", "random"):
        same = gen(sample, spec, method, 4096)  # B >= n: every head keeps everything
        assert same.text == full.text, method
        assert same.kv_bytes == full.kv_bytes, method
    small = gen(sample, spec, "snapkv", 16)
    assert small.kv_bytes < full.kv_bytes


def test_sweep_end_to_end_on_the_tiny_model(loaded, samples, tmp_path):
    scores = np.random.default_rng(0).random((loaded.num_layers, loaded.num_heads))
    gen = ModelGenerator(loaded, {"window": 8, "ratio": 0.1, "head_scores": scores, "seed": 0, "fraction": 0.1}, max_new_tokens=4)
    result = run_sweep(
        tmp_path,
        model="tiny-random/qwen2_vl",
        benchmarks={"reader_docqa": samples},
        methods=["fullkv", "sparsemm", "mask_random"],
        budgets=[16],
        generate=gen,
        settings={"window": 8, "max_new_tokens": 4},
        progress=False,
        log=None,
    )
    table = read_results(tmp_path)
    assert len(table) == 3 * 2  # 3 cells x (anls, exact_match)
    assert ((table["score"] >= 0) & (table["score"] <= 1)).all()
    preds = predictions_frame(tmp_path / "predictions.jsonl")
    assert len(preds) == 3 * len(samples) and preds["prompt_tokens"].notna().all()
    # the compressed cache holds fewer bytes than the full one on the same prompts
    mean_bytes = preds.groupby("method")["kv_bytes"].mean()
    assert mean_bytes["sparsemm"] < mean_bytes["fullkv"]
    assert result.generated == 3 * len(samples)


def test_prompt_tokens_match_the_generators(loaded, samples):
    from sparsemm_utils.evaluation import prompt_tokens

    gen = ModelGenerator(loaded, {}, max_new_tokens=1)
    (n,) = prompt_tokens(loaded, samples, n=1)
    assert gen(samples[0], BENCHMARKS["reader_docqa"], "fullkv", None).prompt_tokens == n
