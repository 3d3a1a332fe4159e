"""Step 05's benchmarks: where each one lives, how lmms-eval prompts it, how it is scored (docs/method.md §6).

A :class:`BenchmarkSpec` records, for one lmms-eval task, the hub dataset it reads (id, config,
split, columns in the hub's order), lmms-eval's prompt (``doc_to_text``: pre-prompt + question +
post-prompt, with the task's quirks), the generation limit and stop strings, and the metric(s).
:data:`BENCHMARKS` holds the paper's OCR benchmarks (DocVQA, TextVQA, OCRBench, ChartQA, TextCaps), the
general ones (MMBench, GQA, VQAv2) and the offline reading benchmark of the default run
(``reader_docqa``: step 01's generator on a held-out seed, see :func:`make_reader_benchmark`).
The values were read from lmms-eval's task YAMLs and ``utils.py`` (EvolvingLMMs-Lab/lmms-eval,
``lmms_eval/tasks/<task>/``) and the hub dataset cards; each spec's docstring line says which.

Loading (:func:`load_benchmark`) never contacts the hub. ``source`` may be

- ``None``: the hub id, looked up (1) in the HF hub cache, as ``hf download`` leaves it, then
  (2) in the ``datasets`` cache, as an earlier ``datasets.load_dataset`` leaves it; if neither
  holds it, :class:`BenchmarkUnavailableError` says what to download and how;
- a folder with the hub's layout (``README.md`` + the parquet shards, e.g. ``hf download ...
  --local-dir``; the fixtures in ``data/fixtures/<benchmark>/`` have that layout), a
  ``save_to_disk`` folder, or a parquet file;
- a ``datasets.Dataset`` already in memory (the offline benchmark).

Rows become :class:`EvalSample` (``sample_id``, ``image``, ``question`` = the text the model is
given, ``answers``, ``extra``). A row without an image, with an unreadable image, or without any
answer is skipped and counted (:class:`SkipReport`), never fatal. ``limit`` keeps the first
``limit`` ROWS of the split in dataset order (lmms-eval's ``--limit``); skips are counted among them.
Images are decoded when a sample is read, not at loading.

Generation limits: a task YAML that sets ``max_new_tokens`` wins; otherwise lmms-eval's model
wrapper default applies (SparseMM's lmms-eval fork: ``qwen2_vl`` 128, ``llava`` 1024):
:meth:`BenchmarkSpec.generation_limit`. Stop strings (``until``) cut the decoded answer at their
first occurrence (:meth:`BenchmarkSpec.postprocess`).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .general_metrics import ALL_METRIC_NAMES, get_scorer
from .reader_tasks import HELDOUT_SEED, STUDY_PAGES, ReaderDocSpec, make_task_dataset
from .validate import check_choice, check_int

__all__ = [
    "BenchmarkError",
    "UnknownBenchmarkError",
    "BenchmarkUnavailableError",
    "BenchmarkSchemaError",
    "BenchmarkFileError",
    "UnreadableImageError",
    "EvalSample",
    "SkipReport",
    "BenchmarkSpec",
    "BENCHMARKS",
    "OCR_BENCHMARKS",
    "GENERAL_BENCHMARKS",
    "WRAPPER_MAX_NEW_TOKENS",
    "SHORT_ANSWER_POST_PROMPT",
    "MMBENCH_POST_PROMPT",
    "CHARTQA_POST_PROMPT",
    "MMBENCH_OPTIONS_HEADER",
    "get_benchmark",
    "download_instructions",
    "check_parquet",
    "load_rows",
    "load_benchmark",
    "BenchmarkSamples",
    "score_prediction",
    "make_reader_benchmark",
    "OFFLINE_PAGES",
]

SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."
MMBENCH_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."  # after "{query}\n"
CHARTQA_POST_PROMPT = "\nAnswer the question with a single word."  # chartqa.yaml, default kwargs
MMBENCH_OPTIONS_HEADER = "There are several options:"  # mmbench.yaml metadata.sys_prompt

#: lmms-eval's model-wrapper default ``max_new_tokens`` when the task YAML sets none, by model
#: family: SparseMM's fork has ``models/qwen2_vl.py`` 128 and ``models/llava.py`` 1024. The fork has
#: no Qwen2.5-VL wrapper; 128 is taken by analogy (current lmms-eval's ``qwen2_5_vl`` uses 32768,
#: a limit a short-answer task never reaches before EOS, so the choice only matters for runaways).
#: The fork has no wrapper for the newer families either (docs/models.md); by the same analogy
#: Qwen3-VL takes the Qwen wrappers' 128 and LLaVA-OneVision / InternVL the LLaVA wrapper's 1024.
WRAPPER_MAX_NEW_TOKENS: Mapping[str, int] = MappingProxyType(
    {"qwen2_vl": 128, "qwen2_5_vl": 128, "llava_next": 1024, "qwen3_vl": 128, "llava_onevision": 1024, "internvl": 1024}
)

SkipReason = Literal["no image", "unreadable image", "no answers"]


# --------------------------------------------------------------------------------------------
# errors


class BenchmarkError(ValueError):
    """Base class of this module's errors."""


class UnknownBenchmarkError(BenchmarkError, LookupError):
    """A benchmark name not in :data:`BENCHMARKS`; the message lists the known ones."""


