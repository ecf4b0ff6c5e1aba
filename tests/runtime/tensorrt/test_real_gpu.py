"""The TensorRT path for real: only where TensorRT, cuda-python and an NVIDIA GPU are present.

    pip install torch==2.13.0 && pip install -e ".[test,tensorrt-cu12]"   # or tensorrt-cu13 with a 580+ driver
    python -m pytest -m gpu tests/runtime/tensorrt/test_real_gpu.py

Not run in this project's CI or on its development machines, which have no GPU: nothing here has run yet. Each
folder is built once per module (tiny models), so the whole file should take well under 10 minutes on one GPU."""

import shutil

import numpy as np
import pytest

from sdtrt.parity import psnr
from sdtrt.runtime.samplers import SAMPLERS

pytestmark = pytest.mark.gpu

DYNAMIC = dict(batch=(1, 1, 2), size=(64, 128, 256))


@pytest.fixture(scope="module")
def real_gpu():
    from sdtrt.runtime.backends import BackendError
    from sdtrt.runtime.tensorrt import api

    try:
        trt, cudart = api.import_tensorrt(), api.import_cudart()
        api.device_info(cudart)
    except BackendError as ex:
        pytest.skip(str(ex))
    return trt, cudart


def free_device_memory(cudart) -> int:
    from sdtrt.runtime.tensorrt import api

    free, _ = api.check(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free)


def _build(tmp_path_factory, source, name, **cfg):
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    folder = tmp_path_factory.mktemp(name) / "engines"
    shutil.copytree(source, folder)
    build_engines(folder, BuildConfig(**DYNAMIC, **cfg), log=print)
    return folder


@pytest.fixture(scope="module")
def built_fp16(real_gpu, tiny_fp16, tmp_path_factory):
    """Refittable, so LoRAs can be tested on the same engines (and the build's check covers a refit)."""
    return _build(tmp_path_factory, tiny_fp16[0], "gpu_fp16", refittable=True)


@pytest.fixture(scope="module")
def built_inpaint(real_gpu, tiny_inpaint_fp16, tmp_path_factory):
    return _build(tmp_path_factory, tiny_inpaint_fp16, "gpu_inpaint")


@pytest.fixture(scope="module")
def built_control(real_gpu, tiny_control_fp16, tmp_path_factory):
    return _build(tmp_path_factory, tiny_control_fp16, "gpu_control")


def test_dynamic_build_verifies_every_engine(built_fp16):
    from sdtrt.manifest import Manifest

    record = Manifest.load(built_fp16).tensorrt
    assert set(record.verification) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "sampler_update"}
    assert all(r.passed for rs in record.verification.values() for r in rs)
    assert record.end_to_end.passed, record.end_to_end


def test_static_build_verifies_and_runs(real_gpu, fp32_folder):
    from sdtrt.runtime import Pipeline
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    manifest = build_engines(fp32_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), static=(128, 96)), log=print)
    assert manifest.tensorrt.static and manifest.tensorrt.end_to_end.passed
    with Pipeline.from_dir(fp32_folder, backend="tensorrt") as pipe:
        image = pipe("a cat", num_inference_steps=8, height=96, width=128, seed=3, output_type="np").images
    assert np.isfinite(image).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_device_loop_gives_the_onnxruntime_image(built_fp16, sampler):
    from sdtrt.runtime import Pipeline

    kwargs = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=10, height=128, width=96, seed=3,
                  scheduler=sampler, output_type="np")
    with Pipeline.from_dir(built_fp16, backend="tensorrt") as trt_pipe:
        device = trt_pipe(**kwargs).images
        again = trt_pipe(**kwargs).images  # replayed CUDA graph
        assert trt_pipe.engines["unet"].device_loop.captures == 1
    with Pipeline.from_dir(built_fp16, backend="onnxruntime-cpu") as host_pipe:
        host = host_pipe(**kwargs).images
    np.testing.assert_array_equal(device, again)
    assert psnr(device, host) >= 30, psnr(device, host)


@pytest.mark.parametrize("task", ["img2img", "inpaint", "inpaint at strength 1", "outpaint"])
@pytest.mark.parametrize("model", ["ordinary", "inpainting"])
def test_every_task_on_the_device_loop_gives_the_onnxruntime_image(request, model, task):
    from sdtrt.runtime import Pipeline
    from tests.runtime.test_backends import task_args

    if model == "inpainting" and task == "img2img":
        pytest.skip("an inpainting U-Net needs a mask")
    folder = request.getfixturevalue("built_fp16" if model == "ordinary" else "built_inpaint")
    kwargs = dict(task_args(task), prompt=["a cat", "a dog"], negative_prompt="blurry", num_inference_steps=10,
                  seed=3, scheduler="euler_a", output_type="np")
    with Pipeline.from_dir(folder, backend="tensorrt") as trt_pipe:
        device = trt_pipe(**kwargs).images
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu") as host_pipe:
        host = host_pipe(**kwargs).images
    assert np.isfinite(device).all() and psnr(device, host) >= 30, psnr(device, host)


