"""The strict reader of dymoe's JSON files: plain dataclasses built field by field, every
unknown or missing field and every wrong type an error naming the dotted field. A file written
by another version therefore never half-works. Used for manifest.json and calibration.json.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dymoe.bundle.errors import BundleError

JSON_SCALARS = (str, int, float, bool, type(None))


def from_dict(cls: type, data: Any, where: str = "", label: str = "manifest.json") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown and missing fields by name."""
    if not isinstance(data, dict):
        raise _bad(label, where or "(top level)", "an object", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BundleError(
            f"{label}: unknown field '{_join(where, unknown[0])}'",
            "it was written by a newer or different dymoe; re-export it with this version",
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise BundleError(f"{label}: missing field '{_join(where, name)}'",
                              "it is incomplete or from an older dymoe; re-export it")
        kwargs[name] = _convert(hints[name], data[name], _join(where, name), label)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, label: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, label)
    if tp is Any:  # a free-form JSON value (an architecture's own settings)
        _check_json(value, where, label)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, label)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(label, where, "a list", value)
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]", label) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(label, where, "an object", value)
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{where}.{k}", label) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(label, where, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(label, where, "an integer", value)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _bad(label, where, f"a {tp.__name__}", value)
        return value
    raise TypeError(f"unsupported field type {tp!r} at {where}")


def _check_json(value: Any, where: str, label: str, depth: int = 0) -> None:
    if depth > 16:
        raise _bad(label, where, "at most 16 levels deep", value)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, f"{where}.{k}", label, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", label, depth + 1)
    elif not isinstance(value, JSON_SCALARS):
        raise _bad(label, where, "a JSON value", value)


def _bad(label: str, where: str, what: str, value: Any) -> BundleError:
    return BundleError(f"{label}: field '{where}' must be {what}, not {type(value).__name__}",
                       "it is corrupt or from another dymoe version; re-export it")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
