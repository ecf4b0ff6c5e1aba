"""Keys of the runtimes' saved forms (runtime/cache_keys.py): what changes a key, and which leftovers a new key's
entry replaces — never another graph's (``text_encoder`` beside ``text_encoder_2``) nor a file that is not an entry."""

import dataclasses

from sdtrt.manifest import Manifest
from sdtrt.runtime.cache_keys import KEY_LENGTH, graph_key, other_keys


def test_the_key_follows_the_graph_its_weights_and_what_else_it_depends_on(tiny_fp32):
    component = Manifest.load(tiny_fp32[0]).components["unet"]
    key = graph_key(component, runtime="1.0")
    assert len(key) == KEY_LENGTH and key == graph_key(component, runtime="1.0")
    weights = dataclasses.replace(component, external_sha256={k: "0" * 64 for k in component.external_sha256})
    assert len({key, graph_key(dataclasses.replace(component, sha256="0" * 64), runtime="1.0"),
                graph_key(weights, runtime="1.0"), graph_key(component, runtime="1.1"), graph_key(component)}) == 5


def test_only_the_same_graphs_entries_under_other_keys_are_leftovers(tmp_path):
    key, old = "a" * KEY_LENGTH, "b" * KEY_LENGTH
    names = [f"text_encoder-{key}.onnx", f"text_encoder-{old}.onnx", f"text_encoder-{old}.data", f"text_encoder-{old}",
             f"text_encoder_2-{old}.onnx", "text_encoder-notes.txt", f"text_encoder-{old[:-1]}.json"]
    for name in names:
        (tmp_path / name).touch()
    found = sorted(p.name for p in other_keys(tmp_path, "text_encoder", key))
    assert found == [f"text_encoder-{old}", f"text_encoder-{old}.data", f"text_encoder-{old}.onnx"]
