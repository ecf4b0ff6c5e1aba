"""Hostile and mistaken input across the CLI: each case ends in one line and exit 2 (1 for an internal error,
130/143 for a signal, 141 for a closed stdout), never a traceback, and leaves nothing half-written.

Each parametrised case is one class of mistake a new user makes; README's "What sdtrt does with bad input"
lists them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtrt.cli import main


def one_line(code, err, command, needle, exit_code=2, progress=False):
    """The error is one line; with ``progress`` (export) only the log of finished stages may come before it."""
    assert code == exit_code, err
    assert "Traceback" not in err
    if progress:
        err = err.splitlines()[-1]
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sdtrt {command}: error: "), err
    assert needle in err, err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- generate ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-5"], "seed must be a non-negative integer (or -1 for a random one), got -5"),
    (["--seed", str(2**64)], "seed must be at most 18446744073709551615"),
    (["--seed", "1.5"], "invalid int value: '1.5'"),
    (["--cfg", "nan"], "must be finite"),
    (["--cfg", "inf"], "must be finite"),
    (["--cfg", "1e300"], "guidance scale must be between 0 and 100, got 1e+300"),
    (["--steps", "1000", "--scheduler", "ddim"], "ddim cannot run 1000 steps"),
    (["--steps", "1000", "--scheduler", "lms"], "999 steps work"),
    (["--steps", "61", "--scheduler", "lcm"], "lcm supports at most original_inference_steps = 50 steps"),
    (["--num-images", "0"], "num_images_per_prompt must be at least 1"),
    (["--size", "0x64"], "width and height must be positive"),
    (["--size", "60x64"], "width 60 is not a multiple of 8"),
])
def test_bad_generation_values(cli, engine, tmp_path, flags, needle):
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / "x.png", *flags)
    one_line(code, err, "generate", needle)
    assert not (tmp_path / "x.png").exists()


def test_a_prompt_after_the_options_is_the_prompt(cli, engine, tmp_path):
    code, _, err = cli("generate", engine, "--seed", 1, "--steps", 2, "--size", "64x64", "-o", tmp_path / "x.png",
                       "a cat")
    assert code == 0, err
    code, _, err = cli("generate", engine, "a cat", "a dog", "-o", tmp_path / "y.png")
    one_line(code, err, "generate", "unrecognized arguments: a dog")


@pytest.mark.parametrize("prompt, needle", [
    pytest.param("(" * 5000 + "cat" + ")" * 5000, "an emphasis weight is beyond float32 range", id="1.1^5000"),
    pytest.param("cat, " * 1400, "needs 38 chunks of 75 tokens (2800 tokens); this folder was exported for at most 3 "
                                 "(shorten it: an export takes at most 16 chunks)", id="38 chunks"),
    pytest.param("cat, " * 300, "(re-export with --max-chunks 8)", id="8 chunks"),
])
def test_prompts_beyond_what_can_be_encoded(cli, engine, tmp_path, prompt, needle):
    code, _, err = cli("generate", engine, prompt, "-o", tmp_path / "x.png")
    one_line(code, err, "generate", needle)  # one line: no NumPy overflow warning before it


def test_clip_skip_beyond_the_export_speaks_both_numberings(cli, engine, tmp_path):
    code, _, err = cli("generate", engine, "a cat", "--clip-skip", 4, "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "Clip skip 4 (clip_skip=3 in the API) is beyond this folder's text encoder: it "
                                    "returns up to Clip skip 3 (clip_skip=2)")


def test_no_command_and_an_empty_folder_are_one_line(cli):
    code, out, err = cli()
    assert code == 2 and err.splitlines()[-1] == "sdtrt: error: a command is needed (see the list above)"
    code, _, err = cli("info", "")
    one_line(code, err, "info", "the engine folder path is empty")


def test_seed_minus_one_means_random_as_in_a1111(cli, engine, tmp_path):
    code, out, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--seed", -1,
                         "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "Seed: " in __import__("PIL.Image").Image.open(tmp_path / "x.png").text["parameters"]


def test_a_prompt_that_is_not_utf8(engine, tmp_path):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (PEP 383)
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "generate", str(engine), b"a \xff cat".decode("utf-8", "surrogateescape"),
                           "-o", str(tmp_path / "x.png")], capture_output=True, text=True, errors="replace")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "sdtrt generate: error: prompt is not valid UTF-8 text"]


@pytest.mark.parametrize("target, needle", [
    ("n" * 300 + ".png", "File name too long"),
    ("/proc/sdtrt-test.png", "cannot write /proc/sdtrt-test.png"),
    ("afile/x.png", "afile is a file, not a folder"),
    ("", "-o/--output must not be empty"),
    (".png", "-o/--output .png must be a file name ending in one of .png, .jpg, .jpeg, .webp"),
    ("x.gif", "-o/--output x.gif must be a file name ending in one of .png"),
])
def test_output_paths_the_os_refuses_are_checked_before_any_work(cli, engine, tmp_path, target, needle, monkeypatch):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "exists.png").write_bytes(b"mine")
    monkeypatch.chdir(tmp_path)
    import sdtrt.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_dir", lambda *a, **k: pytest.fail("loaded engines before checking -o"))
    code, _, err = cli("generate", engine, "a cat", "-o", target)
    one_line(code, err, "generate", needle)
    assert (tmp_path / "exists.png").read_bytes() == b"mine"


def test_force_overwrites_an_existing_image(cli, engine, tmp_path):
    (tmp_path / "x.png").write_bytes(b"old")
    code, _, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "-o", tmp_path / "x.png",
                       "--force")
    assert code == 0, err and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_an_image_another_run_wrote_meanwhile_is_kept(cli, engine, tmp_path, monkeypatch):
    tmp_path = tmp_path / "out"  # the engine fixture may share the test's folder
    tmp_path.mkdir()
    import sdtrt.runtime.pipeline as pipeline

    generate = pipeline.Pipeline.generate

    def racing(self, *args, **kwargs):  # a concurrent `generate -o x.png` takes x-0002.png while this one runs
        result = generate(self, *args, **kwargs)
        (tmp_path / "x-0002.png").write_bytes(b"theirs")
        return result

    monkeypatch.setattr(pipeline.Pipeline, "generate", racing)
    code, _, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--num-images", 2,
                       "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "it was created while this ran (another process?); --force replaces it",
             progress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0002.png"]  # and x-0001.png is not left alone either
    assert (tmp_path / "x-0002.png").read_bytes() == b"theirs"


def test_a_disk_that_fills_up_at_the_second_image_leaves_none(cli, engine, tmp_path, monkeypatch):
    import errno

    from PIL import Image

    tmp_path = tmp_path / "out"
    tmp_path.mkdir()

    save, calls = Image.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, _, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--num-images", 2,
                       "-o", tmp_path / "x.png")
    one_line(code, err, "generate", f"No space left on device: {tmp_path}", progress=True)
    assert list(tmp_path.iterdir()) == []


# ---- generate from an image ---------------------------------------------------------------------------------

def _images(folder):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:70, 0:100]
    Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)).save(folder / "in.png")
    box = np.zeros((70, 100), np.uint8)
    box[20:50, 30:70] = 255
    for name, mask in (("mask", box), ("black", box * 0), ("white", box * 0 + 255), ("thin", box * 0),
                       ("small", box[:60])):
        if name == "thin":
            mask[21:23, 30:70] = 255  # two rows between latent rows 16 and 24: no latent pixel is covered
        Image.fromarray(mask).save(folder / f"{name}.png")
    (folder / "text.png").write_text("not an image")
    data = (folder / "in.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])
    (folder / "huge.png").write_bytes(b"")
    Image.fromarray(np.zeros((70, 1200, 3), np.uint8)).save(folder / "huge.png")


@pytest.mark.parametrize("flags, needle", [
    (["--image", "nope.png"], "image nope.png does not exist"),
    (["--image", "."], "image . is not a file"),
    (["--image", "text.png"], "image text.png is not a readable image"),
    (["--image", "cut.png"], "image cut.png is not a readable image (image file is truncated"),
    (["--image", "huge.png"], "the image is 1200x70 (1200x64 rounded to a multiple of 8), outside the exported "
                              "range 64..512"),
    (["--image", "in.png", "--mask", "small.png"], "mask is 100x60, the image 100x70: they must be the same size"),
    (["--image", "in.png", "--mask", "black.png"], "mask is all black: nothing would be repainted"),
    (["--image", "in.png", "--mask", "white.png"], "mask is all white: the whole image would be repainted"),
    (["--image", "in.png", "--mask", "thin.png"], "mask is too thin: at 96x64 it covers no latent pixel"),
    (["--image", "in.png", "--strength", "0"], "strength must be in (0, 1]"),
    (["--image", "in.png", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["--image", "in.png", "--strength", "0.01"], "leaves no step to run"),
    (["--image", "in.png", "--outpaint", "4,0,0,0"], "each side must be a multiple of 8 pixels"),
    (["--image", "in.png", "--outpaint=-8,0,0,0"], "pixels must not be negative"),
    (["--image", "in.png", "--outpaint", "8,8"], "expected 4 numbers L,T,R,B"),
    (["--image", "in.png", "--outpaint", "0,0,0,0"], "outpaint adds nothing"),
    (["--mask", "mask.png"], "mask_image needs an image to start from"),
    (["--strength", "0.5"], "strength needs an image to start from"),
    (["--image", "in.png", "--mask-blur", "4"], "mask_blur needs a mask"),
    (["--image", "in.png", "--mask", "mask.png", "--mask-blur", "-1"], "mask_blur must be between 0 and 256"),
    (["--image", ""], "--image must not be empty"),
    # issue 22: messages that name the real problem
    (["--lora", "style.safetensors:abc"], "--lora 'style.safetensors:abc': the scale 'abc' is not a number"),
    (["--control", "map.png:1:0:1:extra"], "after the image map.png expected SCALE or SCALE:START:END (numbers), got "
                                           "'1:0:1:extra'"),
    (["--control", "canny:map.png:strong"], "after the image map.png expected SCALE or SCALE:START:END"),
    (["--control", "sobel:map.png"], "unknown preprocessor 'sobel' (known: none, canny)"),
    (["--control", "depth:map.png:0.5"], "unknown preprocessor 'depth'"),
    (["--control", "map.png:1:2"], "give SCALE, or SCALE:START:END (not two numbers)"),
    (["--size", "-64x64"], "width and height must be positive, got '-64x64'"),
    (["--size=-8x-8"], "width and height must be positive"),
])
def test_bad_image_inputs(cli, engine, tmp_path, monkeypatch, flags, needle):
    _images(tmp_path)
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("generate", engine, "a cat", "--steps", 3, "-o", tmp_path / "x.png", *flags)
    one_line(code, err, "generate", needle)
    assert not (tmp_path / "x.png").exists()


def test_an_inpainting_model_needs_a_mask(cli, tiny_inpaint_fp16, tmp_path, monkeypatch):
    _images(tmp_path)
    monkeypatch.chdir(tmp_path)
    for flags in ([], ["--image", "in.png"]):
        code, _, err = cli("generate", tiny_inpaint_fp16, "a cat", "-o", tmp_path / "x.png", *flags)
        one_line(code, err, "generate", "this folder's U-Net is an inpainting model (9 input channels): it needs")


def test_image_tasks_write_what_they_did(cli, engine, tmp_path, monkeypatch):
    from PIL import Image

    _images(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("generate", engine, "a cat", "--steps", 4, "--image", "in.png", "--mask", "mask.png",
                       "--strength", "0.5", "--mask-blur", "2", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert "the image is 100x70; generating at 96x64 (a multiple of 8)" in err  # the size, said
    written = Image.open(tmp_path / "x.png")
    assert written.size == (96, 64)
    assert "Denoising strength: 0.5, Mask blur: 2" in written.text["parameters"]
    # replaying the PNG needs its input image, and then gives the same pixels
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "x.png", "-o", tmp_path / "y.png")
    one_line(code, err, "generate", "was made from an input image (Denoising strength 0.5): pass that image")
    code, _, err = cli("generate", engine, "--from-png", tmp_path / "x.png", "--image", "in.png", "--mask",
                       "mask.png", "-o", tmp_path / "y.png")
    assert code == 0, err
    assert list(Image.open(tmp_path / "y.png").getdata()) == list(written.getdata())


def _edit_manifest(engine, edit):
    data = json.loads((engine / "manifest.json").read_text())
    edit(data)
    (engine / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, needle", [
    (lambda e: (e / "manifest.json").write_bytes(b"\xff\xfe{}"), "is not UTF-8 text"),
    (lambda e: _edit_manifest(e, lambda d: d["components"].pop("vae_decoder")), "no vae_decoder component"),
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(vae_scale_factor=0)), "vae_scale_factor = 0"),
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(latent_channels="four")), "latent_channels"),
    (lambda e: _edit_manifest(e, lambda d: d["ranges"].update(size_min=512, size_max=64)), "size range 512..64"),
    (lambda e: (e / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**json.loads((e / "scheduler" / "scheduler_config.json").read_text()), "beta_start": "x"})),
     "beta_start must be a finite number"),
    (lambda e: (e / "scheduler" / "scheduler_config.json").write_text("{oops"), "cannot read"),
    (lambda e: (e / "tokenizer" / "tokenizer_config.json").write_text("[1"), "cannot read"),
    (lambda e: (e / "tokenizer" / "tokenizer.json").write_text(""), "cannot read"),
    (lambda e: (e / "unet.onnx").write_bytes((e / "vae_decoder.onnx").read_bytes()), "unet.onnx: "),
    # found by a hostile-input run: each of these once gave a wrong image, a misleading message or a traceback
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(vae_scale_factor=16)),
     "vae_scale_factor = 16, but the VAE decoder maps"),  # was: a 64x64 PNG for --size 128x128, exit 0
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(clip_skips=5)), "no hidden_state_skip3 output"),
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(default_size=0)), "default_size = 0"),
    (lambda e: _edit_manifest(e, lambda d: d.update(schema_version="2")), "schema_version that is not an integer"),
    (lambda e: _edit_manifest(e, lambda d: d["components"]["unet"].update(file="")), "unet file ''"),
    (lambda e: _edit_manifest(e, lambda d: d["components"]["unet"].update(file="../unet.onnx")), "unet file"),
    (lambda e: ((e / "unet.onnx").unlink(), (e / "unet.onnx").mkdir()), "unet.onnx is not a regular file"),
    (lambda e: ((e / "manifest.json").rename(e / "m"), (e / "manifest.json").mkdir()), "manifest.json is not a file"),
    (lambda e: _edit_manifest(e, lambda d: d["components"]["unet"]["inputs"][0].update(name="lat")),
     "unet.onnx has no tensor 'lat', which manifest.json lists"),
    # the samplers follow the scheduler config: a manifest that says otherwise was edited (was: ignored, exit 0)
    (lambda e: _edit_manifest(e, lambda d: d["model"].update(prediction_type="v_prediction")),
     "says prediction_type 'epsilon', manifest.json 'v_prediction'"),
])
def test_broken_engine_folders(cli, engine, tmp_path, breakage, needle):
    breakage(engine)
    code, _, err = cli("generate", engine, "a cat", "--size", "64x64", "-o", tmp_path / "x.png")
    one_line(code, err, "generate", needle)


def test_a_graph_from_another_export_is_refused(cli, engine, tiny_fp16, tmp_path):
    (engine / "unet.onnx").write_bytes((tiny_fp16[0] / "unet.onnx").read_bytes())
    code, _, err = cli("generate", engine, "a cat", "--size", "64x64", "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "unet.onnx: ")
    assert "differs from manifest.json" in err or "manifest.json says" in err


def test_a_file_given_as_the_engine_folder(cli, engine, tmp_path):
    code, _, err = cli("generate", engine / "unet.onnx", "a cat", "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "is a file, not an engine folder")


def test_a_generation_that_cannot_fit_in_memory_is_refused_before_it_runs(cli, engine, tmp_path, monkeypatch):
    import sdtrt.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "available_bytes", lambda: 2 * 10**8)
    code, _, err = cli("generate", engine, "a cat", "--size", "512x512", "--num-images", 4,
                       "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "needs about")
    assert "fits" in err and not list(tmp_path.glob("x*.png"))


# ---- export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, needle", [
    ("", "--out must not be empty"),
    ("afile", "is a file, not a folder (--force replaces folders only)"),
    ("afile/sub", "cannot create afile/sub: afile is a file, not a folder"),
    ("missing/parent/x", "cannot create missing/parent/x: folder missing/parent does not exist"),
])
def test_bad_export_outputs(cli, tmp_path, out, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("export", "tiny", "--out", out, "--force")
    one_line(code, err, "export", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_folder_of_other_files_is_refused_without_force(cli, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = cli("export", "tiny", "--out", precious, "--size", "64:64")
    one_line(code, err, "export", f"output folder {precious} already exists (a folder that is not an sdtrt engine "
                                  "folder); pass --force")
    assert [p.name for p in tmp_path.iterdir()] == ["precious"] and [p.name for p in precious.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_an_export_never_replaces_its_own_source(cli, tmp_path, tiny_diffusers_dir, where):
    import shutil

    model = tmp_path / "models" / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    out = {"same": model, "inside": model / "engine", "containing": model.parent}[where]
    code, _, err = cli("export", model, "--out", out, "--force", "--size", "64:64")
    one_line(code, err, "export", "the export would overwrite its own source")
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_diffusers_dir.iterdir())


def test_a_read_only_filesystem_is_named_as_such(cli, tmp_path, monkeypatch):
    import errno
    import pathlib

    # what a read-only mount does: access(2) says no, and mkdir fails with EROFS (EEXIST for what exists)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: mode != os.W_OK)
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, exist_ok=False, **kwargs):
        if self.parent == tmp_path:
            if exist_ok and self.is_dir():
                return None
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, exist_ok=exist_ok, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", "--size", "64:64")
    one_line(code, err, "export", "Read-only file system")


@pytest.mark.parametrize("args, needle", [
    (["tiny", "--opset", "99"], "--opset must be 17..20 (what torch.onnx.export writes), got 99"),
    (["tiny", "--opset", "16"], "--opset must be 17..20"),
    (["tiny", "--seed", str(2**70)], "--seed must be 0..18446744073709551613 (the weights of built-in models), got"),
    (["tiny", "--seed", "-1"], "--seed must be 0.."),
    (["", "--size", "64:64"], "the model path is empty"),
    # what a manifest may say (sdtrt/manifest_check.py): an export never writes one that no command would load
    (["tiny", "--batch", "1:100000"], "batch must be at most 4096, got 100000"),
    (["tiny", "--size", "64:65536"], "image size 65536 must be at most 32768"),
])
def test_bad_export_values_are_refused_before_any_work(cli, tmp_path, args, needle):
    code, _, err = cli("export", *args, "--out", tmp_path / "o")
    one_line(code, err, "export", needle)
    assert list(tmp_path.iterdir()) == []


def _inputs(folder: Path) -> None:
    """A LoRA-shaped file, a safetensors file that is not a LoRA, a control image, a half ControlNet folder."""
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((32, 4), np.float32)},
              str(folder / "style.safetensors"))
    save_file({"weight": np.zeros(3, np.float32)}, str(folder / "plain.safetensors"))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "map.png")
    (folder / "fake.safetensors").write_bytes(b"not a safetensors file")
    (folder / "cn").mkdir()
    (folder / "cn" / "config.json").write_text("{}")


@pytest.mark.parametrize("args, needle", [
    (["--lora", "missing.safetensors"], "LoRA file missing.safetensors does not exist"),
    (["--lora", "style.safetensors:abc"], "--lora 'style.safetensors:abc': the scale 'abc' is not a number"),
    (["--lora", "style.safetensors:"], "the scale '' is not a number"),
    (["--lora", "plain.safetensors"], "plain.safetensors has no LoRA layers (no lora_down / lora_A weights): it is not a LoRA"),
    (["--lora", "map.png"], "LoRA map.png is not a .safetensors file"),
    (["--lora", "fake.safetensors"], "LoRA fake.safetensors is not a readable safetensors file"),
    (["--lora", "style.pt"], "LoRA file style.pt does not exist"),
    (["--lora", "."], "is not a file"),
    (["--controlnet", "nowhere"], "ControlNet path nowhere does not exist"),
    (["--controlnet", "cn"], "cn has no weights (diffusion_pytorch_model.safetensors)"),
    (["--controlnet", "map.png"], "is a file: give a diffusers ControlNetModel folder"),
    (["--controlnet", "x" * 65 + "=random"], "is 65 characters; at most 64"),
    (["--controlnet", "a/b=random"], "use letters, digits"),
    (["--config", "sd15"], "--config and --tokenizer are for single-file checkpoints"),
    (["--tokenizer", "."], "--config and --tokenizer are for single-file checkpoints"),
    (["--size", "-8:64"], "image size -8 must be a multiple of 8 and at least 64"),
    (["--size=-64"], "image size -64 must be a multiple of 8"),
    (["--batch", "-1:2"], "batch must be at least 1, got -1"),
])
def test_what_can_be_refused_without_the_model_is_refused_before_it_loads(cli, tmp_path, monkeypatch, args, needle):
    """Issue 22: a bad --lora/--controlnet/option is one line before the model load (seconds to minutes), naming
    the real problem."""
    import sdtrt.export.loaders as loaders

    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loaders, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = sorted(tmp_path.iterdir())
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", *args)
    one_line(code, err, "export", needle)
    assert sorted(tmp_path.iterdir()) == before


def test_a_lora_too_strong_for_the_parity_gate_is_named_with_its_strength(cli, engine, tmp_path):
    """The gate's failure says that the fused LoRA is the likely cause, how strong it is, and what to do."""
    lora = tmp_path / "l.safetensors"
    assert cli("make-lora", engine, lora)[0] == 0
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", "--lora", f"{lora}:5000", "--size", "64:64",
                       "--batch", "1:1")
    one_line(code, err, "export", "does not match PyTorch", progress=True)
    assert f"the graphs carry the fused LoRAs ({lora}:5000), which change " in err, err
    ratio = float(err.split("weights by ")[1].split("x their own size")[0])
    assert ratio > 100, err
    assert "lower the scale (FILE:SCALE), or export with --precision fp32" in err, err
    assert not (tmp_path / "o").exists()


