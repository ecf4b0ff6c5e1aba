"""ONNX Runtime's optimized graphs saved in the engine folder (runtime/ort_cache.py): loaded the second time, the
same outputs; a LoRA's weights still reach the graph; another key (another CPU, ONNX Runtime or rewrite) or a damaged
entry makes a new one; a folder that cannot take it loads without it."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdtrt.manifest import Manifest, owned_entries
from sdtrt.runtime import ort_cache
from sdtrt.runtime.backends import OrtEngine, load_engines
from sdtrt.runtime.device_loop import residual_shapes
from sdtrt.runtime.tensorrt.verify import random_feeds
from tests.conftest import copy_export


@pytest.fixture
def fp32_folder(tiny_fp32, tmp_path):
    """A copy of the tiny export as it is before its first load: no ``.sdtrt-ort``."""
    return copy_export(tiny_fp32[0], tmp_path / "fp32", caches=False)


def _unet(folder, **kw):
    manifest = Manifest.load(folder)
    c = manifest.components["unet"]
    return OrtEngine(folder / c.file, c, **kw), manifest


def _feeds(manifest):
    c = manifest.components["unet"]
    shapes = {"latents": (1, 4, 8, 12), "timestep": (1,), "encoder_hidden_states": (2, 77, 32),
              "guidance_scale": (1,)} | residual_shapes(c, 2, 8, 12)
    return random_feeds(c, shapes, {"timestep": 500.0, "guidance_scale": 7.5}, manifest.model.vocab_size, 0)


def _exported(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_the_saved_graphs_are_made_once_and_compute_what_the_exported_ones_do(fp32_folder):
    """The first load writes every graph's entry before it loads any graph (the saving session is dropped: it holds
    more than a session over the saved graph) and runs the saved graphs; the second reads them as they are."""
    exported = _exported(fp32_folder)
    manifest = Manifest.load(fp32_folder)
    assert not (fp32_folder / ort_cache.CACHE_DIR).exists()
    first = load_engines(fp32_folder, manifest, "onnxruntime-cpu")
    cache = fp32_folder / ort_cache.CACHE_DIR
    entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(n.rsplit("-", 1)[0] for n in entries if n.endswith(".json")) == sorted(first)  # one per graph
    second = load_engines(fp32_folder, manifest, "onnxruntime-cpu")
    assert all(e.cached for e in first.values()) and all(e.cached for e in second.values())
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries  # read, not written again
    plain, _ = _unet(fp32_folder)  # the graph as exported, fused in memory, no cache
    assert second["unet"].fused_attention == plain.fused_attention > 0 and not plain.cached
    feeds = _feeds(manifest)
    np.testing.assert_array_equal(second["unet"].run(feeds)["noise_pred"], plain.run(feeds)["noise_pred"])
    np.testing.assert_array_equal(first["unet"].run(feeds)["noise_pred"], plain.run(feeds)["noise_pred"])
    assert _exported(fp32_folder) == exported  # the files TensorRT reads are never written
    assert ort_cache.CACHE_DIR in owned_entries(fp32_folder)  # `export --force` replaces it with the rest


def test_a_graph_without_large_weights_is_cached_too(fp32_folder):
    """The sampler update (the device loop's; its initializers all under the external-data threshold): ONNX Runtime
    writes no data file for it, and the entry was refused as incomplete at every load."""
    manifest = Manifest.load(fp32_folder)
    engines = load_engines(fp32_folder, manifest, "onnxruntime-cpu", device_loop=True)
    update = engines["unet"].device_loop.update
    assert update.cached and update.saved_now is False  # written by load_engines' first pass, then read
    entry = ort_cache.Entry(fp32_folder, manifest.components["sampler_update"], True)
    record = entry.read()
    assert record is not None and record["sizes"][entry.data.name] == 0


def test_every_entry_is_written_before_any_graph_is_loaded_and_a_failed_save_is_not_retried(fp32_folder, monkeypatch):
    """ONNX Runtime's saving session holds far more than a session over the saved graph (SDXL: 19.6 against 8.8 GB):
    saved beside already loaded graphs, SDXL's first load ran a 24 GB machine out of memory."""
    from sdtrt.runtime import backends

    events, save, session = [], backends.save_optimized, backends.OrtEngine._session

    def saving(entry, *args, **kw):
        events.append(("save", entry.stem))
        return save(entry, *args, **kw)

    def opening(path, *args, **kw):
        if kw.get("save") is None:
            events.append(("open", Path(path).name))
        return session(path, *args, **kw)

    monkeypatch.setattr(backends, "save_optimized", saving)
    monkeypatch.setattr(backends.OrtEngine, "_session", staticmethod(opening))
    manifest = Manifest.load(fp32_folder)
    engines = load_engines(fp32_folder, manifest, "onnxruntime-cpu")
    kinds = [kind for kind, _ in events]
    assert kinds == ["save"] * len(engines) + ["open"] * len(engines) and all(e.cached for e in engines.values())

    events.clear()  # a save that fails is tried once, not again beside the loaded graphs
    shutil.rmtree(fp32_folder / ort_cache.CACHE_DIR)
    monkeypatch.setattr(backends, "save_optimized", lambda entry, *a, **kw: events.append(("save", entry.stem)))
    engines = load_engines(fp32_folder, manifest, "onnxruntime-cpu")
    assert [kind for kind, _ in events] == ["save"] * len(engines) + ["open"] * len(engines)
    assert not any(e.cached for e in engines.values())


def test_a_loras_weights_reach_a_graph_whose_layout_came_from_the_cache(fp32_folder):
    """The saved graph lays convolution weights out anew under other names: a LoRA's must go to the exported graph
    (a cached session would silently keep the base weights)."""
    _unet(fp32_folder, cache=True)
    cached, manifest = _unet(fp32_folder, cache=True)
    plain, _ = _unet(fp32_folder)
    assert cached.cached
    feeds = _feeds(manifest)
    base = plain.run(feeds)["noise_pred"]
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(fp32_folder / manifest.components["unet"].file))
    weight = next(t for t in graph.graph.initializer if t.name.endswith("conv_in.weight"))
    changed = {weight.name: numpy_helper.to_array(weight) * 1.5}
    for engine in (cached, plain):
        engine.override(changed)
    got, want = cached.run(feeds)["noise_pred"], plain.run(feeds)["noise_pred"]
    assert np.abs(want - base).max() > 1e-3 and not cached.cached
    np.testing.assert_array_equal(got, want)
    cached.override({})  # the LoRA removed: the graph's own weights, from the cache again
    np.testing.assert_array_equal(cached.run(feeds)["noise_pred"], base)


