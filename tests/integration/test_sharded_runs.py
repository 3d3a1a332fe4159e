"""A sharded run over 2 CPU processes equals the single-process run byte for byte (issue 23 item 2,
docs/design.md "Sharded runs"): step 05's sweep on the tiny reader, each shard a process of
`python -m sparsemm_utils.pipeline --shard`, one of them given its shard as accelerate and torchrun
do (RANK / WORLD_SIZE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sparsemm_utils.evaluation import PREDICTIONS_FILE, RESULTS_FILE, read_predictions
from sparsemm_utils.head_scoring_files import write_head_scores_json
from sparsemm_utils.pipeline import step_config
from sparsemm_utils.runs import repo_root
from sparsemm_utils.sharding import MERGED_DIR
from sparsemm_utils.steps import eval as eval_step
from sparsemm_utils.steps import head_scoring

ROOT = repo_root()


def _config(tmp_path: Path) -> Path:
    """configs/tiny.yaml with a smaller step 05 (11 questions x 3 cells)."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["steps"]["05_eval"].update(methods=["fullkv", "sparsemm", "snapkv"], budgets=[16])
    path = tmp_path / "tiny-shards.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _upstream(run: Path) -> None:
    """Step 03's head scores for the tiny reader (4 layers x 8 heads), the only input of step 05."""
    scores = np.random.default_rng(0).random((3, 4, 8))
    head_scoring.STEP.folder(run, create=True)
    write_head_scores_json(scores, head_scoring.HEAD_SCORES.path(run))


def _shard(config: Path, run: Path, spec: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environ = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "sparsemm_utils.pipeline", "--config", str(config), "--run-dir", str(run), "--from", "05", "--to", "05", "--shard", spec]
    return subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_shard_processes_give_the_single_process_results(tmp_path, one_torch_thread):
    config = _config(tmp_path)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    for run in (sharded, single):
        _upstream(run)
    processes = [_shard(config, sharded, "0/2"), _shard(config, sharded, "env", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    for index in range(2):
        records, _ = read_predictions(eval_step.STEP.folder(sharded) / "shards" / f"{index}-of-2")
        assert {int(r["sample_id"]) % 2 for r in records} == {index}  # the reader's ids are row numbers 0..10
    merged = eval_step.sweep(step_config(eval_step.STEP, config, sharded), progress=False, log=None)
    assert merged.generated == 0 and merged.reused == 11 * 3
    alone = eval_step.sweep(step_config(eval_step.STEP, config, single), progress=False, log=None)
    assert alone.generated == 11 * 3
    out_sharded, out_single = eval_step.STEP.folder(sharded), eval_step.STEP.folder(single)
    assert (out_sharded / RESULTS_FILE).read_bytes() == (out_single / RESULTS_FILE).read_bytes()
    strip = lambda path: [{k: v for k, v in r.items() if k != "seconds"} for r in read_predictions(path)[0]]
    assert strip(out_sharded / PREDICTIONS_FILE) == strip(out_single / PREDICTIONS_FILE)
    assert (out_sharded / MERGED_DIR / "1-of-2").is_dir()
    assert json.loads((out_sharded / "sweep.json").read_text()) == json.loads((out_single / "sweep.json").read_text())
