"""Step 06's declarations (sparsemm_utils.steps.efficiency): STEP, Config, the head-length
sentence, the findings and write_outputs, on hand-made measurements (no model, no notebook)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from sparsemm_utils.efficiency import (
    EXTRA_COLUMNS,
    RESULT_COLUMNS,
    EfficiencyProtocol,
    InvalidEfficiencyConfigError,
)
from sparsemm_utils.pipeline import STEPS
from sparsemm_utils.steps.efficiency import (
    FINDINGS,
    STEP,
    TARGETS,
    Config,
    efficiency_targets,
    findings,
    head_lengths_sentence,
    write_outputs,
)

VICUNA = "llava-hf/llava-v1.6-vicuna-7b-hf"
QWEN2B = "Qwen/Qwen2-VL-2B-Instruct"

# ---------------------------------------------------------------------------------- declarations


def test_step_declares_the_measurements_the_targets_and_the_findings():
    assert STEP.name == "06_efficiency" and STEP.needs == () and not STEP.resumable
    assert STEP.output_names == ("results.csv", "analytic_kv.csv", "targets.csv", "findings.csv")
    assert STEP.notebook_path().is_file()
    assert STEP in STEPS  # the pipeline's registry is built from this declaration


# ---------------------------------------------------------------------------------- config


def test_config_defaults_are_the_tiny_configs():
    import yaml

    from sparsemm_utils.runs import repo_root

    tiny = yaml.safe_load((repo_root() / "configs" / "tiny.yaml").read_text())
    cfg = Config()
    for key, value in {**tiny["params"], **tiny["steps"]["06_efficiency"]}.items():
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value), key
    assert cfg.run_dir == "runs/tiny"


def test_config_builds_the_protocol_from_the_same_fields():
    names = {f.name for f in dataclasses.fields(EfficiencyProtocol)}
    assert names <= {f.name for f in dataclasses.fields(Config)}, "every protocol field is a notebook parameter"
    cfg = Config(models=["Qwen/Qwen2-VL-2B-Instruct"], contexts=[256, 512], decode_steps=4)
    assert cfg.protocol == EfficiencyProtocol(
        models=("qwen2-vl-2b",), contexts=(256, 512), decode_steps=4, layers=2, vocab="depth_scaled",
        decode_warmup=1, generate_tokens=16, device="cpu", threads=1, timeout_s=900,
    )  # fmt: skip
    assert cfg.models == ("qwen2-vl-2b",) and cfg.contexts == (256, 512)  # normalised like the protocol


def test_notebook_validation_derives_the_shape_from_a_real_model_id():
    c = Config(model_id="Qwen/Qwen2-VL-2B-Instruct", models=[], contexts=[512], layers=2, device="cpu")
    assert c.models == ("qwen2-vl-2b",) and c.protocol.models == ("qwen2-vl-2b",)
    with pytest.raises(InvalidEfficiencyConfigError, match="set models=\\[...\\] to real shapes"):
        Config(model_id="tiny-random/qwen2_vl", models=[], contexts=[512], device="cpu")
    c = Config(model_id="tiny-random/qwen2_vl", models=["qwen2-vl-2b"], contexts=[512], device="cpu")
    assert c.models == ("qwen2-vl-2b",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_dir": ""}, "run_dir must be a non-empty path"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
        ({"contexts": [512, 256]}, "strictly increasing"),
        ({"budget": 32, "window": 32}, "must exceed the window"),
        ({"methods": ["fullkv", "pyramidkv"], "layers": 1}, "pyramidkv cannot run on qwen2-vl-2b with 1 layer"),
        ({"models": ["qwen2-vl-2b"], "contexts": [32768]}, None),
    ],
)
def test_bad_parameters_say_what_is_wrong(kwargs, message):
    from sparsemm_utils.efficiency import ContextTooLongError

    error = ContextTooLongError if message is None else InvalidEfficiencyConfigError
    with pytest.raises(error, match=message or "max_position_embeddings"):
        Config(**kwargs)


# ---------------------------------------------------------------------------------- head lengths


def test_head_lengths_sentence_by_hand():
    # B = 256, w = 32, r = 0.1: m = floor(0.1 * 224) = 22, so the least a head holds is 22 + 32 = 54.
    # 4 heads: 54, 100 | 54, 304: mean 128; padded to each layer's longest: 2 x 100 + 2 x 304 = 808
    # rows against 512 stored (1.6x)
    text = head_lengths_sentence(np.array([[54, 100], [54, 304]]), budget=256, window=32, ratio=0.1, context=2048)
    assert text == (
        "At n = 2048, the 4 KV heads store 54-304 tokens each (mean 128.0; B = 256): the longest holds 1.2x B, "
        "and 2 of 4 (50%) hold the least, 54 (the uniform share m = 22 plus the window w = 32). A layout padded to "
        "each layer's longest head reads 808 rows per decode step, 1.6x the 512 a variable-length kernel reads."
    )
    # a least that is not m + w is not explained as one
    assert "uniform share" not in head_lengths_sentence(np.array([[60, 100]]), budget=256, window=32, ratio=0.1, context=96)
    with pytest.raises(ValueError, match="non-empty \\(layers, kv_heads\\)"):
        head_lengths_sentence(np.array([1, 2]), budget=256, window=32, ratio=0.1, context=96)


# ---------------------------------------------------------------------------------- findings


def _measurements(model: str, decode_ms: dict[str, list[float]], contexts: list[int], **overrides) -> pd.DataFrame:
    """results.csv rows: ``decode_ms`` {method: ms per context}; FullKV stores 1000 bytes per token,
    SparseMM 500 in all; peak 2 GiB for FullKV, 1 GiB otherwise; ``overrides`` set any column."""
    base = {"device": "cpu x", "layers": 2, "full_layers": 28, "dtype": "float32", "decode_steps": 8,
            "shape": "s", "peak_mem_kind": "cpu_peak_rss", "prefill_s": 1.0}  # fmt: skip
    rows = []
    for method, values in decode_ms.items():
        for n, ms in zip(contexts, values):
            kv = 1000 * n if method == "fullkv" else 500
            row = dict.fromkeys(RESULT_COLUMNS + EXTRA_COLUMNS)
            row |= base | {"model": model, "method": method, "context_len": n, "decode_ms_per_token": ms,
                           "budget": None if method == "fullkv" else 256, "kv_bytes": kv, "kv_bytes_analytic": kv,
                           "peak_mem_bytes": 2**30 * (2 if method == "fullkv" else 1)}  # fmt: skip
            rows.append(row | overrides)
    frame = pd.DataFrame(rows)
    for column in ("budget", "kv_bytes", "kv_bytes_analytic"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _claims(found):
    return {f.claim.split(" (")[0]: f for f in found}


def test_findings_of_a_cpu_run_compare_nothing_with_the_papers_gpu_numbers():
    # FullKV 30 -> 45 ms (1.5x, grows), SparseMM 30 -> 31 ms (1.03x, flat): the flatness holds; the
    # speed-up 45 / 31 = 1.45x and the peaks cannot be held to the paper's 32K GPU numbers
    frame = _measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 31]}, [1024, 2048])
    got = _claims(findings(frame))
    speed = got["SparseMM decodes faster than FullKV at long contexts"]
    assert speed.holds is None and speed.headline and speed.n == 8
    assert speed.this_run.startswith("FullKV / SparseMM = 1.45x at n = 2048 (45.0 -> 31.0 ms per token, means of 8 timed steps each)")
    assert "not comparable with the paper (32768 tokens, full depth, bf16 on a GPU): here 2048 tokens, 2 of 28 layers, float32, cpu x" in speed.this_run
    assert "1.87x (llava-next-vicuna-7b)" in speed.paper and "the paper does not time s" in speed.paper
    flat = got["SparseMM's decode time stays flat in context while FullKV's grows"]
    assert flat.holds is True and flat.n == 2
    assert "(1024-2048 tokens): SparseMM 1.03x (30.0, 31.0 ms), FullKV 1.50x (30.0, 45.0 ms)" in flat.this_run
    assert flat.paper == "SparseMM 37-45 ms per token from 2K to 32K (1.22x) (docs/method.md §7)"
    peak = got["SparseMM's peak memory is below FullKV's at long contexts"]
    assert peak.holds is None and "FullKV 2.00 GiB, SparseMM 1.00 GiB, cpu_peak_rss" in peak.this_run
    kv = got["The cache holds the analytic KV bytes"]
    assert kv.holds is True and kv.n == 4 and kv.this_run.startswith("4 of 4 measurements (fullkv, sparsemm)")


def test_the_speedup_finding_gives_the_static_cache_ratio_and_the_reason():
    # FullKV (DynamicCache) 45 ms, FullKV (StaticCache) 36 ms, SparseMM 30 ms at 2048: 1.50x and 1.20x
    frame = _measurements(QWEN2B, {"fullkv": [30, 45], "fullkv_static": [29, 36], "sparsemm": [30, 30]}, [1024, 2048])
    frame.loc[frame["method"] == "fullkv_static", "kv_bytes"] = frame.loc[frame["method"] == "fullkv_static", "kv_bytes_analytic"]
    speed = _claims(findings(frame))["SparseMM decodes faster than FullKV at long contexts"]
    assert speed.this_run.startswith("FullKV / SparseMM = 1.50x at n = 2048 (45.0 -> 30.0 ms per token")
    assert "against FullKV on a preallocated StaticCache (36.0 ms) 1.20x" in speed.this_run
    assert "appends by torch.cat and so copies each layer's whole cache at every step" in speed.this_run
    # without fullkv_static the text is as before
    plain = _claims(findings(_measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 30]}, [1024, 2048])))
    assert "StaticCache" not in plain["SparseMM decodes faster than FullKV at long contexts"].this_run


def test_findings_of_a_run_measured_as_the_papers_decide():
    gpu = {"device": "cuda:0 H100", "layers": 32, "full_layers": 32, "dtype": "bfloat16"}
    # 80 / 40 = 2.0x >= the paper's 70.9 / 37.9 = 1.87x; peak 1 GiB < 2 GiB
    got = _claims(findings(_measurements(VICUNA, {"fullkv": [50, 80], "sparsemm": [39, 40]}, [2048, 32768], **gpu)))
    speed = got["SparseMM decodes faster than FullKV at long contexts"]
    assert speed.holds is True and "not comparable" not in speed.this_run
    assert speed.paper == "1.87x for llava-next-vicuna-7b at 32K, full depth, bf16 on a GPU (docs/method.md §7)"
    peak = got["SparseMM's peak memory is below FullKV's at long contexts"]
    assert peak.holds is True and peak.paper == "32.9 -> 17.4 GB for llava-next-vicuna-7b at 32K on a GPU (docs/method.md §7)"
    # 60 / 40 = 1.5x < 1.87x: fails
    slow = _measurements(VICUNA, {"fullkv": [50, 60], "sparsemm": [39, 40]}, [2048, 32768], **gpu)
    assert _claims(findings(slow))["SparseMM decodes faster than FullKV at long contexts"].holds is False
    # the same GPU run stopping at 16K is not the paper's context: cannot tell
    short = _measurements(VICUNA, {"fullkv": [50, 80], "sparsemm": [39, 40]}, [2048, 16384], **gpu)
    assert _claims(findings(short))["SparseMM decodes faster than FullKV at long contexts"].holds is None


def test_flatness_fails_when_sparsemm_grows_and_cannot_tell_when_both_are_flat():
    grows = _measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 40]}, [1024, 2048])  # 40 / 30 = 1.33 > 1.25
    assert _claims(findings(grows))["SparseMM's decode time stays flat in context while FullKV's grows"].holds is False
    both = _measurements(QWEN2B, {"fullkv": [30, 36], "sparsemm": [30, 31]}, [1024, 2048])  # 1.2 and 1.03
    flat = _claims(findings(both))["SparseMM's decode time stays flat in context while FullKV's grows"]
    assert flat.holds is None and "too short to tell a flat SparseMM from a growing FullKV" in flat.this_run


def test_timing_verdicts_are_withheld_when_one_measurements_steps_vary_more_than_the_tolerance():
    # SparseMM 30 -> 40 ms would fail flatness (1.33x), but FullKV's 2048-token measurement has a
    # mean 45 ms over a fastest step of 30 ms: 1.5x noise within one measurement > 1.25
    frame = _measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 40]}, [1024, 2048])
    frame["decode_ms_min"] = frame["decode_ms_per_token"]
    frame.loc[(frame["method"] == "fullkv") & (frame["context_len"] == 2048), "decode_ms_min"] = 30.0
    flat = _claims(findings(frame))["SparseMM's decode time stays flat in context while FullKV's grows"]
    assert flat.holds is None and "timing noise reaches 1.50x here" in flat.this_run
    # a whole measurement slowed down: FullKV 45 ms at 1024 tokens but 30 at 2048, which no cache
    # causes (45 / 30 = 1.5 > 1.25); SparseMM's 1.33x spread is not judged
    slowed = _measurements(QWEN2B, {"fullkv": [45, 30], "sparsemm": [30, 40]}, [1024, 2048])
    assert _claims(findings(slowed))["SparseMM's decode time stays flat in context while FullKV's grows"].holds is None
    gpu = {"device": "cuda:0 H100", "layers": 32, "full_layers": 32, "dtype": "bfloat16"}
    fast = _measurements(VICUNA, {"fullkv": [50, 80], "sparsemm": [39, 40]}, [2048, 32768], **gpu)
    fast["decode_ms_min"] = fast["decode_ms_per_token"] / 2
    assert _claims(findings(fast))["SparseMM decodes faster than FullKV at long contexts"].holds is None
    fast["decode_ms_min"] = fast["decode_ms_per_token"] / 1.1  # a quiet machine: decided again
    assert _claims(findings(fast))["SparseMM decodes faster than FullKV at long contexts"].holds is True


def test_kv_finding_fails_on_a_mismatch_and_names_methods_without_an_analytic_value():
    frame = _measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 31], "adakv": [30, 31]}, [1024, 2048])
    frame.loc[frame["method"] == "adakv", "kv_bytes_analytic"] = pd.NA
    frame.loc[(frame["method"] == "sparsemm") & (frame["context_len"] == 2048), "kv_bytes_analytic"] = 501
    kv = _claims(findings(frame))["The cache holds the analytic KV bytes"]
    assert kv.holds is False and kv.n == 4
    assert kv.this_run == (
        "3 of 4 measurements (fullkv, sparsemm) hold exactly the analytic bytes; no analytic value for adakv "
        "(caps chosen from the prompt's attention)"
    )


def test_kv_finding_quotes_the_full_depth_bytes():
    analytic = pd.DataFrame(
        {"model": QWEN2B, "shape": "qwen2-vl-2b", "method": ["fullkv", "sparsemm"], "context_len": 2048, "dtype": "bfloat16",
         "kv_bytes": pd.array([58_720_256, 7_340_032], dtype="Int64")}
    )  # fmt: skip
    found = findings(_measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 31]}, [1024, 2048]), analytic)
    # 58,720,256 B = 56.0 MiB; 7,340,032 B = 7.0 MiB: 12.5% -> "12%"
    assert _claims(found)["The cache holds the analytic KV bytes"].this_run.endswith(
        "at full depth in bfloat16 and n = 2048, qwen2-vl-2b's SparseMM cache holds 7.0 MiB against FullKV's 56.0 MiB (12%)"
    )


# ---------------------------------------------------------------------------------- outputs


def test_write_outputs_writes_the_targets_and_the_findings(tmp_path):
    frame = _measurements(QWEN2B, {"fullkv": [30, 45], "sparsemm": [30, 31]}, [1024, 2048])
    found = write_outputs(Config(run_dir=str(tmp_path)), frame)
    assert found == findings(frame) and len(found) == 4
    assert sorted(p.name for p in (tmp_path / "06_efficiency").iterdir()) == ["findings.csv", "targets.csv"]
    targets, expected = TARGETS.read(tmp_path), efficiency_targets(frame)
    assert targets["method"].tolist() == expected["method"].tolist() == ["sparsemm", "fullkv"]
    assert targets["flat"].tolist() == [True, None] and targets["speedup_met"].tolist() == [None, None]
    assert targets["kv_bytes_match"].tolist() == [True, True]
    assert np.allclose(targets["speedup"], expected["speedup"])
    table = FINDINGS.read(tmp_path)
    assert len(table) == 4 and table["headline"].tolist() == [True, True, False, False]


def test_the_commands_in_the_module_docstring_are_valid_configs():
    """Every ``python -m sparsemm_utils.steps.efficiency`` example of the module's docstring parses
    and validates (Vicuna at 8K needs --extend-positions: its checkpoint has 4096 positions)."""
    import argparse
    import shlex

    from sparsemm_utils.efficiency import add_protocol_arguments, protocol_from_args
    from sparsemm_utils.steps import efficiency as module

    block = module.__doc__.split("::", 1)[1].split("\n\n")[1]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 2
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config-json", default=None)
    add_protocol_arguments(parser)
    for command in commands:
        words = shlex.split(command.split("#")[0])
        assert words[:3] == ["python", "-m", "sparsemm_utils.steps.efficiency"]
        args = parser.parse_args(words[3:])
        cfg = Config(run_dir=args.run_dir, **{**protocol_from_args(args).to_dict(), "device": "cpu"})
        assert cfg.protocol.check_runnable() is None
