"""The TensorRT backend against the strict fakes: the device loop gives the host loop's images, runs with no
host work per step, replays one CUDA graph per shape, shares one device-memory block sized for the shapes
in use, checks every TensorRT and CUDA return, frees everything on close, and refuses clearly.

Each test named after a defect failed on the code before its fix (the closing note of issue 9 lists
the failing assertions)."""

import logging

import numpy as np
import pytest

from sdtrt.cli import main
from sdtrt.errors import ManifestError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime.backends import BackendError, ShapeError
from sdtrt.runtime.device_loop import ALIGN
from sdtrt.runtime.tensorrt import backend as trt_backend
from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines
from tests.runtime.tensorrt import fakes

PROFILE = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False)


def built(folder, cfg=PROFILE):
    build_engines(folder, cfg, log=lambda s: None)
    return folder


def generate(folder, backend, **kwargs):
    args = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5,
                output_type="np")
    args.update(kwargs)
    with Pipeline.from_dir(folder, backend=backend) as pipe:
        return pipe(**args)


def same_image(a, b):
    return psnr(a, b) >= 60


SAMPLERS = ["pndm", "lms", "dpmpp_2m", "euler_a", "lcm", "unipc"]


# tiny fp16 (TensorRT's precision) with every sampler, fp32 with two (the rest in `-m slow`); tiny-xl fp16 with a
# multistep, an ancestral and a history-reading one
@pytest.mark.parametrize("folder, sampler", [("fp16_folder", s) for s in SAMPLERS]
                         + [("fp32_folder", s) if s in ("pndm", "euler_a") else
                            pytest.param("fp32_folder", s, marks=pytest.mark.slow) for s in SAMPLERS]
                         + [("xl_folder", s) for s in ("pndm", "euler_a", "dpmpp_2m")])
def test_device_loop_gives_the_host_loop_image(fake_gpu, request, folder, sampler):
    """SDXL's added conditions (text_embeds, FP32 time_ids) are constant U-Net inputs of the device loop."""
    folder = built(request.getfixturevalue(folder))
    host = generate(folder, "onnxruntime-cpu", scheduler=sampler).images
    device = generate(folder, "tensorrt", scheduler=sampler).images
    assert np.isfinite(device).all()
    assert same_image(host, device), f"PSNR {psnr(host, device):.1f} dB"


@pytest.mark.parametrize("folder", ["fp16_folder", "xl_folder"])
def test_third_generation_replays_one_cuda_graph_with_no_host_work_per_step(fake_gpu, request, folder):
    """Eager, then captured and launched, then replayed: the replay follows a reserve() of the same shapes, which
    must not set the contexts' shapes again (the fake refuses a replay against a context whose state moved). SDXL's
    added conditions are bound once per generation, outside the steps, and allocate nothing per step."""
    _, cudart = fake_gpu
    with Pipeline.from_dir(built(request.getfixturevalue(folder)), backend="tensorrt") as pipe:
        encoders = [f"exec:{e.component}" for e in pipe.manifest.model.encoders]
        loop = pipe.engines["unet"].device_loop
        kwargs = dict(num_inference_steps=6, height=64, width=64, seed=1, output_type="np", scheduler="pndm")
        first = pipe("a cat", **kwargs).images
        second = pipe("a cat", **kwargs).images
        cudart.log.clear()
        again = pipe("a cat", **kwargs).images
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(first, again)
        assert loop.captures == 1
        log = cudart.log
        assert log.count("graph") == 1  # the whole loop is one launch
        # U-Net and update alternate, 7 PNDM calls each, between the text encoder and the VAE
        assert [e for e in log if e.startswith("exec:")] == (
            encoders + ["exec:unet", "exec:sampler_update"] * 7 + ["exec:vae_decoder"])
        assert log.count("sync") == len(encoders) + 2  # text encoders, end of the loop, VAE: never once per step


def test_a_new_shape_captures_a_new_graph(fake_gpu, fp16_folder):
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        for h, w in ((64, 64), (64, 64), (96, 64), (96, 64), (64, 64), (64, 64)):
            pipe("a cat", num_inference_steps=3, height=h, width=w, seed=1, output_type="np")
        # captured at the second run of each; 96x64 grew the shared block, so 64x64 after it is set up anew
        assert pipe.engines["unet"].device_loop.captures == 3


