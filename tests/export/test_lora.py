"""LoRAs fused at export against diffusers' load_lora_weights + fuse_lora on the mid-size built-in: a PEFT-format
LoRA (U-Net attention linears and 1x1-conv projections, text-encoder attention) and a kohya/A1111-format one (with
an alpha that is not the rank), alone and together (diffusers' set_adapters), fp32 engines on ONNX Runtime CPU, the
same initial latents on both sides."""

import shutil

import numpy as np
import pytest
import torch

from sdtrt.export import ExportConfig, export
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline

RANK = 4


def _peft_lora(folder, seed, alpha=RANK):
    """(unet, text-encoder) PEFT state dicts of a rank-4 LoRA with random A and B (B is zero at PEFT's init: every
    delta would be 0), and the metadata diffusers saves with them (their LoraConfigs: lora_alpha)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    # peft's own API, not diffusers'/transformers' add_adapter: transformers 5.x refuses peft < 0.22 there
    configs = {"unet": LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                          "proj_in", "proj_out"]),
               "text_encoder": LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"])}
    unet = inject_adapter_in_model(configs["unet"], unet)
    text_encoder = inject_adapter_in_model(configs["text_encoder"], text_encoder)
    with torch.no_grad():
        for module in (unet, text_encoder):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(0.15 * torch.randn_like(p))
    metadata = {f"{name}_lora_adapter_metadata": config.to_dict() for name, config in configs.items()}
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder), metadata


def _kohya(unet_sd, te_sd, alpha):
    """The same layers in kohya/A1111 naming: lora_unet_<module path with _>.lora_down/.lora_up/.alpha."""
    out = {}
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_text_model_", te_sd)):
        for key, value in sd.items():
            module, _, kind = key.rpartition(".lora_")
            module = module.removeprefix("text_model.")
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _export_with(tmp_path_factory, folder, loras):
    out = tmp_path_factory.mktemp("lora_export") / "engine"
    export(ExportConfig(model=str(folder), out=str(out), precision="fp32", size_min=64, size_max=128, batch_max=2,
                        loras=tuple(loras)), log=lambda s: None)
    return out


def _images(out, folder, setup):
    """(ours, diffusers') images of one prompt pair from the same initial latents; ``setup(pipe)`` loads and fuses
    the LoRAs into diffusers' pipeline."""
    from diffusers import StableDiffusionPipeline

    ours = Pipeline.from_dir(out, backend="onnxruntime-cpu")
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    kwargs = dict(negative_prompt=["blurry"] * 2, num_inference_steps=8, height=64, width=96, output_type="np")
    got = ours(["a red fox", "a castle"], latents=z, scheduler="pndm", **kwargs).images
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    setup(theirs)
    want = theirs(["a red fox", "a castle"], latents=torch.from_numpy(z), **kwargs).images
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    without = plain(["a red fox", "a castle"], latents=torch.from_numpy(z), **kwargs).images
    return got, want, without, ours


@pytest.mark.slow  # ~70 s; the default run fuses a PEFT LoRA (with a kohya one) in the next test
def test_a_peft_lora_fused_at_export_matches_diffusers_fuse_lora(tmp_path_factory, small_model, lora_files):
    _, folder = small_model
    style, _ = lora_files
    out = _export_with(tmp_path_factory, folder, [f"{style}:0.8"])

    def setup(pipe):
        pipe.load_lora_weights(style.parent, weight_name=style.name)
        pipe.fuse_lora(lora_scale=0.8)

    got, want, without, ours = _images(out, folder, setup)
    assert psnr(got, want) >= 40, psnr(got, want)
    assert psnr(want, without) < 30  # the LoRA changes the image: the comparison is not with the base model
    assert ours.manifest.model.loras[0].startswith("style:0.8:")


def test_a_kohya_and_a_peft_lora_together_match_diffusers_set_adapters(tmp_path_factory, small_model, lora_files):
    _, folder = small_model
    style, kohya = lora_files
    out = _export_with(tmp_path_factory, folder, [f"{style}:0.7", f"{kohya}:0.5"])

    def setup(pipe):
        pipe.load_lora_weights(style.parent, weight_name=style.name, adapter_name="style")
        pipe.load_lora_weights(kohya.parent, weight_name=kohya.name, adapter_name="char")
        pipe.set_adapters(["style", "char"], [0.7, 0.5])
        pipe.fuse_lora(adapter_names=["style", "char"])

    got, want, without, ours = _images(out, folder, setup)
    assert psnr(got, want) >= 40, psnr(got, want)
    assert psnr(want, without) < 30
    text = ours("a fox", num_inference_steps=2, height=64, width=64, seed=1).parameters[0]
    assert "Lora hashes: \"style: " in text and ", kohya_char: " in text


def prepare_bad_files(base, tmp_path):
    """Beside the good LoRAs: a pickle, a safetensors file that is no LoRA, a LoRA of the tiny model."""
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    from sdtrt.export.loaders import load_model

    if not (base / "x.ckpt").exists():
        (base / "x.ckpt").write_bytes(b"not a pickle")
        save_file({"some.weight": np.zeros((2, 2), np.float32)}, str(base / "junk.safetensors"))
    if not (base / "tiny_lora.safetensors").exists():
        tiny = tmp_path / "tiny"
        load_model("tiny").save_pretrained(tiny)
        save_torch(_kohya(*_peft_lora(tiny, 3)[:2], alpha=4.0), str(base / "tiny_lora.safetensors"))
        shutil.rmtree(tiny)
    return base


@pytest.mark.parametrize("lora, needle", [
    ("none.safetensors", "LoRA file {base}/none.safetensors does not exist"),
    ("style.safetensors:nan", "LoRA scale must be finite"),
    ("x.ckpt", "is pickled (.ckpt)"),
    ("junk.safetensors", "is not a LoRA"),
    ("tiny_lora.safetensors", "it was made for another base model"),
])
def test_bad_loras_are_one_line(cli, tmp_path, small_model, lora_files, lora, needle):
    base = prepare_bad_files(lora_files[0].parent, tmp_path)
    code, _, err = cli("export", small_model[1], "--out", tmp_path / "out", "--precision", "fp32", "--size", "64:128",
                       "--lora", f"{base}/{lora}")
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("sdtrt export: error: ") and needle.format(base=base) in last, err
    assert not (tmp_path / "out").exists()
