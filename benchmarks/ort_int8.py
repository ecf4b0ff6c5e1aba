"""ONNX Runtime INT8 on the CPU, measured (issue 26): the U-Net of an fp32 engine folder with its attention fused
(``ort_graphs``) and quantized by ONNX Runtime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``,
int8 weights, activations quantized per call) — MatMul only, and MatMul + Conv — against the same graph in FP32: one
256x256 CFG call each (median of 3 after a warm-up), and how far its noise prediction is from FP32's.

    python -m sdtrt.benchmarks.ort_int8 ENGINE_DIR WORK_DIR     # writes WORK_DIR/int8.json

Dynamic, not static, quantization: static needs calibration images, which a random-weight model cannot give."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from sdtrt.manifest import Manifest
from sdtrt.runtime.ort_graphs import ort_graph
from sdtrt.runtime.device_loop import residual_shapes
from sdtrt.runtime.tensorrt.verify import random_feeds

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
m = Manifest.load(folder)
c = m.components["unet"]
fused = out / "unet_fused.onnx"
if not fused.exists():
    graph, n = ort_graph(folder / c.file)
    model = onnx.load_from_string(graph)
    onnx.load_external_data_for_model(model, str(folder))
    onnx.save(model, str(fused), save_as_external_data=True, location="unet_fused.data")
    print("fused", n, flush=True)
results = {}
variants = {"fp32": fused}
for ops in (["MatMul"], ["MatMul", "Conv"]):
    name = "int8-" + "-".join(o.lower() for o in ops)
    q = out / f"{name}.onnx"
    if not q.exists():
        t = time.perf_counter()
        quantize_dynamic(str(fused), str(q), op_types_to_quantize=ops, weight_type=QuantType.QInt8,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        print(name, "quantized in", round(time.perf_counter() - t, 1), "s", flush=True)
    variants[name] = q
h = w = 32  # 256x256
shapes = {"latents": (1, 4, h, w), "timestep": (1,), "encoder_hidden_states": (2, 77, m.model.text_hidden_size),
          "guidance_scale": (1,)} | residual_shapes(c, 2, h, w)
feeds = random_feeds(c, shapes, {"timestep": 500.0, "guidance_scale": 7.5}, m.model.vocab_size, 0)
ref = None
for name, path in variants.items():
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    t = time.perf_counter()
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t
    names = {i.name for i in s.get_inputs()}
    f = {k: v for k, v in feeds.items() if k in names}
    s.run(None, f)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        y = s.run(None, f)[0]
        times.append(time.perf_counter() - t)
    ref = y if ref is None else ref
    err = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-12))
    mse = float(np.mean((y - ref) ** 2))
    psnr = float(10 * np.log10(np.abs(ref).max() ** 2 / mse)) if mse > 0 else None  # identical: no figure
    size = sum(p.stat().st_size for p in out.glob(path.stem + ".*")) + sum(p.stat().st_size for p in out.glob(path.stem + "*.data"))
    results[name] = {"load_s": round(load, 1), "call_ms": round(1000 * float(np.median(times)), 0),
                     "max_rel_error_vs_fp32": err, "psnr_db_vs_fp32": None if psnr is None else round(psnr, 1)}
    print(name, results[name], flush=True)
    del s
(out / "int8.json").write_text(json.dumps(results, indent=1))
