"""LoRAs (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") fused into the weights at export:
``sdtrt export MODEL --lora FILE[:SCALE]``, what every peer runtime does (the generation-time swap is issue 14's
other half).

Loading and key conversion are diffusers' own (``StableDiffusionLoraLoaderMixin.load_lora_weights``: the
diffusers/PEFT layout and kohya/A1111's ``lora_unet_…``/``lora_te_…`` with ``alpha``), fusing is
``fuse_lora(lora_scale=…)`` with one adapter per file weighted by ``set_adapters``: the exported graphs are then
what diffusers computes with the same LoRAs fused. What diffusers only warns about is refused here: a file none or
only part of whose layers land on the model (a LoRA for another base model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import ModelSourceError
from sdtrt.runtime.lora import PICKLED, parse_spec



@dataclass(frozen=True)
class LoraSpec:
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE[:SCALE]`` (A1111's weight; default 1), as the runtime reads it."""
        return cls(*parse_spec(text))

    @property
    def name(self) -> str:
        return Path(self.path).stem


def check_file(spec: LoraSpec, allow_pickle: bool) -> Path:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise ModelSourceError(f"LoRA file {path} does not exist")
    if not path.is_file():
        raise ModelSourceError(f"LoRA {path} is not a file (give the .safetensors file)")
    if path.suffix.lower() in PICKLED and not allow_pickle:
        raise ModelSourceError(f"LoRA {path} is pickled ({path.suffix}); pickles can run arbitrary code when loaded: "
                               "use a .safetensors LoRA, or pass --allow-pickle for a file you trust")
    return path


def lora_layers(path: Path) -> int:
    """How many layers the file adapts (its down/A matrices), read without torch (safetensors' NumPy API)."""
    if path.suffix.lower() != ".safetensors":
        return -1
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            keys = list(fh.keys())
    except Exception as ex:  # noqa: BLE001  (safetensors raises its own untyped errors for broken files)
        raise ModelSourceError(f"LoRA {path} is not a readable safetensors file ({str(ex).splitlines()[0][:200]})") \
            from None
    return sum(1 for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight", "lora.down.weight")))


def check_lora_file(spec: LoraSpec, allow_pickle: bool) -> Path:
    """``check_file`` and, for safetensors, that it holds LoRA layers at all: what can be refused without torch."""
    path = check_file(spec, allow_pickle)
    if path.suffix.lower() not in (".safetensors", *PICKLED):
        raise ModelSourceError(f"LoRA {path} is not a .safetensors file (nor a pickled {'/'.join(PICKLED)} with "
                               "--allow-pickle)")
    if lora_layers(path) == 0:
        raise ModelSourceError(f"LoRA {path} has no LoRA layers (no lora_down / lora_A weights): it is not a LoRA "
                               "file")
    return path


def fuse_loras(model, specs: list[LoraSpec], allow_pickle: bool = False, log=print):
    """A copy of ``model`` (``loaders.LoadedModel``) with the LoRAs fused into its U-Net and every text encoder
    (SDXL: both; diffusers' SDXL pipelines load ``text_encoder_2.``/``lora_te2_`` layers into the second)."""
    import torch
    from dataclasses import replace

    from sdtrt.export.loaders import _library_logs_silenced

    paths = [check_file(s, allow_pickle) for s in specs]
    unet = copy.deepcopy(model.unet)  # the loaded model is cached
    encoders = {c: copy.deepcopy(m) for c, m, _ in model.encoders}
    pipe = model.diffusers_pipeline(unet, encoders)
    names = []
    for i, (spec, path) in enumerate(zip(specs, paths)):
        adapter = f"lora{i}"
        before = _adapted(unet, *encoders.values())
        log(f"loading LoRA {path} (scale {spec.scale:g}) ...")
        try:
            with _library_logs_silenced(), torch.no_grad():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter,
                                       use_safetensors=path.suffix.lower() == ".safetensors")
        except Exception as ex:  # noqa: BLE001  (diffusers/PEFT raise what the mismatched file provokes)
            first = str(ex).strip().splitlines()[0][:300] if str(ex).strip() else type(ex).__name__
            raise ModelSourceError(f"LoRA {path} does not fit this model ({first}): it was made for another base "
                                   "model, or is not a LoRA") from None
        landed = _adapted(unet, *encoders.values()) - before
        expected = lora_layers(path)
        if landed == 0 or (expected > 0 and landed < expected):
            raise ModelSourceError(f"LoRA {path}: {landed} of its {expected if expected >= 0 else '?'} layers match "
                                   "this model's: it was made for another base model")
        names.append(adapter)
    with torch.no_grad():
        pipe.set_adapters(names, [s.scale for s in specs])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return replace(model, unet=unet.eval(), **{c: m.eval() for c, m in encoders.items()})


def strongest_change(base, fused, parts=("unet", "text_encoder")) -> tuple[float, str]:
    """The largest relative change ||W' - W|| / ||W|| the fused LoRAs made to one weight of the U-Net or text
    encoder, and that weight's name: what a failed parity gate reports of the LoRAs' strength."""
    import torch

    best, where = 0.0, "no layer"
    with torch.no_grad():
        for part in parts:
            before = dict(getattr(base, part).named_parameters())
            for name, after in getattr(fused, part).named_parameters():
                old = before.get(name)
                if old is None or old.shape != after.shape or old.data_ptr() == after.data_ptr():
                    continue
                change = float((after.double() - old.double()).norm() / old.double().norm().clamp_min(1e-30))
                if change > best:
                    best, where = change, f"{part}.{name}"
    return best, where


def _adapted(*modules) -> int:
    """Layers carrying a LoRA adapter (PEFT's lora_A), over ``modules``."""
    return sum(len(getattr(m, "lora_A", {})) for module in modules for m in module.modules())
