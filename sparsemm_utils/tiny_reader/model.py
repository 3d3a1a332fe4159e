"""The reader model: a ``Qwen2VLForConditionalGeneration`` of :class:`~.config.ReaderModelSpec`'s
sizes (:func:`build_reader`), the training-only :class:`AuxiliaryHeads`, and the faster patch
embedding used while training (:class:`linear_patch_embedding`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

from sparsemm_utils.random_models import build_char_tokenizer, build_tiny_processor, tiny_config
from sparsemm_utils.tiny_reader.config import ReaderModelSpec

__all__ = ["POSITION_CLASSES", "build_reader", "count_parameters", "AuxiliaryHeads", "linear_patch_embedding"]

#: Rows (and, apart, columns) of merged visual tokens the position head can name. Reader pages
#: have at most 6 x 11 (167 x 307 px, resized to multiples of 28).
POSITION_CLASSES: int = 16


def build_reader(spec: ReaderModelSpec | None = None, *, seed: int = 0):
    """A fresh (untrained) reader and its processor: ``(Qwen2VLForConditionalGeneration, processor)``.

    The processor is :func:`~sparsemm_utils.random_models.build_tiny_processor` (character tokenizer,
    Qwen2-VL image processor with SparseMM's pixel bounds); the model is float32, sdpa, in train
    mode, with weights drawn under ``torch.manual_seed(seed)`` (the global RNG is restored) and
    greedy generation stopping at ``<|im_end|>`` / ``<|endoftext|>``."""
    spec = spec or ReaderModelSpec()
    tokenizer = build_char_tokenizer("qwen2_vl")
    processor = build_tiny_processor("qwen2_vl", tokenizer)
    config = tiny_config("qwen2_vl", tokenizer, spec.tiny_spec())
    config.text_config.rope_parameters["rope_theta"] = float(spec.rope_theta)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], pad_token_id=ids("<|endoftext|>"), do_sample=False
    )
    return model.to(torch.float32).train(), processor


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total", "vision", "text"}`` parameter counts (text = everything outside the vision tower)."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"total": total, "vision": vision, "text": total - vision}


class AuxiliaryHeads(nn.Module):
    """The training-only heads (never part of the checkpoint; saved apart, never used at inference).

    - ``glyph``: ``Linear(hidden, n_glyph_classes)`` on the vision tower's merged output
      (the language model's visual input embeddings, (visual tokens, hidden)): which character is
      drawn in each visual token, 0 = none.
    - ``position`` (``None`` when ``position_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)``
      on the language model's hidden state of each visual token after decoder layer
      ``position_layer``: its row (first half of the logits) and column (second half) in the
      merged grid. The vision tower cannot say where a token is (its rotary attention is
      translation-equivariant and the page background is uniform), but the language model can
      (causal attention over the fixed prefix tokens before the image), and a visual token that
      knows its row lets a question address a line by content ("the line that starts with KEY").
    - ``pointer`` (``None`` when ``pointer_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)``
      on the language model's hidden state after decoder layer ``pointer_layer`` at every answer
      step that emits a character drawn on the page: the row and column of the visual token that
      character is read from (:func:`~sparsemm_utils.tiny_reader.batches.answer_pointer_labels`),
      so that each answer step carries the row its key was found on instead of drifting to
      another line (the drift :func:`~sparsemm_utils.tiny_reader.accuracy.value_error_sources`
      measures).
    - ``key`` (``None`` when ``key_weight`` is 0): ``Linear(hidden, 2 * POSITION_CLASSES)`` on the
      hidden state after decoder layer ``key_layer`` at the prompt steps of a value question from
      the key's last character to the step before the answer
      (:func:`~sparsemm_utils.tiny_reader.batches.collate`'s ``key_labels``): the row and column
      of the key's last glyph. It asks for the key match where it can be computed, before the
      answer step has to use it (an earlier layer than the pointer's, so that the layers after it
      can carry the row to the answer step and read the value there).

    The accuracy each head added, run against run, is in docs/tiny_reader.md.

    ``glyph`` is initialised under ``torch.manual_seed(seed + 1)``, ``position`` under ``seed + 2``,
    ``pointer`` under ``seed + 3`` and ``key`` under ``seed + 4``, so a run without a head has the
    same initial weights as before that head existed."""

    def __init__(
        self, hidden: int, n_glyph_classes: int, *, position: bool, seed: int, pointer: bool = False, key: bool = False
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.glyph = nn.Linear(hidden, n_glyph_classes)
            torch.manual_seed(seed + 2)
            self.position = nn.Linear(hidden, 2 * POSITION_CLASSES) if position else None
            torch.manual_seed(seed + 3)
            self.pointer = nn.Linear(hidden, 2 * POSITION_CLASSES) if pointer else None
            torch.manual_seed(seed + 4)
            self.key = nn.Linear(hidden, 2 * POSITION_CLASSES) if key else None


class linear_patch_embedding:
    """Context manager: compute the vision tower's patch embedding as a matrix product.

    Qwen2-VL embeds each patch with a ``Conv3d`` whose kernel equals its stride and the patch
    itself (3 x 2 x 14 x 14), i.e. a linear map of the flattened patch; on CPU the convolution's
    backward pass is several times slower than the same product done by ``F.linear``. Inside the
    context the module's forward uses ``F.linear(x, weight.view(embed_dim, -1))``: the same
    parameter, the same function (equal up to float rounding), nothing saved differs."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model.model.visual.patch_embed

    def __enter__(self) -> "linear_patch_embedding":
        pe = self.module
        weight = pe.proj.weight

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
            return nn.functional.linear(flat, weight.view(pe.embed_dim, -1))

        pe.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.module.forward  # back to the class's forward
