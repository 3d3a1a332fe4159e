"""The decode-only benchmark (sparsemm_utils.decode_benchmark) on a tiny shape: synthetic caches
hold the analytic bytes, methods alternate step by step, the full-depth estimate follows from the
measured stage costs. Timings are printed, never asserted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparsemm_utils import decode_benchmark as bench
from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.compression import SparseMMPress
from sparsemm_utils.decode_benchmark import COLUMNS, DecodeBenchmarkConfig, format_table, run_decode_benchmark
from sparsemm_utils.efficiency import InvalidEfficiencyConfigError
from sparsemm_utils.real_shapes import RealShape

pytestmark = pytest.mark.slow

# 6 layers of a tiny LLaVA-NeXT (llama) shape: 4 query heads, 2 KV heads, head_dim 16
TINY = RealShape(
    name="tiny-llama", hub_id="test/tiny-llama", model_type="llava_next", text_model_type="llama", layers=6, hidden=64,
    intermediate=128, query_heads=4, kv_heads=2, vocab_size=512, max_position_embeddings=128, rope_theta=1e4,
    rms_norm_eps=1e-5,
)


def _config(**overrides):
    values = dict(shape=TINY, contexts=(64, 200), layers=2, budget=24, window=8, steps=2, repeats=2, warmup=1)
    return DecodeBenchmarkConfig(**{**values, **overrides})


def test_synthetic_caches_hold_the_analytic_bytes_and_methods_alternate():
    config = _config()
    seen: list[str] = []
    loaded = bench.build_random_model(TINY, layers=2, vocab_size=config.vocab_size, max_position_embeddings=256)
    handle = loaded.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(type(kwargs["past_key_values"]).__name__), with_kwargs=True
    )
    lines: list[str] = []
    frame = run_decode_benchmark(config, loaded=loaded, log=lines.append)
    handle.remove()
    print(format_table(frame))
    assert list(frame.columns) == list(COLUMNS) and len(lines) == 6
    assert frame[["context_len", "method"]].values.tolist() == [
        [n, m] for n in (64, 200) for m in ("fullkv", "fullkv_static", "sparsemm")
    ]
    # every step runs the three methods back to back: 1 warm-up + 2 rounds x 2 steps = 5 steps per context
    assert seen == ["DynamicCache", "StaticCache", "PerHeadKVCache"] * 5 * 2
    per_token = 2 * 2 * 16 * 2 * 4  # 2 layers x 2 KV heads x head_dim 16 x (K, V) x 4 bytes
    press = SparseMMPress(budget=24, window=8, ratio=0.1, head_scores=np.random.default_rng(0).random((2, 4)) ** 13)
    for row in frame.itertuples():
        assert row.timed_steps == 4 and row.repeats == 2 and row.vocab_size == 171  # ceil(512 x 2 / 6)
        assert row.kv_bytes == row.kv_bytes_analytic
        if row.method == "fullkv":
            assert row.kv_bytes == row.context_len * per_token
        elif row.method == "fullkv_static":  # n + 5 appended rows, preallocated
            assert row.kv_bytes == (row.context_len + 5) * per_token
        else:  # cap + window per KV head: B per KV head on average, up to the caps' rounding
            stored = press.capacities(ModelShape(2, 4, 2), row.context_len).stored(row.context_len)
            assert row.kv_bytes == int(stored.sum()) * 16 * 2 * 4 and abs(int(stored.sum()) - 24 * 2 * 2) <= 2
        assert 0 < row.cpu_ms_min <= row.cpu_ms_median and row.wall_ms_min > 0 and row.layer_cpu_ms > 0
    assert "fullkv / sparsemm" in format_table(frame) and "fullkv_static / sparsemm" in format_table(frame)


def test_full_depth_estimate_from_the_stage_costs():
    """Hand-worked: 2 of 6 layers, vocabulary 171 of 512. A step of 10 ms CPU with 6 ms in the 2
    layers and 1 ms in the output layer: fixed 3 ms; full depth 3 + 6 x 3 + 1 x 512 / 171 ms."""
    config = _config(repeats=1, steps=3)
    record = {
        "cpu": [0.010, 0.012, 0.011], "cpu_layers": [0.006, 0.006, 0.006], "cpu_head": [0.001, 0.001, 0.001],
        "wall": [0.020, 0.020, 0.020], "wall_layers": [0.010, 0.010, 0.010], "wall_head": [0.002, 0.002, 0.002],
    }
    out = bench._summary(config, 2, record)
    assert out["layer_cpu_ms"] == pytest.approx(3.0) and out["head_cpu_ms"] == pytest.approx(1.0)
    assert out["fixed_cpu_ms"] == pytest.approx(4.0)  # median of 3, 5, 4
    assert out["full_depth_cpu_ms"] == pytest.approx(4.0 + 18.0 + 512 / 171)
    assert out["full_depth_wall_ms"] == pytest.approx(8.0 + 30.0 + 2 * 512 / 171)
    assert out["cpu_ms_median"] == pytest.approx(11.0) and out["cpu_round_spread"] == 1.0


def test_bad_configurations_say_what_to_do(capsys):
    with pytest.raises(InvalidEfficiencyConfigError, match="one at a time"):
        _config(methods=("fullkv", "sparsemm", "snapkv"))
    with pytest.raises(InvalidEfficiencyConfigError, match="strictly increasing"):
        _config(contexts=(200, 64))
    with pytest.raises(InvalidEfficiencyConfigError, match="repeats"):
        _config(repeats=0)
    assert bench.main(["--shape", "no-such-model"]) == 2
    assert "known shapes are" in capsys.readouterr().err


def test_command_line_on_a_registered_shape(tmp_path, capsys):
    out = tmp_path / "decode.csv"
    code = bench.main([
        "--shape", "qwen2-vl-2b", "--layers", "1", "--contexts", "48", "--methods", "fullkv", "fullkv_static",
        "--steps", "1", "--repeats", "2", "--warmup", "0", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    frame = pd.read_csv(out)
    assert frame["method"].tolist() == ["fullkv", "fullkv_static"] and set(frame["full_layers"]) == {28}
    assert "fullkv / fullkv_static" in capsys.readouterr().out
