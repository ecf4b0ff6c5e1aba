"""ONNX Runtime-only rewrites of the exported graphs, made at load time and never written over them.

The export writes one set of ONNX files for TensorRT and ONNX Runtime alike. There, each attention is PyTorch's
``scaled_dot_product_attention`` as traced: ``MatMul(q, kᵀ) -> Softmax -> MatMul(·, v)``, which ONNX Runtime runs as
written — the whole score matrix (rows x heads x queries x keys floats) is materialised. At 1024x1024 that is 1 GB per
head and row for a 128x128 latent, and a generation of even the tiny model peaked at 18.9 GB.

``fuse_attention`` replaces each such pattern with ONNX Runtime's ``com.microsoft.MultiHeadAttention`` operator
(inputs in the (batch, tokens, heads x head size) layout the projections already give). Its CPU kernel computes
attention tile by tile — FlashAttention (Dao et al. 2022, arXiv:2205.14135), onnxruntime PR 20805 — for fp32 inputs
without mask, bias or past state, so the working memory no longer grows with queries x keys. ONNX Runtime's own
transformer optimizer (``onnxruntime.transformers.optimizer``, model type "unet") fuses the same attention but fails
on these graphs (onnxruntime 1.32: ``int()`` of a one-element array in ``fusion_attention_unet.get_num_heads``), emits
operators without CPU kernels (GroupNorm, NhwcConv, BiasSplitGelu, packed QKV) and turns self-attention into
``Attention``, whose CPU kernel materialises the scores: a targeted rewrite of the exporter's one pattern is smaller
than working around it.

The rewritten graph keeps every initializer's name and its external data where it is (the engine folder), so a
LoRA's replacement weights (``OrtEngine.override``) apply to it unchanged. ONNX Runtime refuses external data outside
a model file's folder, so the graph is handed to it as bytes, with the folder given for the external data.
"""

from __future__ import annotations

from pathlib import Path

FUSED_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"


