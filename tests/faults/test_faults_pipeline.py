"""Fault cases of the pipeline's mechanics on the fake chain (docs/faults.md, "Run folder"):
failed reruns, edited or deleted upstream files, kill -9 mid-step, two pipelines on one folder,
stale locks, moved, copied and read-only run folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fake_chain
import pytest

from sparsemm_utils import pipeline as pl
from sparsemm_utils.manifest import Manifest, sha256_file
from sparsemm_utils.runs import LOCK_NAME, MissingUpstreamError, RunLockedError, repo_root, run_lock

pytestmark = pytest.mark.slow

BAD_MODEL = pl.PipelineConfig(name="faults", params={"seed": 0, "model_id": "missing/model"}, steps={"01_make": {"value": 3}})


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (the lock and index aside) -> its bytes."""
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in (LOCK_NAME, "index.html")
    }


# ------------------------------------------------------------------------- atomic steps


def test_a_failed_rerun_keeps_the_previous_good_outputs(fresh_run, run_fake, fake_repo):
    before = (fresh_run / "02_double" / "manifest.json").read_text()
    with pytest.raises(pl.StepFailedError) as info:
        run_fake(BAD_MODEL, fresh_run, from_step="02", to_step="02")
    message = str(info.value)
    assert "FileNotFoundError" in message and "missing/model" in message
    assert "previous good outputs of 02_double are back in place" in message and ".failed/02_double" in message
    assert (fresh_run / "02_double" / "double.txt").read_text() == "6"
    assert (fresh_run / "02_double" / "manifest.json").read_text() == before  # ok, old params
    assert Manifest.read(fresh_run / ".failed" / "02_double").status == "failed"
    assert not (fresh_run / ".previous" / "02_double").exists()
    # downstream is not blocked: step 03's inputs still verify
    pl.step_inputs(fake_chain.STEPS[2], fresh_run, fake_repo, fake_chain.STEPS)


def test_a_failed_first_run_says_so_and_blocks_what_needs_it(tmp_path, run_fake):
    run = tmp_path / "run"
    with pytest.raises(pl.StepFailedError, match="had no earlier successful run; its failed run stays in"):
        run_fake(BAD_MODEL, run, to_step="02")
    assert Manifest.read(run / "02_double").status == "failed"
    with pytest.raises(MissingUpstreamError, match=r"02_double, which did not finish \(its manifest says 'failed'\)"):
        run_fake(fake_chain.config(), run, from_step="03")


def test_a_notebook_that_leaves_out_a_declared_output_fails_and_restores(fresh_run, run_fake):
    config = fake_chain.config(**{"02_double": {"skip_output": True}})
    with pytest.raises(pl.StepFailedError, match=r"did not write \['double.txt'\].*back in place"):
        run_fake(config, fresh_run, from_step="02", to_step="02")
    assert (fresh_run / "02_double" / "double.txt").read_text() == "6"
    assert Manifest.read(fresh_run / "02_double").status == "ok"


# ------------------------------------------------------------------------- verified inputs


def test_an_edited_upstream_output_stops_the_step_that_reads_it(fresh_run, run_fake):
    file = fresh_run / "01_make" / "value.txt"
    recorded = sha256_file(file)
    file.write_text("5")
    before = _snapshot(fresh_run)
    with pytest.raises(pl.TamperedInputError) as info:
        run_fake(fake_chain.config(), fresh_run, from_step="02")
    message = str(info.value)
    assert str(file) in message and recorded[:16] in message and sha256_file(file)[:16] in message
    assert "--from 01_make --to 01_make --force" in message and "02_double will not run on an edited input" in message
    assert _snapshot(fresh_run) == before  # nothing ran, nothing was moved


def test_a_deleted_upstream_output_names_the_step_to_rerun(fresh_run, run_fake):
    (fresh_run / "01_make" / "value.txt").unlink()
    with pytest.raises(MissingUpstreamError, match=r"01_make/value.txt, an output of step 01_make that is missing.*--from 01_make"):
        run_fake(fake_chain.config(), fresh_run, from_step="02")


