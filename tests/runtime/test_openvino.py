"""The openvino backend (runtime/openvino.py): each graph against ONNX Runtime on the same inputs, images against
diffusers', LoRAs, the compiled-model cache and its keying, and what it refuses. Skipped without OpenVINO (it is in
the ``test`` extra, so CI runs them), except the missing-package message."""

import dataclasses
import importlib.util
import json
import sys

import numpy as np
import pytest

from sdtrt.manifest import Manifest
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.backends import BackendError, OrtEngine

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install 'sdtrt[openvino]')")


def recorded_feeds(folder):
    """Each graph's inputs of a real generation on ONNX Runtime (text to image, then image to image for the VAE
    encoder), 64x96 with guidance: what the pipeline feeds, not invented shapes."""
    feeds = {}
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu") as pipe:
        for name, engine in pipe.engines.items():
            def grab(f, _run=engine.run, _name=name):
                feeds.setdefault(_name, {k: np.array(v) for k, v in f.items()})
                return _run(f)

            engine.run = grab
        image = pipe("a cat", num_inference_steps=2, height=96, width=64, seed=3, output_type="np").images[0]
        pipe("a dog", image=(image * 255).astype(np.uint8), strength=0.5, num_inference_steps=2, seed=4)
    return feeds


def compare_graphs(folder, tolerance):
    from sdtrt.runtime.openvino import OpenVinoEngine

    manifest = Manifest.load(folder)
    feeds = recorded_feeds(folder)
    assert {"text_encoder", "unet", "vae_decoder", "vae_encoder"} <= set(feeds)
    for name, f in feeds.items():
        component = manifest.components[name]
        ours = OpenVinoEngine(folder / component.file, component, cache=None)
        want = OrtEngine(folder / component.file, component).run(f)
        got = ours.run(f)
        assert set(got) == set(want), name
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (name, key)
            scale = max(1.0, float(np.abs(want[key].astype(np.float32)).max()))
            err = float(np.abs(got[key].astype(np.float32) - want[key].astype(np.float32)).max()) / scale
            assert err <= tolerance, f"{name}.{key}: max error {err:.2e} of the output's scale"


@needs_openvino
@pytest.mark.parametrize("export, tolerance", [("tiny_fp32", 1e-4), ("tiny_fp16", 2e-2)])
def test_each_tiny_graph_matches_onnxruntime(request, export, tolerance):
    # fp16 graphs: OpenVINO's CPU plugin computes them in f32 (upcast), ONNX Runtime in fp16 where it has kernels
    compare_graphs(request.getfixturevalue(export)[0], tolerance)


@needs_openvino
def test_each_mid_size_graph_matches_onnxruntime(small_model):
    compare_graphs(small_model[0], 1e-4)


@needs_openvino
def test_tiny_and_mid_size_images_match_diffusers(tiny_fp32, tiny_diffusers_dir, small_model):
    from tests.runtime.test_pipeline import compare_with_diffusers

    with Pipeline.from_dir(tiny_fp32[0], backend="openvino") as pipe:
        assert pipe.backend_name.startswith("openvino (CPU, ")
        value = compare_with_diffusers(tiny_fp32[0], tiny_diffusers_dir, "euler_a", 96, 128, ["a cat", "a castle"],
                                       pipe=pipe)
    assert value >= 40, value
    with Pipeline.from_dir(small_model[0], backend="openvino") as pipe:
        value = compare_with_diffusers(small_model[0], small_model[1], "dpmpp_2m_karras", 128, 96,
                                       ["a red fox in the snow"], steps=10, pipe=pipe)
    assert value >= 40, value


@needs_openvino
def test_a_lora_gives_onnxruntimes_image_and_removing_it_the_base_image(fp32_folder, tmp_path):
    from sdtrt.runtime.synthetic import random_lora

    lora = tmp_path / "style.safetensors"
    random_lora(Manifest.load(fp32_folder), lora, 4, 0, 0.2)
    args = dict(prompt="a cat", num_inference_steps=3, height=64, width=96, seed=1, output_type="np")
    images = {}
    for backend in ("openvino", "onnxruntime-cpu"):
        with Pipeline.from_dir(fp32_folder, backend=backend) as pipe:
            base = pipe(**args).images
            pipe.set_loras([f"{lora}:0.8"])
            images[backend] = pipe(**args).images
            assert psnr(images[backend], base) < 40  # the LoRA changed the image
            pipe.set_loras([])
            assert psnr(pipe(**args).images, base) >= 100
    assert psnr(images["openvino"], images["onnxruntime-cpu"]) >= 60


