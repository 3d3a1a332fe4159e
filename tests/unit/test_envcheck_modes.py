"""The environment check's two modes (issue 23 item 5, docs/gpu.md) on hand-made package lists,
and what pip resolves for the Makefile's GPU torch requirement (offline, on stand-in wheels)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from sparsemm_utils import envcheck
from sparsemm_utils.envcheck import Environment, problems, torch_build

ROOT = Path(__file__).resolve().parents[2]
PIN = envcheck.PINNED_TORCH

#: torch 2.13.0's Requires-Dist on PyPI (cp311 manylinux_2_28_x86_64), from the report of
#: `pip install --dry-run --ignore-installed --no-deps --report torch.json torch==2.13.0` (docs/gpu.md).
PYPI_TORCH_REQUIRES = (
    "filelock",
    "typing-extensions>=4.10.0",
    "setuptools>=77.0.3",
    "sympy>=1.13.3",
    "networkx>=2.5.1",
    "jinja2",
    "fsspec>=0.8.5",
    'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; platform_system == "Linux"',
    'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'nvidia-cusparselt-cu13==0.8.1; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    'nvidia-nvshmem-cu13==3.4.5; platform_system == "Linux"',
    'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
    'optree>=0.13.0; extra == "optree"',
    'opt-einsum>=3.3; extra == "opt-einsum"',
    'pyyaml; extra == "pyyaml"',
)
#: The CUDA packages those lines require on Linux, at the versions they pin.
PYPI_CUDA = {
    "cuda-toolkit": "13.0.3",
    "cuda-bindings": "13.0.3",
    "nvidia-cudnn-cu13": "9.20.0.48",
    "nvidia-cusparselt-cu13": "0.8.1",
    "nvidia-nccl-cu13": "2.29.7",
    "nvidia-nvshmem-cu13": "3.4.5",
    "triton": "3.7.1",
}
LINUX = {"platform_system": "Linux", "python_version": "3.11"}
BASE = {"numpy": "2.4.6", "transformers": "5.23.0"}


def env(torch: str | None, *, cuda: dict[str, str] | None = None, requires=(), marker_env=LINUX, **extra: str) -> Environment:
    packages = {**BASE, **(cuda or {}), **extra}
    if torch is not None:
        packages["torch"] = torch
    return Environment(packages, tuple(requires), marker_env)


# --- CPU mode (make setup) -------------------------------------------------------------------


@pytest.mark.parametrize("version", [PIN, f"{PIN}+cpu"])
def test_cpu_mode_accepts_the_pinned_cpu_torch(version):
    assert problems("cpu", env(version)) == []
    assert torch_build(version, env(version)) == "cpu"


def test_cpu_mode_refuses_pypis_cuda_wheel_and_its_packages():
    found = problems("cpu", env(PIN, cuda=PYPI_CUDA, requires=PYPI_TORCH_REQUIRES))
    assert len(found) == 1 and "CUDA packages were pulled in" in found[0] and "make setup-gpu" in found[0]
    assert "cuda-bindings" in found[0]


def test_cpu_mode_refuses_a_cuda_build_even_without_its_packages():
    found = problems("cpu", env(f"{PIN}+cu128"))
    assert found == [f"torch {PIN}+cu128 is a CUDA build; this is the CPU environment (for a GPU one: `make setup-gpu`, docs/gpu.md)"]


@pytest.mark.parametrize("name", ["nvidia-cublas-cu12", "nvidia_cudnn_cu13", "cuda-toolkit", "triton"])
def test_cpu_mode_refuses_any_cuda_package(name):
    found = problems("cpu", env(f"{PIN}+cpu", **{name: "1.0"}))
    assert len(found) == 1 and "CUDA packages were pulled in" in found[0]


def test_cpu_mode_refuses_a_swapped_torch_and_torchvision():
    found = problems("cpu", env("2.14.1+cpu", torchvision="0.29.1"))
    assert found[0] == f"torch 2.14.1+cpu is installed, the project pins {PIN} (CPU build)"
    assert "torchvision 0.29.1 is installed" in found[1]


def test_missing_torch_names_the_setup_command():
    assert problems("cpu", env(None)) == ["torch is not installed: run `make setup`"]
    assert problems("gpu", env(None)) == ["torch is not installed: run `make setup-gpu`"]


# --- GPU mode (make setup-gpu) ---------------------------------------------------------------


def test_gpu_mode_accepts_pypis_cuda_wheel_with_its_packages():
    environment = env(PIN, cuda=PYPI_CUDA, requires=PYPI_TORCH_REQUIRES)
    assert torch_build(PIN, environment) == "cuda"
    assert problems("gpu", environment) == []
    assert [r.name for r in environment.cuda_requirements()] == list(PYPI_CUDA)  # extras not requested


def test_gpu_mode_accepts_pytorch_index_builds():
    requires = ('nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux" and platform_machine == "x86_64"',)
    linux_x86 = {**LINUX, "platform_machine": "x86_64"}
    environment = env(f"{PIN}+cu128", cuda={"nvidia-cublas-cu12": "12.8.4.1"}, requires=requires, marker_env=linux_x86)
    assert problems("gpu", environment) == []


@pytest.mark.parametrize("version", [f"{PIN}+cpu", PIN])
def test_gpu_mode_refuses_a_cpu_build(version):
    # A plain version without CUDA requirements is the CPU wheel (macOS, or a CPU-only index).
    found = problems("gpu", env(version))
    assert len(found) == 1 and found[0].startswith(f"torch {version} is a CPU build: `make setup-gpu`")


def test_gpu_mode_reads_markers_for_this_machine():
    # PyPI's wheel requires its CUDA packages on Linux only: described as macOS it is a CPU build.
    mac = env(PIN, requires=PYPI_TORCH_REQUIRES, marker_env={"platform_system": "Darwin", "python_version": "3.11"})
    assert torch_build(PIN, mac) == "cpu"
    assert "is a CPU build" in problems("gpu", mac)[0]


@pytest.mark.parametrize("version", ["2.14.1", "2.12.0+cu128", "2.13.1+cu130"])
def test_gpu_mode_refuses_a_swapped_torch(version):
    found = problems("gpu", env(version, cuda=PYPI_CUDA, requires=PYPI_TORCH_REQUIRES))
    assert found[0] == f"torch {version} is installed, the project pins {PIN} (CUDA build)"


def test_gpu_mode_refuses_missing_or_swapped_cuda_packages():
    cuda = {k: v for k, v in PYPI_CUDA.items() if k != "nvidia-nccl-cu13"}
    cuda["triton"] = "3.6.0"
    found = problems("gpu", env(PIN, cuda=cuda, requires=PYPI_TORCH_REQUIRES))
    assert found == [
        f'torch {PIN} requires nvidia-nccl-cu13==2.29.7; platform_system == "Linux", which is not installed',
        f'torch {PIN} requires triton==3.7.1; platform_system == "Linux" and python_version < "3.15", but triton 3.6.0 is installed',
    ]


def test_gpu_mode_still_refuses_torchvision():
    found = problems("gpu", env(PIN, cuda=PYPI_CUDA, requires=PYPI_TORCH_REQUIRES, torchaudio="2.13.0"))
    assert len(found) == 1 and "torchaudio 2.13.0 is installed" in found[0]


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="environment mode must be one of 'cpu', 'gpu', got 'cuda'"):
        problems("cuda", env(PIN))


def test_this_environment_passes_its_own_mode_only(capsys):
    # make setup's CPU environment passes `envcheck` and fails `--gpu`; make setup-gpu's the reverse.
    current = Environment.current()
    own, other = ("gpu", "cpu") if torch_build(current.packages["torch"], current) == "cuda" else ("cpu", "gpu")
    assert envcheck.main(["--gpu"] if own == "gpu" else []) == 0
    assert f"environment ok ({own})" in capsys.readouterr().out
    assert envcheck.main(["--gpu"] if other == "gpu" else []) == 1
    err = capsys.readouterr().err
    assert f"environment check ({other}) failed" in err and ("make setup-gpu" in err if other == "gpu" else "CUDA" in err)


# --- what pip resolves for the Makefile's GPU requirement ------------------------------------


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A stand-in wheel: metadata only, enough for pip's resolver."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = "".join(["Metadata-Version: 2.1\n", f"Name: {name}\n", f"Version: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{dist}.dist-info/METADATA", meta)
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")


def _make_gpu_torch_args(**variables: str) -> list[str]:
    """The arguments the Makefile's setup-gpu passes to `pip install` for torch (`make -n`)."""
    settings = [f"{k}={v}" for k, v in variables.items()]
    plan = subprocess.run(
        ["make", "-n", "--always-make", "-C", str(ROOT), "setup-gpu", "VENV=/nonexistent-venv", *settings],
        capture_output=True, text=True, check=True,
    ).stdout
    lines = [l for l in plan.splitlines() if " -m pip install " in l and "torch" in l and "-r " not in l]
    assert len(lines) == 1, plan
    return shlex.split(lines[0].split(" -m pip install ", 1)[1])