def test_shape_change_and_back_leaks_nothing_and_stays_finite(built_fp16, real_gpu):
    from sdtrt.runtime import Pipeline

    _, cudart = real_gpu
    with Pipeline.from_dir(built_fp16, backend="tensorrt") as pipe:
        live = []
        for h, w in ((64, 64), (256, 192), (64, 64), (256, 192), (64, 64)):
            image = pipe("a cat", num_inference_steps=6, height=h, width=w, seed=1, scheduler="dpmpp_2m",
                         output_type="np").images
            assert np.isfinite(image).all() and image.std() > 0
            live.append(sum(pipe.engines["unet"].memory.live.values()))
        assert live[0] <= live[2] == live[4] and live[1] == live[3]


def test_close_gives_the_device_memory_back(built_fp16, real_gpu):
    from sdtrt.runtime import Pipeline

    _, cudart = real_gpu
    before = free_device_memory(cudart)
    pipe = Pipeline.from_dir(built_fp16, backend="tensorrt")
    pipe("a cat", num_inference_steps=4, height=128, width=128, seed=1)
    memory = pipe.engines["unet"].memory
    assert free_device_memory(cudart) < before
    pipe.close()
    assert memory.live == {} and memory.pinned_live == {} and memory.stream is None
    assert free_device_memory(cudart) >= before - 256 * 2**20  # TensorRT's kernel modules stay loaded


def test_doctor_run_on_the_real_engines(built_fp16):
    from sdtrt.runtime.doctor import diagnose, run_check

    findings = {f.label: f for f in diagnose(built_fp16)}
    assert findings["match"].ok and findings["GPU"].ok
    assert run_check(built_fp16).passed


# ---- issue 21: refit, ControlNets, two chunks, replayed generations ---------------------------------------------

KW = dict(negative_prompt="blurry", num_inference_steps=8, height=128, width=96, seed=3, scheduler="dpmpp_2m",
          output_type="np")


def test_lora_refit_a_b_a_none_gives_the_onnxruntime_images(built_fp16, tmp_path):
    """Refit supplies the weights TensorRT combined with the LoRA's (biases, fused Q/K/V) or refit_cuda_engine fails;
    A, B, A again gives A exactly, none gives the base exactly, each replayed once."""
    from sdtrt.benchmarks.lora_swap import random_lora
    from sdtrt.manifest import Manifest
    from sdtrt.runtime import Pipeline

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_lora(Manifest.load(built_fp16), a, 4, 0)
    random_lora(Manifest.load(built_fp16), b, 4, 1)
    with Pipeline.from_dir(built_fp16, backend="onnxruntime-cpu", loras=[(a, 0.8)]) as host:
        want_a = host("a cat", **KW).images
    got = {}
    with Pipeline.from_dir(built_fp16, backend="tensorrt") as pipe:
        for label, loras in (("base", []), ("a", [(a, 0.8)]), ("b", [(b, 0.8)]), ("a again", [(a, 0.8)]),
                             ("none", [])):
            pipe.set_loras(loras)
            got[label] = pipe("a cat", **KW).images
            np.testing.assert_array_equal(pipe("a cat", **KW).images, got[label])  # the replayed graph
    np.testing.assert_array_equal(got["a again"], got["a"])
    np.testing.assert_array_equal(got["none"], got["base"])
    assert psnr(got["a"], want_a) >= 30, psnr(got["a"], want_a)
    assert psnr(got["a"], got["base"]) < 60 and psnr(got["a"], got["b"]) < 60  # the refit took effect


def test_controlnets_on_the_device_loop_give_the_onnxruntime_image(built_control):
    from sdtrt.runtime import Pipeline
    from tests.runtime.tensorrt.test_backend import control_args

    args = dict(control_args("two, with ranges"), **{k: v for k, v in KW.items() if k != "scheduler"})
    with Pipeline.from_dir(built_control, backend="tensorrt") as pipe:
        device = pipe(**args).images
        np.testing.assert_array_equal(pipe(**args).images, device)  # captured and launched
        np.testing.assert_array_equal(pipe(**args).images, device)  # replayed
    with Pipeline.from_dir(built_control, backend="onnxruntime-cpu") as host:
        want = host(**args).images
    assert psnr(device, want) >= 30, psnr(device, want)


def test_two_chunk_prompt_and_replayed_generations(built_fp16):
    from sdtrt.runtime import Pipeline

    long = ", ".join(["a red fox in the snow"] * 7)  # two chunks of 77 tokens
    with Pipeline.from_dir(built_fp16, backend="tensorrt") as pipe:
        images = [pipe(long, **KW).images for _ in range(3)]  # eager, captured, replayed
        short = pipe("a cat", **KW).images
        assert pipe.engines["unet"].device_loop.captures == 1
    with Pipeline.from_dir(built_fp16, backend="onnxruntime-cpu") as host:
        want = host(long, **KW).images
    assert all(np.array_equal(images[0], x) for x in images)
    assert psnr(images[0], want) >= 30 and psnr(images[0], short) < 60
