"""``<run>/index.html``: the run's front page.

What a reader opening a finished run needs first: what this run found (the headline findings of
every step, each with this run's value and n beside the paper's, and its verdict), where the
study comes from (the papers, the README, the method, the notebooks and exercises), then each
step in the study's order with its status, timings, links (executed notebook, HTML export,
manifest), its findings and its figures with captions, in the order the step declares them.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .findings import FindingsError, read_findings, verdict
from .manifest import MANIFEST_NAME, Manifest
from .runs import repo_root

__all__ = ["PAPERS", "write_index", "step_figures"]

#: The studies this repository reproduces.
PAPERS: tuple[tuple[str, str], ...] = (
    ("SparseMM (arXiv 2506.05344)", "https://arxiv.org/abs/2506.05344"),
    ("LLaVA-Mini (arXiv 2501.03895)", "https://arxiv.org/abs/2501.03895"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 78rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.4; }
nav a { margin-right: 1rem; }
section { border-top: 1px solid #ccc; padding: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .9em; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
.ok, .holds { color: #1a7f37; } .failed, .missing, .does-not-hold { color: #cf222e; } .cannot-tell, .running { color: #9a6700; }
.meta { color: #555; font-size: .85em; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(30rem, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #333; }
pre.error { white-space: pre-wrap; background: #fff0f0; padding: .5rem; }
"""


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def step_figures(step: Any, folder: Path) -> list[tuple[str, str]]:
    """``(file name, caption)`` of the step's figures: the ``.png`` outputs it declares, in their
    order, with their descriptions; figures it does not declare follow, sorted, without caption."""
    declared = [(a.name, a.description) for a in getattr(step, "outputs", ()) if str(getattr(a, "name", "")).endswith(".png")]
    names = {n for n, _ in declared}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png") if p.relative_to(folder).as_posix() not in names)
    return [(n, c) for n, c in declared if (folder / n).is_file()] + [(n, "") for n in extra]


def _findings(folder: Path) -> pd.DataFrame | None:
    path = folder / "findings.csv"
    if not path.is_file():
        return None
    try:
        return read_findings(path)
    except (FindingsError, ValueError):
        return None


def _findings_table(frame: pd.DataFrame, *, with_step: bool) -> str:
    esc = html.escape
    head = "<tr>" + ("<th>step</th>" if with_step else "") + "<th>claim</th><th>this run</th><th>n</th><th>paper</th><th>verdict</th></tr>"
    rows = []
    for r in frame.itertuples(index=False):
        v = verdict(r.holds)
        rows.append(
            "<tr>" + (f"<td>{esc(r.step)}</td>" if with_step else "")
            + f"<td>{esc(r.claim)}</td><td>{esc(r.this_run)}</td><td>{int(r.n)}</td><td>{esc(r.paper)}</td>"
            + f"<td class='{v.replace(' ', '-')}'>{esc(v)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def write_index(run: Path, steps: Sequence[Any], config: Any = None) -> Path:
    """Write ``<run>/index.html`` (module docstring) and return its path."""
    esc = html.escape
    root = repo_root()
    headline, sections = [], []
    for step in steps:
        folder = run / step.name
        manifest = Manifest.read(folder)
        if manifest is None:
            sections.append(
                f"<section id='{esc(step.name)}'><h2>{esc(step.name)}</h2><p>{esc(step.title)}</p>"
                "<p class='missing'>not run yet</p></section>"
            )
            continue
        links = []
        if manifest.html:
            links.append(f"<a href='{esc(step.name)}/{esc(manifest.html)}'>notebook (HTML)</a>")
        if manifest.notebook:
            links.append(f"<a href='{esc(step.name)}/{esc(manifest.notebook)}'>notebook (.ipynb)</a>")
        links.append(f"<a href='{esc(step.name)}/{MANIFEST_NAME}'>manifest</a>")
        findings = _findings(folder) if manifest.status == "ok" else None
        table = ""
        if findings is not None and not findings.empty:
            headline.append(findings[findings["headline"]])
            table = "<h3>Findings</h3>" + _findings_table(findings, with_step=False)
        figures = "".join(
            f"<figure><a href='{esc(step.name)}/{esc(name)}'><img src='{esc(step.name)}/{esc(name)}' alt='{esc(caption or name)}' "
            f"loading='lazy'></a><figcaption>{esc(caption or name)}</figcaption></figure>"
            for name, caption in step_figures(step, folder)
        )
        status = esc(manifest.status)
        error = f"<pre class='error'>{esc(manifest.error)}</pre>" if manifest.error else ""
        sections.append(
            f"<section id='{esc(step.name)}'><h2>{esc(step.name)} <span class='{status}'>{status}</span></h2>"
            f"<p>{esc(step.title)}</p><p>{' · '.join(links)}</p>"
            f"<p class='meta'>finished {esc(manifest.finished_at)} in {manifest.seconds:.1f} s on {esc(manifest.device)}; "
            f"commit {esc(manifest.git_commit)}</p>{error}{table}<div class='figs'>{figures}</div></section>"
        )
    nav = [f"<a href='{esc(url)}'>{esc(name)}</a>" for name, url in PAPERS]
    for label, path in (
        ("README", root / "README.md"),
        ("the method (docs/method.md)", root / "docs" / "method.md"),
        ("notebooks", root / "notebooks"),
        ("exercises", root / "notebooks" / "exercises"),
    ):
        nav.append(f"<a href='{esc(_rel(path, run))}'>{esc(label)}</a>")
    if headline:
        top = pd.concat(headline, ignore_index=True)
        summary = "<h2>What this run found</h2>" + _findings_table(top, with_step=True) if not top.empty else ""
    else:
        summary = "<p class='missing'>No findings yet: the steps have not run.</p>"
    name = esc(getattr(config, "name", "") or run.name)
    description = f"<p>{esc(config.description)}</p>" if config is not None and getattr(config, "description", "") else ""
    contents = " · ".join(f"<a href='#{esc(s.name)}'>{esc(s.name)}</a>" for s in steps)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SparseMM reproduction run: {name}</title>
<style>{_STYLE}</style></head><body>
<h1>SparseMM reproduction run: {name}</h1>{description}
<nav>{''.join(nav)}</nav>
{summary}
<p class='meta'>Steps: {contents}. Each step folder holds its <code>manifest.json</code> (parameters, input and
output sha256, package versions, device, timings); written by <code>python -m sparsemm_utils.pipeline</code>.</p>
{''.join(sections)}
</body></html>
"""
    path = run / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
