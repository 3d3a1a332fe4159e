"""Step 07's declarations (docs/method.md §8): the notebook's Config, the tables and findings
written by write_outputs, and LLaVA-Mini's findings on tables worked out by hand. No model, no
notebook."""

from __future__ import annotations

import pandas as pd
import pytest

from sparsemm_utils import token_categories as tc
from sparsemm_utils.findings import FINDINGS_COLUMNS
from sparsemm_utils.steps import attention_by_layer as step
from sparsemm_utils.steps import ocr_annotation, patch_mapping

N_PAGES = 3


def _category_table(rv=(0.4, 0.3, 0.1, 0.05), ri=(0.5, 0.6, 0.8, 0.9), pages=N_PAGES) -> pd.DataFrame:
    """4 layers: response->vision ``rv[l]``, response->instruction ``ri[l]``, every other pair 0.1;
    entropy 1 nat against a uniform 2 nats everywhere."""
    rows = []
    for layer in range(4):
        for t in tc.CATEGORIES:
            for s in tc.CATEGORIES:
                value = {("response", "vision"): rv[layer], ("response", "instruction"): ri[layer]}.get((t, s), 0.1)
                rows.append({"layer": layer, "target": t, "source": s, "attention": value, "entropy": 1.0,
                             "max_entropy": 2.0, "std": 0.0, "n_samples": pages})
    return pd.DataFrame(rows)


# the ablation: char accuracy 0.9 without a drop, 0.1 with layer 0 dropped, 0.85 with layer 3 dropped
DROP = pd.DataFrame(
    [
        {"reading": "none", "layer_range": "none", "first_layer": -1, "task": "all", "char_accuracy": 0.9, "n": 8},
        {"reading": "inside", "layer_range": "0-0", "first_layer": 0, "task": "all", "char_accuracy": 0.1, "n": 8},
        {"reading": "inside", "layer_range": "3-3", "first_layer": 3, "task": "all", "char_accuracy": 0.85, "n": 8},
        # per-task rows are not read when "all" rows exist
        {"reading": "none", "layer_range": "none", "first_layer": -1, "task": "ocr", "char_accuracy": 0.0, "n": 3},
    ]
)
# head view: shares 0.1 .. 0.4, scores in the same order except the first two swapped:
# ranks (1, 2, 3, 4) vs (2, 1, 3, 4): d = (1, -1, 0, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8
HEADS = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                      "vision_share": [0.1, 0.2, 0.3, 0.4], "visual_score": [0.2, 0.1, 0.3, 0.4]})
FASTV = pd.DataFrame({"method": ["fastv"], "k": [2], "ratio": [0.5], "task": ["all"], "exact_match": [0.5],
                      "char_accuracy": [0.7], "n": [8], "kv_fraction": [0.9]})


def test_step_declares_its_inputs_and_outputs():
    assert step.STEP.name == "07_attention_by_layer"
    assert step.STEP.needs == ("01_ocr_annotation", "02_patch_mapping", "03_head_scoring")
    assert step.STEP.inputs[:2] == (ocr_annotation.DOCUMENTS, patch_mapping.REGIONS)
    tables = ["category_attention.csv", "entropy.csv", "head_vision_share.csv", "vision_drop.csv", "fastv.csv", "findings.csv"]
    assert list(step.STEP.output_names[:6]) == tables
    assert all(name.startswith("fig_") and name.endswith(".png") for name in step.STEP.output_names[6:])
    assert step.STEP.notebook_path().is_file()


def test_config_validation():
    cfg = step.Config(tasks=["ocr"], readings=["from"], fastv_ratios=[0, 0.5])
    assert cfg.tasks == ("ocr",) and cfg.readings == ("from",) and cfg.fastv_ratios == (0.0, 0.5)
    with pytest.raises(tc.LayerAnalysisError, match="tasks"):
        step.Config(tasks=["translate"])
    with pytest.raises(tc.LayerAnalysisError, match="tasks"):
        step.Config(tasks=[])
    with pytest.raises(tc.LayerAnalysisError, match="readings"):
        step.Config(readings=["before"])
    with pytest.raises(tc.LayerAnalysisError, match="n_samples"):
        step.Config(n_samples=0)
    with pytest.raises(tc.LayerAnalysisError, match="threads"):
        step.Config(threads=1.5)
    with pytest.raises(tc.LayerAnalysisError, match="fastv_ratios"):
        step.Config(fastv_ratios=[1.5])
    with pytest.raises(tc.LayerAnalysisError, match="model_id"):
        step.Config(model_id="")
    with pytest.raises(tc.LayerAnalysisError, match="device"):
        step.Config(device="")


