"""ONNX steps of the export: trace, shape inference, fp16 conversion with FP32 islands, saving.

Each step is a small function from files to files, so the exporter composes them and tests can
run any one alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdtrt.export.graphs import GraphSpec
from sdtrt.fsutil import normal_mode

# protobuf cannot serialise a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Ops kept in FP32 in every fp16 graph: attention softmax overflows / loses mass in fp16.
FP32_OPS = ("Softmax",)


def trace_to_onnx(spec: GraphSpec, sample: dict[str, np.ndarray], path: Path, opset: int) -> None:
    """TorchScript-trace ``spec.module`` into an FP32 ONNX graph with dynamic batch/height/width.

    The sample's latent size should not divide the U-Net's total downsampling factor: diffusers then
    takes the branch that passes explicit upsample sizes, which is correct for every size, and the
    trace records that branch.
    """
    import torch

    args = tuple(torch.from_numpy(sample[s.name]) for s in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, args, str(path), dynamo=False, opset_version=opset,
            input_names=[s.name for s in spec.inputs], output_names=[s.name for s in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )


def infer_shapes(src: Path, dst: Path) -> None:
    """Shape inference through the file API, which works for graphs over 2 GiB."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)


def save_model(model, path: Path, external: bool = False, base_dir: Path | None = None) -> list[str]:
    """Save ``model``; above ~1.8 GB, or with ``external``, weights go to one ``<name>.data`` file (where the
    runtime finds them by offset for LoRAs). Returns external files.

    Tensors the model keeps in external files under ``base_dir`` (torch writes them for graphs over 2 GiB) are
    copied one at a time, and tensors held in memory are moved out one at a time: no second copy of the weights
    is ever made."""
    import onnx

    if _data_bytes(model) <= EXTERNAL_DATA_THRESHOLD and not external:
        if base_dir is not None:
            onnx.load_external_data_for_model(model, str(base_dir))
        onnx.save_model(model, str(path))
        return []
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                data = _read_external(base_dir, info)
            elif len(tensor.raw_data) >= 1024:
                data = tensor.raw_data
            else:
                continue
            offset = -out.tell() % ALIGNMENT + out.tell()  # page-aligned: ONNX Runtime can map them
            out.seek(offset)
            out.write(data)
            del data
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", out.tell() - offset)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    normal_mode(path.parent / data_name)
    onnx.save_model(model, str(path))
    return [data_name]


# offsets of the tensors in a .data file: a multiple of the page size (ONNX Runtime maps aligned tensors)
ALIGNMENT = 4096


