"""`sdtrt build` logic against the TensorRT fake: profiles, naming, fingerprints, timing cache, verification of
every engine against ONNX Runtime before it is installed, refusals."""

import json
import re

import pytest

from sdtrt.cli import main
from sdtrt.config import from_dict, to_dict
from sdtrt.errors import UsageError
from sdtrt.manifest import Manifest
from sdtrt.runtime.tensorrt.build import BuildConfig, BuildError, build_engines, engine_file, profile_shapes
from tests.runtime.tensorrt import fakes

SMALL = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False)
VERIFIED = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256))


def test_build_config_round_trips_through_json():
    cfg = BuildConfig(batch=(1, 2, 4), size=(256, 512, 768), static=(512, 384), timing_cache="x", workspace_gb=2.5, opt_level=5,
                      verify=False)
    assert from_dict(BuildConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_dynamic_profile_follows_batch_and_size_ranges(tiny_fp16):
    manifest = tiny_fp16[1]
    cfg = BuildConfig(batch=(1, 2, 4), size=(64, 256, 512))
    unet = profile_shapes(manifest.components["unet"], cfg, manifest.model)
    assert unet["latents"] == ((1, 4, 8, 8), (2, 4, 32, 32), (4, 4, 64, 64))
    # B rows without guidance up to 2B with it, one to three 77-token chunks; the optimum: guided, one chunk
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (4, 77, 32), (8, 231, 32))
    assert "timestep" not in unet and "guidance_scale" not in unet  # static inputs need no profile
    text = profile_shapes(manifest.components["text_encoder"], cfg, manifest.model)
    assert text["input_ids"] == ((1, 77), (4, 77), (24, 77))  # every chunk of every prompt, one call
    update = profile_shapes(manifest.components["sampler_update"], cfg, manifest.model)
    assert update["state_0"] == unet["latents"] and "coefs" not in update


def test_static_profile_pins_every_dimension(tiny_fp16):
    manifest = tiny_fp16[1]
    cfg = BuildConfig(batch=(1, 2, 4), size=(64, 256, 512), static=(320, 192))
    vae = profile_shapes(manifest.components["vae_decoder"], cfg, manifest.model)
    assert vae["latents"] == ((2, 4, 24, 40),) * 3
    unet = profile_shapes(manifest.components["unet"], cfg, manifest.model)
    assert unet["encoder_hidden_states"] == ((4, 77, 32), (4, 77, 32), (4, 231, 32))  # long prompts still fit


def test_engine_names_carry_tensorrt_version_and_compute_capability():
    assert engine_file("unet", "10.16.1.11", "90", "1a2b3c4d5e6f") == "unet.trt10.16.1.11.sm90.1a2b3c4d.plan"


def test_build_writes_strongly_typed_engines_and_records_them(fake_gpu, fp16_folder):
    trt, cudart = fake_gpu
    manifest = build_engines(fp16_folder, SMALL, log=lambda s: None)
    assert Manifest.load(fp16_folder) == manifest
    record = manifest.tensorrt
    assert (record.version, record.gpu, record.compute_capability) == ("10.16.1.11", "NVIDIA H100 80GB HBM3", "90")
    assert set(record.engines) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update"}
    for name, engine in record.engines.items():
        assert engine.file == f"{name}.trt10.16.1.11.sm90.{engine.sha256[:8]}.plan"
        assert (fp16_folder / engine.file).is_file()
    assert all(plan["strongly_typed"] for plan in fakes.Builder.built)
    assert record.engines["unet"].profile["latents"] == ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 32, 32))
    assert not list(fp16_folder.glob(".*tmp"))


def test_timing_cache_is_keyed_by_tensorrt_version_and_gpu_and_reused(fake_gpu, fp16_folder):
    build_engines(fp16_folder, SMALL, log=lambda s: None)
    path = fp16_folder / "timing.trt10.16.1.11.sm90.cache"
    first = fakes.IBuilderConfig().create_timing_cache(path.read_bytes())
    assert first.header == {"trt": "10.16.1.11", "cc": "90"} and len(first.entries) == 5
    logs = []
    build_engines(fp16_folder, SMALL, log=logs.append)
    assert "reused" in logs[0]
    again = fakes.IBuilderConfig().create_timing_cache(path.read_bytes())
    assert again.entries == first.entries * 2  # loaded, then extended
    assert all(plan["cached"] for plan in fakes.Builder.built)


