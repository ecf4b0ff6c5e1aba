"""How the export holds each graph's weights once (issue 24): an SDXL U-Net is 10.3 GB in FP32.

The gate's PyTorch FP32 references are computed first (``gate_references_due``); an fp16 graph's module is then converted to fp16 in place and
traced in fp16; after the trace its weights are freed (``release_weights``) before the ONNX files are read and ONNX
Runtime loads the graph for the gate. ``onnx_tools.save_model`` moves weights to the data file one tensor at a time.
"""

from __future__ import annotations

from sdtrt.export.exporter import default_cases
from sdtrt.manifest import Ranges


def gate_references_due(name: str, later: list[str], specs, done: dict, ranges: Ranges, vae_scale: int,
                        precision: str, seq: int, chunks: int):
    """The gate references (``validate.gate_references``) of graph ``name``, computed on its FP32 module just before
    its export, when the weights of the graphs exported before it are already freed; and, into ``done``, those of
    the ``later`` graphs that share weights with it (the VAE's decoder with its encoder), which its export converts
    to fp16 or frees."""
    from sdtrt.export.validate import gate_references

    mine = parameter_ids(specs[name].module)
    for n in (name, *later):
        if n not in done and (n == name or mine & parameter_ids(specs[n].module)):
            inputs = specs[n].tensor_specs(ranges, vae_scale, precision, seq, chunks)[0]
            done[n] = gate_references(specs[n], default_cases(n, ranges, chunks),
                                      {s.name for s in inputs if s.dtype == "float16"})
    return done.pop(name)


def release_weights_of(model, specs) -> None:
    """Free the weights of ``model``'s (``loaders.LoadedModel``) modules that no graph exports (the text encoder
    that the text-encoder graph copied to pad its token table)."""
    import torch

    keep = parameter_ids(*(s.module for s in specs.values()))
    for value in vars(model).values():
        if isinstance(value, torch.nn.Module):
            release_weights(value, keep)


def parameter_ids(*modules) -> frozenset:
    """ids of the modules' parameters and buffers (``release_weights`` keeps them)."""
    return frozenset(id(t) for m in modules for t in (*m.parameters(), *m.buffers()))


def release_weights(module, keep: frozenset = frozenset()) -> None:
    """Free ``module``'s parameters (but those in ``keep``, ``parameter_ids`` of modules still to be exported): they
    become meta tensors (shape and dtype, no data), so the export never holds a graph's weights twice (torch's
    and ONNX's). A released module cannot run; its configuration stays."""
    module._apply(lambda t: t if id(t) in keep or t.device.type == "meta" else t.to("meta"), recurse=True)
