"""Nothing of the user's is deleted: ``export --force``, ``export-controlnet --force`` and ``build`` replace only
the files sdtrt owns (what the manifest lists) and leave every other file and folder in the engine folder."""

import shutil

import pytest

from sdtrt.manifest import Manifest, owned_entries
from tests.runtime.conftest import fake_gpu, fp16_folder  # noqa: F401,F811  (fixtures of the build test)


def _plant(folder):
    """A user's image, notes and a subfolder with a file, as people leave them in a model folder."""
    (folder / "astronaut.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("my settings")
    (folder / "mine").mkdir()
    (folder / "mine" / "result.png").write_bytes(b"keep me")
    return {"astronaut.png": b"\x89PNG not really", "notes.txt": b"my settings", "mine/result.png": b"keep me"}


def _kept(folder, planted):
    for name, data in planted.items():
        assert (folder / name).read_bytes() == data, name


def _no_temporaries(parent):
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_export_force_over_an_engine_folder_keeps_the_users_files(cli, tiny_fp16, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    planted = _plant(out)
    before = Manifest.load(out)
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:128", "--batch", "1:2", "--seed", "5")
    assert code == 0, err
    _kept(out, planted)
    after = Manifest.load(out)
    assert after.model.weights_seed == 5 and after.components["unet"].sha256 != before.components["unet"].sha256
    # every file of the new export is in place and intact: the folder loads and verifies
    code, _, err = cli("info", out, "--verify")
    assert code == 0, err
    _no_temporaries(tmp_path)


def test_export_force_drops_the_old_exports_files_that_the_new_one_does_not_write(cli, tiny_control_fp16, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_control_fp16, out)
    planted = _plant(out)
    assert (out / "controlnet_edges.onnx").exists()
    (out / ".sdtrt-ort").mkdir(exist_ok=True)  # ONNX Runtime's optimized graphs of the old export (ort_cache.py)
    (out / ".sdtrt-ort" / "unet-0123.onnx").write_bytes(b"old")
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1")
    assert code == 0, err
    assert not (out / "controlnet_edges.onnx").exists()  # the old manifest's, not the new one's: gone
    assert not (out / ".sdtrt-ort").exists()
    made_at_load = {".sdtrt-hashes.json", ".sdtrt-ort", ".sdtrt-openvino"}
    assert {p.name for p in out.iterdir()} == owned_entries(out) - made_at_load | {"astronaut.png", "notes.txt", "mine"}
    _kept(out, planted)


def test_export_force_into_a_folder_that_is_not_an_engine_folder_writes_only_sdtrts_files(cli, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    planted = _plant(out)
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1")
    assert code == 0, err
    _kept(out, planted)
    assert (out / "manifest.json").is_file()
    # and again: now it is an engine folder, and the user's files are still not sdtrt's
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1")
    assert code == 0, err
    _kept(out, planted)
    assert not {"astronaut.png", "notes.txt", "mine"} & owned_entries(out)


def test_a_file_of_the_users_named_like_sdtrts_is_never_replaced(cli, tmp_path, monkeypatch):
    out = tmp_path / "models"
    out.mkdir()
    (out / "unet.onnx").write_text("the user's own graph")
    code, _, err = cli("export", "tiny", "--out", out, "--size", "64:64", "--batch", "1:1")
    assert code == 2 and "pass --force" in err
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1")
    assert code == 2 and len(err.splitlines()) == 1 and "holds unet.onnx, which the export would write" in err, err
    assert [p.name for p in out.iterdir()] == ["unet.onnx"] and (out / "unet.onnx").read_text() == "the user's own graph"
    # a name only the finished export knows (a ControlNet's graph) is checked when it is put in place
    (out / "unet.onnx").unlink()
    (out / "controlnet_edges.onnx").write_text("mine")
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1",
                       "--controlnet", "edges=random")
    assert code == 2 and "holds controlnet_edges.onnx, which the export would write" in err.splitlines()[-1], err
    assert [p.name for p in out.iterdir()] == ["controlnet_edges.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_switch_puts_every_old_file_back(tiny_fp16, tmp_path, monkeypatch):
    """A rename failing half-way (a disk error, say) leaves the old engine folder exactly as it was."""
    import os

    from sdtrt import fsutil

    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    planted = _plant(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    new = tmp_path / "new"
    new.mkdir()
    for name in ("manifest.json", "unet.onnx", "extra.onnx"):
        (new / name).write_text(name)
    real = os.rename

    def flaky(src, dst):
        if str(src) == str(new / "unet.onnx"):  # after the old files went out and extra.onnx came in
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", flaky)
    with pytest.raises(OSError):
        fsutil.replace_entries(new, out, owned_entries(out), last="manifest.json")
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    _kept(out, planted)
    assert sorted(p.name for p in new.iterdir()) == ["extra.onnx", "manifest.json", "unet.onnx"]
    _no_temporaries(tmp_path)


def test_export_controlnet_force_keeps_the_users_files(cli, tiny_control_fp16, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_control_fp16, out)
    planted = _plant(out)
    old = Manifest.load(out).components["controlnet_edges"].sha256
    code, _, err = cli("export-controlnet", out, "edges=random", "--force")
    assert code == 0, err
    _kept(out, planted)
    assert Manifest.load(out).components["controlnet_edges"].sha256 != old


def test_build_keeps_the_users_files(fake_gpu, fp16_folder):
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    planted = _plant(fp16_folder)
    cfg = BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False)
    build_engines(fp16_folder, cfg, log=lambda s: None)
    build_engines(fp16_folder, BuildConfig(batch=(1, 1, 1), size=(64, 64, 128), verify=False), log=lambda s: None)
    _kept(fp16_folder, planted)
    engines = Manifest.load(fp16_folder).tensorrt.engines
    assert {p.name for p in fp16_folder.glob("*.plan")} == {e.file for e in engines.values()}


def test_a_hand_edited_manifest_cannot_make_the_users_files_sdtrts(cli, tiny_fp16, tmp_path):
    """A manifest naming a user's folder, a path into it or a name without a graph suffix owns none of them."""
    import json

    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    planted = _plant(out)
    data = json.loads((out / "manifest.json").read_text())
    data["components"]["unet"]["external_data"] += ["mine", "mine/result.png", "notes.txt", "../engine"]
    data["tokenizer_dir"], data["scheduler_config"] = "mine", "astronaut.png"
    (out / "manifest.json").write_text(json.dumps(data))
    assert not {"mine", "notes.txt", "astronaut.png", "..", "../engine"} & owned_entries(out)
    code, _, err = cli("export", "tiny", "--out", out, "--force", "--size", "64:64", "--batch", "1:1")
    assert code == 0, err
    _kept(out, planted)


def test_a_switch_killed_half_way_is_undone_by_the_next_run(tiny_fp16, tmp_path):
    """SIGKILL between two renames of the switch (os._exit): the old files wait beside the folder with a journal, and
    the next export, build or `info` (remove_stale) puts the folder back exactly as it was."""
    import subprocess
    import sys

    from sdtrt.fsutil import remove_stale

    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    _plant(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    new = tmp_path / "new"
    new.mkdir()
    for name in ("manifest.json", "unet.onnx", "tokenizer", "extra.onnx"):
        (new / name).write_text(f"new {name}")
    script = f"""
import os
from pathlib import Path
from sdtrt import fsutil
from sdtrt.manifest import owned_entries
real, calls = os.rename, []
def rename(src, dst):
    if str(src).startswith({str(new)!r}):
        calls.append(src)
        if len(calls) == 2:  # every old entry went out, one new one came in
            os._exit(9)
    real(src, dst)
fsutil.os.rename = rename
fsutil.replace_entries(Path({str(new)!r}), Path({str(out)!r}), owned_entries(Path({str(out)!r})), "manifest.json")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    came_in = [n for n in ("unet.onnx", "tokenizer", "extra.onnx") if (out / n).is_file()
               and (out / n).read_bytes() == f"new {n}".encode()]
    assert not (out / "manifest.json").exists() and len(came_in) == 1  # killed half-way, as intended
    assert remove_stale(tmp_path, "engine")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    _no_temporaries(tmp_path)
