"""Is each file of an engine folder the one its manifest describes? (sha256, checked without torch)

A graph swapped in from another export runs without a word and gives a different image, so the runtime
checks every file it loads against the manifest's sha256. Hashing a 1.7 GB U-Net takes about a second;
a small record in the folder (``.sdtrt-hashes.json``: size, mtime, ctime, inode and device of each file when it
was last hashed) lets later loads skip files that have not changed since. The ctime is what makes the record
trustworthy: a write that puts the old mtime back (``touch -d``, ``os.utime``) still moves the ctime, which
nothing but the kernel's clock sets. ``sdtrt info --verify`` hashes
everything regardless.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sdtrt.manifest import OWNED_SUFFIXES, Manifest, sha256_file

CACHE = ".sdtrt-hashes.json"


@dataclass(frozen=True)
class FileEntry:
    file: str  # relative to the folder
    sha256: str
    size: int | None = None  # when the manifest records the file's own size


def folder_files(manifest: Manifest, components: tuple[str, ...] | None = None, engines: bool = False) -> list[FileEntry]:
    """The files the manifest describes: graphs and their external data (of ``components``, default all), and
    with ``engines`` the TensorRT engines."""
    out = []
    for name, c in manifest.components.items():
        if components is not None and name not in components:
            continue
        out.append(FileEntry(c.file, c.sha256, None if c.external_data else c.size_bytes))
        out += [FileEntry(f, c.external_sha256[f]) for f in c.external_data if f in c.external_sha256]
    if manifest.tensorrt is not None and (engines or components is None):
        out += [FileEntry(e.file, e.sha256, e.size_bytes) for e in manifest.tensorrt.engines.values()]
    return out


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "of an unknown kind")


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def verify_files(folder: Path, entries: list[FileEntry], full: bool = False, use_cache: bool = True) -> list[str]:
    """Problems found, one line each (``"unet.onnx: ..."``); empty when every file matches. ``full`` hashes
    every file; otherwise files whose size, mtime, ctime, inode and device match the record of their last hash are
    trusted."""
    folder = Path(folder)
    cache_path = folder / CACHE
    try:
        cache = json.loads(cache_path.read_text()) if use_cache and cache_path.is_file() else {}
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    problems, changed = [], False
    for entry in entries:
        path = folder / entry.file
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"{entry.file}: missing (listed in manifest.json)")
            continue
        except OSError as ex:
            problems.append(f"{entry.file}: cannot be read ({ex.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):  # a folder's or device's size means nothing, and /dev/zero never ends
            problems.append(f"{entry.file}: is not a regular file ({_file_kind(st.st_mode)})")
            continue
        if entry.size is not None and st.st_size != entry.size:
            problems.append(f"{entry.file}: {st.st_size} bytes, manifest.json says {entry.size}: replaced or truncated")
            continue
        known = cache.get(entry.file)
        if not full and isinstance(known, dict) and known.get("stamp") == _stamp(st) and known.get("sha256") == entry.sha256:
            continue
        try:
            digest = sha256_file(path)
        except OSError as ex:
            problems.append(f"{entry.file}: cannot be read ({ex.strerror})")
            continue
        if digest != entry.sha256:
            problems.append(f"{entry.file}: its sha256 differs from manifest.json: replaced (another export?) or corrupt")
            continue
        cache[entry.file] = {"stamp": _stamp(st), "sha256": digest}
        changed = True
    if changed:
        try:  # best effort: a read-only folder just hashes again next time
            from sdtrt.fsutil import write_atomic

            write_atomic(cache_path, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass
    return problems



def stray_files(folder: Path, manifest: Manifest) -> list[str]:
    """Files of ``folder`` that look like sdtrt's (graphs, external data, engines) but that its manifest does not
    list: left by an interrupted run or an older sdtrt, or copied in by hand. sdtrt never reads them (the manifest
    says what to load), so they are a note, not an error. Other files are not named: a user's files may live in
    the folder, and timing caches of other GPUs are kept on purpose (a build there reuses them)."""
    listed = {e.file for e in folder_files(manifest)}
    try:
        names = sorted(e.name for e in Path(folder).iterdir())
    except OSError:
        return []
    return [n for n in names if n not in listed and not n.startswith(".") and n.endswith(OWNED_SUFFIXES)]
