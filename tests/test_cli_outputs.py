"""`sdtrt generate`'s outputs as A1111 and ComfyUI users expect them: numbered instead of refused, PNG/JPEG/WebP with
the parameters where A1111 reads them (a PNG text chunk; EXIF UserComment, read back with piexif as A1111 does), batch
count (--n-iter) with A1111's seeds, the control image a ControlNet reads (--control-preview)."""

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime import Pipeline
from tests.runtime.conftest import control_folder  # noqa: F401,F811  (fixture)

GEN = ("--steps", 2, "--size", "64x64", "--seed", 3)


def test_an_existing_output_is_numbered_not_refused_nor_overwritten(cli, engine, tmp_path):
    (tmp_path / "x.png").write_bytes(b"mine")
    (tmp_path / "x-0007.webp").write_bytes(b"mine too")  # numbers count over every image suffix, as A1111's counter
    code, out, err = cli("generate", engine, "a cat", *GEN, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "x-0008.png")]
    code, out, err = cli("generate", engine, "a cat", *GEN, "--num-images", 2, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "x-0009.png"), str(tmp_path / "x-0010.png")]
    assert (tmp_path / "x.png").read_bytes() == b"mine" and (tmp_path / "x-0007.webp").read_bytes() == b"mine too"
    code, out, err = cli("generate", engine, "a cat", *GEN, "-o", tmp_path / "x.png", "--force")
    assert code == 0 and out.split() == [str(tmp_path / "x.png")] and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_carry_the_parameters_where_a1111_reads_them(cli, engine, tmp_path, suffix):
    import piexif
    import piexif.helper

    prompt, negative = "a (red:1.2) fox, \u00e9t\u00e9 \u732b", "blurry: 1, 2"
    code, out, err = cli("generate", engine, prompt, "-n", negative, *GEN, "-o", tmp_path / f"a{suffix}")
    assert code == 0, err
    with Image.open(tmp_path / f"a{suffix}") as image:
        assert image.format == {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[suffix[1:]]
        exif = piexif.load(image.info["exif"])  # modules/infotext_utils.py read_info_from_image
    text = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert text.startswith(f"{prompt}\nNegative prompt: {negative}\nSteps: 2,"), text
    # --from-png reads it back: same settings, so the same pixels as a PNG of the same generation
    code, _, err = cli("generate", engine, "--from-png", tmp_path / f"a{suffix}", "-o", tmp_path / "replay.png")
    assert code == 0, err
    code, _, err = cli("generate", engine, prompt, "-n", negative, *GEN, "-o", tmp_path / "direct.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "replay.png")),
                                  np.asarray(Image.open(tmp_path / "direct.png")))
    assert Image.open(tmp_path / "replay.png").text["parameters"] == text


def test_n_iter_runs_batches_with_a1111s_seeds(cli, engine, tmp_path):
    code, out, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--seed", 10, "--num-images", 2,
                         "--n-iter", 3, "-o", tmp_path / "b.png")
    assert code == 0, err
    paths = out.split()
    assert paths == [str(tmp_path / f"b-{k:04d}.png") for k in range(1, 7)]
    with Pipeline.from_dir(engine, backend="onnxruntime-cpu") as pipe:
        for k in range(3):  # A1111 (processing.py): all_seeds = [seed + x for x in range(batch_size * n_iter)]
            want = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=10 + 2 * k, num_images_per_prompt=2)
            for j in range(2):  # image j of batch k is image 2k + j of the job: seed 10 + 2k + j
                got = Image.open(paths[2 * k + j])
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want.images[j]))
                assert f"Seed: {10 + 2 * k + j}," in got.text["parameters"] and "Batch" not in got.text["parameters"]


def test_n_iter_with_a_random_seed_draws_it_once(cli, engine, tmp_path):
    code, out, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", "--n-iter", 2,
                         "-o", tmp_path / "r.png")
    assert code == 0, err
    seeds = [int(Image.open(p).text["parameters"].split("Seed: ")[1].split(",")[0]) for p in out.split()]
    assert seeds[1] == seeds[0] + 1
    assert seeds[0] < 4294967294  # A1111's get_fixed_seed: random.randrange(4294967294), exact in JavaScript's JSON


def test_control_preview_is_the_canny_map_the_controlnet_reads(cli, control_folder, tmp_path):
    import cv2

    rng = np.random.default_rng(4)
    photo = np.kron(rng.integers(0, 255, (8, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # blocks: real edges
    Image.fromarray(photo).save(tmp_path / "photo.png")
    code, out, err = cli("generate", control_folder, "a fox", "--steps", 2, "--size", "96x64", "--control",
                         f"canny:{tmp_path / 'photo.png'}", "--canny-low", 50, "--canny-high", 150,
                         "--control-preview", tmp_path / "map.png", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert f"control image of ControlNet edges: {tmp_path / 'map.png'}" in err
    edges = cv2.Canny(photo, 50, 150)
    assert 0 < (edges > 0).mean() < 0.5
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "map.png")), np.stack([edges] * 3, -1))


@pytest.mark.parametrize("flags, needle", [
    (["--n-iter", "0"], "--n-iter must be at least 1, got 0"),
    (["--control-preview", "m.png"], "--control-preview needs --control"),
    (["--control", "c.png", "--control-preview", "m.gif"], "--control-preview m.gif must be a file name ending in one of .png"),
    (["--control", "c.png", "--control-preview", "out.png", "-o", "out.png"], "name the same file (out.png)"),
])
def test_bad_output_flags(cli, engine, tmp_path, flags, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("generate", engine, "a cat", "--steps", 2, "--size", "64x64", *flags)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.glob("*.png"))


def test_a1111s_own_jpeg_and_webp_are_replayed(cli, engine, tmp_path):
    """A1111 saves JPEG/WebP, then inserts the infotext with piexif.dump + piexif.insert (modules/images.py)."""
    import piexif
    import piexif.helper

    code, _, err = cli("generate", engine, "a red fox", "-n", "fog", *GEN, "--scheduler", "euler", "-o", tmp_path / "ours.png")
    assert code == 0, err
    text = Image.open(tmp_path / "ours.png").text["parameters"]
    for suffix, fmt in ((".jpg", "JPEG"), (".webp", "WEBP")):
        theirs = tmp_path / f"a1111{suffix}"
        Image.open(tmp_path / "ours.png").convert("RGB").save(theirs, format=fmt, quality=80)
        exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}})
        piexif.insert(exif, str(theirs))
        code, _, err = cli("generate", engine, "--from-png", theirs, "-o", tmp_path / f"replay{suffix}.png")
        assert code == 0, err
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"replay{suffix}.png")),
                                      np.asarray(Image.open(tmp_path / "ours.png")))
