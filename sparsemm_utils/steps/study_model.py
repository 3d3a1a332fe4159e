"""Step 00, the study model: the offline study's MLLM, shown, measured against its targets.

Notebook ``00_study_model`` stands outside the chain (no step reads its folder). It shows what
the study model is (a LLaVA-NeXT on the pretrained SmolLM2-135M-Instruct, :mod:`sparsemm_utils.study_model`),
how its vision front end was aligned to the language model's own character embeddings, how it
trained (the logs in ``data/study_model/``), reads validation pages with it, and sets what was
measured beside the targets the project set for it (issue 20's, not the paper's): training time
and shipped size, FullKV accuracy, and the recipes tried (``recipes.json``).

Here: :data:`STEP`, :class:`Config` (the notebook's parameters), :func:`write_outputs` and
:func:`findings`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import Artifact, StepSpec
from ..findings import Finding, findings_frame, read_findings
from ..metrics import anls
from ..parameters import MAX_DOCUMENTS, check_allow_large, check_size
from ..reader_tasks import TASK_TYPES
from ..runs import repo_root
from ..study_model.assemble import ASSEMBLED_DIR, PARTS_DIR, RECIPES_FILE, TRAINED_FILE, VALIDATION_FILE
from ..tiny_reader.accuracy import summarize_records
from ..validate import check_int

__all__ = [
    "NAME",
    "STEP",
    "READING",
    "FINDINGS",
    "FIG_ALIGNMENT",
    "FIG_TRAINING",
    "FIG_ANSWERS",
    "TARGET_MINUTES",
    "TARGET_MEGABYTES",
    "TARGET_ANLS",
    "TARGET_TOP10",
    "TARGET_TOP5",
    "StudyModelStepError",
    "Config",
    "reading_summary",
    "write_outputs",
    "findings",
]

NAME = "00_study_model"

#: The project's targets for the study model (issue 20), not the paper's.
TARGET_MINUTES = 90.0
TARGET_MEGABYTES = 20.0
TARGET_ANLS = 0.85
TARGET_TOP10 = 0.60
TARGET_TOP5 = 0.40


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


READING: Artifact[dict[str, Any]] = Artifact(
    NAME, "reading.json", "the study model's greedy answers on validation pages (summary per task, every record)", reader=_read_json
)
FINDINGS: Artifact = Artifact(NAME, "findings.csv", "the study model against the project's targets", reader=read_findings)
FIG_ALIGNMENT = Artifact(NAME, "fig_alignment.png", "figure: each glyph cell's projected feature against the language model's own character embeddings")
FIG_TRAINING = Artifact(NAME, "fig_training.png", "figure: the two training stages, loss and accuracy per step")
FIG_ANSWERS = Artifact(NAME, "fig_answers.png", "figure: validation pages and the model's answers, the wrong ones first")

STEP = StepSpec(
    NAME,
    "The study model: LLaVA-NeXT on SmolLM2-135M, its front end trained here (outside the chain)",
    inputs=(),
    outputs=(READING, FINDINGS, FIG_ALIGNMENT, FIG_TRAINING, FIG_ANSWERS),
)


class StudyModelStepError(ValueError):
    """The notebook's parameters or the parts' records are invalid."""


@dataclass
class Config:
    """Parameters of notebook 00_study_model (validated in ``__post_init__``).

    ``parts_dir``: the trained parts (``data/study_model``); ``model_id``: the assembled model
    (``build/study_model``, made from the parts when missing or stale); ``n_pages``: validation
    pages read in the notebook (3 questions each at most); ``threads``: torch threads;
    ``allow_large``: lift the bound on ``n_pages``."""

    run_dir: str = "runs/study"
    parts_dir: str = str(PARTS_DIR)
    model_id: str = str(ASSEMBLED_DIR)
    n_pages: int = 12
    threads: int = 2
    allow_large: bool = False

    def __post_init__(self) -> None:
        for name in ("run_dir", "parts_dir", "model_id"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise StudyModelStepError(f"{name} must be a non-empty path, got {value!r}")
        large = check_allow_large(self.allow_large, error=StudyModelStepError)
        self.n_pages = check_size("n_pages", self.n_pages, MAX_DOCUMENTS, allow_large=large, error=StudyModelStepError)
        check_int("threads", self.threads, 1, error=StudyModelStepError)

    def parts(self) -> Path:
        path = Path(self.parts_dir)
        return path if path.is_absolute() else repo_root() / path


def _records(parts: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    validation = parts / VALIDATION_FILE
    if not validation.is_file():
        raise StudyModelStepError(f"{validation} is missing: {parts} holds no trained study model (train one first)")
    recipes = parts / RECIPES_FILE
    return _read_json(validation), (_read_json(recipes) if recipes.is_file() else [])


def reading_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task and ``"all"``: ``n``, ``anls`` (docs/method.md §6, as step 05 scores the
    benchmark), ``exact_match`` and ``char_accuracy``
    (:func:`~sparsemm_utils.tiny_reader.accuracy.summarize_records`)."""
    summary = summarize_records(records)
    for task, row in summary.items():
        rows = [r for r in records if task == "all" or r["task"] == task]
        row["anls"] = float(np.mean([anls(r["prediction"], [r["answer"]]) for r in rows]))
    return summary


