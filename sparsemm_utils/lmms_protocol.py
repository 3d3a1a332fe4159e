"""Which lmms-eval's rules score step 05, end to end: raw model text in, reported numbers out (docs/method.md §6).

The per-question scorers (:mod:`sparsemm_utils.metrics`, :mod:`sparsemm_utils.general_metrics`,
:mod:`sparsemm_utils.cider`) reproduce lmms-eval's; this module is what lmms-eval's harness does
around them, for one of two versions of lmms-eval (:data:`PROTOCOLS`, chosen by the config key
``lmms_eval``):

- ``"0.3"`` (the default): lmms-eval v0.3.4, the version family SparseMM vendored, so the one the
  paper's numbers come from;
- ``"current"``: lmms-eval's main branch at the commit named in :data:`PROTOCOLS`, the rules of
  today's leaderboards: VQAv2's normalisation of mid-2025 and its short-answer post-prompt,
  OCRBench's case-sensitive handwritten-math rule and fullwidth folding of 2026.

End to end, under both:

1. the answer is cut at the task's stop strings (:meth:`BenchmarkSpec.postprocess`) and then
   STRIPPED (``lmms_eval/api/task.py``: ``results = [res.strip() for res in results]``):
   :func:`answer_text`;
2. each question is scored (:func:`score_answer`), with the protocol's metric options
   (:attr:`LmmsProtocol.metric_options`) and, for TextCaps, the CIDEr corpus of the benchmark's
   references (:func:`scoring_context`);
3. a run's numbers are the task YAML's aggregations (:func:`aggregates`): the mean of each
   per-question metric, and where lmms-eval reports something else, that as well, under its
   own name:

   - OCRBench ``ocrbench_final_score``: correct answers / 1000 whatever the number of questions
     (lmms-eval's reported ``ocrbench_accuracy``); ``ocrbench_accuracy`` stays the mean over the
     questions asked (correct / N); ``ocrbench_accuracy[<question_type>]``: the mean per category;
   - MMBench ``mmbench_circular``: lmms-eval's ``gpt_eval_score``, x100: the circular copies of a
     question (``index + k * 1e6``, options rotated) are one question, right only when every copy
     is (:func:`mmbench_circular_hits`);
   - ChartQA ``relaxed_human_split`` / ``relaxed_augmented_split`` beside the overall;
   - TextCaps ``textcaps_cider``: CIDEr-D of the run's captions against the run's references.

Each :class:`Aggregate` carries the unit values whose mean, times ``scale``, is the number, so
step 05 gives every number its bootstrap interval the same way.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from .benchmarks import SHORT_ANSWER_POST_PROMPT, BenchmarkError, BenchmarkSpec, EvalSample, get_benchmark, score_prediction
from .cider import CiderCorpus
from .general_metrics import MMBENCH_LETTERS, mmbench_infer_choice
from .metrics import OCRBENCH_CATEGORIES
from .validate import check_choice

__all__ = [
    "LmmsProtocolError",
    "LmmsProtocol",
    "PROTOCOLS",
    "DEFAULT_LMMS_EVAL",
    "get_protocol",
    "Aggregate",
    "answer_text",
    "scoring_context",
    "score_answer",
    "scored_answer",
    "aggregates",
    "mmbench_circular_hits",
    "MMBENCH_COPY_STRIDE",
    "MMBENCH_RANDOM_SEED",
    "OCRBENCH_TOTAL",
]


class LmmsProtocolError(BenchmarkError):
    """An unknown protocol, or records a protocol cannot aggregate."""


#: MMBench's circular copies: index ``i + k * 1_000_000`` is the k-th rotation of question i.
MMBENCH_COPY_STRIDE = 1_000_000
#: lmms-eval's ``MMBench_Evaluator.eval_result`` seeds Python's ``random`` with this before it
#: draws a letter for each answer neither its rules nor its GPT judge resolve.
MMBENCH_RANDOM_SEED = 2680
#: lmms-eval divides OCRBench's number of correct answers by this, whatever the subset size.
OCRBENCH_TOTAL = 1000


@dataclass(frozen=True)
class LmmsProtocol:
    """One version of lmms-eval's scoring rules (module docstring).

    Attributes:
        name: ``"0.3"`` or ``"current"`` (the config's ``lmms_eval`` value).
        lmms_eval_commit: the commit of EvolvingLMMs-Lab/lmms-eval whose task code the rules were
            read from and the differential suite's references computed with
            (``tests/differential/reference/``).
        lmms_eval_ref: that commit in words (a tag or a branch and date).
        metric_options: {metric: keyword arguments of its scorer} (e.g. VQAv2's normalisation).
        post_prompts: {benchmark: post-prompt} where the protocol's task YAML differs from the
            spec's (:data:`sparsemm_utils.benchmarks.BENCHMARKS` holds v0.3.4's).
    """

    name: str
    lmms_eval_commit: str
    lmms_eval_ref: str
    metric_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    post_prompts: Mapping[str, str] = field(default_factory=dict)

    def spec(self, benchmark: str | BenchmarkSpec) -> BenchmarkSpec:
        """The benchmark's spec with this protocol's prompt (the registry's spec when it agrees)."""
        spec = get_benchmark(benchmark)
        if spec.name in self.post_prompts and self.post_prompts[spec.name] != spec.post_prompt:
            return replace(spec, post_prompt=self.post_prompts[spec.name])
        return spec

    def as_dict(self) -> dict[str, Any]:
        """What a run records of the protocol (``sweep.json``)."""
        return {"lmms_eval": self.name, "lmms_eval_commit": self.lmms_eval_commit, "lmms_eval_ref": self.lmms_eval_ref}


def _protocol(name: str, commit: str, ref: str, vqav2: str, ocrbench: str, post_prompts: Mapping[str, str]) -> LmmsProtocol:
    """A protocol from its VQAv2 and OCRBench scorer variants (:mod:`sparsemm_utils.metrics`)."""
    options = {"vqav2_accuracy": {"protocol": vqav2}, "ocrbench_accuracy": {"protocol": ocrbench}}
    return LmmsProtocol(name, commit, ref, MappingProxyType(options), MappingProxyType(dict(post_prompts)))


PROTOCOLS: Mapping[str, LmmsProtocol] = MappingProxyType(
    {
        p.name: p
        for p in (
            _protocol("0.3", "a863517758764b2da7be0b5649d68fa744ab73e6", "tag v0.3.4", "vqav2", "lmms_eval", {}),
            _protocol(
                "current", "75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3", "main of 2026-08-06", "vqav2_2025", "lmms_eval_2026",
                {"vqav2": SHORT_ANSWER_POST_PROMPT},
            ),
        )
    }
)  # fmt: skip
#: The paper's protocol.
DEFAULT_LMMS_EVAL = "0.3"


def get_protocol(name: str | LmmsProtocol = DEFAULT_LMMS_EVAL) -> LmmsProtocol:
    """The protocol ``name`` ("0.3" or "current"); a protocol is returned as is."""
    if isinstance(name, LmmsProtocol):
        return name
    check_choice("lmms_eval", name, tuple(PROTOCOLS), error=LmmsProtocolError)
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# one answer


def answer_text(spec: BenchmarkSpec, raw: str) -> str:
    """The answer lmms-eval scores: the model's decoded text cut at the task's stop strings (the
    model wrapper's cut), then stripped (the harness's ``res.strip()``). ``"Yes\\n"`` -> ``"yes"``
    is NOT done here (case is the metric's business): ``"Yes\\n"`` -> ``"Yes"``."""
    if not isinstance(raw, str):
        raise LmmsProtocolError(f"a model answer must be a str, got {type(raw).__name__}")
    return spec.postprocess(raw).strip()


def scoring_context(spec: BenchmarkSpec, answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """What a benchmark's scorers need beyond one question, from the ground truths of all its
    questions (``answers``: one tuple per question): TextCaps' CIDEr corpus (the document
    frequencies of every reference of the run, :class:`~sparsemm_utils.cider.CiderCorpus`);
    nothing for the other benchmarks."""
    if "corpus" in spec.metric_fields:
        return {"corpus": CiderCorpus([list(a) for a in answers])}
    return {}


def score_answer(
    spec: BenchmarkSpec, answer: str, sample: EvalSample, protocol: LmmsProtocol | str, context: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Every per-question metric of ``spec`` for an answer already through :func:`answer_text`,
    with the protocol's options; ``context`` from :func:`scoring_context`."""
    protocol = get_protocol(protocol)
    return score_prediction(spec, answer, sample, options=protocol.metric_options, **(context or {}))


def scored_answer(
    spec: BenchmarkSpec, raw: str, sample: EvalSample, protocol: LmmsProtocol | str, context: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a prediction record holds of one answer: ``prediction`` (:func:`answer_text` of the
    model's ``raw`` text), ``scores`` (:func:`score_answer`) and, for MMBench, the question's
    ``options`` (:func:`aggregates` needs them for the circular grouping)."""
    prediction = answer_text(spec, raw)
    out: dict[str, Any] = {"prediction": prediction, "scores": score_answer(spec, prediction, sample, protocol, context)}
    if "options" in sample.extra:
        out["options"] = {k: v if v is None or isinstance(v, str) else str(v) for k, v in sample.extra["options"].items()}
    return out


# --------------------------------------------------------------------------------------------
# a run


@dataclass(frozen=True)
class Aggregate:
    """One reported number of a run: ``scale * mean(values)``.

    ``metric``: its name in ``results.csv``; ``values``: (units,) the per-unit scores it averages
    (questions; MMBench: circular groups); ``scale``: 1, 100 (MMBench), N / 1000 (OCRBench's
    final score)."""

    metric: str
    values: np.ndarray
    scale: float = 1.0

    @property
    def score(self) -> float:
        return float(self.scale * (float(np.sum(self.values)) / self.values.size))


def mmbench_circular_hits(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], np.ndarray]:
    """lmms-eval's MMBench circular evaluation (``mmbench_evals.py::eval_result``) without a GPT
    judge: (main indices in ascending order, (groups,) hits in {0, 1}).

    A group is the main question (index < 1e6) and every record whose index is congruent to it
    mod 1e6; copies whose main question is absent are not counted (as in lmms-eval). Per group,
    in index order: a copy whose answer resolves (:func:`~sparsemm_utils.general_metrics.mmbench_infer_choice`)
    to a wrong letter makes it 0 at once; then each unresolved copy gets the letter lmms-eval
    draws when its judge fails ("Failed to obtain answer via API" three times): ``"ABCDE"[randint(0, 4)]``
    from one ``random.Random(2680)`` for the whole run, stopping at the first wrong one.

    ``records``: dicts with ``sample_id`` (the index), ``prediction`` (stripped), ``answers``
    (the letter) and ``options`` ({letter: text or None})."""
    rows = []
    for r in records:
        try:
            index = int(r["sample_id"])
        except (KeyError, TypeError, ValueError):
            raise LmmsProtocolError(f"an MMBench record needs its integer index as sample_id, got {r.get('sample_id')!r}") from None
        if "options" not in r:
            raise LmmsProtocolError(f"MMBench record {index} lacks its options (step 05 records them)")
        rows.append((index, r))
    rows.sort(key=lambda x: x[0])
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for index, r in rows:
        groups.setdefault(index % MMBENCH_COPY_STRIDE, []).append(r)
    mains = [index for index, _ in rows if index < MMBENCH_COPY_STRIDE]
    rng = random.Random(MMBENCH_RANDOM_SEED)
    hits = []
    for main in mains:
        group = groups[main]
        truths = [str(list(r["answers"])[0]) for r in group]
        choices = [mmbench_infer_choice(str(r["prediction"]), r["options"]) for r in group]
        if any(c is not None and c != t for c, t in zip(choices, truths, strict=True)):
            hits.append(0)
            continue
        hit = 1
        for choice, truth in zip(choices, truths, strict=True):
            if choice is None and MMBENCH_LETTERS[rng.randint(0, len(MMBENCH_LETTERS) - 1)] != truth:
                hit = 0
                break
        hits.append(hit)
    return mains, np.asarray(hits, dtype=float)


def _values(records: Sequence[Mapping[str, Any]], metric: str) -> np.ndarray:
    try:
        return np.array([float(r["scores"][metric]) for r in records])
    except KeyError:
        raise LmmsProtocolError(f"a record lacks its {metric!r} score") from None


def aggregates(spec: BenchmarkSpec | str, records: Sequence[Mapping[str, Any]]) -> list[Aggregate]:
    """The numbers lmms-eval reports for one run of ``spec`` (module docstring), from its
    prediction records (``predictions.jsonl``'s: ``sample_id``, ``prediction`` (the stripped
    answer), ``answers``, ``scores``, ``extra``; MMBench's also ``options``), in question order.
    The first aggregates are the means of ``spec.metrics`` (TextCaps' CIDEr recomputed on the
    run's own corpus)."""
    spec = get_benchmark(spec)
    if not records:
        raise LmmsProtocolError(f"benchmark {spec.name!r}: no record to aggregate")
    out = []
    for metric in spec.metrics:
        if metric == "textcaps_cider":
            corpus = CiderCorpus([list(r["answers"]) for r in records])
            out.append(Aggregate(metric, np.array([corpus.score(str(r["prediction"]), list(r["answers"])) for r in records])))
        else:
            out.append(Aggregate(metric, _values(records, metric)))
    if spec.name == "ocrbench":
        correct = _values(records, "ocrbench_accuracy")
        out.append(Aggregate("ocrbench_final_score", correct, scale=correct.size / OCRBENCH_TOTAL))
        categories = [r["extra"]["category"] for r in records]
        for category in OCRBENCH_CATEGORIES:
            picked = np.array([c == category for c in categories])
            if picked.any():
                out.append(Aggregate(f"ocrbench_accuracy[{category}]", correct[picked]))
    elif spec.name == "chartqa":
        relaxed = _values(records, "relaxed_accuracy")
        kinds = np.array([r["extra"]["type"] == "human_test" for r in records])
        for metric, picked in (("relaxed_human_split", kinds), ("relaxed_augmented_split", ~kinds)):
            if picked.any():
                out.append(Aggregate(metric, relaxed[picked]))
    elif spec.name == "mmbench":
        _, hits = mmbench_circular_hits(records)
        if hits.size:
            out.append(Aggregate("mmbench_circular", hits, scale=100.0))
    return out
