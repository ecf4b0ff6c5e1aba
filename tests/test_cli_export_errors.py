"""Each bad input to `sdtrt export` gets one clear line on stderr and exit code 2, and no output."""

import json
import subprocess
import sys

import pytest

from sdtrt.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sdtrt export: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_diffusers_model(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, err = run_cli(capsys, "export", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "model_index.json")


def test_diffusers_folder_missing_a_component(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    code, err = run_cli(capsys, "export", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "missing text_encoder")


def test_unknown_model_family(capsys, tmp_path):
    code, err = run_cli(capsys, "export", "sd99", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown model 'sd99'", "tiny")


@pytest.mark.parametrize("model,extra,needle", [
    ("sdxl", ["--lora", "style.safetensors"], "LoRA file style.safetensors does not exist")])  # checked, not refused
def test_what_sdxl_does_not_do_yet_is_refused_before_loading(capsys, tmp_path, model, extra, needle):
    code, err = run_cli(capsys, "export", model, "--out", str(tmp_path / "o"), *extra)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickled_checkpoint_is_refused(capsys, tmp_path, suffix):
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    code, err = run_cli(capsys, "export", str(ckpt), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "pickle", "safetensors")


def test_diffusers_folder_with_only_pickled_weights_is_refused(capsys, tmp_path, tiny_diffusers_dir):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_diffusers_dir, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    code, err = run_cli(capsys, "export", str(folder), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "pickled", "--allow-pickle")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--size", "250:512"], "multiple of 8"),
        (["--size", "256:1020"], "multiple of 8"),
        (["--size", "512:256"], "MIN > MAX"),
        (["--batch", "4:1"], "MIN > MAX"),
        (["--batch", "0:2"], "at least 1"),
        (["--size", "abc"], "MIN:MAX"),
        (["--precision", "int8"], "invalid choice"),
    ],
)
def test_bad_ranges_and_options(capsys, tmp_path, flags, needle):
    code, err = run_cli(capsys, "export", "tiny", "--out", str(tmp_path / "o"), *flags)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_existing_output_without_force(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "export", "tiny", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "already exists", "--force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_failed_parity_gate_leaves_no_output(capsys, tmp_path, monkeypatch):
    from sdtrt.export import validate

    monkeypatch.setitem(validate.TOLERANCE, "fp32", 0.0)  # no graph can pass a zero tolerance
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text('{"schema_version": 1, "components": {}}')  # an engine folder
    (tmp_path / "o" / "keep.txt").write_text("previous export")
    code, err = run_cli(capsys, "export", "tiny", "--precision", "fp32", "--size", "64:128", "--out", str(tmp_path / "o"),
                        "--force")
    # The gate prints its table of numbers first; the error itself is still one last line.
    assert "max rel err" in err and "Traceback" not in err
    assert_one_line_error(code, err.splitlines()[-1], "does not match PyTorch", "max relative error")
    assert (tmp_path / "o" / "keep.txt").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_interrupted_export_leaves_no_output(tmp_path, monkeypatch):
    from sdtrt.export import ExportConfig, export, onnx_tools

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_tools, "infer_shapes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(model="tiny", out=str(tmp_path / "o"), size_min=64, size_max=128), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_console_script_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "export", "sd99", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    from sdtrt.export.architectures import BUILTIN_ARCHITECTURES

    assert proc.stderr.strip().splitlines() == ["sdtrt export: error: unknown model 'sd99': give a diffusers folder "
                                                f"or one of the built-ins ({', '.join(BUILTIN_ARCHITECTURES)})"]