class _Graph:
    """Producer/consumer indexes over a graph's nodes, and the values of its constant tensors."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._np = numpy_helper
        self.inits = {t.name: t for t in graph.initializer}

    def const(self, name: str):
        """The value of ``name`` when it is an initializer or a Constant node's output, else None."""
        if name in self.inits:
            t = self.inits[name]
            return None if t.data_location == 1 else self._np.to_array(t)  # external data: never a small constant
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return self._np.to_array(a.t)
        return None

    def uncast(self, name: str) -> str:
        """``name``, or what it is a Cast of (repeatedly)."""
        while (node := self.producer.get(name)) is not None and node.op_type == "Cast":
            name = node.input[0]
        return name

    def made_by(self, name: str, op: str):
        """The node producing ``name`` when it is an ``op``, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _heads(g: _Graph, reshape) -> int | None:
    """The head count a (batch, tokens, heads, head size) Reshape splits into: element 2 of its shape, a constant
    (diffusers' ``view(batch, -1, heads, head_dim)``: heads is a Python int, head_dim is computed from the shape)."""
    shape = g.const(reshape.input[1])
    if shape is not None:
        return int(shape[2]) if shape.ndim == 1 and shape.size == 4 and shape[2] > 0 else None
    concat = g.producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    third = g.const(concat.input[2])
    return int(third.reshape(-1)[0]) if third is not None and third.size == 1 and third.reshape(-1)[0] > 0 else None


def _split_heads(g: _Graph, name: str, perm: list[int]):
    """(the 3-D input, heads) when ``name`` is ``Transpose(perm)(Reshape(x, [B, -1, N, H]))``, else None."""
    transpose = g.made_by(name, "Transpose")
    if transpose is None or list(g.attr(transpose, "perm", [])) != perm:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    if reshape is None:
        return None
    heads = _heads(g, reshape)
    return None if heads is None else (reshape.input[0], heads)


def _scaled(g: _Graph, name: str):
    """(the Mul producing ``name``, its Transpose input, its other input); else None."""
    mul = g.made_by(name, "Mul")
    if mul is None or len(mul.input) != 2:
        return None
    for tensor, factor in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        node = g.producer.get(tensor)
        if node is not None and node.op_type == "Transpose":
            return mul, tensor, factor
    return None


def _scale(g: _Graph, fq: str, fk: str) -> tuple[bool, float | None]:
    """Whether the two Muls apply a scale MultiHeadAttention can take, and that scale (None: 1/sqrt(head size), the
    default of both operators). PyTorch's exporter splits SDPA's scale s as sqrt(s) on q and on kᵀ."""
    import numpy as np

    cq, ck = g.const(fq), g.const(fk)
    if cq is not None and ck is not None:
        if cq.size != 1 or ck.size != 1:
            return False, None
        return True, float(np.float64(cq.reshape(-1)[0]) * np.float64(ck.reshape(-1)[0]))
    return (_default_scale(g, fq) and _default_scale(g, fk)), None


def _default_scale(g: _Graph, name: str) -> bool:
    """Whether ``name`` is SDPA's default scale as PyTorch's exporter computes it from the head size (the last
    dimension of q): ``Sqrt(Div(1, Sqrt(Slice(Shape(q), -1))))``, the square root of 1/sqrt(head size), with Casts
    between (to float, and to float16 in fp16 graphs)."""
    node = g.producer.get(name)
    for op in ("Sqrt", "Div", "Sqrt", "Slice", "Shape"):
        while node is not None and node.op_type == "Cast":
            node = g.producer.get(node.input[0])
        if node is None or node.op_type != op:
            return False
        if op == "Div":
            one = g.const(node.input[0])
            if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
                return False
            node = g.producer.get(node.input[1])
            continue
        if op == "Slice":
            start, end = g.const(node.input[1]), g.const(node.input[2]) if len(node.input) > 2 else None
            if start is None or int(start.reshape(-1)[0]) != -1 or (end is not None and int(end.reshape(-1)[0]) < 0):
                return False  # the last dimension: the head size
        node = g.producer.get(node.input[0]) if op != "Shape" else None
    return True


def fuse_attention(model) -> int:
    """Rewrite, in place, each ``Reshape(Transpose(MatMul(Softmax(MatMul(q·s, kᵀ·s)), v)))`` of the exporter into
    one MultiHeadAttention node; return how many were fused. A pattern with a mask or a bias (anything between the
    pieces) is left as it is. Only the final Reshape is replaced: the pieces are dropped afterwards when nothing
    else reads them, so an intermediate read elsewhere is still computed."""
    from onnx import helper

    g = _Graph(model.graph)
    replace: dict[int, object] = {}  # id of the Reshape a fused node replaces -> the fused node
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        scores = g.made_by(g.uncast(softmax.input[0]), "MatMul")  # fp16 graphs: the softmax is computed in FP32
        if scores is None or g.attr(softmax, "axis", -1) not in (-1, 3):
            continue
        probs = [softmax.output[0]] + [c.output[0] for c in g.consumers.get(softmax.output[0], ()) if c.op_type == "Cast"]
        for pv in [c for p in probs for c in g.consumers.get(p, ()) if c.input[0] == p]:
            if pv.op_type == "MatMul":
                node = _fused(g, scores, pv)
                if node is not None:
                    replace[id(g.producer[node.output[0]])] = node
    if not replace:
        return 0
    _prune(model.graph, [replace.get(id(n), n) for n in model.graph.node])
    if not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return len(replace)


def _fused(g: _Graph, scores, pv):
    """The MultiHeadAttention node computing what the Reshape after ``pv`` (the weighted sum of the values) gives, or
    None when the pieces around ``scores`` and ``pv`` are not the exporter's pattern."""
    from onnx import helper

    q_mul, k_mul = _scaled(g, scores.input[0]), _scaled(g, scores.input[1])
    if q_mul is None or k_mul is None:
        return None
    q = _split_heads(g, q_mul[1], [0, 2, 1, 3])
    k = _split_heads(g, k_mul[1], [0, 2, 3, 1])
    v = _split_heads(g, pv.input[1], [0, 2, 1, 3])
    ok, scale = _scale(g, q_mul[2], k_mul[2])
    if q is None or k is None or v is None or not ok or not q[1] == k[1] == v[1]:
        return None
    merge = next((n for n in g.consumers.get(pv.output[0], ())
                  if n.op_type == "Transpose" and list(g.attr(n, "perm", [])) == [0, 2, 1, 3]), None)
    out = None if merge is None else next((n for n in g.consumers.get(merge.output[0], ()) if n.op_type == "Reshape"),
                                          None)
    shape = None if out is None else g.const(out.input[1])
    concat = None if out is None else g.made_by(out.input[1], "Concat")
    if out is None or (shape.size != 3 if shape is not None else concat is None or len(concat.input) != 3):
        return None  # the merge of the heads: (batch, tokens, heads x head size)
    attrs = {"num_heads": q[1]} | ({"scale": scale} if scale is not None else {})
    return helper.make_node(FUSED_OP, [q[0], k[0], v[0]], [out.output[0]], name=f"{scores.name}/fused_mha",
                            domain=FUSED_DOMAIN, **attrs)


def _prune(graph, nodes: list) -> None:
    """Keep ``nodes`` (in their order) minus those whose outputs nothing reads any more: the pieces and shape
    arithmetic of the fused attentions. The graph's order is not relied on (ONNX Runtime accepts graphs whose
    nodes are not sorted, and the export's FP32 islands append theirs)."""
    producer = {o: n for n in nodes for o in n.output if o}
    wanted = [o.name for o in graph.output]
    for n in nodes:  # names read inside subgraphs (If, Loop) are read by their node
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                wanted += [i for x in sub.node for i in x.input if i]
    alive: set[int] = set()
    while wanted:
        node = producer.get(wanted.pop())
        if node is not None and id(node) not in alive:
            alive.add(id(node))
            wanted += [i for i in node.input if i]
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) in alive)


def ort_graph(path: Path) -> tuple[bytes | None, int]:
    """``path``'s graph with its attention fused, serialised (weights stay in the external data files beside it), and
    how many attentions were fused; (None, 0) when there is nothing to fuse."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = fuse_attention(model)
    return (model.SerializeToString(), count) if count else (None, 0)
