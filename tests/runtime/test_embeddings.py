"""Textual-inversion embeddings without re-export: their vectors go into the text encoder's spare token rows (a
replaced initializer), the tokenizer gains their tokens, multi-vector tokens expand as diffusers' maybe_convert_prompt
does; against diffusers' load_textual_inversion on the mid-size model (A1111's emb_params file with 3 vectors, and
diffusers' learned_embeds with one), fp32, ONNX Runtime CPU."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline

PROMPTS = ["a photo of <cat-toy> on a table", "a castle, <cat-toy>"]
KWARGS = dict(negative_prompt=["badhands, blurry"] * 2, num_inference_steps=8, height=64, width=96, output_type="np")


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(5)
    save_file({"emb_params": rng.standard_normal((3, 128)).astype(np.float32)}, str(base / "badhands.safetensors"))
    save_file({"<cat-toy>": rng.standard_normal(128).astype(np.float32)}, str(base / "learned_embeds.safetensors"))
    return base


def latents():
    return np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)


def test_embeddings_match_diffusers_load_textual_inversion(small_model, embedding_files):
    from diffusers import StableDiffusionPipeline

    files = [embedding_files / "badhands.safetensors", embedding_files / "learned_embeds.safetensors"]
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", embeddings=files) as pipe:
        assert set(pipe.embeddings) == {"badhands", "<cat-toy>"}
        got = pipe(PROMPTS, latents=latents(), scheduler="pndm", **KWARGS).images
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu") as plain:
        without = plain(PROMPTS, latents=latents(), scheduler="pndm", **KWARGS).images
    theirs = StableDiffusionPipeline.from_pretrained(small_model[1], safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(str(files[0]), token="badhands")
    theirs.load_textual_inversion(str(files[1]))
    want = theirs(PROMPTS, latents=torch.from_numpy(latents()), **KWARGS).images
    assert psnr(got, want) >= 40, psnr(got, want)
    assert psnr(got, without) < 40  # the vectors are used, not the words' own tokens


def test_an_embeddings_folder_and_loras_together(small_model, embedding_files, lora_files):
    # A1111's embeddings/ folder (every file, its name the token) with a LoRA that also changes the text encoder:
    # the token table and the LoRA's text-encoder weights are one set of replaced initializers
    style, _ = lora_files
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", embeddings=[embedding_files]) as pipe:
        assert set(pipe.embeddings) == {"badhands", "<cat-toy>"}
        first = pipe(PROMPTS, latents=latents(), scheduler="pndm", **KWARGS).images
        pipe.set_loras([(style, 0.6)])
        pipe.set_loras([])
        again = pipe(PROMPTS, latents=latents(), scheduler="pndm", **KWARGS).images
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("content, needle", [
    ({"emb_params": np.zeros((2, 64), np.float32)}, "has 64-wide vectors; this model's text encoder takes 128"),
    ({"a": np.zeros(128, np.float32), "b": np.zeros(128, np.float32)}, "is not a textual-inversion embedding"),
    ({"emb_params": np.zeros((65, 128), np.float32)}, "needs 65 token rows; this folder has 64 of 64 left"),
    ({"emb_params": np.full((1, 128), np.nan, np.float32)}, "holds NaN/Inf"),
])
def test_bad_embeddings_are_one_line(cli, small_model, tmp_path, content, needle):
    save_file(content, str(tmp_path / "bad.safetensors"))
    code, _, err = cli("generate", small_model[0], "a bad photo", "--embedding", tmp_path / "bad.safetensors",
                       "--steps", "2", "-o", tmp_path / "x.png")
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_an_unknown_embedding_token_is_a_warning_and_the_words_are_used(cli, small_model, embedding_files, tmp_path):
    code, _, err = cli("generate", small_model[0], "a photo of <dog-toy>, <cat-toy>", "--embedding",
                       embedding_files / "learned_embeds.safetensors", "--steps", "2", "--size", "64x64", "-o",
                       tmp_path / "x.png")
    assert code == 0, err
    assert "warning: <dog-toy> looks like a textual-inversion token but no such embedding is loaded" in err
    assert "<cat-toy>" not in err.split("warning:")[1].split("\n")[0]  # the loaded one is not warned about


def test_an_embedding_reads_every_vector_however_its_name_is_cased(small_model, tmp_path):
    # A1111 matches embedding names in CLIP's lower-cased tokens: "easynegative" is EasyNegative, all 3 vectors
    save_file({"emb_params": np.random.default_rng(9).standard_normal((3, 128)).astype(np.float32)},
              str(tmp_path / "EasyNegative.safetensors"))
    kwargs = dict(num_inference_steps=2, height=64, width=64, seed=1, output_type="np", negative_prompt=None)
    with Pipeline.from_dir(small_model[0], backend="onnxruntime-cpu", embeddings=[tmp_path]) as pipe:
        plan = pipe.plan(pipe_request("a cat", "easynegative, blurry"))
        assert plan.negatives == ("easynegative EasyNegative_1 EasyNegative_2, blurry",)
        lower = pipe("a cat", **{**kwargs, "negative_prompt": "easynegative, blurry"}).images
        upper = pipe("a cat", **{**kwargs, "negative_prompt": "EasyNegative, blurry"}).images
    np.testing.assert_array_equal(lower, upper)


def pipe_request(prompt, negative):
    from sdtrt.runtime.request import GenerationRequest

    return GenerationRequest.create(prompt, negative, 2, 7.5, 64, 64, 1)