def test_a_library_warning_before_an_error_is_one_line_without_a_source_path(cli, engine, tmp_path, monkeypatch):
    """Python warnings (NumPy's, PIL's) print as the CLI's own one-line warnings, never as path:line: Warning."""
    import warnings

    import sdtrt.runtime.pipeline as pipeline

    import numpy as np

    def load(*a, **k):
        np.float32(1e30) * np.float32(1e30)  # NumPy's own RuntimeWarning: overflow encountered
        warnings.warn("a library's\nwarning", UserWarning)
        raise pipeline.UsageError("the real problem")

    monkeypatch.setattr(pipeline.Pipeline, "from_dir", classmethod(lambda cls, *a, **k: load()))
    code, _, err = cli("generate", engine, "a cat", "--steps", 2, "-o", tmp_path / "x.png")
    assert code == 2 and "Traceback" not in err and ".py:" not in err, err
    lines = err.splitlines()
    assert lines[-1] == "sdtrt generate: error: the real problem", err
    assert "sdtrt generate: warning: RuntimeWarning: overflow encountered in scalar multiply" in lines, err
    assert "sdtrt generate: warning: UserWarning: a library's warning" in lines, err


def test_export_without_the_export_extra_says_what_to_install(cli, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o")
    one_line(code, err, "export", "this needs torch: pip install 'sdtrt[export]'")


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(cli, tmp_path, monkeypatch):
    import errno

    from sdtrt.export import onnx_tools

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as ONNX's writers raise it: no file name

    monkeypatch.setattr(onnx_tools, "convert_to_fp16", full)
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", "--size", "64:128")
    # the message says which disk: the output's folder
    assert code == 2 and err.splitlines()[-1] == f"sdtrt export: error: No space left on device: {tmp_path}"
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temporary_of_a_killed_export_is_removed(tmp_path, cli):
    stale = tmp_path / f".o.tmp-{dead_pid()}"
    (stale / "unet.onnx").parent.mkdir()
    (stale / "unet.onnx").write_bytes(b"half")
    live = tmp_path / f".o.tmp-{os.getpid()}x"  # not ours to touch (not even a valid name)
    live.mkdir()
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", "--size", "64:128")
    assert code == 0, err
    assert not stale.exists() and live.exists()


def test_sigterm_during_export_cleans_up_like_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "export", "tiny", "--out", str(tmp_path / "o"), "--size",
                             "64:128"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "sdtrt export: terminated" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_an_import_is_raised_once_the_import_is_done(tmp_path):
    # raised inside an import it can surface in a C++ extension's module code (torch's) and abort the process
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # a second one while it is kept: still one Terminated\n"
        "time.sleep(0.3)\n"
        "DONE = True\n")
    script = ("import signal, sys, time\n"
              "from sdtrt.cli import _on_signal\n"
              "from sdtrt.errors import Terminated\n"
              "signal.signal(signal.SIGTERM, _on_signal)\n"
              f"sys.path.insert(0, {str(tmp_path)!r})\n"
              "try:\n"
              "    import slow_module\n"
              "    time.sleep(2)\n"
              "    print('no signal')\n"
              "except Terminated:\n"
              "    print('terminated, import done:', 'slow_module' in sys.modules)\n"
              "time.sleep(0.3)\n"
              "print('only once')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == ["terminated, import done: True", "only once"], \
        (out.returncode, out.stdout, out.stderr)


@pytest.mark.parametrize("breakage, needle", [
    (lambda d: [p.unlink() for p in (d / "tokenizer").iterdir()], "holds no usable CLIP tokenizer"),
    (lambda d: (d / "unet" / "config.json").write_text(
        json.dumps({**json.loads((d / "unet" / "config.json").read_text()), "block_out_channels": "wide"})),
     "unet/config.json: block_out_channels must be a list, got 'wide'"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("[]"), "does not hold a JSON object"),
    (lambda d: (d / "model_index.json").write_bytes(b"\xff"), "is not valid JSON"),
    # a schedule no sampler of the runtime can run: refused at export, not at every generation
    (lambda d: _edit_config(d / "scheduler" / "scheduler_config.json", beta_schedule="cosine"),
     "no sampler of sdtrt can run its scheduler config (scheduler config: beta_schedule must be one of"),
    # config values of the wrong type, named before diffusers trips over them
    (lambda d: _edit_config(d / "unet" / "config.json", in_channels="4"), "unet/config.json: in_channels must be an "
                                                                          "integer, got '4'"),
    # a config.json that does not describe the weights beside it: the first mismatch, not the library's summary
    (lambda d: _edit_config(d / "unet" / "config.json", cross_attention_dim=64),
     "cannot load unet from {model}: the weights do not match unet/config.json: size mismatch for "),
    (lambda d: _edit_config(d / "vae" / "config.json", latent_channels=3),
     "cannot load vae from {model}: the weights do not match vae/config.json: size mismatch for "),
    (lambda d: _edit_config(d / "text_encoder" / "config.json", max_position_embeddings=10),
     "the weights do not match text_encoder/config.json: size mismatch for embeddings.position_embedding.weight: "
     "the weights have shape [77, 32], the config gives [10, 32]"),
    (lambda d: _edit_config(d / "text_encoder" / "config.json", hidden_size=64),
     "the weights do not match text_encoder/config.json: size mismatch for "),
])
def test_malformed_diffusers_folders(cli, tmp_path, tiny_diffusers_dir, breakage, needle):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    breakage(model)
    code, _, err = cli("export", model, "--out", tmp_path / "o", "--size", "64:128")
    one_line(code, err, "export", needle.format(model=model), progress=True)
    assert "Loading weights" not in err  # no third-party progress bars in sdtrt's log
    assert not (tmp_path / "o").exists()


def _edit_config(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_pickle_torch_refuses_under_allow_pickle(cli, tmp_path, tiny_diffusers_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    for f in (model / "vae").glob("*.safetensors"):
        f.unlink()
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    # in a fresh process: diffusers' log handler writes to the stderr it found at import
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "export", str(model), "--out", str(tmp_path / "o"), "--size",
                           "64:128", "--allow-pickle"], capture_output=True, text=True)
    one_line(proc.returncode, proc.stderr.strip(), "export", "cannot load vae", progress=True)
    # only sdtrt's own progress before the error: no library log line (diffusers' "An error occurred while trying
    # to fetch ...: no file named diffusion_pytorch_model.safetensors", which it then falls back from)
    assert all(line.startswith(("loading ", "  loaded")) for line in proc.stderr.strip().splitlines()[:-1]), proc.stderr


# ---- info, bench, process-level ----------------------------------------------------------------------------

def test_info_into_a_closed_pipe_is_quiet(engine):
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "info", str(engine)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode in (0, 141) and "Traceback" not in err and "Exception ignored" not in err, err


def test_info_does_not_call_a_folder_with_a_missing_graph_runnable(cli, engine):
    (engine / "unet.onnx").unlink()
    code, out, _ = cli("info", engine)
    assert code == 0 and out.splitlines()[-1].startswith("this folder cannot run: unet.onnx: missing")


def test_info_verify_says_on_stderr_that_it_failed(cli, engine):
    (engine / "unet.onnx").write_bytes(b"x")
    code, out, err = cli("info", engine, "--verify")
    one_line(code, err, "info", "1 file(s) do not match manifest.json: unet.onnx")
    assert "MISMATCH" in out


def test_info_verify_hashes_everything_and_names_the_mismatch(cli, engine):
    assert cli("info", engine, "--verify")[0] == 0
    data = bytearray((engine / "vae_decoder.onnx").read_bytes())
    data[-1] ^= 1  # same size, one bit: only a hash sees it
    (engine / "vae_decoder.onnx").write_bytes(bytes(data))
    code, out, _ = cli("info", engine, "--verify")
    assert code == 2 and "MISMATCH vae_decoder.onnx (its sha256 differs from manifest.json" in out


def test_info_removes_stale_temporaries_of_a_killed_export(cli, engine):
    stale = engine.parent / f".{engine.name}.tmp-{dead_pid()}"
    stale.mkdir()
    assert cli("info", engine)[0] == 0 and not stale.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--threads", "-1"], "--threads must be 0 (default) or 1.."),
    (["--threads", "100000"], "--threads must be 0 (default) or 1.."),
    (["--steps", "0", "--baseline", "none"], "--steps must be at least 1"),
])
def test_bad_bench_options(cli, engine, flags, needle):
    code, _, err = cli("bench", engine, *flags)
    one_line(code, err, "bench", needle)