def test_defect_a_timing_cache_from_another_gpu_is_replaced_with_a_warning(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    cache = fp16_folder / "shared.cache"
    build_engines(fp16_folder, BuildConfig(**{**SMALL.__dict__, "timing_cache": str(cache)}), log=lambda s: None)
    cudart.prop = cudart.cudaDeviceProp(b"NVIDIA A100-SXM4-80GB", 8, 0, 80 * 2**30)  # the same path on another GPU
    logs = []
    manifest = build_engines(fp16_folder, BuildConfig(**{**SMALL.__dict__, "timing_cache": str(cache)}), log=logs.append)
    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1 and "made for another GPU or TensorRT version" in warnings[0]
    assert manifest.tensorrt.compute_capability == "80"
    assert fakes.IBuilderConfig().create_timing_cache(cache.read_bytes()).header == {"trt": "10.16.1.11", "cc": "80"}
    assert all(plan["cached"] for plan in fakes.Builder.built[-4:])  # a fresh cache, not none


def test_a_corrupt_timing_cache_is_replaced_with_a_warning(fake_gpu, fp16_folder):
    (fp16_folder / "timing.trt10.16.1.11.sm90.cache").write_bytes(b"\x00not a cache")
    logs = []
    build_engines(fp16_folder, SMALL, log=logs.append)
    assert sum("or is corrupt; starting a fresh one" in line for line in logs) == 1


def test_defect_no_timing_cache_from_tensorrt_is_a_warning_not_a_crash(fake_gpu, fp16_folder, monkeypatch):
    monkeypatch.setattr(fakes.IBuilderConfig, "get_timing_cache", lambda self: None)
    logs = []
    manifest = build_engines(fp16_folder, SMALL, log=logs.append)
    assert sum("TensorRT returned no timing cache" in line for line in logs) == 1
    assert set(manifest.tensorrt.engines) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update"}


def test_builder_options_reach_the_config(fake_gpu, fp16_folder):
    build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), workspace_gb=1.5, opt_level=5),
                  log=lambda s: None)
    assert {p["opt_level"] for p in fakes.Builder.built} == {5}
    assert {p["workspace"] for p in fakes.Builder.built} == {int(1.5 * 2**30)}


@pytest.mark.parametrize("cfg, needle", [
    (BuildConfig(size=(256, 512, 1024)), "outside the exported range 64..512"),
    (BuildConfig(batch=(1, 1, 8), size=(64, 128, 256)), "--batch 1:1:8 is outside"),
    (BuildConfig(batch=(2, 1, 4), size=(64, 128, 256)), "MIN <= OPT <= MAX"),
    (BuildConfig(size=(64, 100, 256)), "multiples of 8"),
    (BuildConfig(size=(64, 128, 256), opt_level=9), "--opt-level"),
])
def test_bad_build_options(fake_gpu, fp16_folder, cfg, needle):
    with pytest.raises(UsageError, match=needle):
        build_engines(fp16_folder, cfg, log=lambda s: None)


def test_profiles_default_to_the_exports_ranges(tiny_fp16):
    manifest = tiny_fp16[1]  # batch 1..4, size 64..512, default size 256
    cfg = BuildConfig().resolved(manifest)
    assert (cfg.batch, cfg.size) == ((1, 1, 4), (128, 256, 384))  # sizes: 0.5 .. 1.5 x the default size
    BuildConfig().check(manifest)
    assert BuildConfig(size=(64, 128, 256)).resolved(manifest).batch == (1, 1, 4)


@pytest.mark.parametrize("cfg, needle", [
    (BuildConfig(batch=(0, 1, 4)), "--batch MIN must be at least 1, got 0"),
    (BuildConfig(size=(0, 64, 128)), "--size MIN must be at least 8, got 0"),
    (BuildConfig(size=(256, 512, 1024)), "--size 256:512:1024 is outside the exported range 64..512: pass --size MIN:"
                                         "OPT:MAX within it (default 128:256:384), or re-export with a wider --size"),
    (BuildConfig(batch=(1, 1, 8)), "--batch 1:1:8 is outside the exported range 1..4: pass --batch MIN:OPT:MAX within "
                                   "it (default 1:1:4), or re-export with a wider --batch"),
    (BuildConfig(static=(1024, 64)), "--static 1024x64 is outside the exported range 64..512: pass --static WxH within "
                                     "it, or re-export with a wider --size"),
])
def test_profile_errors_say_what_fits(tiny_fp16, cfg, needle):
    with pytest.raises(UsageError) as info:
        cfg.check(tiny_fp16[1])
    assert str(info.value) == needle


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
    assert err.startswith("sdtrt build: error: TensorRT is not available: pip install 'sdtrt[tensorrt-cu12]'")


