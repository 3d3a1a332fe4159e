"""Compute the differential suite's expected values by running lmms-eval's OWN task code.

Not a test and not run by the tests: it was run once per protocol, and its output is committed
(``tests/differential/reference/<benchmark>.json``). To recompute, check out lmms-eval at the
commit a protocol names (``sparsemm_utils.lmms_protocol.PROTOCOLS``), install pycocoevalcap and
pycocotools where Python finds them (TextCaps; the tokenizer needs ``java``), and run from the
repository root::

    python tests/differential/make_reference.py --protocol 0.3 --lmms-eval <checkout> \\
        --commit <its commit> --source "<where the checkout came from>"

What runs is lmms-eval's code, loaded from the checkout: the task modules
``lmms_eval/tasks/<task>/utils.py`` (``doc_to_text``, ``process_results``, the aggregations,
MMBench's ``MMBench_Evaluator``), ``_task_utils/vqa_eval_metric.py``, and the functions ``anls``,
``levenshtein_distance``, ``exact_match_hf_evaluate`` and ``mean`` of ``lmms_eval/api/metrics.py``
(DocVQA and GQA are scored by the generic path). Around them this script does what lmms-eval's
harness does, each step written out here because the harness itself needs a model and the hub:

1. the model wrapper's stop-string cut (``qwen2_vl``'s ``for term in until: ans = ans.split(term)[0]``,
   with the task YAML's ``until``);
2. ``ConfigurableTask.process_results``' ``results = [res.strip() for res in results]``
   (``lmms_eval/api/task.py``);
3. the task's ``process_results`` (or, for DocVQA and GQA, the metric called as the generic path
   calls it) on one document;
4. the task YAML's aggregation over the documents of a run.

Only the network is replaced: MMBench's GPT judge answers "Failed to obtain answer via API" at
once (what it returns after its retries when no API is reachable) and TextCaps' unused METEOR
scorer is a stub (it would start a Java process; only CIDEr is read). Submission files go to a
temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import logging
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import BENCHMARKS, make_cases, make_runs  # noqa: E402

from sparsemm_utils.lmms_protocol import PROTOCOLS  # noqa: E402

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
#: benchmark -> (task folder, task YAML, utils module)
TASKS = {
    "docvqa": ("docvqa", "docvqa_val.yaml", "utils"),
    "textvqa": ("textvqa", "textvqa_val.yaml", "utils"),
    "ocrbench": ("ocrbench", "ocrbench.yaml", "utils"),
    "chartqa": ("chartqa", "chartqa.yaml", "utils"),
    "mmbench": ("mmbench", "mmbench_en_dev.yaml", "en_utils"),
    "gqa": ("gqa", "gqa.yaml", "utils"),
    "vqav2": ("vqav2", "vqav2_val.yaml", "utils"),
    "textcaps": ("textcaps", "textcaps_val.yaml", "utils"),
}


# --------------------------------------------------------------------------------------------
# loading lmms-eval's code from a checkout, without the rest of the harness


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def task_config(task_dir: Path, name: str) -> dict[str, Any]:
    """A task YAML with its ``include`` resolved (the task's keys win)."""
    config = yaml.load((task_dir / name).read_text(encoding="utf-8"), Loader=_Loader) or {}
    if "include" in config:
        base = task_config(task_dir, config.pop("include"))
        base.update(config)
        config = base
    return config


def _stub_modules(tmp: Path) -> None:
    """``loguru`` (a logging shim) and lmms-eval's submission-file helper, the only harness pieces
    the task modules import."""
    loguru = types.ModuleType("loguru")
    loguru.logger = logging.getLogger("lmms_eval_reference")  # type: ignore[attr-defined]
    sys.modules.setdefault("loguru", loguru)

    def generate_submission_file(file_name: str, args: Any = None, subpath: str = "submissions") -> str:
        path = tmp / subpath / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    file_utils = types.ModuleType("lmms_eval.tasks._task_utils.file_utils")
    file_utils.generate_submission_file = generate_submission_file  # type: ignore[attr-defined]
    sys.modules["lmms_eval.tasks._task_utils.file_utils"] = file_utils


def load_lmms_eval(root: Path, tmp: Path) -> None:
    """Make ``lmms_eval.tasks.<task>`` importable from the checkout ``root`` without importing
    ``lmms_eval/__init__.py`` (which pulls the whole harness): bare package objects whose
    ``__path__`` points into the checkout."""
    _stub_modules(tmp)
    for name, path in (
        ("lmms_eval", root / "lmms_eval"),
        ("lmms_eval.tasks", root / "lmms_eval" / "tasks"),
        ("lmms_eval.tasks._task_utils", root / "lmms_eval" / "tasks" / "_task_utils"),
    ):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]  # type: ignore[attr-defined]
        sys.modules[name] = module


