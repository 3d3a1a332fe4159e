"""A sharded run equals the single-process run byte for byte (issue 23 item 2, docs/design.md
"Sharded runs"): step 05's sweep on the tiny reader over 2 CPU processes of
`python -m sparsemm_utils.pipeline --shard env` started by torchrun; step 03's captures in two shards, merged into the same head_scores.json."""

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
from sparsemm_utils.head_scoring_capture import capture_documents, score_captures
from sparsemm_utils.head_scoring_files import write_head_scores_json
from sparsemm_utils.models import load_model
from sparsemm_utils.page_generator import generate_documents
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.pipeline import step_config
from sparsemm_utils.reader_tasks import ReaderDocSpec
from sparsemm_utils.runs import repo_root
from sparsemm_utils.sharding import MERGED_DIR, Shard, ShardError, shard_folder
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


def _launch(config: Path, run: Path) -> subprocess.CompletedProcess:
    """Step 05 as 2 processes of `--shard env` started by torchrun, which sets RANK / WORLD_SIZE /
    LOCAL_RANK as `accelerate launch --multi_gpu` does (accelerate's own launcher has no multi-process
    CPU mode without MPI)."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sparsemm_utils.pipeline", "--config", str(config), "--run-dir", str(run), "--from", "05", "--to", "05", "--shard", "env"]
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_shard_processes_give_the_single_process_results(tmp_path, one_torch_thread):
    config = _config(tmp_path)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    for run in (sharded, single):
        _upstream(run)
    launched = _launch(config, sharded)
    assert launched.returncode == 0, launched.stdout + launched.stderr
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


@pytest.mark.slow
def test_sharded_head_scoring_captures_give_the_single_process_head_scores(tmp_path, one_torch_thread):
    """Step 03: two shards capture alternate documents (one resumes after losing a capture), in
    batches of 2 where they have them; the merge gives the captures, and so the head_scores.json,
    of a single process at batch 1."""
    loaded = load_model("data/tiny_reader", seed=0)
    documents = generate_documents(ReaderDocSpec().generator_config(seed=2, n_documents=3), progress=False)  # configs/tiny.yaml's pages
    regions = map_documents(documents, loaded.processor, loaded.model_type)
    settings = dict(model_id="data/tiny_reader", max_new_tokens=12, n_samples=3, explorer_samples=1, explorer_tokens=2, top_k=2)
    single = head_scoring.Config(run_dir=str(tmp_path / "single"), **settings)
    sharded = head_scoring.Config(run_dir=str(tmp_path / "sharded"), batch_size=2, **settings)  # shard 0: one batch of 2

    alone = capture_documents(loaded, documents, regions, single, progress=False)
    for index in range(2):
        part = capture_documents(loaded, documents, regions, sharded, progress=False, shard=Shard(index, 2))
        assert [c.doc_id for c in part] == [documents[i]["doc_id"] for i in range(index, 3, 2)]
    first = shard_folder(sharded.shards_dir, Shard(0, 2))
    (first / "2.pkl").unlink()  # a shard killed before its last capture: the merge refuses, a rerun resumes
    with pytest.raises(ShardError, match=r"1 of 3 samples missing \(shard\(s\) 0/2\)"):
        capture_documents(loaded, documents, regions, sharded, progress=False)
    assert {p.name for p in first.glob("*.pkl")} == {"0.pkl"}
    capture_documents(loaded, documents, regions, sharded, progress=False, shard=Shard(0, 2))
    merged = capture_documents(loaded, documents, regions, sharded, progress=False)
    assert (sharded.shards_dir / MERGED_DIR / "1-of-2" / "1.pkl").is_file()

    paths = []
    for name, captures in (("single", alone), ("sharded", merged)):
        result = score_captures(captures, single.match, single.selection, single.top_k)
        assert result.sample_scores.shape == (3, 4, 8) and result.sample_scores.sum() > 0  # the reader reads: heads hit
        paths.append(write_head_scores_json(result.sample_scores, tmp_path / f"{name}.json"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert [c.tokens.text for c in merged] == [c.tokens.text for c in alone]

    other = head_scoring.Config(run_dir=str(tmp_path / "sharded"), **{**settings, "max_new_tokens": 8})
    capture_documents(loaded, documents, regions, other, progress=False, shard=Shard(0, 1))
    with pytest.raises(ShardError, match="made with settings"):
        capture_documents(loaded, documents, regions, sharded, progress=False, shard=Shard(0, 1))
