"""Issue 24: the export holds each graph's weights once. The gate's references are the FP32 modules' outputs,
computed before the modules are converted to fp16 (in place, traced so) and freed; weights are written one tensor
at a time."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdtrt.export import ExportConfig, export, onnx_tools, validate
from sdtrt.export.exporter import default_cases
from sdtrt.export.graphs import graph_specs

RANGES = dict(batch_min=1, batch_max=2, size_min=64, size_max=128)


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def spied_export(request, tmp_path_factory):
    """A tiny export that records, per graph, the module's weight dtypes and the sample's dtypes when it is traced,
    and, when the gate runs, where the module's weights are and whether the references came precomputed."""
    traced, gated = {}, {}
    trace, gate = onnx_tools.trace_to_onnx, validate.validate_graph

    def spy_trace(spec, sample, path, opset):
        traced[spec.name] = ({p.dtype for p in spec.module.parameters()}, {n: v.dtype for n, v in sample.items()})
        return trace(spec, sample, path, opset)

    def spy_gate(spec, path, cases, precision, session=None, references=None):
        gated[spec.name] = ({p.device.type for p in spec.module.parameters()}, references is not None,
                            session and session.get_session_options().graph_optimization_level)
        return gate(spec, path, cases, precision, session, **({} if references is None else {"references": references}))

    mp = pytest.MonkeyPatch()
    mp.setattr(onnx_tools, "trace_to_onnx", spy_trace)
    mp.setattr(validate, "validate_graph", spy_gate)
    out = tmp_path_factory.mktemp(f"lowmem_{request.param}") / "engine"
    try:
        manifest = export(ExportConfig(model="tiny", out=str(out), precision=request.param, **RANGES),
                          log=lambda s: None)
    finally:
        mp.undo()
    return request.param, out, manifest, traced, gated


def test_fp16_graphs_are_traced_from_the_fp16_module_and_fp32_graphs_from_the_fp32(spied_export):
    precision, _, _, traced, _ = spied_export
    want = {"fp16": (torch.float16, np.float16), "fp32": (torch.float32, np.float32)}[precision]
    for name in ("unet", "text_encoder"):
        assert traced[name][0] == {want[0]}, name
    sample = traced["unet"][1]
    assert {d for n, d in sample.items() if n not in ("timestep", "guidance_scale")} == {np.dtype(want[1])}
    assert sample["timestep"] == np.float32  # the time embedding computes in FP32 in the trace
    # the VAE computes in FP32 (force_upcast) whatever the precision: traced from the FP32 module
    assert traced["vae_decoder"][0] == {torch.float32}


def test_the_gate_runs_after_the_weights_are_freed_against_references_computed_before(spied_export, tiny_model):
    precision, out, manifest, _, gated = spied_export
    assert set(gated) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for name, (devices, precomputed, level) in gated.items():  # the encoder's weights are the decoder's, next
        assert devices == ({"cpu"} if name == "vae_encoder" else {"meta"}) and precomputed, name
        # the graph as written: ONNX Runtime's folding would make FP32 copies of the fp16 weights
        assert level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL, name
    # the references were the FP32 modules' outputs: the gate run again on the untouched model gives its numbers
    specs = graph_specs(tiny_model)
    for name in ("unet", "text_encoder", "vae_decoder"):
        comp = manifest.components[name]
        cases = default_cases(name, manifest.ranges, manifest.model.max_chunks)
        again = validate.validate_graph(specs[name], out / comp.file, cases, precision,
                                        validate.ort_session(out / comp.file, optimize=False))
        assert [r.max_rel_error for r in again] == [r.max_rel_error for r in comp.validation], name
    # the export loaded its own model: load_model's cached one (tiny_model) is still FP32, with its weights
    assert {(p.dtype, p.device.type) for p in tiny_model.unet.parameters()} == {(torch.float32, "cpu")}


def _value_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)} | \
        {i.name: i.data_type for i in g.initializer}


def test_fp16_unet_has_fp16_weights_only_and_fp32_softmax_and_timestep_embedding(spied_export):
    precision, out, manifest, _, _ = spied_export
    if precision != "fp16":
        pytest.skip("fp16 graphs only")
    for name in ("unet", "text_encoder"):
        model = onnx.load(str(out / manifest.components[name].file))
        # no FP32 copy of a weight anywhere: every float initializer is fp16
        assert {i.data_type for i in model.graph.initializer} <= {TensorProto.FLOAT16, TensorProto.INT64,
                                                                  TensorProto.INT32}, name
        types = _value_types(model)
        islands = [n for n in model.graph.node if n.op_type == "Softmax" or n.name.startswith("/unet/time_proj/")
                   and n.op_type != "Cast"]  # the Casts are the islands' borders
        assert any(n.op_type == "Softmax" for n in islands)
        assert name != "unet" or any(n.name.startswith("/unet/time_proj/") and n.op_type in ("Sin", "Cos")
                                     for n in islands)
        for node in islands:
            floats = {types[v] for v in (*node.input, *node.output)
                      if types.get(v) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
            assert floats == {TensorProto.FLOAT} or (not floats and node.op_type not in ("Softmax", "Sin", "Cos")), \
                (name, node.name)


def test_weights_in_external_files_are_moved_one_by_one_into_one_aligned_data_file(tmp_path):
    """As torch writes a graph over 2 GiB (one file per tensor): save_model gathers them into NAME.data."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((40, 40)).astype(np.float16) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, 40])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src / "g.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(src.iterdir())) == 3
    dst = tmp_path / "dst"
    dst.mkdir()
    files = onnx_tools.save_model(onnx.load(str(src / "g.onnx"), load_external_data=False), dst / "g.onnx",
                                  external=True, base_dir=src)
    assert files == ["g.onnx.data"] and sorted(f.name for f in dst.iterdir()) == ["g.onnx", "g.onnx.data"]
    saved = onnx.load(str(dst / "g.onnx"), load_external_data=False)
    offsets = [int({e.key: e.value for e in i.external_data}["offset"]) for i in saved.graph.initializer]
    assert offsets[0] == 0 and all(o % onnx_tools.ALIGNMENT == 0 for o in offsets) and len(set(offsets)) == 2
    x = rng.standard_normal((3, 40)).astype(np.float16)
    [got] = validate.ort_session(dst / "g.onnx").run(None, {"x": x})
    want = (x.astype(np.float32) @ w1.astype(np.float32)).astype(np.float16).astype(np.float32) @ w2.astype(np.float32)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)


def test_an_island_left_in_fp16_stops_the_export():
    """check_fp32_islands: a Softmax (or island node) with an fp16 input or output is an error, not a quieter graph."""
    from sdtrt.errors import ValidationError

    def graph(dtype):
        return helper.make_model(helper.make_graph(
            [helper.make_node("Softmax", ["x"], ["y"], name="sm"), helper.make_node("Neg", ["y"], ["z"], name="neg")],
            "g", [helper.make_tensor_value_info("x", dtype, [2, 3])],
            [helper.make_tensor_value_info("z", dtype, [2, 3])],
            value_info=[helper.make_tensor_value_info("y", dtype, [2, 3])]))

    onnx_tools.check_fp32_islands(graph(TensorProto.FLOAT), "g", {"neg"})
    with pytest.raises(ValidationError, match="Softmax node sm"):
        onnx_tools.check_fp32_islands(graph(TensorProto.FLOAT16), "g", set())
    with pytest.raises(ValidationError, match="Neg node neg"):
        model = graph(TensorProto.FLOAT)
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        onnx_tools.check_fp32_islands(model, "g", {"neg"})