def api_metrics(root: Path) -> dict[str, Any]:
    """``anls``, ``levenshtein_distance``, ``exact_match_hf_evaluate`` and ``mean`` from the
    checkout's ``lmms_eval/api/metrics.py``, their source executed as written (decorators, which
    only register them, dropped)."""
    import math
    import re
    import string

    import numpy as np

    source = (root / "lmms_eval" / "api" / "metrics.py").read_text(encoding="utf-8")
    namespace: dict[str, Any] = {"np": np, "re": re, "string": string, "math": math}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("anls", "levenshtein_distance", "exact_match_hf_evaluate", "mean"):
            node.decorator_list = []
            exec(compile(ast.Module([node], []), "lmms_eval/api/metrics.py", "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------------------------
# the harness steps


def _doc_to_text(fn: Any, doc: dict[str, Any], kwargs: dict[str, Any] | None) -> str:
    takes_kwargs = len(inspect.signature(fn).parameters) > 1
    return fn(doc, kwargs) if takes_kwargs and kwargs is not None else fn(doc)


def _answer(raw: str, until: list[str]) -> str:
    """Steps 1 and 2: the wrapper's stop-string cut, then the harness's strip."""
    for term in until:
        if len(term) > 0:
            raw = raw.split(term)[0]
    return raw.strip()


def reference(benchmark: str, root: Path, tmp: Path, cases: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    folder, yaml_name, utils_name = TASKS[benchmark]
    task_dir = root / "lmms_eval" / "tasks" / folder
    config = task_config(task_dir, yaml_name)
    kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    until = list((config.get("generation_kwargs") or {}).get("until") or [])
    utils = importlib.import_module(f"lmms_eval.tasks.{folder}.{utils_name}")
    metrics = api_metrics(root)
    doc_to_text = getattr(utils, config["doc_to_text"].split(".")[-1])
    per_case: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for case in cases:
        doc, answer = case["doc"], _answer(case["raw"], until)
        entry: dict[str, Any] = {"prompt": _doc_to_text(doc_to_text, doc, kwargs), "answer": answer}
        if benchmark == "docvqa":  # generic path: multiple targets, metric "anls" gets them all
            entry["anls"] = float(metrics["anls"](references=list(doc["answers"]), predictions=[answer])["anls"])
        elif benchmark == "gqa":  # generic path, one target, exact_match with the YAML's options
            options = {k: v for k, v in config["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
            entry["exact_match"] = float(metrics["exact_match_hf_evaluate"](references=[doc["answer"]], predictions=[answer], **options)["exact_match"])
        elif benchmark in ("textvqa", "vqav2"):
            fresh = json.loads(json.dumps(doc))  # process_results rewrites the answers in place
            entry["exact_match"] = float(utils.__dict__[f"{benchmark}_process_results"](fresh, [answer])["exact_match"])
        elif benchmark == "ocrbench":
            entry["score"] = int(utils.ocrbench_process_results(doc, [answer])["ocrbench_accuracy"]["score"])
        elif benchmark == "chartqa":
            entry.update({k: float(v) for k, v in utils.chartqa_process_results(doc, [answer]).items()})
        elif benchmark == "mmbench":
            item = utils.mmbench_process_results(doc, [answer])["gpt_eval_score"]
            results[case["id"]] = item
            choice = utils.mmbench_evaluator.can_infer(answer, utils.mmbench_evaluator.build_choices(_series(item)))
            entry["choice"] = choice or None
        elif benchmark == "textcaps":
            results[case["id"]] = utils.textcaps_process_result(doc, [answer])["textcaps_CIDEr"]
        per_case[case["id"]] = entry
    if benchmark == "textcaps":
        for case_id, entry in _textcaps_per_case(utils, cases, results).items():
            per_case[case_id].update(entry)
    return {"per_case": per_case, "runs": {run["name"]: _aggregate(benchmark, utils, metrics, run, per_case, results, cases) for run in runs}}


def _series(item: dict[str, Any]) -> Any:
    import pandas as pd

    return pd.Series(item)


def _aggregate(benchmark, utils, metrics, run, per_case, results, cases) -> dict[str, Any]:
    ids = run["cases"]
    mean = metrics["mean"]
    if benchmark in ("docvqa", "textvqa", "gqa", "vqav2"):
        key = "anls" if benchmark == "docvqa" else "exact_match"
        return {key: float(mean([per_case[i][key] for i in ids]))}
    if benchmark == "chartqa":
        out = {}
        for key in ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"):
            values = [per_case[i][key] for i in ids if key in per_case[i]]
            if values:
                out[key] = float(mean(values))
        return out
    if benchmark == "ocrbench":
        for category in utils.OCRBench_score:  # the module keeps its counts in a global: start from zero
            utils.OCRBench_score[category] = 0
        docs = {c["id"]: c["doc"] for c in cases}
        items = [{"question_type": docs[i]["question_type"], "score": per_case[i]["score"]} for i in ids]
        with contextlib.redirect_stdout(io.StringIO()):
            score = utils.ocrbench_aggregate_accuracy(items, None)
        return {"ocrbench_accuracy": float(score), "counts": dict(utils.OCRBench_score)}
    if benchmark == "mmbench":
        utils.mmbench_evaluator.get_chat_response = lambda *a, **k: "Failed to obtain answer via API"
        with contextlib.redirect_stdout(io.StringIO()):
            score = utils.mmbench_aggregate_dev_results_eval([results[i] for i in ids], None)
        return {"gpt_eval_score": float(score)}
    if benchmark == "textcaps":
        with contextlib.redirect_stdout(io.StringIO()):
            score = utils.textcaps_cider([results[i] for i in ids], None)
        return {"textcaps_CIDEr": float(score)}
    raise KeyError(benchmark)


def _textcaps_per_case(utils, cases, results) -> dict[str, Any]:
    """Each caption and reference as PTBTokenizer leaves it, and each image's CIDEr in the run of
    all cases (pycocoevalcap's ``Cider.compute_score``, the per-image array it returns)."""
    captions = {c["id"]: [{"caption": results[c["id"]]["pred"]}] for c in cases}
    refs = {c["id"]: [{"caption": a} for a in results[c["id"]]["answer"]] for c in cases}
    tokenizer = utils.PTBTokenizer()
    with contextlib.redirect_stderr(io.StringIO()):
        tok_captions, tok_refs = tokenizer.tokenize(captions), tokenizer.tokenize(refs)
    _, scores = utils.Cider().compute_score(tok_refs, tok_captions)
    ids = list(tok_refs)
    return {
        i: {"tokens": tok_captions[i][0], "reference_tokens": tok_refs[i], "cider_in_all": float(s)}
        for i, s in zip(ids, scores, strict=True)
    }


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", required=True, choices=["0.3", "current"])
    parser.add_argument("--lmms-eval", required=True, type=Path, help="a checkout: the folder that holds lmms_eval/")
    parser.add_argument("--commit", required=True, help="the commit of that checkout")
    parser.add_argument("--source", required=True, help="where the checkout came from (repository, folder, version)")
    parser.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR, help="folder of the reference files (default: the committed ones)")
    args = parser.parse_args(argv)
    expected_commit = PROTOCOLS[args.protocol].lmms_eval_commit
    if args.commit != expected_commit:
        parser.error(
            f"protocol {args.protocol!r} names lmms-eval commit {expected_commit} (sparsemm_utils.lmms_protocol.PROTOCOLS); "
            f"got --commit {args.commit}: check that commit out, or update PROTOCOLS (and docs/deviations.md) first"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        load_lmms_eval(args.lmms_eval.resolve(), Path(tmp))
        if "textcaps" in args.benchmarks:
            import pycocoevalcap.eval as coco_eval

            coco_eval.Meteor = lambda *a, **k: None  # never used for CIDEr; it would start a Java process
        for benchmark in args.benchmarks:
            path = args.out / f"{benchmark}.json"
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if "cases" not in data:
                data = {"benchmark": benchmark, "cases": make_cases(benchmark)}
                data["runs"] = make_runs(data["cases"])
            expected = reference(benchmark, args.lmms_eval.resolve(), Path(tmp), data["cases"], data["runs"])
            data.setdefault("expected", {})[args.protocol] = {"lmms_eval_commit": args.commit, "source": args.source, **expected}
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
            print(f"{benchmark}: {len(data['cases'])} cases, {len(data['runs'])} runs -> {path}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
