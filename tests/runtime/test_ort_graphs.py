"""ONNX Runtime's fused attention (runtime/ort_graphs.py): the same outputs as the exported graph, on graphs the
exporter writes (SD and SDXL shapes, fp32 and fp16), the folder left as it was, patterns it does not know left alone.
Parity of whole images with diffusers through the fused graphs: every pipeline test on the CPU runs them (e.g.
tests/runtime/test_pipeline.py's mid-size model and test_sdxl.py)."""

import hashlib
import json
import os
import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest

from sdtrt.runtime.backends import OrtEngine, fused_graph
from sdtrt.runtime.device_loop import residual_shapes
from sdtrt.runtime.ort_graphs import FUSED_OP, fuse_attention
from sdtrt.runtime.tensorrt.verify import added_condition_feeds, random_feeds


def _unet_shapes(manifest, batch: int, h: int, w: int) -> dict:
    c = manifest.components["unet"]
    text = manifest.model.text_hidden_size
    shapes = {"latents": (batch, manifest.model.latent_channels, h, w), "timestep": (1,),
              "encoder_hidden_states": (2 * batch, 77, text), "guidance_scale": (1,)}
    for spec in c.inputs:  # SDXL's added conditions
        if spec.name not in shapes and not spec.name.startswith(("down_residual", "mid_residual")):
            shapes[spec.name] = (2 * batch, *spec.shape[1:])
    return shapes | residual_shapes(c, 2 * batch, h, w)


def _feeds(manifest, name: str, shapes: dict) -> dict:
    c = manifest.components[name]
    feeds = random_feeds(c, shapes, {"timestep": 500.0, "guidance_scale": 7.5}, manifest.model.vocab_size, 0)
    return feeds | added_condition_feeds(manifest.model, c, shapes)


def _hashes(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("export_name", ["tiny_fp32", "tiny_fp16", "tiny_xl_fp16"])
def test_fused_graphs_give_the_exported_graphs_outputs_and_leave_the_folder_alone(request, export_name, monkeypatch):
    folder, manifest = request.getfixturevalue(export_name)
    before = _hashes(folder)
    # non-square, odd batch; latents that do not divide the U-Net's downsampling (5 rows of 8 px)
    cases = {"unet": _unet_shapes(manifest, 3, 5, 12), "vae_decoder": {"latents": (3, 4, 5, 12)}}
    tol = 1e-5 if manifest.precision == "fp32" else 3e-3  # fp16: the fused kernel computes in FP32
    for name, shapes in cases.items():
        component = manifest.components[name]
        path = folder / component.file
        softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(path), load_external_data=False).graph.node)
        fused = OrtEngine(path, component)
        monkeypatch.setenv("SDTRT_ORT_ATTENTION", "unfused")
        plain = OrtEngine(path, component)
        monkeypatch.delenv("SDTRT_ORT_ATTENTION")
        assert plain.fused_attention == 0 and fused.fused_attention == softmaxes > 0, (name, softmaxes)
        feeds = _feeds(manifest, name, shapes)
        want, got = plain.run(feeds), fused.run(feeds)
        for key in want:
            a, b = want[key].astype(np.float64), got[key].astype(np.float64)
            assert np.abs(a - b).max() <= tol * np.abs(a).max(), (name, key, np.abs(a - b).max() / np.abs(a).max())
    assert _hashes(folder) == before  # nothing written: the files TensorRT reads are the exported ones


def test_the_text_encoders_causal_attention_is_left_as_exported(tiny_fp32):
    folder, manifest = tiny_fp32
    assert fused_graph(folder / manifest.components["text_encoder"].file) == (None, 0)


def _torch_attention_graph(tmp_path, scale=None, mask=False):
    """A diffusers-style attention block (projections, view into heads, SDPA, merge) exported by PyTorch's exporter
    as sdtrt's export calls it."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(24, 24, bias=False) for _ in range(3))

        def forward(self, x, ctx):
            b = x.shape[0]
            q, k, v = (t.view(b, -1, 3, 8).transpose(1, 2) for t in (self.q(x), self.k(ctx), self.v(ctx)))
            m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if mask else None
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
            return o.transpose(1, 2).reshape(b, -1, 24)

    torch.manual_seed(0)
    path = tmp_path / "attention.onnx"
    x, ctx = torch.randn(2, 10, 24), torch.randn(2, 7, 24)
    torch.onnx.export(Block(), (x, ctx), str(path), input_names=["x", "ctx"], output_names=["out"], opset_version=17,
                      dynamic_axes={"x": {0: "b", 1: "s"}, "ctx": {0: "b", 1: "l"}}, dynamo=False)
    return path


@pytest.mark.parametrize("scale", [None, 0.3])
def test_an_explicit_scale_is_carried_and_a_masked_attention_is_not_fused(tmp_path, scale):
    import onnxruntime as ort

    path = _torch_attention_graph(tmp_path, scale)
    model = onnx.load(str(path))
    assert fuse_attention(model) == 1
    node = next(n for n in model.graph.node if n.op_type == FUSED_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 3 and attrs.get("scale") == (pytest.approx(scale) if scale else None)
    assert not any(n.op_type == "Softmax" for n in model.graph.node)  # the pieces are gone
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 9, 24), np.float32), "ctx": rng.standard_normal((3, 5, 24), np.float32)}
    want = ort.InferenceSession(str(path)).run(None, feeds)[0]
    got = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    masked = onnx.load(str(_torch_attention_graph(tmp_path, scale, mask=True)))
    assert fuse_attention(masked) == 0


MEASURE = r"""
import json, sys
from pathlib import Path
from sdtrt.manifest import Manifest
from sdtrt.runtime.backends import OrtEngine
from sdtrt.runtime.tensorrt.verify import random_feeds
folder, shapes = sys.argv[1], {k: tuple(v) for k, v in json.loads(sys.argv[2]).items()}
m = Manifest.load(folder)
c = m.components["unet"]
engine = OrtEngine(Path(folder) / c.file, c)
engine.run(random_feeds(c, shapes, {"timestep": 500.0, "guidance_scale": 7.5}, m.model.vocab_size, 0))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would count pytest's own peak
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"fused": engine.fused_attention, "peak": peak}))
"""


def test_a_1024px_unet_call_of_tiny_stays_far_below_its_score_matrices(tiny_fp32):
    """The exported graph materialises 1.07 GB per score matrix here (4 heads x 128² x 128² x fp32 at batch 2, CFG);
    ONNX Runtime held 9.0 GB for one such call unfused (and with ``ORT_DISABLE_FLASH_ATTENTION=1``, its kernel's
    materialising path); fused, 0.25 GB here. The fused graph is measured in a process of its own, by its VmHWM (an
    earlier version read ru_maxrss, which includes the pytest process it was forked from: 2.6 GB on CI)."""
    folder, manifest = tiny_fp32
    shapes = _unet_shapes(manifest, 1, 128, 128)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), json.dumps(shapes)], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout)
    cpu = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    assert got["fused"] > 0 and got["peak"] < 1.5e9, (got, f"L2 {cpu}", os.cpu_count(), platform.processor())
