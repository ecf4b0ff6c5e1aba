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
