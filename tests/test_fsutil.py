"""Atomic writes and stale temporaries: files are written whole or not at all, and only dead writers' leftovers go."""

import os
import subprocess
import sys

import pytest

import errno

from sdtrt.fsutil import atomic_path, atomic_paths, remove_stale, temp_path, write_atomic


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    write_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_files_that_belong_together_appear_all_or_none(tmp_path):
    paths = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    with pytest.raises(OSError) as info:  # a disk that fills up at the second image: neither is left
        with atomic_paths(paths) as temps:
            temps[0].write_bytes(b"first")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    assert info.value.filename == str(tmp_path)  # the message names where: the folder, for several files
    with pytest.raises(OSError) as info:
        with atomic_paths([paths[0]]):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(paths[0])
    with atomic_paths(paths) as temps:
        for k, tmp in enumerate(temps):
            tmp.write_bytes(b"%d" % k)
    assert [p.read_bytes() for p in paths] == [b"0", b"1"] and len(list(tmp_path.iterdir())) == 2


def test_without_overwrite_a_file_made_meanwhile_is_kept_and_ours_taken_back(tmp_path):
    paths = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    with pytest.raises(FileExistsError, match="created while this ran") as info:
        with atomic_paths(paths, overwrite=False) as temps:
            for tmp in temps:
                tmp.write_bytes(b"ours")
            paths[1].write_bytes(b"another run's")  # a concurrent `generate -o out.png` finished first
    assert info.value.filename == str(paths[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png"] and paths[1].read_bytes() == b"another run's"


def test_taking_back_spares_a_file_another_run_put_in_place_meanwhile(tmp_path, monkeypatch):
    paths = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    real_link = os.link

    def link_then_replaced(src, dst):  # a --force run replaces out-0.png right after this one placed it
        real_link(src, dst)
        if str(dst).endswith("out-0.png"):
            (tmp_path / "x").write_bytes(b"theirs too")
            os.replace(tmp_path / "x", dst)

    monkeypatch.setattr(os, "link", link_then_replaced)
    with pytest.raises(FileExistsError):
        with atomic_paths(paths, overwrite=False) as temps:
            for tmp in temps:
                tmp.write_bytes(b"ours")
            paths[1].write_bytes(b"theirs")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"out-0.png": b"theirs too", "out-1.png": b"theirs"}


def test_only_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = dead_pid()
    stale_dir = tmp_path / f".engine.tmp-{dead}"
    stale_dir.mkdir()
    stale_file = tmp_path / f".out.png.tmp-{dead}.png"
    stale_file.write_text("x")
    mine = temp_path(tmp_path / "engine")
    mine.mkdir()
    other_name = tmp_path / f".other.tmp-{dead}"
    other_name.mkdir()
    removed = remove_stale(tmp_path, "engine")
    assert removed == [stale_dir] and mine.exists() and other_name.exists() and stale_file.exists()
    assert set(remove_stale(tmp_path)) == {other_name, stale_file} and mine.exists()
    assert str(os.getpid()) in mine.name
