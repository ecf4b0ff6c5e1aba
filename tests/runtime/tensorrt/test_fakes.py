"""The fakes keep the rules of the real TensorRT and CUDA, so a test that passes on them would not be hiding a
defect that a GPU shows (each rule here is one a review found the backend breaking)."""

import numpy as np
import pytest

from tests.runtime.tensorrt import fakes


@pytest.fixture
def gpu():
    cudart = fakes.FakeCudart()
    return fakes.fake_tensorrt("10.16.1.11", cudart), cudart


def _ok(cudart, result):
    err, *values = result
    assert err == cudart.cudaError_t.cudaSuccess, err
    return values[0] if values else None


def test_fresh_device_memory_is_garbage_nan_not_zeros(gpu):
    _, cudart = gpu
    ptr = _ok(cudart, cudart.cudaMalloc(64))
    assert ptr % 256 == 0
    assert np.isnan(cudart.view(ptr, 64).view(np.float16)).all()
    assert np.isnan(cudart.view(ptr, 64).view(np.float32)).all()


def _context(tiny_fp16, trt, name="sampler_update"):
    import json

    manifest = tiny_fp16[1]
    plan = {"onnx": str(tiny_fp16[0] / manifest.components[name].file), "version": "10.16.1.11", "profile": {}}
    engine = trt.Runtime(None).deserialize_cuda_engine(json.dumps(plan).encode())
    return engine, engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)


def test_set_tensor_address_refuses_misaligned_pointers_and_keeps_the_old_one(gpu, tiny_fp16):
    trt, cudart = gpu
    _, ctx = _context(tiny_fp16, trt)
    ptr = _ok(cudart, cudart.cudaMalloc(4096))
    assert ctx.set_tensor_address("coefs", ptr)
    assert not ctx.set_tensor_address("coefs", ptr + 40)
    assert ctx.addresses["coefs"] == ptr


def test_enqueue_is_refused_without_addresses_shapes_or_enough_memory(gpu, tiny_fp16):
    trt, cudart = gpu
    engine, ctx = _context(tiny_fp16, trt)
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    assert not ctx.execute_async_v3(stream)  # shapes unset
    for spec in tiny_fp16[1].components["sampler_update"].inputs:
        if spec.name != "coefs":
            assert ctx.set_input_shape(spec.name, (1, 4, 8, 8))
    assert not ctx.execute_async_v3(stream)  # no device memory
    need = ctx.update_device_memory_size_for_shapes()
    block = _ok(cudart, cudart.cudaMalloc(need))
    ctx.set_device_memory(block, need - 1)
    assert not ctx.execute_async_v3(stream)  # too little for these shapes
    ctx.set_device_memory(block, need)
    assert not ctx.execute_async_v3(stream)  # addresses unset
    for n in list(engine._inputs) + engine._outputs:
        ctx.set_tensor_address(n, _ok(cudart, cudart.cudaMalloc(2048)))
    assert ctx.execute_async_v3(stream)


@pytest.mark.parametrize("forbidden", ["sync", "malloc", "free", "pageable copy"])
def test_forbidden_calls_invalidate_a_capture(gpu, forbidden):
    _, cudart = gpu
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    ptr = _ok(cudart, cudart.cudaMalloc(256))
    host = np.zeros(64, np.uint8)
    cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    err, *_ = {"sync": lambda: cudart.cudaStreamSynchronize(stream),
               "malloc": lambda: cudart.cudaMalloc(256),
               "free": lambda: cudart.cudaFree(ptr),
               "pageable copy": lambda: cudart.cudaMemcpyAsync(ptr, host.ctypes.data, 64,
                                                               cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
               }[forbidden]()
    assert err == cudart.cudaError_t.cudaErrorStreamCaptureUnsupported
    assert cudart.cudaStreamEndCapture(stream) == (cudart.cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    assert cudart.live()["graphs"] == 0


def test_pinned_copies_and_kernels_are_captured_and_replayed(gpu):
    _, cudart = gpu
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    ptr = _ok(cudart, cudart.cudaMalloc(256))
    pinned = _ok(cudart, cudart.cudaMallocHost(8))
    cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    _ok(cudart, cudart.cudaMemcpyAsync(ptr, pinned, 8, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream) )
    graph = _ok(cudart, cudart.cudaStreamEndCapture(stream))
    graph_exec = _ok(cudart, cudart.cudaGraphInstantiate(graph, 0))
    assert cudart.live()["graphs"] == cudart.live()["graph execs"] == 1
    np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * 8).from_address(pinned))[:] = 7
    _ok(cudart, cudart.cudaGraphLaunch(graph_exec, stream))
    assert (cudart.view(ptr, 8) != 7).all()  # issued, not run: the host has not waited for the stream
    _ok(cudart, cudart.cudaStreamSynchronize(stream))
    assert (cudart.view(ptr, 8) == 7).all()  # the replay read the pinned buffer as it was at launch
    _ok(cudart, cudart.cudaGraphDestroy(graph) )
    _ok(cudart, cudart.cudaGraphExecDestroy(graph_exec) )
    assert cudart.live()["graphs"] == cudart.live()["graph execs"] == 0
    assert cudart.cudaGraphExecDestroy(graph_exec) == (cudart.cudaError_t.cudaErrorInvalidValue,)  # double destroy


