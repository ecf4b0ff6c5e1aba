"""Keys of what a runtime saves beside an engine folder's graphs (``.sdtrt-ort``: ONNX Runtime's optimized graphs;
``.sdtrt-openvino``: OpenVINO's compiled models): each entry is named ``<graph stem>-<key>``, the key 20 hex digits of
a sha256 over the graph's and its external data's sha256 (the manifest's, verified at every load) and whatever else
the saved form depends on. A new key's entry replaces the other keys' entries of the same graph (a re-export's or an
older runtime's leftovers)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from sdtrt.manifest import Component

KEY_LENGTH = 20


def graph_key(component: Component, **depends_on) -> str:
    """The key of ``component``'s saved form; ``depends_on``: JSON values that change it too (a runtime's version, the
    CPU's flags ...)."""
    ident = {"graph": component.sha256, "external": dict(sorted(component.external_sha256.items())), **depends_on}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


def other_keys(folder: Path, stem: str, key: str) -> Iterator[Path]:
    """The entries in ``folder`` of graph ``stem`` under any key but ``key`` (files ``<stem>-<key>.<ext>`` or folders
    ``<stem>-<key>``); names that are not ``<stem>-<20 hex digits>`` are not entries and are left alone."""
    for path in Path(folder).glob(f"{stem}-*"):
        found = path.name[len(stem) + 1:].split(".", 1)[0]
        if found != key and len(found) == KEY_LENGTH and all(c in "0123456789abcdef" for c in found):
            yield path