# ---- defect: per-step addresses were not 256-byte aligned -----------------------------------------------

def test_defect_per_step_addresses_are_256_byte_aligned_and_accepted(fake_gpu, fp16_folder, monkeypatch):
    calls = []
    real = fakes.IExecutionContext.set_tensor_address

    def recording(self, name, memory):
        ok = real(self, name, memory)
        calls.append((self.engine.name, name, int(memory), ok))
        return ok

    monkeypatch.setattr(fakes.IExecutionContext, "set_tensor_address", recording)
    generate(built(fp16_folder), "tensorrt", scheduler="euler_a", num_inference_steps=5)
    assert calls and all(ok for *_, ok in calls), [c for c in calls if not c[3]][:3]
    assert all(ptr % ALIGN == 0 for _, _, ptr, _ in calls)
    timesteps = [ptr for engine, name, ptr, _ in calls if engine == "unet" and name == "timestep"]
    coefs = [ptr for engine, name, ptr, _ in calls if name == "coefs"]
    noise = [ptr for engine, name, ptr, _ in calls if name == "noise"]
    assert len(set(timesteps)) == len(set(coefs)) == len(set(noise)) == 5  # one slot per step


def test_defect_a_refused_address_is_an_error_not_a_silent_reuse(fake_gpu, fp16_folder, monkeypatch):
    real = fakes.IExecutionContext.set_tensor_address
    seen = []

    def refuse_fourth_timestep(self, name, memory):
        if name == "timestep":
            seen.append(memory)
            if len(seen) == 4:
                return False
        return real(self, name, memory)

    monkeypatch.setattr(fakes.IExecutionContext, "set_tensor_address", refuse_fourth_timestep)
    with pytest.raises(BackendError, match="TensorRT refused the address .* of timestep in unet"):
        generate(built(fp16_folder), "tensorrt")


# ---- defect: the model-output ring was never initialised ----------------------------------------------

@pytest.mark.parametrize("sampler", ["dpmpp_2m", "pndm", "unipc"])  # samplers that read earlier model outputs
def test_defect_uninitialised_model_output_ring_never_reaches_the_image(fake_gpu, fp16_folder, sampler):
    folder = built(fp16_folder)
    host = generate(folder, "onnxruntime-cpu", scheduler=sampler, height=64).images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        kwargs = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, width=64, seed=5,
                      output_type="np", scheduler=sampler)
        pipe(height=96, **kwargs)
        first = pipe(height=64, **kwargs).images  # right after a shape change re-allocated the rings
        assert np.isfinite(first).all() and same_image(host, first)


def test_defect_nan_left_in_the_rings_by_one_generation_does_not_poison_the_next(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    host = generate(folder, "onnxruntime-cpu", scheduler="dpmpp_2m").images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        pipe("a cat", negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5, scheduler="dpmpp_2m")
        loop = pipe.engines["unet"].device_loop
        for ptr in loop.outputs + loop.states:  # what an fp16 overflow in the last generation leaves behind
            cudart._allocs[ptr].fill(fakes.GARBAGE)
        again = pipe("a cat", negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5,
                     scheduler="dpmpp_2m", output_type="np").images
    assert same_image(host, again)


# ---- defect: execute_async_v3 returns were ignored ------------------------------------------------------

def test_defect_a_failed_enqueue_raises_a_clear_error(fake_gpu, fp16_folder, monkeypatch):
    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3",
                        lambda self, stream_handle: self._refuse("out of resources"))
    with pytest.raises(BackendError, match="TensorRT failed to enqueue text_encoder"):
        generate(built(fp16_folder), "tensorrt")


def test_defect_a_failed_enqueue_in_the_loop_raises_a_clear_error(fake_gpu, fp16_folder, monkeypatch):
    real = fakes.IExecutionContext.execute_async_v3

    def fail_update(self, stream_handle):
        if self.engine.name == "sampler_update":
            return self._refuse("out of resources")
        return real(self, stream_handle)

    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3", fail_update)
    with pytest.raises(BackendError, match="TensorRT failed to enqueue sampler_update"):
        generate(built(fp16_folder), "tensorrt")


