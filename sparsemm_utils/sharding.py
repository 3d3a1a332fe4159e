"""Sharded runs: one process (or GPU) of several takes every n-th sample (docs/design.md, "Sharded runs").

A :class:`Shard` ``i/n`` owns the samples whose position ``k`` in the step's own sample order has
``k % n == i``: the order the single-process run uses, so the union of the shards is that run's
sample set and a merge can lay the results out in that run's order. Each shard writes its partial
results into its own folder, ``<step folder>/shards/<i>-of-<n>/`` (:func:`shard_folder`), and
resumes there; the single-process run of the step merges the folders (:func:`shard_folders` finds
them) after checking that every sample is there exactly once and that every shard ran with the
same settings. Launchers (``accelerate launch``, ``torchrun``) say which shard a process is
through ``RANK`` and ``WORLD_SIZE`` (:meth:`Shard.from_env`).

Step 05's sweep keeps its shards' answers in its own ledgered files
(:func:`sparsemm_utils.evaluation.merge_shards`); other steps keep one pickled item per sample
position (:func:`save_item`: ``<position>.pkl``, written atomically, so a shard resumes at the
first position it lacks) beside the settings that shaped the items (:func:`open_shard`:
``shard.json``), and :func:`merge_items` returns all items in position order.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .validate import check_int

__all__ = [
    "SHARDS_DIR",
    "MERGED_DIR",
    "SETTINGS_FILE",
    "ShardError",
    "Shard",
    "shard_folder",
    "shard_folders",
    "open_shard",
    "save_item",
    "load_item",
    "merge_items",
    "retire_shards",
]

#: Under a step's folder: one folder per shard, ``<i>-of-<n>``.
SHARDS_DIR = "shards"
#: Where the shard folders go once merged (the merge keeps them, for the record).
MERGED_DIR = "shards.merged"
#: In a shard folder of items: the shard and the settings its items were made with.
SETTINGS_FILE = "shard.json"
_NAME = re.compile(r"(\d+)-of-(\d+)")


class ShardError(ValueError):
    """A shard specification is malformed, or a set of shard folders cannot be merged (a shard
    missing or incomplete, a sample twice, other settings): the message names what and what to run."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count): owns sample positions ``k % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        check_int("shard count", self.count, 1, error=ShardError)
        check_int("shard index", self.index, 0, self.count - 1, error=ShardError)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (e.g. ``"0/2"``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise ShardError(f"a shard is 'i/n' with 0 <= i < n (e.g. 0/2), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard:
        """The shard of this process from ``RANK`` and ``WORLD_SIZE``, which ``accelerate launch``
        and ``torchrun`` set for each process they start."""
        environ = os.environ if environ is None else environ
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
        if missing:
            raise ShardError(
                f"--shard env reads RANK and WORLD_SIZE, and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start the processes "
                "with `accelerate launch` or `torchrun`, or give the shard as --shard i/n"
            )
        try:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        except ValueError:
            raise ShardError(f"RANK={environ['RANK']!r} and WORLD_SIZE={environ['WORLD_SIZE']!r} must be integers") from None

    def owns(self, position: int) -> bool:
        """Whether the sample at ``position`` of the step's sample order is this shard's."""
        return position % self.count == self.index

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_folder(step_folder: str | Path, shard: Shard) -> Path:
    """``<step folder>/shards/<i>-of-<n>``: where ``shard`` writes its partial results."""
    return Path(step_folder) / SHARDS_DIR / shard.name


def shard_folders(step_folder: str | Path) -> dict[Shard, Path]:
    """The shard folders under ``step_folder`` to merge ({} when there are none), checked to be
    one complete set ``0..n-1`` of one ``n``; :class:`ShardError` otherwise."""
    root = Path(step_folder) / SHARDS_DIR
    if not root.is_dir():
        return {}
    found: dict[Shard, Path] = {}
    for path in sorted(root.iterdir()):
        match = _NAME.fullmatch(path.name)
        if not path.is_dir() or match is None:
            raise ShardError(f"{path} is not a shard folder (<i>-of-<n>): remove it from {root}")
        found[Shard(int(match.group(1)), int(match.group(2)))] = path
    counts = sorted({shard.count for shard in found})
    if len(counts) > 1:
        raise ShardError(f"{root} holds shards of {counts} processes; keep one set (move the others away) and rerun")
    if found:
        count = counts[0]
        absent = [i for i in range(count) if Shard(i, count) not in found]
        if absent:
            raise ShardError(
                f"{root} lacks shard(s) {', '.join(f'{i}/{count}' for i in absent)} of {count}: run them "
                f"(`python -m sparsemm_utils.pipeline ... --shard {absent[0]}/{count}`) before the merge"
            )
    return dict(sorted(found.items(), key=lambda item: item[0].index))


def open_shard(parent: str | Path, shard: Shard, settings: Mapping[str, Any]) -> Path:
    """The folder of ``shard`` under ``parent`` (created), whose items are made with ``settings``
    (JSON-able). A folder left by a run with other settings is refused, not mixed in."""
    folder = shard_folder(parent, shard)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"shard": str(shard), "settings": json.loads(json.dumps(dict(settings), default=str))}
    path = folder / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != record:
            raise ShardError(
                f"{folder} holds shard {old.get('shard')} made with settings {old.get('settings')}; this run is shard {shard} "
                f"with {record['settings']}: move {folder.parent} away (or delete it) and rerun the shards"
            )
    else:
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def save_item(folder: str | Path, position: int, value: Any) -> Path:
    """Pickle ``value`` as ``<folder>/<position>.pkl``, atomically (a kill leaves it whole or absent)."""
    path = Path(folder) / f"{position}.pkl"
    partial = path.with_suffix(".pkl.partial")
    with open(partial, "wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)
    return path


def load_item(folder: str | Path, position: int) -> Any:
    """The item at ``position`` of a shard folder, or None when it has not been made yet."""
    path = Path(folder) / f"{position}.pkl"
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return pickle.load(handle)  # written by save_item of this project's own run


def merge_items(parent: str | Path, count: int, settings: Mapping[str, Any]) -> list[Any] | None:
    """The ``count`` items of the shard folders under ``parent`` in position order (None when
    there are no shard folders); then the folders move to ``<parent>/shards.merged/``.

    :class:`ShardError` when the folders are not one complete set, a folder was made with other
    ``settings`` or holds an item of a position it does not own, or a position is missing."""
    folders = shard_folders(parent)
    if not folders:
        return None
    owner: dict[int, Shard] = {}
    for shard, folder in folders.items():
        if not (folder / SETTINGS_FILE).is_file():
            raise ShardError(f"shard {shard} ({folder}) has no {SETTINGS_FILE}: it never started; rerun it (`--shard {shard}`)")
        open_shard(parent, shard, settings)  # refuses other settings
        for path in folder.glob("*.pkl"):
            if not path.stem.isdigit():
                raise ShardError(f"{path} is not an item of a shard (<position>.pkl): remove it")
            position = int(path.stem)
            if not shard.owns(position) or position >= count:
                raise ShardError(f"{path}: position {position} is not one of shard {shard}'s (of {count} samples); the shards overlap")
            owner[position] = shard
    missing = [k for k in range(count) if k not in owner]
    if missing:
        lacking = sorted({str(Shard(k % len(folders), len(folders))) for k in missing})
        raise ShardError(
            f"the shards are incomplete: {len(missing)} of {count} samples missing (shard(s) {', '.join(lacking)}); rerun each "
            "(`--shard i/n`: it resumes), then merge"
        )
    items = [load_item(folders[owner[k]], k) for k in range(count)]
    retire_shards(parent)
    return items


def retire_shards(parent: str | Path) -> Path:
    """After a merge: ``<parent>/shards`` becomes ``<parent>/shards.merged`` (replacing an older
    one), so a later run of the step starts afresh and the merged shards stay on record."""
    merged = Path(parent) / MERGED_DIR
    if merged.exists():
        shutil.rmtree(merged)
    (Path(parent) / SHARDS_DIR).rename(merged)
    return merged
