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


@pytest.mark.parametrize("name", ["unet.onnx.data", "vae_decoder.onnx"])
def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_hashed_again_and_refused(engine, name):
    import os

    Pipeline.from_dir(engine).close()  # the stat record now trusts every file as it is
    path = engine / name
    before = path.stat()
    with open(path, "r+b") as fh:  # same inode, same size, one bit
        fh.seek(before.st_size // 2)
        byte = fh.read(1)
        fh.seek(before.st_size // 2)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` or a careful tool does
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(ManifestError, match=f"{name}: its sha256 differs from manifest.json"):
        Pipeline.from_dir(engine)


def test_info_verify_notes_sdtrt_looking_files_the_manifest_does_not_list(engine):
    import subprocess
    import sys

    (engine / "unet.old.onnx").write_bytes(b"an orphan graph")
    (engine / "controlnet_x.onnx.data").write_bytes(b"orphan weights")
    (engine / "unet.trt10.sm90.12345678.plan").write_bytes(b"an orphan engine")
    (engine / "notes.txt").write_text("the user's own file")  # not sdtrt's business
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "info", str(engine), "--verify"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr  # the folder runs: what it does not list, sdtrt never reads
    notes = [line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("note")]
    assert notes == ["controlnet_x.onnx.data", "unet.old.onnx", "unet.trt10.sm90.12345678.plan"]
