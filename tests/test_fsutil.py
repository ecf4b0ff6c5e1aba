"""Atomic writes and stale temporaries: files are written whole or not at all, and only dead writers' leftovers go."""

import os
import subprocess
import sys

import pytest

from sdtrt.fsutil import atomic_path, remove_stale, temp_path, write_atomic


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
