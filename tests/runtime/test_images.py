"""Input images as users' editors and cameras made them (issue 22): an EXIF orientation is applied as diffusers'
``load_image`` applies it (PIL's ``exif_transpose``); an image too large to decode safely (a decompression bomb: a
header that claims 20000x20000), over a pixel limit, or whose text chunks expand to tens of MB is refused in one line
before its pixels are decoded, without PIL's warning."""

import base64
import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from sdtrt.errors import UsageError
from sdtrt.runtime.images import load_image, open_image
from sdtrt.runtime.infotext import read_parameters


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_png(width: int, height: int, *chunks: bytes) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with ``chunks`` before a token of image data:
    the bytes a decompression bomb or a crafted upload starts with."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + b"".join(chunks) + _chunk(b"IDAT", zlib.compress(b"\0" * 25)) + _chunk(b"IEND", b""))


def text_bomb(megabytes: int, kind: bytes = b"zTXt") -> bytes:
    """A compressed ``parameters`` text chunk (zTXt, or iTXt with its compression flag) that expands to
    ``megabytes`` MB, a few hundred KB on disk."""
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"a" * 2**20) for _ in range(megabytes)) + z.flush()
    head = b"parameters\0\0" if kind == b"zTXt" else b"parameters\0\1\0\0\0"
    return _chunk(kind, head + data)


def _image(width=48, height=32):
    """A picture with no symmetry, so that every orientation gives other pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 5 % 256, y * 7 % 256, (x * y) % 256], -1).astype(np.uint8))


def _oriented(orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _image().save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_diffusers_load_image_applies_it(tmp_path, orientation):
    from diffusers.utils import load_image as diffusers_load_image

    for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")):
        path = tmp_path / f"o{orientation}{suffix}"
        path.write_bytes(_oriented(orientation, fmt))
        ours = load_image(path)
        want = diffusers_load_image(str(path))
        assert ours.size == want.size == ((32, 48) if orientation >= 5 else (48, 32)), (fmt, ours.size)
        assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(want)), fmt
        assert np.array_equal(np.asarray(ours), np.asarray(ImageOps.exif_transpose(Image.open(path))))
        # the same from an image already opened (the library's PIL input) and from bytes (the server's)
        assert np.array_equal(np.asarray(load_image(Image.open(path))), np.asarray(ours))
        assert np.array_equal(np.asarray(open_image(io.BytesIO(path.read_bytes()), "x")), np.asarray(ours))
        # once upright, the tag is gone: loading it again turns it no further
        assert np.array_equal(np.asarray(load_image(ours)), np.asarray(ours))


def test_img2img_from_a_rotated_jpeg_is_img2img_from_the_upright_image(tiny_fp32, tmp_path):
    from sdtrt.runtime import Pipeline

    (tmp_path / "phone.jpg").write_bytes(_oriented(6))  # stored 48x32, shown 32x48 ("rotate 90 CW")
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg"))
    upright.save(tmp_path / "upright.png")
    kwargs = dict(num_inference_steps=3, seed=4, strength=0.6, output_type="np")
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as pipe:
        got = pipe("a cat", image=tmp_path / "phone.jpg", height=64, width=64, **kwargs).images
        want = pipe("a cat", image=tmp_path / "upright.png", height=64, width=64, **kwargs).images
        stored = np.asarray(Image.open(tmp_path / "phone.jpg").convert("RGB"))  # the pixels as stored
        sideways = pipe("a cat", image=stored, height=64, width=64, **kwargs).images
    assert np.array_equal(got, want)
    assert not np.array_equal(got, sideways)  # the orientation changes what img2img starts from


@pytest.mark.parametrize("width, height", [(20000, 20000),  # over twice PIL's limit: PIL raises
                                           (10000, 10000)])  # over PIL's limit: PIL only warns, then decodes
def test_a_decompression_bomb_is_refused_in_one_line_without_pils_warning(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(header_png(width, height))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for call in (lambda: load_image(path), lambda: read_parameters(path)):
            with pytest.raises(UsageError, match="too large to decode safely") as ex:
                call()
            assert len(str(ex.value).splitlines()) == 1
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_parameters_of_a_huge_image_are_read_without_decoding_it(tmp_path):
    """An upscaled A1111 image far over PIL's bomb limit still replays: its text comes before the pixels."""
    text = "a castle\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    path = tmp_path / "upscaled.png"
    path.write_bytes(header_png(20000, 20000, _chunk(b"tEXt", b"parameters\0" + text.encode())))
    assert read_parameters(path) == text
    with pytest.raises(UsageError, match="too large to decode safely"):
        load_image(path)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_decoding(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000), "white").save(buf, format="PNG")  # 1.1 MP, a few KB
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(UsageError, match=r"init_images\[0\] is 1100x1000, over the limit of 1048576 pixels per image"):
        open_image(io.BytesIO(buf.getvalue()), "init_images[0]", max_pixels=1024 * 1024)
    from sdtrt.serve.images import decode_image as _decode_image  # the server's A1111 img2img path

    data = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(UsageError, match="over the limit of 1048576 pixels"):
        _decode_image(data, "init_images[0]", 1024 * 1024)
    assert decoded == []  # refused from the header: not a pixel decoded
    assert _decode_image(data, "init_images[0]", 1100 * 1000).size == (1100, 1000)
    assert decoded  # the spy sees a decode when there is one


@pytest.mark.parametrize("megabytes, kind", [(10, b"zTXt"), (200, b"zTXt"), (60, b"iTXt")])
def test_compressed_text_chunks_that_expand_to_megabytes_are_one_line(tmp_path, megabytes, kind):
    path = tmp_path / "text.png"
    path.write_bytes(header_png(4, 4, text_bomb(megabytes, kind)))
    assert path.stat().st_size < 400_000
    for call in (lambda: load_image(path), lambda: read_parameters(path)):
        with pytest.raises(UsageError, match="holds text chunks that expand beyond what PIL reads safely") as ex:
            call()
        assert len(str(ex.value).splitlines()) == 1


def test_the_cli_says_one_line_and_pils_warning_does_not_reach_stderr(tmp_path, tiny_fp32):
    (tmp_path / "bomb.png").write_bytes(header_png(10000, 10000))
    for flag in ("--image", "--from-png"):
        run = subprocess.run([sys.executable, "-m", "sdtrt", "generate", str(tiny_fp32[0]), "a cat", flag,
                              str(tmp_path / "bomb.png"), "-o", str(tmp_path / "x.png")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and "too large to decode safely" in run.stderr, run.stderr
        assert "Warning" not in run.stderr
