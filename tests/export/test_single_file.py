"""Single-file checkpoints in the original layout (SD 1.x, SD 2.x with OpenCLIP, inpainting, SDXL base and refiner),
made from random-weight models by ``ldm_layout`` and read back through diffusers' single-file loading with local
configs: the weights come back exactly, and the export of the file is the export of the same weights from diffusers'
own format (the same images for SD; for SDXL, which the runtime does not run yet, the same graphs, byte for byte)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from sdtrt.export import ExportConfig, export
from sdtrt.export.loaders import load_model
from sdtrt.export.single_file import _UNET_IN, detect, load_single_file, read_header, sampling_markers
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.export.ldm_layout import to_ldm

_SDXL = {_UNET_IN: (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
         "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
         "conditioner.embedders.1.model.positional_embedding": (77, 1280)}
_REFINER = {_UNET_IN: (384, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
            "conditioner.embedders.0.model.positional_embedding": (77, 1280)}


def single_file(tmp_path, name, openclip=False, extra=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({**to_ldm(load_model(name), openclip=openclip), **(extra or {})}, str(path))
    return path


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory):
    """name -> the tiny SDXL-shaped built-in as a single file in Stability's layout, written once per module. The
    refiner carries ComfyUI's ``v_pred`` marker (an empty tensor), as v-prediction SDXL fine-tunes do."""
    folder = tmp_path_factory.mktemp("xl")
    cache = {}

    def get(name):
        if name not in cache:
            extra = {"v_pred": torch.zeros(0)} if name == "tiny-xl-refiner" else None
            cache[name] = single_file(folder, name, extra=extra)
        return cache[name]

    return get


def assert_same_modules(want, got):
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(want, component), getattr(got, component)
        assert type(a) is type(b), component
        if a is None:
            continue
        a, b = a.state_dict(), b.state_dict()
        assert a.keys() == b.keys(), component
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), component


@pytest.mark.parametrize("name, openclip, family", [("small", False, "sd15"), ("small-v", True, "sd21"),
                                                     ("small-inpaint", False, "sd15-inpaint")])
def test_weights_come_back_exactly_and_the_family_is_read_from_the_keys(tmp_path, name, openclip, family):
    path = single_file(tmp_path, name, openclip)
    assert detect(read_header(path, False))[0] == family
    want, got = load_model(name), load_single_file(path, config=name)
    assert_same_modules(want, got)
    assert got.prediction_type == ("v_prediction" if openclip else "epsilon")


# SDXL in Stability's layout: CLIP ViT-L at conditioner.embedders.0.transformer and OpenCLIP (in_proj stacked,
# text_projection transposed) at .1.model; the refiner's OpenCLIP alone at .0.model; label_emb.* (added conditioning)
@pytest.mark.parametrize("name, family, prediction", [("tiny-xl", "sdxl", "epsilon"),
                                                      ("tiny-xl-refiner", "sdxl-refiner", "v_prediction"),
                                                      ("tiny-xl-inpaint", "sdxl-inpaint", "epsilon")])
def test_sdxl_weights_come_back_exactly_and_the_family_is_read_from_the_keys(xl_files, name, family, prediction):
    path = xl_files(name)
    assert detect(read_header(path, False))[0] == family
    want, got = load_model(name), load_single_file(path, config=name)
    assert_same_modules(want, got)
    assert (got.family, got.pipeline_config) == (want.family, want.pipeline_config)
    assert got.prediction_type == prediction  # the refiner's file has the v_pred marker
    prompts = ["a red fox, highly detailed", "!!"]
    for (_, _, a), (_, _, b) in zip(want.encoders, got.encoders, strict=True):
        assert (a.pad_token, len(a)) == (b.pad_token, len(b))
        assert a(prompts, padding="max_length").input_ids == b(prompts, padding="max_length").input_ids


