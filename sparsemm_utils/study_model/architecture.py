"""The study model: LLaVA-NeXT (``LlavaNextForConditionalGeneration``) on SmolLM2-135M-Instruct.

Why LLaVA-NeXT with a Llama language model: it is the paper's main model family
(LLaVA-NeXT-Vicuna-7B is a Llama), and its image layout suits a pretrained language model that
already copies text: the crop grid reaches the LLM row by row with a newline token after each row
(docs/method.md §3), so a page of glyphs arrives laid out like the text it shows, in ordinary 1-D
positions. One visual token covers one 28 px glyph cell (CLIP patch 28 px, 112 px crops: 4 x 4
tokens a crop), so a 336 x 224 page is a 12 x 8 token grid (+ 8 newlines) after a 4 x 4 base image.

Parts (what :func:`trained_state` keeps, everything else is the pinned backbone):

- the vision tower: a small CLIP ViT trained from scratch (``VisionSpec``);
- the projector (LLaVA's two-layer MLP, vision width -> 576) and ``image_newline`` (initialised
  to the language model's own embedding of ``"\\n"``);
- LoRA adapters (:class:`LoRALinear`) on the projections of every decoder layer, the same in
  all layers: nothing in the architecture singles out a layer or a head.

The tokenizer is SmolLM2's plus one token, ``<image>``; the embedding matrix (tied to the LM
head) gains one zero row for it, which only marks where image features go.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from sparsemm_utils.validate import check_choice, check_int

__all__ = [
    "IMAGE_TOKEN",
    "CHAT_TEMPLATE",
    "LORA_TARGETS",
    "StudyModelError",
    "VisionSpec",
    "StudyModelSpec",
    "LoRALinear",
    "build_processor",
    "build_study_model",
    "add_lora",
    "lora_modules",
    "merge_lora",
    "trained_state",
    "load_trained_state",
]

IMAGE_TOKEN = "<image>"
#: ChatML as SmolLM2 writes it, with the image placeholder first in the user turn (as LLaVA puts
#: it) and no default system turn: the study model is trained and run without a system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The linear layers of a Llama decoder layer that can carry a LoRA adapter.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class StudyModelError(ValueError):
    """The study model's spec or its trained parts are inconsistent."""


@dataclass(frozen=True)
class VisionSpec:
    """The CLIP vision tower trained from scratch: width, depth, heads, MLP width."""

    hidden: int = 192
    layers: int = 3
    heads: int = 4
    mlp: int = 768

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "mlp"):
            check_int(f"VisionSpec.{name}", getattr(self, name), 1, error=StudyModelError)
        if self.hidden % self.heads:
            raise StudyModelError(f"VisionSpec.hidden={self.hidden} must be a multiple of heads={self.heads}")


@dataclass(frozen=True)
class StudyModelSpec:
    """Geometry and adapters of the study model.

    ``cell``: glyph cell = CLIP patch (px); ``crop``: CLIP image size (px), a multiple of
    ``cell``; ``pages``: the page sizes ``(height, width)`` in px (LLaVA-NeXT's grid pinpoints:
    multiples of ``crop``; a page of exactly one of these sizes is never resized, so one token
    stays one cell); ``lora_rank`` / ``lora_alpha`` / ``lora_targets``: the adapters of every
    decoder layer (rank 0: none)."""

    cell: int = 28
    crop: int = 112
    pages: tuple[tuple[int, int], ...] = ((224, 336),)
    vision: VisionSpec = field(default_factory=VisionSpec)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        own = "StudyModelSpec"
        check_int(f"{own}.cell", self.cell, 4, error=StudyModelError)
        check_int(f"{own}.crop", self.crop, self.cell, error=StudyModelError)
        if self.crop % self.cell:
            raise StudyModelError(f"{own}.crop={self.crop} must be a multiple of cell={self.cell}")
        if not self.pages:
            raise StudyModelError(f"{own}.pages must name at least one page size (height, width)")
        for page in self.pages:
            if len(page) != 2 or any(not isinstance(v, int) or v <= 0 or v % self.crop for v in page):
                raise StudyModelError(f"{own}.pages: {page!r} must be (height, width) in px, multiples of crop={self.crop}")
        if isinstance(self.vision, Mapping):
            object.__setattr__(self, "vision", VisionSpec(**self.vision))
        object.__setattr__(self, "pages", tuple(tuple(p) for p in self.pages))
        check_int(f"{own}.lora_rank", self.lora_rank, 0, error=StudyModelError)
        if not self.lora_alpha > 0:
            raise StudyModelError(f"{own}.lora_alpha must be > 0, got {self.lora_alpha!r}")
        for target in self.lora_targets:
            check_choice(f"{own}.lora_targets", target, LORA_TARGETS, error=StudyModelError)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def grid(self) -> int:
        """Tokens per side of a crop (and of the base image): ``crop // cell``."""
        return self.crop // self.cell

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pages"] = [list(p) for p in self.pages]
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "StudyModelSpec":
        raw = dict(raw)
        raw["pages"] = tuple(tuple(p) for p in raw.get("pages", cls.pages))
        raw["lora_targets"] = tuple(raw.get("lora_targets", LORA_TARGETS))
        raw["vision"] = VisionSpec(**raw.get("vision", {}))
        return cls(**raw)