def test_findings_read_the_numbers():
    table = _category_table()
    out = step.findings(table, table, DROP, HEADS)
    assert [f.holds for f in out] == [True, True, False, True, True]
    assert {f.step for f in out} == {"07_attention_by_layer"}
    assert "0.400 (layer 0) vs 0.050 (layer 3)" in out[0].this_run
    assert "0.900 in layer 3" in out[1].this_run
    assert "entropy / uniform 0.500 (layer 0) vs 0.500 (layer 3)" in out[2].this_run  # equal: does not hold
    assert "char accuracy 0.900 with no drop; 0.100 with layers 0-0 dropped; 0.850 with layers 3-3" in out[3].this_run
    assert "rho(vision share, visual score) = 0.800 over 4 heads" in out[4].this_run and "L1H1 ranks #1" in out[4].this_run
    # n: pages for the attention findings, questions of a condition for the ablation, heads for the join
    assert [f.n for f in out] == [N_PAGES, N_PAGES, N_PAGES, 8, 4]
    assert [f.headline for f in out] == [False, False, False, True, True]


def test_findings_flip_with_the_numbers():
    # vision attention rising with depth, response->instruction under 80% late: both fail
    table = _category_table(rv=(0.05, 0.1, 0.3, 0.4), ri=(0.9, 0.8, 0.6, 0.5))
    out = step.findings(table, table)
    assert [f.holds for f in out] == [False, False, False]
    assert len(out) == 3  # no ablation, no head view: those findings are left out
    # n is the fewest pages behind any layer compared
    fewer = table.copy()
    fewer.loc[(fewer["layer"] == 3) & (fewer["target"] == "response") & (fewer["source"] == "vision"), "n_samples"] = 1
    assert step.findings(fewer, fewer)[0].n == 1


def test_findings_cannot_tell():
    table = _category_table()
    # a model that cannot read at all, and step 03 without any visual head
    blind = DROP.assign(char_accuracy=0.0)
    flat = HEADS.assign(visual_score=0.0)
    out = step.findings(table, table, blind, flat)
    assert out[3].holds is None and out[4].holds is None
    assert "every visual score is 0" in out[4].this_run
    # no visual scores at all (step 03 not joined): no join finding
    assert len(step.findings(table, table, DROP, HEADS.assign(visual_score=float("nan")))) == 4
    # Eq. 4 undefined for response rows (no response generated)
    empty = table.assign(attention=float("nan"))
    assert step.findings(empty, table)[0].holds is None and step.findings(empty, table)[1].holds is None


def test_findings_name_missing_columns():
    table = _category_table()
    with pytest.raises(tc.LayerAnalysisError, match=r"category_attention lacks the columns \['n_samples'\]"):
        step.findings(table.drop(columns="n_samples"), table)
    with pytest.raises(tc.LayerAnalysisError, match=r"vision_drop lacks the columns \['n'\]"):
        step.findings(table, table, DROP.drop(columns="n"))


def test_write_outputs_writes_every_table_and_the_findings(tmp_path):
    table = _category_table()
    heads = HEADS.assign(visual_score=[0.2, 0.1, 0.3, 0.4])
    written = step.write_outputs(
        tmp_path, category_attention=table, entropy=table, head_vision_share=heads, vision_drop=DROP, fastv=FASTV
    )
    tables = {step.CATEGORY_ATTENTION: table, step.ENTROPY: table, step.HEAD_VISION_SHARE: heads,
              step.VISION_DROP: DROP, step.FASTV: FASTV}
    for artifact, frame in tables.items():
        assert written[artifact.name] == artifact.path(tmp_path)
        pd.testing.assert_frame_equal(artifact.read(tmp_path), frame, check_dtype=False)
    found = step.FINDINGS.read(tmp_path)
    assert list(found.columns) == list(FINDINGS_COLUMNS)
    assert found["holds"].tolist() == [True, True, False, True, True]
    assert found["n"].tolist() == [N_PAGES, N_PAGES, N_PAGES, 8, 4]
    assert sorted(p.name for p in (tmp_path / "07_attention_by_layer").iterdir()) == sorted(written)
    with pytest.raises(tc.LayerAnalysisError, match="fastv must be a DataFrame"):
        step.write_outputs(tmp_path, category_attention=table, entropy=table, head_vision_share=heads,
                           vision_drop=DROP, fastv=None)
