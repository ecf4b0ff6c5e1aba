import pytest

from sdtrt.runtime.tensorrt import api
from tests.conftest import copy_export
from tests.runtime.tensorrt import fakes


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fake TensorRT 10.16 and an H100 behind cuda-python (tests/runtime/tensorrt/fakes.py), installed where sdtrt
    looks them up."""
    cudart = fakes.FakeCudart()
    trt = fakes.fake_tensorrt("10.16.1.11", cudart)
    monkeypatch.setattr(api, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(api, "import_cudart", lambda: cudart)
    return trt, cudart


def _copy(src, tmp_path, name):
    return copy_export(src, tmp_path / name)


@pytest.fixture
def fp32_folder(tiny_fp32, tmp_path):
    return _copy(tiny_fp32[0], tmp_path, "fp32")


@pytest.fixture
def fp16_folder(tiny_fp16, tmp_path):
    return _copy(tiny_fp16[0], tmp_path, "fp16")


@pytest.fixture
def inpaint_folder(tiny_inpaint_fp16, tmp_path):
    return _copy(tiny_inpaint_fp16, tmp_path, "inpaint")


@pytest.fixture
def control_folder(tiny_control_fp16, tmp_path):
    return _copy(tiny_control_fp16, tmp_path, "control")


@pytest.fixture
def xl_folder(tiny_xl_fp16, tmp_path):
    return _copy(tiny_xl_fp16[0], tmp_path, "xl")


@pytest.fixture
def xl_refiner_folder(tiny_xl_refiner_fp16, tmp_path):
    return _copy(tiny_xl_refiner_fp16[0], tmp_path, "xl_refiner")
