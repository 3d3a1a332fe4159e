"""Which token is which: LLaVA-Mini's three categories and the prompt's finer roles (docs/method.md §8).

LLaVA-Mini (arXiv 2501.03895, section 3 and appendix A) splits the tokens the language model
sees into three categories and follows, layer by layer, how much attention each category pays
to each other one (:mod:`sparsemm_utils.category_attention`). This module says which position
belongs to which category (:func:`token_categories`, from the ids alone) and, finer, which role
(:func:`prompt_layout`, from the chat template).

- **vision**: every position holding the model's image token id (Qwen: the ``<|image_pad|>``
  block; LLaVA-NeXT / LLaVA-OneVision: base grid + crop grid, newline tokens included, since the
  processor gives them all the ``<image>`` id; InternVL: the ``<IMG_CONTEXT>`` tokens of every
  tile and the thumbnail, its ``<img>`` / ``</img>`` being template tokens; LLaVA-Mini also
  treats global and local tokens as one category).
- **response**: every generated position (``>= prompt_len``).
- **instruction**: every other prompt position: the system prompt, the user's text, AND the
  chat-template tokens around them (Qwen's ``<|im_start|>``, role names, ``<|im_end|>``,
  ``<|vision_start|>`` / ``<|vision_end|>``, ``<|im_start|>assistant\\n``; LLaVA's ``<s>``,
  ``USER:``, ``ASSISTANT:``). Decision and reason: LLaVA-Mini's Eq. 1 writes the prompt as
  instruction tokens with the vision tokens inserted in the middle, i.e. every non-vision prompt
  token is instruction; the template tokens are text the model reads as part of the instruction.
  They matter: the first template token is the attention sink of the sequence, so moving it out
  of "instruction" would change the numbers a lot. :func:`prompt_layout` keeps the finer roles
  (template / system / user / vision / response) for anyone who wants to split them.

The errors of the whole step-07 analysis (:class:`LayerAnalysisError` and its subclasses) are
defined here, the lowest of its modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsemm_utils.prompts import DEFAULT_SYSTEM_PROMPT, OCR_PROMPT, _infer_model_type, build_messages, resolve_system_prompt
from sparsemm_utils.validate import is_int

__all__ = [
    "INSTRUCTION",
    "VISION",
    "RESPONSE",
    "CATEGORIES",
    "ROLES",
    "ROLE_CATEGORY",
    "LayerAnalysisError",
    "CategoryLabelError",
    "AttentionShapeError",
    "PromptLayoutError",
    "PromptLayout",
    "token_categories",
    "prompt_layout",
]

#: Category codes (LLaVA-Mini's three token types) and their names, in code order.
INSTRUCTION, VISION, RESPONSE = 0, 1, 2
CATEGORIES: tuple[str, ...] = ("instruction", "vision", "response")
#: Finer roles of :func:`prompt_layout`, and the category each belongs to.
ROLES: tuple[str, ...] = ("template", "system", "user", "vision", "response")
ROLE_CATEGORY: Mapping[str, int] = {
    "template": INSTRUCTION,
    "system": INSTRUCTION,
    "user": INSTRUCTION,
    "vision": VISION,
    "response": RESPONSE,
}


class LayerAnalysisError(ValueError):
    """Base class of the errors of step 07's analysis (this module, :mod:`~sparsemm_utils.category_attention`,
    :mod:`~sparsemm_utils.layer_stats_capture`, :mod:`~sparsemm_utils.steps.attention_by_layer`)."""


class CategoryLabelError(LayerAnalysisError):
    """Category labels that are not codes 0..C-1, or do not match the attention's shape."""


class AttentionShapeError(LayerAnalysisError):
    """An attention matrix, query or key of the wrong shape (batch > 1, rows != labels, ...)."""


class PromptLayoutError(LayerAnalysisError):
    """The prompt's token roles cannot be recovered (the tokenizer does not reproduce the ids)."""


