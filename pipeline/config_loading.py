"""One way in for every config: a YAML file, then dotted ``a.b=c`` overrides, then pydantic validation.

Experiments (``pipeline.config.TrainConfig``), searches (``tune.spec.SearchSpec``) and comparisons
(``pipeline.compare.Comparison``) are all read by ``load_file``; a typed config is changed only by
``revise`` (dump, set dotted keys to typed values, validate again), so every value a run sees has been
validated. A bad key or value is a ``ConfigError`` (a ``ValueError``) naming the file and the dotted
key, e.g. ``configs/tiny.yaml: optim.lr: must be a finite number, got inf``.

The models are pydantic v2 with ``ConfigModel``'s settings: unknown keys are errors, floats must be
finite, and a loaded config is immutable. flows' stdlib dataclasses (``FlowConfig``) are validated
by pydantic as fields of these models, with the same settings; their own ``__post_init__`` checks
raise ``ValueError("field: ...")``, reported here under ``model.split.field``.

YAML: PyYAML reads YAML 1.1, where ``3e-4`` (no dot) is a string; the reader makes it the float
everyone means (YAML 1.2's rule), in files and in overrides alike.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict

M = TypeVar("M", bound=BaseModel)
Overrides = Sequence[str] | Mapping[str, Any]  # "a.b=c" texts or {dotted key: typed value}


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, floats are finite, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """Bad config keys or values: ``problems`` is ``[(dotted key, message)]``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems, self.source = problems, source
        text = "; ".join(f"{key}: {message}" if key else message for key, message in problems)
        super().__init__(f"{source}: {text}" if source else text)


# ----------------------------------------------------------------------------------------- YAML
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


@functools.cache
def _yaml_loader() -> type:
    import yaml  # here, not at the top: the step math imports pipeline.config on torch-only machines

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


def parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML ({e})") from e


