"""ControlNets for SDXL at export: a ControlNet of the other family, or with other added-condition widths, is refused
with one line (before the base model loads where its config alone says so); an SDXL ControlNet's graph takes the
U-Net's added inputs, FP32 time ids included."""

import json
import shutil

import pytest

from tests.test_bad_input import one_line


def _fake_controlnet(folder, **config):
    """A ControlNet folder whose weights are never read: the family is refused from config.json alone."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"never loaded")
    return folder


@pytest.mark.parametrize("model, config, needle", [
    # the full sdxl: refused in well under its load time (minutes), so before it
    ("sdxl", dict(cross_attention_dim=768), "is an SD 1.x/2.x ControlNet (no SDXL added conditioning); this model is "
                                            "SDXL-family"),
    ("tiny", dict(addition_embed_type="text_time"), "is an SDXL ControlNet (it reads SDXL's pooled text embedding"),
    ("tiny", dict(addition_embed_type="image"), "takes 'image' added conditioning"),
])
def test_a_controlnet_of_the_other_family_is_refused_before_the_model_loads(cli, tmp_path, model, config, needle):
    cn = _fake_controlnet(tmp_path / "cn", **config)
    code, _, err = cli("export", model, "--out", tmp_path / "o", "--controlnet", cn)
    one_line(code, err, "export", needle)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def xl_engine_and_unets(tmp_path_factory, tiny_xl_model):
    from diffusers import UNet2DConditionModel

    from sdtrt.export.loaders import load_model

    engine, folder = tiny_xl_model
    return engine, UNet2DConditionModel.from_pretrained(folder / "unet"), load_model("tiny").unet


@pytest.mark.parametrize("base, changes, needle", [
    # an SD 1.x ControlNet (the tiny model's) on the SDXL-shaped base
    ("sd", {}, "is an SD 1.x/2.x ControlNet (no SDXL added conditioning); this model is SDXL-family"),
    # a refiner-shaped one (5 time ids) on the base (6)
    ("xl", dict(projection_class_embeddings_input_dim=40 + 5 * 8),
     "added conditioning takes 80 values (8 per time id); this model gives a 40-wide pooled embedding and 6 time ids"),
])
def test_export_controlnet_refuses_one_made_for_another_base(cli, tmp_path, xl_engine_and_unets, base, changes,
                                                              needle):
    from sdtrt.export.controlnet import builtin_controlnet

    engine, xl_unet, sd_unet = xl_engine_and_unets
    out = tmp_path / "engine"
    shutil.copytree(engine, out)
    builtin_controlnet(xl_unet if base == "xl" else sd_unet, 4, 8, 0, **changes).save_pretrained(tmp_path / "cn")
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli("export-controlnet", out, tmp_path / "cn")
    one_line(code, err, "export-controlnet", needle, progress=True)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing half-written


def test_an_sdxl_controlnet_graph_takes_the_unets_added_inputs(xl_control_folder):
    """Same names, shapes and dtypes as the U-Net's; in fp16 the time ids stay FP32 and so does their sinusoidal
    embedding (``/controlnet/add_time_proj/``, as the U-Net's): t near 1000 in fp16 is only resolved to 0.5."""
    import onnx

    from sdtrt.manifest import Manifest
    from tests.export.test_low_memory import _value_types

    manifest = Manifest.load(xl_control_folder)
    unet = {s.name: s for s in manifest.components["unet"].inputs}
    component = manifest.controlnets["edges"]
    cn = {s.name: s for s in component.inputs}
    assert cn["text_embeds"] == unet["text_embeds"] and cn["time_ids"] == unet["time_ids"]
    assert (cn["time_ids"].dtype, cn["text_embeds"].dtype) == ("float32", "float16")
    assert component.validation and all(r.passed for r in component.validation)  # the parity gate ran on it
    model = onnx.load(str(xl_control_folder / component.file))
    types = _value_types(model)
    sines = [n for n in model.graph.node if n.name.startswith("/controlnet/add_time_proj/") and n.op_type in ("Sin",
                                                                                                               "Cos")]
    assert sines
    for node in sines:
        assert {types[v] for v in (*node.input, *node.output)} == {onnx.TensorProto.FLOAT}, node.name


@pytest.fixture(scope="module")
def xl_control_folder(tmp_path_factory):
    """tiny-xl in fp16 with the built-in ControlNet (`sdtrt export tiny-xl --controlnet edges=random`)."""
    from tests.conftest import _export

    return _export(tmp_path_factory, "fp16", "tiny-xl", ("edges=random",))[0]