def test_bench_plot_without_matplotlib_fails_before_running(cli, engine, monkeypatch, tmp_path):
    import importlib.util

    from sdtrt.benchmarks import harness

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(harness, "run_bench", lambda cfg: pytest.fail("ran before checking --plot"))
    code, _, err = cli("bench", engine, "--baseline", "none", "--plot", tmp_path / "p.png")
    one_line(code, err, "bench", "this needs matplotlib: pip install 'sdtrt[bench]'")


def test_ctrl_c_is_one_line_and_130(cli, engine, monkeypatch, tmp_path):
    import sdtrt.runtime.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Pipeline, "generate", interrupted)
    code, _, err = cli("generate", engine, "a cat", "--size", "64x64", "--scheduler", "euler",
                       "-o", tmp_path / "x.png")
    assert code == 130 and err == "sdtrt generate: interrupted"


def test_an_internal_error_asks_for_a_report_and_debug_shows_the_traceback(cli, engine, monkeypatch, tmp_path):
    import sdtrt.runtime.pipeline as pipeline

    def bug(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(pipeline.Pipeline, "generate", bug)
    code, _, err = cli("generate", engine, "a cat", "--size", "64x64", "--scheduler", "euler",
                       "-o", tmp_path / "x.png")
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("sdtrt generate: internal error: ZeroDivisionError: oops (please report this at ")
    monkeypatch.setenv("SDTRT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["generate", str(engine), "a cat", "--size", "64x64", "-o", str(tmp_path / "y.png")])


def test_help_shows_defaults_and_describes_every_option():
    parser = __import__("sdtrt.cli", fromlist=["build_parser"]).build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest in ("help",):
                continue
            assert action.help, f"sdtrt {name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        if name == "generate":
            assert "(default: 30)" in text and "(default: 7.5)" in text


def test_help_names_what_a_newcomer_looks_for():
    import re

    from sdtrt.cli import build_parser
    from sdtrt.export.architectures import BUILTIN_ARCHITECTURES
    from sdtrt.runtime.backends import BACKENDS

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    # one line; argparse also wraps after a hyphen ("small-\ninpaint")
    flat = {name: re.sub(r"\s+", " ", re.sub(r"-\n\s*", "-", sub.format_help())) for name, sub in subs.items()}
    assert all(name in flat["export"] for name, arch in BUILTIN_ARCHITECTURES.items() if arch.supported)
    assert "single-file" in flat["export"]
    assert "(default: 7860)" in flat["serve"] and all(b in flat["serve"] for b in BACKENDS)
    assert "(default: 512x512)" in flat["bench-serve"]
    assert "(default: 1)" in flat["generate"].split("--n-iter")[1]


def test_numbered_outputs_are_documented_and_written_as_documented(cli, engine, tmp_path):
    code, out, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--num-images", 2,
                         "-o", tmp_path / "img.png")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "img-0001.png"), str(tmp_path / "img-0002.png")]