def test_a_hand_edited_output_reruns_its_step_and_the_steps_after_it(fresh_run, run_fake):
    (fresh_run / "02_double" / "double.txt").write_text("999")
    results = run_fake(fake_chain.config(), fresh_run)
    # step 02 rewrites the true value; step 03 then reads the bytes it read before, so it is skipped
    assert [(r.status, r.message) for r in results] == [
        ("skipped", "unchanged"),
        ("ran", "outputs missing or modified since the last run"),
        ("skipped", "unchanged"),
    ]
    assert (fresh_run / "02_double" / "double.txt").read_text() == "6"


def test_a_half_written_manifest_reruns_its_step(fresh_run, run_fake):
    path = fresh_run / "01_make" / "manifest.json"
    path.write_text(path.read_text()[:100])
    results = run_fake(fake_chain.config(), fresh_run, to_step="01")
    assert [(r.status, r.message) for r in results] == [("ran", "no manifest yet")]
    assert Manifest.read(fresh_run / "01_make").status == "ok"


# ------------------------------------------------------------------------- kill -9 and locks


def _start_pipeline(run: Path, yaml_path: Path, fake_repo: Path, step: str, marker: Path) -> subprocess.Popen:
    """The pipeline's command line on the fake chain, in its own session, forcing ``step`` (which
    waits 120 s after writing its kernel's pid to ``marker``)."""
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import fake_chain\n"
        "from sparsemm_utils import pipeline as pl\n"
        "sys.exit(pl.main(['--config', sys.argv[2], '--run-dir', sys.argv[3], '--from', sys.argv[4], '--to', "
        "sys.argv[4], '--force'], steps=fake_chain.STEPS, root=Path(sys.argv[5])))"
    )
    fake_chain.config_yaml(yaml_path, extra=f"  {step}: {{wait: 120.0, marker: {str(marker)!r}}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root()), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", code, str(Path(fake_chain.__file__).parent), str(yaml_path), str(run), step, str(fake_repo)]
    return subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_mid_step(proc: subprocess.Popen, marker: Path) -> None:
    """Wait until the step's notebook runs, then kill -9 the pipeline and the kernel it started."""
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"the pipeline ended before the step started: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the step did not start within 120 s")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the kernel runs in a session of its own
    except ProcessLookupError:
        pass


def test_kill_9_during_a_forced_resumable_step_is_never_taken_for_finished(fresh_run, run_fake, fake_repo, tmp_path):
    marker = tmp_path / "kernel.pid"
    proc = _start_pipeline(fresh_run, tmp_path / "faults.yaml", fake_repo, "03_append", marker)
    try:
        deadline = time.monotonic() + 120
        while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        # a second pipeline on the same folder while the first one runs: refused, naming the holder
        with pytest.raises(RunLockedError, match=f"in use by another pipeline \\(pid {proc.pid} "):
            run_fake(fake_chain.config(), fresh_run)
    finally:
        _kill_mid_step(proc, marker)
    assert Manifest.read(fresh_run / "03_append").status == "running"
    # the dead pipeline's lock is reported as stale, not broken
    with pytest.raises(RunLockedError, match="stale lock.*--break-stale-lock"):
        run_fake(fake_chain.config(), fresh_run)
    assert (fresh_run / LOCK_NAME).is_file()
    results = run_fake(fake_chain.config(), fresh_run, break_stale_lock=True)
    assert [(r.step, r.status, r.message) for r in results][-1] == ("03_append", "ran", "its last run did not finish (interrupted)")
    assert Manifest.read(fresh_run / "03_append").status == "ok" and not (fresh_run / LOCK_NAME).exists()


def test_kill_9_during_a_step_rerun_puts_its_good_outputs_back(fresh_run, run_fake, fake_repo, tmp_path):
    before = _snapshot(fresh_run)
    marker = tmp_path / "kernel.pid"
    proc = _start_pipeline(fresh_run, tmp_path / "faults.yaml", fake_repo, "02_double", marker)
    _kill_mid_step(proc, marker)
    assert Manifest.read(fresh_run / "02_double").status == "running"
    assert Manifest.read(fresh_run / ".previous" / "02_double").status == "ok"
    results = run_fake(fake_chain.config(), fresh_run, break_stale_lock=True)
    assert any(line.startswith("[back] 02_double") for line in run_fake.lines)
    assert [r.status for r in results] == ["skipped", "skipped", "skipped"]
    after = _snapshot(fresh_run)
    assert {k: v for k, v in after.items() if not k.startswith(".failed/")} == before
    assert Manifest.read(fresh_run / ".failed" / "02_double").status == "running"


