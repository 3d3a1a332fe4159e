"""Step 06's measurements on random-weight real shapes, in-process and in fresh processes.

Timings are never asserted (they are printed): what is checked is the protocol (how many tokens
are generated and timed, which decode path ran), the artifact contract's columns, and that the
measured KV bytes equal docs/method.md §7's analytic bytes, method by method.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from sparsemm_utils import efficiency as eff
from sparsemm_utils.efficiency import (
    ANALYTIC_COLUMNS,
    EXTRA_COLUMNS,
    RESULT_COLUMNS,
    EfficiencyProtocol,
    MeasurementFailedError,
    load_results,
    measure,
    run_efficiency,
)
from sparsemm_utils.real_shapes import RESERVED_TOKEN_IDS, build_random_model, get_real_shape, random_prompt, weights_bytes
from sparsemm_utils.steps import efficiency as step

pytestmark = pytest.mark.slow

SMALL = dict(
    models=["qwen2-vl-2b"], contexts=[64, 96], budget=48, window=8, layers=2, vocab="depth_scaled", decode_steps=3,
    decode_warmup=1, generate_tokens=4, threads=1, device="cpu",
)


@pytest.mark.parametrize("method", ["fullkv", "sparsemm", "snapkv", "pyramidkv", "streamingllm", "adakv"])
def test_one_measurement_follows_the_protocol(method):
    config = EfficiencyProtocol(methods=[method], **SMALL)
    row = measure(config, "qwen2-vl-2b", method, 96)
    assert list(row) == list(RESULT_COLUMNS + EXTRA_COLUMNS)
    # 1 (prefill) + 1 warm-up + 3 timed steps = 5 tokens > generate_tokens = 4
    assert row["generated_tokens"] == 5 and row["decode_steps"] == 3
    assert row["model"] == "Qwen/Qwen2-VL-2B-Instruct" and row["layers"] == 2 and row["full_layers"] == 28
    assert row["device"].startswith("cpu") and row["dtype"] == "float32"
    assert row["prefill_s"] > 0 and row["decode_ms_per_token"] > 0 and row["decode_ms_min"] <= row["decode_ms_per_token"]
    assert row["peak_mem_bytes"] > row["weights_bytes"] > 0
    # FullKV: 2 layers x 2 KV heads x 96 tokens x 128 x 2 x 4 bytes = 393,216
    per_token = 2 * 128 * 4
    if method == "fullkv":
        assert row["kv_bytes"] == 2 * 2 * 96 * per_token == 393_216
        assert row["decode_attention"].startswith("sdpa") and row["budget"] is None
    else:
        assert row["decode_attention"] == "reference" and row["budget"] == 48
    if method == "adakv":
        assert row["kv_bytes_analytic"] is None
    else:
        assert row["kv_bytes"] == row["kv_bytes_analytic"]
    # the generated tokens are appended to every KV head of every layer: 5 - 1 = 4 decode steps
    assert row["kv_bytes_final"] == row["kv_bytes"] + 4 * 2 * 2 * per_token
    # the decode reserve after the prefill: 4 free rows (the 4 tokens still to append, under one block)
    # per KV head of each layer; transformers' own cache has none
    assert row["kv_reserve_bytes"] == (None if method == "fullkv" else 4 * 2 * 2 * per_token)


@pytest.mark.parametrize("model", ["qwen2.5-vl-3b", "qwen3-vl-2b", "llava-onevision-qwen2-0.5b", "internvl3-1b"])
def test_every_family_measures_kv_bytes_equal_to_the_analytic_sum(model):
    # the real shape's class (Qwen3-VL's explicit head_dim, Qwen2 behind OneVision and InternVL) at 1 layer
    config = EfficiencyProtocol(methods=["sparsemm"], **{**SMALL, "models": [model], "layers": 1})
    row = measure(config, model, "sparsemm", 96)
    shape = get_real_shape(model)
    assert row["layers"] == 1 and row["full_layers"] == shape.layers
    assert row["kv_bytes"] == row["kv_bytes_analytic"] > 0
    # the generated tokens go to every KV head: 4 decode steps x kv_heads x head_dim x 2 x 4 bytes
    assert row["kv_bytes_final"] == row["kv_bytes"] + 4 * shape.kv_heads * shape.head_dim * 2 * 4


def test_random_prompt_never_holds_a_special_token():
    loaded = build_random_model("qwen2-vl-2b", layers=1, vocab_size=40)
    ids = random_prompt(loaded, 2000, seed=0)["input_ids"]
    assert ids.shape == (1, 2000) and int(ids.max()) < 40 - RESERVED_TOKEN_IDS
    assert torch.equal(ids, random_prompt(loaded, 2000, seed=0)["input_ids"])
    # weights: same seed, same weights; tied embeddings counted once
    again = build_random_model("qwen2-vl-2b", layers=1, vocab_size=40)
    first = next(loaded.model.parameters())
    assert torch.equal(first, next(again.model.parameters()))
    assert weights_bytes(loaded.model) == sum(p.numel() * 4 for p in loaded.model.parameters())


def test_run_in_fresh_processes_writes_the_contract(tmp_path):
    config = EfficiencyProtocol(methods=["fullkv", "sparsemm"], **{**SMALL, "contexts": [64]})
    lines = []
    results = run_efficiency(config, tmp_path, progress=False, log=lines.append)
    assert len(lines) == 2
    frame = load_results(tmp_path / "results.csv")
    assert list(frame.columns) == list(RESULT_COLUMNS + EXTRA_COLUMNS)
    assert frame[["method", "context_len"]].values.tolist() == [["fullkv", 64], ["sparsemm", 64]]
    assert (frame["kv_bytes"] == frame["kv_bytes_analytic"]).all()
    assert results["kv_bytes"].tolist() == frame["kv_bytes"].tolist()
    analytic = pd.read_csv(tmp_path / "analytic_kv.csv")
    assert list(analytic.columns) == list(ANALYTIC_COLUMNS) and set(analytic["layers"]) == {28}
    assert EfficiencyProtocol.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    assert sorted(p.name for p in (tmp_path / "measurements").iterdir()) == [
        "qwen2-vl-2b__fullkv__64.json", "qwen2-vl-2b__sparsemm__64.json",
    ]


def test_a_failed_measurement_says_how_to_rerun_it(tmp_path, monkeypatch):
    config = EfficiencyProtocol(methods=["fullkv"], **{**SMALL, "contexts": [64]})
    monkeypatch.setattr(
        eff, "_measurement_command",
        lambda *args: [eff.sys.executable, "-c", "import sys; sys.stderr.write('CUDA out of memory'); sys.exit(3)"],
    )
    with pytest.raises(MeasurementFailedError, match="(?s)failed \\(exit code 3.*Rerun it alone.*CUDA out of memory"):
        run_efficiency(config, tmp_path, progress=False)


def test_cli(capsys, tmp_path):
    assert eff.main(["analytic", "--models", "qwen2-vl-7b", "--contexts", "2048", "32768", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1879048192" in out  # Qwen2-VL-7B FullKV at 32K in bf16: 28 x 4 x 32768 x 128 x 2 x 2
    # the whole step (steps.efficiency's command line) stops before any process on a context too long
    assert step.main(["--run-dir", str(tmp_path), "--models", "llava-next-vicuna-7b", "--contexts", "8192", "--device", "cpu"]) == 2
    assert "max_position_embeddings=4096" in capsys.readouterr().err
    out_file = tmp_path / "row.json"
    code = eff.main([
        "measure", "--model", "qwen2-vl-2b", "--method", "sparsemm", "--context", "64", "--layers", "1", "--vocab",
        "depth_scaled", "--budget", "40", "--window", "8", "--decode-steps", "2", "--decode-warmup", "0",
        "--generate-tokens", "2", "--device", "cpu", "--out", str(out_file),
    ])
    assert code == 0 and json.loads(out_file.read_text())["kv_bytes"] == json.loads(out_file.read_text())["kv_bytes_analytic"]


def test_the_step_without_its_notebook_leaves_every_declared_output(capsys, tmp_path):
    code = step.main([
        "--run-dir", str(tmp_path), "--models", "qwen2-vl-2b", "--methods", "fullkv", "sparsemm", "--contexts", "64", "96",
        "--budget", "48", "--window", "8", "--layers", "2", "--vocab", "depth_scaled", "--decode-steps", "3",
        "--decode-warmup", "1", "--generate-tokens", "4", "--threads", "1", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    assert all(artifact.exists(tmp_path) for artifact in step.STEP.outputs)
    findings = step.FINDINGS.read(tmp_path)
    assert len(findings) == 4 and findings["n"].tolist()[:2] == [3, 2]  # 3 timed steps; 2 contexts
    kv = findings[findings["claim"] == "The cache holds the analytic KV bytes"].iloc[0]
    assert kv["holds"] is True and kv["n"] == 4
    assert "KV bytes == analytic: True" in capsys.readouterr().out
