"""Step manifests: what a step was given, what it read, what it wrote (docs/design.md).

``runs/<run>/<NN_step>/manifest.json`` records the step's parameters, its inputs and outputs
(path + sha256), package versions, the git commit, the device and the timings. The pipeline skips a
step whose parameters and input hashes match its manifest, so the hashes here decide reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "FileRecord",
    "Manifest",
    "MANIFEST_NAME",
    "sha256_file",
    "hash_tree",
    "package_versions",
    "git_commit",
    "device_description",
    "TRACKED_PACKAGES",
]

MANIFEST_NAME = "manifest.json"

#: Distributions whose versions every manifest records.
TRACKED_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "numpy",
    "pandas",
    "pillow",
    "papermill",
    "nbconvert",
    "seaborn",
    "matplotlib",
    "sparsemm-utils",
)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """One file of a step's inputs or outputs: ``path`` as written in the manifest (relative to
    the run folder for run artifacts, ``repo:``-prefixed for repository files), its sha256 and
    size in bytes."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, file: Path, label: str) -> "FileRecord":
        return cls(path=label, sha256=sha256_file(file), bytes=file.stat().st_size)


def hash_tree(root: Path, *, base: Path, prefix: str = "", exclude: frozenset[str] = frozenset()) -> list[FileRecord]:
    """Records for every regular file under ``root`` (a file or a folder), sorted by path.

    Paths are written relative to ``base`` with ``prefix`` in front; names in ``exclude`` (relative
    to ``base``) are left out."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    records = []
    for file in files:
        rel = file.relative_to(base).as_posix()
        if rel in exclude or "/.ipynb_checkpoints/" in f"/{rel}":
            continue
        records.append(FileRecord.of(file, prefix + rel))
    return records


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` ("not installed" when absent), plus Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(repo: Path) -> str:
    """``<sha>`` of HEAD, with ``+dirty`` when tracked files differ from it; ``unknown`` outside a
    git checkout (e.g. an exported tarball)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def device_description() -> str:
    """``cuda:<name>`` when a GPU is visible to torch, else ``cpu (<processor>, <n> cores)``."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


@dataclass
class Manifest:
    """The content of ``manifest.json`` (field names are part of the artifact contract)."""

    step: str
    title: str
    status: str  # "ok" | "failed" | "running" (a run in progress, or one that was killed)
    params: dict[str, Any]
    inputs: list[FileRecord]
    outputs: list[FileRecord] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)
    git_commit: str = "unknown"
    device: str = "unknown"
    platform: str = field(default_factory=lambda: f"{platform.system()} {platform.release()} / {sys.implementation.name}")
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    notebook: str = ""
    html: str = ""
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, folder: Path) -> Path:
        """Write ``manifest.json`` atomically (a temporary file renamed over it): a reader, or a run
        killed mid-write, never sees half a manifest."""
        path = folder / MANIFEST_NAME
        tmp = folder / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        """The manifest in ``folder``, or None when there is none or it cannot be parsed."""
        path = folder / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["inputs"] = [FileRecord(**r) for r in raw.get("inputs", [])]
            raw["outputs"] = [FileRecord(**r) for r in raw.get("outputs", [])]
            return cls(**raw)
        except (ValueError, TypeError, KeyError):
            return None