def test_a_second_pipeline_on_a_locked_run_folder_is_refused(fresh_run, run_fake):
    before = _snapshot(fresh_run)
    with run_lock(fresh_run):
        with pytest.raises(RunLockedError, match=f"in use by another pipeline \\(pid {os.getpid()} on {socket.gethostname()}"):
            run_fake(fake_chain.config(value=4), fresh_run)
    assert _snapshot(fresh_run) == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_reported_and_broken_only_on_request(fresh_run, run_fake):
    lock = fresh_run / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00"}))
    with pytest.raises(RunLockedError, match="stale lock .*that process is gone.*--break-stale-lock"):
        run_fake(fake_chain.config(), fresh_run)
    assert lock.is_file()
    results = run_fake(fake_chain.config(), fresh_run, break_stale_lock=True)
    assert [r.status for r in results] == ["skipped"] * 3 and not lock.exists()


def test_an_unreadable_lock_counts_as_stale(fresh_run, run_fake):
    (fresh_run / LOCK_NAME).write_text("{half a lo")
    with pytest.raises(RunLockedError, match="stale lock"):
        run_fake(fake_chain.config(), fresh_run)


def test_a_lock_from_another_host_is_never_broken(fresh_run, run_fake):
    (fresh_run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(RunLockedError, match="in use by another pipeline \\(pid 1 on elsewhere.example"):
        run_fake(fake_chain.config(), fresh_run, break_stale_lock=True)


# ------------------------------------------------------------------------- where the run lives


def test_a_moved_run_folder_skips_every_step(fresh_run, run_fake, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    fresh_run.rename(moved)
    results = run_fake(fake_chain.config(), moved)
    assert [r.status for r in results] == ["skipped"] * 3


def test_a_copied_run_folder_skips_every_step_and_leaves_the_original(fresh_run, run_fake, tmp_path):
    before = _snapshot(fresh_run)
    copy = tmp_path / "copy"
    shutil.copytree(fresh_run, copy)
    assert [r.status for r in run_fake(fake_chain.config(), copy)] == ["skipped"] * 3
    assert _snapshot(fresh_run) == before


def _read_only(monkeypatch):
    """The run folder cannot be written: its lock cannot be created (a read-only mount; chmod
    does not stop root, who runs CI, so the OSError is injected where the pipeline meets it)."""

    def refuse(run, **_):
        raise PermissionError(13, "Permission denied", str(run / LOCK_NAME))

    monkeypatch.setattr(pl, "run_lock", refuse)


def test_a_read_only_run_folder_with_nothing_to_run_is_fine(fresh_run, run_fake, monkeypatch):
    _read_only(monkeypatch)
    index = (fresh_run / "index.html").read_bytes()
    results = run_fake(fake_chain.config(), fresh_run)
    assert [r.status for r in results] == ["skipped"] * 3
    assert any("read-only" in line for line in run_fake.lines) and (fresh_run / "index.html").read_bytes() == index


def test_a_read_only_run_folder_with_a_step_to_run_says_which_and_why(fresh_run, run_fake, monkeypatch):
    _read_only(monkeypatch)
    with pytest.raises(pl.PipelineConfigError, match=r"cannot be written \(Permission denied\), and step 01_make must run \(parameters changed: value\)"):
        run_fake(fake_chain.config(value=4), fresh_run)


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, run_fake):
    file = tmp_path / "run.txt"
    file.write_text("not a folder")
    with pytest.raises(pl.PipelineConfigError, match="is a file, not a folder"):
        run_fake(fake_chain.config(), file)


def test_an_undeclared_step_key_stops_before_step_01_runs(tmp_path, run_fake):
    config = fake_chain.config(**{"03_append": {"valeu": 2}})
    with pytest.raises(pl.PipelineConfigError, match=r"steps.03_append sets \['valeu'\] \(did you mean 'value'\?\)"):
        run_fake(config, tmp_path / "run")
    assert not (tmp_path / "run" / "01_make").exists()
