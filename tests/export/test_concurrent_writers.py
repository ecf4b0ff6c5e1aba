"""One writer per engine folder, between real ``sdtrt`` processes: a second export into the same folder waits and
then refuses (it does not silently replace the first), two ``export-controlnet`` runs both land in the manifest
(neither graph orphaned), and ``build`` waits for a writer too. Every file a writer puts in the folder has the
mode a plain file gets under the writer's umask (ONNX's external data files were 0600)."""

import os
import shutil
import stat
import subprocess
import sys
import time

from sdtrt.fsutil import LOCK_NAME, file_mode
from sdtrt.integrity import stray_files
from sdtrt.manifest import Manifest
from tests.runtime.conftest import fake_gpu, fp16_folder  # noqa: F401,F811  (fixtures of the build test)
from tests.test_folder_lock import hold

UMASK = 0o027  # not the usual 022: a mode that merely happens to be 0644 does not pass


def _sdtrt(*args):
    return subprocess.Popen([sys.executable, "-m", "sdtrt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(UMASK))


def _until_it_holds_the_lock(folder, proc):
    deadline = time.time() + 120
    while True:
        try:
            if (folder / LOCK_NAME).read_text().startswith(f"{proc.pid} "):
                return
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def _modes(folder, names=None):
    """{relative path: mode} of the files (and folders) under ``folder``, or of ``names`` only."""
    paths = [folder / n for n in names] if names else sorted(folder.rglob("*"))
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _verifies(folder):
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "info", str(folder), "--verify"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "MISMATCH" not in proc.stdout and " note " not in proc.stdout, proc.stdout


def test_a_second_export_into_the_same_new_folder_waits_then_refuses(tmp_path):
    out = tmp_path / "engine"
    first = _sdtrt("export", "tiny", "--out", out, "--size", "64:64", "--batch", "1:2")
    _until_it_holds_the_lock(out, first)
    second = _sdtrt("export", "tiny", "--out", out, "--size", "64:64", "--batch", "1:2", "--seed", "7")
    err1, err2 = first.communicate(timeout=600)[1], second.communicate(timeout=600)[1]
    assert first.returncode == 0 and f"wrote {out}" in err1, err1
    # was: both exited 0 and printed "wrote", the second export silently replacing the first
    assert second.returncode == 2 and "wrote" not in err2, err2
    assert err2.strip().splitlines() == [
        f"waiting for pid {first.pid} (sdtrt export) to finish writing to {out} (one writer per engine folder) ...",
        f"sdtrt export: error: output folder {out} already exists (an sdtrt engine folder); pass --force to replace "
        "sdtrt's files in it (files of yours there are kept)"]
    assert [p.name for p in tmp_path.iterdir()] == ["engine"] and not (out / LOCK_NAME).exists()
    modes = _modes(out)
    assert "unet.onnx.data" in modes and "tokenizer/tokenizer.json" in modes
    assert modes == {name: 0o750 if (out / name).is_dir() else 0o640 for name in modes}
    assert Manifest.load(out).model.weights_seed == 0  # the first export, whole
    _verifies(out)


def test_two_export_controlnet_runs_into_one_folder_both_land(tiny_fp16, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], out)
    first = _sdtrt("export-controlnet", out, "edges=random")
    _until_it_holds_the_lock(out, first)
    second = _sdtrt("export-controlnet", out, "depth=random")
    err1, err2 = first.communicate(timeout=600)[1], second.communicate(timeout=600)[1]
    assert first.returncode == 0 and f"added ControlNet edges to {out}" in err1, err1
    assert second.returncode == 0 and f"added ControlNet depth to {out}" in err2, err2
    assert f"waiting for pid {first.pid} (sdtrt export-controlnet) to finish writing to {out}" in err2
    manifest = Manifest.load(out)  # was: only one of them listed, the other's graph left in the folder
    assert list(manifest.controlnets) == ["edges", "depth"]
    assert manifest.controlnets["edges"].source != manifest.controlnets["depth"].source  # seeds 3 and 4
    assert stray_files(out, manifest) == []
    _verifies(out)
    new = ["controlnet_edges.onnx", "controlnet_depth.onnx", "manifest.json"]
    assert _modes(out, new) == dict.fromkeys(new, 0o640)


def test_build_waits_for_a_writer_and_writes_files_of_the_usual_mode(fake_gpu, fp16_folder):
    from sdtrt.runtime.tensorrt.build import BuildConfig, build_engines

    holder = hold(fp16_folder, 1.5, then="keep")
    logs = []
    manifest = build_engines(fp16_folder, BuildConfig(batch=(1, 1, 2), size=(64, 128, 256), verify=False),
                             log=logs.append)
    assert holder.wait(30) == 0
    assert logs[0] == (f"waiting for pid {holder.pid} (holder) to finish writing to {fp16_folder} (one writer per "
                       "engine folder) ...")
    written = [e.file for e in manifest.tensorrt.engines.values()] + [manifest.tensorrt.timing_cache, "manifest.json"]
    assert manifest.tensorrt.timing_cache.startswith("timing.")  # its name in the folder, not a path
    assert _modes(fp16_folder, written) == dict.fromkeys(written, file_mode())
    assert not (fp16_folder / LOCK_NAME).exists()


def test_every_file_an_export_writes_has_the_mode_of_a_plain_file(tiny_fp16, tiny_control_fp16, tmp_path):
    from sdtrt.runtime import Pipeline

    engine = tmp_path / "engine"
    shutil.copytree(tiny_fp16[0], engine, copy_function=shutil.copyfile)  # modes as this process makes them
    Pipeline.from_dir(engine).close()  # writes the hash record
    modes = {**_modes(tiny_fp16[0]), **_modes(tiny_control_fp16), ".sdtrt-hashes.json":
             _modes(engine, [".sdtrt-hashes.json"])[".sdtrt-hashes.json"]}
    files = {name for name in modes if not (tiny_fp16[0] / name).is_dir() and not (tiny_control_fp16 / name).is_dir()}
    assert {"unet.onnx.data", "text_encoder.onnx.data", "controlnet_edges.onnx"} <= files
    assert {name: modes[name] for name in files} == dict.fromkeys(files, file_mode())  # was: .onnx.data 0600
