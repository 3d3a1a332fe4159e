"""Shards of a step's samples (issue 23 item 2, sparsemm_utils.sharding): which positions a shard
owns, the item folders a shard fills and resumes, and the merge's checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsemm_utils import pipeline
from sparsemm_utils.sharding import (
    MERGED_DIR,
    SETTINGS_FILE,
    SHARDS_DIR,
    Shard,
    ShardError,
    load_item,
    merge_items,
    open_shard,
    save_item,
    shard_folder,
    shard_folders,
)

SETTINGS = {"model": "m", "max_new_tokens": 4}


@given(st.integers(1, 9), st.integers(0, 60))
def test_every_position_has_exactly_one_owner(count, n):
    owners = [[i for i in range(count) if Shard(i, count).owns(k)] for k in range(n)]
    assert all(len(o) == 1 for o in owners)


def _fill(parent, count, n, settings=SETTINGS):
    for index in range(count):
        folder = open_shard(parent, Shard(index, count), settings)
        for k in range(index, n, count):
            save_item(folder, k, {"position": k})


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_merge_returns_the_items_in_position_order_and_retires_the_shards(tmp_path, count):
    _fill(tmp_path, count, 7)
    assert merge_items(tmp_path, 7, SETTINGS) == [{"position": k} for k in range(7)]
    assert not (tmp_path / SHARDS_DIR).exists() and (tmp_path / MERGED_DIR / f"0-of-{count}" / SETTINGS_FILE).is_file()
    assert merge_items(tmp_path, 7, SETTINGS) is None  # nothing left to merge: the step runs as usual


def test_a_shard_resumes_where_it_stopped(tmp_path):
    folder = open_shard(tmp_path, Shard(1, 2), SETTINGS)
    save_item(folder, 1, "one")
    assert load_item(folder, 1) == "one" and load_item(folder, 3) is None
    assert open_shard(tmp_path, Shard(1, 2), SETTINGS) == folder  # same settings: the same folder, kept
    assert load_item(folder, 1) == "one" and not list(folder.glob("*.partial"))


def test_the_merge_refuses_what_a_single_process_would_not_give(tmp_path):
    _fill(tmp_path, 2, 5)
    (shard_folder(tmp_path, Shard(1, 2)) / "3.pkl").unlink()
    with pytest.raises(ShardError, match=r"incomplete: 1 of 5 samples missing \(shard\(s\) 1/2\); rerun each"):
        merge_items(tmp_path, 5, SETTINGS)
    save_item(shard_folder(tmp_path, Shard(0, 2)), 3, "stray")
    with pytest.raises(ShardError, match="position 3 is not one of shard 0/2's .* the shards overlap"):
        merge_items(tmp_path, 5, SETTINGS)
    (shard_folder(tmp_path, Shard(0, 2)) / "3.pkl").unlink()
    save_item(shard_folder(tmp_path, Shard(1, 2)), 3, {"position": 3})
    with pytest.raises(ShardError, match=r"made with settings \{'max_new_tokens': 4, 'model': 'm'\}; this run is shard 0/2 with"):
        merge_items(tmp_path, 5, {**SETTINGS, "max_new_tokens": 8})
    assert len(merge_items(tmp_path, 5, SETTINGS)) == 5


def test_shard_folders_must_be_one_complete_set(tmp_path):
    assert shard_folders(tmp_path) == {}
    _fill(tmp_path, 3, 6)
    (tmp_path / SHARDS_DIR / "2-of-3").rename(tmp_path / "away")
    with pytest.raises(ShardError, match=r"lacks shard\(s\) 2/3 of 3: run them \(`python -m sparsemm_utils.pipeline ... --shard 2/3`\)"):
        shard_folders(tmp_path)
    (tmp_path / SHARDS_DIR / "notes.txt").write_text("x")
    with pytest.raises(ShardError, match="is not a shard folder"):
        shard_folders(tmp_path)


def test_pipeline_shard_command_errors(tmp_path, capsys):
    base = ["--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run")]
    assert pipeline.main([*base, "--shard", "0/2", "--to", "02"]) == 1
    assert "--shard runs only the steps ['03_head_scoring', '05_eval']" in capsys.readouterr().err
    assert pipeline.main([*base, "--shard", "2/2", "--from", "05", "--to", "05"]) == 1
    assert "shard index must be an int >= 0 and <= 1, got 2" in capsys.readouterr().err
    assert pipeline.main([*base, "--shard", "0/2", "--from", "05", "--to", "05"]) == 1
    assert "missing visual head scores" in capsys.readouterr().err  # step 03 must have run (merged)
    assert pipeline.main([*base, "--shard", "0/2", "--force"]) == 1
    assert "--force and --break-stale-lock do not apply to --shard" in capsys.readouterr().err


def test_the_pipeline_reruns_a_step_whose_shards_wait(tmp_path):
    steps = {step.name: step for step in pipeline.STEPS}
    for name, parent in [("03_head_scoring", tmp_path / ".shards" / "03_head_scoring"), ("05_eval", tmp_path / "05_eval")]:
        assert not pipeline._has_shards(steps[name], tmp_path)
        (parent / SHARDS_DIR).mkdir(parents=True)
        assert pipeline._has_shards(steps[name], tmp_path)
    assert not pipeline._has_shards(steps["04_allocation"], tmp_path)
