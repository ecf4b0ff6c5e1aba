"""Each file of an engine folder is checked against the manifest's sha256 when it is loaded; unchanged files are
not hashed again, and a changed one is, even when its size is the same."""

import shutil

import pytest

from sdtrt import integrity
from sdtrt.errors import ManifestError
from sdtrt.runtime import Pipeline


@pytest.fixture
def engine(tiny_fp16, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    return out


def test_unchanged_files_are_hashed_once(engine, monkeypatch):
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    Pipeline.from_dir(engine).close()
    # the U-Net and text encoder keep their weights in .data files (LoRAs read the base weights there)
    assert sorted(hashed) == ["text_encoder.onnx", "text_encoder.onnx.data", "unet.onnx", "unet.onnx.data",
                              "vae_decoder.onnx", "vae_encoder.onnx"]
    hashed.clear()
    Pipeline.from_dir(engine).close()
    assert hashed == []


def test_a_changed_file_of_the_same_size_is_hashed_again_and_refused(engine):
    Pipeline.from_dir(engine).close()
    data = bytearray((engine / "unet.onnx").read_bytes())
    data[-1] ^= 1
    (engine / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"unet.onnx: its sha256 differs from manifest.json: replaced \(another "
                                            r"export\?\) or corrupt; re-export the model"):
        Pipeline.from_dir(engine)


@pytest.mark.parametrize("replace, kind", [
    (lambda p: (p.unlink(), p.mkdir()), "a folder"),
    (lambda p: (p.unlink(), p.symlink_to("/dev/null")), "a character device"),
])
@pytest.mark.parametrize("with_size", [True, False])
def test_something_else_in_place_of_a_file_is_named(engine, replace, kind, with_size):
    from sdtrt.manifest import Manifest

    manifest = Manifest.load(engine)
    replace(engine / "unet.onnx")
    entries = [e if with_size else integrity.FileEntry(e.file, e.sha256) for e in integrity.folder_files(manifest)]
    problems = integrity.verify_files(engine, entries, full=True)
    assert problems == [f"unet.onnx: is not a regular file ({kind})"]
