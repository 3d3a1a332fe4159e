"""The project's end-to-end scoring against lmms-eval's own, under both protocols.

``reference/<benchmark>.json`` holds, per benchmark, a few hundred dataset rows with a raw model
answer each (hand-picked first, then random ones dressed the way model outputs go wrong: see
``cases.py``), the runs (sets of cases scored together) and, per protocol, what lmms-eval's task
code at the commit recorded there made of them: the prompt, the answer after the stop-string cut
and the strip, each question's score, and each run's aggregates. ``make_reference.py`` computed
them once; docs/deviations.md says how to regenerate them.

Here the same rows go through the project's code: ``BenchmarkSpec.sample`` (the prompt),
``lmms_protocol.scored_answer`` (what step 05's sweep records for an answer) and
``lmms_protocol.aggregates`` (what it reports for a run); the last test runs the sweep itself.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sparsemm_utils.cider import ptb_tokenize
from sparsemm_utils.evaluation import read_results, run_sweep
from sparsemm_utils.general_metrics import mmbench_infer_choice
from sparsemm_utils.lmms_protocol import PROTOCOLS, aggregates, get_protocol, scored_answer, scoring_context

REFERENCE = Path(__file__).resolve().parent / "reference"
BENCHMARKS = ("docvqa", "textvqa", "ocrbench", "chartqa", "mmbench", "gqa", "vqav2", "textcaps")
CASES = [(b, p) for b in BENCHMARKS for p in PROTOCOLS]
TOL = 1e-9

#: benchmark -> (lmms-eval's per-question key, the project's metric)
PER_QUESTION = {
    "docvqa": ("anls", "anls"),
    "textvqa": ("exact_match", "vqa_accuracy"),
    "gqa": ("exact_match", "exact_match"),
    "vqav2": ("exact_match", "vqav2_accuracy"),
    "ocrbench": ("score", "ocrbench_accuracy"),
    "chartqa": ("relaxed_overall", "relaxed_accuracy"),
    "textcaps": ("cider_in_all", "textcaps_cider"),
}
#: benchmark -> {lmms-eval's run aggregate: the project's aggregate}
RUN = {
    "docvqa": {"anls": "anls"},
    "textvqa": {"exact_match": "vqa_accuracy"},
    "gqa": {"exact_match": "exact_match"},
    "vqav2": {"exact_match": "vqav2_accuracy"},
    "ocrbench": {"ocrbench_accuracy": "ocrbench_final_score"},
    "chartqa": {"relaxed_overall": "relaxed_accuracy", "relaxed_human_split": "relaxed_human_split", "relaxed_augmented_split": "relaxed_augmented_split"},
    "mmbench": {"gpt_eval_score": "mmbench_circular"},
    "textcaps": {"textcaps_CIDEr": "textcaps_cider"},
}  # fmt: skip


@cache
def reference(benchmark: str) -> dict[str, Any]:
    return json.loads((REFERENCE / f"{benchmark}.json").read_text(encoding="utf-8"))


def sample_of(spec: Any, case: dict[str, Any]) -> Any:
    """The case's row as the loader sees it (columns the cases leave out, which neither lmms-eval
    nor the scoring reads, are None) made into an EvalSample, without an image."""
    row = {column: None for column in spec.columns} | case["doc"]
    sample_id = str(row[spec.id_column]) if spec.id_column else case["id"]
    return spec.sample(row, sample_id, image=None)


@cache
def scored(benchmark: str, protocol: str) -> dict[str, dict[str, Any]]:
    """{case id: the record the project's sweep keeps for the case's answer}."""
    ref = reference(benchmark)
    spec = get_protocol(protocol).spec(benchmark)
    samples = {case["id"]: sample_of(spec, case) for case in ref["cases"]}
    context = scoring_context(spec, [s.answers for s in samples.values()])
    out = {}
    for case in ref["cases"]:
        sample = samples[case["id"]]
        record = scored_answer(spec, case["raw"], sample, protocol, context)
        record.update(sample_id=sample.sample_id, answers=list(sample.answers), extra=dict(sample.extra), question=sample.question)
        out[case["id"]] = record
    return out


def test_the_references_name_the_protocols_commits():
    for benchmark in BENCHMARKS:
        ref = reference(benchmark)
        assert ref["benchmark"] == benchmark and len(ref["cases"]) >= 250
        assert set(ref["expected"]) == set(PROTOCOLS)
        for name, protocol in PROTOCOLS.items():
            assert ref["expected"][name]["lmms_eval_commit"] == protocol.lmms_eval_commit


@pytest.mark.parametrize("benchmark, protocol", CASES)
def test_prompts_answers_and_question_scores(benchmark, protocol):
    expected = reference(benchmark)["expected"][protocol]["per_case"]
    records = scored(benchmark, protocol)
    bad = []
    for case_id, want in expected.items():
        got = records[case_id]
        if "prompt" in want and got["question"] != want["prompt"]:
            bad.append((case_id, "prompt", got["question"], want["prompt"]))
        if got["prediction"] != want["answer"]:
            bad.append((case_id, "answer", got["prediction"], want["answer"]))
        if benchmark == "mmbench":
            choice = mmbench_infer_choice(got["prediction"], got["options"])
            if choice != want["choice"]:
                bad.append((case_id, "choice", choice, want["choice"]))
            continue
        key, metric = PER_QUESTION[benchmark]
        if abs(got["scores"][metric] - want[key]) > TOL:
            bad.append((case_id, metric, got["scores"][metric], want[key]))
        if benchmark == "chartqa":  # the split key lmms-eval fills names the row's type
            split = "relaxed_human_split" if got["extra"]["type"] == "human_test" else "relaxed_augmented_split"
            if split not in want:
                bad.append((case_id, "split", split, sorted(want)))
        if benchmark == "textcaps":
            if ptb_tokenize(got["prediction"]) != want["tokens"]:
                bad.append((case_id, "tokens", ptb_tokenize(got["prediction"]), want["tokens"]))
            refs = [ptb_tokenize(a) for a in got["answers"]]
            if refs != want["reference_tokens"]:
                bad.append((case_id, "reference tokens", refs, want["reference_tokens"]))
    assert not bad, f"{len(bad)} of {len(expected)} cases differ from lmms-eval, e.g. {bad[:5]}"


@pytest.mark.parametrize("benchmark, protocol", CASES)
def test_run_aggregates(benchmark, protocol):
    ref = reference(benchmark)
    records = scored(benchmark, protocol)
    for run in ref["runs"]:
        want = ref["expected"][protocol]["runs"][run["name"]]
        got = {a.metric: a.score for a in aggregates(get_protocol(protocol).spec(benchmark), [records[i] for i in run["cases"]])}
        for theirs, ours in RUN[benchmark].items():
            if theirs in want:
                assert got[ours] == pytest.approx(want[theirs], abs=TOL), (run["name"], ours)
            else:  # a split with no question in the run: lmms-eval reports nothing, nor do we
                assert ours not in got, (run["name"], ours)
        if benchmark == "ocrbench":  # lmms-eval's per-category counts
            categories = [records[i]["extra"]["category"] for i in run["cases"]]
            for category, count in want["counts"].items():
                n = categories.count(category)
                mean = got.get(f"ocrbench_accuracy[{category}]", 0.0)
                assert round(mean * n) == count, (run["name"], category)


@pytest.mark.parametrize("benchmark", ["ocrbench", "mmbench", "chartqa", "textcaps"])
def test_the_sweep_reports_lmms_evals_numbers(tmp_path, benchmark):
    """Step 05's sweep, fed the raw answers by a fake generator, writes lmms-eval's numbers of
    the run of all cases into results.csv, under each protocol."""
    ref = reference(benchmark)
    for protocol in PROTOCOLS:
        spec = get_protocol(protocol).spec(benchmark)
        samples, raw = [], {}
        for case in ref["cases"]:
            samples.append(sample_of(spec, case))
            raw[samples[-1].sample_id] = case["raw"]
        out = tmp_path / protocol
        run_sweep(
            out, model="fake", benchmarks={benchmark: samples}, methods=["fullkv"], budgets=[],
            generate=lambda sample, spec, method, budget: raw[sample.sample_id], progress=False, log=None, lmms_eval=protocol,
        )  # fmt: skip
        results = read_results(out / "results.csv")
        table = results.set_index("metric")["score"]
        want = ref["expected"][protocol]["runs"]["all"]
        for theirs, ours in RUN[benchmark].items():
            assert table[ours] == pytest.approx(want[theirs], abs=TOL), (protocol, ours)
        # every number's bootstrap interval is on the number's own scale (x100, /1000)
        assert ((results["ci_low"] <= results["score"] + TOL) & (results["score"] <= results["ci_high"] + TOL)).all()
        assert json.loads((out / "sweep.json").read_text())["settings"]["scoring"]["lmms_eval_commit"] == PROTOCOLS[protocol].lmms_eval_commit