def test_cli_build_with_the_fake_verifies_and_prints_the_table(fake_gpu, fp16_folder, capsys):
    assert main(["build", str(fp16_folder), "--size", "64:128:256", "--batch", "1:1:2", "--opt-level", "4"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"unet\.trt10\.16\.1\.11\.sm90\.[0-9a-f]{8}\.plan", err)
    assert "max rel err" in err and "end to end:" in err and " NO" not in err


# ---- verification on the target GPU --------------------------------------------------------------------

def test_build_verifies_every_engine_against_onnxruntime_and_records_it(fake_gpu, fp16_folder):
    manifest = build_engines(fp16_folder, VERIFIED, log=lambda s: None)
    checks = manifest.tensorrt.verification
    assert set(checks) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update"}
    for name, results in checks.items():
        labels = [r.shape for r in results]
        assert any(label.startswith("export case") for label in labels), (name, labels)  # the export's own shapes
        assert any(label.startswith("profile") for label in labels), (name, labels)  # and the engine's profile
        # the fake runs the exported ONNX as TensorRT would; the reference (ONNX Runtime's CPU provider) runs it with
        # its attention fused (ort_graphs), which only the U-Net and the VAE have: those may differ by rounding only
        bound = 1e-3 if name in ("unet", "vae_encoder", "vae_decoder") else 0.0
        assert all(r.passed and r.max_rel_error <= bound for r in results), [(r.shape, r.max_rel_error)
                                                                             for r in results]
    e2e = manifest.tensorrt.end_to_end
    assert e2e.passed and e2e.psnr_db >= 60 and (e2e.width, e2e.height, e2e.batch) == (64, 64, 1)
    assert Manifest.load(fp16_folder) == manifest  # and it round-trips through manifest.json


def test_unet_is_checked_with_and_without_guidance(tiny_fp16):
    from sdtrt.runtime.tensorrt.verify import engine_cases

    manifest = tiny_fp16[1]
    cases = engine_cases(manifest.components["unet"], profile_shapes(manifest.components["unet"], SMALL, manifest.model))
    text_rows = {c[1]["encoder_hidden_states"][0] // c[1]["latents"][0] for c in cases}
    assert text_rows == {1, 2}


@pytest.mark.parametrize("wrong", ["unet.onnx", "sampler_update.onnx", "vae_decoder.onnx"])
def test_an_engine_that_computes_something_else_is_not_installed(fake_gpu, fp16_folder, wrong):
    before = (fp16_folder / "manifest.json").read_text()
    fakes.Builder.wrong = {wrong}
    name = wrong.removesuffix(".onnx")
    with pytest.raises(BuildError, match=rf"the {name} engine does not match ONNX Runtime at .*engines not installed"):
        build_engines(fp16_folder, VERIFIED, log=lambda s: None)
    assert not list(fp16_folder.glob("*.plan")) and not list(fp16_folder.glob(".*tmp*"))
    assert (fp16_folder / "manifest.json").read_text() == before


def test_a_failed_rebuild_keeps_the_engines_that_were_there(fake_gpu, fp16_folder):
    first = build_engines(fp16_folder, VERIFIED, log=lambda s: None)
    plans = {p.name: p.read_bytes() for p in fp16_folder.glob("*.plan")}
    fakes.Builder.wrong = {"text_encoder.onnx"}
    with pytest.raises(BuildError):
        build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 64, 128)), log=lambda s: None)
    assert {p.name: p.read_bytes() for p in fp16_folder.glob("*.plan")} == plans
    assert Manifest.load(fp16_folder) == first


