"""SDXL LoRAs and textual-inversion embeddings at generation time, no re-export: a kohya/A1111 file (lora_unet_ in
the original U-Net's block names, lora_te1_, lora_te2_) and a diffusers/PEFT one (unet., text_encoder.,
text_encoder_2.), both touching the U-Net and both encoders, against diffusers' StableDiffusionXLPipeline
load_lora_weights + set_adapters + fuse_lora; SDXL embeddings (clip_l, clip_g) against load_textual_inversion into
each encoder; the refiner (text_encoder_2 only); what belongs to another model refused. tiny-xl, fp32, ONNX Runtime
CPU, non-square, batch 2."""

import numpy as np
import pytest
import torch

from sdtrt.errors import UsageError
from sdtrt.parity import psnr
from sdtrt.runtime import Pipeline
from tests.runtime.test_sdxl import HEIGHT, WIDTH, _latents, _xl

RANK = 4
PROMPTS, NEGATIVES = ["a photo of a cat", "a castle, oil on canvas"], ["blurry", "lowres"]
ARGS = dict(num_inference_steps=4, guidance_scale=6.0, height=HEIGHT, width=WIDTH, output_type="np")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _peft_layers(folder, seed, alpha, encoders=("text_encoder", "text_encoder_2")):
    """{component: PEFT state dict} of rank-4 LoRAs with random A and B on the U-Net and ``encoders`` of the diffusers
    folder, and the metadata diffusers saves with them (their LoraConfigs)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    modules = {"unet": (UNet2DConditionModel, UNET_TARGETS)}
    for name in encoders:
        modules[name] = (CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection, TEXT_TARGETS)
    layers, metadata = {}, {}
    for name, (cls, targets) in modules.items():
        config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets)
        module = inject_adapter_in_model(config, cls.from_pretrained(folder / name))
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.15 * torch.randn_like(p))
        layers[name] = get_peft_model_state_dict(module)
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    return layers, metadata


def _kohya_sdxl(layers, alpha):
    """The same layers as kohya's sd-scripts names them for SDXL: lora_unet_ + the original (SGM) U-Net's module
    path (input_blocks_4_1_…), lora_te1_/lora_te2_ + text_model_…, with .alpha."""
    from sdtrt.runtime.lora import sgm_names

    out = {}
    unet_paths = {k.rpartition(".lora_")[0] for k in layers["unet"]}
    sgm = sgm_names(unet_paths)  # from the adapted layers alone (no resampler among them)
    assert set(sgm) == unet_paths  # every adapted layer has its original name
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for key, value in layers[component].items():
            module, _, kind = key.rpartition(".lora_")
            name = prefix + (sgm[module] if component == "unet" else module).replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module")
def xl_loras(tmp_path_factory, tiny_xl_model):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    _, folder = tiny_xl_model
    base = tmp_path_factory.mktemp("xl_loras")
    layers, metadata = _peft_layers(folder, 1, alpha=8)  # alpha 8 for rank 4: only the metadata says so
    StableDiffusionXLPipeline.save_lora_weights(base, unet_lora_layers=layers["unet"],
                                                text_encoder_lora_layers=layers["text_encoder"],
                                                text_encoder_2_lora_layers=layers["text_encoder_2"],
                                                weight_name="xl_style.safetensors", **metadata)
    save_file(_kohya_sdxl(_peft_layers(folder, 2, alpha=RANK)[0], alpha=2.0), str(base / "xl_kohya.safetensors"))
    return base / "xl_style.safetensors", base / "xl_kohya.safetensors"


def _ours(pipe, seed=5):
    return pipe(PROMPTS, negative_prompt=NEGATIVES, seed=seed, **ARGS).images


def _theirs(pipe, folder, setup, seed=5):
    theirs = _xl(folder)
    setup(theirs)
    return theirs(prompt=PROMPTS, negative_prompt=NEGATIVES, latents=torch.from_numpy(_latents(pipe, seed, 2)),
                  **ARGS).images


def test_sgm_names_are_the_original_sdxl_unets():
    """kohya's SDXL names are the original U-Net's: checked on the real SDXL layout (built on the meta device),
    whose blocks are known: attention in input_blocks 4, 5, 7, 8, middle_block.1, output_blocks 0-5; downsamplers
    input_blocks.3.0.op and .6.0.op; upsamplers output_blocks.2.2.conv and .5.2.conv (after attention) and the
    resnets' in_layers.2/out_layers.3/emb_layers.1/skip_connection."""
    from diffusers import UNet2DConditionModel

    from sdtrt.export.architectures import SDXL
    from sdtrt.runtime.lora import sgm_names

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL.unet)
    paths = [n.removesuffix(".weight") for n, p in unet.named_parameters() if p.dim() >= 2]
    names = sgm_names(paths)
    attention = {".".join(v.split(".")[:2]) for k, v in names.items() if ".attentions." in k}
    assert attention == {"input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8", "middle_block.1",
                         *(f"output_blocks.{i}" for i in range(6))}
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert names["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert names["down_blocks.0.resnets.1.conv1"] == "input_blocks.2.0.in_layers.2"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert names["up_blocks.2.resnets.2.conv_shortcut"] == "output_blocks.8.0.skip_connection"
    assert names["up_blocks.2.resnets.0.conv2"] == "output_blocks.6.0.out_layers.3"
    assert names["conv_in"] == "input_blocks.0.0" and names["add_embedding.linear_1"] == "label_emb.0.0"
    assert len(set(names.values())) == len(names) == len(paths)


def _both(style, kohya):
    def setup(pipe):  # diffusers with both LoRAs fused, weighted 0.7 and 0.5
        pipe.load_lora_weights(style.parent, weight_name=style.name, adapter_name="style")
        pipe.load_lora_weights(kohya.parent, weight_name=kohya.name, adapter_name="kohya")
        pipe.set_adapters(["style", "kohya"], [0.7, 0.5])
        pipe.fuse_lora(adapter_names=["style", "kohya"])

    return setup


def test_sdxl_loras_match_diffusers_and_swap_exactly(tiny_xl_model, xl_loras):
    out, folder = tiny_xl_model
    style, kohya = xl_loras
    setup = _both(style, kohya)
    with Pipeline.from_dir(out, backend="onnxruntime-cpu") as pipe:
        base = _ours(pipe)
        pipe.set_loras([(style, 0.7), (kohya, 0.5)])
        applied = pipe._lora_state.applied
        assert all(applied[g][0] for g in ("unet", "text_encoder", "text_encoder_2"))  # both encoders changed
        both = _ours(pipe)
        want = _theirs(pipe, folder, setup)
        assert psnr(both, want) >= 60, psnr(both, want)
        pipe.set_loras([(kohya, 0.5)])
        only_kohya = _ours(pipe)
        pipe.set_loras([(style, 0.7), (kohya, 0.5)])
        np.testing.assert_array_equal(_ours(pipe), both)  # A -> B -> A: exactly the first image
        pipe.set_loras([])
        np.testing.assert_array_equal(_ours(pipe), base)  # and none: the base weights, exactly
    assert psnr(only_kohya, both) < 40 and psnr(base, only_kohya) < 40


def test_a_kohya_sdxl_lora_alone_matches_diffusers(tiny_xl_model, xl_loras):
    out, folder = tiny_xl_model
    _, kohya = xl_loras

    def setup(pipe):
        pipe.load_lora_weights(kohya.parent, weight_name=kohya.name)
        pipe.fuse_lora(lora_scale=0.8)

    with Pipeline.from_dir(out, backend="onnxruntime-cpu", loras=[(kohya, 0.8)]) as pipe:
        got = _ours(pipe, seed=7)
        want = _theirs(pipe, folder, setup, seed=7)
    assert psnr(got, want) >= 60, psnr(got, want)


def test_fuse_loras_changes_the_unet_and_both_encoders_as_diffusers_does(tiny_xl_model, xl_loras):
    """What `sdtrt export --lora` traces: the U-Net and both encoders with the LoRAs fused, diffusers' weights."""
    from sdtrt.export.loaders import load_model
    from sdtrt.export.lora import LoraSpec, fuse_loras, strongest_change

    _, folder = tiny_xl_model
    style, kohya = xl_loras
    base = load_model(str(folder))
    fused = fuse_loras(base, [LoraSpec(str(style), 0.7), LoraSpec(str(kohya), 0.5)], log=lambda s: None)
    theirs = _xl(folder)
    _both(style, kohya)(theirs)
    theirs.unload_lora_weights()  # the fused weights stay, without PEFT's wrappers
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert strongest_change(base, fused, (part,))[0] > 0.01, part
        want = getattr(theirs, part).state_dict()
        for name, value in getattr(fused, part).state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")


@pytest.mark.slow  # ~70 s (an SDXL-shaped export); the test above checks what it traces
def test_sdxl_loras_fused_at_export_match_diffusers(tmp_path_factory, tiny_xl_model, xl_loras):
    """`sdtrt export --lora` on SDXL fuses into the U-Net and both text encoders (diffusers' SDXL pipeline loads
    them)."""
    from sdtrt.export import ExportConfig, export

    _, folder = tiny_xl_model
    style, kohya = xl_loras
    out = tmp_path_factory.mktemp("xl_fused") / "engine"
    export(ExportConfig(model=str(folder), out=str(out), precision="fp32", size_min=64, size_max=128, batch_max=2,
                        loras=(f"{style}:0.7", f"{kohya}:0.5")), log=lambda s: None)
    with Pipeline.from_dir(out, backend="onnxruntime-cpu") as pipe:
        assert [x.split(":")[0] for x in pipe.manifest.model.loras] == ["xl_style", "xl_kohya"]
        got = _ours(pipe)
        want = _theirs(pipe, folder, _both(style, kohya))
        plain = _theirs(pipe, folder, lambda p: None)
    assert psnr(got, want) >= 60, psnr(got, want)
    assert psnr(want, plain) < 40  # the LoRAs change the image


@pytest.fixture(scope="module")
def xl_embeddings(tmp_path_factory):
    from safetensors.numpy import save_file

    base = tmp_path_factory.mktemp("xl_embeddings")
    rng = np.random.default_rng(5)
    save_file({"clip_l": rng.standard_normal((2, 32)).astype(np.float32),
               "clip_g": rng.standard_normal((2, 48)).astype(np.float32)}, str(base / "xlstyle.safetensors"))
    save_file({"emb_params": rng.standard_normal((1, 32)).astype(np.float32)}, str(base / "sd15.safetensors"))
    return base


def test_sdxl_embeddings_match_diffusers_load_textual_inversion(tiny_xl_model, xl_embeddings):
    from safetensors.torch import load_file

    out, folder = tiny_xl_model
    file = xl_embeddings / "xlstyle.safetensors"
    prompts = ["a photo of xlstyle cat", "a castle, xlstyle"]

    def setup(pipe):  # as diffusers documents for SDXL embeddings: each encoder's vectors into it
        state = load_file(str(file))
        pipe.load_textual_inversion(state["clip_l"], token="xlstyle", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="xlstyle", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)

    with Pipeline.from_dir(out, backend="onnxruntime-cpu", embeddings=[file]) as pipe:
        got = pipe(prompts, negative_prompt=NEGATIVES, seed=3, **ARGS)
        theirs = _xl(folder)
        setup(theirs)
        want = theirs(prompt=prompts, negative_prompt=NEGATIVES, latents=torch.from_numpy(_latents(pipe, 3, 2)),
                      **ARGS).images
    with Pipeline.from_dir(out, backend="onnxruntime-cpu") as plain:
        without = plain(prompts, negative_prompt=NEGATIVES, seed=3, **ARGS).images
    assert psnr(got.images, want) >= 60, psnr(got.images, want)
    assert psnr(got.images, without) < 40  # the vectors are used, not the words' own tokens
    assert "TI hashes: \"xlstyle: " in got.parameters[0]


def test_the_refiner_takes_text_encoder_2_loras_and_clip_g(tiny_xl_refiner_model, xl_embeddings, tmp_path):
    """The refiner's one encoder is diffusers' text_encoder_2: its LoRA layers (text_encoder_2., lora_te2_) and an
    SDXL embedding's clip_g go there; against diffusers' StableDiffusionXLImg2ImgPipeline from the same latents."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors.torch import load_file

    out, folder = tiny_xl_refiner_model
    layers, metadata = _peft_layers(folder, 4, alpha=RANK, encoders=("text_encoder_2",))
    StableDiffusionXLImg2ImgPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers["unet"],
                                                       text_encoder_2_lora_layers=layers["text_encoder_2"],
                                                       weight_name="refiner.safetensors", **metadata)
    lora, file = tmp_path / "refiner.safetensors", xl_embeddings / "xlstyle.safetensors"
    z = np.random.default_rng(1).standard_normal((2, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    prompts = ["a photo of xlstyle cat", "a castle"]
    kwargs = dict(num_inference_steps=8, guidance_scale=5.0, denoising_start=0.6, output_type="np")
    with Pipeline.from_dir(out, backend="onnxruntime-cpu", loras=[(lora, 0.6)], embeddings=[file]) as pipe:
        got = pipe(prompts, negative_prompt=NEGATIVES, image=z, seed=1, **kwargs).images
    theirs = _xl(folder, "StableDiffusionXLImg2ImgPipeline")
    theirs.load_textual_inversion(load_file(str(file))["clip_g"], token="xlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    theirs.load_lora_weights(lora.parent, weight_name=lora.name)
    theirs.fuse_lora(lora_scale=0.6)
    want = theirs(prompt=prompts, negative_prompt=NEGATIVES, image=torch.from_numpy(z), **kwargs).images
    assert psnr(got, want) >= 60, psnr(got, want)


def test_what_belongs_to_another_model_is_refused_not_half_applied(tiny_xl_model, tiny_fp32, xl_loras,
                                                                   xl_embeddings, tmp_path):
    from safetensors.torch import load_file, save_file

    _, kohya = xl_loras
    tensors = load_file(str(kohya))
    te2_only = {k: v for k, v in tensors.items() if k.startswith("lora_te2_")}
    save_file(te2_only, str(tmp_path / "te2.safetensors"))
    te1_only = {k: v for k, v in tensors.items() if k.startswith("lora_te1_")}
    save_file({**te1_only, **{k.replace("lora_unet_", "lora_unet_x"): v for k, v in tensors.items()
                              if k.startswith("lora_unet_")}}, str(tmp_path / "partial.safetensors"))
    with Pipeline.from_dir(tiny_xl_model[0], backend="onnxruntime-cpu") as xl:
        first = _ours(xl)
        with pytest.raises(UsageError, match=r"LoRA partial.safetensors: \d+ of its \d+ layers match this model's "
                                             r"\(first unmatched: .*\): it was made for another base model"):
            xl.set_loras([(tmp_path / "partial.safetensors", 1.0)])  # its text_encoder layers would fit
        with pytest.raises(UsageError, match="sd15.safetensors is a one-text-encoder embedding .32-wide vectors.; "
                                             "this model has 2 text encoders .32 . 48 wide."):
            xl.load_textual_inversion(xl_embeddings / "sd15.safetensors")
        np.testing.assert_array_equal(_ours(xl), first)  # nothing changed
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as sd:
        with pytest.raises(UsageError, match=r"te2.safetensors: 0 of its \d+ layers match .*first unmatched: "
                                             r"lora_te2_text_model"):
            sd.set_loras([(tmp_path / "te2.safetensors", 1.0)])
        with pytest.raises(UsageError, match="xlstyle.safetensors is an SDXL embedding .clip_g, clip_l.; this model "
                                             "has one text encoder"):
            sd.load_textual_inversion(xl_embeddings / "xlstyle.safetensors")


def test_made_loras_and_embeddings_cover_every_encoder(tiny_xl_model, tiny_fp32, tmp_path):
    """`sdtrt make lora/embedding` on SDXL: lora_te1_/lora_te2_ layers and clip_l/clip_g vectors, which load; the
    graphs a refittable build must build with REFIT are the U-Net and every encoder."""
    from safetensors.numpy import load_file

    from sdtrt.runtime.synthetic import random_embedding, random_lora
    from sdtrt.runtime.tensorrt.refit import refittable_graphs

    with Pipeline.from_dir(tiny_xl_model[0], backend="onnxruntime-cpu") as pipe:
        random_lora(pipe.manifest, tmp_path / "made.safetensors", 2, 0)
        random_embedding(pipe.manifest, tmp_path / "madeemb.safetensors", 2, 0)
        prefixes = {k.split("_")[1] for k in load_file(str(tmp_path / "made.safetensors"))}
        assert prefixes == {"unet", "te1", "te2"}
        assert {k: v.shape for k, v in load_file(str(tmp_path / "madeemb.safetensors")).items()} == \
            {"clip_l": (2, 32), "clip_g": (2, 48)}
        pipe.set_loras([(tmp_path / "made.safetensors", 0.5)])
        assert pipe.load_textual_inversion(tmp_path / "madeemb.safetensors") == "madeemb"
        assert refittable_graphs(pipe.manifest) == ("unet", "text_encoder", "text_encoder_2")
    assert refittable_graphs(tiny_fp32[1]) == ("unet", "text_encoder")


def test_an_embeddings_folder_skips_another_familys_files_and_the_a1111_list_shows_both(tiny_xl_model, xl_embeddings):
    """A1111's embeddings/ folder often mixes SD 1.5 and SDXL files: what this model cannot take is skipped with a
    line, as A1111 skips it (a file named on its own is still refused); /sdapi/v1/embeddings lists the loaded one with
    A1111's shape (clip_l + clip_g widths) and the skipped one."""
    from fastapi.testclient import TestClient

    from sdtrt.serve.app import create_app
    from sdtrt.serve.config import ServeConfig

    out, _ = tiny_xl_model
    with Pipeline.from_dir(out, backend="onnxruntime-cpu", embeddings=[xl_embeddings]) as pipe:
        assert list(pipe.embeddings) == ["xlstyle"] and list(pipe.skipped_embeddings) == ["sd15"]
        with TestClient(create_app(ServeConfig(folder=str(out)), pipeline=pipe)) as client:
            listed = client.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"]["xlstyle"]["shape"] == 32 + 48 and listed["loaded"]["xlstyle"]["vectors"] == 2
        assert list(listed["skipped"]) == ["sd15"]
    with pytest.raises(UsageError):
        Pipeline.from_dir(out, backend="onnxruntime-cpu", embeddings=[xl_embeddings / "sd15.safetensors"])


def test_the_refiner_on_the_command_line_reads_the_embeddings_and_leaves_the_bases_loras(
        tiny_xl_model, tiny_xl_refiner_model, xl_embeddings, xl_loras, cli, tmp_path):
    """`generate --refiner` with an embedding and a <lora:…> tag: the refiner's encoder reads the embedding's token
    (clip_g; before, it read it as plain words), the tag is the base's (diffusers loads LoRAs into the base pipeline)
    and is not refused on the refiner: the library's ensemble with the embedding on both models."""
    from PIL import Image

    from sdtrt.runtime import refiner as ensemble
    from sdtrt.runtime.request import GenerationRequest

    (base_out, _), (ref_out, _) = tiny_xl_model, tiny_xl_refiner_model
    prompt = f"a photo of xlstyle cat <lora:{xl_loras[1].stem}:0.5>"
    emb = xl_embeddings / "xlstyle.safetensors"
    code, _, err = cli("generate", base_out, prompt, "--refiner", ref_out, "--refiner-start", 0.3, "--steps", 6,
                       "--size", "96x64", "--seed", 3, "--embedding", emb, "--lora-dir", xl_loras[1].parent, "-o", tmp_path / "r.png")
    assert code == 0, err
    got = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"), np.float32)[None] / 255
    req = GenerationRequest.create(prompt, None, 6, 7.5, 64, 96, seed=3, output_type="np")
    with Pipeline.from_dir(base_out, embeddings=[emb], lora_dir=xl_loras[1].parent) as base:
        with Pipeline.from_dir(ref_out, embeddings=[emb]) as refiner:
            want = ensemble.generate(base, refiner, req, 0.3).images
        with Pipeline.from_dir(ref_out) as plain:  # the refiner without the embedding: another image
            other = ensemble.generate(base, plain, req, 0.3).images
    assert psnr(got, want) >= 40 and psnr(got, want) > psnr(got, other) + 10, (psnr(got, want), psnr(got, other))
