"""Step 07, where the model looks layer by layer: LLaVA-Mini's attention analysis (docs/method.md §8).

LLaVA-Mini (arXiv 2501.03895, section 3 and appendix A) follows, layer by layer, how much
attention each token category (instruction, vision, response) pays to each other one, and drops
the vision tokens from ranges of layers to see where the model reads them. Notebook
``07_attention_by_layer`` runs it on any supported model, with the head-level view that joins it
to SparseMM's visual heads (step 03) and FastV as a token-level peer. The rules live below this
module:

- :mod:`sparsemm_utils.token_categories`: which token is which (categories, prompt roles);
- :mod:`sparsemm_utils.category_attention`: Eq. 4, attention entropy, per-head vision share,
  the step's tables;
- :mod:`sparsemm_utils.layer_stats_capture`: recording those statistics from a model;
- :mod:`sparsemm_utils.vision_drop` and :mod:`sparsemm_utils.fastv`: the ablation and FastV.

Here: :data:`STEP` (reads :data:`~sparsemm_utils.steps.ocr_annotation.DOCUMENTS`, the pages
analysed; :data:`~sparsemm_utils.steps.patch_mapping.REGIONS`, the cross-check of the image-token
positions; :data:`~sparsemm_utils.steps.head_scoring.HEAD_SCORES`, step 03's visual scores; writes the tables, ``findings.csv`` and
the figures),
:class:`Config` (the notebook's parameters), :func:`write_outputs` (the tables and the findings)
and :func:`findings` (LLaVA-Mini's findings beside this run's numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..artifacts import Artifact, StepSpec
from ..category_attention import spearman
from ..findings import Finding, findings_frame, read_findings
from ..parameters import MAX_DOCUMENTS, MAX_NEW_TOKENS, check_allow_large, check_size
from ..reader_tasks import TASK_TYPES
from ..token_categories import LayerAnalysisError
from ..benchmarks import OFFLINE_PAGES
from ..validate import check_choice, check_fraction, check_int
from ..vision_drop import READINGS
from . import head_scoring, ocr_annotation, patch_mapping

__all__ = [
    "NAME",
    "STEP",
    "CATEGORY_ATTENTION",
    "ENTROPY",
    "HEAD_VISION_SHARE",
    "VISION_DROP",
    "FASTV",
    "FINDINGS",
    "FIG_TOKEN_CATEGORIES",
    "FIG_CATEGORY_ATTENTION",
    "FIG_ENTROPY",
    "FIG_HEAD_VISION_SHARE",
    "FIG_VISION_DROP",
    "FIG_FASTV",
    "Config",
    "write_outputs",
    "findings",
]

NAME = "07_attention_by_layer"

# ---------------------------------------------------------------------------------------- outputs

CATEGORY_ATTENTION: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "category_attention.csv",
    "attention by token category per layer (LLaVA-Mini Eq. 4): layer, target, source, attention, std, n_samples",
    reader=pd.read_csv,
)
ENTROPY: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "entropy.csv",
    "attention entropy within each category per layer: layer, target, source, entropy, std, n_samples, max_entropy",
    reader=pd.read_csv,
)
HEAD_VISION_SHARE: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "head_vision_share.csv",
    "each head's attention share on vision tokens beside its visual score: layer, head, vision_share, visual_score",
    reader=pd.read_csv,
)
VISION_DROP: Artifact[pd.DataFrame] = Artifact(
    NAME,
    "vision_drop.csv",
    "reader accuracy with the vision tokens dropped in ranges of layers (LLaVA-Mini Fig. 5)",
    reader=pd.read_csv,
)
FASTV: Artifact[pd.DataFrame] = Artifact(
    NAME, "fastv.csv", "FastV's reader accuracy and prompt KV bytes at fixed ratios R", reader=pd.read_csv
)
FINDINGS: Artifact[pd.DataFrame] = Artifact(
    NAME, "findings.csv", "LLaVA-Mini's findings beside this run's numbers", reader=read_findings
)
FIG_TOKEN_CATEGORIES = Artifact(NAME, "fig_token_categories.png", "figure: the role of every position of one prompt")
FIG_CATEGORY_ATTENTION = Artifact(NAME, "fig_category_attention.png", "figure: attention by category, layer by layer")
FIG_ENTROPY = Artifact(NAME, "fig_entropy.png", "figure: attention entropy within each category")
FIG_HEAD_VISION_SHARE = Artifact(NAME, "fig_head_vision_share.png", "figure: heads that look vs heads that read")
FIG_VISION_DROP = Artifact(NAME, "fig_vision_drop.png", "figure: accuracy with the vision tokens dropped per layer range")
FIG_FASTV = Artifact(NAME, "fig_fastv.png", "figure: FastV's accuracy against the KV bytes it keeps")

#: The tables :func:`write_outputs` writes, by its keyword.
_TABLES: dict[str, Artifact[pd.DataFrame]] = {
    "category_attention": CATEGORY_ATTENTION,
    "entropy": ENTROPY,
    "head_vision_share": HEAD_VISION_SHARE,
    "vision_drop": VISION_DROP,
    "fastv": FASTV,
}

STEP = StepSpec(
    NAME,
    "Where the model looks, layer by layer (LLaVA-Mini's analysis) beside the visual heads",
    inputs=(ocr_annotation.DOCUMENTS, patch_mapping.REGIONS, head_scoring.HEAD_SCORES),
    outputs=(
        *_TABLES.values(),
        FINDINGS,
        FIG_TOKEN_CATEGORIES,
        FIG_CATEGORY_ATTENTION,
        FIG_ENTROPY,
        FIG_HEAD_VISION_SHARE,
        FIG_VISION_DROP,
        FIG_FASTV,
    ),
)

# ---------------------------------------------------------------------------------------- config


@dataclass
class Config:
    """Parameters of notebook 07 (validated); the defaults are the offline default run's
    (``configs/tiny.yaml``).

    ``n_samples``: step-01 documents analysed with the OCR prompt (the prompt step 03 scores on);
    ``max_new_tokens``: greedy response length for the analysis and the benchmark;
    ``chunk_size``: query rows per attention chunk; ``benchmark_documents``: held-out reader pages
    for the vision-drop ablation and FastV (:func:`sparsemm_utils.reader_tasks.heldout_documents`), drawn
    like the pages of the offline benchmark ``pages`` (:data:`sparsemm_utils.benchmarks.OFFLINE_PAGES`:
    the tiny reader's or the study model's);
    ``tasks``: reader tasks asked on them; ``layer_range_size``: layers per dropped range
    (LLaVA-Mini: 4, i.e. 1-4, 5-8, ... on 32 layers); ``readings``: ``"inside"`` (drop only in the
    range) and/or ``"from"`` (drop from the range to the last layer); ``fastv_k`` (layers that see
    every image token) and ``fastv_ratios`` (share R of image tokens dropped after them);
    ``dtype`` / ``device``: passed to ``load_model``; ``threads``: torch CPU threads (0: torch's
    default; 1 is fastest for tiny models on a shared CPU); ``allow_large``: lift the bounds on
    ``n_samples`` / ``benchmark_documents`` (:data:`~sparsemm_utils.parameters.MAX_DOCUMENTS`) and
    ``max_new_tokens`` (:data:`~sparsemm_utils.parameters.MAX_NEW_TOKENS`).
    """

    run_dir: str = "runs/tiny"
    model_id: str = "data/tiny_reader"
    seed: int = 0
    n_samples: int = 4
    max_new_tokens: int = 32
    chunk_size: int = 256
    benchmark_documents: int = 3
    pages: str = "reader_docqa"
    tasks: tuple[str, ...] = ("ocr", "line", "value")
    layer_range_size: int = 1
    readings: tuple[str, ...] = ("inside", "from")
    fastv_k: int = 2
    fastv_ratios: tuple[float, ...] = (0.0, 0.5, 0.75)
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 1
    allow_large: bool = False

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
        large = check_allow_large(self.allow_large, error=LayerAnalysisError)
        for name, maximum in (("n_samples", MAX_DOCUMENTS), ("benchmark_documents", MAX_DOCUMENTS), ("max_new_tokens", MAX_NEW_TOKENS)):
            check_size(name, getattr(self, name), maximum, allow_large=large, error=LayerAnalysisError)
        check_choice("pages", self.pages, tuple(OFFLINE_PAGES), error=LayerAnalysisError)
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


# ---------------------------------------------------------------------------------------- outputs


def write_outputs(
    run_dir: str | Path,
    *,
    category_attention: pd.DataFrame,
    entropy: pd.DataFrame,
    head_vision_share: pd.DataFrame,
    vision_drop: pd.DataFrame,
    fastv: pd.DataFrame,
) -> dict[str, Path]:
    """Write the step's tables (``category_attention.csv``, ``entropy.csv``,
    ``head_vision_share.csv``, ``vision_drop.csv``, ``fastv.csv``, as the mechanism modules build
    them) and ``findings.csv`` (:func:`findings` over them) into ``<run_dir>/07_attention_by_layer/``.
    Returns the written paths by file name. The notebook saves the figures itself."""
    tables = {
        "category_attention": category_attention,
        "entropy": entropy,
        "head_vision_share": head_vision_share,
        "vision_drop": vision_drop,
        "fastv": fastv,
    }
    for key, table in tables.items():
        if not isinstance(table, pd.DataFrame):
            raise LayerAnalysisError(f"write_outputs: {key} must be a DataFrame ({_TABLES[key].description}), got {type(table).__name__}")
    found = findings(category_attention, entropy, vision_drop, head_vision_share)
    STEP.folder(run_dir, create=True)
    written = {}
    for key, table in tables.items():
        path = _TABLES[key].path(run_dir)
        table.to_csv(path, index=False)
        written[path.name] = path
    path = FINDINGS.path(run_dir)
    findings_frame(found).to_csv(path, index=False)
    written[path.name] = path
    return written


# ---------------------------------------------------------------------------------------- findings


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LayerAnalysisError(f"{what} lacks the columns {missing}; it needs {list(columns)} (the step's CSV columns)")


def _band(num_layers: int) -> tuple[list[int], list[int]]:
    """The early and late layers a finding compares: the first and last quarter (>= 1 layer each)."""
    width = max(1, num_layers // 4)
    return list(range(width)), list(range(num_layers - width, num_layers))


def _rows_at(table: pd.DataFrame, target: str, source: str, layers: Sequence[int]) -> pd.DataFrame:
    return table[(table["target"] == target) & (table["source"] == source) & (table["layer"].isin(list(layers)))]


def _mean_at(table: pd.DataFrame, value: str, target: str, source: str, layers: Sequence[int]) -> float:
    part = _rows_at(table, target, source, layers)
    return float(part[value].mean()) if len(part) else float("nan")


def _samples_at(table: pd.DataFrame, target: str, source: str, layers: Sequence[int]) -> int:
    """The pages behind a mean over ``layers``: the fewest samples any of those layers averaged."""
    part = _rows_at(table, target, source, layers)
    return int(part["n_samples"].min()) if len(part) else 0


def _layers_label(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def findings(
    category_attention: pd.DataFrame,
    entropy: pd.DataFrame,
    vision_drop: pd.DataFrame | None = None,
    head_share: pd.DataFrame | None = None,
) -> list[Finding]:
    """LLaVA-Mini's findings (docs/method.md §8) beside this run's numbers, one :class:`Finding`
    each: ``paper`` is what LLaVA-Mini reports on LLaVA-v1.5/NeXT, ``this_run`` the numbers as
    text, ``holds`` None when the run cannot tell (a value is undefined, the model reads nothing
    without any drop, step 03 found no reading head).

    "Early" and "late" are the first and last quarter of the layers (one layer each for a 4-layer
    model). Inputs: the step's tables (``category_attention.csv``, ``entropy.csv``,
    ``vision_drop.csv``, ``head_vision_share.csv``); ``n`` counts pages analysed (attention,
    entropy), questions per condition (the ablation) and heads (the join). The ablation and the
    join, the two findings that tie the layers to reading, are the headlines."""
    keys = ("layer", "target", "source", "n_samples")
    _require_columns(category_attention, (*keys, "attention"), "category_attention")
    _require_columns(entropy, (*keys, "entropy", "max_entropy"), "entropy")
    num_layers = int(category_attention["layer"].max()) + 1
    early, late = _band(num_layers)
    e_lab, l_lab = _layers_label(early), _layers_label(late)
    out = []
    rv_early = _mean_at(category_attention, "attention", "response", "vision", early)
    rv_late = _mean_at(category_attention, "attention", "response", "vision", late)
    iv_early = _mean_at(category_attention, "attention", "instruction", "vision", early)
    iv_late = _mean_at(category_attention, "attention", "instruction", "vision", late)
    out.append(
        Finding(
            step=NAME,
            claim="vision tokens draw more attention in early layers than in late ones",
            paper="Attn(-> vision) high in the first layers, falling sharply with depth",
            this_run=(
                f"response→vision {rv_early:.3f} ({e_lab}) vs {rv_late:.3f} ({l_lab}); "
                f"instruction→vision {iv_early:.3f} vs {iv_late:.3f}"
            ),
            n=_samples_at(category_attention, "response", "vision", early + late),
            holds=bool(rv_early > rv_late) if not np.isnan(rv_early + rv_late) else None,
        )
    )
    ri_late = _mean_at(category_attention, "attention", "response", "instruction", late)
    out.append(
        Finding(
            step=NAME,
            claim="late layers attend mostly to instruction tokens",
            paper="over 80% of the attention goes to instruction tokens in the later layers",
            this_run=f"response→instruction {ri_late:.3f} in {l_lab} (response rows see every category, so this is a share)",
            n=_samples_at(category_attention, "response", "instruction", late),
            holds=bool(ri_late > 0.8) if not np.isnan(ri_late) else None,
        )
    )
    ent = entropy.assign(norm=entropy["entropy"] / entropy["max_entropy"].where(entropy["max_entropy"] > 0))
    ne_early = _mean_at(ent, "norm", "response", "vision", early)
    ne_late = _mean_at(ent, "norm", "response", "vision", late)
    out.append(
        Finding(
            step=NAME,
            claim="early layers spread attention over the vision tokens (high entropy), late layers focus",
            paper="entropy of the attention on vision tokens much higher in early layers",
            this_run=f"response→vision entropy / uniform {ne_early:.3f} ({e_lab}) vs {ne_late:.3f} ({l_lab})",
            n=_samples_at(entropy, "response", "vision", early + late),
            holds=bool(ne_early > ne_late) if not np.isnan(ne_early + ne_late) else None,
        )
    )
    if vision_drop is not None and len(vision_drop):
        _require_columns(vision_drop, ("reading", "layer_range", "first_layer", "task", "char_accuracy", "n"), "vision_drop")
        overall = vision_drop[vision_drop["task"] == "all"]
        if not len(overall):
            overall = vision_drop
        base = overall[overall["reading"] == "none"]
        inside = overall[overall["reading"] == "inside"].sort_values("first_layer")
        if len(base) and len(inside) >= 2:
            b, first, last = float(base["char_accuracy"].iloc[0]), inside.iloc[0], inside.iloc[-1]
            out.append(
                Finding(
                    step=NAME,
                    claim="dropping vision tokens early destroys reading; dropping them late barely matters",
                    paper="LLaVA-v1.5 on GQA/MMBench: layers 1-4 dropped -> near zero; 29-32 dropped -> near full",
                    this_run=(
                        f"char accuracy {b:.3f} with no drop; {float(first['char_accuracy']):.3f} with layers "
                        f"{first['layer_range']} dropped; {float(last['char_accuracy']):.3f} with layers {last['layer_range']} dropped"
                    ),
                    n=int(base["n"].iloc[0]),
                    # a model that cannot read without any drop tells nothing about where it reads
                    holds=bool(float(first["char_accuracy"]) < float(last["char_accuracy"])) if b > 0 else None,
                    headline=True,
                )
            )
    if head_share is not None and len(head_share):
        _require_columns(head_share, ("layer", "head", "vision_share", "visual_score"), "head_vision_share")
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
        out.append(
            Finding(
                step=NAME,
                claim="the heads that look at the image most are the ones that read (SparseMM x LLaVA-Mini)",
                paper="not measured by either paper (this study's join of the two)",
                this_run=f"Spearman rho(vision share, visual score) = {rho:.3f} over {len(head_share)} heads{detail}",
                n=len(head_share),
                holds=bool(rho > 0) if not np.isnan(rho) else None,
                headline=True,
            )
        )
    return out
