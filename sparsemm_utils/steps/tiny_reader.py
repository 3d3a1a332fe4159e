"""Step 00, the tiny reader: the offline world's model, shown, measured and (optionally) retrained.

Notebook ``00_tiny_reader`` stands outside the chain (no step reads its folder): it shows how the
reader in ``data/tiny_reader`` was trained (its pages and questions, its training logs), reads
held-out pages with it, and sets its measured accuracy beside the targets the project set for it.
The reader itself lives below this module, in :mod:`sparsemm_utils.tiny_reader` (training,
accuracy, model card; docs/tiny_reader.md has the recipe and its history).

Here: :data:`STEP` (no inputs; this notebook's evaluation, findings and figures),
:class:`Config` (the notebook's parameters), :func:`write_outputs` and :func:`findings` (the
reader's exact match per task, character accuracy and training time against the project's
targets, :data:`~sparsemm_utils.tiny_reader.card.TARGET_EXACT`,
:data:`~sparsemm_utils.tiny_reader.card.TARGET_CHARS`,
:data:`~sparsemm_utils.tiny_reader.card.TARGET_MINUTES`: issue 3's, not a paper's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import Artifact, StepSpec
from ..findings import Finding, findings_frame, read_findings
from ..reader_tasks import TASK_TYPES
from ..runs import repo_root
from ..tiny_reader.card import TARGET_CHARS, TARGET_EXACT, TARGET_MINUTES
from ..tiny_reader.config import DEFAULT_READER_DIR, TrainConfigError
from ..tiny_reader.training import training_logs
from ..validate import check_int

__all__ = [
    "NAME",
    "STEP",
    "EVAL_RESULTS",
    "FINDINGS",
    "FIG_SAMPLES",
    "FIG_TRAINING",
    "FIG_ACCURACY",
    "FIG_PREDICTIONS",
    "RETRAINED_READER",
    "Config",
    "ReaderResultsError",
    "model_card_results",
    "write_outputs",
    "findings",
]

NAME = "00_tiny_reader"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


EVAL_RESULTS: Artifact[dict[str, Any]] = Artifact(
    NAME,
    "eval_results.json",
    "the reader's greedy answers to held-out questions (summary per task, every record, seconds)",
    reader=_read_json,
)
FINDINGS: Artifact = Artifact(
    NAME, "findings.csv", "the reader's accuracy and training time against the project's targets", reader=read_findings
)
FIG_SAMPLES = Artifact(NAME, "fig_samples.png", "figure: training pages and their questions")
FIG_TRAINING = Artifact(NAME, "fig_training.png", "figure: loss and accuracy curves of the training run")
FIG_ACCURACY = Artifact(NAME, "fig_accuracy.png", "figure: accuracy per task, this run's pages beside the model card's")
FIG_PREDICTIONS = Artifact(NAME, "fig_predictions.png", "figure: held-out answers, the wrong ones first")
#: The reader trained by ``retrain=True`` (only then; not a declared output).
RETRAINED_READER = Artifact(NAME, "reader", "a reader retrained by notebook 00 (retrain=True)")

STEP = StepSpec(
    NAME,
    "The tiny reader: a Qwen2-VL trained here to read synthetic documents (outside the chain)",
    inputs=(),
    outputs=(EVAL_RESULTS, FINDINGS, FIG_SAMPLES, FIG_TRAINING, FIG_ACCURACY, FIG_PREDICTIONS),
)

# ---------------------------------------------------------------------------------------- config


@dataclass
class Config:
    """Parameters of notebook ``00_tiny_reader``; the defaults are the offline default run's
    (``configs/tiny.yaml``).

    - ``run_dir``: the run folder (outputs go to ``<run_dir>/00_tiny_reader/``);
    - ``model_id``: the reader to show: a folder written by
      :func:`~sparsemm_utils.tiny_reader.training.save_reader` (the chain's
      ``configs/tiny.yaml`` passes ``data/tiny_reader``; relative paths are taken from the
      repository root); a ``tiny-random/...`` id has no reader behind it, so the shipped one
      (:data:`~sparsemm_utils.tiny_reader.config.DEFAULT_READER_DIR`) is shown instead;
    - ``seed``: the seed of a retraining run (``retrain=True``);
    - ``retrain``: train a new reader into ``<run_dir>/00_tiny_reader/reader`` instead of loading
      one (``train_steps`` steps of the shipped recipe,
      :class:`~sparsemm_utils.tiny_reader.config.TrainConfig`'s defaults; the shipped reader's model
      card says how long its run took);
    - ``n_eval_docs``: held-out pages read greedily (one question per task each page can host);
    - ``n_sample_docs``: pages shown in the figures."""

    run_dir: str = "runs/tiny"
    model_id: str = "data/tiny_reader"
    seed: int = 0
    retrain: bool = False
    train_steps: int = 6500
    n_eval_docs: int = 30
    n_sample_docs: int = 6

    def __post_init__(self) -> None:
        own = type(self).__name__
        for name in ("run_dir", "model_id"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise TrainConfigError(f"{own}.{name} must be a non-empty string")
        if not isinstance(self.retrain, bool):
            raise TrainConfigError(f"{own}.retrain must be True or False, got {self.retrain!r}")
        for name in ("train_steps", "n_eval_docs", "n_sample_docs"):
            setattr(self, name, check_int(f"{own}.{name}", getattr(self, name), 1, error=TrainConfigError))
        self.seed = check_int(f"{own}.seed", self.seed, 0, error=TrainConfigError)
        if not self.retrain and not self.model_id.startswith("tiny-random/"):
            path = Path(self.model_id)
            path = path if path.is_absolute() else repo_root() / path
            if not (path / "config.json").is_file():
                raise TrainConfigError(
                    f"{own}.model_id={self.model_id!r}: no reader checkpoint at {path} (no config.json); pass a folder "
                    "written by `python -m sparsemm_utils.tiny_reader train`, or retrain=True"
                )

    @property
    def reader_dir(self) -> Path:
        """The folder of the reader to load (or to write when ``retrain``)."""
        if self.retrain:
            return RETRAINED_READER.path(self.run_dir)
        if self.model_id.startswith("tiny-random/"):
            return DEFAULT_READER_DIR
        path = Path(self.model_id)
        return path if path.is_absolute() else repo_root() / path


# ---------------------------------------------------------------------------------------- outputs


class ReaderResultsError(ValueError):
    """An evaluation or summary handed to :func:`write_outputs` or :func:`findings` is malformed."""


def model_card_results(reader_dir: str | Path) -> dict[str, Any] | None:
    """The evaluation a reader's model card reports (``training/eval_results.json``, written by
    :func:`~sparsemm_utils.tiny_reader.card.write_model_card`: ``n_docs``, ``seed``, ``command``,
    ``summary``, ``records``), or ``None`` for a reader saved without one (a retrained reader)."""
    path = Path(reader_dir) / "training" / "eval_results.json"
    return _read_json(path) if path.is_file() else None


def _check_summary(summary: Any, what: str) -> None:
    if not isinstance(summary, Mapping) or not summary:
        raise ReaderResultsError(f"{what} must map tasks to their scores (evaluate_reader's summary), got {summary!r}")
    for task, scores in summary.items():
        missing = [k for k in ("n", "exact_match", "char_accuracy") if not isinstance(scores, Mapping) or k not in scores]
        if missing:
            raise ReaderResultsError(f"{what}[{task!r}] lacks {missing} (evaluate_reader's summary has n, exact_match, char_accuracy)")


def write_outputs(run_dir: str | Path, evaluation: Mapping[str, Any], reader_dir: str | Path) -> dict[str, Path]:
    """Write ``eval_results.json`` (``evaluation``'s summary, records and seconds, as returned by
    :func:`~sparsemm_utils.tiny_reader.accuracy.evaluate_reader`) and ``findings.csv`` into
    ``<run_dir>/00_tiny_reader/``. The findings judge the reader in ``reader_dir`` on its model
    card's evaluation when it has one (:func:`model_card_results`), else on ``evaluation``, and on
    the optimizer time of its training logs. Returns the written paths by file name."""
    missing = [k for k in ("summary", "records", "seconds") if k not in evaluation]
    if missing:
        raise ReaderResultsError(f"write_outputs: the evaluation lacks {missing}; pass evaluate_reader's result")
    _check_summary(evaluation["summary"], "evaluation['summary']")
    card = model_card_results(reader_dir)
    if card is not None:
        summary, source = card["summary"], f"the model card's {card['n_docs']} held-out pages"
    else:
        summary, source = evaluation["summary"], "this notebook's held-out pages (the reader has no model card evaluation)"
    log, _ = training_logs(reader_dir)
    found = findings(summary, float(log["elapsed"].iloc[-1]) / 60, len(log), source=source)
    STEP.folder(run_dir, create=True)
    path = EVAL_RESULTS.path(run_dir)
    path.write_text(json.dumps({k: evaluation[k] for k in ("summary", "records", "seconds")}, indent=1) + "\n")
    findings_frame(found).to_csv(FINDINGS.path(run_dir), index=False)
    return {path.name: path, FINDINGS.name: FINDINGS.path(run_dir)}


# ---------------------------------------------------------------------------------------- findings

_TARGETS = "the project's target for the tiny reader (issue 3), not a paper value"


def findings(
    summary: Mapping[str, Mapping[str, float]], training_minutes: float, training_steps: int, *, source: str
) -> list[Finding]:
    """The reader against the project's targets: one finding per task of ``summary`` (exact match
    >= :data:`TARGET_EXACT`, ``n`` questions), one for character accuracy (>=
    :data:`TARGET_CHARS` on every task; ``n`` all questions) and one for the training time
    (<= :data:`TARGET_MINUTES` minutes of optimizer wall time; ``n`` optimizer steps).

    ``summary``: ``{task: {n, exact_match, char_accuracy, ...}, "all": ...}`` (evaluate_reader's);
    ``source`` says where it was measured (e.g. "the model card's 200 held-out pages"). Headlines:
    the task with the lowest exact match (the target that binds) and the training time."""
    _check_summary(summary, "summary")
    if not isinstance(training_minutes, (int, float)) or not training_minutes >= 0:
        raise ReaderResultsError(f"training_minutes must be a number >= 0, got {training_minutes!r}")
    check_int("training_steps", training_steps, 0, error=ReaderResultsError)
    tasks = [t for t in TASK_TYPES if t in summary] + [t for t in summary if t not in TASK_TYPES and t != "all"]
    if not tasks:
        raise ReaderResultsError(f"summary has no task (only {sorted(summary)}); expected some of {list(TASK_TYPES)}")
    worst = min(tasks, key=lambda t: summary[t]["exact_match"])
    out = []
    for task in tasks:
        s = summary[task]
        out.append(
            Finding(
                step=NAME,
                claim=f"the reader answers `{task}` questions exactly",
                paper=f"exact match >= {TARGET_EXACT:.2f} on each task: {_TARGETS}",
                this_run=f"exact match {s['exact_match']:.3f} on {source}",
                n=int(s["n"]),
                holds=bool(s["exact_match"] >= TARGET_EXACT),
                headline=task == worst,
            )
        )
    total = int(summary["all"]["n"]) if "all" in summary else sum(int(summary[t]["n"]) for t in tasks)
    overall = f"; all questions together {summary['all']['char_accuracy']:.4f}" if "all" in summary else ""
    out.append(
        Finding(
            step=NAME,
            claim="the reader gets the characters of its answers right",
            paper=f"character accuracy >= {TARGET_CHARS:.2f} on each task: {_TARGETS}",
            this_run=(
                "character accuracy " + ", ".join(f"{t} {summary[t]['char_accuracy']:.4f}" for t in tasks) + f"{overall} on {source}"
            ),
            n=total,
            holds=all(summary[t]["char_accuracy"] >= TARGET_CHARS for t in tasks),
        )
    )
    out.append(
        Finding(
            step=NAME,
            claim="the reader's training fits the project's time budget",
            paper=f"<= {TARGET_MINUTES} minutes of training: {_TARGETS}",
            this_run=f"{training_minutes:.1f} minutes of optimizer wall time over {training_steps} steps (its training_log.csv)",
            n=training_steps,
            holds=bool(training_minutes <= TARGET_MINUTES),
            headline=True,
        )
    )
    return out
