"""Errors of model loading and attention selection (sparsemm_utils.models): no model is built here."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from sparsemm_utils.models import (
    SUPPORTED_MODEL_TYPES,
    AttentionNotRegisteredError,
    LoadedModel,
    ModelNotAvailableError,
    UnsupportedModelError,
    load_model,
    read_model_type,
    register_text_attention,
    set_text_attention,
)


def test_supported_model_types_map_to_the_real_classes():
    assert {k: v.__name__ for k, v in SUPPORTED_MODEL_TYPES.items()} == {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "internvl": "InternVLForConditionalGeneration",
    }
    with pytest.raises(TypeError):  # read-only: nobody can add a type behind the tests' back
        SUPPORTED_MODEL_TYPES["llama"] = object  # type: ignore[index]


def test_unknown_tiny_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        load_model("tiny-random/llama")
    message = str(info.value)
    assert "'llama'" in message
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in message
    assert isinstance(info.value, ValueError)


def test_the_moe_relative_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(UnsupportedModelError, match="left out on purpose: Qwen3-VL-30B-A3B") as info:
        load_model(tmp_path)
    assert "qwen3_vl" in str(info.value)  # the dense family is named among the supported types


def test_local_folder_with_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "'bert'" in message and "config.json" in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)
    assert info.value.model_type == "bert"


def test_local_folder_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="None"):
        read_model_type(tmp_path)


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(tmp_path)


def test_path_to_a_file_is_rejected(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match="is a file"):
        load_model(file)


def test_uncached_hub_id_fails_fast_and_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "made-up-org/made-up-vlm-7b"
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(repo_id, cache_dir=tmp_path / "empty_cache")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"offline lookup took {elapsed:.1f}s: it must not wait for the network"
    message = str(info.value)
    assert f"hf download {repo_id}" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message
    assert "save_pretrained" in message and "load_model(folder)" in message
    assert "tiny-random/qwen2_vl" in message  # the offline alternative
    assert isinstance(info.value, FileNotFoundError)


def test_uncached_hub_id_default_cache_is_offline_too(monkeypatch):
    # No cache_dir: the default HF cache is looked up with local_files_only, never the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError):
        load_model("made-up-org/another-made-up-vlm")
    assert time.perf_counter() - start < 5.0


def test_string_that_is_neither_folder_nor_hub_id():
    with pytest.raises(ModelNotAvailableError, match="not a valid hub id"):
        load_model("./no/such//folder here")


@pytest.mark.parametrize("dtype", ["float77", "banana", 3])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        load_model("tiny-random/qwen2_vl", dtype=dtype)


def test_loaded_model_rejects_unsupported_type():
    with pytest.raises(UnsupportedModelError):
        LoadedModel(model=None, processor=None, model_type="llava", name_or_path="x")  # type: ignore[arg-type]


def test_set_text_attention_unregistered_name():
    # The name check runs before the model is touched, so no model is needed.
    with pytest.raises(AttentionNotRegisteredError) as info:
        set_text_attention(object(), "no_such_attention_fn")  # type: ignore[arg-type]
    assert "register_text_attention('no_such_attention_fn', fn)" in str(info.value)


def test_set_text_attention_without_mask_function_is_refused():
    name = "sparsemm_test_attention_without_mask"
    AttentionInterface.register(name, sdpa_attention_forward)
    assert name not in ALL_MASK_ATTENTION_FUNCTIONS
    with pytest.raises(AttentionNotRegisteredError, match="attention_mask=None"):
        set_text_attention(object(), name)  # type: ignore[arg-type]


def test_register_text_attention_registers_both_interfaces():
    name = "sparsemm_test_attention_with_mask"
    register_text_attention(name, sdpa_attention_forward)
    assert AttentionInterface()[name] is sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[name] is eager_mask  # default: always-materialised float mask
    register_text_attention(name + "_sdpa", sdpa_attention_forward, mask="sdpa")
    assert ALL_MASK_ATTENTION_FUNCTIONS[name + "_sdpa"] is sdpa_mask


def test_register_text_attention_bad_arguments():
    with pytest.raises(TypeError, match="callable"):
        register_text_attention("x_not_callable", 42)  # type: ignore[arg-type]
    with pytest.raises(AttentionNotRegisteredError, match="mask"):
        register_text_attention("x_bad_mask", sdpa_attention_forward, mask="no_such_mask")
    with pytest.raises(ValueError, match="non-empty"):
        register_text_attention("", sdpa_attention_forward)


def test_torch_dtype_names_are_accepted_before_loading():
    # A valid dtype name gets past the dtype check; the unknown tiny type then raises.
    with pytest.raises(UnsupportedModelError):
        load_model("tiny-random/unknown", dtype="bfloat16")
    with pytest.raises(UnsupportedModelError):
        load_model("tiny-random/unknown", dtype=torch.float16)
