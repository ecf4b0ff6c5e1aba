"""`sdtrt doctor`: on this machine (no TensorRT, no GPU) it says what is missing and exits 0; with the fakes it
reports the GPU, whether a folder's engines match it, and runs the short TensorRT-vs-ONNX Runtime check."""

import re

import pytest

from sdtrt.cli import main
from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

SMALL = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False)


def lines(capsys):
    out = capsys.readouterr()
    return out.out, out.err


def test_doctor_on_a_machine_without_tensorrt_says_what_to_install(tiny_fp16, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["doctor", str(tiny_fp16[0])]) == 0
    out, err = lines(capsys)
    assert err == ""
    assert "!! TensorRT:          TensorRT is not available: pip install 'sdtrt[tensorrt-cu12]'" in out
    assert "!! engines:           none: run `sdtrt build" in out
    assert "can run here:      onnxruntime-cpu" in out


@pytest.mark.parametrize("argv, needle", [
    (["doctor", "--run"], "--run needs an engine folder: sdtrt doctor DIR --run"),
    (["doctor", "/no/such/folder"], "/no/such/folder is not an engine folder"),
])
def test_doctor_bad_input_is_one_line(argv, needle, capsys):
    assert main(argv) == 2
    _, err = lines(capsys)
    assert err.strip().splitlines() == [f"sdtrt doctor: error: {needle}"]


def test_doctor_run_without_tensorrt_is_one_line_after_the_report(tiny_fp16, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["doctor", str(tiny_fp16[0]), "--run"]) == 2
    out, err = lines(capsys)
    assert "TensorRT:" in out and err.strip().splitlines() == [
        "sdtrt doctor: error: TensorRT is not available: pip install 'sdtrt[tensorrt-cu12]' (CUDA 12 drivers) or "
        "'sdtrt[tensorrt-cu13]' (CUDA 13 drivers, 580+)"]


@pytest.mark.parametrize("fixture, sampler", [("fp16_folder", "pndm"), ("xl_folder", "euler")])
def test_doctor_with_a_gpu_reports_the_match_and_runs_the_check(fake_gpu, request, fixture, sampler, capsys):
    """SDXL too: the check feeds the added conditions and runs both text encoders; the engines' memory is shown."""
    folder = request.getfixturevalue(fixture)
    build_engines(folder, SMALL, log=lambda s: None)
    assert main(["doctor", str(folder), "--run"]) == 0
    out, _ = lines(capsys)
    assert re.search(r"   engine memory: +\d+\.\d GB of engines \(weights\); \d+\.\d GB of context memory at most "
                     r"\(\w+ at its profile's largest shapes\)", out), out
    assert "ok GPU:               NVIDIA H100 80GB HBM3, sm_90" in out
    assert "ok match:             yes" in out
    assert "!! verified at build: no (built with --no-verify)" in out
    assert f"ok run:               1x 64x64, 4 {sampler} steps, TensorRT vs onnxruntime-cpu: PSNR" in out


def test_doctor_names_engines_built_for_another_gpu(fake_gpu, fp16_folder, capsys):
    build_engines(fp16_folder, SMALL, log=lambda s: None)
    _, cudart = fake_gpu
    cudart.prop = cudart.cudaDeviceProp(b"NVIDIA L4", 8, 9, 24 * 2**30)
    assert main(["doctor", str(fp16_folder)]) == 0
    out, _ = lines(capsys)
    assert f"!! match:             no: this GPU is sm_89; rebuild with `sdtrt build {fp16_folder}`" in out


def test_doctor_names_a_driver_too_old_for_cuda_python(fake_gpu, capsys):
    _, cudart = fake_gpu
    cudart.driver, cudart.runtime = 12020, 13000
    assert main(["doctor"]) == 0
    out, _ = lines(capsys)
    assert "!! NVIDIA driver:     supports CUDA 12.2: the NVIDIA driver supports CUDA 12.2, but this cuda-python" in out
