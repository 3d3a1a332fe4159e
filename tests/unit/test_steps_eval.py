"""Step 05's declarations (sparsemm_utils.steps.eval): STEP, Config, the run's tables,
write_outputs and the findings, on hand-made results and predictions (no model, no notebook)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparsemm_utils.benchmarks import UnknownBenchmarkError
from sparsemm_utils.evaluation import EVAL_METHODS, LEGACY_RESULTS_COLUMNS, EvaluationError, predictions_frame
from sparsemm_utils.findings import findings_frame
from sparsemm_utils.pipeline import STEPS
from sparsemm_utils.steps import eval as step
from sparsemm_utils.steps import head_scoring
from sparsemm_utils.steps.eval import (
    FINDINGS,
    LOWEST_BUDGET,
    STEP,
    Config,
    cell_statistics,
    fastv_match_table,
    findings,
    lowest_budget_table,
    method_labels,
    write_outputs,
)

# ---------------------------------------------------------------------------------- declarations


def test_step_declares_the_sweep_files_the_tables_and_the_findings():
    assert STEP.name == "05_eval" and STEP.resumable and STEP.needs == ("03_head_scoring",)
    assert STEP.inputs == (head_scoring.HEAD_SCORES,) and Config().head_scores == "03_head_scoring/head_scores.json"
    assert STEP.output_names == ("results.csv", "predictions.jsonl", "sweep.json", "lowest_budget.csv", "findings.csv")
    assert STEP.notebook_path().is_file()
    assert STEP in STEPS  # the pipeline's registry is built from this declaration


def test_config_defaults_are_the_tiny_configs():
    import yaml

    from sparsemm_utils.runs import repo_root

    tiny = yaml.safe_load((repo_root() / "configs" / "tiny.yaml").read_text())
    cfg = Config()
    for key, value in {**tiny["params"], **tiny["steps"]["05_eval"]}.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(cfg, key) == expected, key
    assert cfg.run_dir == "runs/tiny"


# ---------------------------------------------------------------------------------- config


def test_eval_config_normalises_and_validates():
    cfg = Config(benchmarks=["DocVQA"], methods=["SparseMM", "fullkv"], budgets=[64, 16, 64], window=8)
    assert cfg.benchmarks == ("docvqa",) and cfg.methods == ("sparsemm", "fullkv") and cfg.budgets == (16, 64)
    assert cfg.needs_head_scores
    assert not Config(methods=["fullkv", "snapkv"]).needs_head_scores
    assert cfg.press_settings("S")["head_scores"] == "S"
    settings_ = Config(benchmarks=["reader_docqa"], methods=["fullkv", "sparsemm"], n_documents=8, benchmark_seed=5).sweep_settings(np.ones((2, 2)))
    assert settings_["reader_docqa"] == {"n_documents": 8, "seed": 5} and len(settings_["head_scores_sha256"]) == 64
    # FastV's K is part of the sweep's identity only when FastV is in it (older sweeps stay valid)
    assert "fastv_k" not in settings_
    assert Config().batch_size == 1 and Config(batch_size=32).batch_size == 32
    # the batch size changes no answer, so it is not part of the sweep's identity (a rerun resumes)
    assert Config(batch_size=32).sweep_settings() == Config().sweep_settings()
    with_fastv = Config(methods=["fullkv", "fastv"], fastv_k=1)
    assert with_fastv.sweep_settings()["fastv_k"] == 1 and with_fastv.press_settings()["fastv_k"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budgets": [8, 16], "window": 8}, "do not exceed the window"),
        ({"methods": ["h2o"]}, "unknown method"),
        ({"benchmarks": ["nocaps"]}, "unknown benchmark"),
        ({"benchmarks": "docvqa"}, "list of names"),
        ({"ratio": 0}, "ratio must be"),
        ({"limit": 0}, "limit must be"),
        ({"fastv_k": 0}, "fastv_k must be"),
        ({"on_mismatch": "delete"}, "on_mismatch must be"),
        ({"model_id": ""}, "model_id"),
        ({"benchmark_sources": {"nope": "x"}}, "unknown benchmark"),
        ({"budgets": [16, 0]}, r"budget \(tokens per KV head, window included\) must be an int >= 1"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1 and <= 64, got 0; questions answered at once"),
        ({"batch_size": 65}, "batch_size must be an int >= 1 and <= 64"),
        ({"batch_size": 2.0}, "batch_size must be an int"),
        ({"lmms_eval": "0.4"}, r"lmms_eval \(the scoring protocol\) must be one of '0.3', 'current', got '0.4'"),
        ({"lmms_eval": 0.3}, r"lmms_eval \(the scoring protocol\) must be one of"),
    ],
)
def test_eval_config_errors(kwargs, message):
    with pytest.raises((EvaluationError, UnknownBenchmarkError), match=message):
        Config(**kwargs)


def test_the_protocol_builds_the_prompts(tmp_path):
    """``lmms_eval`` picks the protocol whose prompts the benchmarks are loaded with: VQAv2's
    short-answer post-prompt exists only in today's lmms-eval."""
    from sparsemm_utils.benchmark_fixtures import fixture_dir

    sources = {"vqav2": str(fixture_dir("vqav2"))}
    old = Config(benchmarks=["vqav2"], benchmark_sources=sources).load_benchmarks()["vqav2"][0].question
    new = Config(benchmarks=["vqav2"], benchmark_sources=sources, lmms_eval="current").load_benchmarks()["vqav2"][0].question
    assert old == "How many apples are there?"
    assert new == "How many apples are there?\nAnswer the question using a single word or phrase."
    assert Config().lmms_eval == "0.3" and Config(lmms_eval="current").protocol.name == "current"


