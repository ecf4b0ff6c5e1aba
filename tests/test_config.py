"""Every frozen config round-trips through JSON."""

import dataclasses
import json

import pytest

from sdtrt.config import from_dict, to_dict
from sdtrt.errors import ManifestError
from sdtrt.export import ExportConfig
from sdtrt.manifest import Manifest


def test_export_config_round_trips_through_json():
    config = ExportConfig(model="tiny", out="x", precision="fp32", batch_min=2, batch_max=3, size_min=64, size_max=128)
    assert from_dict(ExportConfig, json.loads(json.dumps(to_dict(config)))) == config


def test_bench_config_round_trips_through_json():
    from sdtrt.benchmarks.harness import BenchConfig

    config = BenchConfig(engine_dir="e", sizes=((512, 512), (768, 512)), scheduler="euler_a", runs=3, threads=2)
    assert from_dict(BenchConfig, json.loads(json.dumps(to_dict(config)))) == config


def test_serve_configs_round_trip_through_json():
    from sdtrt.serve import RayConfig, ServeConfig

    for config in (ServeConfig(folder="e", api_auth="a:b", cors_origins=("https://x.example",), batch_window_ms=0),
                   RayConfig(min_replicas=1, max_replicas=4, num_gpus=0.5, address="ray://head:10001")):
        assert from_dict(type(config), json.loads(json.dumps(to_dict(config)))) == config


def test_manifest_round_trips_through_json(tiny_export):
    _, manifest = tiny_export
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert isinstance(again.components["unet"].inputs, tuple)


def test_manifest_with_wrong_schema_version_is_refused(tiny_fp32):
    _, manifest = tiny_fp32
    data = json.loads(manifest.to_json())
    data["schema_version"] = 99
    with pytest.raises(ManifestError, match="schema version 99"):
        Manifest.from_json(json.dumps(data))


def test_manifest_with_a_wrong_field_type_is_refused(tiny_fp32):
    _, manifest = tiny_fp32
    data = json.loads(manifest.to_json())
    data["ranges"]["batch_min"] = "one"
    with pytest.raises(ManifestError, match="batch_min"):
        Manifest.from_json(json.dumps(data))


def test_corrupt_manifest_is_refused():
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{not json")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExportConfig(model="tiny", out="x").precision = "fp32"