def test_cli_build_of_a_wrong_engine_is_one_line_and_exit_2(fake_gpu, fp16_folder, capsys):
    fakes.Builder.wrong = {"text_encoder.onnx"}
    code = main(["build", str(fp16_folder), "--size", "64:128:256", "--batch", "1:1:2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdtrt build: error: the text_encoder engine does not match ONNX Runtime")


def test_no_verify_installs_without_checking_and_says_so(fake_gpu, fp16_folder):
    fakes.Builder.wrong = {"unet.onnx"}
    logs = []
    manifest = build_engines(fp16_folder, SMALL, log=logs.append)
    assert manifest.tensorrt.verification == {} and manifest.tensorrt.end_to_end is None
    assert any("verification skipped (--no-verify)" in line for line in logs)


def test_static_build_is_verified_at_its_shape(fake_gpu, fp16_folder):
    manifest = build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), static=(96, 64)),
                             log=lambda s: None)
    unet = manifest.tensorrt.verification["unet"]
    assert [r.shape for r in unet] == ["profile min latents=1x4x8x12 encoder_hidden_states=2x77x32"]
    e2e = manifest.tensorrt.end_to_end
    assert (e2e.width, e2e.height, e2e.batch) == (96, 64, 1) and e2e.passed


def test_engines_of_an_earlier_tensorrt_version_are_removed_after_a_rebuild(fake_gpu, fp16_folder, monkeypatch):
    build_engines(fp16_folder, SMALL, log=lambda s: None)
    trt, cudart = fake_gpu
    monkeypatch.setattr(trt, "__version__", "11.4.0.106")
    fakes.CURRENT["version"] = "11.4.0.106"
    build_engines(fp16_folder, SMALL, log=lambda s: None)
    names = sorted(p.name for p in fp16_folder.glob("*.plan"))
    assert len(names) == 5 and all(".trt11.4.0.106.sm90." in n for n in names)


def test_controlnets_are_built_verified_and_run_end_to_end(fake_gpu, control_folder):
    """Every ControlNet gets an engine (profiles of the residuals' level dims follow the latents'), checked against
    ONNX Runtime, and the end-to-end check runs the chain of both on the device loop."""
    manifest = build_engines(control_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256)), log=lambda s: None)
    built = manifest.tensorrt
    assert {"controlnet_edges", "controlnet_depth"} <= set(built.engines)
    lo, opt, hi = built.engines["controlnet_edges"].profile["down_residual_5_in"]
    latents = built.engines["controlnet_edges"].profile["latents"]
    assert [s[2] for s in (lo, opt, hi)] == [-(-s[2] // 4) for s in latents]  # ceil(h / 4) at each bound
    assert all(r.passed for r in built.verification["controlnet_depth"])
    assert built.end_to_end.passed


# ---- issue 21: the end-to-end check replays the CUDA graph -------------------------------------------------------

def _graphs_launch_nothing(monkeypatch):
    """A broken replay: the graph launch is accepted and does nothing (the result buffer keeps the last run's)."""
    def launch(self, graphExec, stream):
        if int(graphExec) not in self.execs:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        self.log.append("graph")
        return (self.ok,)

    monkeypatch.setattr(fakes.FakeCudart, "cudaGraphLaunch", launch)


def test_defect_the_build_check_catches_a_cuda_graph_replay_that_does_nothing(fake_gpu, fp16_folder, monkeypatch):
    _graphs_launch_nothing(monkeypatch)
    with pytest.raises(BuildError, match=r"CUDA-graph replay check failed \(1-chunk prompt\): the replayed generation "
                                         r"differs from the first run"):
        build_engines(fp16_folder, VERIFIED, log=lambda s: None)
    assert Manifest.load(fp16_folder).tensorrt is None and not list(fp16_folder.glob("*.plan"))  # nothing installed


def test_defect_doctor_run_replays_the_graph_too(fake_gpu, fp16_folder, monkeypatch):
    from sdtrt.runtime.doctor import run_check

    build_engines(fp16_folder, SMALL, log=lambda s: None)
    assert run_check(fp16_folder).passed
    _graphs_launch_nothing(monkeypatch)
    with pytest.raises(BuildError, match="CUDA-graph replay check failed"):
        run_check(fp16_folder)


def test_the_build_check_covers_two_chunks_and_a_refit_there_and_back(fake_gpu, fp16_folder):
    lines = []
    cfg = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), refittable=True)
    manifest = build_engines(fp16_folder, cfg, log=lines.append)
    assert manifest.tensorrt.end_to_end.passed
    text = "\n".join(lines)
    for case in ("1-chunk prompt", "2-chunk prompt", "refitted LoRA"):
        assert re.search(rf"{case}: PSNR (\d+\.\d|inf) dB against onnxruntime-cpu; replayed CUDA graph agrees", text), case
    assert not list(fp16_folder.glob("verify_lora*"))  # the LoRA lived in a temporary folder


