"""Where the model looks, layer by layer: LLaVA-Mini's attention analysis (docs/method.md §8, step 07).

LLaVA-Mini (arXiv 2501.03895, section 3 and appendix A) splits the tokens the language model
sees into three categories and follows, layer by layer, how much attention each category pays
to each other one. This module computes that analysis for any supported model, plus the
head-level view that joins it to SparseMM's visual heads (step 03).

Token categories (:func:`token_categories`, :func:`prompt_layout`)
--------------------------------------------------------------------
- **vision**: every position holding the model's image token id (Qwen: the ``<|image_pad|>``
  block; LLaVA-NeXT: base grid + crop grid, newline tokens included, since the processor gives
  them all the ``<image>`` id; LLaVA-Mini also treats global and local tokens as one category).
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

Category attention (docs/method.md §8, LLaVA-Mini Eq. 4)
-----------------------------------------------------
With ``a_ij`` the attention of query i to key j averaged over the heads of a layer::

    Attn(tgt -> src) = sum_{i in tgt} sum_{j in src} a_ij  /  #{i in tgt : sum_{j in src} a_ij > 0}

The denominator counts only the target rows that put non-zero mass on the source: under the
causal mask the system-prompt tokens before the image cannot see it, and no prompt token can
see the response, so those rows do not dilute the average. A pair with no such row is undefined
(NaN). Attention entropy (LLaVA-Mini appendix A) renormalises each counted row over the source
category, ``p_j = a_ij / sum_{j in src} a_ij``, takes ``-sum_j p_j ln p_j`` (nats), and averages
over the same rows; ``max_entropy`` is the mean of ``ln(#source keys the row sees)``, the value
of uniform attention.

How it is measured (:func:`analyse_sample`)
-------------------------------------------
Greedy generation with the standard path gives the response; one forward pass over prompt +
response with the attention function :func:`layer_stats_attention` (registered under
:data:`LAYER_STATS_ATTENTION`, language model only) then computes every layer's output with
``sdpa`` (the model's own numbers) and, on the side, the softmax attention rows in chunks of
``chunk_size`` queries (float32), reduced at once to per-row category masses, entropies and
per-head masses: memory O(H * chunk * N) per layer, never (L, H, N, N).

Head-level view (:meth:`LayerStats.head_share`)
-----------------------------------------------
Per query head, the share of attention that goes to vision tokens, averaged over the rows that
*generated* the response (the last prompt token and every response token but the last: the rows
SparseMM's score reads, docs/method.md §4), set against the head's visual score from step 03
(:func:`head_vision_share_table`, :func:`spearman`).

Shapes: ``L`` layers, ``H`` query heads, ``N`` tokens (prompt + response), ``C = 3`` categories.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.attention_capture import text_attention
from sparsemm_utils.models import LoadedModel, register_text_attention
from sparsemm_utils.prompts import DEFAULT_SYSTEM_PROMPT, OCR_PROMPT, build_messages

__all__ = [
    "STEP",
    "INSTRUCTION",
    "VISION",
    "RESPONSE",
    "CATEGORIES",
    "ROLES",
    "ROLE_CATEGORY",
    "ROW_SELECTIONS",
    "LAYER_STATS_ATTENTION",
    "LayerAnalysisError",
    "CategoryLabelError",
    "AttentionShapeError",
    "PromptLayoutError",
    "AttentionByLayerConfig",
    "PromptLayout",
    "LayerStats",
    "LayerStatsRecorder",
    "token_categories",
    "prompt_layout",
    "allowed_keys",
    "category_mass",
    "category_entropy_rows",
    "visible_key_counts",
    "eq4_attention",
    "category_attention",
    "category_entropy",
    "row_entropy_average",
    "layer_stats_attention",
    "register_layer_stats",
    "recording_layer_stats",
    "forward_inputs_with_response",
    "analyse_sample",
    "category_attention_table",
    "entropy_table",
    "head_vision_share_table",
    "spearman",
    "findings_table",
]

#: The step folder this module's notebook writes into.
STEP = "07_attention_by_layer"

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
#: Which query rows :meth:`LayerStats.head_share` averages over.
ROW_SELECTIONS: tuple[str, ...] = ("generating", "response", "instruction", "all")

#: Name of :func:`layer_stats_attention` in transformers' AttentionInterface.
LAYER_STATS_ATTENTION = "sparsemm_layer_stats"


# ---------------------------------------------------------------------------------------- errors


class LayerAnalysisError(ValueError):
    """Base class of this module's errors."""


class CategoryLabelError(LayerAnalysisError):
    """Category labels that are not codes 0..C-1, or do not match the attention's shape."""


