"""The model types the project runs, and the error for any other (docs/method.md §1).

Kept apart from :mod:`sparsemm_utils.models` (loading) and :mod:`sparsemm_utils.random_models`
(building tiny random-weight models) because both need it: ``models`` builds a
``tiny-random/<model_type>`` model through ``random_models``, and ``random_models`` builds only
the types listed here. Both import this module; neither imports the other's importer.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from transformers import (
    InternVLForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UNSUPPORTED_RELATIVES",
    "TINY_PREFIX",
    "UnsupportedModelError",
    "is_random_weight_model",
]

#: model_type (config.json) -> the transformers class that runs it (docs/method.md §1).
SUPPORTED_MODEL_TYPES: Mapping[str, type[PreTrainedModel]] = MappingProxyType(
    {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
    }
)
#: Why the model types of the same families that are NOT supported are left out (docs/models.md).
UNSUPPORTED_RELATIVES: Mapping[str, str] = MappingProxyType(
    {
        "qwen3_vl_moe": (
            "Qwen3-VL-30B-A3B and -235B-A22B share Qwen3-VL's attention (heads, GQA, interleaved M-RoPE, deepstack), "
            "so head scoring and compression would run unchanged; they are left out because their weights (about 31B "
            "and 236B parameters, 62 and 470 GB in bf16) leave one 80 GB GPU no room for the paper's 32K-token "
            "protocol (the 235B does not fit at all), and because step 06 times random-weight models while an MoE "
            "layer's decode time depends on which experts a trained router picks"
        ),
    }
)
#: ``load_model(TINY_PREFIX + model_type)`` builds a tiny random-weight model of that type.
TINY_PREFIX = "tiny-random/"


def is_random_weight_model(model_id: Any) -> bool:
    """Whether ``model_id`` names a tiny random-weight model (``"tiny-random/<model_type>"``): its
    heads were never trained, so no head has a reason to read the image and the paper's claims
    about visual heads cannot be checked on it (the findings say "cannot tell")."""
    return str(model_id).startswith(TINY_PREFIX)


class UnsupportedModelError(ValueError):
    """The model type is not one of :data:`SUPPORTED_MODEL_TYPES`."""

    def __init__(self, model_type: Any, where: str = ""):
        self.model_type = model_type
        origin = f" (from {where})" if where else ""
        why = f" {model_type!r} is left out on purpose: {UNSUPPORTED_RELATIVES[model_type]}." if model_type in UNSUPPORTED_RELATIVES else ""
        super().__init__(
            f"unsupported model_type {model_type!r}{origin}: supported types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (classes "
            f"{', '.join(c.__name__ for c in SUPPORTED_MODEL_TYPES.values())}); for a tiny offline model use "
            f"'{TINY_PREFIX}<model_type>', e.g. '{TINY_PREFIX}qwen2_vl'.{why}"
        )
