"""Checks every config dataclass shares: field types, numeric ranges and output paths.

Owns the checks that do not depend on what a field means: a field annotated `int` holds an integer (not a bool,
not a string), a `float` a finite real number, a `bool` True or False, a `dict` a dict; an integer field is at
least its minimum; an output path is not empty and is not a directory a run must never replace (the working
directory or one of its parents, the home directory, the root). Pure functions: no network, no disk
(`protected_path` with resolve=True follows symlinks, for the run-time check). Each raises one ValueError that
names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Any

# annotation (as written, under `from __future__ import annotations`) -> what the field must hold
_KINDS = {
    "int": "int",
    "int | None": "int",
    "float": "float",
    "bool": "bool",
    "bool | None": "bool",
    "str": "str",
    "str | None": "str",
    "dict[str, Any]": "dict",
}
FLOAT_LIMIT = 1e12  # no float field means anything larger (buffer_size_gb * 1e9 must stay an exact-enough integer)
_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "dict": "a dict"}


def check_field_types(config: Any) -> None:
    """Every field with a plain annotation holds a value of that type (None where the annotation allows it);
    integral and real numbers of other types (numpy's) become int and float."""
    for f in dataclasses.fields(config):
        kind = _KINDS.get(str(f.type))
        value = getattr(config, f.name)
        if kind is None or (value is None and str(f.type).endswith("| None")):
            continue
        setattr(config, f.name, _typed(f.name, value, kind, optional=str(f.type).endswith("| None")))


def _typed(name: str, value: Any, kind: str, *, optional: bool) -> Any:
    if kind == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number.")
        if abs(value) > FLOAT_LIMIT:
            raise ValueError(f"{name}={value!r} must be at most {FLOAT_LIMIT:g}.")
        return float(value)
    if (kind == "bool" and isinstance(value, bool)) or (kind == "str" and isinstance(value, str)):
        return value
    if kind == "str" and (isinstance(value, os.PathLike) or type(value).__name__ == "device"):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)  # a pathlib.Path, a torch.device
    if kind == "dict" and isinstance(value, dict):
        return value
    fix = f"{_WORDS[kind]}{' or None' if optional else ''}"
    raise ValueError(f"{name}={value!r} is a {type(value).__name__}: it must be {fix}.")


def check_minimums(config: Any, minimums: dict[str, int], *, unset: dict[str, tuple[int, str]] | None = None) -> None:
    """Every integer field named in `minimums` is at least its minimum. None, and a field's (value, meaning) in
    `unset` (e.g. -1: read it from the model), leave a field unset."""
    unset = unset or {}
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value is None or (name in unset and value == unset[name][0]) or value >= minimum:
            continue
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if _optional(config, name):
            what += ", or None"
        elif name in unset:
            what += f", or {unset[name][0]} {unset[name][1]}"
        raise ValueError(f"{name}={value} must be {what}.")


def _optional(config: Any, name: str) -> bool:
    return next(str(f.type) for f in dataclasses.fields(config) if f.name == name).endswith("| None")


def check_output_path(path: Any, *, field: str, resolve: bool = False) -> None:
    """An output path must be a non-empty string that names a directory of its own."""
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise ValueError(f"{field}={path!r} is empty: name the cache directory, e.g. 'activations/my-cache'.")
    reason = protected_path(Path(path), resolve=resolve)
    if reason:
        raise ValueError(
            f"{field}={str(path)!r} is {reason}: a run replaces its output directory, so it must be a directory "
            "of its own, e.g. 'activations/my-cache' (refused even with overwrite=True)."
        )


def protected_path(path: Path, *, resolve: bool = False) -> str | None:
    """What `path` is when it must never be an output directory (None when it may be one)."""
    here = Path.cwd()
    if resolve:
        path, here = path.resolve(), here.resolve()
    else:
        path = Path(os.path.abspath(path))
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == here:
        return f"the working directory ({path})"
    if path in here.parents:
        return f"a parent of the working directory ({path})"
    home = Path(os.path.expanduser("~"))
    if path == (home.resolve() if resolve else home):
        return f"the home directory ({path})"
    return None
