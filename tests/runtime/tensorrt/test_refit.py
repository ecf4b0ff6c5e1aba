"""Refit on --refittable engines against a refitter as strict as TensorRT's (fakes.Refitter): combined weights reported
missing, prototypes checked, names outside the refittable set refused, a failed refit applying a random subset.

Each ``test_defect_*`` failed on the code before issue 21's fix (the issue's closing note names the failure)."""

import logging

import numpy as np
import pytest

from sdtrt.manifest import Manifest
from sdtrt.runtime import Pipeline
from sdtrt.runtime.backends import BackendError
from sdtrt.runtime.tensorrt.build import BuildConfig
from tests.runtime.tensorrt import fakes
from tests.runtime.tensorrt.test_backend import built, same_image

REFITTABLE = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False, refittable=True)
ARGS = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=3, height=64, width=64, seed=5,
            output_type="np")


@pytest.fixture
def loras(fake_gpu, fp16_folder, tmp_path):
    from sdtrt.benchmarks.lora_swap import random_lora

    folder = built(fp16_folder, REFITTABLE)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_lora(Manifest.load(folder), a, 4, 0)
    random_lora(Manifest.load(folder), b, 4, 1)
    return folder, a, b


def test_the_fake_reports_biases_and_fused_projections_as_missing(loras):
    """What the backend must cope with: setting one attention projection leaves its fused partners and the biases
    combined with them missing, and refit_cuda_engine refuses until they are supplied."""
    folder, _, _ = loras
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        unet = pipe.engines["unet"]
        weights = unet.component.weights
        out = next(e for p, e in weights.items() if p.endswith("attn1.to_out.0"))
        q = next(e for p, e in weights.items() if p.endswith("attn1.to_q"))
        trt = unet.trt
        refitter = trt.Refitter(unet.engine, trt.Logger(trt.Logger.WARNING))
        assert out.initializer in refitter.get_all_weights()
        value = unet._base_weight(out.initializer)
        assert refitter.set_named_weights(out.initializer, trt.Weights(value))
        assert any("bias" in n for n in refitter.get_missing_weights()), refitter.get_missing_weights()
        assert refitter.set_named_weights(q.initializer, trt.Weights(unet._base_weight(q.initializer)))
        assert len(refitter.get_missing_weights()) >= 3  # to_k, to_v (fused with to_q) and to_out's bias
        assert not refitter.set_named_weights("no such weight", trt.Weights(value))
        assert not refitter.set_named_weights(out.initializer, trt.Weights(value.astype(np.float32)))  # dtype
        assert refitter.get_weights_prototype("no such weight").size == -1


def test_defect_refit_supplies_every_weight_tensorrt_combined_with_a_changed_one(loras):
    """A LoRA changes attention projections; TensorRT reports their biases and fused partners missing, and without
    them refit_cuda_engine returns False. They are supplied from the graph's own values (any initializer, read from
    the ONNX: biases live inside the .onnx, weights in its external data), and the image is ONNX Runtime's."""
    folder, a, _ = loras
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu", loras=[(a, 0.8)]) as host:
        want = host(**ARGS).images
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        base = pipe(**ARGS).images
        pipe.set_loras([(a, 0.8)])
        got = pipe(**ARGS).images
        assert pipe.engines["unet"].refit.touched  # the LoRA's weights; the supplied partners are back at base
    assert same_image(want, got) and not same_image(base, got)


def test_defect_weights_are_converted_to_the_engine_dtype_after_the_prototype_check(loras):
    folder, _, _ = loras
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        unet = pipe.engines["unet"]
        entry = next(iter(unet.component.weights.values()))
        base = unet._base_weight(entry.initializer)
        assert base.dtype == np.float16
        unet.override({entry.initializer: base.astype(np.float64)})  # TensorRT's Weights have no float64
        np.testing.assert_array_equal(unet.engine.refitted[entry.initializer], base)
        with pytest.raises(BackendError, match=r"has \d+ values, the engine's has \d+"):
            unet.override({entry.initializer: base[:1]})