# the v-prediction / OpenCLIP (SD 2.x) checkpoint: the same conversion at sd21's layout, ~80 s: in `-m slow`
# (its keys and family are checked above in the default run)
@pytest.mark.parametrize("name, openclip", [("small", False), pytest.param("small-v", True, marks=pytest.mark.slow)])
def test_a_single_file_exports_the_images_of_its_diffusers_folder(tmp_path, name, openclip):
    folder = tmp_path / "diffusers"
    load_model(name).save_pretrained(folder)
    path = single_file(tmp_path, name, openclip)
    ranges = dict(precision="fp32", size_min=64, size_max=128, batch_max=2)
    export(ExportConfig(model=str(folder), out=str(tmp_path / "from_folder"), **ranges), log=lambda s: None)
    export(ExportConfig(model=str(path), out=str(tmp_path / "from_file"), config=name, **ranges), log=lambda s: None)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=6, height=64, width=96, seed=2, output_type="np")
    images = []
    for out in ("from_folder", "from_file"):
        with Pipeline.from_dir(tmp_path / out, backend="onnxruntime-cpu") as pipe:
            images.append(pipe(["a red fox", "a castle"], **kwargs).images)
            assert pipe.manifest.model.prediction_type == ("v_prediction" if openclip else "epsilon")
    assert psnr(*images) >= 100, psnr(*images)


def test_sdxl_tokenizers_from_a_folder(tmp_path, xl_files):
    # --tokenizer DIR: a diffusers model folder gives each encoder its own tokenizer; one tokenizer folder serves both,
    # the OpenCLIP encoder's with "!" padding, which is all SDXL's tokenizer_2 differs by
    model = load_model("tiny-xl")
    model.tokenizer.save_pretrained(tmp_path / "plain")
    for tok, name in ((model.tokenizer, "tokenizer"), (model.tokenizer_2, "tokenizer_2")):
        tok.save_pretrained(tmp_path / "model" / name)
    for folder in ("plain", "model"):
        got = load_single_file(xl_files("tiny-xl"), config="tiny-xl", tokenizer=str(tmp_path / folder))
        assert (got.tokenizer.pad_token, got.tokenizer_2.pad_token) == ("<|endoftext|>", "!"), folder
        assert got.tokenizer_2("a cat", padding="max_length").input_ids == \
            model.tokenizer_2("a cat", padding="max_length").input_ids


# the refiner's, ~40 s more: in `-m slow` (its weights, tokenizer and v_pred marker are checked above)
@pytest.mark.parametrize("fixture", ["tiny_xl_model", pytest.param("tiny_xl_refiner_model", marks=pytest.mark.slow)])
def test_a_single_sdxl_file_exports_the_images_of_its_diffusers_folder(request, tmp_path, fixture):
    # conftest's export of the diffusers folder is the reference; the file holds that folder's weights. Every graph
    # comes out byte-identical (the manifest's sha256: the same model description, ranges and validation too), the
    # same tokenizers, and the same images
    reference, folder = request.getfixturevalue(fixture)
    name = {"tiny_xl_model": "tiny-xl", "tiny_xl_refiner_model": "tiny-xl-refiner"}[fixture]
    path = tmp_path / "model.safetensors"
    save_file(to_ldm(load_model(str(folder))), str(path))
    out = tmp_path / "from_file"
    export(ExportConfig(model=str(path), out=str(out), config=name, precision="fp32", size_min=64, size_max=256,
                        batch_max=2), log=lambda s: None)
    want, got = (json.loads((o / "manifest.json").read_text()) for o in (reference, out))
    assert got["model"].pop("source") == str(path) and want["model"].pop("source") == str(folder)
    # the gate's measured errors are PyTorch's and ONNX Runtime's float sums: the same to a few ulps, not to the bit
    # (MKL's kernels may sum in another order with another buffer alignment; seen on an AVX2 CPU)
    errors = [[v.pop(k) for c in m["components"].values() for v in c.get("validation", ())
               for k in ("max_abs_error", "max_rel_error")] for m in (want, got)]
    assert want == got
    assert np.allclose(*errors, rtol=0.5, atol=1e-6), errors
    prompts = ["a castle at dusk", ""]
    for e in got["model"]["text_encoders"]:
        a, b = (CLIPTokenizer.from_pretrained(o / e["tokenizer"]) for o in (reference, out))
        assert a.pad_token == b.pad_token and a(prompts).input_ids == b(prompts).input_ids
    if name == "tiny-xl":  # the refiner refines an image: its graphs are the same files, checked above
        kwargs = dict(negative_prompt="blurry", num_inference_steps=6, height=64, width=96, seed=2, output_type="np")
        images = []
        for engine in (reference, out):
            with Pipeline.from_dir(engine, backend="onnxruntime-cpu") as pipe:
                images.append(pipe(["a red fox", "a castle"], **kwargs).images)
        assert psnr(*images) >= 100, psnr(*images)


