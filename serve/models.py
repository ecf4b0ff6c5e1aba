"""Several models behind one server (``sdtrt serve --models-dir DIR``): the registry of the engine folders a server
can run, the pipelines loaded (at most ``max_loaded`` at once, the least recently used unloaded first) and the
default model that requests run on when they name none.

Loading and unloading happen only on the engine thread (``acquire``), between two pieces of work: a model is never
switched in the middle of a generation, and each request runs on the model it was submitted for. The event loop
only reads (``find``, ``entries``) and plans a request on a loaded pipeline while holding the lock that unloading
takes (``planning``).

A1111's names: an entry's title is ``name [hash]`` (hash: the first 10 hex digits of the U-Net's sha256, as the
infotext's ``Model hash``); a model is found by its title, name, hash or sha256 (A1111's ``checkpoint_aliases``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import SdtrtError, UnknownModel, UsageError

log = logging.getLogger("sdtrt.serve")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # --models-dir: the folder's name; one folder: the model's own name (as in its infotext)
    folder: Path
    sha256: str  # the U-Net's: what A1111 clients see as the checkpoint's hash
    batch_max: int  # the most images one engine call of this folder takes
    created: int = 0  # when its manifest was written (Unix seconds): OpenAI's model "created"
    default_size: int = 512  # the model's own side in pixels (SDXL 1024): an OpenAI request without a size

    @property
    def hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    def a1111(self) -> dict:
        """A1111's ``/sdapi/v1/sd-models`` item (``filename``: the name, not the server's path)."""
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.name, "config": None}

    @classmethod
    def of(cls, name: str, folder: Path, manifest) -> "ModelEntry":
        from sdtrt.manifest import MANIFEST_NAME

        try:
            created = int((Path(folder) / MANIFEST_NAME).stat().st_mtime)
        except OSError:
            created = 0
        return cls(name, Path(folder), manifest.components["unet"].sha256, manifest.ranges.batch_max, created,
                   manifest.model.default_size)


def scan(models_dir: str | Path) -> tuple[list[ModelEntry], list[str]]:
    """The engine folders directly inside ``models_dir`` (a folder with a manifest.json), sorted by name, and one
    line for each that cannot be served (its manifest unreadable); other folders and files are not models."""
    from sdtrt.manifest import MANIFEST_NAME, Manifest

    root = Path(models_dir)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(f"--models-dir {models_dir} {what}")
    entries, problems = [], []
    for sub in sorted(root.iterdir(), key=lambda p: p.name):
        if sub.name.startswith(".") or not sub.is_dir() or not (sub / MANIFEST_NAME).exists():
            continue
        try:
            entries.append(ModelEntry.of(sub.name, sub, Manifest.load(sub)))
        except SdtrtError as ex:
            problems.append(f"{sub.name}: {ex}")
        except OSError as ex:
            problems.append(f"{sub.name}: {ex.strerror or ex}")
    return entries, problems


class ModelRegistry:
    """The models of one server: ``entries`` by name, ``loaded`` pipelines (least recently used first) and
    ``default``, the model of requests that name none (A1111's ``sd_model_checkpoint``)."""

    def __init__(self, backend: str = "auto", max_loaded: int = 1, models_dir: str | None = None):
        self.backend, self.max_loaded, self.models_dir = backend, max_loaded, models_dir
        self.entries: dict[str, ModelEntry] = {}
        self.loaded: OrderedDict[str, object] = OrderedDict()
        self.default: str | None = None
        self.last = None  # the pipeline used last (what /ready and a response's model name fall back on)
        self.lock = threading.RLock()
        self.loads: dict[str, int] = {}  # name -> times loaded
        self.on_load = lambda name: None  # the server's metrics

    # ---- the list ----------------------------------------------------------------------------------------------

    def add(self, pipe, folder) -> ModelEntry:
        """One folder's pipeline, already loaded (``sdtrt serve DIR``): the only model and the default."""
        entry = ModelEntry.of(pipe.model_name, folder, pipe.manifest)
        with self.lock:
            self.entries[entry.name] = entry
            self.loaded[entry.name] = self.last = pipe
            self.default = self.default or entry.name
        return entry

    def refresh(self) -> list[str]:
        """Scan ``models_dir`` again (A1111's ``refresh-checkpoints``); the lines of the folders skipped. A loaded
        model whose folder changed is loaded again when next used (``acquire`` compares the U-Net's hash)."""
        if self.models_dir is None:
            return []
        entries, problems = scan(self.models_dir)
        with self.lock:
            self.entries = {e.name: e for e in entries}
            if self.default not in self.entries:  # none yet, or its folder is gone: the first by name
                self.default = entries[0].name if entries else None
        return problems

    def list(self) -> list[ModelEntry]:
        with self.lock:
            return list(self.entries.values())

    def find(self, name: str) -> ModelEntry:
        """The entry ``name`` names — its title, name, hash or sha256; else the one entry that matches ignoring case
        — or an ``UnknownModel`` naming the known ones."""
        entries = self.list()
        if isinstance(name, str):
            for e in entries:
                if name in (e.title, e.name, e.hash, e.sha256):
                    return e
            folded = [e for e in entries if name.casefold() in (e.title.casefold(), e.name.casefold())]
            if len(folded) == 1:
                return folded[0]
        known = ", ".join(repr(e.title) for e in entries) or "none"
        raise UnknownModel(f"unknown model {name!r}; this server has: {known}")

    def batch_max(self, key) -> int:
        """The most images one engine call of the model of a batching ``key`` (its first item: the name) takes."""
        entry = self.entries.get(key[0])
        return entry.batch_max if entry is not None else 1

    def current(self) -> ModelEntry:
        with self.lock:
            return self.find(self.default) if self.default is not None else None

    def pipe(self):
        """The default model's pipeline if loaded, else the one used last (None before the first load)."""
        with self.lock:
            return self.loaded.get(self.default) or self.last

    # ---- loading (engine thread) -------------------------------------------------------------------------------

    @contextmanager
    def planning(self, name: str):
        """``name``'s pipeline while it cannot be unloaded (None: not loaded now), to plan a request on it."""
        with self.lock:
            yield self.loaded.get(name)

    def acquire(self, name: str):
        """``name``'s pipeline, loaded if it is not (after unloading the least recently used beyond
        ``max_loaded - 1``; a loaded model whose folder now holds another U-Net is loaded again). On the engine
        thread only: nothing else runs there meanwhile."""
        from sdtrt.runtime import Pipeline

        with self.lock:
            entry = self.entries.get(name)
            pipe = self.loaded.get(name)
            if pipe is not None and (entry is None or entry.sha256 == pipe.manifest.components["unet"].sha256):
                self.loaded.move_to_end(name)
                self.last = pipe
                return pipe
            if entry is None:
                raise UnknownModel(f"model {name!r} is no longer in {self.models_dir}; this server has: "
                                   f"{', '.join(repr(e.title) for e in self.entries.values()) or 'none'}")
            stale = [self.loaded.pop(name)] if pipe is not None else []
            while self.loaded and len(self.loaded) >= self.max_loaded:
                old_name, old = self.loaded.popitem(last=False)
                stale.append(old)
                log.info("sdtrt serve: unloaded model %s", old_name)
            for old in stale:  # under the lock: no request is being planned on it
                old.close()
        pipe = Pipeline.from_dir(entry.folder, self.backend)  # outside the lock: the event loop keeps answering
        pipe.name = entry.name  # its infotext's Model: the name clients select it by
        with self.lock:
            self.loaded[name] = self.last = pipe
            self.loads[name] = self.loads.get(name, 0) + 1
        self.on_load(name)
        log.info("sdtrt serve: loaded model %s", entry.title)
        return pipe

    def close(self) -> None:
        with self.lock:
            pipes = list(self.loaded.values())
            self.loaded.clear()
        for pipe in pipes:
            pipe.close()


def a1111_router(server):
    """A1111's model endpoints: ``refresh-checkpoints``; ``sd-models`` is the A1111 router's (``model_entries``)."""
    from fastapi import APIRouter

    api = APIRouter()

    @api.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        import asyncio

        await asyncio.get_running_loop().run_in_executor(server.executor, server.refresh_models)
        return None

    return api