class AttentionShapeError(LayerAnalysisError):
    """An attention matrix, query or key of the wrong shape (batch > 1, rows != labels, ...)."""


class PromptLayoutError(LayerAnalysisError):
    """The prompt's token roles cannot be recovered (the tokenizer does not reproduce the ids)."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------------------------------- config


@dataclass
class AttentionByLayerConfig:
    """Parameters of notebook 07 (validated).

    ``n_samples``: step-01 documents analysed with the OCR prompt (the prompt step 03 scores on);
    ``max_new_tokens``: greedy response length for the analysis and the benchmark;
    ``chunk_size``: query rows per attention chunk; ``benchmark_documents``: held-out reader pages
    for the vision-drop ablation and FastV (:func:`sparsemm_utils.reader_tasks.heldout_documents`);
    ``tasks``: reader tasks asked on them; ``layer_range_size``: layers per dropped range
    (LLaVA-Mini: 4, i.e. 1-4, 5-8, ... on 32 layers); ``readings``: ``"inside"`` (drop only in the
    range) and/or ``"from"`` (drop from the range to the last layer); ``fastv_k`` (layers that see
    every image token) and ``fastv_ratios`` (share R of image tokens dropped after them);
    ``dtype`` / ``device``: passed to ``load_model``; ``threads``: torch CPU threads (0: torch's
    default; 1 is fastest for tiny models on a shared CPU).
    """

    run_dir: str = "runs/dev"
    model_id: str = "tiny-random/qwen2_vl"
    seed: int = 0
    n_samples: int = 4
    max_new_tokens: int = 64
    chunk_size: int = 256
    benchmark_documents: int = 6
    tasks: tuple[str, ...] = ("ocr", "line", "value")
    layer_range_size: int = 1
    readings: tuple[str, ...] = ("inside", "from")
    fastv_k: int = 2
    fastv_ratios: tuple[float, ...] = (0.0, 0.5, 0.75)
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0

    def __post_init__(self) -> None:
        from sparsemm_utils.reader_tasks import TASK_TYPES
        from sparsemm_utils.vision_drop import READINGS

        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise LayerAnalysisError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise LayerAnalysisError(f"model_id must be a non-empty string, got {self.model_id!r}")
        for name, minimum in (
            ("seed", 0),
            ("n_samples", 1),
            ("max_new_tokens", 1),
            ("chunk_size", 1),
            ("benchmark_documents", 1),
            ("layer_range_size", 1),
            ("fastv_k", 1),
            ("threads", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise LayerAnalysisError(f"{name} must be an int >= {minimum}, got {value!r}")
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASK_TYPES]
        if unknown or not self.tasks:
            raise LayerAnalysisError(f"tasks must be a non-empty subset of {list(TASK_TYPES)}, got {list(self.tasks)}")
        self.readings = tuple(self.readings)
        if not self.readings or any(r not in READINGS for r in self.readings):
            raise LayerAnalysisError(f"readings must be a non-empty subset of {list(READINGS)}, got {list(self.readings)}")
        for name in ("dtype", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LayerAnalysisError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        self.fastv_ratios = tuple(self.fastv_ratios)
        for r in self.fastv_ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
                raise LayerAnalysisError(f"fastv_ratios must hold numbers in [0, 1], got {list(self.fastv_ratios)}")


# ------------------------------------------------------------------------------------ categories


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
    if not _is_int(prompt_len) or not 0 <= prompt_len <= n:
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
        from sparsemm_utils.prompts import _infer_model_type

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
    if not _is_int(prompt_len) or not 0 < prompt_len <= n:
        raise CategoryLabelError(f"prompt_len must be an int in [1, {n}], got {prompt_len!r}")
    tokenizer = processor.tokenizer
    messages = build_messages(text, model_type, system_prompt)
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    n_image = int((ids[:prompt_len] == image_token_id).sum())
    if rendered.count(image_token) != 1:
        raise PromptLayoutError(
            f"the rendered chat holds {rendered.count(image_token)} image placeholders {image_token!r}; one is expected"
        )
    expanded = rendered.replace(image_token, image_token * n_image)
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


# ------------------------------------------------------------------------------ pure attention math


def _check_labels(labels: Any, n: int, num_categories: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise CategoryLabelError(f"{what} must have shape ({n},) to match the attention, got {labels.shape}")
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_categories):
        raise CategoryLabelError(f"{what} must be integer codes in 0..{num_categories - 1}, got {labels!r}")
    return labels.astype(np.int64, copy=False)


def _one_hot(labels: np.ndarray, num_categories: int, like: torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(labels, device=like.device, dtype=torch.long)
    return torch.nn.functional.one_hot(idx, num_categories).to(like.dtype)


def _as_tensor(attn: Any) -> torch.Tensor:
    t = attn.detach() if isinstance(attn, torch.Tensor) else torch.as_tensor(np.asarray(attn, dtype=np.float64))
    if not t.is_floating_point():
        t = t.double()
    return t


def category_mass(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """Attention each query row puts on each category: ``(..., q, C)``.

    ``attn``: ``(..., q, k)`` attention weights (any leading dims, e.g. heads); ``key_labels``:
    ``(k,)`` category codes. ``out[..., i, c] = sum_{j : label_j = c} attn[..., i, j]``.
    """
    attn = _as_tensor(attn)
    labels = _check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    return attn @ _one_hot(labels, num_categories, attn)


def visible_key_counts(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """How many keys of each category a row gives non-zero weight (the keys it sees): ``(..., q, C)``."""
    attn = _as_tensor(attn)
    labels = _check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    return (attn > 0).to(attn.dtype) @ _one_hot(labels, num_categories, attn)


def category_entropy_rows(attn: Any, key_labels: Any, num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """Entropy (nats) of each row's attention renormalised over each category: ``(..., q, C)``.

    ``H[i, c] = -sum_{j in c} p_j ln p_j`` with ``p_j = attn[i, j] / m``, ``m = sum_{j in c} attn[i, j]``;
    computed as ``ln m - (sum_{j in c} a ln a) / m``. NaN where ``m == 0`` (the row sees no key
    of that category).
    """
    attn = _as_tensor(attn)
    labels = _check_labels(key_labels, attn.shape[-1], num_categories, "key_labels")
    onehot = _one_hot(labels, num_categories, attn)
    mass = attn @ onehot
    a_log_a = torch.where(attn > 0, attn * torch.log(attn.clamp_min(torch.finfo(attn.dtype).tiny)), torch.zeros_like(attn))
    s = a_log_a @ onehot
    safe = mass.clamp_min(torch.finfo(attn.dtype).tiny)
    ent = torch.log(safe) - s / safe
    ent = ent.clamp_min(0.0)  # rounding can give -1e-16 for one-key rows
    return torch.where(mass > 0, ent, torch.full_like(ent, float("nan")))


def eq4_attention(mass: Any, query_labels: Any, num_categories: int = len(CATEGORIES)) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-Mini's Eq. 4 from per-row category masses (docs/method.md §8).

    ``mass``: ``(q, C)`` (:func:`category_mass` of head-averaged attention); ``query_labels``:
    ``(q,)``. Returns ``(attn, rows)``, both ``(C_tgt, C_src)``: ``attn[t, s] = sum_{i in t}
    mass[i, s] / rows[t, s]`` with ``rows[t, s] = #{i in t : mass[i, s] > 0}``; NaN where
    ``rows == 0``.
    """
    mass = np.asarray(mass.detach().cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if mass.ndim != 2 or mass.shape[1] != num_categories:
        raise AttentionShapeError(f"mass must be (q, {num_categories}), got {mass.shape}")
    labels = _check_labels(query_labels, mass.shape[0], num_categories, "query_labels")
    attn = np.full((num_categories, num_categories), np.nan)
    rows = np.zeros((num_categories, num_categories), dtype=np.int64)
    for t in range(num_categories):
        sel = mass[labels == t]
        rows[t] = (sel > 0).sum(axis=0)
        total = sel.sum(axis=0)
        ok = rows[t] > 0
        attn[t, ok] = total[ok] / rows[t, ok]
    return attn, rows


def _head_mean(attn: torch.Tensor) -> torch.Tensor:
    if attn.ndim == 3:
        return attn.mean(dim=0)
    if attn.ndim != 2:
        raise AttentionShapeError(f"attention must be (q, k) or (heads, q, k), got {tuple(attn.shape)}")
    return attn


def category_attention(attn: Any, labels: Any, num_categories: int = len(CATEGORIES)) -> np.ndarray:
    """Eq. 4 on one layer's attention: ``(C_tgt, C_src)`` (NaN where undefined).

    ``attn``: ``(q, k)`` or ``(heads, q, k)`` (averaged over heads first, as LLaVA-Mini does);
    ``labels``: ``(k,)`` categories of the keys; the queries are the last ``q`` positions (their
    labels are ``labels[k - q:]``), so a full square matrix uses the same labels for both.
    """
    attn = _head_mean(_as_tensor(attn))
    q, k = attn.shape
    labels = _check_labels(labels, k, num_categories, "labels")
    if q > k:
        raise AttentionShapeError(f"more query rows ({q}) than keys ({k})")
    mass = category_mass(attn, labels, num_categories)
    return eq4_attention(mass, labels[k - q :], num_categories)[0]


def row_entropy_average(
    entropy: np.ndarray, mass: np.ndarray, query_labels: np.ndarray, num_categories: int = len(CATEGORIES)
) -> np.ndarray:
    """Mean of ``entropy[i, s]`` over the rows ``i`` of each target category with ``mass[i, s] > 0``
    (the rows Eq. 4 counts): ``(C_tgt, C_src)``, NaN where there is no such row."""
    entropy = np.asarray(entropy, dtype=np.float64)
    mass = np.asarray(mass, dtype=np.float64)
    out = np.full((num_categories, num_categories), np.nan)
    for t in range(num_categories):
        rows = query_labels == t
        for s in range(num_categories):
            ok = rows & (mass[:, s] > 0)
            if ok.any():
                out[t, s] = float(entropy[ok, s].mean())
    return out


def category_entropy(attn: Any, labels: Any, num_categories: int = len(CATEGORIES)) -> np.ndarray:
    """Mean renormalised entropy per (target, source) on one layer: ``(C_tgt, C_src)``.

    ``attn`` and ``labels`` as in :func:`category_attention` (heads averaged first)."""
    attn = _head_mean(_as_tensor(attn))
    q, k = attn.shape
    labels = _check_labels(labels, k, num_categories, "labels")
    mass = category_mass(attn, labels, num_categories).cpu().numpy()
    ent = category_entropy_rows(attn, labels, num_categories).cpu().numpy()
    return row_entropy_average(ent, mass, labels[k - q :], num_categories)


# ------------------------------------------------------------------------------ per-sample statistics


@dataclass
class LayerStats:
    """Per-row attention statistics of one sequence, every layer (module docstring).

    - ``labels`` int8 ``(N,)``: category of each position; ``prompt_len``.
    - ``mass`` float64 ``(L, N, C)``: head-averaged attention of row i on category c.
    - ``entropy`` float64 ``(L, N, C)``: renormalised entropy of that attention (NaN if mass 0).
    - ``visible`` int64 ``(L, N, C)``: keys of category c row i gives non-zero weight.
    - ``head_mass`` float32 ``(L, H, N, C)``: the same mass per query head.
    """

    labels: np.ndarray
    prompt_len: int
    mass: np.ndarray
    entropy: np.ndarray
    visible: np.ndarray
    head_mass: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.mass.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.head_mass.shape[1])

    def category_attention(self) -> np.ndarray:
        """Eq. 4 per layer: ``(L, C_tgt, C_src)``."""
        return np.stack([eq4_attention(self.mass[l], self.labels)[0] for l in range(self.num_layers)])

    def category_rows(self) -> np.ndarray:
        """Eq. 4's denominators per layer: ``(L, C_tgt, C_src)`` int64."""
        return np.stack([eq4_attention(self.mass[l], self.labels)[1] for l in range(self.num_layers)])

    def category_entropy(self) -> np.ndarray:
        """Mean renormalised entropy per layer: ``(L, C_tgt, C_src)``."""
        return np.stack(
            [row_entropy_average(self.entropy[l], self.mass[l], self.labels) for l in range(self.num_layers)]
        )

    def max_entropy(self) -> np.ndarray:
        """Mean ``ln(#visible source keys)`` over the same rows: uniform attention's entropy, ``(L, C, C)``."""
        with np.errstate(divide="ignore"):
            log_visible = np.where(self.visible > 0, np.log(np.maximum(self.visible, 1)), np.nan)
        return np.stack(
            [row_entropy_average(log_visible[l], self.mass[l], self.labels) for l in range(self.num_layers)]
        )

    def rows(self, selection: str = "generating") -> np.ndarray:
        """Positions of the query rows ``selection`` names (:data:`ROW_SELECTIONS`): ``generating``:
        ``prompt_len - 1 .. N - 2`` (the rows whose outputs are the response tokens, docs/method.md
        §4); ``response``: ``prompt_len .. N - 1``; ``instruction``: instruction positions; ``all``."""
        n = self.labels.size
        if selection == "generating":
            return np.arange(max(self.prompt_len - 1, 0), n - 1)
        if selection == "response":
            return np.arange(self.prompt_len, n)
        if selection == "instruction":
            return np.flatnonzero(self.labels == INSTRUCTION)
        if selection == "all":
            return np.arange(n)
        raise LayerAnalysisError(f"row selection must be one of {ROW_SELECTIONS}, got {selection!r}")

    def head_share(self, source: int = VISION, rows: str = "generating") -> np.ndarray:
        """Per query head, mean share of attention on category ``source`` over the ``rows``:
        float64 ``(L, H)`` (NaN when the selection is empty, e.g. no response was generated)."""
        if not _is_int(source) or not 0 <= source < len(CATEGORIES):
            raise CategoryLabelError(f"source must be a category code 0..{len(CATEGORIES) - 1}, got {source!r}")
        picked = self.rows(rows)
        if picked.size == 0:
            return np.full((self.num_layers, self.num_heads), np.nan)
        return self.head_mass[:, :, picked, source].astype(np.float64).mean(axis=2)


