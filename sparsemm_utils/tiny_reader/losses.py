"""The reader's forward pass and its losses (:func:`reader_losses`): the answer loss and the
auxiliary glyph, position, pointer and key losses of :class:`~.model.AuxiliaryHeads`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import DynamicCache

from sparsemm_utils.tiny_reader.config import TinyReaderError
from sparsemm_utils.tiny_reader.model import POSITION_CLASSES, AuxiliaryHeads

__all__ = ["POSITION_LABEL_SMOOTHING", "visual_positions", "reader_losses"]

#: Label smoothing of the row-and-column losses (position, pointer, key). Without it the loss
#: drives its margins up without bound, growing the visual tokens' hidden states until the
#: position drowns the glyph (docs/tiny_reader.md has the trial run that showed it).
POSITION_LABEL_SMOOTHING: float = 0.1


def visual_positions(image_grid_thw: torch.Tensor, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column in the merged grid of every visual token of a batch, in the order of the
    language model's image tokens (image after image, each in raster order).

    ``image_grid_thw``: (images, 3) patch grid ``(t, h, w)`` of each image. Returns two (visual
    tokens,) long tensors. Worked example: one image of 4 x 6 patches (2 x 3 merged tokens) gives
    rows ``[0, 0, 0, 1, 1, 1]`` and columns ``[0, 1, 2, 0, 1, 2]``."""
    rows, cols = [], []
    for t, h, w in image_grid_thw.tolist():
        gh, gw = h // merge, w // merge
        if gh > POSITION_CLASSES or gw > POSITION_CLASSES:
            raise TinyReaderError(
                f"an image of {gh} x {gw} merged tokens is larger than the position head's {POSITION_CLASSES} rows/columns; "
                "use smaller pages or raise POSITION_CLASSES"
            )
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        rows.append(r.reshape(-1).repeat(t))
        cols.append(c.reshape(-1).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def reader_losses(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    aux_head: AuxiliaryHeads | None = None,
    *,
    shared_prefix: bool = True,
    aux_weight: float = 1.0,
    position_weight: float = 0.0,
    position_layer: int = 1,
    pointer_weight: float = 0.0,
    pointer_layer: int = 3,
    key_weight: float = 0.0,
    key_layer: int = 2,
) -> dict[str, torch.Tensor]:
    """Losses and accuracies of a :func:`~sparsemm_utils.tiny_reader.batches.collate` batch.

    Returns ``lm_loss`` (mean cross-entropy over answer tokens, ``labels != -100``),
    ``aux_loss`` (glyph loss over visual tokens with a label, empty ones included) and
    ``aux_acc`` (its accuracy on the tokens that show a character; both 0 without ``aux_head``,
    ``aux_labels`` or ``aux_weight``), ``pos_loss`` (mean of the row and column cross-entropies
    of :class:`AuxiliaryHeads` ``.position`` over every visual token, read after decoder layer
    ``position_layer``, with label smoothing :data:`POSITION_LABEL_SMOOTHING`) and ``pos_acc``
    (fraction of tokens whose row AND column are right; both 0 without a position head or with
    ``position_weight`` 0), ``ptr_loss`` and ``ptr_acc`` (the same for :class:`AuxiliaryHeads`
    ``.pointer`` at the answer steps with a ``pointer_labels`` target, read after decoder layer
    ``pointer_layer``; 0 without a pointer head, ``pointer_labels`` or ``pointer_weight``),
    ``key_loss`` and ``key_acc`` (the same for ``.key`` at the prompt steps with a ``key_labels``
    target, read after decoder layer ``key_layer``),
    ``token_acc`` (argmax accuracy on answer tokens) and
    ``seq_correct`` (B,) bool: every answer token is the argmax given the true prefix, which is
    exactly when greedy decoding reproduces the answer (teacher-forced exact match).

    ``shared_prefix``: the ``prefix_len`` tokens before the image are identical in every row
    (``collate`` checks it); they are run once with batch 1 and their keys/values expanded to the
    batch. The result equals the plain forward pass up to float rounding."""
    inner = model.model
    lm = inner.language_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"]
    bsz = ids.shape[0]
    vision = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    image_embeds = torch.cat(vision.pooler_output, dim=0)  # (visual tokens, hidden)
    position_ids, _ = inner.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=mask
    )  # (3, B, L)
    want_positions = aux_head is not None and aux_head.position is not None and position_weight > 0
    want_pointers = aux_head is not None and aux_head.pointer is not None and pointer_weight > 0 and "pointer_labels" in batch
    want_keys = aux_head is not None and aux_head.key is not None and key_weight > 0 and "key_labels" in batch
    want_hidden = want_positions or want_pointers or want_keys
    embeds = lm.embed_tokens(ids)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
    if shared_prefix:
        p = int(batch["prefix_len"])
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=embeds[:1, :p], position_ids=position_ids[:, :1, :p], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys = layer.keys.expand(bsz, -1, -1, -1)
            layer.values = layer.values.expand(bsz, -1, -1, -1)
        lm_out = lm(
            inputs_embeds=embeds[:, p:], position_ids=position_ids[:, :, p:], attention_mask=mask,
            past_key_values=cache, use_cache=True, output_hidden_states=want_hidden,
        )
        targets, suffix_ids = labels[:, p:], ids[:, p:]
        pointers = batch["pointer_labels"][:, p:] if want_pointers else None
        keys = batch["key_labels"][:, p:] if want_keys else None
    else:
        lm_out = lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, use_cache=False,
                    output_hidden_states=want_hidden)
        targets, suffix_ids = labels, ids
        pointers = batch["pointer_labels"] if want_pointers else None
        keys = batch["key_labels"] if want_keys else None
    hidden = lm_out.last_hidden_state
    # position t predicts token t + 1
    pred_mask = targets[:, 1:] != -100  # (B, L' - 1)
    logits = model.lm_head(hidden[:, :-1][pred_mask])  # (answer tokens, vocab)
    gold = targets[:, 1:][pred_mask]
    lm_loss = nn.functional.cross_entropy(logits.float(), gold)
    hit = logits.argmax(-1) == gold
    per_row = torch.zeros(bsz, dtype=torch.long).index_add_(0, pred_mask.nonzero()[:, 0], (~hit).long())
    out = {
        "lm_loss": lm_loss,
        "token_acc": hit.float().mean().detach(),
        "seq_correct": per_row == 0,
        "aux_loss": torch.zeros(()),
        "aux_acc": torch.zeros(()),
        "pos_loss": torch.zeros(()),
        "pos_acc": torch.zeros(()),
        "ptr_loss": torch.zeros(()),
        "ptr_acc": torch.zeros(()),
        "key_loss": torch.zeros(()),
        "key_acc": torch.zeros(()),
    }
    if aux_head is not None and aux_weight > 0 and "aux_labels" in batch:
        aux_labels = batch["aux_labels"]
        valid = aux_labels != -100
        aux_logits = aux_head.glyph(image_embeds[valid])
        out["aux_loss"] = nn.functional.cross_entropy(aux_logits.float(), aux_labels[valid])
        glyph = aux_labels[valid] > 0
        out["aux_acc"] = (aux_logits.argmax(-1)[glyph] == aux_labels[valid][glyph]).float().mean().detach()
    if want_positions:
        visual = lm_out.hidden_states[position_layer][suffix_ids == model.config.image_token_id]  # (visual tokens, hidden)
        rows, cols = visual_positions(batch["image_grid_thw"])
        out["pos_loss"], out["pos_acc"] = _grid_loss(aux_head.position(visual), rows, cols)
    width = batch["image_grid_thw"][:, 2] // 2  # merged columns per sample
    if want_pointers:  # answer steps whose next character is drawn on the page
        out["ptr_loss"], out["ptr_acc"] = _token_grid_loss(aux_head.pointer, lm_out.hidden_states[pointer_layer], pointers, width)
    if want_keys:  # prompt steps of value questions after the key
        out["key_loss"], out["key_acc"] = _token_grid_loss(aux_head.key, lm_out.hidden_states[key_layer], keys, width)
    return out


