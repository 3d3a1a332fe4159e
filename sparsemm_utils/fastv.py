"""FastV: the token-level peer of SparseMM's head-level KV budgets (step 07, for the sweep of step 05).

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764) prunes IMAGE
TOKENS, the same for every head: after layer K, the image tokens that the last prompt token
attends to least are removed from the sequence. SparseMM instead keeps a different number of
tokens per KV HEAD. Both shrink the KV cache, so step 05 can compare them at equal KV bytes
(:meth:`FastVPress.stored_prompt_tokens`, :func:`fastv_ratio_for_budget`).

The rule (:class:`FastVPress`, as FastV's code does it, ``modeling_llama.py`` of
pkunlp-icler/FastV): layers ``0 .. K-1`` see every token. The attention of layer ``K-1`` (0-based)
is averaged over its heads; its last prompt query's row, restricted to the image tokens, ranks
them; the top ``round(n_img * (1 - R))`` are kept (Python's round, half to even, as the original)
and the other ``n_img - round(n_img * (1 - R))`` are dropped from layers ``K .. L-1``: no query
attends to them there and their keys and values are not stored in those layers' KV cache. FastV's
"K = 2, R = 50%" is ``FastVPress(k=2, ratio=0.5)``. Differences to the original, all deliberate:
the ranking softmax is float32 (the original ranks in the model's dtype); the dropped tokens are
masked rather than cut out of the hidden states (same outputs for every kept token, since nothing
reads a dropped token after layer K-1); image tokens are every position holding the image token id
(LLaVA-NeXT's newline tokens included), not one contiguous span.

Mechanics: the attention function :func:`fastv_attention` (registered as :data:`FASTV_ATTENTION`,
language model only, its session handed over by :data:`FASTV_HOOK`:
:mod:`sparsemm_utils.attention_hooks`) and the per-head cache of step 04
(:class:`~sparsemm_utils.kv_cache.PerHeadKVCache`): at prefill, layers ``< K`` keep all n tokens
(``keep_all``), layers ``>= K`` store the n - dropped kept positions (``compress``, the same for
every KV head); decoding attends over what each head stores
(:meth:`~sparsemm_utils.kv_cache.PerHeadKVLayer.attend`). :func:`fastv_generate` mirrors
:func:`sparsemm_utils.compression.compressed_generate`. Batch size 1, greedy or sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsemm_utils.allocation import ModelShape
from sparsemm_utils.attention_capture import last_query_attention
from sparsemm_utils.attention_hooks import AttentionHook, NoActiveStateError, text_attention
from sparsemm_utils.compression import GenerationResult, _decode_reserve
from sparsemm_utils.kv_cache import DECODE_BLOCK, PerHeadKVCache, analytic_kv_bytes
from sparsemm_utils.models import LoadedModel
from sparsemm_utils.prompts import build_inputs
from sparsemm_utils.reader_tasks import HELDOUT_SEED, TASK_TYPES, questions_for_document
from sparsemm_utils.tiny_reader.accuracy import summarize_records
from sparsemm_utils.validate import check_fraction, check_int, is_int
from sparsemm_utils.vision_drop import masked_sdpa

__all__ = [
    "FASTV_ATTENTION",
    "FastVError",
    "InvalidFastVParameterError",
    "NoActiveFastVError",
    "FastVInputError",
    "FastVPress",
    "FastVBudgetMatch",
    "FastVAtBudget",
    "FastVSession",
    "FastVResult",
    "fastv_ratio_for_budget",
    "fastv_attention",
    "FASTV_HOOK",
    "register_fastv",
    "fastv",
    "fastv_generate",
    "fastv_generate_at_budget",
    "evaluate_fastv",
]

#: Name of :func:`fastv_attention` in transformers' AttentionInterface.
FASTV_ATTENTION = "sparsemm_fastv"


class FastVError(ValueError):
    """Base class of this module's errors."""


class InvalidFastVParameterError(FastVError):
    """K or R out of range, or K beyond the model's layers."""


