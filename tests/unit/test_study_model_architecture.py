"""The study model's pieces that need no backbone: spec validation, LoRA, targets, schedule, losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from sparsemm_utils.runs import repo_root
from sparsemm_utils.study_model.architecture import LoRALinear, StudyModelError, StudyModelSpec, VisionSpec
from sparsemm_utils.study_model.assemble import CONFIG_FILE, PARTS_DIR
from sparsemm_utils.study_model.pages import PageBatchError, cell_targets
from sparsemm_utils.study_model.training import (
    StudyTrainConfig,
    StudyTrainingError,
    alignment_loss,
    learning_rate_factor,
)


def test_the_default_spec_is_one_glyph_per_token():
    spec = StudyModelSpec()
    assert spec.crop % spec.cell == 0 and spec.grid == 4
    assert all(h % spec.crop == 0 and w % spec.crop == 0 for h, w in spec.pages)
    assert StudyModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop": 100}, "multiple of cell"),
        ({"pages": ((224, 330),)}, "multiples of crop"),
        ({"pages": ()}, "at least one page"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"lora_targets": ("q_proj", "embed")}, "lora_targets"),
        ({"lora_alpha": 0}, "lora_alpha"),
    ],
)
def test_a_bad_spec_is_refused(kwargs, message):
    with pytest.raises(StudyModelError, match=message):
        StudyModelSpec(**kwargs)


def test_vision_width_must_split_into_heads():
    with pytest.raises(StudyModelError, match="multiple of heads"):
        VisionSpec(hidden=130, heads=4)


def test_a_fresh_adapter_changes_nothing_and_merging_is_exact():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_b.copy_(torch.randn(5, 2))
    # hand-worked: the update is (alpha / r) * B @ A
    assert torch.allclose(lora.delta(), 2.0 * lora.lora_b @ lora.lora_a)
    expected = x @ (base.weight + lora.delta()).T + base.bias
    assert torch.allclose(lora(x), expected, atol=1e-6)


def test_cell_targets_place_each_glyph_by_its_centre():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(text)]

    doc = {"char_coord": [{"char": "A", "coord": [[30, 2], [50, 26]]}, {"char": "7", "coord": [[0, 56], [27, 83]]}]}
    targets = cell_targets(doc, Tok(), rows=3, cols=2, cell=28)
    assert targets.tolist() == [[32, 65], [32, 32], [55, 32]]
    with pytest.raises(PageBatchError, match="outside the 2x3 grid"):
        cell_targets({"char_coord": [{"char": "B", "coord": [[60, 0], [80, 20]]}]}, Tok(), rows=3, cols=2, cell=28)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    assert learning_rate_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert learning_rate_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert learning_rate_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert learning_rate_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_alignment_loss_is_zero_only_at_the_target_embeddings():
    spec = StudyModelSpec(crop=56, pages=((56, 112),))  # base 2x2 = 4 tokens, grid 2 rows x 4 cols (+ newlines)
    embeddings = torch.eye(8) * 3.0
    space, candidates = 0, torch.tensor([0, 1, 2])
    targets = torch.tensor([[[1, 0, 2, 0], [0, 0, 0, 1]]])
    grid = embeddings[targets]  # (1, 2, 4, 8)
    rows = torch.cat([grid, torch.zeros(1, 2, 1, 8)], dim=2).reshape(1, 10, 8)
    features = torch.cat([torch.randn(1, 4, 8), rows], dim=1)
    loss, stats = alignment_loss(features, targets, embeddings, candidates, space, spec, empty_weight=0.25)
    assert stats["glyph_accuracy"] == 1.0 and stats["empty_accuracy"] == 1.0
    assert stats["glyph_rel_error"] == 0.0 and stats["empty_rel_error"] == 0.0
    # the remaining loss is the cross-entropy of perfectly aligned cells: log(1 + 2 exp(-9)) each
    assert float(loss) == pytest.approx(math.log1p(2 * math.exp(-9.0)), rel=1e-3)  # float32 softmax
    shifted = features.clone()
    shifted[:, 4] = embeddings[2]  # the first glyph cell now shows another character
    worse, stats = alignment_loss(shifted, targets, embeddings, candidates, space, spec, empty_weight=0.25)
    assert float(worse) > float(loss) and stats["glyph_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_weights": (1.0, 0.0)}, "task_weights"),
        ({"task_weights": (0.0, 0.0, 0.0)}, "task_weights"),
        ({"lora_lr": 0}, "lora_lr"),
        ({"task_batch": 0}, "task_batch"),
        ({"empty_weight": 1.5}, "empty_weight"),
    ],
)
def test_a_bad_training_config_is_refused(kwargs, message):
    with pytest.raises(StudyTrainingError, match=message):
        StudyTrainConfig(**kwargs)


def test_the_training_config_round_trips():
    cfg = StudyTrainConfig(task_steps=5, spec=StudyModelSpec(lora_rank=4))
    assert StudyTrainConfig.from_dict(cfg.to_dict()) == cfg


def test_the_defaults_are_the_shipped_recipe():
    """`python -m sparsemm_utils.study_model train` with no option retrains the shipped parts:
    the defaults are data/study_model/train_config.json."""
    shipped = json.loads((repo_root() / PARTS_DIR / CONFIG_FILE).read_text(encoding="utf-8"))
    assert StudyTrainConfig.from_dict(shipped) == StudyTrainConfig()
