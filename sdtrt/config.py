"""Frozen dataclasses <-> JSON, shared by every config (manifest, build, sampler).

Only the shapes our configs use are supported: nested dataclasses, tuples, dicts with str keys,
Optional/union with None, and plain JSON scalars. Tuples become lists in JSON and come back as tuples,
so ``from_dict(type(c), to_dict(c)) == c`` holds for every config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError) as ex:
                errors.append(str(ex))
        raise TypeError(f"{value!r} matches none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        if len(args) != len(value):
            raise TypeError(f"expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise TypeError(f"expected {tp.__name__}, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{value!r} is not one of {typing.get_args(tp)}")
        return value
    raise TypeError(f"unsupported type {tp!r}")


def from_dict(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a JSON object; unknown keys are ignored, missing ones take defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            try:
                kwargs[f.name] = _convert(hints[f.name], data[f.name])
            except (TypeError, ValueError) as ex:
                raise ValueError(f"{cls.__name__}.{f.name}: {ex}") from None
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}: missing field {f.name!r}")
    return cls(**kwargs)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a sibling temp file, then rename, so a reader never sees half a file."""
    from sdtrt.fsutil import write_atomic

    write_atomic(Path(path), to_json(obj) if not isinstance(obj, str) else obj)
