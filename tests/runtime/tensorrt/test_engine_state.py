"""Engine I/O checked once at load, the capture policy, and close paths that cannot stop half-way, against the strict
fakes (issue 21). Each ``test_defect_*`` failed on the code before the fix (the issue's closing note names how)."""

import numpy as np
import pytest

from sdtrt.runtime import Pipeline
from sdtrt.runtime.backends import BackendError
from tests.runtime.tensorrt import fakes
from tests.runtime.tensorrt.test_backend import built

ARGS = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, height=64, width=64, seed=5,
            output_type="np")


# ---- item 3: engine I/O checked once at load ------------------------------------------------------------------

def _only(tensor, value, real):
    def method(self, name):
        return value if self.name == "unet" and name == tensor else real(self, name)
    return method


@pytest.mark.parametrize("method, value, needle", [
    ("get_tensor_dtype", fakes.DataType.FLOAT, r"latents is FLOAT in the engine, the manifest says float16"),
    ("get_tensor_location", fakes.TensorLocation.HOST, r"latents lives in host memory"),
    ("get_tensor_format", fakes.TensorFormat.CHW32, r"latents has the CHW32 layout in the engine; sdtrt reads and "
                                                    r"writes LINEAR"),
    ("is_shape_inference_io", True, r"latents is a shape tensor"),
    ("get_tensor_shape", (-1, 8, -1, -1), r"latents has shape \(-1, 8, -1, -1\) in the engine, the manifest says "
                                         r"\('batch', 4, "),
])
def test_defect_engine_io_that_differs_from_the_manifest_is_refused_at_load(fake_gpu, fp16_folder, monkeypatch,
                                                                             method, value, needle):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    monkeypatch.setattr(fakes.ICudaEngine, method, _only("latents", value, getattr(fakes.ICudaEngine, method)))
    with pytest.raises(BackendError, match=r"engine unet\.trt.*\.plan: " + needle):
        Pipeline.from_dir(folder, backend="tensorrt")
    assert not any(cudart.live().values()), cudart.live()


def test_defect_run_casts_feeds_to_the_engine_dtype(fake_gpu, fp16_folder):
    """int64 token ids (what a tokenizer gives) into an int32 engine input: cast, as ONNX Runtime's path does, not
    their bytes reinterpreted."""
    ids = np.arange(77, dtype=np.int64)[None] % 50
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        text = pipe.engines["text_encoder"]
        assert text.dtype("input_ids") == np.int32
        want = text.run({"input_ids": ids.astype(np.int32)})
        got = text.run({"input_ids": ids})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ---- item 4: capture policy -----------------------------------------------------------------------------------

def test_defect_a_one_shot_generation_captures_nothing_and_enqueues_each_step_once(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        cudart.log.clear()
        pipe(**ARGS)
        assert pipe.engines["unet"].device_loop.captures == 0
        assert "begin-capture" not in cudart.log and cudart.live()["graph execs"] == 0
        assert cudart.log.count("exec:unet") == cudart.log.count("exec:sampler_update") == 7  # PNDM: 6 steps, 7 calls


def test_defect_capture_follows_a_synchronisation_and_a_failed_one_clears_the_error(fake_gpu, fp16_folder,
                                                                                    monkeypatch):
    _, cudart = fake_gpu
    folder = built(fp16_folder)
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        pipe(**ARGS)
        cudart.log.clear()
        pipe(**ARGS)
        log = cudart.log
        begin = log.index("begin-capture")
        assert log[begin - 1] == "sync"  # the stream is idle when the capture starts (trtexec)
        assert "get-last-error" not in log
    real = fakes.IExecutionContext.execute_async_v3

    def fail_inside_capture(self, stream_handle):
        if cudart.capture is not None:
            return self._refuse("resource exhausted during capture")
        return real(self, stream_handle)

    monkeypatch.setattr(fakes.IExecutionContext, "execute_async_v3", fail_inside_capture)
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        first = pipe(**ARGS).images
        cudart.log.clear()
        second = pipe(**ARGS).images
        log = cudart.log
        assert log.index("get-last-error") > log.index("begin-capture")  # trtexec's endCaptureOnError
        assert log.count("exec:unet") == 7  # nothing of the failed capture ran; the eager run did, once
    np.testing.assert_array_equal(first, second)


def test_defect_reserve_does_not_set_unchanged_shapes_under_a_captured_graph(fake_gpu, fp16_folder, monkeypatch):
    calls = []
    real = fakes.IExecutionContext.set_input_shape

    def recording(self, name, shape):
        calls.append((self.engine.name, name))
        return real(self, name, shape)

    monkeypatch.setattr(fakes.IExecutionContext, "set_input_shape", recording)
    with Pipeline.from_dir(built(fp16_folder), backend="tensorrt") as pipe:
        pipe(**ARGS)
        pipe(**ARGS)  # captured
        calls.clear()
        contexts = [pipe.engines["unet"].context, pipe.engines["unet"].device_loop.update.context]
        epochs = [c.epoch for c in contexts]
        pipe(**ARGS)  # replayed
        assert calls == [] and [c.epoch for c in contexts] == epochs


# ---- item 5: close paths that cannot stop half-way; one logger --------------------------------------------------

def test_defect_close_after_a_sticky_cuda_error_still_frees_everything(fake_gpu, fp16_folder):
    _, cudart = fake_gpu
    pipe = Pipeline.from_dir(built(fp16_folder), backend="tensorrt")
    pipe(**ARGS)
    engines = dict(pipe.engines)
    cudart.sticky_error = cudart.cudaError_t.cudaErrorIllegalAddress  # as after an illegal address in a kernel
    with pytest.raises(BackendError, match="cudaErrorIllegalAddress"):
        pipe.close()  # the first error is reported, after everything was tried
    assert all(e.context is None for e in engines.values())
    assert not any(cudart.live().values()), cudart.live()  # stream, shared block, buffers, graph: all given back
    pipe.close()  # twice is harmless


def test_defect_one_tensorrt_logger_per_process(fake_gpu, fp16_folder):
    from sdtrt.runtime.tensorrt.build import BuildConfig

    folder = built(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False, refittable=True))
    for _ in range(2):
        with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
            pipe.engines["unet"].override({})  # a refitter (with nothing to set)
    assert fakes.Logger.made == 1  # builder, runtimes and refitters share it