def allowed_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: Any) -> torch.Tensor:
    """Boolean ``(q, kv)``: which keys each query may attend to, from the mask transformers built.

    ``None`` (sdpa's plain causal case): query i is position ``kv - q + i`` and sees keys
    ``0 .. kv - q + i`` (a fresh or dynamic cache; not a pre-allocated static cache). A boolean
    ``(1, 1, q, >=kv)`` mask is used as is (True = attend); an additive float mask is True where
    it is above half the dtype's minimum.
    """
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return torch.arange(kv_len, device=device)[None, :] <= rows
    if attention_mask.ndim != 4 or attention_mask.shape[0] != 1:
        raise AttentionShapeError(f"expected a (1, 1 or heads, q, kv) attention mask, got {tuple(attention_mask.shape)}")
    mask = attention_mask[0, 0, -q_len:, :kv_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


class LayerStatsRecorder:
    """Collects :class:`LayerStats` of one sequence while the model runs (one forward pass).

    ``labels``: ``(N,)`` category codes of the positions (:func:`token_categories`);
    ``prompt_len``; ``chunk_size``: query rows per softmax chunk. :meth:`add` is called by
    :func:`layer_stats_attention` once per layer; :meth:`finish` checks every layer was seen.
    """

    def __init__(self, labels: Any, prompt_len: int, num_layers: int, num_heads: int, *, chunk_size: int = 256):
        labels = np.asarray(labels)
        _check_labels(labels, labels.size, len(CATEGORIES), "labels")
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("chunk_size", chunk_size)):
            if not _is_int(value) or value < 1:
                raise LayerAnalysisError(f"{name} must be an int >= 1, got {value!r}")
        self.labels = labels.astype(np.int8)
        self.prompt_len = int(prompt_len)
        self.num_layers, self.num_heads, self.chunk_size = int(num_layers), int(num_heads), int(chunk_size)
        n, c = self.labels.size, len(CATEGORIES)
        self.mass = np.full((num_layers, n, c), np.nan)
        self.entropy = np.full((num_layers, n, c), np.nan)
        self.visible = np.zeros((num_layers, n, c), dtype=np.int64)
        self.head_mass = np.full((num_layers, num_heads, n, c), np.nan, dtype=np.float32)
        self._seen = np.zeros(num_layers, dtype=bool)

    @torch.no_grad()
    def add(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """Reduce one layer's attention. ``query`` ``(1, H, q, d)`` post-RoPE, ``key`` ``(1, H_kv, N, d)``."""
        if query.ndim != 4 or key.ndim != 4 or query.shape[0] != 1 or key.shape[0] != 1:
            raise AttentionShapeError(
                f"batch size 1 only: query (1, H, q, d) and key (1, H_kv, N, d), got {tuple(query.shape)}, {tuple(key.shape)}"
            )
        _, heads, q_len, dim = query.shape
        kv_heads, n_keys = key.shape[1], key.shape[2]
        if heads != self.num_heads or heads % kv_heads:
            raise AttentionShapeError(f"expected {self.num_heads} query heads (a multiple of {kv_heads} KV heads), got {heads}")
        if n_keys != self.labels.size:
            raise AttentionShapeError(
                f"layer {layer_idx} attends to {n_keys} keys but the recorder has labels for {self.labels.size} positions: "
                "run ONE forward pass over the whole sequence (prompt + response) without a cache"
            )
        if not 0 <= layer_idx < self.num_layers:
            raise AttentionShapeError(f"layer_idx {layer_idx} outside 0..{self.num_layers - 1}")
        scale = dim**-0.5 if scaling is None else float(scaling)
        group = heads // kv_heads
        allowed = allowed_keys(attention_mask, q_len, n_keys, query.device)
        keys_t = key[0].float().transpose(-1, -2)[:, None]  # (H_kv, 1, d, N)
        offset = n_keys - q_len
        labels = self.labels
        for start in range(0, q_len, self.chunk_size):
            stop = min(start + self.chunk_size, q_len)
            q = query[0, :, start:stop].float().reshape(kv_heads, group, stop - start, dim)
            logits = (q @ keys_t).reshape(heads, stop - start, n_keys) * scale
            logits = logits.masked_fill(~allowed[start:stop][None], float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # (H, c, N) float32
            mean = probs.mean(dim=0)  # (c, N)
            rows = slice(offset + start, offset + stop)
            self.mass[layer_idx, rows] = category_mass(mean, labels).double().cpu().numpy()
            self.entropy[layer_idx, rows] = category_entropy_rows(mean.double(), labels).cpu().numpy()
            self.visible[layer_idx, rows] = visible_key_counts(mean, labels).round().long().cpu().numpy()
            self.head_mass[layer_idx, :, rows] = category_mass(probs, labels).cpu().numpy()
        self._seen[layer_idx] = True

    def finish(self) -> LayerStats:
        """The collected statistics; every layer must have been recorded once, over every row."""
        missing = np.flatnonzero(~self._seen).tolist()
        if missing:
            raise LayerAnalysisError(
                f"layers {missing} were never recorded: the forward pass did not use {LAYER_STATS_ATTENTION!r} "
                "(run it inside recording_layer_stats() with text_attention(model, register_layer_stats()))"
            )
        if np.isnan(self.mass).any():
            raise LayerAnalysisError(
                "some query rows were never recorded: the forward pass must cover every position (no cache)"
            )
        return LayerStats(
            labels=self.labels,
            prompt_len=self.prompt_len,
            mass=self.mass,
            entropy=self.entropy,
            visible=self.visible,
            head_mass=self.head_mass,
        )


_ACTIVE: contextvars.ContextVar[LayerStatsRecorder | None] = contextvars.ContextVar(
    "sparsemm_layer_stats", default=None
)


@contextlib.contextmanager
def recording_layer_stats(recorder: LayerStatsRecorder) -> Iterator[LayerStatsRecorder]:
    """Make :func:`layer_stats_attention` feed ``recorder`` inside the block."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def layer_stats_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa`` attention that also hands the layer's attention to the active recorder.

    The output is ``sdpa_attention_forward``'s (the model computes exactly what it computes with
    ``sdpa``); without an active :class:`LayerStatsRecorder` this IS sdpa."""
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.add(int(module.layer_idx), query, key, attention_mask, scaling)
    return output, None


def register_layer_stats() -> str:
    """Register :func:`layer_stats_attention` (mask function ``sdpa``); returns its name. Idempotent."""
    register_text_attention(LAYER_STATS_ATTENTION, layer_stats_attention, mask="sdpa")
    return LAYER_STATS_ATTENTION


def forward_inputs_with_response(inputs: Mapping[str, Any], sequence: torch.Tensor) -> dict[str, Any]:
    """Model inputs for one forward pass over ``sequence`` ``(1, N)`` = the prompt of ``inputs``
    followed by generated tokens: ``input_ids`` replaced, ``attention_mask`` all ones,
    ``mm_token_type_ids`` (Qwen) extended with 0 (text); image tensors kept."""
    prompt_len = int(inputs["input_ids"].shape[1])
    if sequence.ndim != 2 or sequence.shape[0] != 1 or sequence.shape[1] < prompt_len:
        raise AttentionShapeError(f"sequence must be (1, N >= {prompt_len}), got {tuple(sequence.shape)}")
    if not torch.equal(sequence[:, :prompt_len].to(inputs["input_ids"].device), inputs["input_ids"]):
        raise AttentionShapeError("sequence does not start with the prompt's input_ids")
    extra = sequence.shape[1] - prompt_len
    out = {k: v for k, v in inputs.items()}
    out["input_ids"] = sequence.to(inputs["input_ids"].device)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs and inputs["mm_token_type_ids"] is not None:
        tt = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros((1, extra))], dim=1)
    return out