def _pip_resolve(args: list[str], links: Path, tmp_path: Path) -> dict[str, str]:
    """`pip install --dry-run --report` offline against ``links`` only: name -> version."""
    report = tmp_path / "report.json"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environ["PIP_CONFIG_FILE"] = os.devnull  # no machine config: no other index, find-links or constraints
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
               "--find-links", str(links), "--report", str(report), "--quiet"]
    command += [a for a in args if not a.startswith("--extra-index-url") and not a.startswith("https://")]
    subprocess.run(command, env=environ, check=True, capture_output=True, text=True)
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """A folder like this machine's find-links (the CPU build) beside PyPI's and PyTorch's CUDA builds."""
    links = tmp_path / "wheels"
    links.mkdir()
    _wheel(links, "torch", f"{PIN}+cpu")
    _wheel(links, "torch", PIN, ("nvidia-cudnn-cu13==9.20.0.48",))
    _wheel(links, "torch", f"{PIN}+cu128", ("nvidia-cudnn-cu12==9.10.2.21",))
    _wheel(links, "torch", "2.14.1", ("nvidia-cudnn-cu13==9.20.0.48",))
    _wheel(links, "nvidia-cudnn-cu13", "9.20.0.48")
    _wheel(links, "nvidia-cudnn-cu12", "9.10.2.21")
    return links


