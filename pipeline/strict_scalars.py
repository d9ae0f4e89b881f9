"""Strict scalars in every config: no booleans for numbers, no strings for numbers.

pydantic's lax mode turns ``true`` into 1 and ``"4"`` into 4, so ``model.n_bits: yes`` (YAML 1.1
reads ``yes`` as true) silently trained a 1-bit model. pydantic's own strict mode would also refuse
the lists a YAML file gives for tuples and the strings it gives for paths and enums, so this check
is narrower: it walks the raw data alongside the config's type annotations (models, flows'
dataclasses, containers, unions, ``Annotated``) and reports every value that is a bool or a str
where the annotation admits a number but not that type. It reads annotations only, so every field
added to any config inherits it; ``config_loading.validate`` runs it before pydantic.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from os import PathLike
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

_UNION = (typing.Union, types.UnionType)


def scalar_problems(annotation: Any, data: Any, loc: tuple = ()) -> list[tuple[str, str]]:
    """``[(dotted key, message)]`` for every bool or str given where only a number fits."""
    problems: list[tuple[str, str]] = []
    _walk(annotation, data, loc, problems)
    return problems


def _walk(annotation: Any, value: Any, loc: tuple, problems: list) -> None:
    annotation = _unwrap(annotation)
    if isinstance(value, bool | str):
        admits = _admits(annotation)
        wants_number = admits & {"int", "float"}
        kind = "integer" if wants_number == {"int"} else "number"
        if wants_number and isinstance(value, bool) and "bool" not in admits and "any" not in admits:
            problems.append(
                (
                    _key(loc),
                    f"input should be a valid {kind}, not the boolean {value!r} "
                    "(YAML reads yes/no/on/off/true/false as booleans)",
                )
            )
        elif wants_number and isinstance(value, str) and not admits & {"str", "any"}:
            problems.append((_key(loc), f"input should be a valid {kind}, not the string {value!r}"))
        return
    for fields in _field_types(annotation, value):
        for name, sub in fields.items():
            if isinstance(value, dict) and name in value:
                _walk(sub, value[name], (*loc, name), problems)
        return
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if origin in _UNION:
        # The member the value is meant for: a model or dataclass for a dict (of several, e.g. one
        # class per strategy, those whose fields hold every key; only what all of them refuse is
        # reported), a container for a list.
        members = [_unwrap(m) for m in args]
        records = [m for m in members if _is_model(m) or dataclasses.is_dataclass(m)]
        if isinstance(value, dict) and records:
            fitting = [m for m in records if set(value) <= set(_field_types(m, value)[0])] or records
            found = [scalar_problems(m, value, loc) for m in fitting]
            problems.extend(p for p in found[0] if all(p in other for other in found[1:]))
            return
        for member in members:
            if isinstance(value, dict) and typing.get_origin(member) in (dict, typing.Mapping):
                _walk(member, value, loc, problems)
                return
            if isinstance(value, list | tuple) and typing.get_origin(member) in (list, tuple):
                _walk(member, value, loc, problems)
                return
    elif origin in (dict, typing.Mapping) and isinstance(value, dict) and args:
        for k, v in value.items():
            _walk(args[-1], v, (*loc, k), problems)
    elif origin in (list, tuple) and isinstance(value, list | tuple) and args:
        for i, v in enumerate(value):
            item = args[0] if origin is list or len(args) == 1 or len(args) <= i else args[i]
            _walk(item, v, (*loc, i), problems)


def _field_types(annotation: Any, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, dict):
        return []
    if _is_model(annotation):
        return [{name: f.annotation for name, f in annotation.model_fields.items()}]
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [_dataclass_hints(annotation)]
    return []


@functools.cache
def _dataclass_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _admits(annotation: Any) -> frozenset[str]:
    """Which scalar kinds ``annotation`` accepts: int, float, bool, str (str also for paths, enums
    and string literals) or any."""
    annotation = _unwrap(annotation)
    if annotation is Any or annotation is object:
        return frozenset({"any"})
    origin = typing.get_origin(annotation)
    if origin in _UNION:
        return frozenset().union(*(_admits(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        kinds = set()
        for v in typing.get_args(annotation):
            kinds.add("bool" if isinstance(v, bool) else "str" if isinstance(v, str) else "int")
        return frozenset(kinds)
    if not isinstance(annotation, type):
        return frozenset()
    if issubclass(annotation, bool):
        return frozenset({"bool"})
    if issubclass(annotation, enum.Enum):
        return frozenset({"str"})
    if issubclass(annotation, int):
        return frozenset({"int"})
    if issubclass(annotation, float):
        return frozenset({"float"})
    if issubclass(annotation, str | PurePath | PathLike):
        return frozenset({"str"})
    return frozenset()


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, typing.TypeAliasType if hasattr(typing, "TypeAliasType") else ()):
        return _unwrap(annotation.__value__)
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _key(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
