"""The FLOP model the export records per graph (``manifest.FlopModel``, counted by ``export/memory_probe.py`` in the
memory probe's two runs) against torch's FlopCounterMode plus the attentions on a direct run at sizes, batches and
aspect ratios the probe did not see; its place in the manifest; and SD 1.5's U-Net, counted on the meta device."""

import json

import numpy as np
import pytest

from sdtrt.manifest import Component, FlopModel, Manifest, Ranges
from sdtrt.memory import flops

# batch, width, height, guidance: larger than the probe's 64 and 128 px, not square, 1 to 3 images, 1 or 2 rows each
CASES = [(1, 256, 192, True), (2, 192, 192, True), (1, 160, 224, False), (3, 96, 160, True)]


def _component(spec, model: FlopModel) -> Component:
    inputs = spec.tensor_specs(Ranges(1, 4, 64, 2048), 8, "fp32")[0]
    return Component(file="", sha256="", size_bytes=0, precision="fp32", inputs=inputs, outputs=(), flops=model)


def _shapes(feeds):
    return {k: v.shape for k, v in feeds.items()}


@pytest.mark.parametrize("arch, graphs, cases", [
    ("tiny", ("unet", "vae_decoder", "vae_encoder", "text_encoder"), 4), ("small", ("unet",), 1),
    ("tiny-xl", ("unet",), 2)])
def test_the_flop_model_predicts_a_direct_count_at_unseen_shapes(arch, graphs, cases):
    from sdtrt.export.graphs import graph_specs
    from sdtrt.export.loaders import load_model
    from sdtrt.export.memory_probe import count_flops, probe

    specs = graph_specs(load_model(arch))
    for name in graphs:
        spec = specs[name]
        model = probe(spec, 8)[1]
        for batch, width, height, cfg in CASES[:cases if name == "unet" else 1]:
            feeds = spec.make_inputs(batch, height, width, np.random.default_rng(0), {"cfg": cfg})
            direct = count_flops(spec, feeds)
            assert direct > 0
            assert flops(_component(spec, model), _shapes(feeds)) == pytest.approx(direct, rel=0.01), \
                (arch, name, batch, width, height, cfg)


def test_the_attention_is_counted_once_whatever_the_counter_makes_of_it(tiny_model, monkeypatch):
    """torch's counter counts no CPU attention kernel, but a decomposed one (the meta device's, or the math
    fallback) as its matrix products: either way the count is the same."""
    import torch

    from sdtrt.export.graphs import graph_specs
    from sdtrt.export.memory_probe import count_flops

    spec = graph_specs(tiny_model)["unet"]
    feeds = spec.make_inputs(1, 128, 192, np.random.default_rng(0), {"cfg": True})
    fused = count_flops(spec, feeds)

    def decomposed(q, k, v, *args, **kwargs):  # the math path: matrix products the counter sees
        return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", decomposed)
    assert count_flops(spec, feeds) == fused


def test_every_graph_of_an_export_has_one_and_an_older_manifest_without_it_still_loads(tiny_fp32):
    folder, manifest = tiny_fp32
    for name, c in manifest.components.items():
        assert (c.flops is None) == (name == "sampler_update"), name
    unet = manifest.components["unet"]
    assert unet.flops.rows_input == "encoder_hidden_states"  # with guidance the U-Net runs on both halves
    shapes = {"latents": (1, 4, 32, 32), "encoder_hidden_states": (2, 77, 32)}
    assert flops(unet, shapes) == 2 * flops(unet, {**shapes, "encoder_hidden_states": (1, 77, 32)}) > 0
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads((folder / "manifest.json").read_text())
    for c in data["components"].values():
        c.pop("flops", None)
    old = Manifest.from_json(json.dumps(data))
    assert old.components["unet"].flops is None and flops(old.components["unet"], shapes) == 0


def test_sd15_unet_at_512_is_torchs_count_plus_its_attention():
    """SD 1.5's U-Net at 512x512 with guidance (2 rows), built on the meta device (no weights): torch's counter gives
    1.354 TFLOP for its convolutions and matrix products, the 32 attentions add 0.252 (QK^T and PV): 1.607."""
    import torch

    from sdtrt.export.architectures import SD15
    from sdtrt.export.graphs import graph_specs
    from sdtrt.export.loaders import build_builtin
    from sdtrt.export.memory_probe import probe

    with torch.device("meta"):
        spec = graph_specs(build_builtin(SD15))["unet"]
    model = probe(spec, 8)[1]
    per_step = flops(_component(spec, model), {"latents": (1, 4, 64, 64), "encoder_hidden_states": (2, 77, 768)})
    assert per_step == pytest.approx(1.354e12 + 0.2521e12, rel=0.005)
