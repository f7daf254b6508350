"""YAML configs with ``_base_`` inheritance, ``key.sub=value`` CLI overrides and a dataclass schema.

A config file is a mapping; ``_base_: other.yaml`` (path relative to the file, or a list of them)
is loaded first and deep-merged under it. Overrides are parsed as YAML values (``optim.blr=1e-4``,
``data.scale=[0.2,1.0]``). The merged mapping is checked against nested dataclasses: unknown keys
and wrong types are errors that name the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true / false are booleans. YAML 1.1 also reads on / off / yes /
    no as booleans, which turns ``train.amp=off`` into ``False`` for a key whose values are words."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def load_yaml(text: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that cannot be used (says what and what is allowed)."""


def deep_merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load_yaml_with_bases(path: Union[str, os.PathLike], _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    path = os.path.abspath(os.fspath(path))
    seen = list(_seen or [])
    if path in seen:
        raise ConfigError(f"config {path}: circular _base_ chain: {' -> '.join(seen + [path])}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a folder; expected a YAML file (a run folder's config is "
                          f"{os.path.join(path, 'config.yaml')})")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    merged: Dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else list(bases):
        merged = deep_merge(merged, load_yaml_with_bases(os.path.join(os.path.dirname(path), b), seen + [path]))
    return deep_merge(merged, data)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested assignment with YAML-typed values."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip() or any(not p for p in key.strip().split(".")):
            raise ConfigError(f"override {item!r} has no key (or an empty part in it); expected key.sub=value")
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):   # YAML 1.1 reads "4e-3" as a string; a user means the number
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, Mapping) else {}
            node = node[p]
        node[parts[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple, List, Sequence):
        inner = args[0] if args else Any
        if isinstance(value, str) and inner is str:
            value = [value]              # key=name for a list of names: the list of that one name
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got nothing ({where}= with no value, or null)")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def join_key(where: str, name: str) -> str:
    """The dotted key of ``name`` inside section ``where`` ("" at the top level)."""
    return f"{where}.{name}" if where else name


def from_dict(cls: Type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and mistyped values; every
    section is validated, given or not (``where``: the section's dotted key, "" at the top)."""
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        import difflib

        close = [join_key(where, m) for u in unknown for m in difflib.get_close_matches(u, names, n=1)]
        raise ConfigError(f"unknown key(s) {', '.join(join_key(where, u) for u in unknown)}"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; allowed in {label}: {', '.join(names)}")
    data = dict(data)
    for f in dataclasses.fields(cls):
        # a nested section keeps the parent's defaults for it (e.g. a job's own TrainConfig values),
        # and an absent one is built (and validated) from them
        if dataclasses.is_dataclass(hints[f.name]) and f.default_factory is not dataclasses.MISSING:
            if f.name not in data:
                data[f.name] = dataclasses.asdict(f.default_factory())
            elif isinstance(data[f.name], Mapping):
                data[f.name] = deep_merge(dataclasses.asdict(f.default_factory()), data[f.name])
    kwargs = {k: _coerce(v, hints[k], join_key(where, k)) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{label}: {e}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def load_config(cls: Type[T], path: Optional[Union[str, os.PathLike]], overrides: Sequence[str] = ()) -> T:
    """File (with bases) + overrides -> validated dataclass ``cls``."""
    data = load_yaml_with_bases(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(obj: Any, path: Union[str, os.PathLike], header: Sequence[str] = ()) -> None:
    """Write the resolved config atomically (the run's record of what it ran); ``header`` lines
    become YAML comments, so the file still loads as a config (``--config run/config.yaml``)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"# {line}\n" for line in header)
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
    os.replace(tmp, path)