def _token_grid_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_grid_loss` of ``head`` at the sequence steps that name a visual token: ``hidden``
    (B, L', hidden) the states of one decoder layer, ``targets`` (B, L') a row-major visual-token
    index per step (-100: none), ``width`` (B,) merged columns of each sample's image. Zero loss
    and accuracy when no step has a target."""
    has = targets != -100
    if not bool(has.any()):
        return torch.zeros(()), torch.zeros(())
    w = width.unsqueeze(1).expand_as(targets)[has]
    return _grid_loss(head(hidden[has]), targets[has] // w, targets[has] % w)


def _grid_loss(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy of a row-and-column head: ``logits`` (N, 2 * POSITION_CLASSES), rows then
    columns; ``rows``, ``cols`` (N,). Loss: mean of the two cross-entropies with label smoothing
    :data:`POSITION_LABEL_SMOOTHING`; accuracy: fraction with row AND column right (detached)."""
    logits = logits.float()
    row_logits, col_logits = logits[:, :POSITION_CLASSES], logits[:, POSITION_CLASSES:]
    ce = lambda lg, gold: nn.functional.cross_entropy(lg, gold, label_smoothing=POSITION_LABEL_SMOOTHING)  # noqa: E731
    loss = 0.5 * (ce(row_logits, rows) + ce(col_logits, cols))
    return loss, ((row_logits.argmax(-1) == rows) & (col_logits.argmax(-1) == cols)).float().mean().detach()
