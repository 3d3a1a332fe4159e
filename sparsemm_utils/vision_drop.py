"""LLaVA-Mini's ablation: drop every vision token inside a range of layers (docs/method.md §8, step 07).

LLaVA-Mini (arXiv 2501.03895, Fig. 5) drops the vision tokens at layers 1-4, 5-8, ..., 29-32 of
LLaVA-v1.5 and measures what is left of the model's visual understanding: dropping them early
destroys it, dropping them late barely matters. The paper does not say whether the tokens come
back after the range, so docs/method.md §8 asks for both readings (:class:`VisionDrop`):

- ``"inside"``: the vision tokens are invisible only in the layers ``first .. last``;
- ``"from"``: they are invisible from ``first`` to the last layer.

How a token is dropped here: in a dropped layer, no TEXT query (instruction or response) may
attend to a vision KEY; that is the only change (:func:`masked_sdpa`, with the mask transformers
built, else the causal mask). The vision tokens' own rows are left alone, so their hidden states
are exactly those of the unmodified model (a vision token only sees the tokens before it: system
prompt, template and earlier vision tokens, none of which the ablation touches), and with the
"inside" reading the text can read the (normally processed) vision tokens again after the range.
Consequences used by the tests: an empty set of dropped layers is the unmodified model (same
function, same mask: token-identical generation), and dropping every layer makes every text
position independent of the image (two images of the same size give identical text logits): the
model "never sees the image" through its keys.

Mechanics: the attention function :func:`vision_drop_attention` is registered with transformers'
``AttentionInterface`` under :data:`VISION_DROP_ATTENTION` (language model only, vision tower
keeps sdpa, :mod:`sparsemm_utils.attention_hooks`). The per-call state (which layers, which
positions are vision) reaches it through :data:`VISION_DROP_HOOK`, activated by
:func:`vision_drop`; the vision positions are read from ``input_ids`` by a forward pre-hook on the
model (at the prefill: positions holding the image token id; every later token is text), so
anything that calls ``model.generate`` or ``model(...)`` inside the ``with`` block is ablated,
e.g. :func:`sparsemm_utils.tiny_reader.accuracy.evaluate_reader`. Batch size 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.attention_hooks import AttentionHook, NoActiveStateError, allowed_keys, text_attention
from sparsemm_utils.models import LoadedModel
from sparsemm_utils.reader_tasks import HELDOUT_SEED, TASK_TYPES
from sparsemm_utils.tiny_reader.accuracy import evaluate_reader
from sparsemm_utils.token_categories import AttentionShapeError
from sparsemm_utils.validate import check_choice, check_int, is_int

__all__ = [
    "READINGS",
    "VISION_DROP_ATTENTION",
    "VisionDropError",
    "InvalidLayerRangeError",
    "NoActiveVisionDropError",
    "EmptyAttentionRowError",
    "VisionDrop",
    "VisionDropSession",
    "layer_ranges",
    "drop_conditions",
    "masked_sdpa",
    "vision_drop_attention",
    "VISION_DROP_HOOK",
    "register_vision_drop",
    "vision_drop",
    "evaluate_vision_drop",
]

#: The two readings of "drop the vision tokens in layers a-b" (module docstring).
READINGS: tuple[str, ...] = ("inside", "from")
#: Name of :func:`vision_drop_attention` in transformers' AttentionInterface.
VISION_DROP_ATTENTION = "sparsemm_vision_drop"


class VisionDropError(ValueError):
    """Base class of this module's errors."""


class InvalidLayerRangeError(VisionDropError):
    """A layer range that is empty, reversed, negative, or beyond the model's last layer."""


class NoActiveVisionDropError(NoActiveStateError):
    """:func:`vision_drop_attention` ran outside a :func:`vision_drop` context."""


class EmptyAttentionRowError(RuntimeError):
    """Hiding keys left a query with nothing to attend to (a prompt that starts with an image token)."""


@dataclass(frozen=True)
class VisionDrop:
    """Drop the vision tokens in layers ``first .. last`` (0-based, inclusive), read as ``reading``.

    ``"inside"``: dropped in ``first .. last`` only; ``"from"``: dropped in ``first .. L - 1``
    (``last`` then only names the range the condition was built from). LLaVA-Mini's "layers 1-4"
    of a 32-layer model is ``VisionDrop(0, 3)``.
    """

    first: int
    last: int
    reading: str = "inside"

    def __post_init__(self) -> None:
        if not is_int(self.first) or not is_int(self.last) or not 0 <= self.first <= self.last:
            raise InvalidLayerRangeError(
                f"need integers 0 <= first <= last (0-based, inclusive), got first={self.first!r}, last={self.last!r}"
            )
        check_choice("reading", self.reading, READINGS, error=VisionDropError)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The dropped layers of a model with ``num_layers`` layers, sorted."""
        check_int("num_layers", num_layers, 1, error=InvalidLayerRangeError)
        if self.last >= num_layers:
            raise InvalidLayerRangeError(
                f"layer range {self.first}-{self.last} reaches beyond the model's last layer ({num_layers - 1}); "
                "layers are 0-based"
            )
        stop = self.last + 1 if self.reading == "inside" else num_layers
        return tuple(range(self.first, stop))

    @property
    def layer_range(self) -> str:
        """``"first-last"`` (0-based, inclusive), the range's label in ``vision_drop.csv``."""
        return f"{self.first}-{self.last}"


