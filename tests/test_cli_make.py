"""`sdtrt make-lora` / `sdtrt make-embedding`: the random test files they write are real LoRAs and embeddings, read
the same by diffusers (load_lora_weights + fuse_lora, load_textual_inversion) and by sdtrt's runtime, on the mid-size
model (fp32, ONNX Runtime CPU)."""

import torch

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.runtime.test_lora import PROMPTS, diffusers_images, latents, ours


def test_make_lora_writes_a_lora_diffusers_and_sdtrt_apply_alike(cli, small_model, tmp_path):
    code, _, err = cli("make-lora", small_model[0], tmp_path / "style.safetensors", "--rank", 2, "--seed", 3)
    assert code == 0, err
    assert "wrote" in err and "<lora:style:0.8>" in err

    def setup(pipe):
        pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
        pipe.fuse_lora(lora_scale=0.8)

    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as pipe:
        base = ours(pipe)
        pipe.set_loras([(tmp_path / "style.safetensors", 0.8)])
        got = ours(pipe)
    want = diffusers_images(small_model[1], setup)
    assert psnr(got, want) >= 40, psnr(got, want)
    assert psnr(got, base) < 40  # it changes the image: a LoRA that did nothing would pass the line above too


def test_make_embedding_writes_an_embedding_diffusers_and_sdtrt_read_alike(cli, small_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    code, _, err = cli("make-embedding", small_model[0], tmp_path / "mystyle.safetensors", "--vectors", 3)
    assert code == 0, err
    prompts = [f"{p}, mystyle" for p in PROMPTS]
    kwargs = dict(negative_prompt=["blurry"] * 2, num_inference_steps=8, height=64, width=96, output_type="np")
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", embeddings=[tmp_path / "mystyle.safetensors"]) \
            as pipe:
        got = pipe(prompts, latents=latents(), scheduler="pndm", **kwargs).images
    theirs = StableDiffusionPipeline.from_pretrained(small_model[1], safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(str(tmp_path / "mystyle.safetensors"), token="mystyle")
    want = theirs(prompts, latents=torch.from_numpy(latents()), **kwargs).images
    assert psnr(got, want) >= 40, psnr(got, want)
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as plain:
        without = plain(prompts, latents=latents(), scheduler="pndm", **kwargs).images
    assert psnr(got, without) < 40


def test_make_refuses_bad_targets(cli, engine, tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    for argv, needle in [(("make-lora", engine, tmp_path / "x.bin"), "must be a file name ending in .safetensors"),
                         (("make-lora", engine, tmp_path / "taken.safetensors"), "exists (pass --force"),
                         (("make-lora", engine, tmp_path / "y.safetensors", "--rank", 0), "--rank must be at least 1"),
                         (("make-embedding", engine, tmp_path / "z.safetensors", "--vectors", 0), "--vectors must be"),
                         (("make-embedding", tmp_path / "nowhere", tmp_path / "z.safetensors"), "does not exist")]:
        code, _, err = cli(*argv)
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["taken.safetensors"]