def _ids_1d(input_ids: Any) -> np.ndarray:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().cpu().numpy()
    else:
        ids = np.asarray(input_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise AttentionShapeError(f"one sequence at a time: input_ids of shape (1, n) or (n,), got {ids.shape}")
        ids = ids[0]
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise AttentionShapeError(f"input_ids must be a 1-D integer sequence (n,) or (1, n), got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64, copy=False)


def token_categories(input_ids: Any, image_token_id: int, prompt_len: int | None = None) -> np.ndarray:
    """Category code of every position (module docstring): int8 ``(n,)``.

    ``input_ids``: ``(n,)`` or ``(1, n)``, the prompt followed by the generated tokens;
    ``prompt_len``: how many of them are the prompt (None: all of them). Positions
    ``>= prompt_len`` are :data:`RESPONSE` (even a generated token equal to the image token id);
    prompt positions holding ``image_token_id`` are :data:`VISION`; the rest :data:`INSTRUCTION`.
    """
    ids = _ids_1d(input_ids)
    n = ids.size
    if prompt_len is None:
        prompt_len = n
    if not is_int(prompt_len) or not 0 <= prompt_len <= n:
        raise CategoryLabelError(f"prompt_len must be an int in [0, {n}] (the sequence has {n} tokens), got {prompt_len!r}")
    labels = np.full(n, INSTRUCTION, dtype=np.int8)
    labels[:prompt_len][ids[:prompt_len] == int(image_token_id)] = VISION
    labels[prompt_len:] = RESPONSE
    return labels


@dataclass(frozen=True)
class PromptLayout:
    """Roles of the positions of one sequence (prompt + response).

    ``roles``: int8 ``(n,)`` codes into :data:`ROLES`; ``prompt_len``; ``image_start`` /
    ``num_image_tokens``: the first vision position and how many there are.
    """

    roles: np.ndarray
    prompt_len: int

    def __post_init__(self) -> None:
        roles = np.asarray(self.roles, dtype=np.int8)
        if roles.ndim != 1 or (roles.size and (roles.min() < 0 or roles.max() >= len(ROLES))):
            raise CategoryLabelError(f"roles must be codes 0..{len(ROLES) - 1} of shape (n,), got {roles!r}")
        object.__setattr__(self, "roles", roles)

    @property
    def categories(self) -> np.ndarray:
        """int8 ``(n,)`` category codes (template, system, user -> instruction)."""
        lookup = np.array([ROLE_CATEGORY[r] for r in ROLES], dtype=np.int8)
        return lookup[self.roles]

    @property
    def image_start(self) -> int:
        where = np.flatnonzero(self.roles == ROLES.index("vision"))
        return int(where[0]) if where.size else -1

    @property
    def num_image_tokens(self) -> int:
        return int((self.roles == ROLES.index("vision")).sum())

    def counts(self) -> dict[str, int]:
        """Tokens per role, ``{role: count}`` in :data:`ROLES` order."""
        return {name: int((self.roles == i).sum()) for i, name in enumerate(ROLES)}

    def spans(self) -> list[tuple[str, int, int]]:
        """Runs of equal role: ``[(role, start, stop), ...]`` (stop exclusive), in position order."""
        out: list[tuple[str, int, int]] = []
        start = 0
        for i in range(1, self.roles.size + 1):
            if i == self.roles.size or self.roles[i] != self.roles[start]:
                out.append((ROLES[int(self.roles[start])], start, i))
                start = i
        return out


def _processor_parts(loaded_or_processor: Any, model_type: str | None) -> tuple[Any, str, int]:
    if hasattr(loaded_or_processor, "processor") and hasattr(loaded_or_processor, "model_type"):
        return loaded_or_processor.processor, model_type or loaded_or_processor.model_type, loaded_or_processor.image_token_id
    processor = loaded_or_processor
    if model_type is None:
        model_type = _infer_model_type(processor)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if model_type is None:
        raise PromptLayoutError(f"cannot tell the model family of {type(processor).__name__}: pass model_type=")
    return processor, model_type, int(image_token_id)


def prompt_layout(
    loaded_or_processor: Any,
    input_ids: Any,
    text: str = OCR_PROMPT,
    *,
    prompt_len: int | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    model_type: str | None = None,
) -> PromptLayout:
    """The role of every position of a prompt built by :func:`sparsemm_utils.prompts.build_inputs`.

    The chat is rendered again with the family's template (``text``, ``system_prompt`` as given to
    ``build_inputs``), the image placeholder expanded to as many image tokens as ``input_ids``
    holds, and tokenized with character offsets; the ids must equal ``input_ids[:prompt_len]``
    (else :class:`PromptLayoutError`). A token overlapping the system prompt's characters is
    ``system``, one overlapping the user text ``user``, an image token ``vision``, any other
    prompt token ``template``; positions ``>= prompt_len`` are ``response``. With a subword
    tokenizer a token straddling a boundary (e.g. a leading space) takes the content role.
    """
    processor, model_type, image_token_id = _processor_parts(loaded_or_processor, model_type)
    ids = _ids_1d(input_ids)
    n = ids.size
    if prompt_len is None:
        prompt_len = n
    if not is_int(prompt_len) or not 0 < prompt_len <= n:
        raise CategoryLabelError(f"prompt_len must be an int in [1, {n}], got {prompt_len!r}")
    tokenizer = processor.tokenizer
    system_prompt = resolve_system_prompt(loaded_or_processor, model_type, system_prompt)
    messages = build_messages(text, model_type, system_prompt)
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    n_image = int((ids[:prompt_len] == image_token_id).sum())
    if rendered.count(image_token) != 1:
        raise PromptLayoutError(
            f"the rendered chat holds {rendered.count(image_token)} image placeholders {image_token!r}; one is expected"
        )
    # InternVL wraps its image tokens in <img> ... </img>, which are template tokens, not image tokens
    wrap = (getattr(processor, "start_image_token", ""), getattr(processor, "end_image_token", ""))
    expanded = rendered.replace(image_token, wrap[0] + image_token * n_image + wrap[1])
    encoding = tokenizer(expanded, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != ids[:prompt_len].tolist():
        raise PromptLayoutError(
            "re-tokenizing the rendered chat does not reproduce the prompt's input_ids: pass the same text and "
            "system_prompt that built the inputs (prompts.build_inputs), or use token_categories(), which needs only "
            "the ids"
        )
    spans: list[tuple[int, int, int]] = []  # (start, stop, role code)
    if system_prompt is not None:
        sys_text = build_messages(text, model_type, system_prompt)[0]["content"][0]["text"]
        start = expanded.find(sys_text)
        if start >= 0:
            spans.append((start, start + len(sys_text), ROLES.index("system")))
    user_start = expanded.rfind(text)
    if user_start < 0:
        raise PromptLayoutError(f"the user text {text!r} is not in the rendered chat")
    spans.append((user_start, user_start + len(text), ROLES.index("user")))
    special = set(tokenizer.all_special_ids)
    roles = np.full(n, ROLES.index("response"), dtype=np.int8)
    for pos, (tok, (s, e)) in enumerate(zip(encoding["input_ids"], encoding["offset_mapping"])):
        if tok == image_token_id:
            roles[pos] = ROLES.index("vision")
            continue
        role = ROLES.index("template")
        if tok not in special and e > s:
            for a, b, code in spans:
                if s < b and e > a:
                    role = code
                    break
        roles[pos] = role
    return PromptLayout(roles=roles, prompt_len=int(prompt_len))