class NoActiveFastVError(NoActiveStateError):
    """:func:`fastv_attention` ran outside a :func:`fastv` context."""


class FastVInputError(FastVError):
    """Inputs or ``generate`` arguments FastV cannot honour (batch > 1, padding, a cache of one's own)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class FastVPress:
    """FastV (module docstring): after the first ``k`` layers, drop the share ``ratio`` of the
    image tokens that the last prompt token attends to least (layer ``k - 1``'s attention averaged
    over heads) from every later layer and its KV cache.

    ``k`` >= 1 (FastV's K; ``k = L`` drops nothing); ``ratio`` R in [0, 1] (R = 0 drops nothing).
    """

    k: int = 2
    ratio: float = 0.5

    name: ClassVar[str] = "fastv"

    def __post_init__(self) -> None:
        layers_hint = "the first k layers see every image token; layer k-1's attention ranks them"
        check_int("k", self.k, 1, error=InvalidFastVParameterError, hint=layers_hint)
        check_fraction("ratio", self.ratio, error=InvalidFastVParameterError, hint="the share of image tokens dropped")

    def validate_for(self, shape: ModelShape) -> None:
        """``k`` must not exceed the model's layers (``k = L``: nothing is dropped)."""
        if self.k > shape.layers:
            raise InvalidFastVParameterError(f"k={self.k} exceeds the model's {shape.layers} layers")

    def num_kept_image_tokens(self, num_image_tokens: int) -> int:
        """``round(n_img * (1 - R))``, Python's round as FastV's code (half to even)."""
        check_int("num_image_tokens", num_image_tokens, 0, error=InvalidFastVParameterError)
        return int(round(num_image_tokens * (1.0 - float(self.ratio))))

    def num_dropped(self, num_image_tokens: int) -> int:
        """Image tokens dropped from layers ``k ..``: ``n_img - round(n_img * (1 - R))``."""
        return int(num_image_tokens) - self.num_kept_image_tokens(num_image_tokens)

    def stored_prompt_tokens(self, shape: ModelShape, prompt_len: int, num_image_tokens: int) -> np.ndarray:
        """Prompt tokens each KV head stores after the prefill: int64 ``(layers, kv_heads)``:
        n in layers ``< k``, ``n - dropped`` in layers ``>= k``."""
        self.validate_for(shape)
        if not is_int(prompt_len) or not 0 <= num_image_tokens <= prompt_len:
            raise InvalidFastVParameterError(
                f"need 0 <= num_image_tokens <= prompt_len, got {num_image_tokens!r} and {prompt_len!r}"
            )
        out = np.full(shape.kv_grid, int(prompt_len), dtype=np.int64)
        out[self.k :] -= self.num_dropped(num_image_tokens)
        return out

    def kv_bytes(self, shape: ModelShape, prompt_len: int, num_image_tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """docs/method.md §7's analytic KV bytes of the prompt after the prefill."""
        return analytic_kv_bytes(self.stored_prompt_tokens(shape, prompt_len, num_image_tokens), head_dim, dtype)


@dataclass(frozen=True)
class FastVBudgetMatch:
    """What :func:`fastv_ratio_for_budget` found: ``ratio`` R, ``dropped`` image tokens, the
    ``stored_tokens`` FastV then keeps (all layers and KV heads), the ``target_tokens`` asked for,
    and ``reachable`` (False when even R = 1 stores more than the target)."""

    ratio: float
    dropped: int
    stored_tokens: int
    target_tokens: int
    reachable: bool


def fastv_ratio_for_budget(
    shape: ModelShape, prompt_len: int, num_image_tokens: int, k: int, target_tokens: int
) -> FastVBudgetMatch:
    """The smallest FastV ratio whose stored prompt tokens do not exceed ``target_tokens``.

    FastV stores ``H_kv * (L * n - (L - k) * d)`` prompt tokens when it drops ``d`` image tokens
    (:meth:`FastVPress.stored_prompt_tokens`), so equal KV bytes with a head-level method that
    stores ``target_tokens`` in all (e.g. ``HeadCapacities.kept(n).sum()`` of step 04) needs
    ``d = ceil((L * n - target / H_kv) / (L - k))``, clipped to ``[0, n_img]``; R = d / n_img
    (R = 0 for a prompt without image tokens: nothing to drop, reachable only if it all fits).
    Example: L = 4, H_kv = 2, n = 100, n_img = 60, k = 2, target 640 tokens:
    d = ceil((400 - 320) / 2) = 40, R = 40 / 60, stored = 2 * (400 - 2 * 40) = 640.
    """
    press = FastVPress(k=k, ratio=0.0)
    press.validate_for(shape)
    check_int("target_tokens", target_tokens, 0, error=InvalidFastVParameterError)
    check_int("num_image_tokens", num_image_tokens, 0, error=InvalidFastVParameterError)
    layers, kv_heads, n = shape.layers, shape.kv_heads, int(prompt_len)
    pruned_layers = layers - k
    if pruned_layers == 0:
        needed = 0 if layers * n * kv_heads <= target_tokens else num_image_tokens + 1
    else:
        needed = max(0, math.ceil((layers * n - target_tokens / kv_heads) / pruned_layers - 1e-9))
    reachable = needed <= num_image_tokens
    dropped = min(needed, num_image_tokens)
    ratio = dropped / num_image_tokens if num_image_tokens else 0.0
    stored = int(FastVPress(k=k, ratio=ratio).stored_prompt_tokens(shape, n, num_image_tokens).sum())
    return FastVBudgetMatch(ratio=ratio, dropped=dropped, stored_tokens=stored, target_tokens=int(target_tokens), reachable=reachable)


@dataclass(frozen=True)
class FastVAtBudget:
    """FastV as a method of step 05's sweep: at budget ``budget``, FastV (layer ``k``) stores no more
    KV bytes than a head-level method with the same budget.

    A head-level method at budget B keeps ``min(B, n)`` prompt tokens per KV head (docs/method.md §5:
    a budget counts the window; a prompt shorter than B is kept whole), so a prompt of n tokens
    costs ``target = L * H_kv * min(B, n)`` stored tokens. FastV's ratio is chosen per prompt by
    :func:`fastv_ratio_for_budget` (the smallest R that fits). FastV cannot go below
    ``H_kv * (L * n - (L - k) * n_img)`` (layers ``< k`` and every text token stay whole): when the
    target is smaller, it runs at R = 1 and stores more than the target (``reachable`` False in
    :meth:`match`); step 05 records the KV bytes each answer really used, so the comparison at equal
    bytes is read off the measured bytes, never assumed.

    Worked example (L = 4, H_kv = 2, k = 1): n = 80 tokens of which 45 image tokens, B = 64:
    target = 4 * 2 * 64 = 512; FastV needs ceil((4 * 80 - 512 / 2) / 3) = ceil(21.33) = 22 dropped
    image tokens, R = 22 / 45, stored 2 * (320 - 3 * 22) = 508 <= 512. At B = 16 the target 128
    would need ceil((320 - 64) / 3) = 86 dropped tokens > 45: R = 1, stored 2 * (320 - 3 * 45) = 370.
    """

    budget: int
    k: int = 2

    name: ClassVar[str] = "fastv"

    def __post_init__(self) -> None:
        check_int("budget", self.budget, 1, error=InvalidFastVParameterError, hint="prompt tokens per KV head")
        FastVPress(k=self.k, ratio=0.0)  # validates k

    def target_tokens(self, shape: ModelShape, prompt_len: int) -> int:
        """``L * H_kv * min(budget, prompt_len)``: what a head-level method at this budget stores."""
        return shape.layers * shape.kv_heads * min(int(self.budget), int(prompt_len))

    def match(self, shape: ModelShape, prompt_len: int, num_image_tokens: int) -> FastVBudgetMatch:
        """FastV's ratio for one prompt (:func:`fastv_ratio_for_budget` at :meth:`target_tokens`)."""
        return fastv_ratio_for_budget(shape, int(prompt_len), int(num_image_tokens), self.k, self.target_tokens(shape, prompt_len))

    def press_for(self, shape: ModelShape, prompt_len: int, num_image_tokens: int) -> tuple[FastVPress, FastVBudgetMatch]:
        """The :class:`FastVPress` for one prompt and the match it came from."""
        found = self.match(shape, prompt_len, num_image_tokens)
        return FastVPress(k=self.k, ratio=found.ratio), found


# ------------------------------------------------------------------------------ the session


@dataclass(eq=False)
class FastVSession:
    """State of one FastV generation.

    ``image_positions``: int64 ``(n_img,)`` positions of the image tokens in the prompt;
    after the prefill, ``ranking`` float32 ``(n_img,)`` (layer ``k-1``'s head-averaged attention of
    the last prompt query on each image token), ``kept`` and ``dropped`` (sorted positions).
    ``cache``: the :class:`~sparsemm_utils.kv_cache.PerHeadKVCache` to pass as ``past_key_values``.
    """

    press: FastVPress
    shape: ModelShape
    cache: PerHeadKVCache
    image_positions: torch.Tensor
    prompt_len: int
    ranking: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    _hidden: torch.Tensor | None = field(default=None, repr=False)

    def rank(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None) -> None:
        """Choose the image tokens to keep from layer ``k - 1``'s prefill attention."""
        n = int(key.shape[2])
        positions = self.image_positions.to(key.device)
        row = last_query_attention(query, key, attention_mask, scaling=scaling)[0].mean(dim=0)  # (n,)
        self.ranking = row[positions]
        keep = self.press.num_kept_image_tokens(int(positions.numel()))
        top = torch.topk(self.ranking, keep).indices if keep else positions.new_zeros(0)
        self.kept = positions[top].sort().values
        mask = torch.ones_like(positions, dtype=torch.bool)
        mask[top] = False
        self.dropped = positions[mask]
        hidden = torch.zeros(n, dtype=torch.bool, device=key.device)
        hidden[self.dropped] = True
        self._hidden = hidden

    @property
    def hidden(self) -> torch.Tensor | None:
        """bool ``(n,)``: the dropped prompt positions (None before layer k-1 ran or if none)."""
        return self._hidden


#: The session :func:`fastv_attention` reads, activated by :func:`fastv`.
FASTV_HOOK: AttentionHook[FastVSession] = AttentionHook(
    "sparsemm_fastv",
    context="a FastV context",
    usage=(
        "use sparsemm_utils.fastv.fastv_generate(loaded, press, inputs, ...) or "
        "`with fastv(loaded, press, input_ids) as session:` and pass session.cache"
    ),
    missing_error=NoActiveFastVError,
    nested_error=FastVError,
)


def fastv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """FastV's attention function (registered as :data:`FASTV_ATTENTION`).

    Prefill, layer ``< k``: sdpa over every key, store everything; layer ``k - 1`` also ranks the
    image tokens. Prefill, layer ``>= k``: sdpa with the dropped tokens hidden from every query
    (:func:`~sparsemm_utils.vision_drop.masked_sdpa`), store only the kept positions. Decode:
    attention over what each KV head stores. Shapes: query ``(1, H, q, d)``, output ``(1, q, H, d)``."""
    session = FASTV_HOOK.active(FASTV_ATTENTION)
    layer_idx = int(module.layer_idx)
    layer = session.cache.layers[layer_idx]
    if not layer.has_pending_prefill:
        return layer.attend(query, scaling), None
    n = int(key.shape[2])
    if n != session.prompt_len:
        raise FastVInputError(
            f"the prefill has {n} tokens but the session was built for a prompt of {session.prompt_len}: pass the same "
            "input_ids to fastv() and to the model"
        )
    hidden = session.hidden
    if layer_idx < session.press.k or hidden is None or not bool(hidden.any()):
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if layer_idx == session.press.k - 1 and session.image_positions.numel():
            session.rank(query, key, attention_mask, scaling)
        layer.keep_all()
        return output, None
    output = masked_sdpa(module, query, key, value, attention_mask, hidden, None, scaling=scaling, dropout=dropout, **kwargs)
    keep = torch.nonzero(~hidden).flatten()
    layer.compress([keep] * layer.num_kv_heads)
    return output, None


def register_fastv() -> str:
    """Register :func:`fastv_attention` (mask function ``sdpa``); returns its name. Idempotent."""
    return FASTV_HOOK.register(FASTV_ATTENTION, fastv_attention)


def _model_shape(loaded: LoadedModel) -> ModelShape:
    return ModelShape(layers=loaded.num_layers, query_heads=loaded.num_heads, kv_heads=loaded.num_kv_heads)


@contextlib.contextmanager
def fastv(loaded: LoadedModel, press: FastVPress, input_ids: torch.Tensor, *, decode_reserve: int = DECODE_BLOCK) -> Iterator[FastVSession]:
    """Run ``loaded``'s language model with FastV inside the block, for the prompt ``input_ids``
    ``(1, n)``; pass ``session.cache`` as ``past_key_values``. The previous attention
    implementation is restored on exit, also after an error. Nested contexts raise :class:`FastVError`."""
    if not isinstance(press, FastVPress):
        raise FastVError(f"press must be a FastVPress, got {press!r}")
    shape = _model_shape(loaded)
    press.validate_for(shape)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise FastVInputError(
            f"FastV runs one prompt at a time: input_ids of shape (1, n), got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
        )
    positions = torch.nonzero(input_ids[0] == loaded.image_token_id).flatten()
    session = FastVSession(
        press=press,
        shape=shape,
        cache=PerHeadKVCache(shape.layers, decode_reserve=decode_reserve),
        image_positions=positions,
        prompt_len=int(input_ids.shape[1]),
    )
    with FASTV_HOOK.activate(session), text_attention(loaded.model, register_fastv()):
        yield session


@dataclass(eq=False)
class FastVResult(GenerationResult):
    """What :func:`fastv_generate` returns: ``output`` is ``generate``'s own return value;
    ``session`` (a :class:`FastVSession`) holds the per-head cache and the kept / dropped image
    positions. ``sequences``, ``cache`` and ``kv_bytes`` (generated tokens included) as for
    :func:`~sparsemm_utils.compression.compressed_generate`. ``match``: the budget match of
    :func:`fastv_generate_at_budget` (None from :func:`fastv_generate`)."""

    session: FastVSession
    match: FastVBudgetMatch | None = None

    @property
    def stored_prompt_tokens(self) -> np.ndarray:
        """Prompt tokens each KV head kept, int64 ``(layers, kv_heads)``."""
        return self.session.cache.kept_prompt_tokens()


_FORBIDDEN = ("past_key_values", "cache_implementation", "prefill_chunk_size", "assistant_model")


def fastv_generate(loaded: LoadedModel, press: FastVPress, inputs: Mapping[str, Any], **gen_kwargs: Any) -> FastVResult:
    """``loaded.model.generate(**inputs, **gen_kwargs)`` with FastV (module docstring).

    ``inputs``: one prompt (batch 1, no padding), e.g. :func:`sparsemm_utils.prompts.build_inputs`.
    ``gen_kwargs`` go to ``generate`` (``max_new_tokens``, ``do_sample``, ...); the decode reserve
    of the cache is sized to ``max_new_tokens``. The attention implementation is restored after."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        raise FastVInputError("inputs must hold input_ids of shape (1, n), e.g. from sparsemm_utils.prompts.build_inputs")
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
        raise FastVInputError("the attention_mask holds padding: a single prompt needs none")
    for name in _FORBIDDEN:
        if gen_kwargs.get(name) is not None:
            raise FastVInputError(f"{name}= is not supported: fastv_generate makes the cache itself")
    for name in ("num_beams", "num_return_sequences"):
        if gen_kwargs.get(name, 1) != 1:
            raise FastVInputError(f"{name}={gen_kwargs[name]}: FastV's per-head cache needs {name}=1")
    if gen_kwargs.get("use_cache", True) is False:
        raise FastVInputError("use_cache=False: FastV stores a pruned KV cache and needs use_cache=True")
    with fastv(loaded, press, ids, decode_reserve=_decode_reserve(loaded, gen_kwargs, DECODE_BLOCK)) as session:
        output = loaded.model.generate(**inputs, past_key_values=session.cache, **gen_kwargs)
    return FastVResult(output=output, session=session)


def fastv_generate_at_budget(loaded: LoadedModel, method: FastVAtBudget, inputs: Mapping[str, Any], **gen_kwargs: Any) -> FastVResult:
    """:func:`fastv_generate` with the ratio :class:`FastVAtBudget` chooses for this prompt (its
    length and image tokens); ``result.match`` says what was asked, found and reachable."""
    if not isinstance(method, FastVAtBudget):
        raise FastVError(f"method must be a FastVAtBudget, got {method!r}")
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        raise FastVInputError("inputs must hold input_ids of shape (1, n), e.g. from sparsemm_utils.prompts.build_inputs")
    n_img = int((ids[0] == loaded.image_token_id).sum())
    press, found = method.press_for(_model_shape(loaded), int(ids.shape[1]), n_img)
    result = fastv_generate(loaded, press, inputs, **gen_kwargs)
    result.match = found
    return result


# ------------------------------------------------------------------------------ the benchmark


def evaluate_fastv(
    loaded: LoadedModel,
    documents: Any,
    presses: Sequence[FastVPress],
    *,
    tasks: Sequence[str] | None = None,
    seed: int | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Reader accuracy and KV bytes of each FastV setting on the offline benchmark.

    The questions are :func:`sparsemm_utils.tiny_reader.accuracy.evaluate_reader`'s (one per task a document can
    host, :func:`~sparsemm_utils.reader_tasks.questions_for_document` with ``seed``, default the
    held-out seed); scores by :func:`sparsemm_utils.tiny_reader.accuracy.summarize_records`. Returns one row per
    (setting, task incl. ``"all"``): method, k, ratio, task, exact_match, char_accuracy,
    mean_char_accuracy, n, prompt_kv_bytes (mean over questions of the prompt's stored KV bytes
    after the prefill), full_prompt_kv_bytes (the same with nothing dropped), kv_fraction.
    """
    tasks = tuple(tasks) if tasks is not None else TASK_TYPES
    seed = HELDOUT_SEED if seed is None else seed
    tokenizer = loaded.processor.tokenizer
    element = torch.empty((), dtype=loaded.dtype).element_size()
    per_token = loaded.head_dim * 2 * element  # bytes of one token in one KV head (K and V)
    questions = [(doc, q) for i in range(len(documents)) for doc in [documents[i]] for q in questions_for_document(doc, tasks, seed=seed)]
    rows = []
    for press in tqdm(list(presses), desc="FastV settings", disable=not progress):
        records, stored, full = [], [], []
        for doc, q in questions:
            inputs = build_inputs(loaded, doc["image"], q.prompt)
            n = int(inputs["input_ids"].shape[1])
            result = fastv_generate(loaded, press, inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = result.sequences[0, n:]
            records.append({"task": q.task, "answer": q.answer, "prediction": tokenizer.decode(new, skip_special_tokens=True)})
            stored.append(int(result.stored_prompt_tokens.sum()) * per_token)
            full.append(n * loaded.num_layers * loaded.num_kv_heads * per_token)
        for task, values in summarize_records(records).items():
            rows.append(
                {
                    "method": press.name,
                    "k": press.k,
                    "ratio": float(press.ratio),
                    "task": task,
                    "exact_match": values["exact_match"],
                    "char_accuracy": values["char_accuracy"],
                    "mean_char_accuracy": values["mean_char_accuracy"],
                    "n": int(values["n"]),
                    "prompt_kv_bytes": float(np.mean(stored)) if stored else float("nan"),
                    "full_prompt_kv_bytes": float(np.mean(full)) if full else float("nan"),
                }
            )
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["kv_fraction"] = frame["prompt_kv_bytes"] / frame["full_prompt_kv_bytes"]
    return frame