# ---- defect: a failed capture failed every later call ---------------------------------------------------

def test_defect_failed_capture_falls_back_to_eager_runs_with_one_warning(fake_gpu, fp16_folder, monkeypatch, caplog):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    host = generate(folder, "onnxruntime-cpu", height=64).images
    real = fakes.IExecutionContext.execute_async_v3

    def fail_inside_capture(self, stream_handle):
        if cudart.capture is not None and self.engine.name == "sampler_update":
            return self._refuse("resource exhausted during capture")
        return real(self, stream_handle)

    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3", fail_inside_capture)
    with caplog.at_level(logging.WARNING, logger="sdtrt"), Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        images = [pipe("a cat", negative_prompt="blurry", num_inference_steps=6, height=64, width=64, seed=5,
                       output_type="np").images for _ in range(3)]
        loop = pipe.engines["unet"].device_loop
        assert loop.captures == 0
        assert cudart.capture is None  # the capture was ended
        assert cudart.live()["graphs"] == cudart.live()["graph execs"] == 0  # the partial graph was destroyed
    assert all(same_image(host, image) for image in images)
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1


def test_a_capture_broken_by_a_forbidden_call_is_not_used(fake_gpu, fp16_folder, monkeypatch):
    """A host synchronisation inside the capture (forbidden by CUDA) invalidates it; the loop goes on eagerly."""
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    host = generate(folder, "onnxruntime-cpu", height=64).images
    real = fakes.IExecutionContext.execute_async_v3

    def sync_inside_capture(self, stream_handle):
        if cudart.capture is not None:
            cudart.cudaStreamSynchronize(stream_handle)
        return real(self, stream_handle)

    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3", sync_inside_capture)
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        for _ in range(2):
            image = pipe("a cat", negative_prompt="blurry", num_inference_steps=6, height=64, width=64, seed=5,
                         output_type="np").images
            assert same_image(host, image)
        assert pipe.engines["unet"].device_loop.captures == 0


# ---- defect: CUDA graphs were never destroyed; no close() -----------------------------------------------