def build_processor(tokenizer: Any, spec: StudyModelSpec) -> LlavaNextProcessor:
    """LLaVA-NeXT's processor for the study geometry: the base image squashed to ``crop``, the
    crops of the page's pinpoint, CLIP normalisation; the tokenizer gains ``<image>`` when it lacks
    it. (An image-only processor: no torchvision needed.)"""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.crop},
        crop_size={"height": spec.crop, "width": spec.crop},
        image_grid_pinpoints=[list(p) for p in spec.pages],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.cell,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _llava_config(text_config: Mapping[str, Any], spec: StudyModelSpec, image_token_id: int, vocab: int) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        image_size=spec.crop,
        patch_size=spec.cell,
        hidden_size=spec.vision.hidden,
        intermediate_size=spec.vision.mlp,
        num_hidden_layers=spec.vision.layers,
        num_attention_heads=spec.vision.heads,
    )
    text = {k: v for k, v in dict(text_config).items() if k != "quantization_config"}
    text["vocab_size"] = vocab
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_grid_pinpoints=[list(p) for p in spec.pages],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    # Read by sparsemm_utils.models: the study model runs without a system turn.
    config.default_system_prompt = None
    return config


def build_study_model(backbone: Any, processor: LlavaNextProcessor, spec: StudyModelSpec, *, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """The study model with the backbone's weights in its language model, a fresh vision tower
    and projector (deterministic in ``seed``), ``image_newline`` = the backbone's embedding of
    ``"\\n"``, and LoRA adapters (zero: the language model computes exactly the backbone's function)."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(_llava_config(backbone.config.to_dict(), spec, image_id, len(tokenizer)))
    weights = {k.removeprefix("model."): v for k, v in backbone.state_dict().items() if k.startswith("model.")}
    embedding = weights.pop("embed_tokens.weight")
    result = model.model.language_model.load_state_dict(weights, strict=False)
    if result.unexpected_keys or result.missing_keys != ["embed_tokens.weight"]:
        raise StudyModelError(f"the backbone's weights do not fit the study model's language model: {result}")
    extra = torch.zeros(len(tokenizer) - embedding.shape[0], embedding.shape[1], dtype=embedding.dtype)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.copy_(torch.cat([embedding, extra]))
        newline = tokenizer.encode("\n", add_special_tokens=False)
        model.model.image_newline.copy_(embedding[newline[0]])
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise StudyModelError("the LM head must stay tied to the embeddings")
    add_lora(model, spec)
    model.eval()
    return model


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T``: a frozen linear layer plus a trainable low-rank
    update (Hu et al., arXiv 2106.09685). ``A`` (r, in) starts random, ``B`` (out, r) at zero,
    so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def delta(self) -> torch.Tensor:
        """The update of ``base.weight``: (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale


def add_lora(model: LlavaNextForConditionalGeneration, spec: StudyModelSpec) -> int:
    """Wrap ``spec.lora_targets`` of every decoder layer in :class:`LoRALinear`; returns how many."""
    if spec.lora_rank == 0:
        return 0
    count = 0
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in spec.lora_targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, spec.lora_rank, spec.lora_alpha))
                    count += 1
    return count


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: LlavaNextForConditionalGeneration) -> int:
    """Fold every adapter into its base layer (``W += delta``) and put the plain ``nn.Linear``
    back: the result is an ordinary LlavaNextForConditionalGeneration. Returns how many."""
    merged = 0
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        with torch.no_grad():
            module.base.weight += module.delta().to(module.base.weight.dtype)
        setattr(parent, child, module.base)
        merged += 1
    return merged


def _is_trained(name: str) -> bool:
    return (
        name.startswith("model.vision_tower.")
        or name.startswith("model.multi_modal_projector.")
        or name == "model.image_newline"
        or name.endswith(".lora_a")
        or name.endswith(".lora_b")
    )


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters trained here (vision tower, projector, ``image_newline``, LoRA): what
    ``data/study_model/`` ships. Everything else is the pinned backbone."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if _is_trained(k)}


def load_trained_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load :func:`trained_state` output into a freshly built study model (adapters not merged);
    every trained parameter must be given, and nothing else."""
    expected = {k for k in model.state_dict() if _is_trained(k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise StudyModelError(
            f"the trained parts do not fit this study model (spec mismatch?): missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(dict(state), strict=False)
