"""The chain of notebooks, run headless by papermill (docs/design.md, "How data flows").

``STEPS`` below is the only list of the study's steps, built from the step modules'
declarations (:mod:`sparsemm_utils.steps`); the Makefile, CI, the tests and
``runs/<run>/index.html`` all read it. For each step in order the pipeline

1. checks that every upstream step left its outputs (else :class:`MissingUpstreamError` naming the
   step to run),
2. computes the step's parameters (the config's shared ``params`` that the notebook declares, the
   step's own section, and ``run_dir``) and the sha256 of its inputs (its notebook, the library's
   source, and every output of the steps it needs),
3. skips the step when its manifest records the same parameters and input hashes and its outputs
   are still there unchanged (``--force`` reruns anyway),
4. otherwise executes the notebook with papermill into the step folder, exports it to HTML, and
   writes ``manifest.json``; a failing cell stops the chain with :class:`StepFailedError` naming
   the step, the cell and the error.

Usage::

    python -m sparsemm_utils.pipeline --config configs/tiny.yaml --run-dir runs/tiny
    python -m sparsemm_utils.pipeline --config configs/tiny.yaml --run-dir runs/tiny --from 02 --to 02 --force
    python -m sparsemm_utils.pipeline --list

Sharded runs (docs/design.md "Sharded runs"): ``--shard i/n`` (or ``--shard env``, from the
``RANK`` / ``WORLD_SIZE`` of ``accelerate launch`` or ``torchrun``) runs one process's share of the
samples of the selected sharded steps (:data:`SHARDED_STEPS`) into their ``shards/`` folders; the
run without ``--shard`` then merges them, checked complete, and runs the notebook as usual::

    accelerate launch --multi_gpu --num_processes 8 -m sparsemm_utils.pipeline --config C --run-dir R --from 05 --to 05 --shard env
    python -m sparsemm_utils.pipeline --config C --run-dir R
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import difflib
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbconvert
import nbformat
import papermill as pm
import torch
import yaml

from .manifest import (
    FileRecord,
    Manifest,
    device_description,
    git_commit,
    hash_tree,
    package_versions,
)
from .artifacts import StepSpec
from .run_index import write_index
from .runs import MissingUpstreamError, RunLockedError, repo_root, resolve_run_dir, run_lock
from .sharding import SHARDS_DIR, Shard, ShardError
from .steps import allocation, attention_by_layer, efficiency, head_scoring, ocr_annotation, patch_mapping
from .steps import eval as eval_step

__all__ = [
    "check_registry",
    "check_step_configs",
    "STEPS",
    "STEP_CONFIGS",
    "PipelineConfig",
    "PipelineConfigError",
    "TamperedInputError",
    "StepFailedError",
    "StepResult",
    "load_config",
    "select_steps",
    "rerun_reason",
    "run_pipeline",
    "run_shard",
    "step_config",
    "SHARDED_STEPS",
    "ShardedStep",
    "write_index",
    "main",
]


#: The registry: the only list of the chain's steps (order = execution order), built from the
#: declarations of the step modules (sparsemm_utils/steps/: notebook, inputs, outputs). Step 00
#: (the tiny reader's notebook) is outside the chain.
STEPS: tuple[StepSpec, ...] = (
    ocr_annotation.STEP,
    patch_mapping.STEP,
    head_scoring.STEP,
    allocation.STEP,
    eval_step.STEP,
    efficiency.STEP,
    attention_by_layer.STEP,
)


def check_registry(steps: Sequence[StepSpec]) -> None:
    """Each step reads only outputs that earlier steps declare: a step name, an order or an output
    name retyped wrong anywhere fails here, not halfway through a run."""
    seen: dict[str, StepSpec] = {}
    for step in steps:
        if step.name in seen:
            raise PipelineConfigError(f"step {step.name} is registered twice")
        for artifact in step.inputs:
            upstream = seen.get(artifact.step)
            if upstream is None:
                raise PipelineConfigError(
                    f"step {step.name} reads {artifact.key}, but step {artifact.step} does not come before it in the registry"
                )
            if artifact.name not in upstream.output_names:
                raise PipelineConfigError(
                    f"step {step.name} reads {artifact.key}, which step {artifact.step} does not declare among its outputs "
                    f"{list(upstream.output_names)}"
                )
        seen[step.name] = step


check_registry(STEPS)

#: Each registered step's parameters class (``Config`` of its module in sparsemm_utils/steps/),
#: built from the run's config by :func:`check_step_configs` before any step runs.
STEP_CONFIGS: dict[str, type] = {
    module.STEP.name: module.Config
    for module in (ocr_annotation, patch_mapping, head_scoring, allocation, eval_step, efficiency, attention_by_layer)
}

#: Files of a step folder that the pipeline itself writes (not outputs of the notebook).
_PIPELINE_FILES = ("manifest.json",)


class PipelineConfigError(ValueError):
    """The pipeline config (YAML) is malformed or names things that do not exist."""


class TamperedInputError(RuntimeError):
    """An upstream output no longer has the sha256 its step's manifest recorded: it was edited
    (or corrupted) after that step ran. The message names the file, both hashes and the rerun."""


class StepFailedError(RuntimeError):
    """A notebook raised: the message names the step, the cell and the error."""

    def __init__(self, step: str, message: str, notebook: Path | None = None):
        super().__init__(message)
        self.step = step
        self.notebook = notebook


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class PipelineConfig:
    """A run configuration (``configs/*.yaml``).

    ``params`` are shared by every step whose parameters cell declares them (e.g. ``model_id``,
    ``seed``); ``steps[<name>]`` are one step's own parameters, each of which its notebook must
    declare. :meth:`check_against` checks both against the notebooks before anything runs."""

    name: str
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        where = self.path or self.name
        if not isinstance(self.params, dict):
            raise PipelineConfigError(
                f"config {where}: params must be a mapping of parameter: value (e.g. `params: {{model_id: ...}}`), "
                f"got {type(self.params).__name__} {self.params!r}"
            )
        if not isinstance(self.steps, dict):
            raise PipelineConfigError(
                f"config {where}: steps must be a mapping of step name: {{parameter: value}}, got "
                f"{type(self.steps).__name__} {self.steps!r}"
            )
        for step, values in self.steps.items():
            if values is None:
                self.steps[step] = {}
            elif not isinstance(values, dict):
                raise PipelineConfigError(
                    f"config {where}: section steps.{step} must be a mapping of parameter: value, got {values!r}"
                )
        if "run_dir" in self.params or any("run_dir" in v for v in self.steps.values()):
            raise PipelineConfigError("run_dir is set by the pipeline (--run-dir), not by the config")

    def check_steps(self, steps: Sequence[Any]) -> None:
        """Every step the config configures must exist in the registry."""
        known = [s.name for s in steps]
        unknown = sorted(set(self.steps) - set(known))
        if unknown:
            hints = "".join(_did_you_mean(u, known) for u in unknown)
            raise PipelineConfigError(
                f"config {self.path or self.name!s} names unknown step(s) {unknown}{hints}; known steps: {known}"
            )

    def check_against(self, declared: Mapping[str, Mapping[str, Any]]) -> None:
        """Check the whole config against the notebooks' parameters cells (``declared``: step name ->
        {parameter: default}) before any step runs: every shared parameter is declared by some step,
        every step parameter by its step, and each value has the type of the notebook's default."""
        where = self.path or self.name
        everything = sorted({p for params in declared.values() for p in params} - {"run_dir"})
        unused = sorted(set(self.params) - set(everything))
        if unused:
            hints = "".join(_did_you_mean(u, everything) for u in unused)
            raise PipelineConfigError(
                f"config {where}: shared parameter(s) {unused}{hints} are declared by no step's notebook, so "
                f"they would be ignored; parameters the notebooks declare: {everything}"
            )
        for step, own in self.steps.items():
            names = declared.get(step, {})
            undeclared = sorted(set(own) - set(names))
            if undeclared:
                hints = "".join(_did_you_mean(u, list(names)) for u in undeclared)
                raise PipelineConfigError(
                    f"config {where}: steps.{step} sets {undeclared}{hints}, which notebooks/{step}.ipynb does not "
                    f"declare in its parameters cell; it declares {sorted(names)}"
                )
        for step, names in declared.items():
            values = {k: v for k, v in self.params.items() if k in names} | dict(self.steps.get(step, {}))
            for key, value in values.items():
                problem = _type_problem(names[key], value)
                if problem:
                    section = f"steps.{step}.{key}" if key in self.steps.get(step, {}) else f"params.{key}"
                    raise PipelineConfigError(f"config {where}: {section} = {value!r}: {problem}")


def _type_problem(default: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace the notebook default ``default`` (None when it can). A ``None``
    default accepts anything, and a ``None`` value replaces any default (e.g. ``layers: null``, all
    layers; whether the step allows it is its ``Config``'s check, :func:`check_step_configs`); an
    int default accepts ints, a float default ints and floats; a list default lists; a dict
    default mappings; a str default strings; a bool default bools."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return None
    if ok:
        return None
    return f"expected {type(default).__name__} like the notebook's default {default!r}, got {type(value).__name__}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise PipelineConfigError(
                    f"key {key!r} is written twice in one mapping (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep the last one: keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config file: an empty file, a duplicate key, an unknown
    top-level key or a non-mapping section is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader subclass
    except PipelineConfigError as exc:
        raise PipelineConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raise PipelineConfigError(
            f"config file {path} is empty: it must hold at least `params:` and `steps:` (see configs/tiny.yaml)"
        )
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"config file {path} must hold a mapping at top level, got {type(raw).__name__}")
    allowed = {"name", "description", "params", "steps"}
    extra = sorted(set(raw) - allowed)
    if extra:
        hints = "".join(_did_you_mean(str(e), sorted(allowed)) for e in extra)
        raise PipelineConfigError(f"config file {path}: unknown top-level key(s) {extra}{hints}; allowed: {sorted(allowed)}")
    return PipelineConfig(
        name=str(raw.get("name", path.stem)),
        description=str(raw.get("description", "")),
        params=raw["params"] if raw.get("params") is not None else {},
        steps=raw["steps"] if raw.get("steps") is not None else {},
        path=path,
    )


def _step_by_name(name: str, steps: Sequence[StepSpec]) -> StepSpec:
    for step in steps:
        if name in (step.name, step.number):
            return step
    raise PipelineConfigError(f"unknown step {name!r}; known steps: {[s.name for s in steps]}")


def select_steps(from_step: str | None = None, to_step: str | None = None, steps: Sequence[StepSpec] = STEPS) -> list[StepSpec]:
    """The steps from ``from_step`` to ``to_step`` inclusive (a full name or its number, e.g. "02")."""
    names = [s.name for s in steps]
    start = names.index(_step_by_name(from_step, steps).name) if from_step else 0
    stop = names.index(_step_by_name(to_step, steps).name) if to_step else len(steps) - 1
    if start > stop:
        raise PipelineConfigError(f"--from {from_step} comes after --to {to_step}")
    return list(steps[start : stop + 1])


def _literal(source: str) -> Any:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None  # not a literal: no type to check against


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names and default values of the notebook's ``parameters`` cell (papermill reads the cell;
    each default is the literal written there, None when it is not a literal)."""
    return {name: _literal(info["default"]) for name, info in pm.inspect_notebook(str(notebook)).items()}


def step_parameters(step: Any, config: PipelineConfig, run_dir: Path, declared: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters injected into ``step``'s notebook (``declared``: its parameters cell's names and
    defaults): the shared params it declares, its own section, and ``run_dir``. The config must
    have passed :meth:`PipelineConfig.check_against`."""
    if "run_dir" not in declared:
        raise PipelineConfigError(f"notebooks/{step.name}.ipynb has no run_dir in its parameters cell")
    params = {k: v for k, v in config.params.items() if k in declared}
    params.update(config.steps.get(step.name, {}))
    params["run_dir"] = str(run_dir)
    return params


def check_step_configs(
    config: PipelineConfig, steps: Sequence[Any], run_dir: Path, declared: Mapping[str, Mapping[str, Any]]
) -> None:
    """Build the ``Config`` of every registered step in ``steps`` from its notebook's literal defaults
    (``declared``) and the parameters the run gives it, before any step runs: a value its step
    refuses (out of range, above a size bound, an unknown method, a device that is not there) stops
    here, not after the steps before it have run. Steps outside the registry are not checked."""
    where = config.path or config.name
    registered = {step.name: step for step in STEPS}
    for step in steps:
        cls = STEP_CONFIGS.get(step.name)
        if cls is None or registered.get(step.name) is not step:
            continue
        params = step_parameters(step, config, run_dir, declared[step.name])
        try:
            _step_config(step, params, declared[step.name])
        except Exception as exc:  # each step's Config raises its own error classes
            raise PipelineConfigError(
                f"config {where}: step {step.name} refuses its parameters ({type(exc).__name__}: {exc}); nothing has run. "
                f"Fix steps.{step.name} (or params) in the config"
            ) from exc


def _step_config(step: Any, params: Mapping[str, Any], declared: Mapping[str, Any]) -> Any:
    """The ``Config`` of a registered step as its notebook builds it: the notebook's literal
    defaults (``declared``) overridden by the run's ``params`` (:func:`step_parameters`)."""
    values = {k: v for k, v in declared.items() if v is not None} | dict(params)
    return STEP_CONFIGS[step.name](**values)


def step_config(step: Any, config: PipelineConfig | str | Path, run_dir: str | Path, *, root: Path | None = None) -> Any:
    """The ``Config`` that ``step``'s notebook builds in a pipeline run of ``config`` into ``run_dir``."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config)
    declared = declared_parameters_of([step], root or repo_root())[step.name]
    return _step_config(step, step_parameters(step, config, resolve_run_dir(run_dir), declared), declared)


@dataclass(frozen=True)
class ShardedStep:
    """How a step runs sharded: ``run(its Config, Shard)`` runs one shard; ``parent(run_dir)`` is
    the folder whose ``shards/`` holds the shard folders until the step's run merges them."""

    run: Callable[..., Any]
    parent: Callable[[Path], Path]


#: The steps whose samples a sharded run splits over processes (``--shard``; docs/design.md
#: "Sharded runs"). Step 03's shards live outside its folder, which a rerun sets aside.
SHARDED_STEPS: dict[str, ShardedStep] = {
    head_scoring.NAME: ShardedStep(head_scoring.capture_shard, lambda run: run / head_scoring.SHARDS_ROOT / head_scoring.NAME),
    eval_step.NAME: ShardedStep(eval_step.sweep, lambda run: run / eval_step.NAME),
}


def _has_shards(step: Any, run: Path) -> bool:
    """Whether shard folders of ``step`` wait to be merged in ``run``."""
    sharded = SHARDED_STEPS.get(step.name)
    return sharded is not None and (sharded.parent(run) / SHARDS_DIR).is_dir()


def run_shard(
    config: PipelineConfig | str | Path,
    run_dir: str | Path,
    shard: Shard,
    *,
    from_step: str | None = None,
    to_step: str | None = None,
    root: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run ``shard`` of every selected step in :data:`SHARDED_STEPS`, in order, into its shard
    folder (no notebook, no manifest, no run lock: the other shards run at the same time). The
    upstream steps must have run; the single-process pipeline run of each step afterwards merges
    its shards (checking they are complete) and writes the step's outputs. Returns the steps run.

    On a GPU machine each process takes the GPU ``LOCAL_RANK`` (set by ``accelerate launch`` and
    ``torchrun``) as its ``cuda`` device."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config)
    config.check_steps(STEPS)
    root = root or repo_root()
    run = resolve_run_dir(run_dir)
    selected = [s for s in select_steps(from_step, to_step, STEPS) if s.name in SHARDED_STEPS]
    if not selected:
        raise PipelineConfigError(
            f"--shard runs only the steps {sorted(SHARDED_STEPS)}: select one with --from/--to (e.g. --from 05 --to 05)"
        )
    declared = declared_parameters_of(STEPS, root)
    config.check_against(declared)
    check_step_configs(config, selected, run, declared)
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    for step in selected:
        for artifact in step.inputs:
            artifact.require(run)
        log(f"[shard {shard}] {step.name}: {step.title}")
        start = time.perf_counter()
        SHARDED_STEPS[step.name].run(step_config(step, config, run, root=root), shard)
        log(f"[shard {shard}] {step.name} done in {time.perf_counter() - start:.1f} s; the pipeline run of the step merges the shards")
    return [step.name for step in selected]


def _comparable(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that decide a rerun: all but ``run_dir``, so a run folder that was moved or
    copied elsewhere skips its unchanged steps."""
    return {k: v for k, v in params.items() if k != "run_dir"}


def _code_fingerprint() -> list[FileRecord]:
    """Hashes of the library's source: a change to the code a notebook calls reruns the step."""
    package = Path(__file__).resolve().parent
    return [r for r in hash_tree(package, base=package.parent, prefix="repo:") if r.path.endswith(".py")]


def _rerun_command(run_dir: Path, step: str) -> str:
    return f"python -m sparsemm_utils.pipeline --config <config.yaml> --run-dir {run_dir} --from {step} --to {step} --force"


def step_inputs(step: Any, run_dir: Path, root: Path, steps: Sequence[Any]) -> list[FileRecord]:
    """The step's inputs with their hashes: its notebook, the library source, and every output of
    the steps it needs. Each upstream output is re-hashed and compared with the sha256 its step's
    manifest recorded: a file edited or corrupted since raises :class:`TamperedInputError`."""
    records = [FileRecord.of(step.notebook_path(root), f"repo:notebooks/{step.name}.ipynb")]
    records += _code_fingerprint()
    for need in step.needs:
        upstream = _step_by_name(need, steps)
        folder = run_dir / upstream.name
        manifest = Manifest.read(folder)
        if manifest is None or manifest.status != "ok":
            state = "has not run" if manifest is None else f"did not finish (its manifest says {manifest.status!r})"
            raise MissingUpstreamError(
                f"step {step.name} needs the outputs of step {upstream.name}, which {state} in {run_dir}: run it "
                f"first, e.g. `python -m sparsemm_utils.pipeline --config <config.yaml> --run-dir {run_dir} "
                f"--to {upstream.name}`"
            )
        for record in manifest.outputs:
            file = run_dir / record.path
            if not file.is_file():
                raise MissingUpstreamError(
                    f"step {step.name} needs {record.path}, an output of step {upstream.name} that is "
                    f"missing from {run_dir}: rerun {upstream.name} (`{_rerun_command(run_dir, upstream.name)}`)"
                )
            now = FileRecord.of(file, record.path)
            if now.sha256 != record.sha256:
                raise TamperedInputError(
                    f"{file} changed after step {upstream.name} wrote it: its manifest recorded sha256 "
                    f"{record.sha256[:16]}... ({record.bytes} bytes), the file now has {now.sha256[:16]}... "
                    f"({now.bytes} bytes). Step {step.name} will not run on an edited input: restore the file or "
                    f"rerun {upstream.name} (`{_rerun_command(run_dir, upstream.name)}`)"
                )
            records.append(now)
    return records


def _step_outputs(folder: Path, run_dir: Path, step: Any) -> list[FileRecord]:
    exclude = {f"{step.name}/{name}" for name in (*_PIPELINE_FILES, f"{step.name}.ipynb", f"{step.name}.html")}
    return hash_tree(folder, base=run_dir, exclude=frozenset(exclude))


def _outputs_unchanged(manifest: Manifest, run_dir: Path) -> bool:
    for record in manifest.outputs:
        file = run_dir / record.path
        if not file.is_file() or file.stat().st_size != record.bytes:
            return False
        if FileRecord.of(file, record.path).sha256 != record.sha256:
            return False
    return True


def rerun_reason(previous: Manifest | None, params: dict[str, Any], inputs: list[FileRecord], run: Path) -> str | None:
    """Why a step must run again, or None when it can be skipped (same parameters apart from the run
    folder's location, same input hashes, outputs unchanged on disk)."""
    if previous is None:
        return "no manifest yet"
    if previous.status == "running":
        return "its last run did not finish (interrupted)"
    if previous.status != "ok":
        return f"last run {previous.status}"
    before, now = _comparable(previous.params), _comparable(params)
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        return f"parameters changed: {', '.join(changed)}"
    if previous.inputs != inputs:
        old = {r.path: r.sha256 for r in previous.inputs}
        new = {r.path: r.sha256 for r in inputs}
        changed = sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return f"inputs changed: {shown}"
    if not _outputs_unchanged(previous, run):
        return "outputs missing or modified since the last run"
    return None


@dataclass
class StepResult:
    """What happened to one step: ``status`` is "ran", "skipped" or "failed"."""

    step: str
    status: str
    seconds: float
    folder: Path
    message: str = ""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _export_html(notebook: Path, target: Path) -> None:
    exporter = nbconvert.HTMLExporter()
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    target.write_text(body, encoding="utf-8")


def _describe_failure(exc: BaseException) -> str:
    """A one-paragraph description of a papermill failure: cell number, error type and value."""
    cell = getattr(exc, "exec_count", None)
    index = getattr(exc, "cell_index", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = f"cell {index}" if index is not None else "a cell"
    if cell is not None:
        where += f" (execution count {cell})"
    source = (getattr(exc, "source", "") or "").strip().splitlines()
    snippet = f"; cell starts with: {source[0][:120]!r}" if source else ""
    return f"{where} raised {ename}: {evalue}{snippet}"


#: Where a step's previous good outputs wait while it reruns, and where a failed run is kept.
PREVIOUS_DIR = ".previous"
FAILED_DIR = ".failed"


def _set_aside(run: Path, folder: Path, step: Any) -> Path | None:
    """Before a non-resumable step reruns: move its last good outputs to ``<run>/.previous/<step>``
    (leftovers of an interrupted or failed run are discarded; an older good copy already set aside
    stays). Returns the copy set aside, if any."""
    backup = run / PREVIOUS_DIR / step.name
    if folder.exists():
        manifest = Manifest.read(folder)
        if manifest is not None and manifest.status == "ok":
            if backup.exists():
                shutil.rmtree(backup)
            backup.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(backup)
        else:
            shutil.rmtree(folder)
    return backup if backup.exists() else None


def _restore(run: Path, folder: Path, step: Any, backup: Path | None) -> str:
    """After a failure: when an earlier good run was set aside, keep the failed run in
    ``<run>/.failed/<step>`` and put the good outputs back; otherwise the failed run stays in the
    step folder (its manifest says "failed"). Returns a sentence saying which."""
    if backup is None:
        return f"Step {step.name} had no earlier successful run; its failed run stays in {folder}"
    failed = run / FAILED_DIR / step.name
    if failed.exists():
        shutil.rmtree(failed)
    failed.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(failed)
    backup.rename(folder)
    return (
        f"The previous good outputs of {step.name} are back in place (from its last successful run); the failed "
        f"run is kept in {failed}"
    )


def _recover_interrupted(run: Path, steps: Sequence[Any], log: Callable[[str], None]) -> None:
    """Undo what a pipeline killed mid-step (``kill -9``, a power cut) left behind, before anything
    runs: a step whose good outputs were set aside (``<run>/.previous/<step>``) and whose folder
    holds an unfinished run (manifest "running" or none) gets its good outputs back, the unfinished
    run kept in ``<run>/.failed/<step>``; a copy set aside beside a finished run is stale and goes."""
    for step in steps:
        backup = run / PREVIOUS_DIR / step.name
        if not backup.is_dir():
            continue
        folder = run / step.name
        kept = Manifest.read(backup)
        current = Manifest.read(folder) if folder.exists() else None
        if current is not None and current.status == "ok":
            shutil.rmtree(backup)  # the run finished; only removing its backup was left to do
            continue
        if kept is None or kept.status != "ok":
            continue
        message = ""
        if folder.exists():
            failed = run / FAILED_DIR / step.name
            if failed.exists():
                shutil.rmtree(failed)
            failed.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(failed)
            message = f"; the interrupted run is kept in {failed}"
        backup.rename(folder)
        log(f"[back] {step.name}: its last run was interrupted; the outputs of its previous good run are back in place{message}")


def _mark_running(folder: Path, manifest: Manifest) -> None:
    """A resumable step reruns in place: its manifest says "running" until it finishes, so a killed
    run is never taken for a finished one."""
    running = Manifest(**{**manifest.__dict__, "status": "running", "error": None})
    running.write(folder)


def declared_parameters_of(steps: Sequence[Any], root: Path) -> dict[str, dict[str, Any]]:
    """Every selected step's parameters cell: step name -> {parameter: default}."""
    declared = {}
    for step in steps:
        notebook = step.notebook_path(root)
        if not notebook.is_file():
            raise PipelineConfigError(f"step {step.name}: notebook {notebook} does not exist")
        declared[step.name] = declared_parameters(notebook)
    return declared


def run_pipeline(
    config: PipelineConfig | str | Path,
    run_dir: str | Path,
    *,
    from_step: str | None = None,
    to_step: str | None = None,
    force: bool = False,
    break_stale_lock: bool = False,
    steps: Sequence[Any] | None = None,
    root: Path | None = None,
    kernel_name: str = "python3",
    log: Callable[[str], None] = print,
) -> list[StepResult]:
    """Run (or skip) the selected steps in order; see the module docstring for the rules.

    The whole config is checked against every step's notebook, and each selected step's ``Config``
    is built from it (:func:`check_step_configs`), before anything runs. The run
    folder is locked while steps run. Raises :class:`MissingUpstreamError` when a needed step has
    not run, :class:`TamperedInputError` when an upstream output was edited after its step wrote
    it, :class:`~sparsemm_utils.runs.RunLockedError` when another pipeline holds the folder, and
    :class:`StepFailedError` when a notebook fails (its previous good outputs are restored and the
    failed run is kept under ``<run>/.failed/``)."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config)
    steps = tuple(steps or STEPS)
    config.check_steps(steps)
    root = root or repo_root()
    run = resolve_run_dir(run_dir)
    if run.exists() and not run.is_dir():
        raise PipelineConfigError(f"--run-dir {run} is a file, not a folder: give a folder (it is created if missing)")
    declared = declared_parameters_of(steps, root)
    config.check_against(declared)
    selected = select_steps(from_step, to_step, steps)
    check_step_configs(config, selected, run, declared)
    try:
        lock = run_lock(run, break_stale=break_stale_lock)
        lock.__enter__()
    except RunLockedError:
        raise
    except OSError as exc:  # a read-only run folder: fine as long as every step is unchanged
        return _check_read_only(config, run, selected, steps, root, declared, force, log, exc)
    results: list[StepResult] = []
    try:
        _recover_interrupted(run, steps, log)
        for step in selected:
            results.append(_run_step(step, config, run, steps, root, declared[step.name], force, kernel_name, log))
    finally:
        try:
            write_index(run, steps, config)
        finally:
            lock.__exit__(None, None, None)
    return results


def _check_read_only(config, run, selected, steps, root, declared, force, log, exc) -> list[StepResult]:
    results = []
    for step in selected:
        params = step_parameters(step, config, run, declared[step.name])
        previous = Manifest.read(run / step.name)
        reason = "--force" if force else rerun_reason(previous, params, step_inputs(step, run, root, steps), run)
        if reason is not None:
            raise PipelineConfigError(
                f"{run} cannot be written ({exc.strerror or exc}), and step {step.name} must run ({reason}): make the "
                f"run folder writable or use another --run-dir"
            ) from exc
        log(f"[skip] {step.name}: parameters and input hashes unchanged since {previous.finished_at}")
        results.append(StepResult(step.name, "skipped", 0.0, run / step.name, "unchanged"))
    log(f"(the run folder {run} is read-only: nothing had to run, index.html was not rewritten)")
    return results


def _run_step(step, config, run, steps, root, declared, force, kernel_name, log) -> StepResult:
    notebook = step.notebook_path(root)
    params = step_parameters(step, config, run, declared)
    inputs = step_inputs(step, run, root, steps)
    folder = run / step.name
    previous = Manifest.read(folder)
    reason = "--force" if force else rerun_reason(previous, params, inputs, run)
    if reason is None and _has_shards(step, run):
        reason = "shard folders to merge"
    if reason is None:
        log(f"[skip] {step.name}: parameters and input hashes unchanged since {previous.finished_at}")
        return StepResult(step.name, "skipped", 0.0, folder, "unchanged")
    backup = None
    if step.resumable:
        if previous is not None:
            _mark_running(folder, previous)
    else:
        backup = _set_aside(run, folder, step)
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / f"{step.name}.ipynb"
    html_path = folder / f"{step.name}.html"
    manifest = Manifest(
        step=step.name,
        title=step.title,
        status="running",
        params=params,
        inputs=inputs,
        packages=package_versions(),
        git_commit=git_commit(root),
        device=device_description(),
        started_at=_now(),
        notebook=executed.name,
    )
    manifest.write(folder)
    log(f"[run ] {step.name}: {step.title} ({reason})")
    start = time.perf_counter()

    def fail(message: str, exc: BaseException | None = None) -> StepFailedError:
        manifest.status = "failed"
        manifest.error = message
        manifest.finished_at = _now()
        manifest.seconds = round(time.perf_counter() - start, 3)
        if executed.is_file():
            _export_html(executed, html_path)
            manifest.html = html_path.name
        manifest.write(folder)
        if not step.resumable:
            message += ". " + _restore(run, folder, step, backup)
        return StepFailedError(step.name, message, executed)

    try:
        pm.execute_notebook(
            str(notebook),
            str(executed),
            parameters=params,
            cwd=str(root),
            kernel_name=kernel_name,
            progress_bar=False,
            report_mode=False,
        )
    except Exception as exc:  # papermill wraps cell errors in PapermillExecutionError
        raise fail(
            f"step {step.name} failed: {_describe_failure(exc)}. The executed notebook with the traceback is {executed}",
            exc,
        ) from exc
    seconds = time.perf_counter() - start
    missing = [name for name in step.output_names if not (folder / name).exists()]
    if missing:
        raise fail(
            f"step {step.name}: the notebook finished but did not write {missing} into {folder}; its step "
            f"declaration (sparsemm_utils/steps/) promises them"
        )
    _export_html(executed, html_path)
    manifest.status = "ok"
    manifest.html = html_path.name
    manifest.outputs = _step_outputs(folder, run, step)
    manifest.finished_at = _now()
    manifest.seconds = round(seconds, 3)
    manifest.write(folder)
    if backup is not None:
        shutil.rmtree(backup)
    log(f"[done] {step.name} in {seconds:.1f} s")
    return StepResult(step.name, "ran", seconds, folder, reason)


def main(argv: Sequence[str] | None = None, *, steps: Sequence[StepSpec] | None = None, root: Path | None = None) -> int:
    """The command line; ``steps`` and ``root`` replace the registry and repo root (for tests)."""
    steps = tuple(steps or STEPS)
    parser = argparse.ArgumentParser(
        prog="python -m sparsemm_utils.pipeline",
        description="Run the SparseMM reproduction notebooks in order with papermill.",
    )
    parser.add_argument("--config", help="pipeline config, e.g. configs/tiny.yaml")
    parser.add_argument("--run-dir", help="output folder, e.g. runs/tiny")
    parser.add_argument("--from", dest="from_step", help="first step to consider (name or number, e.g. 02)")
    parser.add_argument("--to", dest="to_step", help="last step to consider (name or number)")
    parser.add_argument("--force", action="store_true", help="rerun the selected steps even when unchanged")
    parser.add_argument(
        "--break-stale-lock",
        action="store_true",
        help="remove a lock left by a pipeline process that no longer exists (never one that is alive)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N|env",
        help="run shard I of N of the selected sharded steps (03, 05) into their shards/ folders; `env` reads RANK and "
        "WORLD_SIZE as set by `accelerate launch` or `torchrun`. A later run without --shard merges and finishes the steps",
    )
    parser.add_argument("--list", action="store_true", help="list the registered steps and exit")
    args = parser.parse_args(argv)
    if args.list:
        for step in steps:
            needs = ", ".join(step.needs) or "-"
            print(f"{step.name:24s} needs: {needs:24s} {step.title}")
        return 0
    if not args.config or not args.run_dir:
        parser.error("--config and --run-dir are required (or --list)")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if args.shard is not None:
        try:
            shard = Shard.from_env() if args.shard == "env" else Shard.parse(args.shard)
            if args.force or args.break_stale_lock:
                raise PipelineConfigError("--force and --break-stale-lock do not apply to --shard (a shard resumes its own folder)")
            run_shard(args.config, args.run_dir, shard, from_step=args.from_step, to_step=args.to_step, root=root)
        except (ShardError, MissingUpstreamError, PipelineConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        results = run_pipeline(
            args.config,
            args.run_dir,
            from_step=args.from_step,
            to_step=args.to_step,
            force=args.force,
            break_stale_lock=args.break_stale_lock,
            steps=steps,
            root=root,
        )
    except (StepFailedError, MissingUpstreamError, PipelineConfigError, TamperedInputError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ran = sum(r.status == "ran" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{ran} step(s) ran, {skipped} skipped; index: {resolve_run_dir(args.run_dir) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
