"""The study model's card, ``data/study_model/MODEL_CARD.md``, written from the files beside it.

Every number in the card is read from a file the training or the validation wrote
(``train_config.json``, ``validation.json``, ``recipes.json``, ``trained.safetensors``), so
rewriting the card after a retraining (``python -m sparsemm_utils.study_model card``) keeps it true.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparsemm_utils.manifest import sha256_file
from sparsemm_utils.reader_tasks import HELDOUT_SEED, STUDY_PAGES, TASK_TYPES, VALIDATION_SEED

from .assemble import CARD_FILE, CONFIG_FILE, PARTS_DIR, RECIPES_FILE, SPEC_FILE, TRAINED_FILE, VALIDATION_FILE, read_spec
from .backbone import BACKBONE
from .pages import TRAIN_SEED

__all__ = ["render_card", "write_card"]


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _recipe_row(r: Mapping[str, Any]) -> str:
    heads, accuracy = r["heads"], r["accuracy"]
    lowest = min(r["sparsemm_vs_random"], key=int) if r.get("sparsemm_vs_random") else None
    if lowest is None:
        vs = "-"
    else:
        v = r["sparsemm_vs_random"][lowest]
        vs = f"B = {lowest}: {v['sparsemm_minus_random']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
    minutes = "-" if r.get("training_minutes") is None else f"{r['training_minutes']:.1f}"
    return (
        f"| {r['recipe']} | {minutes} | {_pct(heads['top5_share'])} | {_pct(heads['top10_share'])} | "
        f"{accuracy['fullkv_anls']:.3f} ({accuracy['n_questions']} q) | {vs} |"
    )


def render_card(parts: str | Path = PARTS_DIR) -> str:
    """The card's Markdown for the parts folder ``parts``."""
    folder = Path(parts)
    spec = read_spec(folder)
    config = _read(folder / CONFIG_FILE) or {}
    trained = _read(folder / VALIDATION_FILE) or {}
    recipes: Sequence[Mapping[str, Any]] = _read(folder / RECIPES_FILE) or []
    size_mb = (folder / TRAINED_FILE).stat().st_size / 1e6
    lines = [
        "# Study model card",
        "",
        "The offline study's model (`python -m sparsemm_utils.study_model`; written by `... card` from the files in this",
        "folder). An ordinary `LlavaNextForConditionalGeneration`: the language model is **SmolLM2-135M-Instruct**",
        f"(Apache-2.0, from the registry package `{BACKBONE.distribution}=={BACKBONE.version}`, file `{BACKBONE.filename}`,",
        f"sha256 `{BACKBONE.sha256}`, dequantized to float32), with a vision tower, projector and LoRA adapters trained",
        f"here. This folder ships only the trained parts (`{TRAINED_FILE}`, {size_mb:.1f} MB, sha256",
        f"`{sha256_file(folder / TRAINED_FILE)}`) and `{SPEC_FILE}`; `make reproduce` joins them with the backbone into",
        "`build/study_model/` (`python -m sparsemm_utils.study_model assemble`). Why it is built this way and how the",
        "recipe was chosen: [docs/study_model.md](../../docs/study_model.md).",
        "",
        "## Architecture",
        "",
        f"- Vision: CLIP ViT trained from scratch, {spec.vision.layers} layers, width {spec.vision.hidden}, {spec.vision.heads} heads,",
        f"  patch {spec.cell} px = one glyph cell, {spec.crop} px crops ({spec.grid} x {spec.grid} tokens each); the page sizes",
        f"  {', '.join(f'{h}x{w}' for h, w in spec.pages)} px (height x width) are LLaVA-NeXT's grid pinpoints, so a page is",
        "  never resized and one visual token stays one cell. The LLM sees the base image (squashed to one crop) then the",
        "  crop grid row by row with a newline token after each row (docs/method.md §3).",
        "- Projector: LLaVA's two-layer MLP to width 576; `image_newline` starts as the LLM's embedding of `\"\\n\"`.",
        f"- LoRA: rank {spec.lora_rank}, alpha {spec.lora_alpha:g}, on {', '.join(spec.lora_targets)} of every one of the 30",
        "  decoder layers alike, merged into the weights when the model is assembled.",
        "- Chat: SmolLM2's ChatML, the image first in the user turn, no system turn (`default_system_prompt: null`).",
        "",
        "## Recipe",
        "",
        "1. **Alignment** (no LLM forward pass): the tower and projector learn to output, for each glyph cell, the LLM's own",
        "   input embedding of that character (`\" \"` for an empty cell): relative squared error plus a cross-entropy over",
        "   the page characters' embeddings.",
        "2. **Tasks**: greedy-answer training on the reading tasks (read everything with the study's OCR prompt, read line",
        "   k, value of KEY), loss on the answer tokens, the alignment loss kept beside it; LoRA, tower, projector and",
        "   `image_newline` train, the backbone stays frozen.",
        "",
        "No loss, mask, initialisation or architecture choice names a head or rewards concentrated attention: which",
        "heads read the image is left to training.",
        "",
        f"Pages: {STUDY_PAGES.cols[0]} x {STUDY_PAGES.rows[0]} cells, {STUDY_PAGES.lines[0]}-{STUDY_PAGES.lines[1]} lines of "
        f"{STUDY_PAGES.words_per_line[0]}-{STUDY_PAGES.words_per_line[1]} words of {STUDY_PAGES.word_length[0]}-"
        f"{STUDY_PAGES.word_length[1]} characters from `{STUDY_PAGES.charset}`. Streams: training seed {TRAIN_SEED},",
        f"validation seed {VALIDATION_SEED} (every design choice below was judged there), step 05's benchmark seed",
        f"{HELDOUT_SEED} (no design choice was judged on it; the exploration's scratch code printed a training monitor on",
        "its pages, see docs/study_model.md).",
        "",
    ]
    if config:
        command = " ".join(
            f"--{k.replace('_', '-')} {' '.join(str(x) for x in v) if isinstance(v, list) else v}"
            for k, v in config.items() if k != "spec"
        )  # fmt: skip
        lines += ["The command that trained these parts:", "", "```", f"python -m sparsemm_utils.study_model train {command}", "```", ""]
    if trained:
        lines += [
            "## Training",
            "",
            f"{trained['training_minutes']:.1f} minutes in all ({trained['alignment_minutes']:.1f} alignment, "
            f"{trained['task_minutes']:.1f} tasks, validation included) on {trained['machine']}.",
            "",
        ]
        history = trained.get("validation") or []
        if history:
            lines += ["Validation while training (greedy, full cache, pages of the validation seed):", "",
                      "| step | " + " | ".join(f"{t} exact / chars" for t in TASK_TYPES) + " | all exact |",
                      "|---|" + "---|" * (len(TASK_TYPES) + 1)]  # fmt: skip
            for h in history:
                s = h["summary"]
                cells = " | ".join(f"{s[t]['exact_match']:.3f} / {s[t]['char_accuracy']:.3f} (n {s[t]['n']})" if t in s else "-" for t in TASK_TYPES)
                lines.append(f"| {h['step']} | {cells} | {s['all']['exact_match']:.3f} |")
            lines.append("")
    if recipes:
        lines += [
            "## Recipes tried",
            "",
            "Each row is one trained recipe judged on validation pages only (`python -m sparsemm_utils.study_model validate`):",
            "the share of the visual-head score held by the top 5% and 10% of the 270 heads (step 03's hit rule on",
            f"{recipes[-1]['heads']['score_docs']} pages), FullKV ANLS, and SparseMM minus random allocation at the lowest",
            "budget tried with its paired bootstrap 95% interval. The paper reports ~55% / ~77% for its top 5% / 10%",
            "(LLaVA-NeXT-Vicuna-7B, docs/method.md §4).",
            "",
            "| recipe | minutes | top 5% | top 10% | FullKV ANLS | SparseMM - random |",
            "|---|---|---|---|---|---|",
            *[_recipe_row(r) for r in recipes],
            "",
        ]
        for r in recipes:
            if r.get("command"):
                lines.append(f"- {r['recipe']}: `{r['command']}`")
        lines.append("")
    return "\n".join(lines)


def write_card(parts: str | Path = PARTS_DIR) -> Path:
    """Write :func:`render_card` to ``<parts>/MODEL_CARD.md``."""
    path = Path(parts) / CARD_FILE
    path.write_text(render_card(parts), encoding="utf-8")
    return path