def _read_external(base_dir: Path | None, info: dict[str, str]) -> bytes:
    if base_dir is None:
        raise ValueError("the model has external data but no folder was given to read it from")
    with open(Path(base_dir) / info["location"], "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        return fh.read(int(info["length"])) if "length" in info else fh.read()


def _data_bytes(model) -> int:
    """Bytes of the initializers' data, in memory or in external files (capped once over the threshold)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == 1:  # TensorProto.EXTERNAL
            return EXTERNAL_DATA_THRESHOLD + 1  # torch wrote the weights out: the graph is over 2 GiB
        total += len(init.raw_data) if init.raw_data else init.ByteSize()
        if total > EXTERNAL_DATA_THRESHOLD:
            break
    return total


def _nodes_between(graph, sources: set[str], targets: set[int]) -> set[int]:
    """Indices of nodes on some path from a tensor in ``sources`` to a node in ``targets``."""
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    down: set[int] = set()
    stack = [i for s in sources for i in consumers.get(s, [])]
    while stack:
        i = stack.pop()
        if i not in down:
            down.add(i)
            stack += [j for out in graph.node[i].output for j in consumers.get(out, [])]
    up: set[int] = set()
    stack = list(targets)
    while stack:
        i = stack.pop()
        if i not in up:
            up.add(i)
            stack += [producers[name] for name in graph.node[i].input if name in producers]
    return down & up


def fp32_island_nodes(model, spec: GraphSpec) -> list[str]:
    """Names of nodes that must stay FP32 in the fp16 graph of ``spec``.

    A prefix rule (e.g. the U-Net's time projection) also pulls in the nodes that carry a
    kept-FP32 input to it, so that the timestep never passes through fp16 on the way.
    """
    graph = model.graph
    if spec.fp32_all:
        return [n.name for n in graph.node]
    island = {i for i, n in enumerate(graph.node) if n.name.startswith(spec.fp32_node_prefixes)} if spec.fp32_node_prefixes else set()
    if island:
        fp32_inputs = {s.name for s in spec.inputs if s.keep_fp32}
        island |= _nodes_between(graph, fp32_inputs, island)
    return [graph.node[i].name for i in sorted(island)]


def convert_to_fp16(src: Path, dst: Path, spec: GraphSpec, external: bool = False) -> tuple[list[str], list[str]]:
    """ONNX traced from the fp16 module (FP32 for ``fp32_all`` graphs), with shape info -> the fp16 graph with its
    FP32 islands, as onnxruntime's float16 converter makes it from an FP32 graph.

    Float graph I/O becomes float16 except the inputs the spec keeps in FP32 (cast to fp16 at the door, except on
    their way into an FP32 island); Softmax and ``fp32_island_nodes`` compute in FP32 between Cast nodes. The
    weights are read from ``src``'s folder one tensor at a time as they are written to ``dst``'s data file: they
    are never all in memory. Returns the external data files written and a short description of the FP32 islands.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src), load_external_data=False)
    for init in model.graph.initializer:  # the converter rewrites FP32 tensors (constants, fp32_all weights) only
        if init.data_type == onnx.TensorProto.FLOAT and init.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(init, str(src.parent))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    _typed_as_fp32(model)
    blocked = fp32_island_nodes(model, spec)
    keep_io = [s.name for s in spec.inputs if s.keep_fp32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(
            model, keep_io_types=keep_io, op_block_list=list(FP32_OPS), node_block_list=blocked,
            disable_shape_infer=True,
        )
    bypass_fp16_round_trips(model16)
    check_fp32_islands(model16, spec.name, set(blocked))
    files = save_model(model16, dst, external, base_dir=src.parent)
    islands = [f"{op} ops (attention softmax)" for op in FP32_OPS]
    if spec.fp32_all:
        islands = [f"whole graph: {spec.fp32_reason}"]
    elif blocked:
        islands.append(f"{len(blocked)} nodes: {spec.fp32_reason}")
    return files, islands


def _typed_as_fp32(model) -> None:
    """Label the fp16 values of a graph traced in fp16 as float, so onnxruntime's converter treats them as the
    values it converts itself: it casts only those around the nodes it keeps in FP32 (and back after them)."""
    from onnx import TensorProto

    graph = model.graph
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT


def check_fp32_islands(model, name: str, island: set[str]) -> None:
    """Every float input and output of the Softmax and island nodes is FP32 in the fp16 graph, or the export
    stops: an island computing in fp16 would pass unnoticed where the gate's inputs do not reach the error."""
    from onnx import TensorProto

    from sdtrt.errors import ValidationError

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types |= {i.name: i.data_type for i in graph.initializer}
    for node in graph.node:
        if node.op_type in FP32_OPS or node.name in island:
            wrong = [v for v in (*node.input, *node.output) if types.get(v) == TensorProto.FLOAT16]
            if wrong:
                raise ValidationError(f"{name}: {node.op_type} node {node.name} of the FP32 islands has fp16 "
                                      f"values ({', '.join(wrong[:3])}) in the fp16 graph")


def bypass_fp16_round_trips(model) -> int:
    """Rewire Cast(fp32->fp16) -> Cast(fp16->fp32) chains to the fp32 source and drop dead nodes.

    The converter casts a kept-FP32 graph input to fp16 at the door and an FP32 island casts it back,
    which would round e.g. the timestep to fp16 on its way into the time embedding. Returns the number
    of consumers rewired.
    """
    from onnx import TensorProto

    graph = model.graph
    fp32 = {v.name for v in list(graph.input) + list(graph.value_info) if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    producers = {o: n for n in graph.node for o in n.output}

    def cast_to(node) -> int | None:
        return node.attribute[0].i if node.op_type == "Cast" else None

    def is_fp32(name: str) -> bool:
        node = producers.get(name)
        return name in fp32 or (node is not None and cast_to(node) == TensorProto.FLOAT)

    replace = {}
    for node in graph.node:
        src = producers.get(node.input[0]) if node.input else None
        if cast_to(node) == TensorProto.FLOAT and src is not None and cast_to(src) == TensorProto.FLOAT16 \
                and is_fp32(src.input[0]):
            replace[node.output[0]] = src.input[0]
    rewired = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
                rewired += 1
    # Drop nodes whose outputs nobody reads any more.
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for n in graph.node for name in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return rewired
        for n in dead:
            graph.node.remove(n)


def io_types(path: Path) -> dict[str, str]:
    """name -> numpy dtype name of every graph input and output, read from the ONNX file."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in list(model.graph.input) + list(model.graph.output):
        out[v.name] = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
    return out
