"""The efficiency protocol step 06 measures with (docs/method.md §7): validation, derived quantities, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from sparsemm_utils.efficiency import (
    EFFICIENCY_METHODS,
    ContextTooLongError,
    DeviceNotAvailableError,
    EfficiencyProtocol,
    InvalidEfficiencyConfigError,
    resolve_device,
    resolve_dtype,
)
from sparsemm_utils.real_shapes import UnknownRealShapeError

CPU = dict(device="cpu")


def test_defaults_are_the_papers_protocol():
    c = EfficiencyProtocol()
    assert c.contexts == (2048, 4096, 8192, 16384, 32768)
    assert (c.budget, c.window, c.ratio) == (256, 32, 0.1)
    assert (c.decode_steps, c.generate_tokens) == (100, 512)
    assert c.methods == ("fullkv", "fullkv_static", "sparsemm")  # both full-cache baselines
    # 512 tokens cover 1 (prefill) + 2 warm-up + 100 timed steps
    assert c.new_tokens == 512


def test_new_tokens_covers_the_timed_steps():
    # 1 token from the prefill + 1 warm-up + 20 timed steps = 22 > generate_tokens = 8
    c = EfficiencyProtocol(decode_steps=20, decode_warmup=1, generate_tokens=8, **CPU)
    assert c.new_tokens == 22


def test_models_are_normalised_to_short_names():
    c = EfficiencyProtocol(models=["Qwen/Qwen2-VL-7B-Instruct", "LLaVA-NeXT-Vicuna-7B"], **CPU)
    assert c.models == ("qwen2-vl-7b", "llava-next-vicuna-7b")
    with pytest.raises(UnknownRealShapeError, match="known shapes are"):
        EfficiencyProtocol(models=["gpt-2"])
    with pytest.raises(InvalidEfficiencyConfigError, match="twice"):
        EfficiencyProtocol(models=["qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=["fullkv", "h2o"]), "each method must be one of"),
        (dict(methods=["head_mask"]), "each method must be one of"),
        (dict(methods=[]), "must not be empty"),
        (dict(methods="sparsemm"), "must be a list"),
        (dict(contexts=[4096, 2048]), "strictly increasing"),
        (dict(contexts=[0]), "each context must be an int >= 1"),
        (dict(budget=32, window=32), "must exceed the window"),
        (dict(ratio=1.5), r"ratio must lie in \[0, 1\], got 1.5"),
        (dict(layers=0), "layers must be an int >= 1"),
        (dict(models=["qwen2-vl-7b"], layers=29), "exceeds the depth of a model \\(28\\)"),
        (dict(vocab="tiny"), "vocab must be one of"),
        (dict(decode_steps=0), "decode_steps must be an int >= 1"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(device="tpu"), "device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
        (dict(decode_attention="triton"), "decode_attention must be one of"),
        (dict(head_scores="real"), "head_scores must be one of"),
        (dict(extend_positions="yes"), "extend_positions must be true or false"),
        (dict(threads=0), "threads must be an int >= 1"),
        (dict(timeout_s=-1), "timeout_s must be a positive number"),
    ],
)
def test_bad_parameters_say_what_is_wrong(kwargs, message):
    with pytest.raises(InvalidEfficiencyConfigError, match=message):
        EfficiencyProtocol(**kwargs)


def test_every_timeable_method_is_a_compression_method_except_the_head_mask():
    assert "head_mask" not in EFFICIENCY_METHODS
    assert {"fullkv", "sparsemm", "snapkv", "pyramidkv", "adakv", "streamingllm", "random"} <= set(EFFICIENCY_METHODS)


def test_context_longer_than_the_positions_is_a_clear_error():
    # LLaVA-NeXT-Vicuna-7B has 4096 positions: 4096 + 512 generated tokens need 4608
    c = EfficiencyProtocol(models=["llava-next-vicuna-7b"], contexts=[2048, 4096], **CPU)
    with pytest.raises(ContextTooLongError, match="needs 4608 positions.*max_position_embeddings=4096.*extend_positions"):
        c.check_runnable()
    c.check_positions(c.shapes()[0], 2048)  # 2048 + 512 = 2560 <= 4096: fine
    extended = EfficiencyProtocol(models=["llava-next-vicuna-7b"], contexts=[2048, 4096], extend_positions=True, **CPU)
    extended.check_runnable()
    assert extended.positions(extended.shapes()[0]) == 4608
    # Qwen2-VL-7B: 32768 positions, so the paper's 32K + 512 needs extension too
    with pytest.raises(ContextTooLongError, match="needs 33280 positions"):
        EfficiencyProtocol(models=["qwen2-vl-7b"], **CPU).check_runnable()


def test_a_method_that_cannot_run_on_the_shape_is_caught_before_any_process():
    c = EfficiencyProtocol(models=["qwen2-vl-2b"], methods=["fullkv", "pyramidkv"], layers=1, contexts=[512], **CPU)
    with pytest.raises(InvalidEfficiencyConfigError, match="pyramidkv cannot run on qwen2-vl-2b with 1 layer"):
        c.check_runnable()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_device_that_is_not_there_is_a_clear_error():
    with pytest.raises(DeviceNotAvailableError, match="sees no GPU.*use device='cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(DeviceNotAvailableError, match="sees no GPU"):
        EfficiencyProtocol(models=["qwen2-vl-2b"], contexts=[512], device="cuda:1").check_runnable()
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_index_beyond_the_count_is_a_clear_error():  # pragma: no cover - GPU machines
    with pytest.raises(DeviceNotAvailableError, match="GPU\\(s\\)"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_dtype_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_round_trip_through_json_and_unknown_keys():
    c = EfficiencyProtocol(models=["qwen2-vl-2b"], contexts=[256, 512], layers=2, vocab="depth_scaled", **CPU)
    again = EfficiencyProtocol.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    with pytest.raises(InvalidEfficiencyConfigError, match="unknown efficiency parameter\\(s\\) \\['context'\\]"):
        EfficiencyProtocol.from_dict({"context": [512]})
