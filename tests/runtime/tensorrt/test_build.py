"""`sdtrt build` logic against the TensorRT fake: profiles, naming, fingerprints, timing cache, refusals."""

import json

import pytest

from sdtrt.cli import main
from sdtrt.config import from_dict, to_dict
from sdtrt.errors import UsageError
from sdtrt.manifest import Manifest
from sdtrt.runtime.tensorrt.build import BuildConfig, BuildError, build_engines, engine_file, profile_shapes
from tests.runtime.tensorrt import fakes

SMALL = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256))


def test_build_config_round_trips_through_json():
    cfg = BuildConfig(batch=(1, 2, 4), size=(256, 512, 768), static=(512, 384), timing_cache="x", workspace_gb=2.5, opt_level=5)
    assert from_dict(BuildConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_dynamic_profile_follows_batch_and_size_ranges(tiny_fp16):
    manifest = tiny_fp16[1]
    cfg = BuildConfig(batch=(1, 2, 4), size=(64, 256, 512))
    unet = profile_shapes(manifest.components["unet"], cfg, manifest.model)
    assert unet["latents"] == ((1, 4, 8, 8), (2, 4, 32, 32), (4, 4, 64, 64))
    # B rows without guidance up to 2B with it; the optimum is the guided batch
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (4, 77, 32), (8, 77, 32))
    assert "timestep" not in unet and "guidance_scale" not in unet  # static inputs need no profile
    text = profile_shapes(manifest.components["text_encoder"], cfg, manifest.model)
    assert text["input_ids"] == ((1, 77), (4, 77), (8, 77))
    update = profile_shapes(manifest.components["sampler_update"], cfg, manifest.model)
    assert update["state_0"] == unet["latents"] and "coefs" not in update


def test_static_profile_pins_every_dimension(tiny_fp16):
    manifest = tiny_fp16[1]
    cfg = BuildConfig(batch=(1, 2, 4), size=(64, 256, 512), static=(320, 192))
    vae = profile_shapes(manifest.components["vae_decoder"], cfg, manifest.model)
    assert vae["latents"] == ((2, 4, 24, 40),) * 3
    unet = profile_shapes(manifest.components["unet"], cfg, manifest.model)
    assert unet["encoder_hidden_states"] == ((4, 77, 32),) * 3


def test_engine_names_carry_tensorrt_version_and_compute_capability():
    assert engine_file("unet", "10.16.1.11", "90") == "unet.trt10.16.1.11.sm90.plan"


def test_build_writes_strongly_typed_engines_and_records_them(fake_gpu, fp16_folder):
    trt, cudart = fake_gpu
    manifest = build_engines(fp16_folder, SMALL, log=lambda s: None)
    assert Manifest.load(fp16_folder) == manifest
    record = manifest.tensorrt
    assert (record.version, record.gpu, record.compute_capability) == ("10.16.1.11", "NVIDIA H100 80GB HBM3", "90")
    assert set(record.engines) == {"text_encoder", "unet", "vae_decoder", "sampler_update"}
    for name, engine in record.engines.items():
        assert engine.file == f"{name}.trt10.16.1.11.sm90.plan" and (fp16_folder / engine.file).is_file()
    assert all(plan["strongly_typed"] for plan in fakes.Builder.built)
    assert record.engines["unet"].profile["latents"] == ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 32, 32))
    assert not list(fp16_folder.glob(".*tmp"))


def test_timing_cache_is_kept_in_the_folder_and_reused(fake_gpu, fp16_folder):
    build_engines(fp16_folder, SMALL, log=lambda s: None)
    first = json.loads((fp16_folder / "timing.cache").read_bytes())
    assert len(first) == 4
    logs = []
    build_engines(fp16_folder, SMALL, log=logs.append)
    assert "reused" in logs[0]
    assert json.loads((fp16_folder / "timing.cache").read_bytes()) == first * 2  # loaded, then extended


def test_builder_options_reach_the_config(fake_gpu, fp16_folder):
    build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), workspace_gb=1.5, opt_level=5),
                  log=lambda s: None)
    assert {p["opt_level"] for p in fakes.Builder.built} == {5}
    assert {p["workspace"] for p in fakes.Builder.built} == {int(1.5 * 2**30)}


@pytest.mark.parametrize("cfg, needle", [
    (BuildConfig(size=(256, 512, 1024)), "outside the exported range 64..512"),
    (BuildConfig(batch=(1, 1, 8), size=(64, 128, 256)), "batch 1..8 is outside"),
    (BuildConfig(batch=(2, 1, 4), size=(64, 128, 256)), "MIN <= OPT <= MAX"),
    (BuildConfig(size=(64, 100, 256)), "multiples of 8"),
    (BuildConfig(size=(64, 128, 256), opt_level=9), "--opt-level"),
])
def test_bad_build_options(fake_gpu, fp16_folder, cfg, needle):
    with pytest.raises(UsageError, match=needle):
        build_engines(fp16_folder, cfg, log=lambda s: None)


def test_unparsable_graph_and_failed_build_are_reported(fake_gpu, fp16_folder):
    (fp16_folder / "vae_decoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(BuildError, match="cannot parse vae_decoder.onnx"):
        build_engines(fp16_folder, SMALL, log=lambda s: None)
    fakes.Builder.fail_on = {"text_encoder.onnx"}
    with pytest.raises(BuildError, match="failed to build text_encoder.onnx"):
        build_engines(fp16_folder, SMALL, log=lambda s: None)


def test_cli_build_without_tensorrt_names_the_package(tiny_fp16, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code = main(["build", str(tiny_fp16[0]), "--size", "64:128:256", "--batch", "1:1:2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("sdtrt build: error: TensorRT is not available (pip install tensorrt-cu12")


def test_cli_build_with_the_fake(fake_gpu, fp16_folder, capsys):
    assert main(["build", str(fp16_folder), "--size", "64:128:256", "--batch", "1:1:2", "--opt-level", "4"]) == 0
    assert "unet.trt10.16.1.11.sm90.plan" in capsys.readouterr().err
