"""Loading the supported MLLMs and steering the attention of their language model (docs/method.md §1).

One entry point, :func:`load_model`, takes

- ``"tiny-random/<model_type>"``: a tiny random-weight model of the real class, built in-process
  (:mod:`sparsemm_utils.random_models`), deterministic from ``seed``;
- a local folder (``save_pretrained`` output, e.g. from :func:`~sparsemm_utils.random_models.save_tiny`);
- a hub id (``"Qwen/Qwen2-VL-7B-Instruct"``), looked up in the local HF cache only: the hub is never
  contacted. A model that is not there raises :class:`ModelNotAvailableError`, which says how to
  download it first.

:data:`SUPPORTED_MODEL_TYPES`, :data:`TINY_PREFIX` and :class:`UnsupportedModelError` live in
:mod:`sparsemm_utils.model_types` (so that :mod:`sparsemm_utils.random_models` can use them
without importing this module) and are re-exported here.

The compression methods of later steps are attention functions registered with transformers'
``AttentionInterface`` and applied to the LANGUAGE model only (the vision tower keeps ``sdpa``):
:mod:`sparsemm_utils.attention_hooks` does both (``register_text_attention``, ``set_text_attention``
and the other names listed there are re-exported here).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import AutoProcessor, PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from sparsemm_utils.attention_hooks import (
    AttentionNotRegisteredError,
    register_text_attention,
    set_text_attention,
    text_attention_implementation,
    vision_attention_implementation,
)
from sparsemm_utils.model_types import SUPPORTED_MODEL_TYPES, TINY_PREFIX, UnsupportedModelError
from sparsemm_utils.processors import (
    QWEN_PROCESSOR_TYPES,
    image_only_processor_class,
    set_qwen_pixel_bounds,
    sparsemm_pixel_bounds,
)
from sparsemm_utils.random_models import build_tiny
from sparsemm_utils.runs import repo_root

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TINY_PREFIX",
    "UnsupportedModelError",
    "ModelNotAvailableError",
    "ModelFilesError",
    "AttentionNotRegisteredError",
    "LoadedModel",
    "load_model",
    "read_model_type",
    "check_model_files",
    "register_text_attention",
    "set_text_attention",
    "text_attention_implementation",
    "vision_attention_implementation",
]


class ModelNotAvailableError(FileNotFoundError):
    """The model is neither a local folder nor in the local Hugging Face cache."""

    def __init__(self, name_or_path: str, reason: str = ""):
        self.name_or_path = name_or_path
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface (default)")
        super().__init__(
            f"model {name_or_path!r} is not available offline: it is not a local folder and not in the Hugging "
            f"Face cache (HF_HOME={hf_home}){': ' + reason if reason else ''}. The weights must be downloaded "
            "first, on a machine with hub access (this project never contacts the hub), either\n"
            f"  (a) into the HF cache: `hf download {name_or_path}` (or huggingface_hub.snapshot_download), "
            "then make that cache visible here (same HF_HOME) and run with HF_HUB_OFFLINE=1; or\n"
            f"  (b) into a folder: model = AutoModelForImageTextToText.from_pretrained({name_or_path!r}); "
            "model.save_pretrained(folder); AutoProcessor.from_pretrained(...).save_pretrained(folder); "
            "then call load_model(folder).\n"
            "Offline, use a tiny model instead: load_model("
            + " | ".join(f"'{TINY_PREFIX}{t}'" for t in SUPPORTED_MODEL_TYPES)
            + ")."
        )


class ModelFilesError(ValueError):
    """A file of a local model folder is damaged (half a ``config.json``, a truncated
    ``model.safetensors``): the message names the file and how to get a good copy."""

    def __init__(self, folder: str | Path, file: str | Path, problem: str):
        self.folder = Path(folder)
        self.file = Path(file)
        super().__init__(
            f"model folder {folder}: {file} {problem}. The folder is damaged (an interrupted copy or download, or "
            f"an edit): copy or download the model again; for the shipped tiny reader, restore it from git "
            f"(`git checkout -- data/tiny_reader`); for a hub model, `hf download <id>` again into the HF cache"
        )


#: Bytes of a safetensors file's header-length prefix (little-endian u64).
_SAFETENSORS_PREFIX = 8


def _check_safetensors(folder: Path, file: Path) -> None:
    """A safetensors file holds its 8-byte header length, the JSON header, and exactly the tensor
    bytes the header's ``data_offsets`` describe; anything shorter was cut off."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(_SAFETENSORS_PREFIX)
        if len(prefix) < _SAFETENSORS_PREFIX:
            raise ModelFilesError(folder, file, f"has {size} bytes, too few for a safetensors header (truncated?)")
        length = int.from_bytes(prefix, "little")
        if _SAFETENSORS_PREFIX + length > size:
            raise ModelFilesError(
                folder, file, f"has {size} bytes but its header alone needs {_SAFETENSORS_PREFIX + length} (truncated?)"
            )
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ModelFilesError(folder, file, f"has an unreadable safetensors header ({exc})") from None
    expected = _SAFETENSORS_PREFIX + length + end
    if size != expected:
        raise ModelFilesError(
            folder, file, f"has {size} bytes but its header describes {expected} ({'truncated' if size < expected else 'extra bytes'})"
        )