@torch.no_grad()
def analyse_sample(
    loaded: LoadedModel,
    inputs: Mapping[str, Any],
    *,
    max_new_tokens: int = 64,
    chunk_size: int = 256,
) -> tuple[np.ndarray, LayerStats]:
    """Generate a greedy response to one prompt, then measure every layer's attention over
    prompt + response (module docstring, "How it is measured").

    ``inputs``: one prompt from :func:`sparsemm_utils.prompts.build_inputs` (batch 1).
    Returns the generated ids ``(T,)`` (end-of-sequence token included when generation stopped
    on it) and the :class:`LayerStats` of the N = prompt + T positions. The language model's
    attention implementation is restored afterwards.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise LayerAnalysisError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise AttentionShapeError(f"one prompt at a time: input_ids must be (1, n), got {tuple(ids.shape)}")
    prompt_len = int(ids.shape[1])
    model = loaded.model
    sequence = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    labels = token_categories(sequence[0], loaded.image_token_id, prompt_len)
    recorder = LayerStatsRecorder(labels, prompt_len, loaded.num_layers, loaded.num_heads, chunk_size=chunk_size)
    with text_attention(model, register_layer_stats()), recording_layer_stats(recorder):
        model(**forward_inputs_with_response(inputs, sequence), use_cache=False, logits_to_keep=1)
    generated = sequence[0, prompt_len:].cpu().numpy().astype(np.int64)
    return generated, recorder.finish()


# ---------------------------------------------------------------------------------------- tables


def _long_table(per_sample: np.ndarray, value: str) -> pd.DataFrame:
    """(S, L, C, C) -> rows layer, target, source, <value> (nan-mean over samples), std, n_samples."""
    s, layers, c, _ = per_sample.shape
    rows = []
    for l in range(layers):
        for t in range(c):
            for src in range(c):
                vals = per_sample[:, l, t, src]
                ok = vals[~np.isnan(vals)]
                rows.append(
                    {
                        "layer": l,
                        "target": CATEGORIES[t],
                        "source": CATEGORIES[src],
                        value: float(ok.mean()) if ok.size else float("nan"),
                        "std": float(ok.std()) if ok.size else float("nan"),
                        "n_samples": int(ok.size),
                    }
                )
    return pd.DataFrame(rows)


def _check_stats(stats: Sequence[LayerStats]) -> None:
    if not stats:
        raise LayerAnalysisError("no samples: pass at least one LayerStats")
    shapes = {(s.num_layers, s.num_heads) for s in stats}
    if len(shapes) != 1:
        raise LayerAnalysisError(f"samples come from models of different shapes (layers, heads): {sorted(shapes)}")


def category_attention_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``category_attention.csv``: layer, target, source, attention (Eq. 4, mean over the samples
    where it is defined), std, n_samples. 0-based layers; all 9 (target, source) pairs."""
    _check_stats(stats)
    return _long_table(np.stack([s.category_attention() for s in stats]), "attention")


