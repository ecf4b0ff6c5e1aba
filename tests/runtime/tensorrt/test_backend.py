"""The TensorRT backend against the fake: the device loop gives the host loop's images, runs with no host
work per step, replays one CUDA graph per shape, shares one device-memory block, and refuses clearly."""

import numpy as np
import pytest

from sdtrt.cli import main
from sdtrt.runtime import Pipeline
from sdtrt.runtime.backends import BackendError, ShapeError
from sdtrt.runtime.tensorrt import backend as trt_backend
from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines
from tests.runtime.tensorrt import fakes

PROFILE = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256))


def built(folder, cfg=PROFILE):
    build_engines(folder, cfg, log=lambda s: None)
    return folder


def generate(folder, backend, **kwargs):
    args = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5,
                output_type="np")
    args.update(kwargs)
    return Pipeline.from_dir(folder, backend=backend)(**args)


@pytest.mark.parametrize("sampler", ["pndm", "lms", "dpmpp_2m", "euler_a", "lcm", "unipc"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_device_loop_gives_the_host_loop_image(fake_gpu, request, precision, sampler):
    folder = built(request.getfixturevalue(f"{precision}_folder"))
    host = generate(folder, "onnxruntime-cpu", scheduler=sampler).images
    device = generate(folder, "tensorrt", scheduler=sampler).images
    mse = float(np.mean((host.astype(np.float64) - device) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 60, f"PSNR {10 * np.log10(1 / mse):.1f} dB"


def test_second_generation_replays_one_cuda_graph_with_no_host_work_per_step(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    loop = pipe.engines["unet"].device_loop
    first = pipe("a cat", num_inference_steps=6, height=64, width=64, seed=1, output_type="np").images
    cudart.log.clear()
    again = pipe("a cat", num_inference_steps=6, height=64, width=64, seed=1, output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert loop.captures == 1
    log = cudart.log
    g = log.index("graph")
    # inside the graph: U-Net and update alternate, 7 PNDM calls each, and nothing else runs
    loop_ops = log[g + 1: g + 1 + 14]
    assert loop_ops == ["exec:unet", "exec:sampler_update"] * 7
    assert log.count("sync") == 3  # text encoder, end of the loop, VAE: never once per step


def test_a_new_shape_captures_a_new_graph(fake_gpu, fp16_folder):
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    for h, w in ((64, 64), (64, 64), (96, 64), (96, 64), (64, 64)):
        pipe("a cat", num_inference_steps=3, height=h, width=w, seed=1, output_type="np")
    assert pipe.engines["unet"].device_loop.captures == 3


def test_one_device_memory_block_sized_by_the_largest_context(fake_gpu, fp16_folder):
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    engines = list(pipe.engines.values()) + [pipe.engines["unet"].device_loop.update]
    blocks = {e.context.memory for e in engines}
    assert len(blocks) == 1
    (_, size), = blocks
    assert size == max(e.engine.device_memory_size_v2 for e in engines)


def test_auto_prefers_tensorrt_and_falls_back_to_onnxruntime(fake_gpu, fp16_folder, monkeypatch):
    folder = built(fp16_folder)
    assert isinstance(Pipeline.from_dir(folder, backend="auto").engines["unet"], trt_backend.TrtEngine)
    monkeypatch.setattr(fakes.FakeCudart, "cudaGetDeviceCount", lambda self: (self.cudaError_t.cudaErrorNoDevice, 0))
    assert Pipeline.from_dir(folder, backend="auto").backend_name == "CPUExecutionProvider"


def test_refuses_a_folder_without_engines(fake_gpu, fp16_folder):
    with pytest.raises(BackendError, match=r"no TensorRT engines: run `sdtrt build .*fp16` on this machine"):
        Pipeline.from_dir(fp16_folder, backend="tensorrt")


def test_refuses_engines_of_another_tensorrt_version(fake_gpu, fp16_folder, monkeypatch):
    folder = built(fp16_folder)
    trt, _ = fake_gpu
    monkeypatch.setattr(trt, "__version__", "11.4.0.106")
    with pytest.raises(BackendError, match=r"built with TensorRT 10.16.1.11, this is TensorRT 11.4.0.106; rebuild them"):
        Pipeline.from_dir(folder, backend="tensorrt")


def test_refuses_engines_of_another_gpu(fake_gpu, fp16_folder):
    folder = built(fp16_folder)
    _, cudart = fake_gpu
    cudart.prop = cudart.cudaDeviceProp(b"NVIDIA A100-SXM4-80GB", 8, 0, 80 * 2**30)
    with pytest.raises(BackendError, match=r"built for NVIDIA H100 80GB HBM3 \(sm_90\), this GPU is NVIDIA A100-SXM4-80GB "
                                           r"\(sm_80\); rebuild"):
        Pipeline.from_dir(folder, backend="tensorrt")


def test_refuses_a_corrupt_engine(fake_gpu, fp16_folder):
    folder = built(fp16_folder)
    next(folder.glob("vae_decoder.*.plan")).write_bytes(b"\x00garbage")
    with pytest.raises(BackendError, match="vae_decoder.trt10.16.1.11.sm90.plan is corrupt"):
        Pipeline.from_dir(folder, backend="tensorrt")


def test_refuses_shapes_outside_the_profile(fake_gpu, fp16_folder):
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    with pytest.raises(ShapeError, match="outside the engine profile"):
        pipe("a cat", num_inference_steps=2, height=320, width=64)  # exported up to 512, built up to 256


def test_refuses_without_a_cuda_device(fake_gpu, fp16_folder):
    folder = built(fp16_folder)
    _, cudart = fake_gpu
    cudart.devices = 0
    with pytest.raises(BackendError, match="no CUDA device found"):
        Pipeline.from_dir(folder, backend="tensorrt")


def test_cli_generate_with_tensorrt_missing_says_what_to_install(tiny_fp16, capsys, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code = main(["generate", str(tiny_fp16[0]), "a cat", "--backend", "tensorrt", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install tensorrt-cu12" in err


def test_changing_shapes_frees_what_the_previous_shape_used(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    live = []
    for h in (64, 96, 64, 96, 64):
        pipe("a cat", num_inference_steps=3, height=h, width=64, seed=1, output_type="np")
        live.append(cudart.bytes_allocated)
    assert live[2] == live[4] and live[1] == live[3]  # no growth when returning to a shape
