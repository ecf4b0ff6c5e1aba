import pytest

from sdtrt.export import ExportConfig, export

# Small ranges keep the parity gate quick on 2 CPU cores; sizes below 256 also exercise latents
# that do not divide the U-Net's downsampling factor.
TINY_RANGES = dict(batch_min=1, batch_max=4, size_min=64, size_max=512)


def _export(tmp_path_factory, precision: str, model: str = "tiny", controlnets=()):
    out = tmp_path_factory.mktemp(f"{model}_{precision}") / "engine"
    manifest = export(ExportConfig(model=model, out=str(out), precision=precision, controlnets=controlnets,
                                   **TINY_RANGES), log=lambda s: None)
    with_ort_cache(out, manifest)
    return out, manifest


def with_ort_cache(folder, manifest):
    """Write ``folder``'s ONNX Runtime cache (``.sdtrt-ort``, every graph, attention fused) as a first load would, so
    every test and every copy of a shared export starts from the same state: a second load. Tests of a first load
    start from a copy without it (``copy_export(..., caches=False)``)."""
    from pathlib import Path

    from sdtrt.runtime.backends import cache_entry, save_optimized

    for component in manifest.components.values():
        entry = cache_entry(folder, component)
        if entry.read() is None:
            assert save_optimized(entry, Path(folder) / component.file, component), component.file


def copy_export(src, dest, caches: bool = True):
    """A private copy of a shared export, so a test may change it; with its ONNX Runtime cache (written with the
    export: ``with_ort_cache``) unless ``caches`` is False. OpenVINO's compiled models are never copied."""
    import shutil

    ignore = [".sdtrt-openvino"] + ([] if caches else [".sdtrt-ort"])
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*ignore))
    return dest


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory):
    return _export(tmp_path_factory, "fp16")


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    return _export(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def tiny_inpaint_fp16(tmp_path_factory):
    """The tiny built-in with a 9-channel inpainting U-Net (mask and masked-image latents as U-Net inputs)."""
    return _export(tmp_path_factory, "fp16", "tiny-inpaint")[0]


@pytest.fixture(scope="session")
def tiny_control_fp16(tmp_path_factory):
    """tiny with two built-in ControlNets (different seeds): edges, depth."""
    return _export(tmp_path_factory, "fp16", "tiny", ("edges=random", "depth=random"))[0]


@pytest.fixture(scope="session")
def tiny_xl_fp16(tmp_path_factory):
    """The SDXL-shaped built-in exported in fp16 straight from the built-in (two encoders, added conditions)."""
    return _export(tmp_path_factory, "fp16", "tiny-xl")


@pytest.fixture(scope="session")
def tiny_xl_refiner_fp16(tmp_path_factory):
    """The SDXL-refiner-shaped built-in exported in fp16 (one projected encoder, 5 time ids)."""
    return _export(tmp_path_factory, "fp16", "tiny-xl-refiner")


@pytest.fixture(scope="session", params=["fp16", "fp32"])
def tiny_export(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_model():
    from sdtrt.export.loaders import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tiny_diffusers") / "model"
    tiny_model.save_pretrained(folder)
    return folder


def _diffusers_and_export(tmp_path_factory, name):
    from sdtrt.export.loaders import load_model

    folder = tmp_path_factory.mktemp(name) / "diffusers"
    load_model(name).save_pretrained(folder)
    out = folder.parent / "engine"
    export(ExportConfig(model=str(folder), out=str(out), precision="fp32", size_min=64, size_max=256, batch_max=2),
           log=lambda s: None)
    return out, folder


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """The mid-size built-in (~25M parameters) as a diffusers folder and its fp32 export: parity beyond tiny."""
    return _diffusers_and_export(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def small_inpaint_model(tmp_path_factory):
    """The mid-size built-in with a 9-channel inpainting U-Net, as a diffusers folder and its fp32 export."""
    return _diffusers_and_export(tmp_path_factory, "small-inpaint")


@pytest.fixture
def engine(tiny_fp32, tmp_path):
    """A private copy of the tiny fp32 export, so a test may break it."""
    return copy_export(tiny_fp32[0], tmp_path / "engine")


@pytest.fixture
def cli(capsys):
    """Run ``sdtrt ARGS`` in-process: (exit code, stdout, stderr stripped)."""
    from sdtrt.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err.strip()

    return run


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory, small_model):
    """Two LoRAs for the mid-size model: style.safetensors (diffusers/PEFT layout, lora_alpha 8 for rank 4 in its
    metadata) and kohya_char.safetensors
    (kohya/A1111 layout, alpha 2 for rank 4), each touching the U-Net (attention linears, 1x1-conv projections) and
    the text encoder (attention)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from tests.export.test_lora import _kohya, _peft_lora

    _, folder = small_model
    base = tmp_path_factory.mktemp("loras")
    # alpha 8 for rank 4: only the metadata diffusers writes beside the weights says so
    unet_sd, te_sd, metadata = _peft_lora(folder, 1, alpha=8)
    StableDiffusionPipeline.save_lora_weights(base, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                              weight_name="style.safetensors", **metadata)
    save_file(_kohya(*_peft_lora(folder, 2)[:2], alpha=2.0), str(base / "kohya_char.safetensors"))
    return base / "style.safetensors", base / "kohya_char.safetensors"


@pytest.fixture(scope="session")
def tiny_xl_model(tmp_path_factory):
    """The SDXL-shaped built-in (two text encoders, pooled and size conditioning) as a diffusers
    StableDiffusionXLPipeline folder and its fp32 export from that folder."""
    return _diffusers_and_export(tmp_path_factory, "tiny-xl")


@pytest.fixture(scope="session")
def tiny_xl_control(tmp_path_factory):
    """tiny-xl (fp32) exported with two built-in ControlNets (`--controlnet edges=random --controlnet depth=random`)."""
    return _export(tmp_path_factory, "fp32", "tiny-xl", ("edges=random", "depth=random"))[0]


@pytest.fixture(scope="session")
def tiny_xl_refiner_model(tmp_path_factory):
    """The SDXL-refiner-shaped built-in (one projected encoder, aesthetic scores), diffusers folder and fp32 export."""
    return _diffusers_and_export(tmp_path_factory, "tiny-xl-refiner")


@pytest.fixture(scope="session")
def tiny_xl_inpaint_model(tmp_path_factory):
    """The SDXL-shaped built-in with a 9-channel inpainting U-Net, diffusers folder and fp32 export."""
    return _diffusers_and_export(tmp_path_factory, "tiny-xl-inpaint")