def test_real_model_configs_name_the_protocol():
    import yaml

    from sparsemm_utils.runs import repo_root

    names = [p.stem for p in (repo_root() / "configs").glob("*.yaml") if p.stem not in ("tiny", "study")]
    assert {"qwen2-vl-7b", "llava-next-mistral-7b", "llava-next-vicuna-7b", "qwen3-vl-8b", "internvl3-8b"} <= set(names)
    for name in names:
        config = yaml.safe_load((repo_root() / "configs" / f"{name}.yaml").read_text())
        assert config["steps"]["05_eval"]["lmms_eval"] == "0.3", name


def test_head_scores_path_names_the_missing_step(tmp_path):
    from sparsemm_utils.runs import MissingUpstreamError

    cfg = Config(run_dir=str(tmp_path))
    with pytest.raises(MissingUpstreamError, match="03_head_scoring"):
        cfg.head_scores_path()
    (tmp_path / "03_head_scoring").mkdir()
    (tmp_path / "03_head_scoring" / "head_scores.json").write_text("{}")
    assert cfg.head_scores_path() == tmp_path / "03_head_scoring" / "head_scores.json"
    with pytest.raises(FileNotFoundError, match="do not exist"):
        Config(head_scores=str(tmp_path / "none.json")).head_scores_path()
    assert Config(device="cpu").resolved_device() == "cpu"
    assert Config(max_new_tokens=4).sweep_settings()["max_new_tokens"] == 4


def test_config_loads_the_offline_benchmark_and_local_sources(tmp_path):
    from sparsemm_utils.benchmark_fixtures import fixture_dir

    cfg = Config(
        benchmarks=["reader_docqa", "docvqa"],
        benchmark_sources={"docvqa": str(fixture_dir("docvqa"))},
        n_documents=1,
        benchmark_seed=11,
        limit=2,
    )
    loaded = cfg.load_benchmarks(save_dir=tmp_path)
    assert list(loaded) == ["reader_docqa", "docvqa"]
    assert loaded["docvqa"].sample_ids == ["57344", "57345"]  # limit 2: the first two rows
    assert (tmp_path / "reader_docqa.parquet").is_file() and 1 <= len(loaded["reader_docqa"]) <= 2


# ---------------------------------------------------------------------------------- tables


def test_lowest_budget_table():
    results = pd.DataFrame(
        [
            ("m", "gqa", "fullkv", None, "exact_match", 0.9, 4),
            ("m", "gqa", "sparsemm", 16, "exact_match", 0.7, 4),
            ("m", "gqa", "sparsemm", 64, "exact_match", 0.85, 4),
            ("m", "gqa", "snapkv", 16, "exact_match", 0.4, 4),
            ("m", "gqa", "snapkv", 64, "exact_match", 0.8, 4),
        ],
        columns=list(LEGACY_RESULTS_COLUMNS),
    )
    results["budget"] = results["budget"].astype("Int64")
    table = lowest_budget_table(results)
    assert table["method"].tolist() == ["fullkv", "sparsemm", "snapkv"]
    assert table["budget"].tolist()[1:] == [16, 16] and pd.isna(table["budget"].iloc[0])
    # vs_fullkv: 0.7 - 0.9 = -0.2; 0.4 - 0.9 = -0.5
    assert np.allclose(table["vs_fullkv"].tolist(), [0.0, -0.2, -0.5])


