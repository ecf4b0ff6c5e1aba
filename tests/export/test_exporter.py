"""The engine folder an export writes, checked against the files and against PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch

from sdtrt.export.exporter import COMPONENTS
from sdtrt.export.graphs import graph_specs
from sdtrt.export.validate import TOLERANCE, ValidationCase, compare, ort_session, run_case, validate_graph
from sdtrt.manifest import Manifest, sha256_file
from sdtrt.runtime.device_loop import residual_shapes


def test_export_writes_graphs_tokenizer_scheduler_and_manifest(tiny_export):
    out, manifest = tiny_export
    assert Manifest.load(out) == manifest
    for name in COMPONENTS:
        assert (out / manifest.components[name].file).is_file()
    assert (out / manifest.tokenizer_dir / "tokenizer.json").is_file()
    assert json.loads((out / manifest.scheduler_config).read_text())["_class_name"] == "PNDMScheduler"
    assert not list(out.parent.glob(".*tmp*")), "temporary export folder left behind"
    assert not (out / "_work").exists()


def test_manifest_matches_the_files(tiny_export):
    out, manifest = tiny_export
    for name, comp in manifest.components.items():
        path = out / comp.file
        assert comp.sha256 == sha256_file(path)
        graph = onnx.load(str(path)).graph
        declared = {s.name: s for s in comp.inputs + comp.outputs}
        actual = list(graph.input) + list(graph.output)
        assert [v.name for v in graph.input] == [s.name for s in comp.inputs]
        assert [v.name for v in graph.output] == [s.name for s in comp.outputs]
        for v in actual:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            assert np.dtype(dtype).name == declared[v.name].dtype, (name, v.name)
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            assert len(dims) == len(declared[v.name].shape)
        assert all(r.passed for r in comp.validation) and len(comp.validation) == 2


def test_graphs_are_opset_17_with_dynamic_batch_height_width(tiny_export):
    out, manifest = tiny_export
    model = onnx.load(str(out / manifest.components["unet"].file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    latents = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in latents] == ["batch", "", "latent_height", "latent_width"]


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize(
    "case",
    [
        ValidationCase(3, 320, 448),  # odd batch, non-square
        ValidationCase(1, 200, 136),  # 25x17 latents: not a multiple of the U-Net's downsampling
        ValidationCase(4, 64, 64),  # the range's corners
        ValidationCase(1, 512, 512),
    ],
    ids=lambda c: c.label(),
)
def test_onnx_matches_pytorch_at_shapes_not_used_by_the_export(tiny_export, tiny_model, component, case):
    out, manifest = tiny_export
    spec = graph_specs(tiny_model)[component]
    comp = manifest.components[component]
    [result] = validate_graph(spec, out / comp.file, [case], manifest.precision)
    assert result.passed, result


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_unet_graph_folds_classifier_free_guidance_like_diffusers(tiny_fp32, tiny_model, guidance):
    out, manifest = tiny_fp32
    session = ort_session(out / manifest.components["unet"].file)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((3, 4, 24, 40)).astype(np.float32)
    neg, pos = (rng.standard_normal((3, 77, 32)).astype(np.float32) for _ in range(2))
    t = np.array([500.0], np.float32)
    unet = manifest.components["unet"]

    def zeros(rows):  # no ControlNet: zero residuals must leave the U-Net exactly as diffusers runs it without one
        return {n: np.zeros(s, np.float32) for n, s in residual_shapes(unet, rows, 24, 40).items()}

    [guided] = session.run(None, {"latents": latents, "timestep": t, "encoder_hidden_states": np.concatenate([neg, pos]),
                                  "guidance_scale": np.array([guidance], np.float32), **zeros(6)})
    [plain] = session.run(None, {"latents": latents, "timestep": t, "encoder_hidden_states": pos,
                                 "guidance_scale": np.array([guidance], np.float32), **zeros(3)})
    # What StableDiffusionPipeline does: one U-Net call on the doubled batch, then the guidance formula.
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([latents, latents]))
        out_u, out_c = tiny_model.unet(x, torch.tensor(500.0), torch.from_numpy(np.concatenate([neg, pos]))).sample.chunk(2)
        want = (out_u + guidance * (out_c - out_u)).numpy()
    assert compare(guided, want, "cfg", TOLERANCE["fp32"]).passed
    assert compare(plain, out_c.numpy(), "no cfg", TOLERANCE["fp32"]).passed


def test_text_encoder_graph_returns_clip_hidden_states_with_clip_skip(tiny_fp32, tiny_model):
    out, manifest = tiny_fp32
    ids = tiny_model.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, truncation=True,
                               return_tensors="np")["input_ids"].astype(np.int32)
    got = ort_session(out / manifest.components["text_encoder"].file).run(
        ["last_hidden_state", "hidden_state_skip1", "hidden_state_skip2"], {"input_ids": ids})
    te = tiny_model.text_encoder
    norm = getattr(te, "text_model", te).final_layer_norm
    with torch.no_grad():
        full = te(torch.from_numpy(ids).long(), output_hidden_states=True)
        # diffusers' encode_prompt with clip_skip: final_layer_norm(hidden_states[-(clip_skip + 1)])
        want = [full.last_hidden_state] + [norm(full.hidden_states[-(s + 1)]) for s in (1, 2)]
    for g, w in zip(got, want):
        assert compare(g, w.numpy(), "", TOLERANCE["fp32"]).passed
    assert manifest.model.clip_skips == 2 and manifest.model.max_chunks == 3


def test_vae_graph_folds_the_scaling_factor(tiny_fp32, tiny_model):
    out, manifest = tiny_fp32
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 24)).astype(np.float32)
    [got] = ort_session(out / manifest.components["vae_decoder"].file).run(None, {"latents": latents})
    assert got.shape == (2, 3, 128, 192)
    with torch.no_grad():
        want = tiny_model.vae.decode(torch.from_numpy(latents) / 0.18215).sample.numpy()
    assert compare(got, want, "", TOLERANCE["fp32"]).passed


def _softmax_inputs_are_fp32(model) -> bool:
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Softmax":
            src = producers[node.input[0]]
            if not (src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT):
                return False
    return True


def test_fp16_graphs_are_fp16_typed_with_fp32_softmax_and_timestep(tiny_fp16):
    out, manifest = tiny_fp16
    unet = onnx.load(str(out / manifest.components["unet"].file))
    fp16_weights = [i for i in unet.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert sum(int(np.prod(i.dims)) for i in fp16_weights) > 0.9 * sum(int(np.prod(i.dims)) for i in unet.graph.initializer)
    assert _softmax_inputs_are_fp32(unet)
    timestep_users = [n for n in unet.graph.node if "timestep" in n.input]
    assert timestep_users and all(n.op_type != "Cast" or n.attribute[0].i == onnx.TensorProto.FLOAT for n in timestep_users)
    assert manifest.components["unet"].input("timestep").dtype == "float32"
    assert manifest.components["unet"].input("latents").dtype == "float16"
    text = onnx.load(str(out / manifest.components["text_encoder"].file))
    assert _softmax_inputs_are_fp32(text)


def test_fp16_vae_decodes_large_magnitude_latents_without_overflow(tiny_fp16, tiny_model):
    out, manifest = tiny_fp16
    comp = manifest.components["vae_decoder"]
    assert comp.precision == "fp32" and comp.inputs[0].dtype == "float16"  # fp16 I/O, fp32 compute
    spec = graph_specs(tiny_model)["vae_decoder"]
    session = ort_session(out / comp.file)
    for magnitude in (10.0, 60.0):  # SD latents are ~N(0, 1/0.18215^2) before scaling; 60x is far beyond
        got, want = run_case(spec, session, ValidationCase(1, 128, 128, {"magnitude": magnitude}))
        assert np.isfinite(got).all()
        assert compare(got, want, "", TOLERANCE["fp16"]).passed


def test_export_from_a_diffusers_folder(tiny_diffusers_dir, tmp_path):
    from sdtrt.export import ExportConfig, export

    manifest = export(ExportConfig(model=str(tiny_diffusers_dir), out=str(tmp_path / "e"), precision="fp32",
                                   size_min=64, size_max=128, batch_max=2), log=lambda s: None)
    assert manifest.model.source == str(tiny_diffusers_dir)
    assert manifest.model.prediction_type == "epsilon" and manifest.model.latent_channels == 4
    assert all(r.passed for c in manifest.components.values() for r in c.validation)
    # the U-Net's sample_size (32 latents = 256 px) is beyond the exported 64..128: the default size is clamped
    assert manifest.model.default_size == 128


@pytest.mark.parametrize("sample_size, vae_scale, lo, hi, want", [
    (32, 8, 64, 512, 256),  # in range: the U-Net's own size, as diffusers
    (32, 8, 64, 128, 128),  # clamped to the range
    (0, 8, 64, 256, 64),  # an impossible sample_size: the range's nearest end
    ([48, 32], 8, 64, 512, 384),  # (height, width) configs: the height
    (None, 8, 64, 256, 64),
    (20, 16, 64, 512, 320),
    (21, 8, 64, 512, 168),
    (33, 4, 64, 512, 128),  # 132 px: not a multiple of 8
])
def test_default_size_is_a_size_the_export_can_run(sample_size, vae_scale, lo, hi, want):
    from sdtrt.export.exporter import default_size
    from sdtrt.manifest import Ranges

    logs = []
    got = default_size(sample_size, vae_scale, Ranges(1, 4, lo, hi), logs.append)
    assert got == want and got % 8 == 0 and got % vae_scale == 0 and lo <= got <= hi
    assert bool(logs) == (want != (sample_size[0] if isinstance(sample_size, list) else sample_size or 0) * vae_scale)


def test_export_limits_match_torch():
    from sdtrt.export.exporter import MAX_OPSET, MAX_WEIGHT_SEED

    assert MAX_OPSET == torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET  # the exporter export uses
    torch.manual_seed(MAX_WEIGHT_SEED + 2)  # the VAE's seed: the largest a built-in draws with
    with pytest.raises((ValueError, RuntimeError)):
        torch.manual_seed(MAX_WEIGHT_SEED + 3)


@pytest.mark.parametrize("content, ok", [
    ({}, True),  # empty
    ({"manifest.json": json.dumps({"schema_version": 1, "model": {}, "components": {}})}, True),  # an engine folder
    ({"manifest.json": json.dumps({"name": "my web app", "icons": []})}, False),  # someone else's manifest.json
    ({"notes.txt": "mine"}, True),  # other files: written beside them (--force)
    ({"notes.txt": "mine", "unet.onnx": "my own graph"}, False),  # a name the export writes, not sdtrt's
])
def test_force_writes_into_a_folder_but_never_over_a_file_that_is_not_sdtrts(tmp_path, content, ok):
    from sdtrt.errors import OutputExistsError
    from sdtrt.export.exporter import _prepare_out

    out = tmp_path / "out"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    if ok:
        tmp = _prepare_out(out, force=True)
        assert tmp.is_dir() and tmp.parent == tmp_path
    else:
        with pytest.raises(OutputExistsError, match="which the export would write but no sdtrt manifest there lists"):
            _prepare_out(out, force=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == content


def test_a_scheduler_config_only_other_samplers_can_run_is_exported_with_a_warning():
    from sdtrt.errors import ModelSourceError
    from sdtrt.export.exporter import _check_scheduler

    sd15 = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
    logs = []
    _check_scheduler(sd15, "m", logs.append)
    assert logs == []
    _check_scheduler({**sd15, "clip_sample": True}, "m", logs.append)  # DDIM clamps; Euler, DPM++ ... do not
    assert len(logs) == 1 and logs[0].startswith("warning: the model's own sampler cannot run on this runtime (ddim")
    assert "--scheduler" in logs[0] and "euler" in logs[0]
    with pytest.raises(ModelSourceError, match="no sampler of sdtrt can run its scheduler config"):
        _check_scheduler({**sd15, "beta_schedule": "cosine"}, "m", logs.append)


def test_prediction_type_override_is_what_diffusers_runs():
    from diffusers import DDIMScheduler

    from sdtrt.export.loaders import load_model, with_prediction_type

    assert load_model("tiny", prediction_type="v_prediction").prediction_type == "v_prediction"
    # a key listed in _use_default_values is ignored by diffusers: the override must take it off that list
    config = with_prediction_type({"_use_default_values": ["prediction_type", "steps_offset"]}, "v_prediction")
    assert DDIMScheduler.from_config(config).config.prediction_type == "v_prediction"
    assert config["_use_default_values"] == ["steps_offset"]


@pytest.mark.parametrize("sample_size, vae_scale, want", [(64, 8, 1024), (96, 8, 1536), (128, 8, 2048), (32, 8, 1024),
                                                          ([128, 96], 8, 2048), (600, 8, 9600)])
def test_the_default_size_range_reaches_the_models_buckets(sample_size, vae_scale, want):
    """Without --size the export's range is 256 to twice the model's own size (at least 1024, at most the manifest's
    limit): SD 1.5 256:1024 as before, SD 2.x 768 models 1536, SDXL 2048 — its buckets (832x1216, 640x1536) run."""
    from sdtrt.export.exporter import model_size_max
    from sdtrt.manifest_check import MAX_SIZE

    assert model_size_max(sample_size, vae_scale, 256) == min(want, MAX_SIZE)
