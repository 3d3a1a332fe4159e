"""Step 04's declaration, config, outputs and findings (sparsemm_utils.steps.allocation), on
hand-made tables: no model, no notebook (tests/integration/test_compressed_generation_report.py
prefills real prompts)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sparsemm_utils.allocation import InvalidBudgetError, InvalidParameterError
from sparsemm_utils.budget_report import (
    BUDGETED_METHODS,
    BUDGETS_COLUMNS,
    CACHE_BYTES_COLUMNS,
    SATURATION_COLUMNS,
    AllocationTables,
)
from sparsemm_utils.compression import UnknownCompressionMethodError
from sparsemm_utils.findings import findings_frame
from sparsemm_utils.steps import allocation as step04

# ------------------------------------------------------------------------------ declaration


def test_step_reads_documents_and_head_scores_and_declares_its_tables():
    assert step04.STEP.name == "04_allocation"
    assert step04.STEP.needs == ("01_ocr_annotation", "03_head_scoring")
    assert [a.key for a in step04.STEP.inputs] == ["01_ocr_annotation/documents", "03_head_scoring/head_scores.json"]
    assert step04.STEP.output_names == ("budgets.csv", "cache_bytes.csv", "saturation.csv", "findings.csv")


# ---------------------------------------------------------------------------------- config


def test_config_defaults_are_the_spec_defaults():
    cfg = step04.Config()
    assert (cfg.window, cfg.ratio, cfg.head_mask_fraction) == (32, 0.1, 0.1)
    assert cfg.methods == BUDGETED_METHODS
    assert cfg.figure_budgets == (64, 256, 1024)


def test_config_takes_lists_from_papermill_and_picks_low_middle_high():
    cfg = step04.Config(window=8, budgets=[16, 24, 32, 64, 128], methods=["snapkv"])
    assert cfg.budgets == (16, 24, 32, 64, 128) and cfg.methods == ("snapkv",)
    assert cfg.figure_budgets == (16, 32, 128)  # first, len // 2 = index 2, last


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budgets": [64.0, 128]}, InvalidBudgetError, "budgets must be ints"),
        ({"budgets": ["64"]}, InvalidBudgetError, "budgets must be ints"),
        ({"budgets": [16, 64]}, InvalidBudgetError, "budget 16 must exceed the window w=32"),
        ({"budgets": [128, 64]}, InvalidBudgetError, "strictly increasing"),
        ({"budgets": []}, InvalidBudgetError, "non-empty list"),
        ({"budgets": "64"}, InvalidBudgetError, "non-empty list"),
        ({"methods": ["sparsemm", "h2o"]}, UnknownCompressionMethodError, r"unknown budgeted method\(s\) \['h2o'\]"),
        ({"methods": ["fullkv"]}, UnknownCompressionMethodError, "FullKV is always measured"),
        ({"methods": []}, InvalidParameterError, "methods must be a non-empty list"),
        ({"ratio": 1.5}, InvalidParameterError, r"ratio must lie in \[0, 1\], got 1.5"),
        ({"window": 0}, InvalidParameterError, "window must be an int >= 1"),
        ({"n_prompts": 0}, InvalidParameterError, "n_prompts must be an int >= 1"),
        ({"seed": -1}, InvalidParameterError, "seed must be an int >= 0"),
        ({"head_mask_fraction": 0}, InvalidParameterError, "head_mask_fraction"),
        ({"head_mask_fraction": True}, InvalidParameterError, "head_mask_fraction"),
        ({"model_id": ""}, InvalidParameterError, "model_id"),
        ({"run_dir": ""}, InvalidParameterError, "run_dir"),
    ],
)
def test_config_errors_say_what_was_wrong(kwargs, error, message):
    with pytest.raises(error, match=message):
        step04.Config(**kwargs)


# ---------------------------------------------------------------------------- hand-made run

HEAD_DIM = 4  # float32: one token of one KV head = 4 x 2 x 4 = 32 bytes
#: One layer, 4 query heads in 2 KV groups: sigma = [(3 + 1) / 4, 0] = [1, 0], so KV head 0 is the top 10%.
SCORES = np.array([[3.0, 1.0, 0.0, 0.0]])


def _tables() -> AllocationTables:
    """SparseMM and SnapKV at B = 16 (w = 8, b = 8) on two prompts of n = 20 and 30 tokens.

    SparseMM's caps: KV head 0 selects 14, KV head 1 selects 2 (16 = 2 b). On n = 20, n - w = 12:
    head 0 saturates (14 >= 12) and loses 2 tokens, stores 20; head 1 stores 10: 30 tokens, 960 bytes.
    On n = 30 (n - w = 22) nobody saturates: 22 + 10 = 32 tokens, 1024 bytes. SnapKV: 8 + 8 each,
    16 tokens per head, 32 tokens, 1024 bytes. FullKV: n x 1 layer x 2 KV heads x 32 bytes."""
    budgets = [
        ("sparsemm", 16, 0, 0, 14, 8, 20, 20),
        ("sparsemm", 16, 0, 1, 2, 8, 20, 10),
        ("snapkv", 16, 0, 0, 8, 8, 20, 16),
        ("snapkv", 16, 0, 1, 8, 8, 20, 16),
    ]
    saturation = [
        ("sparsemm", 16, 0, 20, 2, 1, 1, 0, 2),
        ("sparsemm", 16, 1, 30, 2, 0, 0, 0, 0),
        ("snapkv", 16, 0, 20, 2, 0, 0, 0, 0),
        ("snapkv", 16, 1, 30, 2, 0, 0, 0, 0),
    ]
    cache_bytes = [
        ("sparsemm", 16, 20, 30, 960, 1280, 0),
        ("sparsemm", 16, 30, 32, 1024, 1920, 1),
        ("snapkv", 16, 20, 32, 1024, 1280, 0),
        ("snapkv", 16, 30, 32, 1024, 1920, 1),
    ]
    return AllocationTables(
        budgets=pd.DataFrame(budgets, columns=list(BUDGETS_COLUMNS)),
        saturation=pd.DataFrame(saturation, columns=list(SATURATION_COLUMNS)),
        cache_bytes=pd.DataFrame(cache_bytes, columns=list(CACHE_BYTES_COLUMNS)),
    )


def _findings(tables=None, scores=SCORES):
    return step04.findings(tables or _tables(), scores, head_dim=HEAD_DIM, dtype=torch.float32)


def test_findings_by_hand():
    concentration, saturation, kv_bytes = _findings()
    assert concentration.claim == "SparseMM's caps concentrate on the top visual heads"
    # the top KV head gets 14 of SparseMM's 16 selected tokens; an equal split would give it half
    assert (concentration.holds, concentration.n, concentration.headline) == (True, 2, True)
    assert concentration.this_run == (
        "the 1 of 2 KV heads with the highest summed score sigma (L0KV0) get 88% (B = 16) of SparseMM's selected "
        "tokens; an equal split would give them 50%"
    )
    assert "77%" in concentration.paper
    assert (saturation.holds, saturation.n) == (True, 2)
    assert saturation.this_run == (
        "SparseMM: 0.5 of 2 KV heads saturate per prompt at B = 16, losing 1.0 tokens of budget (2 prompts of 20-30 "
        "tokens); at B = 16 a KV head keeps 7.5 selected tokens on average instead of b = 8; no other method saturates"
    )
    assert "526" in saturation.paper and "992" in saturation.paper
    assert (kv_bytes.holds, kv_bytes.n) == (True, 4 + 2)
    assert kv_bytes.this_run == (
        "4 of 4 compressed caches (2 methods x 1 budgets x 2 prompts) and 2 of 2 FullKV caches hold exactly "
        "sum(kept) x 4 x 2 x 4 bytes"
    )


def test_an_even_split_does_not_concentrate_and_no_saturation_does_not_hold():
    tables = _tables()
    sparse = tables.budgets.method == "sparsemm"
    tables.budgets.loc[sparse, "selected"] = 8
    tables.saturation[["saturated", "uncompressed", "lost_tokens"]] = 0
    concentration, saturation, _ = _findings(tables)
    assert concentration.holds is False and "get 50% (B = 16)" in concentration.this_run
    assert saturation.holds is False
    assert saturation.this_run == "no SparseMM head saturates at B = 16 (2 prompts of 20-30 tokens); no other method saturates"


def test_other_methods_saturating_are_named():
    tables = _tables()
    tables.saturation.loc[tables.saturation.method == "snapkv", "saturated"] = [2, 0]
    _, saturation, _ = _findings(tables)
    assert saturation.this_run.endswith("; other methods: snapkv at B = 16 (2.0 heads)")


def test_a_byte_mismatch_is_reported():
    tables = _tables()
    tables.cache_bytes.loc[1, "kv_bytes"] = 1025
    tables.cache_bytes.loc[3, "fullkv_bytes"] = 1
    *_, kv_bytes = _findings(tables)
    assert kv_bytes.holds is False
    assert kv_bytes.this_run.startswith("3 of 4 compressed caches")
    assert "and 1 of 2 FullKV caches" in kv_bytes.this_run
    assert kv_bytes.this_run.endswith("e.g. sparsemm B = 16, doc 1: 1025 reported, 1024 expected")


def test_without_sparsemm_only_the_bytes_are_checked_and_zero_scores_cannot_tell():
    tables = _tables()
    snap = AllocationTables(*(t[t.method == "snapkv"].reset_index(drop=True) for t in (tables.budgets, tables.saturation, tables.cache_bytes)))
    (only,) = _findings(snap)
    assert only.claim == "the cache holds exactly the analytic KV bytes" and only.holds is True
    concentration = _findings(scores=np.zeros((1, 4)))[0]
    assert concentration.holds is None and "all zero" in concentration.this_run


def test_findings_reject_empty_tables_and_bad_head_dim():
    empty = AllocationTables(*(pd.DataFrame(columns=list(c)) for c in (BUDGETS_COLUMNS, SATURATION_COLUMNS, CACHE_BYTES_COLUMNS)))
    with pytest.raises(InvalidParameterError, match="empty"):
        _findings(empty)
    with pytest.raises(InvalidParameterError, match="head_dim"):
        step04.findings(_tables(), SCORES, head_dim=0, dtype=torch.float32)


def test_write_outputs_writes_every_declared_output(tmp_path):
    cfg = step04.Config(run_dir=str(tmp_path), window=8, budgets=[16], methods=["sparsemm", "snapkv"])
    tables = _tables()
    paths = step04.write_outputs(cfg, tables, SCORES, head_dim=HEAD_DIM, dtype=torch.float32)
    assert sorted(paths) == sorted(step04.STEP.output_names)
    assert all(p.parent == tmp_path / "04_allocation" and p.is_file() for p in paths.values())
    pd.testing.assert_frame_equal(step04.BUDGETS.read(tmp_path), tables.budgets)
    pd.testing.assert_frame_equal(step04.SATURATION.read(tmp_path), tables.saturation)
    pd.testing.assert_frame_equal(step04.CACHE_BYTES.read(tmp_path), tables.cache_bytes)
    written = step04.FINDINGS.read(tmp_path)
    expected = findings_frame(_findings())
    assert written["this_run"].tolist() == expected["this_run"].tolist()
    assert written["holds"].tolist() == [True, True, True]