def test_cell_statistics_share_of_the_full_cache():
    # fullkv: 4 samples with kv_bytes 100,000 and prompts of 100..103 tokens; sparsemm @16 reports
    # kv_bytes for sample 0 only (16,000): the mean is over the reported values
    records = [
        {"model": "m", "benchmark": "gqa", "method": "fullkv", "budget": None, "sample_id": str(i),
         "scores": {"exact_match": 1.0}, "prompt_tokens": 100 + i, "kv_bytes": 100_000, "seconds": 0.5}
        for i in range(4)
    ] + [
        {"model": "m", "benchmark": "gqa", "method": "sparsemm", "budget": 16, "sample_id": str(i),
         "scores": {"exact_match": float(i == 0)}, "prompt_tokens": 100 if i == 0 else None,
         "kv_bytes": 16_000 if i == 0 else None, "seconds": 0.25}
        for i in range(4)
    ]  # fmt: skip
    stats = cell_statistics(predictions_frame(records))
    full = stats[stats["method"] == "fullkv"].iloc[0]
    sparse = stats[stats["method"] == "sparsemm"].iloc[0]
    assert full["n"] == 4 and full["kv_bytes"] == 100_000 and full["kv_share"] == 1.0
    assert sparse["kv_bytes"] == 16_000 and np.isclose(sparse["kv_share"], 0.16)
    assert full["prompt_tokens"] == 101.5  # mean of 100, 101, 102, 103
    assert cell_statistics(pd.DataFrame()).empty


def _fastv_predictions() -> pd.DataFrame:
    # budget 16: two prompts, one reachable (target 100, stored 96), one not (target 100, stored 150)
    details = [(16, 0.5, 20, 100, 96, True), (16, 1.0, 40, 100, 150, False), (32, 0.25, 10, 200, 200, True)]
    return pd.DataFrame(
        [{"benchmark": "gqa", "method": "fastv", "budget": b, "sample_id": str(i), "detail_ratio": r, "detail_dropped": d,
          "detail_target_tokens": t, "detail_stored_tokens": st_, "detail_reachable": ok}
         for i, (b, r, d, t, st_, ok) in enumerate(details)]
        + [{"benchmark": "gqa", "method": "fullkv", "budget": None, "sample_id": "0"}]
    )  # fmt: skip


def test_fastv_match_table_by_hand():
    preds = _fastv_predictions()
    table = fastv_match_table(preds)
    assert list(table["budget"]) == [16, 32] and list(table["n"]) == [2, 1]
    row = table.iloc[0]
    assert (row["reachable"], row["ratio"], row["dropped"], row["target_tokens"], row["stored_tokens"]) == (0.5, 0.75, 30, 100, 123)
    assert row["stored_over_target"] == pytest.approx(1.23)
    assert fastv_match_table(preds[preds["method"] == "fullkv"]).empty
    with pytest.raises(EvaluationError, match="lack"):
        fastv_match_table(preds.drop(columns=["detail_ratio"]))


def test_fastvs_label_says_what_it_stored():
    # budget 16: mean stored 123 / mean target 100 = 1.23x; budget 32: 200 / 200 = 1.0x
    preds = _fastv_predictions()
    assert method_labels(preds)["fastv"] == "FastV (stored 1.0-1.2x the budget's KV bytes)"
    assert method_labels(preds[preds["budget"] == 32])["fastv"] == "FastV (within the budget's KV bytes)"
    assert method_labels(preds[preds["budget"] == 16])["fastv"] == "FastV (stored 1.2x the budget's KV bytes)"
    assert method_labels(preds[preds["method"] == "fullkv"])["fastv"] == EVAL_METHODS["fastv"].label == "FastV"
    assert method_labels(preds)["sparsemm"] == "SparseMM"


# ---------------------------------------------------------------------------------- findings