def findings(reading: Mapping[str, Any], training: Mapping[str, Any], recipes: Sequence[Mapping[str, Any]], megabytes: float) -> list[Finding]:
    """The study model against the project's targets: training time and shipped size; FullKV ANLS
    of this notebook's validation reading (``reading["summary"]``: :func:`reading_summary`); and, for the shipped recipe (the last row of
    ``recipes``), the concentration of its visual heads and FullKV ANLS on validation pages."""
    out = [
        Finding(
            NAME, "One training command fits the 2-core machine's budget",
            f"project target: at most {TARGET_MINUTES:.0f} minutes (issue 20; the paper trains nothing)",
            f"{training['training_minutes']:.1f} minutes ({training['alignment_minutes']:.1f} alignment + "
            f"{training['task_minutes']:.1f} tasks) on {training['machine']}",
            1, training["training_minutes"] <= TARGET_MINUTES, headline=True,
        ),
        Finding(
            NAME, "The trained parts ship small",
            f"project target: under {TARGET_MEGABYTES:.0f} MB in data/ (issue 20)",
            f"{megabytes:.1f} MB ({TRAINED_FILE})", 1, megabytes < TARGET_MEGABYTES,
        ),
    ]  # fmt: skip
    summary = reading["summary"]
    tasks = ", ".join(f"{t} {summary[t]['anls']:.3f}" for t in TASK_TYPES if t in summary)
    anls = summary["all"]["anls"]
    out.append(
        Finding(
            NAME, "The study model reads with the full cache",
            f"project target: FullKV ANLS at least {TARGET_ANLS} on the study benchmark (issue 20); the paper's models "
            "score 0.685-0.94 ANLS on DocVQA (docs/method.md §6)",
            f"ANLS {anls:.3f} on this notebook's validation pages ({tasks}); step 05 measures the benchmark",
            int(summary["all"]["n"]), anls >= TARGET_ANLS, headline=True,
        )
    )  # fmt: skip
    if recipes:
        shipped = recipes[-1]
        heads = shipped["heads"]
        out.append(
            Finding(
                NAME, "Visual heads are sparse in the shipped recipe (validation pages)",
                f"paper: ~55% / ~77% for the top 5% / 10% of heads (LLaVA-NeXT-Vicuna-7B, docs/method.md §4); project target "
                f"{TARGET_TOP5:.0%} / {TARGET_TOP10:.0%}",
                f"top 5% hold {heads['top5_share']:.1%}, top 10% {heads['top10_share']:.1%} of the score over "
                f"{heads['score_docs']} validation pages; strongest "
                + ", ".join(f"L{l}H{h}" for l, h, _ in heads["top_heads"][:5]),
                int(heads["score_docs"]), heads["top10_share"] >= TARGET_TOP10 and heads["top5_share"] >= TARGET_TOP5,
            )
        )  # fmt: skip
    return out


def write_outputs(cfg: Config, reading: Mapping[str, Any]) -> list[Finding]:
    """Write ``reading.json`` and ``findings.csv`` into ``<run_dir>/00_study_model/``; returns the
    findings (:func:`findings` on this reading and the parts' records)."""
    folder = STEP.folder(cfg.run_dir, create=True)
    parts = cfg.parts()
    training, recipes = _records(parts)
    megabytes = (parts / TRAINED_FILE).stat().st_size / 1e6
    READING.path(cfg.run_dir).write_text(json.dumps(dict(reading), indent=2) + "\n", encoding="utf-8")
    found = findings(reading, training, recipes, megabytes)
    findings_frame(found).to_csv(folder / FINDINGS.name, index=False)
    return found
