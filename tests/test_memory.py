"""The memory estimate against what ONNX Runtime really takes, and the export's attention model against what the
PyTorch modules really compute at a size the probe did not see."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sdtrt.memory import peak_bytes
from sdtrt.runtime.device_loop import residual_shapes

MEASURE = r"""
import json, sys
import onnxruntime as ort
from sdtrt.manifest import Manifest
from sdtrt.runtime.tensorrt.verify import random_feeds
folder, name, shapes = sys.argv[1], sys.argv[2], {k: tuple(v) for k, v in json.loads(sys.argv[3]).items()}
m = Manifest.load(folder)
c = m.components[name]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
opts = ort.SessionOptions()
opts.log_severity_level = 3
session = ort.InferenceSession(f"{folder}/{c.file}", opts, providers=["CPUExecutionProvider"])
feeds = random_feeds(c, shapes, {"timestep": 500.0, "guidance_scale": 7.5}, m.model.vocab_size, 0)
base = status("VmRSS")
session.run(None, feeds)
print(status("VmHWM") - base)
"""


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("name, side", [("unet", 48), ("unet", 64), ("vae_decoder", 64)])
def test_estimate_is_close_to_the_measured_peak_of_one_run(request, precision, name, side):
    folder, manifest = request.getfixturevalue(f"tiny_{precision}")
    shapes = {"latents": (1, 4, side, side)}
    if name == "unet":
        shapes |= {"timestep": (1,), "encoder_hidden_states": (2, 77, 32), "guidance_scale": (1,),
                   **residual_shapes(manifest.components["unet"], 2, side, side)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), name, json.dumps(shapes)],
                         capture_output=True, text=True, check=True)
    measured = int(out.stdout)
    estimate = peak_bytes(manifest.components[name], shapes)
    assert 0.6 <= measured / estimate <= 1.6, (measured / 1e6, estimate / 1e6)


def test_the_attention_model_extrapolates_to_an_unseen_size(tiny_model):
    import torch

    from sdtrt.export.graphs import graph_specs
    from sdtrt.export.memory_probe import memory_model

    spec = graph_specs(tiny_model)["unet"]
    model = memory_model(spec, 8)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        seen.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return original(q, k, v, *a, **kw)

    feeds = spec.make_inputs(3, 24 * 8, 40 * 8, np.random.default_rng(0), {"cfg": True})
    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            spec.module(*[torch.from_numpy(feeds[s.name]) for s in spec.inputs])
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    hw = 24 * 40
    predicted = max(s.rows_per_row * 6 * s.heads * (s.query[0] * hw + s.query[1]) * (s.key[0] * hw + s.key[1])
                    for s in model.attention)
    assert predicted == max(seen)