def read_yaml_file(path: str | os.PathLike) -> Any:
    """A config file's YAML; ValueError naming the file if it is missing or not valid YAML."""
    p = Path(path)
    if not p.is_file():
        where = "" if p.is_absolute() else f" (relative to {os.getcwd()})"
        raise ValueError(f"no such file {str(p)!r}{where}")
    try:
        return parse_yaml(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e


# ------------------------------------------------------------------------------------ overrides
def _is_dotted(key: Any) -> bool:
    return isinstance(key, str) and all(part.isidentifier() for part in key.split("."))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)`` (the value is YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _is_dotted(key):
        raise ValueError(f"bad override {text!r}: expected section.key=value, e.g. optim.lr=3e-4")
    try:
        return key, parse_yaml(raw) if raw.strip() else ""
    except ValueError as e:
        raise ValueError(f"bad override {text!r}: value is {e}") from e


def as_overrides(overrides: Overrides) -> dict[str, Any]:
    """``a.b=c`` texts (the command line) or a mapping of dotted keys (config files) -> one mapping."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


def with_overrides(
    data: Mapping[str, Any], overrides: Overrides, *, flat_sections: Sequence[str] = ()
) -> dict[str, Any]:
    """A deep copy of ``data`` with each dotted key set; unknown keys are left to validation.

    ``flat_sections`` hold dotted keys themselves (a search's ``overrides`` and ``space``):
    ``space.model.num_steps`` sets the key ``model.num_steps`` of the section ``space``.
    """
    out = copy.deepcopy(dict(data))
    for key, value in as_overrides(overrides).items():
        if not _is_dotted(key):
            raise ValueError(f"{key!r}: expected a dotted config key such as optim.lr")
        head, _, rest = key.partition(".")
        parts = [head, rest] if head in flat_sections and rest else key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"{key}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------- validation
def validate(model: type[M], data: Any, *, source: str = "") -> M:
    """``model`` from plain data; ConfigError naming every bad dotted key (and ``source``).

    Scalars are strict first (pipeline/strict_scalars.py): no bool or str where a number goes."""
    from pipeline.strict_scalars import scalar_problems

    if strict := scalar_problems(model, data):
        raise ConfigError(strict, source)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        problems = [_problem(model, error) for error in e.errors()]
        # A bad item also fails its container's length check: report the item only.
        problems = [(k, m) for k, m in problems if not any(o.startswith(f"{k}[") for o, _ in problems)]
        raise ConfigError(problems, source) from None


def load_file(
    model: type[M], path: str | os.PathLike, overrides: Overrides = (), *, flat_sections: Sequence[str] = ()
) -> M:
    """The one loader: YAML file + overrides -> validated ``model``."""
    data = read_yaml_file(path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError([("", f"expected a mapping of sections, got {type(data).__name__}")], str(path))
    try:
        data = with_overrides(data or {}, overrides, flat_sections=flat_sections)
    except ValueError as e:
        raise ConfigError([("", str(e))], str(path)) from None
    return validate(model, data, source=str(path))


def revise(config: M, overrides: Overrides) -> M:
    """The one override helper for typed configs: a copy of ``config`` with dotted keys set to new
    (typed) values, validated again as if it had been loaded that way."""
    return validate(type(config), with_overrides(config.model_dump(), overrides))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params, a trial's default values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------- error messages
def _problem(model: type, error: Any) -> tuple[str, str]:
    """One pydantic error -> (dotted key, message in this project's words)."""
    raw_loc, kind, value = list(error["loc"]), error["type"], error.get("input")
    loc, node = _walk(model, raw_loc)
    if kind in ("value_error", "assertion_error"):
        message = str(error["ctx"]["error"])
        head, sep, rest = message.partition(": ")
        if sep and head.split(".")[0] in _names_of(node):  # a dataclass's __post_init__ names its field
            loc, message = [*loc, *head.split(".")], rest
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _names_of(_walk(model, raw_loc[:-1])[1])
        message = "unknown field" + (f" (known: {', '.join(known)})" if known else "")
    elif kind in ("missing", "missing_keyword_argument", "missing_argument"):
        message = "required"
    elif kind == "literal_error":
        message = f"unknown {value!r}; choose one of {error['ctx']['expected']}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):  # a discriminated union (model.split)
        field = error["ctx"]["discriminator"].strip("'")
        tag = error["ctx"].get("tag", "nothing")
        loc, message = [*loc, field], f"unknown {tag!r}; choose one of {error['ctx'].get('expected_tags')}"
    elif kind == "finite_number":
        message = f"must be a finite number, got {value!r}"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]}"
        message += "" if ", got " in message else f", got {value!r}"
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return key, message


def _unwrap(node: Any) -> Any:
    """Annotated[T, ...] -> T, T | None -> T; a union of several types stays a union."""
    while True:
        if typing.get_origin(node) is typing.Annotated:
            node = typing.get_args(node)[0]
        elif typing.get_origin(node) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(node) if a is not type(None)]
            if len(members) > 1:
                return node
            node = members[0]
        else:
            return node


def _fields_of(node: Any) -> dict[str, Any] | None:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {name: f.annotation for name, f in node.model_fields.items()}
    if dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(node)
        return {f.name: hints[f.name] for f in dataclasses.fields(node)}
    return None


def _tagged_member(node: Any, tag: Any) -> Any:
    """The member of a discriminated union whose Literal field holds ``tag`` (None if none does)."""
    for member in typing.get_args(node):
        for annotation in (_fields_of(member) or {}).values():
            if typing.get_origin(annotation) is typing.Literal and tag in typing.get_args(annotation):
                return member
    return None


def _walk(model: Any, loc: list[Any]) -> tuple[list[Any], Any]:
    """Follow ``loc`` through the types inside ``model``: (loc without the tags pydantic puts in a
    discriminated union's locations, the type at its end or None)."""
    node, clean = model, []
    for part in loc:
        node = _unwrap(node)
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            member = _tagged_member(node, part)
            if member is not None:
                node = member
                continue
            node = _unwrap(typing.get_args(node)[0])
        clean.append(part)
        fields = _fields_of(node)
        if fields is not None:
            node = fields.get(part) if isinstance(part, str) else None
        elif typing.get_origin(node) in (dict, tuple, list) and node is not None:
            args = [a for a in typing.get_args(node) if a is not Ellipsis]
            node = args[-1] if typing.get_origin(node) is dict or len(args) == 1 else args[part]
        else:
            node = None
    return clean, node


def _names_of(node: Any) -> list[str]:
    """The field names of a model or dataclass type (of a union: its first member's); else none."""
    node = _unwrap(node)
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        node = _unwrap(typing.get_args(node)[0])
    return list(_fields_of(node) or {})