# ---- issue 25: SDXL engines, from the manifest's data; memory known before it runs out ---------------------------

XL = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256))


def test_the_default_size_profile_comes_from_the_models_default_size(tiny_fp16):
    """Half to one and a half times the model's default size, optimal at it, within the export's range: SD 1.x's 512
    gives 256:512:768, SDXL's 1024 gives 512:1024:1536 (no constant of either family in the code)."""
    from dataclasses import replace

    from sdtrt.manifest import Ranges

    manifest = tiny_fp16[1]
    for default, size in ((512, (256, 512, 768)), (1024, (512, 1024, 1536)), (256, (128, 256, 384))):
        wide = replace(manifest, model=replace(manifest.model, default_size=default), ranges=Ranges(1, 4, 64, 2048))
        assert BuildConfig().resolved(wide).size == size
    narrow = replace(manifest, model=replace(manifest.model, default_size=1024), ranges=Ranges(1, 4, 256, 1024))
    assert BuildConfig().resolved(narrow).size == (512, 1024, 1024)  # clamped into what the export validated


@pytest.mark.parametrize("fixture, time_ids", [("tiny_xl_fp16", 6), ("tiny_xl_refiner_fp16", 5)])
def test_every_input_of_every_sdxl_graph_gets_a_profile(request, fixture, time_ids):
    manifest = request.getfixturevalue(fixture)[1]
    cfg = BuildConfig(batch=(1, 2, 4), size=(64, 256, 512))
    for name, component in manifest.components.items():
        shapes = profile_shapes(component, cfg, manifest.model)
        dynamic = {s.name for s in component.inputs if not all(isinstance(d, int) for d in s.shape)}
        assert set(shapes) == dynamic, name
        for spec in component.inputs:  # every profile shape lies within the range the export validated
            for shape in shapes.get(spec.name, ()):
                assert spec.check_shape(shape) is None, (name, spec.name, shape)
    unet = profile_shapes(manifest.components["unet"], cfg, manifest.model)
    text_rows = tuple(s[0] for s in unet["encoder_hidden_states"])  # B..2B rows: guidance off and on
    assert tuple(s[0] for s in unet["text_embeds"]) == tuple(s[0] for s in unet["time_ids"]) == text_rows == (1, 4, 8)
    assert {s[1] for s in unet["time_ids"]} == {time_ids}
    for encoder in manifest.model.encoders:  # the second encoder too, its pooled output from the same rows
        assert profile_shapes(manifest.components[encoder.component], cfg, manifest.model)["input_ids"] == (
            (1, 77), (4, 77), (24, 77))


def test_an_sdxl_folder_is_built_verified_and_recorded(fake_gpu, xl_folder):
    """Both text encoders, the U-Net with its added conditions and the FP32 VAE become engines, each checked against
    ONNX Runtime, and the end-to-end check generates with them on the device loop."""
    logs = []
    manifest = build_engines(xl_folder, XL, log=logs.append)
    built = manifest.tensorrt
    assert set(built.engines) == set(manifest.components) >= {"text_encoder", "text_encoder_2", "unet"}
    assert {"text_embeds", "time_ids"} <= set(built.engines["unet"].profile)
    assert all(r.passed for rs in built.verification.values() for r in rs) and set(built.verification) == set(
        built.engines)
    assert built.end_to_end.passed
    assert Manifest.load(xl_folder) == manifest


def test_the_refiner_and_refittable_text_encoders(fake_gpu, xl_refiner_folder):
    """The refiner (one projected encoder, 5 time ids) builds; --refittable makes the U-Net and every text encoder
    refittable, the VAE and the update not."""
    manifest = build_engines(xl_refiner_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False,
                                                            refittable=True), log=lambda s: None)
    refit = {re.sub(r"\.onnx$", "", p["onnx"].rsplit("/", 1)[-1]): p["refittable"] for p in fakes.Builder.built}
    encoders = {e.component for e in manifest.model.encoders}
    assert refit == {name: name in encoders | {"unet"} for name in manifest.components}
    assert manifest.tensorrt.engines["unet"].profile["time_ids"][2] == (4, 5)