def check_model_files(folder: str | Path) -> None:
    """Check a local model folder before loading it: every top-level ``*.json`` parses, and every
    ``*.safetensors`` has exactly the bytes its header describes (:class:`ModelFilesError`
    naming the file otherwise). Reads only the JSON files and the safetensors headers."""
    folder = Path(folder)
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFilesError(folder, file, f"is not valid JSON ({exc}; half a file?)") from None
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors(folder, file)


@dataclass
class LoadedModel:
    """A model, its processor, and the shapes of its LANGUAGE model that budgets need (docs/method.md §1, §5).

    ``num_layers`` L, ``num_heads`` H (query heads), ``num_kv_heads`` H_kv, ``head_dim`` d: the
    head scores of step 03 are (L, H), the budgets of step 04 are (L, H_kv).
    """

    model: PreTrainedModel
    processor: ProcessorMixin
    model_type: str
    name_or_path: str

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(self.model_type)

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        kv = getattr(self.text_config, "num_key_value_heads", None)
        return int(kv if kv is not None else self.num_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.text_config, "head_dim", None)
        return int(hd if hd is not None else self.text_config.hidden_size // self.num_heads)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack whose attention the study compresses (``model.model.language_model``)."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def read_model_type(folder: str | Path) -> str:
    """``model_type`` from ``folder/config.json``; :class:`UnsupportedModelError` when it is not supported."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelNotAvailableError(str(folder), reason=f"the folder has no config.json ({config_path})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFilesError(folder, config_path, f"is not valid JSON ({exc}; half a file?)") from None
    if not isinstance(config, dict):
        raise ModelFilesError(folder, config_path, f"must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(model_type, where=str(config_path))
    return model_type


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be 'auto', a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def _load_processor(folder: Path, model_type: str) -> ProcessorMixin:
    cls = image_only_processor_class(model_type)
    if cls is not None:
        # A real checkpoint names Qwen2VLProcessor (or Qwen3VLProcessor, LlavaOnevisionProcessor,
        # InternVLProcessor), which needs torchvision for its video processor: load through the
        # image-only subclass instead (it reads the same files).
        return cls.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    if not isinstance(processor, ProcessorMixin):
        raise ModelNotAvailableError(
            str(folder), reason=f"AutoProcessor found only a {type(processor).__name__}, not a full processor"
        )
    return processor


def _hub_snapshot(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of a cached hub repo (``cache_dir``: the HF hub cache, default the
    one under HF_HOME); never touches the network."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except HFValidationError as err:
        raise ModelNotAvailableError(repo_id, reason=f"no such local folder, and not a valid hub id ({err})") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        raise ModelNotAvailableError(repo_id, reason=type(err).__name__) from None


def _local_path(name: str) -> Path:
    """``name`` as a local path: as given when it exists from the working directory, else, for a
    relative path, taken from the repository root (so ``data/tiny_reader`` works from papermill,
    whose cwd is the root, and from JupyterLab, whose kernels start in ``notebooks/``)."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute():
        return path
    from_root = repo_root() / path
    return from_root if from_root.exists() else path


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    text_attn_implementation: str = "sdpa",
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a supported model and its processor (see the module docstring for the resolution order).

    ``dtype``: "auto" (the checkpoint's dtype; float32 for tiny models), a torch.dtype or its name.
    ``text_attn_implementation``: the attention of the language model (the vision tower keeps
    sdpa); a custom name must be registered first (:func:`register_text_attention`).
    ``seed``: only for ``tiny-random/`` models (same seed, same weights).
    ``min_pixels`` / ``max_pixels``: Qwen image resize bounds (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); None
    (both): SparseMM's, 32 .. 16384 merged tokens of the model's own token size (28 px, or 32 px
    for Qwen3-VL; docs/method.md §3). Give both or neither.
    ``cache_dir``: the HF hub cache to look a hub id up in (default: the one under HF_HOME).
    The model is returned in eval mode on ``device``.
    """
    torch_dtype = _resolve_dtype(dtype)
    if (min_pixels is None) != (max_pixels is None):
        raise ValueError(
            f"give both min_pixels and max_pixels or neither (None: SparseMM's bounds), got {min_pixels}, {max_pixels}"
        )
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        model_type = name[len(TINY_PREFIX) :]
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(model_type, where=name)
        model, processor = build_tiny(model_type, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
    else:
        path = _local_path(name)
        if path.exists() and not path.is_dir():
            raise ModelNotAvailableError(name, reason="the path exists but is a file; pass the model's folder")
        folder = path if path.is_dir() else _hub_snapshot(name, cache_dir)
        model_type = read_model_type(folder)
        check_model_files(folder)
        model = SUPPORTED_MODEL_TYPES[model_type].from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa")
        processor = _load_processor(folder, model_type)
        if model_type in QWEN_PROCESSOR_TYPES:
            image_processor = processor.image_processor
            bounds = (min_pixels, max_pixels) if min_pixels is not None else sparsemm_pixel_bounds(
                int(image_processor.patch_size) * int(image_processor.merge_size)
            )
            set_qwen_pixel_bounds(processor, *bounds)
    model = model.to(device).eval()
    set_text_attention(model, text_attn_implementation)
    return LoadedModel(model=model, processor=processor, model_type=model_type, name_or_path=name)
