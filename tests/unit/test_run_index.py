"""The run's front page (sparsemm_utils.run_index): headline findings, links, figures with captions."""

from __future__ import annotations

from pathlib import Path

from sparsemm_utils.artifacts import Artifact, StepSpec
from sparsemm_utils.findings import Finding, findings_frame
from sparsemm_utils.manifest import Manifest
from sparsemm_utils.run_index import PAPERS, step_figures, write_index

FIG_B = Artifact("01_a", "fig_b.png", "the second figure, declared first")
FIG_A = Artifact("01_a", "fig_a.png", "the first figure")
STEP_A = StepSpec("01_a", "step a", outputs=(FIG_B, FIG_A))
STEP_B = StepSpec("02_b", "step b")


def _finished(run: Path) -> None:
    folder = run / "01_a"
    folder.mkdir(parents=True)
    for name in ("fig_a.png", "fig_b.png", "undeclared.png"):
        (folder / name).write_bytes(b"png")
    Manifest(step="01_a", title="step a", status="ok", params={}, inputs=[], html="01_a.html", notebook="01_a.ipynb",
             finished_at="2026-12-07T00:00:00+00:00", seconds=1.5, device="cpu").write(folder)
    findings_frame(
        [
            Finding("01_a", "headline claim", "0.77 (paper)", "0.81 of 270 heads", 270, True, headline=True),
            Finding("01_a", "minor claim", "n/a", "3 of 4", 4, None),
        ]
    ).to_csv(folder / "findings.csv", index=False)


def test_figures_follow_the_declared_order_with_captions(tmp_path):
    _finished(tmp_path)
    assert step_figures(STEP_A, tmp_path / "01_a") == [
        ("fig_b.png", "the second figure, declared first"),
        ("fig_a.png", "the first figure"),
        ("undeclared.png", ""),
    ]


def test_the_front_page_leads_with_the_headline_findings(tmp_path):
    _finished(tmp_path)
    page = write_index(tmp_path, [STEP_A, STEP_B]).read_text()
    summary = page.index("What this run found")
    assert summary < page.index("<section id='01_a'>")
    head = page[summary : page.index("<section id='01_a'>")]
    assert "headline claim" in head and "0.81 of 270 heads" in head and "minor claim" not in head
    assert "minor claim" in page and "cannot tell" in page
    assert all(url in page for _, url in PAPERS)
    assert "README.md" in page and "docs/method.md" in page and "notebooks/exercises" in page
    assert page.index("fig_b.png") < page.index("fig_a.png")
    assert "<figcaption>the first figure</figcaption>" in page
    assert "not run yet" in page[page.index("<section id='02_b'>") :]
