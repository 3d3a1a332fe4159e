"""Step 07, where the model looks layer by layer: LLaVA-Mini's attention analysis (docs/method.md §8).

LLaVA-Mini (arXiv 2501.03895, section 3 and appendix A) follows, layer by layer, how much
attention each token category (instruction, vision, response) pays to each other one, and drops
the vision tokens from ranges of layers to see where the model reads them. Notebook
``07_attention_by_layer`` runs it on any supported model, with the head-level view that joins it
to SparseMM's visual heads (step 03) and FastV as a token-level peer. The rules live below this
module, which holds the step's parameters and its conclusions:

- :mod:`sparsemm_utils.token_categories`: which token is which (categories, prompt roles);
- :mod:`sparsemm_utils.category_attention`: Eq. 4, attention entropy, per-head vision share,
  the step's tables;
- :mod:`sparsemm_utils.layer_stats_capture`: recording those statistics from a model;
- :mod:`sparsemm_utils.vision_drop` and :mod:`sparsemm_utils.fastv`: the ablation and FastV;
- here: :data:`STEP`, :class:`AttentionByLayerConfig` and :func:`findings_table`, the paper's
  findings set against this run's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sparsemm_utils.category_attention import spearman
from sparsemm_utils.reader_tasks import TASK_TYPES
from sparsemm_utils.token_categories import LayerAnalysisError
from sparsemm_utils.validate import check_fraction, check_int
from sparsemm_utils.vision_drop import READINGS

__all__ = [
    "STEP",
    "AttentionByLayerConfig",
    "findings_table",
]

#: The step folder this module's notebook writes into.
STEP = "07_attention_by_layer"


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
            check_int(name, getattr(self, name), minimum, error=LayerAnalysisError)
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
        for i, r in enumerate(self.fastv_ratios):
            check_fraction(f"fastv_ratios[{i}]", r, error=LayerAnalysisError, hint="each is a FastV ratio R")


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

