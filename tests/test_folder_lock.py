"""One writer per engine folder (``sdtrt.fsutil.folder_lock``), between real processes: a second writer waits and
says for whom, a holder that dies (even by SIGKILL) blocks nobody, and no lock file is left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sdtrt.fsutil import LOCK_NAME, folder_lock

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sdtrt.fsutil import folder_lock
    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
    with folder_lock(folder, "holder", log=lambda s: print(s, file=sys.stderr, flush=True), create=True):
        (folder / "held").write_text("")
        time.sleep(seconds)
        (folder / "held").unlink()
        if sys.argv[3] == "fill":
            (folder / "manifest.json").write_text("{}")
    print("released", flush=True)
""")


def hold(folder, seconds, then="fill"):
    """A process that makes ``folder`` (if needed) and holds its lock for ``seconds``, then writes a manifest.json
    there (``fill``), or leaves the folder as it found it (anything else); returns once it holds the lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds), then],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (folder / "held").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc


def test_a_second_writer_waits_for_the_first_and_says_for_whom(tmp_path):
    folder = tmp_path / "engine"
    holder = hold(folder, 1.5)
    messages = []
    t0 = time.time()
    with folder_lock(folder, "sdtrt build", log=messages.append) as held:
        waited = time.time() - t0
        assert held and not (folder / "held").exists()  # the first writer's block had ended
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()} sdtrt build\n"
    assert holder.wait(30) == 0 and holder.stdout.read() == "released\n"
    assert waited > 0.5
    assert messages == [f"waiting for pid {holder.pid} (holder) to finish writing to {folder} (one writer per engine "
                        "folder) ..."]
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]  # no lock file left: it is removed on release


def test_a_writer_that_waited_for_an_export_that_failed_finds_no_folder(tmp_path):
    folder = tmp_path / "engine"
    holder = hold(folder, 1, then="fail")  # its export fails: the folder it made goes again
    with folder_lock(folder, "sdtrt build") as held:
        assert held is False  # build's own check then says "engine folder ... does not exist"
    holder.wait(30)
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_waited_for_one_that_failed_makes_the_folder_anew(tmp_path):
    folder = tmp_path / "engine"
    holder = hold(folder, 1, then="fail")
    with folder_lock(folder, "sdtrt export", create=True) as held:
        assert held and folder.is_dir()
    holder.wait(30)
    assert list(tmp_path.iterdir()) == []


def test_a_holder_killed_by_sigkill_blocks_nobody(tmp_path):
    folder = tmp_path / "engine"
    holder = hold(folder, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert (folder / LOCK_NAME).exists()  # what the killed holder left: a file, but no lock (the kernel dropped it)
    messages = []
    with folder_lock(folder, "sdtrt export", log=messages.append) as held:
        assert held
    assert messages == [] and not (folder / LOCK_NAME).exists()


def test_without_wait_a_held_lock_says_no_at_once(tmp_path):
    folder = tmp_path / "engine"
    holder = hold(folder, 1.5)
    with folder_lock(folder, "sdtrt info", wait=False) as held:
        assert held is False
    assert (folder / "held").exists()  # did not wait
    holder.wait(30)


def test_an_export_removes_the_folder_it_made_when_it_fails(tmp_path):
    folder = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with folder_lock(folder, "sdtrt export", create=True):
            assert folder.is_dir()
            raise RuntimeError("the export failed")
    assert list(tmp_path.iterdir()) == []
    with folder_lock(folder, "sdtrt export", create=True):
        (folder / "manifest.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_a_writer_inside_a_writer_does_not_wait_for_itself(tmp_path):
    with folder_lock(tmp_path, "sdtrt export"):
        with folder_lock(tmp_path, "sdtrt build", log=pytest.fail) as held:
            assert held
        assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_file_planted_as_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(target)
    with pytest.raises(OSError, match="a symlink where sdtrt keeps its lock file"):
        with folder_lock(folder, "sdtrt build"):
            pass
    assert target.read_text() == "precious"