@pytest.mark.parametrize("keys, want", [
    ({**_SDXL, _UNET_IN: (320, 9, 3, 3)}, "sdxl-inpaint"),
    ({**_SDXL, "conditioner.embedders.1.model.text_projection": (1280, 1280)}, "sdxl"),
    ({**_REFINER, _UNET_IN: (384, 4, 3, 3)}, "sdxl-refiner"),
])
def test_sdxl_families_are_read_from_the_keys(keys, want):
    assert detect(keys)[0] == want


def test_marker_keys_set_the_schedule():
    # ComfyUI's convention for v-prediction (and zero-terminal-SNR) SDXL fine-tunes; a ztsnr schedule is then refused
    # by the runtime's samplers by name, instead of being sampled as an ordinary one
    from sdtrt.errors import ModelSourceError
    from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
    from sdtrt.runtime.samplers import SamplerConfig, SamplerError

    assert sampling_markers(_SDXL) == {}
    markers = sampling_markers({**_SDXL, "v_pred": (0,), "ztsnr": (0,)})
    assert markers == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    arch = BUILTIN_ARCHITECTURES["sdxl"]
    config = {"_class_name": arch.scheduler_class, **arch.scheduler}
    assert SamplerConfig.from_scheduler_config(config).prediction_type == "epsilon"
    with pytest.raises(SamplerError, match="zero-terminal-SNR"):
        SamplerConfig.from_scheduler_config({**config, **markers})
    with pytest.raises(ModelSourceError, match="EDM model"):
        sampling_markers({**_SDXL, "edm_vpred.sigma_max": (1,)})


@pytest.mark.parametrize("keys, needle", [
    ({"conditioner.embedders.0.model.x": (1,), "conditioner.embedders.1.model.x": (1,), _UNET_IN: (320, 4, 3, 3)},
     "text encoders sdtrt does not know: conditioner.embedders 0.model, 1.model"),
    ({k: v for k, v in _SDXL.items() if "label_emb" not in k}, "the U-Net has no model.diffusion_model.label_emb."),
    ({**_REFINER, _UNET_IN: (384, 9, 3, 3)}, "sdtrt has no sdxl-refiner-inpaint configuration"),

    ({"state_dict.x": (1,)}, "not a Stable Diffusion checkpoint in the original layout"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "first_stage_model.x": (1,)},
     "no text encoder this sdtrt knows"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3), "cond_stage_model.transformer.x": (1,)},
     "takes 8 channels"),
])
def test_unknown_layouts_are_named(keys, needle):
    from sdtrt.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match=needle):
        detect(keys)


def test_bad_single_files_are_one_line(cli, tmp_path, xl_files):
    path = single_file(tmp_path, "small")
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 64)
    cases = [
        ([path], "cannot load", "as sd15 (CLIP text encoder (SD 1.x))"),  # small's shapes are not SD 1.5's
        ([path, "--config", "nope"], "--config 'nope': not a built-in configuration", ""),
        ([tmp_path / "model.ckpt"], "is a pickled checkpoint (.ckpt)", "--allow-pickle"),
        ([tmp_path / "junk.safetensors"], "is not a readable safetensors file", ""),
        ([path, "--config", "sd15"], "cannot load", "pass --config NAME"),
        ([xl_files("tiny-xl")], "cannot load", "as sdxl (CLIP ViT-L + OpenCLIP text encoders (SDXL))"),  # not SDXL's
        ([xl_files("tiny-xl"), "--config", "tiny-xl-refiner"], "cannot load", "as tiny-xl-refiner (--config)"),
    ]
    for args, needle, also in cases:
        code, _, err = cli("export", *args, "--out", tmp_path / "out", "--precision", "fp32", "--size", "64:128")
        last = err.splitlines()[-1] if err else ""
        assert code == 2 and "Traceback" not in err and needle in last and also in last, (args, err)
        assert not (tmp_path / "out").exists()
