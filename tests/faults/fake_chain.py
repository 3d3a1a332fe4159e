"""A three-step chain of tiny notebooks for the pipeline's fault cases (no model: each step runs in
a second or two). Imported by this folder's conftest and by the subprocess a kill -9 case starts.

- ``01_make`` writes ``value.txt`` (parameter ``value``);
- ``02_double`` reads it and writes ``double.txt``; ``model_id = "missing/model"`` fails the way a
  bad model id does, ``skip_output = True`` finishes without writing its declared output;
- ``03_append`` (resumable) appends ``value`` to ``log.txt``.

Steps 02 and 03 write their kernel's pid to ``marker`` (when given) and then sleep ``wait``
seconds, so a test can kill the pipeline and the kernel mid-step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparsemm_utils import pipeline as pl
from sparsemm_utils.artifacts import Artifact, StepSpec

VALUE = Artifact("01_make", "value.txt", "the number")
DOUBLE = Artifact("02_double", "double.txt", "twice the number")
LOG = Artifact("03_append", "log.txt", "one line per run of step 03")
STEPS: tuple[StepSpec, ...] = (
    StepSpec("01_make", "write a number", outputs=(VALUE,)),
    StepSpec("02_double", "double it", inputs=(VALUE,), outputs=(DOUBLE,)),
    StepSpec("03_append", "append to a log (resumable)", inputs=(DOUBLE,), outputs=(LOG,), resumable=True),
)

_MARK = (
    "import os, time\nfrom pathlib import Path\n"
    "if marker:\n    Path(marker).write_text(str(os.getpid()))\ntime.sleep(wait)"
)


def write_repo(root: Path, write_notebook: Callable[[Path, str, list[str]], Path]) -> Path:
    """The three notebooks under ``root/notebooks``; returns ``root``."""
    notebooks = root / "notebooks"
    notebooks.mkdir(parents=True, exist_ok=True)
    write_notebook(
        notebooks / "01_make.ipynb",
        'run_dir = "runs/dev"\nvalue = 1\nseed = 0',
        ["from pathlib import Path\nout = Path(run_dir) / '01_make'\nout.mkdir(parents=True, exist_ok=True)\n"
         "(out / 'value.txt').write_text(str(value))"],
    )
    write_notebook(
        notebooks / "02_double.ipynb",
        'run_dir = "runs/dev"\nmodel_id = "good/model"\nwait = 0.0\nmarker = ""\nskip_output = False',
        [
            "if model_id == 'missing/model':\n    raise FileNotFoundError(f'model {model_id!r} is not available offline')",
            _MARK,
            "v = int((Path(run_dir) / '01_make' / 'value.txt').read_text())\n"
            "if not skip_output:\n    (Path(run_dir) / '02_double' / 'double.txt').write_text(str(2 * v))",
        ],
    )
    write_notebook(
        notebooks / "03_append.ipynb",
        'run_dir = "runs/dev"\nvalue = 1\nwait = 0.0\nmarker = ""',
        [
            "from pathlib import Path\nwith open(Path(run_dir) / '03_append' / 'log.txt', 'a') as fh:\n    fh.write(f'{value}\\n')",
            _MARK,
        ],
    )
    return root


def config(value: int = 3, **steps: dict) -> pl.PipelineConfig:
    """The chain's config: shared seed and model_id, ``01_make.value``, plus ``steps`` sections."""
    return pl.PipelineConfig(name="faults", params={"seed": 0, "model_id": "good/model"}, steps={"01_make": {"value": value}, **steps})


def config_yaml(path: Path, value: int = 3, extra: str = "") -> Path:
    """The same config as a YAML file (for the command line), with ``extra`` appended under ``steps:``."""
    path.write_text(f"name: faults\nparams: {{seed: 0, model_id: good/model}}\nsteps:\n  01_make: {{value: {value}}}\n{extra}")
    return path