def layer_ranges(num_layers: int, size: int) -> list[tuple[int, int]]:
    """Consecutive ranges of ``size`` layers covering ``0 .. num_layers - 1`` (the last one may be
    shorter): ``layer_ranges(32, 4)`` = (0, 3), (4, 7), ..., (28, 31), LLaVA-Mini's 1-4, ..., 29-32."""
    check_int("num_layers", num_layers, 1, error=InvalidLayerRangeError)
    check_int("size", size, 1, error=InvalidLayerRangeError)
    return [(a, min(a + size, num_layers) - 1) for a in range(0, num_layers, size)]


def drop_conditions(num_layers: int, size: int, readings: Sequence[str] = READINGS) -> list[VisionDrop]:
    """Every range of :func:`layer_ranges` in every reading, reading-major."""
    return [VisionDrop(a, b, r) for r in readings for a, b in layer_ranges(num_layers, size)]


# ------------------------------------------------------------------------------ the attention


def masked_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    hidden_keys: torch.Tensor,
    query_rows: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """sdpa attention in which the keys ``hidden_keys`` are invisible to the rows ``query_rows``.

    ``query`` ``(1, H, q, d)``, ``key``/``value`` ``(1, H_kv, kv, d)``; ``hidden_keys`` bool
    ``(kv,)``; ``query_rows`` bool ``(q,)`` (None: every row). The mask is the model's own (or the
    causal one, :func:`~sparsemm_utils.attention_hooks.allowed_keys`) with those entries removed.
    Returns ``(1, q, H, d)`` like every attention function. Raises
    :class:`EmptyAttentionRowError` if a row would see no key at all.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if hidden_keys.shape != (kv_len,) or hidden_keys.dtype != torch.bool:
        raise AttentionShapeError(f"hidden_keys must be bool ({kv_len},), got {hidden_keys.dtype} {tuple(hidden_keys.shape)}")
    allowed = allowed_keys(attention_mask, q_len, kv_len, query.device).clone()
    hide = hidden_keys.to(query.device)[None, :]
    if query_rows is not None:
        if query_rows.shape != (q_len,):
            raise AttentionShapeError(f"query_rows must be bool ({q_len},), got {tuple(query_rows.shape)}")
        hide = hide & query_rows.to(query.device)[:, None]
    allowed &= ~hide
    if not bool(allowed.any(dim=-1).all()):
        raise EmptyAttentionRowError(
            "hiding the keys left a query row with no visible key (the sequence starts with hidden tokens?); "
            "every prompt of the supported families starts with a text token"
        )
    output, _ = sdpa_attention_forward(
        module, query, key, value, allowed[None, None], dropout=dropout, scaling=scaling, **kwargs
    )
    return output


@dataclass(eq=False)
class VisionDropSession:
    """State of one :func:`vision_drop` block: the dropped ``layers`` and the vision positions seen
    so far (``vision``: bool ``(positions,)``, set at each prefill, extended with text at decode)."""

    drop: VisionDrop | None
    layers: frozenset[int]
    image_token_id: int
    vision: torch.Tensor | None = None
    prefills: int = 0

    def observe(self, input_ids: torch.Tensor, seen: int) -> None:
        """Record the positions of the model call's ``input_ids`` ``(1, t)``; ``seen``: tokens the
        cache already holds (0 at a prefill)."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise AttentionShapeError(f"vision drop runs one sequence at a time: input_ids (1, t), got {tuple(input_ids.shape)}")
        new = input_ids[0] == self.image_token_id
        if seen == 0 or self.vision is None:
            self.vision = new.clone()
            self.prefills += 1
        else:
            if seen != self.vision.numel():
                raise AttentionShapeError(
                    f"the cache holds {seen} tokens but the session has seen {self.vision.numel()}: one generation at a time"
                )
            # a generated token is text even if it happens to be the image token id
            self.vision = torch.cat([self.vision, torch.zeros_like(new)])

    def hidden_keys(self, kv_len: int, device: Any) -> torch.Tensor:
        if self.vision is None or self.vision.numel() < kv_len:
            raise NoActiveVisionDropError(
                "the vision positions of this sequence are unknown: call the model with input_ids inside the "
                "vision_drop() block (generate or forward), not with inputs_embeds"
            )
        return self.vision[:kv_len].to(device)


#: The session :func:`vision_drop_attention` reads, activated by :func:`vision_drop`.
VISION_DROP_HOOK: AttentionHook[VisionDropSession] = AttentionHook(
    "sparsemm_vision_drop",
    context="a vision_drop() context",
    usage="wrap the forward/generate call in `with sparsemm_utils.vision_drop.vision_drop(loaded, drop):`",
    missing_error=NoActiveVisionDropError,
    nested_error=VisionDropError,
)


