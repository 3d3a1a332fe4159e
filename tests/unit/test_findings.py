"""Findings tables (sparsemm_utils.findings)."""

from __future__ import annotations

import pytest

from sparsemm_utils.findings import (
    FINDINGS_COLUMNS,
    Finding,
    FindingsError,
    findings_frame,
    findings_markdown,
    read_findings,
    verdict,
)


def _findings():
    return [
        Finding("03_head_scoring", "top 10% of heads hold most of the score", "77% (LLaVA-NeXT-Vicuna-7B)",
                "top 10% (27 of 270 heads) hold 81.2%", 270, True, headline=True),
        Finding("05_eval", "SparseMM ahead at the lowest budget", "0.638 vs 0.497 (DocVQA, B = 64)",
                "ANLS 0.41 vs 0.44", 312, False),
        Finding("07_attention_by_layer", "late layers ignore vision", ">80% to instruction", "4 layers only", 4, None),
    ]


def test_a_findings_table_round_trips_through_csv(tmp_path):
    frame = findings_frame(_findings())
    assert tuple(frame.columns) == FINDINGS_COLUMNS
    path = tmp_path / "findings.csv"
    frame.to_csv(path, index=False)
    back = read_findings(path)
    assert back["holds"].tolist() == [True, False, None]
    assert back["headline"].tolist() == [True, False, False]
    assert back["n"].tolist() == [270, 312, 4]
    assert back["this_run"].tolist() == frame["this_run"].tolist()


def test_markdown_states_verdict_value_n_and_paper():
    text = findings_markdown(_findings(), title="What this run shows")
    lines = text.splitlines()
    assert lines[0] == "### What this run shows"
    assert lines[2] == (
        "- **top 10% of heads hold most of the score** (holds): top 10% (27 of 270 heads) hold 81.2% (n = 270). "
        "*Paper:* 77% (LLaVA-NeXT-Vicuna-7B)."
    )
    assert "(does not hold)" in lines[3] and "(cannot tell)" in lines[4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"holds": "yes"}, "holds must be"),
        ({"n": -1}, "n must be"),
        ({"n": True}, "n must be"),
        ({"claim": ""}, "claim must be"),
    ],
)
def test_a_malformed_finding_is_refused(kwargs, message):
    base = dict(step="05_eval", claim="c", paper="p", this_run="r", n=1, holds=None)
    with pytest.raises(FindingsError, match=message):
        Finding(**{**base, **kwargs})


def test_an_unknown_verdict_in_a_file_is_refused(tmp_path):
    path = tmp_path / "findings.csv"
    frame = findings_frame(_findings()[:1])
    frame["holds"] = ["maybe"]
    frame.to_csv(path, index=False)
    with pytest.raises(FindingsError, match="unknown verdict 'maybe'"):
        read_findings(path)


def test_verdicts():
    assert [verdict(v) for v in (True, False, None)] == ["holds", "does not hold", "cannot tell"]