def entropy_table(stats: Sequence[LayerStats]) -> pd.DataFrame:
    """``entropy.csv``: layer, target, source, entropy (nats, mean over samples), std, n_samples,
    max_entropy (uniform attention over the source keys the rows see)."""
    _check_stats(stats)
    table = _long_table(np.stack([s.category_entropy() for s in stats]), "entropy")
    ceiling = _long_table(np.stack([s.max_entropy() for s in stats]), "max_entropy")
    table["max_entropy"] = ceiling["max_entropy"].to_numpy()
    return table


def head_vision_share_table(
    stats: Sequence[LayerStats], visual_scores: Any = None, *, rows: str = "generating"
) -> pd.DataFrame:
    """``head_vision_share.csv``: layer, head, vision_share (mean over samples of
    :meth:`LayerStats.head_share` on ``rows``), visual_score (step 03's S, NaN when not given).
    ``visual_scores``: ``(L, H)``."""
    _check_stats(stats)
    share = np.nanmean(np.stack([s.head_share(VISION, rows) for s in stats]), axis=0)
    layers, heads = share.shape
    if visual_scores is None:
        scores = np.full_like(share, np.nan)
    else:
        scores = np.asarray(visual_scores, dtype=np.float64)
        if scores.shape != share.shape:
            raise AttentionShapeError(
                f"visual_scores must be (layers, heads) = {share.shape} like the model's attention, got {scores.shape}"
            )
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "vision_share": share.ravel(),
            "visual_score": scores.ravel(),
        }
    )


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank).
    NaN when fewer than 2 pairs or either side is constant. Pairs with a NaN are dropped."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise LayerAnalysisError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 2:
        return float("nan")
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------- findings


