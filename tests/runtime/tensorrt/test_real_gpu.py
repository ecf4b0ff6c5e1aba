"""The TensorRT path for real: only where TensorRT, cuda-python and an NVIDIA GPU are present (`-m gpu`).
Not run in this project's CI or on its development machines, which have no GPU."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def real_gpu():
    from sdtrt.runtime.backends import BackendError
    from sdtrt.runtime.tensorrt import api

    try:
        trt, cudart = api.import_tensorrt(), api.import_cudart()
        api.device_info(cudart)
    except BackendError as ex:
        pytest.skip(str(ex))
    return trt, cudart


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "dpmpp_2m"])
def test_real_engines_give_the_onnxruntime_image(real_gpu, fp16_folder, sampler):
    from sdtrt.runtime import Pipeline
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256)), log=lambda s: None)
    kwargs = dict(prompt="a cat", num_inference_steps=10, height=128, width=96, seed=3, scheduler=sampler, output_type="np")
    trt_pipe = Pipeline.from_dir(fp16_folder, backend="tensorrt")
    device = trt_pipe(**kwargs).images
    again = trt_pipe(**kwargs).images  # replayed CUDA graph
    host = Pipeline.from_dir(fp16_folder, backend="onnxruntime-cpu")(**kwargs).images
    np.testing.assert_array_equal(device, again)
    assert trt_pipe.engines["unet"].device_loop.captures == 1
    mse = float(np.mean((device.astype(np.float64) - host) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-20)) >= 30
