"""An lmms-eval model adapter: any lmms-eval task, any compression method and budget (docs/method.md §5-§6).

With the optional extra (``pip install .[lmms-eval]``, which installs lmms-eval itself and
registers this adapter through the ``lmms_eval.models`` entry point), lmms-eval's own command
line runs a model with the project's KV-cache compression::

    lmms-eval --model sparsemm --tasks docvqa_val,ocrbench \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,method=sparsemm,budget=256,window=32,head_scores=runs/qwen2-vl-7b/03_head_scoring/head_scores.json

``model_args`` (:class:`AdapterSettings`): ``pretrained`` (a model :func:`~sparsemm_utils.models.load_model`
loads), ``method`` (a step-05 method name, :data:`~sparsemm_utils.evaluation.EVAL_METHODS`),
``budget`` (tokens per KV head, window included; none for the budget-free methods), ``window``,
``ratio``, ``mask_fraction``, ``fastv_k``, ``seed``, ``selection_dtype`` ("float32" or "model",
as step 05's), ``head_scores`` (step 03's file, for the methods that need it), ``dtype``, ``device``.

What the adapter does per request is what lmms-eval's ``qwen2_vl`` wrapper does around the
model, with the project's generator inside (:meth:`~sparsemm_utils.evaluation.ModelGenerator.answer`:
the family's chat template, the image, greedy decoding, the method's press): the first image of
``doc_to_visual``, the task's ``max_new_tokens`` (else the wrapper default of the model family,
:data:`~sparsemm_utils.benchmarks.WRAPPER_MAX_NEW_TOKENS`), the answer cut at the first stop string
of ``until``. lmms-eval then strips and scores it as it scores any model. Only
``generate_until`` tasks are supported (the paper's benchmarks all are).

The request logic (:class:`SparseMMRequests`) does not import lmms-eval; the class lmms-eval
loads, :data:`SparseMMLmms`, is that logic on lmms-eval's base class ``lmms_eval.api.model.lmms``,
built when first asked for (so importing this module never needs lmms-eval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .attention_hooks import SELECTION_DTYPES
from .benchmarks import WRAPPER_MAX_NEW_TOKENS, EvalSample
from .evaluation import EvaluationError, ModelGenerator, get_method
from .head_scoring_files import load_head_scores
from .models import load_model
from .validate import check_choice, check_int

__all__ = ["MODEL_NAME", "AdapterSettings", "SparseMMRequests", "lmms_class", "manifests"]

#: The name lmms-eval's ``--model`` takes.
MODEL_NAME = "sparsemm"


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter's ``model_args`` (module docstring), checked; lmms-eval passes them as
    strings (``key=value`` pairs), so numbers are converted here."""

    pretrained: str
    method: str = "sparsemm"
    budget: int | None = 256
    window: int = 32
    ratio: float = 0.1
    mask_fraction: float = 0.1
    fastv_k: int = 2
    seed: int = 0
    selection_dtype: str = "float32"
    head_scores: str | None = None
    dtype: str = "bfloat16"
    device: str = "cuda"

    @classmethod
    def from_args(cls, **kwargs: Any) -> AdapterSettings:
        """From lmms-eval's ``model_args`` (strings or values); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise EvaluationError(f"unknown sparsemm model_args {unknown}; known: {sorted(known)}")
        if "pretrained" not in kwargs:
            raise EvaluationError("sparsemm needs model_args pretrained=<model id or folder>")
        out = dict(kwargs)
        method = get_method(str(out.pop("method", cls.method))).name
        budget = out.pop("budget", cls.budget if get_method(method).budgeted else None)
        if budget in ("", "none", "None"):
            budget = None
        for name in ("window", "fastv_k", "seed"):
            if name in out:
                out[name] = check_int(name, int(out[name]) if isinstance(out[name], str) else out[name], 0, error=EvaluationError)
        for name in ("ratio", "mask_fraction"):
            if name in out:
                out[name] = float(out[name])
        if "selection_dtype" in out:
            check_choice("selection_dtype", out["selection_dtype"], SELECTION_DTYPES, error=EvaluationError)
        if budget is not None:
            budget = check_int("budget", int(budget) if isinstance(budget, str) else budget, 1, error=EvaluationError)
        return cls(method=method, budget=budget, **out)

    def press_settings(self, head_scores: Any) -> dict[str, Any]:
        """What :class:`~sparsemm_utils.evaluation.ModelGenerator` takes (as step 05's Config gives it)."""
        return {
            "window": self.window, "ratio": self.ratio, "seed": self.seed, "fraction": self.mask_fraction,
            "head_scores": head_scores, "fastv_k": self.fastv_k, "selection_dtype": self.selection_dtype,
        }  # fmt: skip


def _first_image(visuals: Any) -> Any:
    """The first image of ``doc_to_visual``'s result (a list, possibly nested once, or one image)."""
    while isinstance(visuals, (list, tuple)):
        if not visuals:
            raise EvaluationError("the lmms-eval task gave no image for a request; the sparsemm adapter needs one")
        visuals = visuals[0]
    return visuals


def _stop_strings(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        return list(until)
    raise EvaluationError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")


class SparseMMRequests:
    """lmms-eval's model interface on the project's generator (module docstring), without
    lmms-eval's base class: :meth:`generate_until` answers ``Instance`` objects whose ``args`` are
    ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``, reading the documents from
    ``self.task_dict[task][split][doc_id]`` (which lmms-eval's evaluator fills).

    ``loaded``: an already loaded model (tests; else ``pretrained`` is loaded); ``head_scores``:
    an (L, H) array instead of the file."""

    task_dict: Mapping[str, Any]

    def __init__(self, pretrained: str, *, loaded: Any = None, head_scores: Any = None, **model_args: Any) -> None:
        super().__init__()  # lmms-eval's base sets rank, world size, cache hook and task_dict
        self.settings = AdapterSettings.from_args(pretrained=pretrained, **model_args)
        if loaded is None:
            loaded = load_model(self.settings.pretrained, dtype=self.settings.dtype, device=self.settings.device, seed=self.settings.seed)
        if head_scores is None and get_method(self.settings.method).needs_head_scores:
            if self.settings.head_scores is None:
                raise EvaluationError(f"method {self.settings.method!r} needs model_args head_scores=<step 03's head_scores.json>")
            head_scores = load_head_scores(self.settings.head_scores, loaded)
        self.loaded = loaded
        self.generator = ModelGenerator(loaded, self.settings.press_settings(head_scores))
        self.generator.press(self.settings.method, self.settings.budget)  # a bad method/budget pair fails here, not mid-run

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request, in order: the model's text cut at the first stop string."""
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            image = _first_image(doc_to_visual(self.task_dict[task][split][doc_id]))
            limit = gen_kwargs.get("max_new_tokens") or WRAPPER_MAX_NEW_TOKENS.get(self.loaded.model_type)
            if limit is None:
                raise EvaluationError(f"task {task!r} sets no max_new_tokens and model type {self.loaded.model_type!r} has no wrapper default")
            sample = EvalSample(f"{task}/{split}/{doc_id}", image.convert("RGB"), context, ())
            text = self.generator.answer(sample, self.settings.method, self.settings.budget, int(limit)).text
            for term in _stop_strings(gen_kwargs.get("until")):
                if term:
                    text = text.split(term)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the sparsemm adapter answers generate_until tasks only (as the paper's benchmarks are)")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the sparsemm adapter answers single-round generate_until tasks only")


def lmms_class(base: type | None = None) -> type:
    """:class:`SparseMMRequests` on lmms-eval's model base class (``base``: that class; None:
    ``lmms_eval.api.model.lmms``, which needs the ``lmms-eval`` extra)."""
    if base is None:
        try:
            from lmms_eval.api.model import lmms as base  # the optional extra
        except ImportError as exc:
            raise ImportError("the sparsemm lmms-eval adapter needs lmms-eval: pip install '.[lmms-eval]'") from exc
    return type("SparseMMLmms", (SparseMMRequests, base), {"__module__": __name__, "__doc__": SparseMMRequests.__doc__})


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: the model ``sparsemm`` (lmms-eval's ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # the optional extra

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.SparseMMLmms")]


def __getattr__(name: str) -> Callable[..., Any] | type:
    """``SparseMMLmms``, the class lmms-eval loads, built on first access."""
    if name == "SparseMMLmms":
        cls = lmms_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