def _band(num_layers: int) -> tuple[list[int], list[int]]:
    """The early and late layers a finding compares: the first and last quarter (>= 1 layer each)."""
    width = max(1, num_layers // 4)
    return list(range(width)), list(range(num_layers - width, num_layers))


def _mean_at(table: pd.DataFrame, value: str, target: str, source: str, layers: Sequence[int]) -> float:
    part = table[(table["target"] == target) & (table["source"] == source) & (table["layer"].isin(list(layers)))]
    return float(part[value].mean()) if len(part) else float("nan")


def _layers_label(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def findings_table(
    category_attention: pd.DataFrame,
    entropy: pd.DataFrame,
    vision_drop: pd.DataFrame | None = None,
    head_share: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """LLaVA-Mini's findings (docs/method.md §8) beside this run's numbers: one row per finding,
    columns ``finding``, ``paper`` (what LLaVA-Mini reports on LLaVA-v1.5/NeXT), ``this_run`` (the
    numbers, as text) and ``holds`` (True/False, or None when the run cannot tell).

    "Early" and "late" are the first and last quarter of the layers (one layer each for a 4-layer
    model). Inputs: the step's tables (``category_attention.csv``, ``entropy.csv``,
    ``vision_drop.csv``, ``head_vision_share.csv``)."""
    num_layers = int(category_attention["layer"].max()) + 1
    early, late = _band(num_layers)
    e_lab, l_lab = _layers_label(early), _layers_label(late)
    rows = []
    rv_early = _mean_at(category_attention, "attention", "response", "vision", early)
    rv_late = _mean_at(category_attention, "attention", "response", "vision", late)
    iv_early = _mean_at(category_attention, "attention", "instruction", "vision", early)
    iv_late = _mean_at(category_attention, "attention", "instruction", "vision", late)
    rows.append(
        {
            "finding": "vision tokens draw more attention in early layers than in late ones",
            "paper": "Attn(-> vision) high in the first layers, falling sharply with depth",
            "this_run": (
                f"response→vision {rv_early:.3f} ({e_lab}) vs {rv_late:.3f} ({l_lab}); "
                f"instruction→vision {iv_early:.3f} vs {iv_late:.3f}"
            ),
            "holds": bool(rv_early > rv_late) if not np.isnan(rv_early + rv_late) else None,
        }
    )
    ri_late = _mean_at(category_attention, "attention", "response", "instruction", late)
    rows.append(
        {
            "finding": "late layers attend mostly to instruction tokens",
            "paper": "over 80% of the attention goes to instruction tokens in the later layers",
            "this_run": f"response→instruction {ri_late:.3f} in {l_lab} (response rows see every category, so this is a share)",
            "holds": bool(ri_late > 0.8) if not np.isnan(ri_late) else None,
        }
    )
    ent = entropy.assign(norm=entropy["entropy"] / entropy["max_entropy"].where(entropy["max_entropy"] > 0))
    ne_early = _mean_at(ent, "norm", "response", "vision", early)
    ne_late = _mean_at(ent, "norm", "response", "vision", late)
    rows.append(
        {
            "finding": "early layers spread attention over the vision tokens (high entropy), late layers focus",
            "paper": "entropy of the attention on vision tokens much higher in early layers",
            "this_run": f"response→vision entropy / uniform {ne_early:.3f} ({e_lab}) vs {ne_late:.3f} ({l_lab})",
            "holds": bool(ne_early > ne_late) if not np.isnan(ne_early + ne_late) else None,
        }
    )
    if vision_drop is not None and len(vision_drop):
        overall = vision_drop[vision_drop["task"] == "all"]
        if not len(overall):
            overall = vision_drop
        base = overall[overall["reading"] == "none"]["char_accuracy"]
        inside = overall[overall["reading"] == "inside"].sort_values("first_layer")
        if len(base) and len(inside) >= 2:
            b, first, last = float(base.iloc[0]), inside.iloc[0], inside.iloc[-1]
            rows.append(
                {
                    "finding": "dropping vision tokens early destroys reading; dropping them late barely matters",
                    "paper": "LLaVA-v1.5 on GQA/MMBench: layers 1-4 dropped -> near zero; 29-32 dropped -> near full",
                    "this_run": (
                        f"char accuracy {b:.3f} with no drop; {float(first['char_accuracy']):.3f} with layers "
                        f"{first['layer_range']} dropped; {float(last['char_accuracy']):.3f} with layers {last['layer_range']} dropped"
                    ),
                    # a model that cannot read without any drop tells nothing about where it reads
                    "holds": bool(float(first["char_accuracy"]) < float(last["char_accuracy"])) if b > 0 else None,
                }
            )
    if head_share is not None and len(head_share) and not head_share["visual_score"].isna().all():
        rho = spearman(head_share["vision_share"], head_share["visual_score"])
        ranked = head_share.assign(share_rank=head_share["vision_share"].rank(ascending=False, method="min"))
        top = ranked.sort_values("visual_score", ascending=False, kind="stable").iloc[0]
        if float(top["visual_score"]) > 0:
            detail = (
                f"; the top visual head L{int(top['layer'])}H{int(top['head'])} ranks #{int(top['share_rank'])} "
                f"of {len(head_share)} by vision share"
            )
        else:
            detail = "; every visual score is 0 (step 03 found no head that reads)"
        rows.append(
            {
                "finding": "the heads that look at the image most are the ones that read (SparseMM x LLaVA-Mini)",
                "paper": "not measured by either paper (this study's join of the two)",
                "this_run": f"Spearman rho(vision share, visual score) = {rho:.3f} over {len(head_share)} heads{detail}",
                "holds": bool(rho > 0) if not np.isnan(rho) else None,
            }
        )
    return pd.DataFrame(rows, columns=["finding", "paper", "this_run", "holds"])