def test_another_key_or_a_damaged_entry_makes_a_new_one(fp32_folder, monkeypatch):
    _unet(fp32_folder, cache=True)
    cache = fp32_folder / ort_cache.CACHE_DIR
    old = {p.name for p in cache.glob("unet-*")}
    monkeypatch.setattr(ort_cache, "cpu_signature", lambda: "another cpu")
    engine, _ = _unet(fp32_folder, cache=True)
    new = {p.name for p in cache.glob("unet-*")}
    assert engine.saved_now and engine.cached and len(new) == 3 and not new & old  # the other key's entry is gone
    data = next(cache.glob("unet-*.data"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    engine, manifest = _unet(fp32_folder, cache=True)
    assert engine.saved_now and engine.cached  # not a whole entry: made again
    again = _unet(fp32_folder, cache=True)[0]
    assert again.cached and not again.saved_now
    graph = next(cache.glob("unet-*.onnx"))
    graph.write_bytes(b"\0" * graph.stat().st_size)  # the recorded size, garbage inside
    engine, _ = _unet(fp32_folder, cache=True)
    assert not engine.cached and engine.run(_feeds(manifest))  # the exported graph instead; the entry is removed
    again = _unet(fp32_folder, cache=True)[0]
    assert again.cached and again.saved_now


def test_what_a_killed_saver_left_is_removed_and_a_running_ones_kept(fp32_folder):
    cache = fp32_folder / ort_cache.CACHE_DIR
    cache.mkdir()
    dead, running = cache / "tmp-4194305-0badf00d", cache / f"tmp-{os.getpid()}-0badf00d"  # above Linux's pid_max
    for folder in (dead, running):
        folder.mkdir()
        (folder / "unet-0.data").write_bytes(b"\0" * 1000)
    assert _unet(fp32_folder, cache=True)[0].saved_now
    assert not dead.exists() and running.is_dir()


def test_a_folder_without_room_loads_without_the_cache(fp32_folder, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ort_cache.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    engine, manifest = _unet(fp32_folder, cache=True)
    assert not engine.cached and not engine.saved_now and engine.fused_attention > 0
    assert not list((fp32_folder / ort_cache.CACHE_DIR).iterdir())
    assert engine.run(_feeds(manifest))["noise_pred"].shape == (1, 4, 8, 12)


@pytest.mark.parametrize("value", ["unfused", "fused"])
def test_the_attention_switch_keys_the_cache_and_a_wrong_value_is_refused(fp32_folder, monkeypatch, value):
    from sdtrt.runtime.backends import BackendError

    monkeypatch.setenv("SDTRT_ORT_ATTENTION", value)
    _unet(fp32_folder, cache=True)
    engine, _ = _unet(fp32_folder, cache=True)
    assert engine.cached and (engine.fused_attention > 0) == (value == "fused")
    monkeypatch.setenv("SDTRT_ORT_ATTENTION", "flash")
    with pytest.raises(BackendError, match="SDTRT_ORT_ATTENTION must be fused or unfused, not 'flash'"):
        _unet(fp32_folder, cache=True)