def test_defect_weights_tensorrt_cannot_refit_are_named_at_load_and_refused(loras, caplog):
    """A mapped weight folded away at build is not in get_all_weights(): named when the engine loads, and a LoRA
    that needs it is refused before any weight changes (not half applied)."""
    folder, a, _ = loras
    manifest = Manifest.load(folder)
    folded = next(e.initializer for p, e in manifest.components["unet"].weights.items() if p.endswith("attn1.to_q"))
    fakes.CURRENT["folded"] = {folded}
    with caplog.at_level(logging.WARNING, logger="sdtrt"), Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        assert any(folded in r.getMessage() and "not refittable" in r.getMessage() for r in caplog.records)
        base = pipe(**ARGS).images
        with pytest.raises(BackendError, match=f"TensorRT cannot refit {folded}"):
            pipe.set_loras([(a, 0.8)])
        np.testing.assert_array_equal(pipe(**ARGS).images, base)
        assert pipe.engines["unet"].engine.refitted == {}


def fail_refits(monkeypatch, times):
    """The next ``times`` refit_cuda_engine calls apply a random subset and return False, as TensorRT may."""
    real = fakes.Refitter.refit_cuda_engine
    left = [times]

    def failing(self):
        if left[0] > 0:
            left[0] -= 1
            names = sorted(self.pending)
            self.engine._refit({n: self.pending[n] for n in names[::2]})  # a subset was refitted
            return False
        return real(self)

    monkeypatch.setattr(fakes.Refitter, "refit_cuda_engine", failing)


def test_defect_a_failed_swap_leaves_the_pipeline_as_it_was(loras, monkeypatch):
    """set_loras B fails after TensorRT applied part of it: the pipeline still gives A's image (base restored, A
    applied again from it), never a mix of A and B reported as A."""
    folder, a, b = loras
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        pipe.set_loras([(a, 0.8)])
        want_a = pipe(**ARGS).images
        fail_refits(monkeypatch, 1)
        with pytest.raises(BackendError, match="could not refit unet"):
            pipe.set_loras([(b, 0.8)])
        assert pipe.loras == ((str(a), 0.8),)
        np.testing.assert_array_equal(pipe(**ARGS).images, want_a)


def test_defect_generations_are_refused_when_even_restoring_the_base_fails(loras, monkeypatch):
    folder, a, b = loras
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        base = pipe(**ARGS).images
        pipe.set_loras([(a, 0.8)])
        fail_refits(monkeypatch, 2)  # the swap and its undoing
        with pytest.raises(BackendError, match="could not refit unet"):
            pipe.set_loras([(b, 0.8)])
        with pytest.raises(BackendError, match="the unet engine's weights are in an unknown state .* generations are "
                                               "refused until a LoRA change succeeds"):
            pipe(**ARGS)
        pipe.set_loras([])  # TensorRT refits again: every weight of the failed attempts is written from the base
        np.testing.assert_array_equal(pipe(**ARGS).images, base)


def test_refit_then_replay_then_back_then_replay(loras):
    """A refit invalidates the captured graph (the fake's graph holds the weights it captured): every generation
    after a swap gives the swap's image, replayed or not."""
    folder, a, _ = loras
    with Pipeline.from_dir(folder, backend="tensorrt") as pipe:
        base = [pipe(**ARGS).images for _ in range(2)]
        pipe.set_loras([(a, 0.8)])
        with_a = [pipe(**ARGS).images for _ in range(3)]
        pipe.set_loras([])
        back = [pipe(**ARGS).images for _ in range(3)]
        assert pipe.engines["unet"].device_loop.captures >= 3
    np.testing.assert_array_equal(base[0], base[1])
    assert all(np.array_equal(with_a[0], x) for x in with_a) and not same_image(with_a[0], base[0])
    assert all(np.array_equal(base[0], x) for x in back)