def test_pip_resolves_the_makefiles_gpu_torch_to_pypis_cuda_build(wheelhouse, tmp_path):
    args = _make_gpu_torch_args()
    assert args == [f"torch==={PIN}"]
    assert _pip_resolve(args, wheelhouse, tmp_path) == {"torch": PIN, "nvidia-cudnn-cu13": "9.20.0.48"}


def test_pip_resolves_the_plain_pin_to_the_cpu_build_hence_the_exact_pin(wheelhouse, tmp_path):
    # requirements.txt's `torch==PIN` admits local builds, which sort above the plain version: with
    # a find-links folder holding the CPU build (as on the project's machines) pip takes +cpu. Why
    # setup-gpu installs torch with `===` (or the +cuNNN pin) first.
    (wheelhouse / f"torch-{PIN}+cu128-py3-none-any.whl").unlink()
    assert _pip_resolve([f"torch=={PIN}"], wheelhouse, tmp_path)["torch"] == f"{PIN}+cpu"


def test_pip_resolves_torch_cuda_to_pytorchs_build(wheelhouse, tmp_path):
    args = _make_gpu_torch_args(TORCH_CUDA="cu128")
    assert args == [f"torch=={PIN}+cu128", "--extra-index-url", "https://download.pytorch.org/whl/cu128"]
    assert _pip_resolve(args, wheelhouse, tmp_path) == {"torch": f"{PIN}+cu128", "nvidia-cudnn-cu12": "9.10.2.21"}


# --- the indexes themselves (network) ---------------------------------------------------------


def _index_files(url: str) -> list[str]:
    """File names of a PEP 691 simple-index page, or skip when the index cannot be reached."""
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        pytest.skip(f"{url} is unreachable from this machine ({err}); the offline tests above still ran")
    try:
        return [f["filename"] for f in json.loads(body)["files"]]
    except (ValueError, KeyError):  # an HTML page (PyTorch's index)
        return re.findall(r">([^<>]+\.whl)<", body.decode("utf-8", "replace"))


@pytest.mark.network
def test_pypi_serves_the_pinned_torch_for_linux():
    files = _index_files("https://pypi.org/simple/torch/")
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_28_aarch64"):
        assert f"torch-{PIN}-cp311-cp311-{platform}.whl" in files


@pytest.mark.network
def test_pytorch_index_serves_the_pinned_torch_for_cu128():
    files = _index_files("https://download.pytorch.org/whl/cu128/torch/")
    assert any(f.startswith(f"torch-{PIN}+cu128-cp311-cp311-") and "linux_x86_64" in f for f in files)
