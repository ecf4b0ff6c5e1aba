"""ONNX Runtime backends: the device loop (sampler-update graph, IO binding on raw buffers) against the NumPy host
loop, with real ONNX Runtime sessions; and the CUDA detection that picks a provider."""

import numpy as np
import pytest

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from sdtrt.runtime import backends
from sdtrt.runtime.backends import OrtMemory


def generate(folder, device_loop, **kwargs):
    args = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, height=96, width=64, seed=5,
                output_type="np")
    args.update(kwargs)
    with Pipeline.from_dir(folder, backend="onnxruntime-cpu", device_loop=device_loop) as pipe:
        return pipe(**args).images


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp_2m", "euler_a", "unipc"])
def test_onnxruntime_device_loop_gives_the_host_loop_image(tiny_export, sampler):
    # The CPU stands in for the GPU: the same IO binding on raw buffers that the CUDA provider uses, so the
    # rings, per-step offsets and the update graph are exercised by real ONNX Runtime runs.
    folder = tiny_export[0]
    host = generate(folder, False, scheduler=sampler)
    device = generate(folder, True, scheduler=sampler)
    assert np.isfinite(device).all() and psnr(host, device) >= 60, psnr(host, device)


TASKS = {  # the picture is 80x70: sizes default to it, rounded down to 80x64
    "img2img": dict(strength=0.6),
    "inpaint": dict(mask_image="box", strength=0.8),
    "inpaint at strength 1": dict(mask_image="box"),
    "outpaint": dict(outpaint=(8, 0, 16, 8)),
}


def task_args(task):
    from tests.runtime.test_tasks import box_mask, picture

    args = dict(TASKS[task], image=picture(80, 70))
    if args.get("mask_image") == "box":
        args["mask_image"] = box_mask(80, 70, (20, 10, 60, 40))
    return args


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "unipc"])
def test_onnxruntime_device_loop_runs_every_task_as_the_host_loop(tiny_fp16, tiny_inpaint_fp16, task, sampler):
    for folder in (tiny_fp16[0], tiny_inpaint_fp16):
        if "inpaint" not in str(folder) or task != "img2img":  # an inpainting U-Net needs a mask
            args = dict(task_args(task), scheduler=sampler, height=None, width=None, prompt=["a cat", "a dog"])
            host, device = generate(folder, False, **args), generate(folder, True, **args)
            assert np.isfinite(device).all() and psnr(host, device) >= 60, (folder, psnr(host, device))


def test_onnxruntime_device_loop_does_no_host_copies_per_step(tiny_fp16, monkeypatch):
    counts = {"upload": 0, "download": 0, "session.run": 0}
    for name in ("upload", "download"):
        real = getattr(OrtMemory, name)

        def counting(self, *args, _real=real, _name=name):
            counts[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(OrtMemory, name, counting)
    per_steps = {}
    with Pipeline.from_dir(tiny_fp16[0], backend="onnxruntime-cpu", device_loop=True) as pipe:
        real_run = pipe.engines["unet"].run

        def run(feeds):
            counts["session.run"] += 1
            return real_run(feeds)

        pipe.engines["unet"].run = run
        for steps in (3, 12):
            before = dict(counts)
            pipe("a cat", num_inference_steps=steps, height=64, width=64, seed=1, scheduler="euler_a")
            per_steps[steps] = {k: counts[k] - before[k] for k in counts}
    assert per_steps[3] == per_steps[12]  # copies per generation, not per step
    assert per_steps[12]["session.run"] == 0  # the U-Net never goes through host arrays in the loop


def test_a_lora_applied_after_the_device_loop_ran_rebinds_it_to_the_new_session(tiny_fp16, tmp_path):
    # set_loras re-creates the sessions; the device loop's IO binding must follow (the CUDA provider binds from the
    # start, as the CPU's device loop does once it ran)
    from sdtrt.runtime.synthetic import random_lora

    lora, images = tmp_path / "style.safetensors", {}
    args = dict(prompt="a cat", num_inference_steps=4, height=64, width=64, seed=3, output_type="np")
    for device_loop in (False, True):
        with Pipeline.from_dir(tiny_fp16[0], backend="onnxruntime-cpu", device_loop=device_loop) as pipe:
            if not lora.exists():
                random_lora(pipe.manifest, lora, rank=4, seed=1, std=0.3)
            plain = pipe(**args).images
            pipe.set_loras([(lora, 1.0)])
            images[device_loop] = pipe(**args).images
    assert psnr(plain, images[True]) < 40  # the LoRA changed the image
    assert psnr(images[False], images[True]) >= 60, psnr(images[False], images[True])


def test_no_gpu_is_claimed_when_nothing_can_tell(monkeypatch):
    import ctypes
    import sys

    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libcuda")))
    assert backends._has_cuda_device() is False
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert backends.ort_provider("auto") == "CPUExecutionProvider"  # onnxruntime-gpu installed, no GPU seen


def test_output_shapes_follow_named_dimensions(tiny_fp16):
    unet = tiny_fp16[1].components["unet"]
    shapes = backends.output_shapes(unet, {"latents": (3, 4, 12, 8), "encoder_hidden_states": (6, 77, 32)})
    assert shapes == {"noise_pred": (3, 4, 12, 8)}
