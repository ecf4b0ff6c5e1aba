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
    ("exists.png", "exists.png exists (pass --force to overwrite it)"),
    ("", "-o/--output must not be empty"),
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
    ("afile/sub", "cannot create"),
])
def test_bad_export_outputs(cli, tmp_path, out, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("export", "tiny", "--out", out, "--force")
    one_line(code, err, "export", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


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
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o"))

    monkeypatch.setattr(onnx_tools, "convert_to_fp16", full)
    code, _, err = cli("export", "tiny", "--out", tmp_path / "o", "--size", "64:128")
    assert code == 2 and err.splitlines()[-1].startswith("sdtrt export: error: No space left on device")
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


@pytest.mark.parametrize("breakage, needle", [
    (lambda d: [p.unlink() for p in (d / "tokenizer").iterdir()], "holds no usable CLIP tokenizer"),
    (lambda d: (d / "unet" / "config.json").write_text(
        json.dumps({**json.loads((d / "unet" / "config.json").read_text()), "block_out_channels": "wide"})),
     "cannot load unet"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("[]"), "does not hold a JSON object"),
    (lambda d: (d / "model_index.json").write_bytes(b"\xff"), "is not valid JSON"),
])
def test_malformed_diffusers_folders(cli, tmp_path, tiny_diffusers_dir, breakage, needle):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    breakage(model)
    code, _, err = cli("export", model, "--out", tmp_path / "o", "--size", "64:128")
    one_line(code, err, "export", needle, progress=True)
    assert "Loading weights" not in err  # no third-party progress bars in sdtrt's log
    assert not (tmp_path / "o").exists()


def test_a_pickle_torch_refuses_under_allow_pickle(cli, tmp_path, tiny_diffusers_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    for f in (model / "vae").glob("*.safetensors"):
        f.unlink()
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = cli("export", model, "--out", tmp_path / "o", "--size", "64:128", "--allow-pickle")
    one_line(code, err, "export", "cannot load vae", progress=True)


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


def test_numbered_outputs_are_documented_and_written_as_documented(cli, engine, tmp_path):
    code, out, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--num-images", 2,
                         "-o", tmp_path / "img.png")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "img-0.png"), str(tmp_path / "img-1.png")]


def test_progress_counts_unet_evaluations_honestly(cli, engine, tmp_path):
    code, _, err = cli("generate", engine, "a cat", "--steps", 4, "--size", "64x64", "--scheduler", "pndm",
                       "-o", tmp_path / "x.png")
    assert code == 0 and "pndm: 5 U-Net evaluations for 4 steps" in err
