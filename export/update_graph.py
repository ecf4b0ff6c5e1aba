"""The sampler update as a small ONNX graph, so a GPU backend runs it as an engine between U-Net calls.

    lin        = sum_j coefs[j] * state_j + sum_j coefs[S + j] * model_output_j + coefs[S + M] * noise
    next_state = mask * lin + (1 - mask) * (coefs[S + M + 1] * image_latents + coefs[S + M + 2] * init_noise)

computed in FP32 (the latents carry the whole trajectory, their precision matters), with a second
output already cast to the U-Net's latent dtype. One graph serves every sampler and every task: a table
row is written into ``coefs`` (zero-padded), the ring of states and model outputs is passed by address,
and the mask term is 4-channel inpainting's blend (diffusers' StableDiffusionInpaintPipeline); other tasks
pass an all-ones mask, and (1 - 1) * anything finite is 0, so lin comes through exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtrt.runtime.samplers import COEFS, OUTPUT_DEPTH, STATE_DEPTH


def update_inputs(latent_channels: int) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str, tuple]]]:
    dims = ("batch", latent_channels, "latent_height", "latent_width")
    ins = [(f"state_{j}", "float32", dims) for j in range(STATE_DEPTH)]
    ins += [(f"model_output_{j}", "MODEL", dims) for j in range(OUTPUT_DEPTH)]
    ins += [("noise", "float32", dims), ("coefs", "float32", (COEFS,)),
            ("mask", "float32", ("batch", 1, "latent_height", "latent_width")),
            ("image_latents", "float32", dims), ("init_noise", "float32", dims)]
    outs = [("next_state", "float32", dims), ("next_latents", "LATENTS", dims)]
    return ins, outs


def build_update_graph(path: Path, latent_channels: int, model_dtype: str, latents_dtype: str, opset: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    np_to_onnx = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    ins, outs = update_inputs(latent_channels)
    resolve = {"MODEL": model_dtype, "LATENTS": latents_dtype}
    graph_inputs = [helper.make_tensor_value_info(n, np_to_onnx[resolve.get(t, t)], list(d)) for n, t, d in ins]
    graph_outputs = [helper.make_tensor_value_info(n, np_to_onnx[resolve.get(t, t)], list(d)) for n, t, d in outs]
    nodes, inits = [], [numpy_helper.from_array(np.array(1.0, np.float32), "one")]

    def scaled(k: int, name: str) -> str:
        """coefs[k] * name, in fp32."""
        inits.append(numpy_helper.from_array(np.array([k], np.int64), f"idx_{k}"))
        nodes.append(helper.make_node("Gather", ["coefs", f"idx_{k}"], [f"c_{k}"], axis=0))  # (1,)
        x = name
        if name.startswith("model_output") and model_dtype != "float32":
            nodes.append(helper.make_node("Cast", [name], [f"{name}_f32"], to=TensorProto.FLOAT))
            x = f"{name}_f32"
        nodes.append(helper.make_node("Mul", [x, f"c_{k}"], [f"term_{k}"]))
        return f"term_{k}"

    sources = [f"state_{j}" for j in range(STATE_DEPTH)] + [f"model_output_{j}" for j in range(OUTPUT_DEPTH)] + ["noise"]
    nodes.append(helper.make_node("Sum", [scaled(k, n) for k, n in enumerate(sources)], ["lin"]))
    known = [scaled(len(sources), "image_latents"), scaled(len(sources) + 1, "init_noise")]
    nodes += [
        helper.make_node("Add", known, ["known"]),
        helper.make_node("Sub", ["one", "mask"], ["keep"]),
        helper.make_node("Mul", ["lin", "mask"], ["repaint"]),
        helper.make_node("Mul", ["known", "keep"], ["kept"]),
        helper.make_node("Add", ["kept", "repaint"], ["next_state"]),
        helper.make_node("Cast", ["next_state"], ["next_latents"], to=np_to_onnx[latents_dtype]),
    ]
    graph = helper.make_graph(nodes, "sampler_update", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sdtrt")
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
