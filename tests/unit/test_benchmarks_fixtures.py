"""The committed fixtures have the hub datasets' layout and schema, and rebuild identically."""

from __future__ import annotations

import fnmatch

import datasets
import pytest
import yaml

from sparsemm_utils.benchmark_fixtures import HUB_FEATURES, build_fixture, fixture_dir
from sparsemm_utils.benchmarks import BENCHMARKS

NAMES = sorted(HUB_FEATURES)


def test_every_hub_benchmark_has_a_fixture():
    assert set(NAMES) == {n for n, s in BENCHMARKS.items() if s.hub_id is not None}


def _card(name: str) -> dict:
    text = (fixture_dir(name) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_has_the_hub_layout_and_schema(name):
    spec = BENCHMARKS[name]
    card = _card(name)
    configs = {c["config_name"]: c["data_files"] for c in card["configs"]}
    expected_configs = [spec.config] + ([spec.images_config] if spec.images_config else [])
    assert list(configs) == [c or "default" for c in expected_configs]
    for config, pattern in zip(expected_configs, spec.data_files, strict=True):
        assert configs[config or "default"] == [{"split": spec.split, "path": pattern}]
        files = [p.relative_to(fixture_dir(name)).as_posix() for p in fixture_dir(name).rglob("*.parquet")]
        assert any(fnmatch.fnmatch(f, pattern) for f in files), f"no shard matches {pattern}: {files}"
        ds = datasets.load_dataset(str(fixture_dir(name)), name=config, split=spec.split)
        assert ds.features == HUB_FEATURES[name][config]
    # the main config's columns are the spec's, in the hub's order
    assert tuple(HUB_FEATURES[name][spec.config]) == spec.columns


@pytest.mark.parametrize("name", ["docvqa", "gqa"])
def test_fixture_rebuilds_identically(tmp_path, name):
    built = build_fixture(name, tmp_path / name)
    spec = BENCHMARKS[name]
    for config in [spec.config] + ([spec.images_config] if spec.images_config else []):
        ours = datasets.load_dataset(str(built), name=config, split=spec.split)
        shipped = datasets.load_dataset(str(fixture_dir(name)), name=config, split=spec.split)
        cast = {c: datasets.Image(decode=False) for c in ours.column_names if c == "image"}
        for column, feature in cast.items():
            ours, shipped = ours.cast_column(column, feature), shipped.cast_column(column, feature)
        assert ours.to_list() == shipped.to_list()
