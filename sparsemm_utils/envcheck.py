"""Checks that the environment is the pinned, CPU-safe one (run by ``make`` after installing).

Two failure modes cost hours here: a torch other than the pinned 2.13.0 (an unpinned torch pulls
several GB of CUDA packages) and torchvision (no CPU build exists here; its presence means pip
replaced torch). Exit status 1 with an explanation when either is found.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

PINNED_TORCH = "2.13.0"


def problems() -> list[str]:
    """What is wrong with the installed packages (empty when all is well)."""
    found: list[str] = []
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ["torch is not installed: run `make setup`"]
    if torch_version.split("+")[0] != PINNED_TORCH:
        found.append(f"torch {torch_version} is installed, the project pins {PINNED_TORCH} (CPU build)")
    for name in ("torchvision", "torchaudio"):
        try:
            found.append(f"{name} {metadata.version(name)} is installed: nothing may depend on it (see docs/design.md)")
        except metadata.PackageNotFoundError:
            pass
    cuda = sorted(
        d.metadata["Name"] for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")
    )
    if cuda:
        found.append(f"CUDA packages were pulled in: {', '.join(cuda[:5])}{' ...' if len(cuda) > 5 else ''}")
    return found


def main() -> int:
    issues = problems()
    if issues:
        print("environment check failed:", *issues, sep="\n  - ", file=sys.stderr)
        print("Recreate the environment: rm -rf .venv && make setup", file=sys.stderr)
        return 1
    print(f"environment ok: torch {metadata.version('torch')} (CPU-safe pins), python {sys.version.split()[0]}, {Path(sys.prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
