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


def replace_entries(new: Path, folder: Path, replaced: set[str], last: str) -> None:
    """Move every entry of the folder ``new`` into ``folder``, replacing the entries named in ``replaced`` (and any of
    the same name), leaving every other entry of ``folder`` as it is. ``last`` is moved out first and in last (the
    manifest: a reader sees the old folder, then none, then the new one, never a mix under one manifest). The old
    entries wait in a sibling ``.NAME.old-PID`` until the switch is done, and are put back if it fails half-way;
    ``new`` is removed when it is empty."""
    new, folder = Path(new), Path(folder)
    incoming = sorted((e.name for e in new.iterdir()), key=lambda n: n == last)
    outgoing = sorted({n for n in replaced | set(incoming) if os.path.lexists(folder / n)}, key=lambda n: n != last)
    old = temp_path(folder, "old")
    old.mkdir()
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
        for name in reversed(moved_in):
            try:
                os.rename(folder / name, new / name)
            except OSError:
                pass
        for name in reversed(moved_out):
            try:
                os.rename(old / name, folder / name)
            except OSError:
                pass
        try:
            old.rmdir()  # only when everything went back: never delete what could not be restored
        except OSError:
            pass
        raise
    shutil.rmtree(old, ignore_errors=True)
    try:
        new.rmdir()
    except OSError:
        pass
