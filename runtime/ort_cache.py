"""ONNX Runtime's optimized graphs, saved beside the engine folder's graphs for a fast cold start.

With every optimisation on (``ORT_ENABLE_ALL``), ONNX Runtime spends most of a CPU session's creation rewriting the
graph for this CPU (NCHWc convolution layouts, weights reordered, fusions): 16 of the 18 s SD 1.5's U-Net took to
load here. It can save the result (``SessionOptions.optimized_model_filepath``, weights to an external file), and a
session over that file with optimisations off loads in 1.5 s and runs as fast. The saved graph is this CPU's and this
ONNX Runtime's (the layouts depend on the instruction set), so it is kept under a key of the source graph's hashes
(the manifest's, checked at every load), ONNX Runtime's version, the CPU's flags and this module's rewrite version,
in ``<folder>/.sdtrt-ort/``; an entry of another key for the same graph is removed when a new one is written. The
exported files are never changed, and TensorRT never reads these (they hold ONNX Runtime's own operators).

Entries are written to a temporary folder and renamed into place, the record last: a reader sees a whole entry or
none. A folder that cannot be written (read-only, disk full) just loads without the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from sdtrt.manifest import Component
from sdtrt.runtime.cache_keys import graph_key, other_keys

log = logging.getLogger("sdtrt")

CACHE_DIR = ".sdtrt-ort"
VERSION = 1  # of the rewrite (ort_graphs) and of the entry layout: a change makes new keys


def cpu_signature() -> str:
    """What the saved layouts depend on: the machine and its CPU's instruction-set flags."""
    import platform

    flags = ""
    try:
        flags = next((line.split(":", 1)[1] for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))),
                     "")
    except OSError:
        pass
    return f"{platform.machine()} {' '.join(sorted(flags.split()))}"


def entry_key(component: Component, fused: bool) -> str:
    import onnxruntime as ort

    return graph_key(component, onnxruntime=ort.__version__, cpu=cpu_signature(), fused=fused, version=VERSION)


class Entry:
    """One saved optimized graph: ``<stem>-<key>.onnx``, its ``.data`` and its ``.json`` record."""

    def __init__(self, folder: Path, component: Component, fused: bool):
        self.dir = Path(folder) / CACHE_DIR
        self.stem = Path(component.file).stem
        self.key = entry_key(component, fused)
        self.name = f"{self.stem}-{self.key}"
        self.graph, self.data, self.record = (self.dir / f"{self.name}{s}" for s in (".onnx", ".data", ".json"))

    def read(self) -> dict | None:
        """The record of a whole entry (its files of the recorded sizes), else None."""
        try:
            record = json.loads(self.record.read_text())
            ok = all(os.path.getsize(p) == record["sizes"][p.name] for p in (self.graph, self.data))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if ok else None

    def options(self, opts, tmp: Path) -> None:
        """Make ``opts`` save the session's optimized graph into ``tmp``, weights in the entry's data file."""
        opts.optimized_model_filepath = str(tmp / self.graph.name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", self.data.name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")

    def start(self, need_bytes: int) -> Path | None:
        """A fresh temporary folder to save into, or None when the cache folder cannot be written or has not
        ``need_bytes`` free."""
        try:
            self.dir.mkdir(exist_ok=True)
            for left in self.dir.glob("tmp-*"):  # a process killed while saving (out of memory, Ctrl-C) left it
                if not _alive(left.name.split("-")[1]):
                    shutil.rmtree(left, ignore_errors=True)
            if shutil.disk_usage(self.dir).free < need_bytes:
                log.info("not caching ONNX Runtime's optimized %s: %s has under %.1f GB free", self.stem, self.dir,
                         need_bytes / 1e9)
                return None
            tmp = self.dir / f"tmp-{os.getpid()}-{os.urandom(4).hex()}"
            tmp.mkdir()
            return tmp
        except OSError as ex:
            log.info("not caching ONNX Runtime's optimized %s: %s", self.stem, ex.strerror or ex)
            return None

    def commit(self, tmp: Path, record: dict) -> bool:
        """Move the saved files from ``tmp`` into place, the record last; remove other keys' entries of this graph.
        False when that failed (nothing usable written)."""
        try:
            if not (tmp / self.data.name).exists():  # no initializer over the threshold (the sampler update's graph)
                (tmp / self.data.name).touch()
            sizes = {p.name: os.path.getsize(tmp / p.name) for p in (self.graph, self.data)}
            for p in (self.data, self.graph):
                os.replace(tmp / p.name, p)
            (tmp / self.record.name).write_text(json.dumps(record | {"sizes": sizes}) + "\n")
            os.replace(tmp / self.record.name, self.record)
            for old in other_keys(self.dir, self.stem, self.key):
                if old.is_file():
                    old.unlink(missing_ok=True)
            return True
        except OSError as ex:
            log.info("not caching ONNX Runtime's optimized %s: %s", self.stem, ex.strerror or ex)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self) -> None:
        for p in (self.record, self.graph, self.data):
            p.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a tmp folder's writer) still runs here; a name that is no pid counts as alive."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError):
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