def test_a_shape_must_run_eagerly_before_it_is_captured(gpu, tiny_fp16):
    trt, cudart = gpu
    engine, ctx = _context(tiny_fp16, trt)
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    for spec in tiny_fp16[1].components["sampler_update"].inputs:
        if spec.name != "coefs":
            ctx.set_input_shape(spec.name, (1, 4, 8, 8))
    need = ctx.update_device_memory_size_for_shapes()
    ctx.set_device_memory(_ok(cudart, cudart.cudaMalloc(need)), need)
    for n in list(engine._inputs) + engine._outputs:
        ctx.set_tensor_address(n, _ok(cudart, cudart.cudaMalloc(2048)))
    cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert not ctx.execute_async_v3(stream)
    assert cudart.cudaStreamEndCapture(stream)[0] == cudart.cudaError_t.cudaErrorStreamCaptureInvalidated
    assert ctx.execute_async_v3(stream)  # eager: TensorRT sets up
    cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert ctx.execute_async_v3(stream)
    assert cudart.cudaStreamEndCapture(stream)[0] == cudart.cudaError_t.cudaSuccess


def test_timing_cache_carries_version_and_gpu_and_is_refused_elsewhere(gpu):
    _, cudart = gpu
    config = fakes.IBuilderConfig()
    made = config.create_timing_cache(b"").serialize()
    assert config.set_timing_cache(config.create_timing_cache(made), False)
    cudart.prop = cudart.cudaDeviceProp(b"NVIDIA L4", 8, 9, 24 * 2**30)
    assert not config.set_timing_cache(config.create_timing_cache(made), False)
    assert config.set_timing_cache(config.create_timing_cache(made), True)  # ignore_mismatch
    assert config.create_timing_cache(b"garbage") is None


def test_a_plan_of_another_tensorrt_version_does_not_deserialize(gpu, tiny_fp16):
    import json

    trt, _ = gpu
    plan = {"onnx": str(tiny_fp16[0] / "unet.onnx"), "version": "10.15.1.29", "profile": {}}
    assert trt.Runtime(None).deserialize_cuda_engine(json.dumps(plan).encode()) is None


def _captured(trt, cudart, tiny_fp16):
    """The sampler-update context, run eagerly once, then captured: (engine, context, stream, graph exec)."""
    engine, ctx = _context(tiny_fp16, trt)
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    for spec in tiny_fp16[1].components["sampler_update"].inputs:
        if spec.name != "coefs":
            ctx.set_input_shape(spec.name, (1, 4, 8, 8) if spec.name != "mask" else (1, 1, 8, 8))
    need = ctx.update_device_memory_size_for_shapes()
    ctx.set_device_memory(_ok(cudart, cudart.cudaMalloc(need)), need)
    for n in list(engine._inputs) + engine._outputs:
        ptr = _ok(cudart, cudart.cudaMalloc(2048))
        cudart.view(ptr, 2048)[:] = 0
        ctx.set_tensor_address(n, ptr)
    assert ctx.execute_async_v3(stream)
    cudart.cudaStreamSynchronize(stream)
    cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert ctx.execute_async_v3(stream)
    graph = _ok(cudart, cudart.cudaStreamEndCapture(stream))
    return engine, ctx, stream, _ok(cudart, cudart.cudaGraphInstantiate(graph, 0))


def test_a_graph_replayed_after_its_context_changed_is_an_error(gpu, tiny_fp16):
    trt, cudart = gpu
    _, ctx, stream, graph_exec = _captured(trt, cudart, tiny_fp16)
    _ok(cudart, cudart.cudaGraphLaunch(graph_exec, stream))
    ctx.set_input_shape("noise", (1, 4, 8, 8))  # the same shape, set again: TensorRT's state may move
    with pytest.raises(AssertionError, match="changed its context since the capture"):
        cudart.cudaGraphLaunch(graph_exec, stream)


def test_a_graph_holds_the_weights_it_captured(gpu, tiny_fp16):
    """A refit after a capture is not seen by the replay (the graph must be captured again)."""
    trt, cudart = gpu
    engine, ctx, stream, graph_exec = _captured(trt, cudart, tiny_fp16)
    captured = engine.session
    engine._refit({})  # a new session, as a refit makes
    assert engine.session is not captured
    seen = []
    real = captured.run
    captured.run = lambda *a, **k: seen.append(1) or real(*a, **k)
    _ok(cudart, cudart.cudaGraphLaunch(graph_exec, stream))
    cudart.cudaStreamSynchronize(stream)
    assert seen == [1]


def test_sticky_errors_fail_every_call_but_frees_still_release(gpu):
    _, cudart = gpu
    ptr = _ok(cudart, cudart.cudaMalloc(256))
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(1))
    cudart.sticky_error = cudart.cudaError_t.cudaErrorIllegalAddress
    assert cudart.cudaStreamSynchronize(stream) == (cudart.sticky_error,)
    assert cudart.cudaMalloc(256) == (cudart.sticky_error, None)
    assert cudart.cudaFree(ptr) == (cudart.sticky_error,)
    assert cudart.cudaStreamDestroy(stream) == (cudart.sticky_error,)
    assert not any(cudart.live().values())