def test_defect_graphs_are_destroyed_and_close_frees_everything(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    before = cudart.live()
    pipe = Pipeline.from_dir(folder, backend="tensorrt")
    for h in (64, 64, 96, 96, 64, 64):
        pipe("a cat", num_inference_steps=3, height=h, width=64, seed=1, output_type="np")
        assert cudart.live()["graphs"] == 0  # the cudaGraph_t goes right after instantiation
        assert cudart.live()["graph execs"] <= 1  # only the current shape's
    assert pipe.engines["unet"].device_loop.captures == 3
    pipe.close()
    assert cudart.live() == before == {"device allocations": 0, "pinned allocations": 0, "streams": 0, "graphs": 0,
                                        "graph execs": 0}
    pipe.close()  # twice is harmless


def test_changing_shapes_frees_what_the_previous_shape_used(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    live = []
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        for h in (64, 96, 64, 96, 64):
            pipe("a cat", num_inference_steps=3, height=h, width=64, seed=1, output_type="np")
            live.append(cudart.bytes_allocated)
    assert live[2] == live[4] and live[1] == live[3]  # no growth when returning to a shape


# ---- defect: noise buffers for every sampler; context memory sized for the profile maximum --------------

def test_defect_noise_buffers_only_for_stochastic_samplers(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    live = {}
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        for sampler in ("euler", "euler_a", "euler"):
            pipe("a cat", num_inference_steps=8, height=64, width=64, seed=1, scheduler=sampler)
            live[sampler] = cudart.bytes_allocated
    latent_bytes = 1 * 4 * 8 * 8 * 4  # (B, C, h, w) fp32
    assert live["euler_a"] - live["euler"] == 8 * max(latent_bytes, ALIGN)  # one aligned noise row per step


def test_defect_shared_context_memory_is_sized_for_the_shapes_in_use(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        pipe("a cat", num_inference_steps=2, height=64, width=64, seed=1)
        # txt2img: the VAE encoder has not run, so it has no shapes and holds no memory yet
        assert pipe.engines["vae_encoder"].context.memory is None
        engines = [e for n, e in pipe.engines.items() if n != "vae_encoder"] + [pipe.engines["unet"].device_loop.update]
        blocks = {e.context.memory for e in engines}
        assert len(blocks) == 1  # one block shared by every context
        (ptr, size), = blocks
        need = max(e.context.update_device_memory_size_for_shapes() for e in engines)
        assert need <= size < max(e.engine.device_memory_size_v2 for e in engines)  # not the profile maximum
        # a larger shape grows it, every context follows, and the loop re-captures into the new block
        host = generate(fp16_folder, "onnxruntime-cpu", height=256, width=256, num_inference_steps=3).images
        big = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, height=256, width=256, seed=5,
                   output_type="np").images
        (ptr2, size2), = {e.context.memory for e in engines}
        assert size2 > size and same_image(host, big)
        again = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, height=256, width=256, seed=5,
                     output_type="np").images
        np.testing.assert_array_equal(big, again)


# ---- defect: TensorRT 10.0 and drivers too old for cuda-python -----------------------------------------

@pytest.mark.parametrize("version", ["10.0.1.6", "8.6.1"])
def test_defect_tensorrt_older_than_10_1_is_refused(fake_gpu, fp16_folder, monkeypatch, version):
    trt, _ = fake_gpu
    monkeypatch.setattr(trt, "__version__", version)
    with pytest.raises(BackendError, match=rf"TensorRT {version} is too old: sdtrt needs TensorRT 10.1 or newer"):
        build_engines(fp16_folder, PROFILE, log=lambda s: None)


@pytest.mark.parametrize("driver, runtime, needle", [
    (0, 12090, "no NVIDIA driver found"),
    (12040, 13000, r"the NVIDIA driver supports CUDA 12.4, but this cuda-python is built for CUDA 13.0: .*"
                   r"pip install 'sdtrt\[tensorrt-cu12\]'"),
])
def test_defect_a_missing_or_too_old_driver_gets_its_own_message(fake_gpu, fp16_folder, driver, runtime, needle):
    folder = built(fp16_folder)
    _, cudart = fake_gpu
    cudart.driver, cudart.runtime = driver, runtime
    with pytest.raises(BackendError, match=needle):
        Pipeline.from_dir(folder, backend="tensorrt")


# ---- refusals -------------------------------------------------------------------------------------------

def test_auto_prefers_tensorrt_and_falls_back_to_onnxruntime(fake_gpu, fp16_folder, monkeypatch):
    folder = built(fp16_folder)
    with Pipeline.from_dir(folder, backend="auto") as pipe:
        assert isinstance(pipe.engines["unet"], trt_backend.TrtEngine)
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


def test_refuses_an_engine_file_that_is_not_the_one_built(fake_gpu, fp16_folder):
    folder = built(fp16_folder)
    next(folder.glob("vae_decoder.*.plan")).write_bytes(b"\x00garbage")
    with pytest.raises(ManifestError, match=r"vae_decoder\.trt10\.16\.1\.11\.sm90\.[0-9a-f]{8}\.plan: 8 bytes, "
                                           r"manifest.json says \d+: replaced or truncated; rebuild with `sdtrt build"):
        Pipeline.from_dir(folder, backend="tensorrt")


def test_refuses_an_engine_tensorrt_cannot_load_and_frees_what_it_loaded(fake_gpu, fp16_folder):
    import dataclasses

    from sdtrt.manifest import Manifest, sha256_file

    folder = built(fp16_folder)
    _, cudart = fake_gpu
    plan = next(folder.glob("vae_decoder.*.plan"))
    plan.write_bytes(b"\x00garbage")  # as a plan of another TensorRT build would be, with a manifest to match
    m = Manifest.load(folder)
    engines = dict(m.tensorrt.engines)
    engines["vae_decoder"] = dataclasses.replace(engines["vae_decoder"], sha256=sha256_file(plan), size_bytes=8)
    dataclasses.replace(m, tensorrt=dataclasses.replace(m.tensorrt, engines=engines)).save(folder)
    with pytest.raises(BackendError, match=r"vae_decoder\.trt10\.16\.1\.11\.sm90\.[0-9a-f]{8}\.plan is corrupt"):
        Pipeline.from_dir(folder, backend="tensorrt")
    assert cudart.live()["streams"] == 0


def test_refuses_shapes_outside_the_profile(fake_gpu, fp16_folder):
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
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
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'sdtrt[tensorrt-cu12]'" in err


# ---- review findings: out-of-memory while growing, the reference of the end-to-end check ---------------

def test_running_out_of_gpu_memory_is_one_clear_error_and_leaves_the_pipeline_usable(fake_gpu, fp16_folder):
    from sdtrt.runtime.backends import DeviceMemoryError

    _, cudart = fake_gpu
    folder = built(fp16_folder)
    host = generate(folder, "onnxruntime-cpu", height=64, width=64).images
    pipe = Pipeline.from_dir(folder, backend="tensorrt")
    kwargs = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, width=64, seed=5, output_type="np")
    pipe(height=64, **kwargs)
    cudart.memory_limit = cudart.bytes_allocated + 4096  # the next growth cannot be had
    with pytest.raises(DeviceMemoryError, match=r"not enough GPU memory: .* GiB more are needed, .* GiB are free; use "
                                                r"a smaller size or batch"):
        pipe(height=256, **kwargs)
    cudart.memory_limit = 80 * 2**30
    again = pipe(height=64, **kwargs).images  # the contexts still hold a live block
    assert same_image(host, again)
    pipe.close()
    assert all(v == 0 for v in cudart.live().values()), cudart.live()


def test_a_failed_buffer_growth_keeps_the_old_buffer_and_close_still_frees_all(fake_gpu, fp16_folder):
    from sdtrt.runtime.backends import DeviceMemoryError

    _, cudart = fake_gpu
    folder = built(fp16_folder)
    pipe = Pipeline.from_dir(folder, backend="tensorrt")
    text = pipe.engines["text_encoder"]
    text.run({"input_ids": np.zeros((1, 77), np.int32)})
    cudart.memory_limit = cudart.bytes_allocated  # nothing more
    with pytest.raises(DeviceMemoryError):
        text.run({"input_ids": np.zeros((2, 77), np.int32)})
    cudart.memory_limit = 80 * 2**30
    text.run({"input_ids": np.zeros((1, 77), np.int32)})
    pipe.close()
    assert all(v == 0 for v in cudart.live().values()), cudart.live()


def test_an_interrupt_during_capture_ends_it_and_leaks_no_graph(fake_gpu, fp16_folder, monkeypatch):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    real = fakes.IExecutionContext.execute_async_v3

    def interrupt_inside_capture(self, stream_handle):
        if cudart.capture is not None and self.engine.name == "sampler_update":
            raise KeyboardInterrupt
        return real(self, stream_handle)

    pipe = Pipeline.from_dir(folder, backend="tensorrt")
    pipe("a cat", num_inference_steps=3, height=64, width=64, seed=1)  # eager: the next one captures
    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3", interrupt_inside_capture)
    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", num_inference_steps=3, height=64, width=64, seed=1)
    assert cudart.capture is None and cudart.live()["graphs"] == 0
    pipe.close()
    assert all(v == 0 for v in cudart.live().values()), cudart.live()


def test_the_end_to_end_check_compares_with_the_host_loop(fake_gpu, fp16_folder, monkeypatch):
    from sdtrt.manifest import Manifest
    from sdtrt.runtime import backends
    from sdtrt.runtime.tensorrt.backend import load_trt_engines
    from sdtrt.runtime.tensorrt.verify import end_to_end

    folder = built(fp16_folder)
    manifest = Manifest.load(folder)
    seen = []
    real = backends.load_engines

    def recording(*args, **kwargs):
        engines = real(*args, **kwargs)
        seen.append(getattr(engines["unet"], "device_loop", None))
        return engines

    monkeypatch.setattr(backends, "load_engines", recording)
    engines = load_trt_engines(folder, manifest)
    try:
        assert end_to_end(folder, manifest, engines).passed
    finally:
        engines.close()
    assert seen == [None]  # the reference shares no loop code with the device loop under test


def test_prompts_of_several_chunks_run_on_the_device_loop(fake_gpu, fp16_folder):
    """The text axis (77 x chunks) is dynamic in the profiles; the loop re-sets up when it changes."""
    folder = built(fp16_folder)
    long = ", ".join(["a red fox in the snow"] * 7)  # two chunks
    prompts = ["a cat", long, long + " BREAK (moon:1.2)", "a cat"]
    kwargs = dict(negative_prompt="blurry", num_inference_steps=4, height=64, width=64, seed=5, output_type="np")
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu") as host:
        want = [host(p, **kwargs).images for p in prompts]
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        got = []
        for p in prompts:
            got.append(pipe(p, **kwargs).images)
            np.testing.assert_array_equal(pipe(p, **kwargs).images, got[-1])  # captured, launched as a graph
        assert pipe.engines["unet"].device_loop.captures == 4  # 1, 2, 3, then 1 chunk again: a new graph each time
    assert all(same_image(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("task", ["img2img", "inpaint", "inpaint at strength 1", "outpaint"])
@pytest.mark.parametrize("model", ["ordinary", "inpainting"])
def test_device_loop_runs_every_task_as_the_host_loop(fake_gpu, fp16_folder, inpaint_folder, model, task):
    """img2img's start, an inpainting U-Net's constant inputs and 4-channel inpainting's blend, all on the device
    loop (the blend in the sampler-update engine), against the NumPy host loop."""
    from tests.runtime.test_backends import task_args

    if model == "inpainting" and task == "img2img":
        pytest.skip("an inpainting U-Net needs a mask")
    folder = built(fp16_folder if model == "ordinary" else inpaint_folder)
    args = dict(task_args(task), scheduler="euler_a", height=None, width=None, prompt=["a cat", "a dog"])
    host = generate(folder, "onnxruntime-cpu", **args).images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        device = pipe(**{**dict(negative_prompt="blurry", num_inference_steps=6, seed=5, output_type="np"),
                         **args}).images
        assert pipe.engines["unet"].device_loop.captures == 0  # one generation: eager, no graph
    assert np.isfinite(device).all()
    assert same_image(host, device), f"PSNR {psnr(host, device):.1f} dB"


CONTROLS = {  # the control map is 90x60: resized to the generation's size as diffusers does
    "one": dict(control_images=["map"]),
    "two, with ranges": dict(control_images=["map", "map2"], controlnet_conditioning_scale=[0.7, 1.3],
                             control_guidance_start=[0.0, 0.4], control_guidance_end=[0.6, 1.0]),
    "second only": dict(control_images=[None, "map2"]),
}


def control_args(case, task=None):
    from tests.runtime.test_backends import task_args
    from tests.runtime.test_tasks import picture

    maps = {"map": picture(90, 60, seed=7), "map2": picture(60, 90, seed=8), None: None}
    args = dict(CONTROLS[case], scheduler="euler_a", prompt=["a cat", "a dog"])
    args["control_images"] = [maps[m] for m in args["control_images"]]
    if task is not None:
        args |= dict(task_args(task), height=None, width=None)
    return args


# every ControlNet case with txt2img, the image tasks with one case each; the rest of the grid in `-m slow`
@pytest.mark.parametrize("case, task", [(c, t) if t is None or (c, t) in {("two, with ranges", "img2img"),
                                                                         ("second only", "inpaint")}
                                        else pytest.param(c, t, marks=pytest.mark.slow)
                                        for t in (None, "img2img", "inpaint") for c in CONTROLS])
def test_device_loop_runs_controlnets_as_the_host_loop(fake_gpu, control_folder, case, task):
    """ControlNets chained before the U-Net on the device (their per-step scales a table, a zeroed residual set
    when none runs), against the NumPy host loop; a ControlNet outside its range is not launched."""
    folder = built(control_folder)
    args = control_args(case, task)
    host = generate(folder, "onnxruntime-cpu", **args).images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        launches = {}
        for name in ("controlnet_edges", "controlnet_depth"):
            engine = pipe.engines[name]
            real = engine.launch
            launches[name] = 0

            def counted(real=real, name=name):
                launches[name] += 1
                real()

            engine.launch = counted
        device = generate_with(pipe, **args)
        assert pipe.engines["unet"].device_loop.captures == 0  # one generation: eager, no graph
        if task is None:  # 6 steps; ranges 0..0.6 and 0.4..1: steps 0-2 (i + 1 <= 3.6) and 3-5 (i >= 2.4), as diffusers
            want = {"one": (6, 0), "two, with ranges": (3, 3), "second only": (0, 6)}[case]
            assert (launches["controlnet_edges"], launches["controlnet_depth"]) == want, launches  # enqueued once
            replayed = generate_with(pipe, **args)  # the second captures the chain and launches the graph
            assert pipe.engines["unet"].device_loop.captures == 1
            np.testing.assert_array_equal(device, replayed)
    assert np.isfinite(device).all()
    assert same_image(host, device), f"PSNR {psnr(host, device):.1f} dB"


def generate_with(pipe, **kwargs):
    args = dict(negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5, output_type="np")
    return pipe(**{**args, **kwargs}).images


def test_loras_need_refittable_engines(fake_gpu, fp16_folder, tmp_path):
    """Engines built without --refittable cannot take LoRA weights: a clear error, not base weights used silently."""
    from sdtrt.benchmarks.lora_swap import random_lora
    from sdtrt.manifest import Manifest

    folder = built(fp16_folder)
    random_lora(Manifest.load(folder), tmp_path / "a.safetensors", 2, 0)
    with pytest.raises(BackendError, match="was not built refittable: LoRAs and embeddings need `sdtrt build .* "
                                           "--refittable`"):
        Pipeline.from_dir(folder, backend="tensorrt", loras=[(tmp_path / "a.safetensors", 0.5)])
    assert not any(fake_gpu[1].live().values()), fake_gpu[1].live()  # the failed load freed what it held


def test_refitted_loras_give_the_onnxruntime_image_and_never_accumulate(fake_gpu, fp16_folder, tmp_path):
    """--refittable engines take LoRAs through trt.Refitter (the fake keeps weights it is not given, as TensorRT
    does): A, B, then A again gives the first A image exactly, none gives the base image, and each matches ONNX
    Runtime with the same LoRAs; CUDA graphs are re-captured on the new weights."""
    from sdtrt.benchmarks.lora_swap import random_lora
    from sdtrt.manifest import Manifest

    folder = built(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False, refittable=True))
    assert Manifest.load(folder).tensorrt.refittable
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_lora(Manifest.load(folder), a, 4, 0)
    random_lora(Manifest.load(folder), b, 4, 1)
    args = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=4, height=64, width=64, seed=5,
                output_type="np")
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu", loras=[(a, 0.8)]) as host:
        want_a = host(**args).images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        base = pipe(**args).images
        pipe.set_loras([(a, 0.8)])
        got_a = pipe(**args).images
        pipe.set_loras([(b, 0.8)])
        got_b = pipe(**args).images
        pipe.set_loras([(a, 0.8)])
        np.testing.assert_array_equal(pipe(**args).images, got_a)
        pipe.set_loras([])
        np.testing.assert_array_equal(pipe(**args).images, base)
        assert pipe.engines["unet"].device_loop.captures >= 4  # a new capture after each refit
    assert same_image(want_a, got_a), psnr(want_a, got_a)
    assert psnr(got_a, base) < 60 and psnr(got_a, got_b) < 60


def test_embeddings_refit_the_token_table(fake_gpu, fp16_folder, tmp_path):
    """A textual-inversion embedding on --refittable engines: the text encoder's token table refitted with the
    vectors in its spare rows gives the ONNX Runtime image."""
    from safetensors.numpy import save_file

    folder = built(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False, refittable=True))
    save_file({"<toy>": np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)},
              str(tmp_path / "toy.safetensors"))
    args = dict(prompt="a photo of <toy>", negative_prompt="blurry", num_inference_steps=4, height=64, width=64,
                seed=5, output_type="np")
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu", embeddings=[tmp_path / "toy.safetensors"]) as host:
        want = host(**args).images
    with Pipeline.from_dir(folder, backend="tensorrt", embeddings=[tmp_path / "toy.safetensors"]) as pipe:
        got = pipe(**args).images
    with Pipeline.from_dir(folder, backend="tensorrt") as plain:
        without = plain(**args).images
    assert same_image(want, got), psnr(want, got)
    assert psnr(got, without) < 60
