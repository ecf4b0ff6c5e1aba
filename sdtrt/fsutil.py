"""Files are written whole or not at all: every writer goes through a sibling ``.NAME.tmp-PID`` and a rename.

A crash or SIGKILL can still leave such a temporary behind; it names the process that made it, so a later
run removes the ones whose process is gone (``remove_stale``) and never touches a live writer's file.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:\..*)?$")


def temp_path(path: Path, kind: str = "tmp", suffix: str = "") -> Path:
    """``dir/.name.tmp-PID`` for ``dir/name``; ``suffix`` keeps an extension some writers need (``.png``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{suffix}")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries in ``folder`` (for one NAME, or any) whose process is
    gone; returns what was removed. Unreadable folders and vanished entries are skipped."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m.group("name") != name) or pid_alive(int(m.group("pid"))):
            continue
        if (entry / _JOURNAL).is_file():  # a folder switch that was killed: undo it, never delete what it holds
            if _undo_switch(entry):
                removed.append(entry)
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on any failure removed."""
    with atomic_paths([path], suffix) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths, suffix: str = "", overwrite: bool = True) -> Iterator[list[Path]]:
    """Temporary paths for files that belong together: each is renamed onto its path once all are written, and all
    are removed on any failure (a disk that fills up at the second of two images leaves neither). An ``OSError``
    without a file name gets the one it was about (the folder, for several files). ``overwrite=False``: a path that
    something else created meanwhile is not replaced (hard link, which refuses an existing name): FileExistsError,
    and what this call had already put in place is taken back. With ``overwrite``, a failure between two renames
    (rare: the data is written by then) leaves the earlier ones replaced."""
    paths = [Path(p) for p in paths]
    temps = [temp_path(p, suffix=suffix) for p in paths]
    placed: list[Path] = []
    try:
        try:
            yield temps
        except OSError as ex:
            if ex.filename is None or str(ex.filename) in map(str, temps):
                where = {str(t): p for t, p in zip(temps, paths)}.get(str(ex.filename))
                ex.filename = str(where or (paths[0] if len(paths) == 1 else paths[0].parent))
            raise
        for tmp, path in zip(temps, paths):
            st = os.stat(tmp)
            if overwrite:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
            placed.append((path, (st.st_dev, st.st_ino)))
    except BaseException:
        for tmp in temps:
            try:
                tmp.unlink()
            except OSError:
                pass
        for path, ident in placed if not overwrite else ():
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == ident:  # still ours: another run may have replaced it since
                    path.unlink()
            except OSError:
                pass
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` unless ``path`` exists, atomically where the filesystem has hard links."""
    import errno

    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "it was created while this ran (another process?); --force replaces it",
                              str(path)) from None
    except OSError as ex:
        if ex.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists():  # no hard links here (FAT, some network filesystems): check, then rename
            raise FileExistsError(errno.EEXIST, "it was created while this ran (another process?); --force replaces "
                                  "it", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_path(Path(path)) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            with open(tmp, "wb") as fh:
                fh.write(memoryview(data))


def file_mode() -> int:
    """The mode a file created now gets: 0o666 without the process's umask (read from /proc where it can be, as
    setting the umask to read it back would race other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def normal_mode(path: Path) -> None:
    """Give ``path`` the mode of a file created with ``open`` (writers that use ``mkstemp`` make it 0600: ONNX's
    external data files; a service account then cannot read them)."""
    os.chmod(path, file_mode())


def check_writable(path: Path) -> None:
    """Raise ``OSError`` (with the OS's reason) unless a file can be created beside ``path`` and renamed onto it:
    the folder exists, is writable, is a real filesystem and the name is not too long."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.close(fd)
    finally:
        tmp.unlink()


_JOURNAL = ".sdtrt-switch.json"  # in a switch's .NAME.old-PID folder: what it moves, to undo a killed switch


def replace_entries(new: Path, folder: Path, replaced: set[str], last: str) -> None:
    """Move every entry of the folder ``new`` into ``folder``, replacing the entries named in ``replaced`` (and any of
    the same name), leaving every other entry of ``folder`` as it is. ``last`` is moved out first and in last (the
    manifest: a reader sees the old folder, then none, then the new one, never a mix under one manifest). The old
    entries wait in a sibling ``.NAME.old-PID.*`` until the switch is done, and are put back if it fails half-way;
    a journal there lets ``remove_stale`` put them back after a switch that was killed. ``new`` is removed when
    empty."""
    import json
    import tempfile

    new, folder = Path(new), Path(folder)
    incoming = sorted((e.name for e in new.iterdir()), key=lambda n: n == last)
    outgoing = sorted({n for n in replaced | set(incoming) if os.path.lexists(folder / n)}, key=lambda n: n != last)
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{os.getpid()}.", dir=folder.parent))
    (old / _JOURNAL).write_text(json.dumps({"folder": folder.name, "outgoing": outgoing, "incoming": incoming}))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in outgoing:
            os.rename(folder / name, old / name)
            moved_out.append(name)
        for name in incoming:
            os.rename(new / name, folder / name)
            moved_in.append(name)
    except BaseException:
        restored = True
        for name in reversed(moved_in):
            try:
                os.rename(folder / name, new / name)
            except OSError:
                restored = False
        for name in reversed(moved_out):
            try:
                os.rename(old / name, folder / name)
            except OSError:
                restored = False
        if restored:  # never delete what could not be put back: the journal stays for remove_stale
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    try:
        new.rmdir()
    except OSError:
        pass


def _undo_switch(old: Path) -> bool:
    """Put back what a killed ``replace_entries`` had moved out of its folder, taking out what it had moved in (an
    incoming name that is in the folder is the new one, unless it was to go out and is not in ``old`` yet); True when
    everything went back and ``old`` is gone."""
    import json

    try:
        journal = json.loads((old / _JOURNAL).read_text(encoding="utf-8"))
        folder = old.parent / journal["folder"]
        outgoing, incoming = set(journal["outgoing"]), list(journal["incoming"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        for name in incoming:
            target = folder / name
            if os.path.lexists(target) and (name not in outgoing or os.path.lexists(old / name)):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        for entry in old.iterdir():
            if entry.name != _JOURNAL:
                os.rename(entry, folder / entry.name)
        shutil.rmtree(old)
    except OSError:
        return False
    return True


# ---- one writer per engine folder ------------------------------------------------------------------------------

LOCK_NAME = ".sdtrt-lock"  # in an engine folder while a writer (export, export-controlnet, build) holds it
_held: dict[tuple[int, int, int], int] = {}  # (folder's device, inode, thread) -> depth: a writer calling a writer


@contextmanager
def folder_lock(folder: Path, what: str, log=None, create: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold ``folder``'s writer lock (``flock`` on ``folder/.sdtrt-lock``) for the block: one sdtrt writer per engine
    folder at a time. Another holder makes this wait, saying so through ``log`` (with ``wait=False``, yield False
    at once instead). Readers need no lock: every writer puts its files in place before the one rename that
    switches the manifest. The kernel drops the lock when its holder dies (even by SIGKILL), and the lock file is
    removed on release, so a crash never leaves anything that blocks the next run (a file a killed holder left
    behind is free to lock). ``create`` (export): make the folder when it does not exist, and remove it again if
    it is still empty when the block ends. Yields True when held; False with ``wait=False`` while another writer
    holds it, when the folder is not a folder (without ``create``; the caller's own check says so), or when no
    lock file can be made there and ``wait`` is off (a read-only folder: nobody writes there)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): writers are not serialized
        yield True
        return
    import threading

    folder = Path(folder)
    made = False
    if create:
        try:
            folder.mkdir()
            made = True
        except FileExistsError:
            pass
    elif not folder.is_dir():
        yield False
        return
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino, threading.get_ident())
    if key in _held:  # this thread holds it already (the lock is per open file, so it would wait for itself)
        _held[key] += 1
        try:
            yield True
        finally:
            _held[key] -= 1
        return
    path = folder / LOCK_NAME
    fd = None
    try:
        while True:
            if not create and not folder.is_dir():  # gone while this waited (an export that failed removed it)
                yield False
                return
            try:
                fd = _open_lock(path)
            except OSError:
                if wait:
                    raise
                yield False
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    fd = None
                    yield False
                    return
                if log is not None:
                    log(f"waiting for {_holder(fd)} to finish writing to {folder} (one writer per engine folder) ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder removed the file on release: a newcomer may lock a new one under the same name
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                break
            os.close(fd)
            fd = None
            if create and not folder.is_dir():  # the holder's export failed and removed the folder it had made
                try:
                    folder.mkdir()
                    made = True
                except FileExistsError:
                    pass
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        except OSError:  # opened read-only (another user's lock file): it still locks
            pass
        _held[key] = 1
        try:
            yield True
        finally:
            del _held[key]
            try:
                path.unlink()  # while still held: a waiter on this file notices, and locks the next one
            except OSError:
                pass
    finally:
        if made:
            try:
                folder.rmdir()  # only when empty: an export that failed leaves no folder behind
            except OSError:
                pass
        if fd is not None:
            os.close(fd)


def _open_lock(path: Path) -> int:
    import errno

    flags = os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        try:
            return os.open(path, os.O_RDWR | flags, 0o666)
        except PermissionError:  # another user's lock file (flock needs no write access) in a folder shared with them
            return os.open(path, os.O_RDONLY | flags, 0o666)
    except OSError as ex:
        if ex.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, "a symlink where sdtrt keeps its lock file, which it never follows (remove it)",
                      str(path)) from None


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it: ``pid 123 (sdtrt export)``."""
    try:
        pid, _, what = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        pid = ""
    return f"pid {pid} ({what})" if pid.isdigit() else "another sdtrt process"


def only_lock(folder: Path) -> bool:
    """Whether ``folder`` holds nothing, or nothing but a lock file (an export that made it, not yet filled)."""
    try:
        return all(e.name == LOCK_NAME for e in Path(folder).iterdir())
    except OSError:
        return False
