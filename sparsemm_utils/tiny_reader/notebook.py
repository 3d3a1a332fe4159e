"""What notebook ``00_tiny_reader`` needs from the package: its step name, its parameters
(:class:`ReaderNotebookConfig`) and a saved reader's training logs as tables
(:func:`training_logs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sparsemm_utils.runs import repo_root, resolve_run_dir
from sparsemm_utils.tiny_reader.config import DEFAULT_READER_DIR, TrainConfigError
from sparsemm_utils.tiny_reader.training import PREVIOUS_STAGE_DIR, TRAIN_LOG, VALIDATION_LOG
from sparsemm_utils.validate import check_int

__all__ = ["STEP", "ReaderNotebookConfig", "training_logs"]

STEP = "00_tiny_reader"


@dataclass
class ReaderNotebookConfig:
    """Parameters of notebook ``00_tiny_reader``.

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
    - ``n_eval_docs``: held-out pages read greedily (3 questions each);
    - ``n_sample_docs``: pages shown in the figures."""

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
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
            return resolve_run_dir(self.run_dir) / STEP / "reader"
        if self.model_id.startswith("tiny-random/"):
            return DEFAULT_READER_DIR
        path = Path(self.model_id)
        return path if path.is_absolute() else repo_root() / path


def training_logs(reader_dir: str | Path):
    """``(training_log, validation_log)`` of a saved reader as DataFrames, every training stage
    included (``training/`` and, oldest first, ``training/previous_stage/...``): ``step`` and
    ``elapsed`` continue across stages and a ``stage`` column (1, 2, ...) tells them apart. The
    validation log is ``None`` when no stage recorded one."""
    folders = []
    folder = Path(reader_dir) / "training"
    while (folder / TRAIN_LOG).is_file():
        folders.append(folder)
        folder = folder / PREVIOUS_STAGE_DIR
    if not folders:
        raise FileNotFoundError(
            f"{Path(reader_dir) / 'training' / TRAIN_LOG} is missing: this reader was not saved by save_reader with its work folder"
        )
    logs, vals = [], []
    step0, elapsed0 = 0, 0.0
    for stage, folder in enumerate(reversed(folders), start=1):
        log = pd.read_csv(folder / TRAIN_LOG)
        log["stage"] = stage
        log["step"] += step0
        log["elapsed"] += elapsed0
        if (folder / VALIDATION_LOG).is_file():
            val = pd.read_csv(folder / VALIDATION_LOG)
            val["stage"] = stage
            val["step"] += step0
            vals.append(val)
        logs.append(log)
        step0, elapsed0 = int(log["step"].iloc[-1]) + 1, float(log["elapsed"].iloc[-1])
    return pd.concat(logs, ignore_index=True), (pd.concat(vals, ignore_index=True) if vals else None)
