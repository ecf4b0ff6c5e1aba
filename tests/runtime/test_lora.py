"""LoRAs at generation time, torch-free, no re-export: the same PEFT and kohya LoRAs as tests/export/test_lora.py
applied by `Pipeline.from_dir(loras=…)`, `set_loras` and A1111's `<lora:name:weight>` tags, against diffusers'
load_lora_weights + fuse_lora (and set_adapters for two) on the mid-size model, fp32, ONNX Runtime CPU."""

import time

import numpy as np
import pytest
import torch

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline

PROMPTS = ["a red fox", "a castle"]
KWARGS = dict(negative_prompt=["blurry"] * 2, num_inference_steps=8, height=64, width=96, output_type="np")


def latents():
    return np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)


def diffusers_images(folder, setup):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    setup(pipe)
    return pipe(PROMPTS, latents=torch.from_numpy(latents()), **KWARGS).images


def ours(pipe, prompts=PROMPTS):
    return pipe(prompts, latents=latents(), scheduler="pndm", **KWARGS).images


@pytest.fixture(scope="module")
def lora_pipe(small_model):
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as pipe:
        yield pipe


def test_a_peft_lora_at_generation_time_matches_diffusers(small_model, lora_files):
    style, _ = lora_files

    def setup(pipe):
        pipe.load_lora_weights(style.parent, weight_name=style.name)
        pipe.fuse_lora(lora_scale=0.8)

    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", loras=[(style, 0.8)]) as pipe:
        got = ours(pipe)
    want = diffusers_images(small_model[1], setup)
    assert psnr(got, want) >= 40, psnr(got, want)


def test_two_loras_swapped_in_and_back_out_never_accumulate(lora_pipe, small_model, lora_files):
    style, kohya = lora_files

    def setup(pipe):
        pipe.load_lora_weights(style.parent, weight_name=style.name, adapter_name="style")
        pipe.load_lora_weights(kohya.parent, weight_name=kohya.name, adapter_name="char")
        pipe.set_adapters(["style", "char"], [0.7, 0.5])
        pipe.fuse_lora(adapter_names=["style", "char"])

    base = ours(lora_pipe)
    lora_pipe.set_loras([f"{style}:0.7", (kohya, 0.5)])
    both = ours(lora_pipe)
    want = diffusers_images(small_model[1], setup)
    assert psnr(both, want) >= 40, psnr(both, want)
    lora_pipe.set_loras([(kohya, 0.5)])
    only_b = ours(lora_pipe)
    lora_pipe.set_loras([f"{style}:0.7", (kohya, 0.5)])
    np.testing.assert_array_equal(ours(lora_pipe), both)  # A+B -> B -> A+B: exactly the first image
    lora_pipe.set_loras([])
    np.testing.assert_array_equal(ours(lora_pipe), base)  # and none: the base weights, exactly
    assert psnr(only_b, both) < 40 and psnr(base, only_b) < 40


def test_a1111_prompt_tags_apply_loras_for_that_generation(small_model, lora_files):
    style, _ = lora_files
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", lora_dir=style.parent) as pipe:
        tagged = pipe(["a red fox <lora:style:0.8>", "a castle"], latents=latents(), scheduler="pndm", **KWARGS)
        plain = ours(pipe)
        pipe.set_loras([(style, 0.8)])
        explicit = ours(pipe)
    np.testing.assert_array_equal(tagged.images, explicit)
    assert psnr(plain, explicit) < 40
    text = tagged.parameters[0]
    assert text.startswith("a red fox <lora:style:0.8>") and 'Lora hashes: "style: ' in text


def test_loras_on_the_device_loop_give_the_host_loop_image(small_model, lora_files):
    style, kohya = lora_files
    loras = [(style, 0.7), (kohya, 0.5)]
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", loras=loras) as host, \
            Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", loras=loras, device_loop=True) as device:
        assert psnr(ours(host), ours(device)) >= 60