def _sweep(cells: dict[tuple[str, int | None], list[float]], *, benchmark="gqa", model="m", prompt=100):
    """results.csv and the predictions of per-question scores {(method, budget): [score, ...]}."""
    metric = "anls" if benchmark == "docvqa" else "exact_match"
    records = [
        {"model": model, "benchmark": benchmark, "method": m, "budget": b, "sample_id": str(i),
         "scores": {metric: s}, "prompt_tokens": prompt}
        for (m, b), scores in cells.items() for i, s in enumerate(scores)
    ]  # fmt: skip
    results = pd.DataFrame(
        [(model, benchmark, m, b, metric, float(np.mean(s)), len(s)) for (m, b), s in cells.items()],
        columns=list(LEGACY_RESULTS_COLUMNS),
    )
    results["budget"] = results["budget"].astype("Int64")
    return results, predictions_frame(records)


def _by_claim(found):
    return {f.claim.split(" (")[0]: f for f in found}


def test_findings_at_the_two_lowest_budgets_by_hand():
    # 6 questions. FullKV answers all; at B = 16 SparseMM answers all too (100% of FullKV >= the
    # paper's 90%); SnapKV none: SparseMM - SnapKV = 1 on every question, so every resample gives 1:
    # interval [1, 1], above zero, holds. PyramidKV misses one question: the difference is 1/6 on
    # average, but 1/6^... a resample without that question gives 0, so the interval touches zero:
    # cannot tell. At B = 32 (second-lowest) SnapKV answers all: SparseMM - SnapKV = 0, cannot tell.
    # B = 64 is not judged.
    ones, zeros = [1.0] * 6, [0.0] * 6
    results, preds = _sweep({
        ("fullkv", None): ones, ("sparsemm", 16): ones, ("sparsemm", 32): ones, ("sparsemm", 64): zeros,
        ("snapkv", 16): zeros, ("snapkv", 32): ones, ("snapkv", 64): ones, ("pyramidkv", 16): [1.0] * 5 + [0.0],
    })  # fmt: skip
    found = findings(results, preds)
    assert [f.step for f in found] == ["05_eval"] * 4 and all(f.n == 6 for f in found)
    got = _by_claim(found)
    keeps = got["SparseMM keeps most of FullKV's exact_match at the lowest budget"]
    assert keeps.holds is True and keeps.headline
    assert "B = 16: SparseMM 1.000 vs FullKV 1.000 (100% of FullKV)" in keeps.this_run
    assert "B = 16 is 16% of the mean 100-token prompt" in keeps.this_run
    assert "SparseMM keeps 90-97% of FullKV on 7 model/benchmark pairs" in keeps.paper
    snap = got["SparseMM is ahead of SnapKV at the lowest budget"]
    assert snap.holds is True and snap.headline
    assert "SparseMM - SnapKV = +1.000 [+1.000, +1.000] (paired bootstrap 95%, n = 6; one question = 16.7 points)" in snap.this_run
    assert "SnapKV 65-86%; SparseMM ahead on 7 of 7 pairs" in snap.paper
    pyramid = got["SparseMM is ahead of PyramidKV at the lowest budget"]
    assert pyramid.holds is None and not pyramid.headline and "SparseMM - PyramidKV = +0.167 [+0.000," in pyramid.this_run
    second = got["SparseMM is ahead of SnapKV at the second-lowest budget"]
    assert second.holds is None and not second.headline and "B = 32" in second.this_run


def test_findings_that_fail():
    # SparseMM answers nothing at B = 16 where FullKV and SnapKV answer all 6: 0% < 90% and FullKV
    # ahead on every question (interval [1, 1]): fails; SnapKV ahead: fails.
    ones, zeros = [1.0] * 6, [0.0] * 6
    results, preds = _sweep({("fullkv", None): ones, ("sparsemm", 16): zeros, ("snapkv", 16): ones})
    got = _by_claim(findings(results, preds))
    assert got["SparseMM keeps most of FullKV's exact_match at the lowest budget"].holds is False
    assert got["SparseMM is ahead of SnapKV at the lowest budget"].holds is False


