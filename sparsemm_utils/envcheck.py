"""Checks that the environment is the pinned one (run by ``make`` after installing).

Two modes, the two environments the Makefile builds (docs/gpu.md):

- ``cpu`` (``make setup``, the default): torch is the pinned version and no CUDA package is
  installed. An unpinned or swapped torch pulls several GB of CUDA packages.
- ``gpu`` (``make setup-gpu``, ``--gpu``): torch is the pinned version *built for CUDA* (PyPI's
  Linux wheel ``2.13.0``, whose metadata requires the CUDA packages, or PyTorch's ``2.13.0+cuNNN``),
  and every CUDA package that torch's metadata requires is installed at the version it requires.
  A CPU build (``+cpu``) or another torch version is refused.

Both refuse torchvision and torchaudio (no CPU build exists here; their presence means pip replaced
torch). Exit status 1 with an explanation when anything is wrong. The check reads package metadata
only (it never imports torch), so it is fast and works on a machine without a GPU driver.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .validate import check_choice

__all__ = ["PINNED_TORCH", "MODES", "Environment", "is_cuda_package", "torch_build", "problems", "main"]

#: The torch version of requirements.txt (tests/unit/test_environment.py checks that they agree).
PINNED_TORCH = "2.13.0"
#: The environments the Makefile builds: ``make setup`` (cpu) and ``make setup-gpu`` (gpu).
MODES = ("cpu", "gpu")
#: Distributions that only a CUDA build of torch brings (cuda-toolkit pulls the nvidia-* ones;
#: triton is the GPU kernel compiler torch's Linux wheel requires beside them).
_CUDA_PREFIXES = ("nvidia-", "cuda-")
_CUDA_NAMES = ("triton",)
_CUDA_LOCAL = re.compile(r"cu\d+")
_FORBIDDEN = ("torchvision", "torchaudio")


def is_cuda_package(name: str) -> bool:
    """Whether distribution ``name`` is one of CUDA's (``nvidia-*``, ``cuda-*``: cuda-toolkit,
    cuda-bindings, cuda-pathfinder; and triton)."""
    name = canonicalize_name(name)
    return name.startswith(_CUDA_PREFIXES) or name in _CUDA_NAMES


@dataclass(frozen=True)
class Environment:
    """What the check looks at: the installed distributions and torch's declared requirements.

    ``packages`` maps each distribution's canonical name to its version; ``torch_requires`` is
    torch's ``Requires-Dist`` lines (markers included, evaluated for this machine);
    ``marker_env`` overrides marker variables (e.g. ``{"platform_system": "Linux"}``) so a test
    can describe another machine."""

    packages: Mapping[str, str]
    torch_requires: Sequence[str] = ()
    marker_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def current(cls) -> Environment:
        """The environment of this interpreter (``importlib.metadata``)."""
        packages: dict[str, str] = {}
        for dist in metadata.distributions():
            name = dist.metadata["Name"]
            if name:
                packages[canonicalize_name(name)] = dist.version
        try:
            requires = tuple(metadata.requires("torch") or ())
        except metadata.PackageNotFoundError:
            requires = ()
        return cls(packages, requires)

    def cuda_requirements(self) -> list[Requirement]:
        """The CUDA packages (:func:`is_cuda_package`) torch requires on this machine (markers
        evaluated, torch's own extras not requested)."""
        found = []
        for line in self.torch_requires:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": "", **self.marker_env}):
                continue
            if is_cuda_package(requirement.name):
                found.append(requirement)
        return found


def torch_build(version: str, env: Environment) -> str:
    """``"cuda"`` when torch ``version`` is a CUDA build (a ``+cuNNN`` local version, or a plain
    version whose metadata requires CUDA packages, as PyPI's Linux wheel does), else ``"cpu"``."""
    local = Version(version).local or ""
    if _CUDA_LOCAL.fullmatch(local):
        return "cuda"
    if not local and env.cuda_requirements():
        return "cuda"
    return "cpu"


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def problems(mode: str = "cpu", env: Environment | None = None) -> list[str]:
    """What is wrong with the installed packages for ``mode`` (one of :data:`MODES`; empty when
    all is well). ``env`` defaults to this interpreter's (:meth:`Environment.current`)."""
    check_choice("environment mode", mode, MODES)
    env = Environment.current() if env is None else env
    setup = "make setup-gpu" if mode == "gpu" else "make setup"
    torch_version = env.packages.get("torch")
    if torch_version is None:
        return [f"torch is not installed: run `{setup}`"]
    found: list[str] = []
    try:
        parsed = Version(torch_version)
    except InvalidVersion:
        return [f"torch has an unreadable version {torch_version!r}: recreate the environment with `{setup}`"]
    build = torch_build(torch_version, env)
    if parsed.public != PINNED_TORCH:
        found.append(f"torch {torch_version} is installed, the project pins {PINNED_TORCH} ({'CUDA' if mode == 'gpu' else 'CPU'} build)")
    elif mode == "gpu" and build != "cuda":
        found.append(
            f"torch {torch_version} is a CPU build: `make setup-gpu` installs the CUDA build of {PINNED_TORCH} "
            "(PyPI's Linux wheel; see docs/gpu.md)"
        )
    for name in _FORBIDDEN:
        if name in env.packages:
            found.append(f"{name} {env.packages[name]} is installed: nothing may depend on it (see docs/design.md)")
    cuda = sorted(name for name in env.packages if is_cuda_package(name))
    if mode == "cpu" and (cuda or build == "cuda"):
        what = f"CUDA packages were pulled in: {_listed(cuda)}" if cuda else f"torch {torch_version} is a CUDA build"
        found.append(f"{what}; this is the CPU environment (for a GPU one: `make setup-gpu`, docs/gpu.md)")
    if mode == "gpu" and build == "cuda":
        for requirement in env.cuda_requirements():
            name = canonicalize_name(requirement.name)
            have = env.packages.get(name)
            if have is None:
                found.append(f"torch {torch_version} requires {requirement}, which is not installed")
            elif not requirement.specifier.contains(have, prereleases=True):
                found.append(f"torch {torch_version} requires {requirement}, but {name} {have} is installed")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsemm_utils.envcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="check the GPU environment of `make setup-gpu` (a CUDA build of the pinned torch)")
    args = parser.parse_args(argv)
    mode = "gpu" if args.gpu else "cpu"
    env = Environment.current()
    issues = problems(mode, env)
    if issues:
        print(f"environment check ({mode}) failed:", *issues, sep="\n  - ", file=sys.stderr)
        setup = "make setup-gpu" if mode == "gpu" else "make setup"
        print(f"Recreate the environment: rm -rf .venv && {setup}", file=sys.stderr)
        return 1
    build = torch_build(env.packages["torch"], env)
    cuda = sum(is_cuda_package(name) for name in env.packages)
    detail = f"{build} build, {cuda} CUDA packages" if mode == "gpu" else "CPU-safe pins"
    print(f"environment ok ({mode}): torch {env.packages['torch']} ({detail}), python {sys.version.split()[0]}, {Path(sys.prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