def vision_drop_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ablation's attention function (registered as :data:`VISION_DROP_ATTENTION`).

    In a dropped layer: :func:`masked_sdpa` with the vision keys hidden from the text queries
    (query i is position ``kv - q + i``). In any other layer: ``sdpa_attention_forward`` itself."""
    session = VISION_DROP_HOOK.active(VISION_DROP_ATTENTION)
    if int(module.layer_idx) not in session.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    vision = session.hidden_keys(kv_len, query.device)
    text_rows = ~vision[kv_len - q_len :]
    output = masked_sdpa(
        module, query, key, value, attention_mask, vision, text_rows, scaling=scaling, dropout=dropout, **kwargs
    )
    return output, None


def register_vision_drop() -> str:
    """Register :func:`vision_drop_attention` (mask function ``sdpa``); returns its name. Idempotent."""
    return VISION_DROP_HOOK.register(VISION_DROP_ATTENTION, vision_drop_attention)


def _call_input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


@contextlib.contextmanager
def vision_drop(loaded: LoadedModel, drop: VisionDrop | None) -> Iterator[VisionDropSession]:
    """Run ``loaded``'s model with the vision tokens dropped as ``drop`` says, inside the block.

    ``drop=None`` drops nothing (the same attention function with no dropped layer: the
    unmodified model). Registers the attention function (idempotent), switches the language model
    to it, installs the pre-hook that reads the vision positions from ``input_ids``; all of it is
    undone on exit, also after an error. Nested blocks raise :class:`VisionDropError`.
    """
    if drop is not None and not isinstance(drop, VisionDrop):
        raise VisionDropError(f"drop must be a VisionDrop or None, got {drop!r}")
    layers = frozenset(drop.layers(loaded.num_layers)) if drop is not None else frozenset()
    session = VisionDropSession(drop=drop, layers=layers, image_token_id=loaded.image_token_id)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = _call_input_ids(args, kwargs)
        if ids is None:
            raise NoActiveVisionDropError(
                "the model was called without input_ids inside vision_drop(): the vision positions cannot be found"
            )
        cache = kwargs.get("past_key_values")
        seen = int(cache.get_seq_length()) if cache is not None else 0
        session.observe(ids, seen)

    with VISION_DROP_HOOK.activate(session):
        handle = loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with text_attention(loaded.model, register_vision_drop()):
                yield session
        finally:
            handle.remove()


# ------------------------------------------------------------------------------ the benchmark


def _condition_rows(drop: VisionDrop | None, summary: dict[str, dict[str, float]], num_layers: int) -> list[dict]:
    if drop is None:
        reading, layer_range, first, last, dropped = "none", "none", -1, -1, ""
    else:
        layers = drop.layers(num_layers)
        reading, layer_range, first, last = drop.reading, drop.layer_range, drop.first, drop.last
        dropped = f"{layers[0]}-{layers[-1]}"
    return [
        {
            "reading": reading,
            "layer_range": layer_range,
            "first_layer": first,
            "last_layer": last,
            "dropped_layers": dropped,
            "task": task,
            "exact_match": values["exact_match"],
            "char_accuracy": values["char_accuracy"],
            "mean_char_accuracy": values.get("mean_char_accuracy", float("nan")),
            "n": int(values["n"]),
        }
        for task, values in summary.items()
    ]


def evaluate_vision_drop(
    loaded: LoadedModel,
    documents: Any,
    drops: Sequence[VisionDrop | None],
    *,
    tasks: Sequence[str] | None = None,
    seed: int | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Reader accuracy under each condition of ``drops`` (``None``: the unmodified model).

    Each condition runs :func:`sparsemm_utils.tiny_reader.accuracy.evaluate_reader` (greedy, full KV cache,
    exact match and character accuracy per task, the offline benchmark) inside
    :func:`vision_drop`. Conditions that drop the same set of layers (e.g. ``"inside"`` and
    ``"from"`` of the last range) are evaluated once and reported under each name.

    Returns ``vision_drop.csv``'s rows: reading (``"inside"``, ``"from"`` or ``"none"``),
    layer_range (``"first-last"``, 0-based inclusive, or ``"none"``), first_layer, last_layer,
    dropped_layers (the layers really dropped, ``"a-b"``), task (each task and ``"all"``),
    exact_match, char_accuracy, mean_char_accuracy, n (questions).
    """
    tasks = tuple(tasks) if tasks is not None else TASK_TYPES
    seed = HELDOUT_SEED if seed is None else seed
    cache: dict[frozenset[int], dict] = {}
    rows: list[dict] = []
    for drop in tqdm(list(drops), desc="vision-drop conditions", disable=not progress):
        key = frozenset(drop.layers(loaded.num_layers)) if drop is not None else frozenset()
        if key not in cache:
            with vision_drop(loaded, drop):
                cache[key] = evaluate_reader(
                    loaded, documents, tasks, seed=seed, max_new_tokens=max_new_tokens, progress=False
                )["summary"]
        rows.extend(_condition_rows(drop, cache[key], loaded.num_layers))
    return pd.DataFrame(rows)