class BenchmarkUnavailableError(BenchmarkError, FileNotFoundError):
    """The benchmark's data is not on this machine; the message says what to download and how."""


class BenchmarkSchemaError(BenchmarkError):
    """The data lacks columns the benchmark reads (wrong dataset, config or split)."""


class BenchmarkFileError(BenchmarkError):
    """A local parquet file is truncated, not parquet, or holds no rows: the message names it."""


class UnreadableImageError(BenchmarkError):
    """A sample's image passed the loading check but cannot be decoded."""


# --------------------------------------------------------------------------------------------
# samples


@dataclass(frozen=True)
class EvalSample:
    """One question of a benchmark, ready for the model.

    ``sample_id``: the row's id column as a string (the row index where the dataset has none);
    ``image``: RGB PIL image; ``question``: the text given to the model with the image, exactly
    lmms-eval's ``doc_to_text`` (the dataset's own question is ``extra["raw_question"]``);
    ``answers``: the ground truths (non-empty); ``extra``: the fields the metric needs (e.g.
    OCRBench's ``category``, MMBench's ``options``) and the row's other useful fields."""

    sample_id: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class SkipReport:
    """Rows left out of a benchmark and why: ``counts`` {reason: n}, ``examples`` {reason: first
    few sample ids}; ``n_rows`` rows were read, ``n_samples`` kept."""

    benchmark: str
    n_rows: int = 0
    n_samples: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    max_examples: int = 5

    def add(self, reason: str, sample_id: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(sample_id)

    @property
    def n_skipped(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "n_rows": self.n_rows,
            "n_samples": self.n_samples,
            "skipped": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def __str__(self) -> str:
        if not self.counts:
            return f"{self.benchmark}: {self.n_samples} samples from {self.n_rows} rows, none skipped"
        parts = ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in sorted(self.counts.items()))
        return f"{self.benchmark}: {self.n_samples} samples from {self.n_rows} rows; skipped {parts}"


# --------------------------------------------------------------------------------------------
# lmms-eval's doc_to_text / doc_to_target, one function per quirk


def _is_nan_like(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text_plain(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """``f"{pre_prompt}{question}{post_prompt}"`` (DocVQA, ChartQA, GQA, VQAv2)."""
    return f"{spec.pre_prompt}{row[spec.question_column]}{spec.post_prompt}"


def _text_capitalize(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """TextVQA: ``question.capitalize()`` (Python's: first letter up, ALL others lowered; "What
    does 'SALE' say?" becomes "What does 'sale' say?"), lmms-eval's quirk kept."""
    return f"{spec.pre_prompt}{str(row[spec.question_column]).capitalize()}{spec.post_prompt}"


def _text_strip(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """OCRBench: ``question.strip()``, no pre- or post-prompt."""
    return str(row[spec.question_column]).strip()


def _text_prompt(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """TextCaps: the task's fixed prompt (``lmms_eval_specific_kwargs["prompt"]``), whatever the row."""
    return f"{spec.pre_prompt}{spec.post_prompt}"


def _text_verbatim(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """The offline benchmark: the reader's own prompt, as it was trained on."""
    return str(row[spec.question_column])


def _mmbench_options(row: Mapping[str, Any]) -> dict[str, Any]:
    """The option columns present in the row (A-D in the hub data; E if a row had it)."""
    return {k: row[k] for k in "ABCDE" if k in row}


def _text_mmbench(row: Mapping[str, Any], spec: BenchmarkSpec) -> str:
    """MMBench (``en_utils.mmbench_doc_to_text`` + ``create_options_prompt``): the options that
    are present and not "nan" as ``"X. text"`` lines under "There are several options:"; then
    ``f"{hint} {question} {options}"`` when the hint is present and not "nan", else
    ``f"{question} {options}"``; then ``"\\n" + post_prompt`` (the YAML's post-prompt itself starts with
    "\\n", so a blank line precedes it)."""
    options = {k: v for k, v in sorted(_mmbench_options(row).items()) if v and not _is_nan_like(v) and v != "nan"}
    options_prompt = MMBENCH_OPTIONS_HEADER + "\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    options_prompt = options_prompt.rstrip("\n")
    hint = row.get("hint")
    question = row[spec.question_column]
    if not _is_nan_like(hint) and hint != "nan":
        query = f"{hint} {question} {options_prompt}"
    else:
        query = f"{question} {options_prompt}"
    return f"{query}\n{spec.post_prompt}"


def _answers_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _answers_vqav2(value: Any) -> tuple[str, ...]:
    """VQAv2's ``answers`` is a list of ``{answer, answer_confidence, answer_id}``."""
    if value is None:
        return ()
    return tuple(str(a["answer"]) for a in value if a is not None and a.get("answer") is not None)


_DOC_TO_TEXT: Mapping[str, Callable[[Mapping[str, Any], BenchmarkSpec], str]] = MappingProxyType(
    {
        "plain": _text_plain,
        "capitalize": _text_capitalize,
        "strip": _text_strip,
        "verbatim": _text_verbatim,
        "mmbench": _text_mmbench,
        "prompt": _text_prompt,
    }
)
#: Metric fields that are not columns of a row: MMBench's options (built from the option columns)
#: and TextCaps' CIDEr corpus (built from every row's answers, passed to :func:`score_prediction`).
_CONTEXT_FIELDS: tuple[str, ...] = ("options", "corpus")
_DOC_TO_ANSWERS: Mapping[str, Callable[[Any], tuple[str, ...]]] = MappingProxyType(
    {"list": _answers_list, "vqav2": _answers_vqav2}
)


# --------------------------------------------------------------------------------------------
# the spec


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as lmms-eval runs it (module docstring).

    Attributes:
        name: registry key (``"docvqa"``).
        title: for figures (``"DocVQA"``).
        task: the lmms-eval task name (``"docvqa_val"``).
        kind: ``"ocr"`` (the paper's OCR-rich tasks), ``"general"`` or ``"offline"``.
        hub_id / config / split: where the data lives (``hub_id`` None: built locally).
        data_files: the hub paths of the split's files (for ``hf download --include``).
        columns: the hub dataset's columns, in its order (fixtures are written with exactly these).
        id_column: the column that names a sample (None: the row index).
        image_column / question_column / answer_column: the columns lmms-eval reads.
        doc_to_text: how the model text is built: ``"plain"``, ``"capitalize"``, ``"strip"``,
            ``"verbatim"``, ``"mmbench"`` or ``"prompt"`` (see the ``_text_*`` functions).
        doc_to_answers: ``"list"`` (a string or a list of strings) or ``"vqav2"`` (list of dicts).
        pre_prompt / post_prompt: lmms-eval's ``default`` prompt kwargs.
        max_new_tokens: the task YAML's limit, None when it sets none (wrapper default applies).
        task_limits: {question type: limit} for benchmarks that mix question types (the offline
            ones: ``EvalSample.extra["task"]``), as lmms-eval gives each task its own limit; a
            type not listed gets ``max_new_tokens``.
        until: stop strings of the task YAML.
        metrics: metric names (first = the headline metric), from :data:`ALL_METRIC_NAMES`.
        metric_fields: keys of ``EvalSample.extra`` passed to the metrics as keyword arguments
            (``"corpus"``: TextCaps' CIDEr corpus, given by the caller, see :func:`score_prediction`).
        extra_columns: {extra key: column} copied into ``EvalSample.extra``.
        images_config / image_key_column: GQA keeps its images in another config of the same
            repo, joined on ``image_key_column`` (instructions) = ``id`` (images).
        download_size: rough size of the files to download, for the error message.
    """

    name: str
    title: str
    task: str
    kind: Literal["ocr", "general", "offline"]
    hub_id: str | None
    config: str | None
    split: str
    data_files: tuple[str, ...]
    columns: tuple[str, ...]
    id_column: str | None
    image_column: str
    question_column: str
    answer_column: str
    doc_to_text: str = "plain"
    doc_to_answers: str = "list"
    pre_prompt: str = ""
    post_prompt: str = ""
    max_new_tokens: int | None = None
    task_limits: Mapping[str, int] = field(default_factory=dict)
    until: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("anls",)
    metric_fields: tuple[str, ...] = ()
    extra_columns: Mapping[str, str] = field(default_factory=dict)
    images_config: str | None = None
    image_key_column: str | None = None
    download_size: str = ""

    def __post_init__(self) -> None:
        def bad(what: str) -> BenchmarkError:
            return BenchmarkError(f"BenchmarkSpec {self.name!r}: {what}")

        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower():
            raise bad("name must be a non-empty lowercase string")
        own = f"BenchmarkSpec {self.name!r}:"
        check_choice(f"{own} kind", self.kind, ("ocr", "general", "offline"), error=BenchmarkError)
        check_choice(f"{own} doc_to_text", self.doc_to_text, sorted(_DOC_TO_TEXT), error=BenchmarkError)
        check_choice(f"{own} doc_to_answers", self.doc_to_answers, sorted(_DOC_TO_ANSWERS), error=BenchmarkError)
        if self.max_new_tokens is not None:
            check_int(f"{own} max_new_tokens (or None)", self.max_new_tokens, 1, error=BenchmarkError)
        if not self.metrics:
            raise bad("metrics must name at least one metric")
        unknown = [m for m in self.metrics if m not in ALL_METRIC_NAMES]
        if unknown:
            raise bad(f"unknown metric(s) {unknown}; known metrics: {list(ALL_METRIC_NAMES)}")
        used = {self.question_column, self.answer_column, *self.extra_columns.values()}
        if self.images_config is None:
            used.add(self.image_column)
        else:
            used.add(self.image_key_column)
        if self.id_column is not None:
            used.add(self.id_column)
        missing = sorted(c for c in used if c not in self.columns)
        if missing:
            raise bad(f"reads columns {missing} that are not among its columns {list(self.columns)}")
        absent = [f for f in self.metric_fields if f not in self.extra_columns and f not in _CONTEXT_FIELDS]
        if absent:
            raise bad(f"metric_fields {absent} are not filled (add them to extra_columns)")
        object.__setattr__(self, "extra_columns", MappingProxyType(dict(self.extra_columns)))
        for kind, limit in dict(self.task_limits).items():
            check_int(f"task_limits[{kind!r}]", limit, 1, error=BenchmarkError)
        if self.task_limits and "task" not in self.extra_columns:
            raise bad("task_limits needs the question type in extra_columns['task']")
        object.__setattr__(self, "task_limits", MappingProxyType(dict(self.task_limits)))

    @property
    def metric(self) -> str:
        """The headline metric (the first of :attr:`metrics`)."""
        return self.metrics[0]

    @property
    def read_columns(self) -> tuple[str, ...]:
        """The columns the loader needs, in the spec's column order."""
        used = {self.question_column, self.answer_column, *self.extra_columns.values()}
        if self.doc_to_text == "mmbench":
            used |= {c for c in ("hint", "A", "B", "C", "D", "E") if c in self.columns}
        used.add(self.image_key_column if self.images_config else self.image_column)
        if self.id_column is not None:
            used.add(self.id_column)
        return tuple(c for c in self.columns if c in used)

    def generation_limit(self, model_type: str | None = None) -> int:
        """``max_new_tokens`` for a model family: the task's own limit, else lmms-eval's wrapper
        default for ``model_type`` (:data:`WRAPPER_MAX_NEW_TOKENS`)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if model_type not in WRAPPER_MAX_NEW_TOKENS:
            raise BenchmarkError(
                f"benchmark {self.name!r} sets no max_new_tokens, so lmms-eval's model-wrapper default applies; "
                f"it is known for model types {sorted(WRAPPER_MAX_NEW_TOKENS)}, got {model_type!r}"
            )
        return WRAPPER_MAX_NEW_TOKENS[model_type]

    def sample_limit(self, sample: "EvalSample", model_type: str | None = None) -> int:
        """``max_new_tokens`` for one sample: :meth:`generation_limit`, lowered to
        ``task_limits[sample.extra["task"]]`` when its question type has one."""
        limit = self.generation_limit(model_type)
        kind = sample.extra.get("task")
        return min(limit, self.task_limits[kind]) if kind in self.task_limits else limit

    def postprocess(self, text: str) -> str:
        """The decoded answer cut at the first stop string of :attr:`until` (lmms-eval's
        ``ans.split(term)[0]`` for each term, in order)."""
        for term in self.until:
            if term:
                text = text.split(term)[0]
        return text

    def question_text(self, row: Mapping[str, Any]) -> str:
        """lmms-eval's ``doc_to_text`` for one row."""
        return _DOC_TO_TEXT[self.doc_to_text](row, self)

    def row_answers(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The row's ground truths (empty when it has none)."""
        return _DOC_TO_ANSWERS[self.doc_to_answers](row.get(self.answer_column))

    def sample(self, row: Mapping[str, Any], sample_id: str, image: Any) -> "EvalSample":
        """The :class:`EvalSample` of one row (``image`` already decoded): lmms-eval's prompt, the
        ground truths, and ``extra`` (the spec's extra columns, the row's own question as
        ``raw_question``, MMBench's ``options``)."""
        extra: dict[str, Any] = {key: row[col] for key, col in self.extra_columns.items()}
        extra["raw_question"] = row[self.question_column]
        if self.doc_to_text == "mmbench":
            extra["options"] = _mmbench_options(row)
        return EvalSample(sample_id, image, self.question_text(row), self.row_answers(row), extra)


def _spec(**kwargs: Any) -> BenchmarkSpec:
    return BenchmarkSpec(**kwargs)


_DOCVQA = _spec(
    # lmms_eval/tasks/docvqa/_default_template_docvqa_yaml + docvqa_val.yaml; hub card lmms-lab/DocVQA
    name="docvqa", title="DocVQA", task="docvqa_val", kind="ocr",
    hub_id="lmms-lab/DocVQA", config="DocVQA", split="validation", data_files=("DocVQA/validation-*",),
    columns=("questionId", "question", "question_types", "image", "docId", "ucsf_document_id",
             "ucsf_document_page_no", "answers", "data_split"),
    id_column="questionId", image_column="image", question_column="question", answer_column="answers",
    post_prompt=SHORT_ANSWER_POST_PROMPT, max_new_tokens=128, metrics=("anls",),
    extra_columns={"question_types": "question_types", "docId": "docId"}, download_size="about 2.5 GB",
)  # fmt: skip
_TEXTVQA = _spec(
    # lmms_eval/tasks/textvqa/_default_template_textvqa_yaml + textvqa_val.yaml + utils.py (capitalize)
    name="textvqa", title="TextVQA", task="textvqa_val", kind="ocr",
    hub_id="lmms-lab/textvqa", config=None, split="validation", data_files=("data/validation-*",),
    columns=("image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
             "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens"),
    id_column="question_id", image_column="image", question_column="question", answer_column="answers",
    doc_to_text="capitalize", post_prompt=SHORT_ANSWER_POST_PROMPT, max_new_tokens=None, until=("ASSISTANT:",),
    metrics=("vqa_accuracy",), extra_columns={"image_id": "image_id"}, download_size="about 1.4 GB",
)  # fmt: skip
_OCRBENCH = _spec(
    # lmms_eval/tasks/ocrbench/ocrbench.yaml + utils.py; hub card echo840/OCRBench (1000 questions)
    name="ocrbench", title="OCRBench", task="ocrbench", kind="ocr",
    hub_id="echo840/OCRBench", config=None, split="test", data_files=("data/test-*",),
    columns=("dataset", "question", "question_type", "answer", "image"),
    id_column=None, image_column="image", question_column="question", answer_column="answer",
    doc_to_text="strip", max_new_tokens=128, metrics=("ocrbench_accuracy",), metric_fields=("category",),
    extra_columns={"category": "question_type", "dataset": "dataset"}, download_size="about 70 MB",
)  # fmt: skip
_CHARTQA = _spec(
    # lmms_eval/tasks/chartqa/chartqa.yaml + utils.py; hub card lmms-lab/ChartQA
    name="chartqa", title="ChartQA", task="chartqa", kind="ocr",
    hub_id="lmms-lab/ChartQA", config=None, split="test", data_files=("data/test-*",),
    columns=("type", "question", "answer", "image"),
    id_column=None, image_column="image", question_column="question", answer_column="answer",
    post_prompt=CHARTQA_POST_PROMPT, max_new_tokens=16, metrics=("relaxed_accuracy",),
    extra_columns={"type": "type"}, download_size="about 75 MB",
)  # fmt: skip
_MMBENCH = _spec(
    # lmms_eval/tasks/mmbench/_default_template_mmbench_en_yaml + mmbench_en_dev.yaml + en_utils.py
    name="mmbench", title="MMBench (en, dev)", task="mmbench_en_dev", kind="general",
    hub_id="lmms-lab/MMBench", config="en", split="dev", data_files=("en/dev-*",),
    columns=("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image", "source",
             "L2-category", "comment", "split"),
    id_column="index", image_column="image", question_column="question", answer_column="answer",
    doc_to_text="mmbench", post_prompt=MMBENCH_POST_PROMPT, max_new_tokens=1024, until=("ASSISTANT:",),
    metrics=("mmbench_choice",), metric_fields=("options",),
    extra_columns={"category": "category", "l2_category": "L2-category"}, download_size="about 100 MB",
)  # fmt: skip
_GQA = _spec(
    # lmms_eval/tasks/gqa/gqa.yaml + utils.py (images joined from testdev_balanced_images on imageId)
    name="gqa", title="GQA (testdev balanced)", task="gqa", kind="general",
    hub_id="lmms-lab/GQA", config="testdev_balanced_instructions", split="testdev",
    data_files=("testdev_balanced_instructions/testdev-*", "testdev_balanced_images/testdev-*"),
    columns=("id", "imageId", "question", "answer", "fullAnswer", "isBalanced", "groups", "entailed",
             "equivalent", "types", "semanticStr"),
    id_column="id", image_column="image", question_column="question", answer_column="answer",
    post_prompt=SHORT_ANSWER_POST_PROMPT, max_new_tokens=16, metrics=("exact_match",),
    extra_columns={"fullAnswer": "fullAnswer", "imageId": "imageId"},
    images_config="testdev_balanced_images", image_key_column="imageId", download_size="about 70 MB",
)  # fmt: skip
_TEXTCAPS = _spec(
    # lmms_eval/tasks/textcaps/_default_template_textcaps_yaml + textcaps_val.yaml + utils.py (CIDEr of
    # pycocoevalcap); columns: the TextCaps 0.1 annotation fields grouped per image, as lmms-lab/TextCaps
    # holds them (caption_str a list): not checked against the card (no network here), see docs/deviations.md
    name="textcaps", title="TextCaps (val)", task="textcaps_val", kind="ocr",
    hub_id="lmms-lab/TextCaps", config=None, split="val", data_files=("data/val-*",),
    columns=("question_id", "question", "image", "image_id", "image_classes", "flickr_original_url",
             "flickr_300k_url", "image_width", "image_height", "set_name", "image_name", "image_path",
             "caption_id", "caption_str", "caption_tokens", "reference_strs", "reference_tokens"),
    id_column="image_id", image_column="image", question_column="question", answer_column="caption_str",
    doc_to_text="prompt", pre_prompt="Provide a one-sentence caption for the provided image.", max_new_tokens=64,
    metrics=("textcaps_cider",), metric_fields=("corpus",), download_size="about 920 MB",
)  # fmt: skip
_VQAV2 = _spec(
    # lmms_eval/tasks/vqav2/_default_template_vqav2_yaml + vqav2_val.yaml (post_prompt "") + utils.py
    name="vqav2", title="VQAv2 (val)", task="vqav2_val", kind="general",
    hub_id="lmms-lab/VQAv2", config=None, split="validation", data_files=("data/validation-*",),
    columns=("question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id",
             "question", "image"),
    id_column="question_id", image_column="image", question_column="question", answer_column="answers",
    doc_to_answers="vqav2", post_prompt="", max_new_tokens=16, metrics=("vqav2_accuracy",),
    extra_columns={"answer_type": "answer_type", "question_type": "question_type"},
    download_size="about 35 GB (214,354 questions; use limit= for a subset)",
)  # fmt: skip
def _offline(name: str, title: str, max_new_tokens: int, task_limits: Mapping[str, int] | None = None) -> BenchmarkSpec:
    # the offline benchmarks: sparsemm_utils.reader_tasks.make_task_dataset on a held-out seed
    return _spec(
        name=name, title=title, task=name, kind="offline",
        hub_id=None, config=None, split="test", data_files=(),
        columns=("question_id", "doc_id", "task", "prompt", "answer", "evidence", "detail", "image", "2_coord",
                 "char_coord"),
        id_column="question_id", image_column="image", question_column="prompt", answer_column="answer",
        doc_to_text="verbatim", max_new_tokens=max_new_tokens, task_limits=task_limits or {}, metrics=("anls", "exact_match"),
        extra_columns={"task": "task", "doc_id": "doc_id"},
    )  # fmt: skip


_READER = _offline("reader_docqa", "Reader DocQA (offline)", 64)
# a study page holds up to 6 lines of 14 cells: its OCR answer can reach ~90 tokens; a line or a
# value is at most one line (14 characters, never more than 14 tokens plus the end token)
_STUDY = _offline("study_docqa", "Study DocQA (offline)", 96, {"line": 32, "value": 32})
#: The offline benchmarks and their pages: the 1.3M tiny reader's (CI) and the study model's.
OFFLINE_PAGES: Mapping[str, ReaderDocSpec] = MappingProxyType({"reader_docqa": ReaderDocSpec(), "study_docqa": STUDY_PAGES})

#: The registry: benchmark name -> spec.
BENCHMARKS: Mapping[str, BenchmarkSpec] = MappingProxyType(
    {s.name: s for s in (_DOCVQA, _TEXTVQA, _OCRBENCH, _CHARTQA, _MMBENCH, _GQA, _VQAV2, _TEXTCAPS, _READER, _STUDY)}
)
OCR_BENCHMARKS: tuple[str, ...] = tuple(n for n, s in BENCHMARKS.items() if s.kind == "ocr")
GENERAL_BENCHMARKS: tuple[str, ...] = tuple(n for n, s in BENCHMARKS.items() if s.kind == "general")


def get_benchmark(name: str | BenchmarkSpec) -> BenchmarkSpec:
    """The spec registered under ``name`` (case-insensitive); a spec is returned as is.
    :class:`UnknownBenchmarkError` lists the known names."""
    if isinstance(name, BenchmarkSpec):
        return name
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in BENCHMARKS:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


# --------------------------------------------------------------------------------------------
# finding the data


def download_instructions(spec: BenchmarkSpec) -> str:
    """What to download for ``spec`` and where the loader then finds it."""
    if spec.hub_id is None:
        return (
            f"{spec.name} is built locally, not downloaded: sparsemm_utils.benchmarks.make_reader_benchmark(...) "
            f"returns it; pass the result as source=."
        )
    include = " ".join(f'"{p}"' for p in ("README.md", *spec.data_files))
    size = f" ({spec.download_size})" if spec.download_size else ""
    return (
        f"Download it on a machine with hub access{size}:\n"
        f"  hf download {spec.hub_id} --repo-type dataset --include {include}\n"
        f"It then sits in the Hugging Face cache and load_benchmark({spec.name!r}) finds it with no source. "
        f"Or add --local-dir data/benchmarks/{spec.name} and pass source='data/benchmarks/{spec.name}' "
        f"(in a config: steps.05_eval.benchmark_sources). A dataset prepared earlier by "
        f"datasets.load_dataset({spec.hub_id!r}{', ' + repr(spec.config) if spec.config else ''}, "
        f"split={spec.split!r}) is found too."
    )


@contextmanager
def _datasets_offline() -> Iterator[None]:
    """Make ``datasets`` take its offline path (cache only) inside the block, whatever HF_HUB_OFFLINE says."""
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _load_folder(folder: Path, config: str | None, split: str) -> Any:
    """One split of a local folder: a ``save_to_disk`` folder, or a hub-layout folder (README
    configs + data files) read by the packaged parquet builder."""
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise BenchmarkSchemaError(f"{folder} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    with _datasets_offline():
        return datasets.load_dataset(str(folder), name=config, split=split)


def _load_from_hub_cache(spec: BenchmarkSpec, config: str | None, cache_dir: str | Path | None) -> Any:
    """The split from the HF hub cache (``hf download``); raises FileNotFoundError when absent."""
    try:
        folder = Path(snapshot_download(spec.hub_id, repo_type="dataset", local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"not in the HF hub cache ({type(exc).__name__})") from exc
    try:
        return _load_folder(folder, config, spec.split)
    except Exception as exc:  # a partial snapshot (other configs only), unreadable files
        raise FileNotFoundError(f"the HF hub cache holds {folder} but not this split ({type(exc).__name__}: {exc})") from exc


def _load_from_datasets_cache(spec: BenchmarkSpec, config: str | None, cache_dir: str | Path | None) -> Any:
    try:
        with _datasets_offline():
            return datasets.load_dataset(spec.hub_id, name=config, split=spec.split, cache_dir=cache_dir)
    except Exception as exc:  # ConnectionError (not cached), ValueError (split), ...
        raise FileNotFoundError(f"not in the datasets cache ({type(exc).__name__})") from exc


def check_parquet(path: Path, spec: BenchmarkSpec, *, allow_empty: bool = False) -> int:
    """The number of rows of the parquet file ``path`` from its footer (the data is not read);
    :class:`BenchmarkFileError` naming the file when it is truncated, not parquet, or (unless
    ``allow_empty``: a shard of a folder, which may hold other splits) empty."""
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise BenchmarkFileError(
            f"{path} is not a readable parquet file ({exc}): it was cut off (an interrupted copy or download) or is "
            f"not parquet. Copy or download it again. " + download_instructions(spec)
        ) from None
    if rows == 0 and not allow_empty:
        raise BenchmarkFileError(
            f"{path} is a parquet file with 0 rows: benchmark {spec.name!r} would have no sample to evaluate. Pass "
            f"the benchmark's data (config {spec.config!r}, split {spec.split!r}). " + download_instructions(spec)
        )
    return rows


def load_rows(
    spec: BenchmarkSpec | str,
    source: Any = None,
    *,
    config: str | None = None,
    hub_cache_dir: str | Path | None = None,
    datasets_cache_dir: str | Path | None = None,
) -> Any:
    """The raw split of ``spec`` as a ``datasets.Dataset`` (config ``config``, default the spec's)
    from ``source`` (module docstring), without contacting the hub."""
    spec = get_benchmark(spec)
    config = spec.config if config is None else config
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if spec.split not in source:
            raise BenchmarkSchemaError(f"the DatasetDict has splits {list(source)}, not {spec.split!r}")
        return source[spec.split]
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise BenchmarkUnavailableError(f"no dataset at {path} for benchmark {spec.name!r}. " + download_instructions(spec))
        if path.is_file():
            if path.suffix != ".parquet":
                raise BenchmarkError(f"{path} is a file but not a .parquet file; pass a parquet file or a dataset folder")
            check_parquet(path, spec)
            with _datasets_offline():
                return datasets.load_dataset("parquet", data_files=str(path), split="train")
        for shard in sorted(path.rglob("*.parquet")):
            check_parquet(shard, spec, allow_empty=True)
        try:
            return _load_folder(path, config, spec.split)
        except BenchmarkError:
            raise
        except Exception as exc:
            raise BenchmarkSchemaError(
                f"cannot read config {config!r} split {spec.split!r} of {path} ({type(exc).__name__}: {exc}); "
                f"expected the layout of the hub dataset {spec.hub_id} (README.md + {', '.join(spec.data_files)})"
            ) from exc
    if spec.hub_id is None:
        raise BenchmarkUnavailableError(f"benchmark {spec.name!r} needs a source. " + download_instructions(spec))
    reasons = []
    for finder, cache in ((_load_from_hub_cache, hub_cache_dir), (_load_from_datasets_cache, datasets_cache_dir)):
        try:
            return finder(spec, config, cache)
        except FileNotFoundError as exc:
            reasons.append(str(exc))
    raise BenchmarkUnavailableError(
        f"benchmark {spec.name!r} reads the hub dataset {spec.hub_id} (config {config!r}, split {spec.split!r}), "
        f"which is not on this machine ({'; '.join(reasons)}); this project never contacts the hub. "
        + download_instructions(spec)
    )


# --------------------------------------------------------------------------------------------
# rows -> samples


def _image_payload(value: Any) -> bytes | str | Image.Image | None:
    """What an undecoded ``datasets.Image`` cell holds: bytes, a path, a PIL image, or None."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return value["bytes"]
        path = value.get("path")
        return path if path and Path(path).is_file() else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


def _image_readable(payload: bytes | str | Image.Image) -> bool:
    """A header check (no full decode): PIL recognises the format and its size."""
    if isinstance(payload, Image.Image):
        return True
    try:
        with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as im:
            im.verify()
        return True
    except Exception:
        return False


def _decode(payload: bytes | str | Image.Image, where: str) -> Image.Image:
    try:
        if isinstance(payload, Image.Image):
            image = payload
        else:
            image = Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
            image.load()
        return image.convert("RGB")
    except Exception as exc:
        raise UnreadableImageError(f"{where}: the image cannot be decoded ({type(exc).__name__}: {exc})") from exc


class BenchmarkSamples(Sequence[EvalSample]):
    """The samples of one benchmark split: a sequence of :class:`EvalSample` over a
    ``datasets.Dataset`` whose images are decoded on access. ``skips`` reports the rows left out.
    Built by :func:`load_benchmark`."""

    def __init__(self, spec: BenchmarkSpec, rows: Any, images: Any = None, *, limit: int | None = None):
        self.spec = spec
        missing = [c for c in spec.read_columns if c not in rows.column_names]
        if missing:
            raise BenchmarkSchemaError(
                f"benchmark {spec.name!r}: the data has columns {rows.column_names}, lacking {missing}; expected the "
                f"schema of {spec.hub_id or spec.name} (config {spec.config!r}, split {spec.split!r}): {list(spec.columns)}"
            )
        if limit is not None:
            check_int("limit (or None)", limit, 1, error=BenchmarkError)
        if limit is not None and limit < len(rows):
            rows = rows.select(range(limit))
        keep = [c for c in spec.read_columns if c in rows.column_names]
        rows = rows.select_columns(keep)
        if spec.images_config is None:
            rows = rows.cast_column(spec.image_column, datasets.Image(decode=False))
        self._rows = rows
        self._image_index: dict[str, int] = {}
        self._images = None
        if spec.images_config is not None:
            if images is None:
                raise BenchmarkError(f"benchmark {spec.name!r} needs its images config {spec.images_config!r}")
            if "id" not in images.column_names or "image" not in images.column_names:
                raise BenchmarkSchemaError(
                    f"the images of {spec.name!r} (config {spec.images_config!r}) must have columns id, image; got "
                    f"{images.column_names}"
                )
            self._images = images.select_columns(["id", "image"]).cast_column("image", datasets.Image(decode=False))
            self._image_index = {str(k): i for i, k in enumerate(self._images["id"])}
        self.skips = SkipReport(spec.name, n_rows=len(rows))
        self._keep: list[int] = []
        self._ids: list[str] = []
        for i, row in enumerate(rows):
            sample_id = self._sample_id(row, i)
            payload = self._payload(row)
            if payload is None:
                self.skips.add("no image", sample_id)
            elif not _image_readable(payload):
                self.skips.add("unreadable image", sample_id)
            elif not spec.row_answers(row):
                self.skips.add("no answers", sample_id)
            else:
                self._keep.append(i)
                self._ids.append(sample_id)
        self.skips.n_samples = len(self._keep)

    def _sample_id(self, row: Mapping[str, Any], index: int) -> str:
        return str(index) if self.spec.id_column is None else str(row[self.spec.id_column])

    def _payload(self, row: Mapping[str, Any]) -> Any:
        if self._images is None:
            return _image_payload(row[self.spec.image_column])
        key = row[self.spec.image_key_column]
        index = self._image_index.get(str(key)) if key is not None else None
        return None if index is None else _image_payload(self._images[index]["image"])

    @property
    def sample_ids(self) -> list[str]:
        """Ids of the kept samples, in dataset order."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> EvalSample:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("BenchmarkSamples takes an integer index")
        index = self._keep[i]
        row = self._rows[index]
        spec = self.spec
        sample_id = self._ids[i]
        image = _decode(self._payload(row), f"benchmark {spec.name!r} sample {sample_id}")
        return spec.sample(row, sample_id, image)

    def all_answers(self) -> list[tuple[str, ...]]:
        """The ground truths of every kept sample, in order, without decoding an image (what
        :func:`sparsemm_utils.lmms_protocol.scoring_context` needs)."""
        column = self._rows[self.spec.answer_column]
        return [self.spec.row_answers({self.spec.answer_column: column[i]}) for i in self._keep]

    def __iter__(self) -> Iterator[EvalSample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"BenchmarkSamples({self.spec.name!r}, {len(self)} samples, {self.skips.n_skipped} skipped)"


def load_benchmark(
    name: str | BenchmarkSpec,
    source: Any = None,
    *,
    limit: int | None = None,
    hub_cache_dir: str | Path | None = None,
    datasets_cache_dir: str | Path | None = None,
) -> BenchmarkSamples:
    """The samples of benchmark ``name`` from ``source`` (module docstring), the first ``limit``
    rows only when given. GQA's images come from the same source (its images config).

    Raises :class:`UnknownBenchmarkError`, :class:`BenchmarkUnavailableError` (with download
    instructions), :class:`BenchmarkSchemaError` (wrong columns)."""
    spec = get_benchmark(name)
    kwargs = {"hub_cache_dir": hub_cache_dir, "datasets_cache_dir": datasets_cache_dir}
    rows = load_rows(spec, source, **kwargs)
    images = None
    if spec.images_config is not None:
        images = load_rows(spec, source, config=spec.images_config, **kwargs)
    return BenchmarkSamples(spec, rows, images, limit=limit)


# --------------------------------------------------------------------------------------------
# scoring


def score_prediction(
    spec: BenchmarkSpec | str,
    prediction: str,
    sample: EvalSample,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **context: Any,
) -> dict[str, float]:
    """Every metric of ``spec`` for one prediction: ``{metric: score}``; a benchmark's score is
    the mean over its samples. ``spec.metric_fields`` come from ``context`` (what one question
    cannot supply, e.g. TextCaps' CIDEr ``corpus``) or else ``sample.extra``; ``options``
    {metric: keyword arguments} select a metric's variant (the lmms-eval protocol's,
    :mod:`sparsemm_utils.lmms_protocol`, which also strips the prediction first)."""
    spec = get_benchmark(spec)
    missing = [name for name in spec.metric_fields if name not in context and name not in sample.extra]
    if missing:
        raise BenchmarkError(f"benchmark {spec.name!r}: scoring needs {missing}; pass them (lmms_protocol.scoring_context)")
    fields = {name: context[name] if name in context else sample.extra[name] for name in spec.metric_fields}
    answers: Any = list(sample.answers)
    return {m: float(get_scorer(m)(prediction, answers, **fields, **dict((options or {}).get(m, {})))) for m in spec.metrics}


# --------------------------------------------------------------------------------------------
# the offline benchmark


def make_reader_benchmark(
    n_documents: int, seed: int | None = None, *, spec: Any = None, name: str = "reader_docqa", progress: bool = False
) -> Any:
    """An offline document-QA benchmark (``name``: ``reader_docqa`` on the tiny reader's pages,
    ``study_docqa`` on the study model's, :data:`OFFLINE_PAGES`): documents ``0 .. n_documents - 1``
    of the stream ``seed`` drawn by step 01's generator, each asked "read all", "read line k" and
    "value of KEY?" where it can host them (:func:`~sparsemm_utils.reader_tasks.make_task_dataset`).
    Every answer is text drawn on the page, so only reading the image answers it. ``seed``
    defaults to the held-out stream (:data:`sparsemm_utils.reader_tasks.HELDOUT_SEED`), which no
    training and no design choice sees. ``spec`` overrides the benchmark's pages. Returns a
    ``datasets.Dataset`` in the schema of ``name``; pass it as ``source``."""
    if name not in OFFLINE_PAGES:
        raise UnknownBenchmarkError(f"{name!r} is not an offline benchmark; offline benchmarks: {', '.join(OFFLINE_PAGES)}")
    if seed is None:
        seed = HELDOUT_SEED
    return make_task_dataset(seed, n_documents, spec=spec or OFFLINE_PAGES[name], progress=progress)