@needs_openvino
def test_compiled_models_are_cached_by_the_graphs_hashes(fp32_folder, monkeypatch, tmp_path):
    from sdtrt.runtime.openvino import CACHE_NAME, cache_root, graph_cache

    with Pipeline.from_dir(fp32_folder, backend="openvino") as pipe:
        assert pipe.engines["unet"].details["cache"]
    unet = [p for p in (fp32_folder / CACHE_NAME).iterdir() if p.name.startswith("unet-")]
    assert len(unet) == 1 and any(f.suffix == ".blob" for f in unet[0].iterdir())
    # another export (another sha256 of the graph or of its external data): another folder, the old one deleted
    component = Manifest.load(fp32_folder).components["unet"]
    changed = dataclasses.replace(component, external_sha256={k: "0" * 64 for k in component.external_sha256})
    new = graph_cache(cache_root(fp32_folder), "unet", changed)
    assert new != unet[0] and new.is_dir() and not unet[0].exists()
    # a second load reads the cache and gives the same image
    with Pipeline.from_dir(fp32_folder, backend="openvino") as a:
        first = a("a cat", num_inference_steps=2, height=64, width=64, seed=0, output_type="np").images
    with Pipeline.from_dir(fp32_folder, backend="openvino") as b:
        assert np.array_equal(first, b("a cat", num_inference_steps=2, height=64, width=64, seed=0,
                                       output_type="np").images)
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", "off")
    with Pipeline.from_dir(fp32_folder, backend="openvino") as pipe:
        assert not pipe.engines["unet"].details["cache"]
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", str(tmp_path / "elsewhere"))
    with Pipeline.from_dir(fp32_folder, backend="openvino") as pipe:
        assert pipe.engines["unet"].details["cache"]
    shared = [p for p in (tmp_path / "elsewhere").iterdir() if p.name.startswith("unet-")]
    # a cache shared by several folders: another key is another model's U-Net, kept
    other = graph_cache(cache_root(fp32_folder), "unet", changed, prune=False)
    assert len(shared) == 1 and shared[0].is_dir() and other.is_dir() and other != shared[0]


@needs_openvino
def test_precision_and_threads_are_asked_for_and_reported(tiny_fp32, monkeypatch):
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", "off")
    monkeypatch.setenv("SDTRT_OPENVINO_PRECISION", "f32")
    with Pipeline.from_dir(tiny_fp32[0], backend="openvino", threads=1) as pipe:
        details = pipe.engines["unet"].details
        assert pipe.backend_name == "openvino (CPU, f32)"
    assert details["requested_precision"] == "f32" and details["inference_precision"] == "f32"
    assert details["threads"] == 1 and "FP32" in details["optimization_capabilities"]
    monkeypatch.setenv("SDTRT_OPENVINO_PRECISION", "fp8")
    with pytest.raises(BackendError, match="SDTRT_OPENVINO_PRECISION='fp8': choose one of auto, f32, bf16, f16"):
        Pipeline.from_dir(tiny_fp32[0], backend="openvino")


@needs_openvino
def test_openvino_is_listed_where_backends_are():
    from sdtrt.cli import build_parser
    from sdtrt.runtime.backends import BACKENDS, available_backends

    assert "openvino" in BACKENDS and any(b.startswith("openvino ") for b in available_backends())
    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("generate", "serve", "bench"):
        assert "openvino" in subs[command].format_help(), command


def test_without_openvino_the_backend_says_how_to_install_it(engine, monkeypatch, cli, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'sdtrt\[openvino\]'"):
        Pipeline.from_dir(engine, backend="openvino")
    code, _, err = cli("generate", engine, "a cat", "--backend", "openvino", "-o", tmp_path / "x.png")
    assert code == 2 and err.splitlines()[-1].endswith("the openvino backend needs OpenVINO: pip install "
                                                       "'sdtrt[openvino]'"), err
    from sdtrt.runtime.backends import available_backends

    assert not any(b.startswith("openvino") for b in available_backends())


@needs_openvino
@pytest.mark.parametrize("edit, message", [
    (lambda c: c["inputs"][0].update(dtype="float16"), "unet.onnx: latents is float32 in the graph but the manifest "
                                                       "says float16; re-export the model"),
    (lambda c: c["outputs"][0].update(name="noise"), "unet.onnx has a tensor 'noise_pred' that manifest.json does "
                                                     "not list; re-export the model"),
], ids=["dtype", "name"])
def test_a_graph_that_is_not_the_manifests_is_refused_at_load(engine, monkeypatch, edit, message):
    monkeypatch.setenv("SDTRT_OPENVINO_CACHE", "off")
    path = engine / "manifest.json"
    data = json.loads(path.read_text())
    edit(data["components"]["unet"])
    path.write_text(json.dumps(data))
    with pytest.raises(BackendError) as info:
        Pipeline.from_dir(engine, backend="openvino")
    assert str(info.value) == message


@needs_openvino
def test_the_device_loop_is_refused_by_name(tiny_fp32):
    with pytest.raises(BackendError, match="the openvino backend runs the host loop"):
        Pipeline.from_dir(tiny_fp32[0], backend="openvino", device_loop=True)