@pytest.mark.parametrize("lora, needle", [
    ("missing.safetensors", "LoRA file {base}/missing.safetensors does not exist"),
    ("style.safetensors:nan", "LoRA scale must be finite"),
    ("x.ckpt", "is pickled (.ckpt): only .safetensors LoRAs are read at generation time"),
    ("junk.safetensors", "holds no LoRA layers (no lora_down/lora_A weights): not a LoRA"),
    ("tiny_lora.safetensors", "0 of its 78 layers match this model's"),
])
def test_bad_loras_at_generation_time_are_one_line(cli, tmp_path, small_model, lora_files, lora, needle):
    from tests.export.test_lora import prepare_bad_files

    base = prepare_bad_files(lora_files[0].parent, tmp_path)
    code, _, err = cli("generate", small_model[0], "a cat", "--lora", f"{base}/{lora}", "--steps", "2", "-o",
                       tmp_path / "x.png")
    assert code == 2 and len(err.splitlines()) == 1 and needle.format(base=base) in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_prompt_tag_without_a_lora_dir_names_the_option(cli, tmp_path, small_model):
    code, _, err = cli("generate", small_model[0], "a cat <lora:style:0.5>", "--steps", "2", "-o", tmp_path / "x.png")
    assert code == 2 and "give the folder of LoRA files (lora_dir=, or --lora-dir)" in err, err


def test_a_failed_swap_leaves_the_pipeline_as_it_was_and_a_rewritten_file_is_read_again(small_model, lora_files,
                                                                                          tmp_path):
    import shutil

    style, kohya = lora_files
    target = tmp_path / "mine.safetensors"
    shutil.copy(style, target)
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", loras=[(target, 0.8)]) as pipe:
        first = ours(pipe)
        with pytest.raises(Exception, match="does not exist"):
            pipe.set_loras([(tmp_path / "missing.safetensors", 1.0)])
        np.testing.assert_array_equal(ours(pipe), first)  # still the first LoRA, and generations still run
        time.sleep(0.01)
        shutil.copy(kohya, target)  # the same path, other weights
        pipe.set_loras([(target, 0.8)])
        assert psnr(ours(pipe), first) < 40


def test_prompt_tags_and_lora_lists_are_read_strictly(small_model, lora_files):
    from sdtrt.errors import UsageError
    from sdtrt.runtime.adapters import normalize_loras

    assert normalize_loras(("a.safetensors:0.5", "b.safetensors")) == (("a.safetensors", 0.5), ("b.safetensors", 1.0))
    assert normalize_loras(("a.safetensors", 0.5)) == (("a.safetensors", 0.5),)
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", lora_dir=lora_files[0].parent) as pipe:
        for prompt, needle in (("a <lora:../style:1>", "without a path"),
                               ("a <lora:style:0.8:0.2>", "separate text-encoder and U-Net weights")):
            with pytest.raises(UsageError, match=needle):
                pipe(prompt, num_inference_steps=2, height=64, width=64)


def test_dora_and_lycoris_layers_are_refused_not_skipped(small_model, lora_files, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sdtrt.errors import UsageError

    tensors = load_file(str(lora_files[1]))
    key = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors[key.replace(".lora_down.weight", ".dora_scale")] = np.ones((1, 4), np.float32)
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as pipe:
        with pytest.raises(UsageError, match="DoRA or LyCORIS layers"):
            pipe.set_loras([(tmp_path / "dora.safetensors", 1.0)])


def test_a_bfloat16_lora_reads_as_its_float32_values(small_model, lora_files, tmp_path):
    """bfloat16 files (NumPy has no bfloat16: read from the file's layout) give exactly the image of the same
    values stored as float32."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_files[1]))
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    save_file({k: v.float() for k, v in bf16.items()}, str(tmp_path / "f32.safetensors"))
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as pipe:
        pipe.set_loras([(tmp_path / "bf16.safetensors", 0.7)])
        a = ours(pipe)
        pipe.set_loras([(tmp_path / "f32.safetensors", 0.7)])
        b = ours(pipe)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("graph", ["unet.onnx", "text_encoder.onnx", "vae_decoder.onnx", "sampler_update.onnx"])
def test_base_weight_reads_any_initializer_of_a_graph(tiny_export, graph):
    """A refit supplies every weight TensorRT combined with a changed one (biases inside the .onnx, fused partners in
    its external data): the one base-weight reader reads any initializer by name, without the onnx package, as onnx
    does."""
    import onnx
    from onnx import numpy_helper

    from sdtrt.runtime.lora import base_weight, onnx_initializers

    folder, manifest = tiny_export
    model = onnx.load(str(folder / graph))
    found = onnx_initializers(folder / graph)
    assert len(found) == len(model.graph.initializer)
    for init in model.graph.initializer:
        want = numpy_helper.to_array(init)
        got = base_weight(folder, (graph, init.name))
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), init.name
    for entry in (manifest.components[graph[:-5]].weights or {}).values():  # a mapped weight: the same either way
        np.testing.assert_array_equal(base_weight(folder, entry), base_weight(folder, (graph, entry.initializer)))