def test_sdxl_refittable_engines_are_refittable_at_load(fake_gpu, xl_folder):
    from sdtrt.runtime.tensorrt.backend import load_trt_engines

    manifest = build_engines(xl_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False,
                                                    refittable=True), log=lambda s: None)
    engines = load_trt_engines(xl_folder, manifest)
    try:
        assert {n for n, e in engines.items() if getattr(e, "refittable", False)} == {
            "unet", "text_encoder", "text_encoder_2"}
    finally:
        engines.close()


def test_workspace_comes_from_the_free_gpu_memory_and_sizes_are_recorded(fake_gpu, fp16_folder):
    from sdtrt.runtime.tensorrt.build import BUILD_RESERVE, graph_weight_bytes

    _, cudart = fake_gpu
    cudart.memory_limit = 6 * 2**30  # 6 GiB free of the H100's 80
    logs = []
    manifest = build_engines(fp16_folder, SMALL, log=logs.append)
    for name, engine in manifest.tensorrt.engines.items():
        weights = graph_weight_bytes(fp16_folder, manifest.components[name])
        assert engine.workspace_bytes == 6 * 2**30 - weights - BUILD_RESERVE, name
        plan = next(p for p in fakes.Builder.built if p["onnx"].endswith(f"/{name}.onnx"))
        assert plan["workspace"] == engine.workspace_bytes  # what the builder was given
        # the engine's own report of its context memory at the profile's largest shapes
        cuda_engine = fakes.Runtime(None).deserialize_cuda_engine((fp16_folder / engine.file).read_bytes())
        assert engine.device_memory_bytes == cuda_engine.device_memory_size_v2 > 0
    assert manifest.tensorrt.gpu_free_bytes == 6 * 2**30
    assert Manifest.load(fp16_folder) == manifest  # the new fields round-trip through manifest.json
    assert "6.4 GB free of 85.9 GB" in logs[0]
    assert any(re.search(r"unet: unet\.trt.*\.plan \(\d+\.\d MB serialized, \d+\.\d MB of device memory", line)
               for line in logs)


def test_parse_from_file_not_from_bytes(fake_gpu, fp16_folder, monkeypatch):
    """The parser reads each graph itself (no second copy of the ONNX bytes in host memory)."""
    monkeypatch.setattr(fakes.OnnxParser, "parse", lambda self, model, path=None: pytest.fail("parsed from bytes"),
                        raising=False)
    build_engines(fp16_folder, SMALL, log=lambda s: None)


@pytest.mark.parametrize("free, args, needle", [
    (10 * 2**20, (), r"building .* needs about \d+\.\d GB of GPU memory \(unet: 0\.0 GB of weights, a 1\.1 GB workspace, "
                     r"1\.1 GB reserve\), the GPU has 0\.0 GB free of 85\.9 GB"),
    (30 * 2**30, ("--workspace", "40"), r"needs about 44\.0 GB .*--workspace 40 GB.*has 32\.2 GB free"),
])
def test_a_build_the_gpu_cannot_hold_is_refused_up_front(fake_gpu, fp16_folder, capsys, free, args, needle):
    _, cudart = fake_gpu
    cudart.memory_limit = free
    before = {p.name: p.read_bytes() for p in fp16_folder.iterdir() if p.is_file()}
    code = main(["build", str(fp16_folder), "--size", "64:128:256", "--batch", "1:1:2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(needle, err[0]), err
    assert "--no-memory-check" in err[0]
    assert fakes.Builder.built == []  # nothing parsed or built
    assert {p.name: p.read_bytes() for p in fp16_folder.iterdir() if p.is_file()} == before  # nothing written


def test_no_memory_check_builds_anyway(fake_gpu, fp16_folder, capsys):
    _, cudart = fake_gpu
    cudart.memory_limit = 2**30  # 1 GiB free: less than the estimate, more than the fake's engines take
    assert main(["build", str(fp16_folder), "--size", "64:128:256", "--batch", "1:1:2", "--no-verify",
                 "--no-memory-check"]) == 0
    assert len(fakes.Builder.built) == 5