def test_the_head_mask_ablation_by_hand():
    # 10 questions. FullKV answers all; masking the top heads loses 8, each random draw loses 1
    # (a different question each): drop 0.8 against 0.1 on average = 8x >= 3x, and the mean random
    # mask (0.9 on every question) beats the top mask on every question it loses: holds.
    ones = [1.0] * 10
    cells = {("fullkv", None): ones, ("sparsemm", 16): ones, ("mask", None): [1.0, 1.0] + [0.0] * 8}
    for k in range(1, 4):
        cells[(f"mask_random_{k}", None)] = [0.0 if i == k else 1.0 for i in range(10)]
    results, preds = _sweep(cells)
    mask = _by_claim(findings(results, preds))["Masking the top visual heads hurts far more than masking random heads"]
    assert mask.holds is True and mask.headline and mask.n == 10
    assert "top heads +0.800" in mask.this_run and "random heads +0.100 on average over 3 draws (1: +0.100, 2: +0.100, 3: +0.100)" in mask.this_run
    assert "ratio 8.0x" in mask.this_run
    # random masks exactly as harmful as the top one: the gap is 0 on every question, no verdict
    for k in range(1, 4):
        cells[(f"mask_random_{k}", None)] = [1.0, 1.0] + [0.0] * 8
    results, preds = _sweep(cells)
    assert _by_claim(findings(results, preds))["Masking the top visual heads hurts far more than masking random heads"].holds is None


def test_findings_quote_the_papers_own_pair_and_name_what_it_lacks():
    # Qwen2-VL-7B DocVQA: the paper's FullKV 0.94, SparseMM @64 0.85, SnapKV @64 0.665 (docs/method.md §6)
    cells = {("fullkv", None): [1.0, 1.0], ("sparsemm", 64): [1.0, 0.0], ("snapkv", 64): [0.0, 0.0], ("fastv", 64): [0.0, 0.0]}
    results, preds = _sweep(cells, benchmark="docvqa", model="Qwen/Qwen2-VL-7B-Instruct")
    got = _by_claim(findings(results, preds))
    assert got["SparseMM keeps most of FullKV's anls at the lowest budget"].paper.startswith(
        "qwen2-vl-7b DocVQA, B = 64: SparseMM 0.850 vs FullKV 0.940 (90%)"
    )
    assert "SnapKV 0.665 (71%)" in got["SparseMM is ahead of SnapKV at the lowest budget"].paper
    assert got["SparseMM is ahead of FastV at the lowest budget"].paper == "FastV is not in the paper's table (docs/method.md §6)"


def test_fastvs_finding_says_how_many_times_the_budgets_bytes_it_stored():
    results, preds = _sweep({("fullkv", None): [1.0, 1.0], ("sparsemm", 16): [1.0, 1.0], ("fastv", 16): [0.0, 1.0]})
    fastv = preds["method"] == "fastv"
    # prompt 0 stored 300 of a 100-token target, prompt 1 stored 90: 195 / 100 = 1.95x, 1 of 2 within
    preds.loc[fastv, "detail_target_tokens"] = [100, 100]
    preds.loc[fastv, "detail_stored_tokens"] = [300, 90]
    preds.loc[fastv, "detail_reachable"] = [False, True]
    preds.loc[fastv, "detail_ratio"] = [1.0, 0.5]
    preds.loc[fastv, "detail_dropped"] = [40, 20]
    got = _by_claim(findings(results, preds))["SparseMM is ahead of FastV at the lowest budget"]
    assert got.this_run.endswith("FastV stored 1.9x the budget's KV bytes here (within them on 1 of 2 prompts)")


def test_no_findings_without_fullkv_or_sparsemm():
    results, preds = _sweep({("snapkv", 16): [1.0], ("fullkv", None): [1.0]})
    assert findings(results, preds) == []
    results, preds = _sweep({("sparsemm", 16): [1.0]})
    assert findings(results, preds) == []


# ---------------------------------------------------------------------------------- outputs


def test_write_outputs_writes_the_lowest_budget_table_and_the_findings(tmp_path):
    results, preds = _sweep({("fullkv", None): [1.0] * 6, ("sparsemm", 16): [1.0] * 6, ("snapkv", 16): [0.0] * 6})
    found = write_outputs(Config(run_dir=str(tmp_path)), results, preds)
    assert found == findings(results, preds) and len(found) == 2
    assert sorted(p.name for p in (tmp_path / step.NAME).iterdir()) == ["findings.csv", "lowest_budget.csv"]
    pd.testing.assert_frame_equal(LOWEST_BUDGET.read(tmp_path), lowest_budget_table(results))
    table = FINDINGS.read(tmp_path)
    assert table["claim"].tolist() == findings_frame(found)["claim"].tolist() and table["holds"].tolist() == [True, True]
