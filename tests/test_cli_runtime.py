"""`sdtrt generate` and `sdtrt info` on a tiny export: outputs, and one-line errors with exit code 2."""

import json

import pytest
from PIL import Image


def test_generate_writes_pngs_whose_parameters_read_back(engine, tmp_path, cli):
    code, out, err = cli("generate", engine, "a lighthouse at dusk", "-n", "fog", "--steps", 3, "--seed", 11,
                             "--size", "96x64", "--scheduler", "euler_a", "--num-images", 2, "-o", tmp_path / "img.png")
    assert code == 0, err
    paths = [tmp_path / "img-0001.png", tmp_path / "img-0002.png"]
    assert out.split() == [str(p) for p in paths]
    image = Image.open(paths[1])
    assert image.size == (96, 64)
    params = image.text["parameters"]
    assert params.startswith("a lighthouse at dusk\nNegative prompt: fog\n")
    # the second image's own seed (A1111: seed + i), and no batch position (A1111 1.6+ writes none)
    assert "Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 12, Size: 96x64, Model hash: " in params
    assert params.endswith(", Version: sdtrt 0.1.0") and "Batch" not in params
    assert "seed 11 to 12" in err


def test_info_describes_the_engine_folder(engine, cli):
    code, out, _ = cli("info", engine)
    assert code == 0
    assert "tiny" in out and "unet" in out and "encoder_hidden_states" in out
    assert "onnxruntime-cpu" in out.splitlines()[-1]


def assert_one_line_error(code, err, needle):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sdtrt generate: error: ") and needle in err, err


def test_missing_engine_folder(cli, tmp_path):
    code, _, err = cli("generate", tmp_path / "nope", "a cat", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "does not exist")


def test_missing_manifest(cli, engine, tmp_path):
    (engine / "manifest.json").unlink()
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "manifest.json not found")


@pytest.mark.parametrize("content, needle", [("{not json", "not valid JSON"), ('{"schema_version": 3}', "malformed"),
                                             ("[]", "JSON object")])
def test_corrupt_manifest(cli, engine, tmp_path, content, needle):
    (engine / "manifest.json").write_text(content)
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, needle)


def test_manifest_listing_a_missing_graph(cli, engine, tmp_path):
    (engine / "unet.onnx").unlink()
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "unet.onnx is missing")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--scheduler", "heun"], "invalid choice: 'heun'"),
        (["--size", "250x256"], "not a multiple of 8"),
        (["--size", "1024x1024"], "outside the exported range 64..512"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "steps must be at least 1, got 0"),
        (["--cfg", "-1"], "guidance scale must be between 0 and 100, got -1"),
        (["--num-images", "5"], "batch 5"),
        (["--backend", "onnxruntime-cuda"], "onnxruntime-gpu"),
    ],
)
def test_bad_generation_arguments(cli, engine, tmp_path, flags, needle):
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / "x.png", *flags)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("target, needle", [("missing/x.png", "does not exist"), ("folder.png", "is a folder"),
                                            ("x.tiff", "must be a file name ending in one of .png, .jpg")])
def test_unwritable_output_path(cli, engine, tmp_path, target, needle):
    (tmp_path / "folder.png").mkdir()
    code, _, err = cli("generate", engine, "a cat", "-o", tmp_path / target)
    assert_one_line_error(code, err, needle)


def test_generate_reads_the_manifest_ranges_not_tiny_defaults(cli, engine, tmp_path):
    data = json.loads((engine / "manifest.json").read_text())
    data["ranges"]["size_max"] = 128
    (engine / "manifest.json").write_text(json.dumps(data))
    code, _, err = cli("generate", engine, "a cat", "--size", "256x256", "-o", tmp_path / "x.png")
    assert_one_line_error(code, err, "64..128")
