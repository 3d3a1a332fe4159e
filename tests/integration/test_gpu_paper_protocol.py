"""benchmarks/gpu_paper_protocol.py: the paper's GPU protocol as step 06's config, its refusal
without a GPU, and its CPU dry run at a tiny shape writing step 06's files. Never needs a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sparsemm_utils.efficiency import RESULT_COLUMNS, DeviceNotAvailableError
from sparsemm_utils.steps import efficiency as step

pytestmark = pytest.mark.slow


def _script():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_paper_protocol.py"
    spec = importlib.util.spec_from_file_location("gpu_paper_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_paper_protocol"] = module
    spec.loader.exec_module(module)
    return module


def test_the_protocol_is_the_papers(monkeypatch):
    # on a machine that has a GPU, the config it would run (resolve_device is the only check that needs one)
    monkeypatch.setattr("sparsemm_utils.efficiency.resolve_device", lambda device: torch.device("cpu"))
    cfg = step.paper_protocol_config("runs/x")
    p = cfg.protocol
    assert p.models == ("llava-next-vicuna-7b", "llava-next-mistral-7b", "qwen2-vl-7b")
    assert p.methods == ("fullkv", "fullkv_static", "sparsemm") and p.contexts == (2048, 4096, 8192, 16384, 32768)
    assert (p.layers, p.vocab, p.dtype, p.device, p.extend_positions) == (None, "real", "bfloat16", "cuda", True)
    assert (p.budget, p.window, p.ratio, p.decode_steps, p.generate_tokens) == (256, 32, 0.1, 100, 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_stops_before_any_process(tmp_path, capsys):
    with pytest.raises(DeviceNotAvailableError):
        step.paper_protocol_config(tmp_path)
    assert _script().main(["--run-dir", str(tmp_path), "--models", "qwen2-vl-2b"]) == 2
    assert "--dry-run checks the same path on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "06_efficiency").exists()


def test_dry_run_writes_step_06s_rows(tmp_path, capsys):
    code = _script().main(["--run-dir", str(tmp_path), "--dry-run", "--models", "qwen2-vl-2b", "--contexts", "64"])
    assert code == 0
    assert all(artifact.exists(tmp_path) for artifact in step.STEP.outputs)
    results = step.RESULTS.read(tmp_path)
    assert list(results.columns[: len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
    assert results["method"].tolist() == ["fullkv", "fullkv_static", "sparsemm"]
    assert results["device"].str.startswith("cpu").all() and set(results["layers"]) == {1}
    assert (results["kv_bytes"] == results["kv_bytes_analytic"]).all()
    targets = step.TARGETS.read(tmp_path).set_index("method")
    assert targets.loc["sparsemm", "speedup_static"] > 0 and targets.loc["fullkv_static", "kv_bytes_match"] == True  # noqa: E712
    assert "FullKV (StaticCache) / sparsemm" in capsys.readouterr().out
