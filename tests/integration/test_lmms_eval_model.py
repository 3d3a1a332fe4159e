"""The lmms-eval model adapter (sparsemm_utils.lmms_eval_model) offline, WITHOUT lmms-eval: its
request logic on a minimal stand-in of lmms-eval's base class and Instance, answering requests
built from a hub-schema fixture with a tiny Qwen2-VL of the real class. Only the check on
lmms-eval's real base class needs lmms-eval (the optional extra) and skips without it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from sparsemm_utils.benchmark_fixtures import fixture_dir
from sparsemm_utils.benchmarks import BENCHMARKS, load_rows
from sparsemm_utils.evaluation import EvaluationError, ModelGenerator
from sparsemm_utils.lmms_eval_model import AdapterSettings, SparseMMRequests, lmms_class


class LmmsStandIn:
    """What the adapter uses of ``lmms_eval.api.model.lmms``: its __init__ sets the rank, the
    world size, the cache hook and ``task_dict`` (filled by lmms-eval's evaluator)."""

    def __init__(self) -> None:
        self._rank, self._world_size, self.cache_hook, self.task_dict = 0, 1, None, {}


@dataclass
class Instance:
    """What the adapter reads of lmms-eval's ``Instance``: ``args``."""

    args: tuple


def test_settings_from_model_args():
    s = AdapterSettings.from_args(pretrained="m", method="snapkv", budget="128", window="8", ratio="0.2")
    assert (s.method, s.budget, s.window, s.ratio) == ("snapkv", 128, 8, 0.2)
    assert AdapterSettings.from_args(pretrained="m", method="fullkv").budget is None
    with pytest.raises(EvaluationError, match=r"unknown sparsemm model_args \['budgett'\]"):
        AdapterSettings.from_args(pretrained="m", budgett="1")
    with pytest.raises(EvaluationError, match="needs model_args pretrained"):
        AdapterSettings.from_args(method="snapkv")
    with pytest.raises(EvaluationError, match="budget must be an int >= 1"):
        AdapterSettings.from_args(pretrained="m", budget="0")
    assert AdapterSettings.from_args(pretrained="m", selection_dtype="model").press_settings(None)["selection_dtype"] == "model"
    with pytest.raises(EvaluationError, match="selection_dtype must be one of"):
        AdapterSettings.from_args(pretrained="m", selection_dtype="bf16")


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed")
def test_without_lmms_eval_the_class_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install '\.\[lmms-eval\]'"):
        lmms_class()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="needs the optional extra: pip install '.[lmms-eval]'")
def test_the_class_lmms_eval_loads_is_an_lmms():  # pragma: no cover - only with the extra
    from lmms_eval.api.model import lmms

    from sparsemm_utils.lmms_eval_model import SparseMMLmms, manifests

    assert issubclass(SparseMMLmms, lmms) and manifests()[0].model_id == "sparsemm"


@pytest.mark.slow
def test_requests_on_a_fixture_with_a_tiny_model():
    from sparsemm_utils.models import load_model

    loaded = load_model("tiny-random/qwen2_vl", seed=0)
    scores = np.random.default_rng(0).random((loaded.num_layers, loaded.num_heads))
    adapter_cls = lmms_class(LmmsStandIn)
    assert issubclass(adapter_cls, SparseMMRequests) and issubclass(adapter_cls, LmmsStandIn)
    model = adapter_cls("tiny-random/qwen2_vl", loaded=loaded, head_scores=scores, method="sparsemm", budget="24", window="8")
    assert model._world_size == 1  # the base class's __init__ ran
    spec = BENCHMARKS["docvqa"]
    docs = load_rows(spec, fixture_dir("docvqa"))
    model.task_dict = {"docvqa_val": {"validation": docs}}

    def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
        return [doc["image"].convert("RGB")]  # lmms-eval's docvqa_doc_to_visual

    def request(i: int, until: Any) -> Instance:
        context = spec.question_text(docs[i])
        return Instance((context, {"max_new_tokens": 5, "until": until}, doc_to_visual, i, "docvqa_val", "validation"))

    answers = model.generate_until([request(0, ["ASSISTANT:"]), request(1, [])])
    # the same answers as step 05's generator gives at the same method, budget and limit
    gen = ModelGenerator(loaded, {"window": 8, "ratio": 0.1, "seed": 0, "fraction": 0.1, "head_scores": scores, "fastv_k": 2})
    for i, answer in enumerate(answers):
        sample = spec.sample(docs[i], str(i), docs[i]["image"].convert("RGB"))
        assert answer == gen.answer(sample, "sparsemm", 24, 5).text.split("ASSISTANT:")[0]
    # a stop string (here a bare string, as a task YAML may give it) cuts the answer as lmms-eval's
    # wrappers do: at its first occurrence
    assert len(answers[0]) >= 2
    stop = answers[0][1]
    assert model.generate_until([request(0, stop)]) == [answers[0].split(stop)[0]]
    assert len(answers[0].split(stop)[0]) < len(answers[0])
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        model.loglikelihood([])
    with pytest.raises(EvaluationError, match="needs model_args head_scores"):
        adapter_cls("tiny-random/qwen2_vl", loaded=loaded, method="sparsemm")
    with pytest.raises(EvaluationError, match="takes no budget"):
        adapter_cls("tiny-random/qwen2_vl", loaded=loaded, method="fullkv", budget="16")