def test_progress_counts_unet_evaluations_honestly(cli, engine, tmp_path):
    code, _, err = cli("generate", engine, "a cat", "--steps", 4, "--size", "64x64", "--scheduler", "pndm",
                       "-o", tmp_path / "x.png")
    assert code == 0 and "pndm: 5 U-Net evaluations for 4 steps" in err


# ---- ControlNet ----------------------------------------------------------------------------------------------

@pytest.fixture
def control_engine(tiny_control_fp16, tmp_path):
    import shutil

    from tests.runtime.test_tasks import picture

    out = tmp_path / "control"
    shutil.copytree(tiny_control_fp16, out)
    picture(80, 60).save(tmp_path / "map.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return out


@pytest.mark.parametrize("controls, extra, needle", [
    (["map.png", "map.png", "map.png"], [], "3 control images for 2 ControlNets in this folder (edges, depth)"),
    (["missing.png"], [], "control image missing.png does not exist"),
    (["broken.png"], [], "control image broken.png"),
    (["map.png:nan"], [], "controlnet_conditioning_scale must be finite"),
    (["map.png:inf"], [], "controlnet_conditioning_scale must be finite"),
    (["map.png:1:0.8:0.2"], [], "control guidance: start 0.8 must be before end 0.2"),
    (["map.png:1:0.5:0.5"], [], "start 0.5 must be before end 0.5"),
    (["map.png:1:0:1.5"], [], "control_guidance_end must be between 0 and 1, got 1.5"),
    (["map.png:-1"], [], "controlnet_conditioning_scale must be between 0 and 10"),
    (["map.png:1:0.5"], [], "give SCALE, or SCALE:START:END"),
    (["canny:"], [], "no image path"),
    (["canny:map.png"], ["--canny-low", "300", "--canny-high", "100"], "canny low threshold 300 is above the high"),
])
def test_bad_control_inputs_are_one_line(cli, control_engine, tmp_path, monkeypatch, controls, extra, needle):
    monkeypatch.chdir(tmp_path)
    flags = [a for c in controls for a in ("--control", c)]
    code, _, err = cli("generate", control_engine, "a cat", *flags, *extra, "--steps", "2", "-o", "x.png")
    one_line(code, err, "generate", needle)
    assert not (tmp_path / "x.png").exists()


def test_control_images_without_controlnets_name_the_fix(cli, engine, tmp_path):
    from tests.runtime.test_tasks import picture

    picture(64, 64).save(tmp_path / "map.png")
    code, _, err = cli("generate", engine, "a cat", "--control", tmp_path / "map.png", "-o", tmp_path / "x.png")
    one_line(code, err, "generate", "this folder has no ControlNet: add one with `sdtrt export-controlnet")


def test_a_controlnet_of_another_base_model_is_refused(cli, engine, tmp_path, small_model):
    # a ControlNet shaped like the mid-size model's U-Net (128-wide text, other blocks) for the tiny model
    from diffusers import UNet2DConditionModel

    from sdtrt.export.controlnet import builtin_controlnet

    unet = UNet2DConditionModel.from_pretrained(small_model[1] / "unet")
    builtin_controlnet(unet, 4, 8, 0).save_pretrained(tmp_path / "other")
    before = sorted(p.name for p in engine.iterdir())
    code, _, err = cli("export-controlnet", engine, tmp_path / "other")
    one_line(code, err, "export-controlnet", "reads 128-wide text embeddings; this model's text encoder gives 32: it "
                                             "was made for another base model", progress=True)
    assert sorted(p.name for p in engine.iterdir()) == before  # nothing half-written


@pytest.mark.parametrize("spec, needle", [
    ("nowhere", "ControlNet path nowhere does not exist"),
    ("bad name=random", "ControlNet name 'bad name'"),
    ("edges=random", "already has a ControlNet named 'edges'"),
])
def test_bad_export_controlnet_arguments(cli, control_engine, spec, needle):
    code, _, err = cli("export-controlnet", control_engine, spec)
    one_line(code, err, "export-controlnet", needle, progress=True)


def test_manifest_with_a_controlnet_that_does_not_fit_the_unet_is_refused(cli, control_engine):
    data = json.loads((control_engine / "manifest.json").read_text())
    outputs = data["components"]["controlnet_depth"]["outputs"]
    outputs[0]["shape"][1] += 1  # one residual with the wrong channel count
    (control_engine / "manifest.json").write_text(json.dumps(data))
    code, _, err = cli("generate", control_engine, "a cat", "-o", control_engine / "x.png")
    one_line(code, err, "generate", "ControlNet depth's residuals do not match the U-Net's residual inputs")
