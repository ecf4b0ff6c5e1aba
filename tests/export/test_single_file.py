"""Single-file checkpoints in the original layout (SD 1.x, SD 2.x with OpenCLIP, inpainting), made from random-weight
models by ``ldm_layout`` and read back through diffusers' single-file loading with local configs: the weights come
back exactly, and the export of the file gives the images of the diffusers-folder export of the same weights."""

import numpy as np
import pytest
from safetensors.torch import save_file

from sdtrt.export import ExportConfig, export
from sdtrt.export.loaders import load_model
from sdtrt.export.single_file import detect, load_single_file, read_header
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.export.ldm_layout import to_ldm


def single_file(tmp_path, name, openclip=False):
    path = tmp_path / f"{name}.safetensors"
    save_file(to_ldm(load_model(name), openclip=openclip), str(path))
    return path


@pytest.mark.parametrize("name, openclip, family", [("small", False, "sd15"), ("small-v", True, "sd21"),
                                                     ("small-inpaint", False, "sd15-inpaint")])
def test_weights_come_back_exactly_and_the_family_is_read_from_the_keys(tmp_path, name, openclip, family):
    path = single_file(tmp_path, name, openclip)
    assert detect(read_header(path, False))[0] == family
    want, got = load_model(name), load_single_file(path, config=name)
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(want, component).state_dict(), getattr(got, component).state_dict()
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), component
    assert got.prediction_type == ("v_prediction" if openclip else "epsilon")


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


@pytest.mark.parametrize("keys, needle", [
    ({"conditioner.embedders.0.x": (1,), "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
     "SDXL is not supported yet"),
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


def test_bad_single_files_are_one_line(cli, tmp_path):
    path = single_file(tmp_path, "small")
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 64)
    cases = [
        ([path], "cannot load", "as sd15 (CLIP text encoder (SD 1.x))"),  # small's shapes are not SD 1.5's
        ([path, "--config", "nope"], "--config 'nope': not a built-in configuration", ""),
        ([tmp_path / "model.ckpt"], "is a pickled checkpoint (.ckpt)", "--allow-pickle"),
        ([tmp_path / "junk.safetensors"], "is not a readable safetensors file", ""),
        ([path, "--config", "sd15"], "cannot load", "pass --config NAME"),
    ]
    for args, needle, also in cases:
        code, _, err = cli("export", *args, "--out", tmp_path / "out", "--precision", "fp32", "--size", "64:128")
        last = err.splitlines()[-1] if err else ""
        assert code == 2 and "Traceback" not in err and needle in last and also in last, (args, err)
        assert not (tmp_path / "out").exists()
