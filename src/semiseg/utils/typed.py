"""One validator for every typed file: a file's layout is a dataclass, and
:func:`build_dataclass` checks a parsed mapping against its annotations, key by key.

Run configs and method options (:mod:`semiseg.config`), experiment grids
(:mod:`semiseg.engine.experiment`) and ``metrics.json`` (:mod:`semiseg.engine.metrics_file`)
are read this way. Every error names the dotted key (``train.lr``, ``cases[1].classes[0]``);
:class:`Messages` decides how a file phrases it and which error class it raises:

* configs (the default, :data:`CONFIG`): ``train.lr: expected a number, got 'x'``, unknown keys
  refused with the closest known key as a suggestion;
* data files (``Messages(DataError, source=path, ignore_unknown=True)``):
  ``path: key 'run.method' must be a string, got 3``, unknown keys ignored.

Conversion is lossless only: int -> float, list -> tuple; ``bool`` never passes for a number.
A float may also be written in scientific notation without a dot (``5e-2``), which YAML 1.1
(PyYAML) reads as a string: such a string is accepted where a float is expected.
:func:`to_plain` is the way back (dataclasses, tuples, paths, NumPy values -> YAML/JSON values).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from semiseg.errors import ConfigError, SemisegError


@dataclass(frozen=True)
class Messages:
    """How a typed file reports a problem: the error class, and with ``source`` (a file name)
    the data-file phrasing; ``ignore_unknown`` skips keys the layout does not know."""

    error: type[SemisegError] = ConfigError
    source: str | None = None
    ignore_unknown: bool = False

    def fail(self, key: str, problem: str) -> SemisegError:
        """The error for ``problem`` at dotted ``key``."""
        if self.source is None:
            return self.error(f"{key}: {problem}")
        return self.error(f"{self.source}: key '{key or '<root>'}' {problem}")

    def mismatch(self, key: str, expected: str, value: Any) -> SemisegError:
        """``value`` at ``key`` is not ``expected`` (a noun: "an integer", "a list", ...)."""
        verb = "expected" if self.source is None else "must be"
        return self.fail(key, f"{verb} {expected}, got {value!r}")

    def unknown(self, dotted: str, key: str, known: list[str]) -> SemisegError:
        """Key ``key`` (at ``dotted``) is not one of ``known``; names the closest one."""
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        if self.source is None:
            return self.error(f"unknown config key {dotted!r}{hint}")
        return self.fail(dotted, f"is not a known key{hint}")


CONFIG = Messages()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str, messages: Messages = CONFIG) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where lossless (int->float,
    list->tuple). ``where`` is the dotted key used in error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise messages.mismatch(where, "a mapping", value)
        return build_dataclass(tp, value, where, messages)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise messages.fail(where, f"{value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, where, messages)
    if origin is tuple:
        return _coerce_tuple(value, args, where, messages)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise messages.mismatch(where, "a list", value)
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]", messages) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise messages.mismatch(where, "a mapping", value)
        key_tp, val_tp = args if args else (Any, Any)
        return {coerce(k, key_tp, where, messages): coerce(v, val_tp, f"{where}.{k}", messages)
                for k, v in value.items()}
    return _coerce_scalar(value, tp, where, messages)


def _coerce_union(value: Any, args: tuple[Any, ...], where: str, messages: Messages) -> Any:
    if value is None and type(None) in args:
        return None
    errors: list[SemisegError] = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, where, messages)
        except SemisegError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    raise messages.fail(where, f"invalid value {value!r}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str, messages: Messages) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise messages.mismatch(where, f"a list of {len(args)} values", value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]", messages) for i, v in enumerate(value))
    if len(value) != len(args):
        raise messages.fail(where, f"expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(coerce(v, a, f"{where}[{i}]", messages)
                 for i, (v, a) in enumerate(zip(value, args)))


# The scalar annotations and how their errors name them; bool is an int in Python, so it is
# refused explicitly for the numbers (a YAML/JSON true must not pass for 1).
_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


# A number with an exponent, as YAML 1.2 and Python read it but YAML 1.1 does not: PyYAML's
# float needs a dot and a signed exponent, so ``5e-2`` and ``1.0e3`` arrive as strings.
_SCIENTIFIC = re.compile(r"[-+]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+")


def _coerce_scalar(value: Any, tp: Any, where: str, messages: Messages) -> Any:
    if tp is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value.strip().replace("_", ""))
    if tp in _SCALARS:
        kinds, noun = _SCALARS[tp]
        if (isinstance(value, bool) and tp is not bool) or not isinstance(value, kinds):
            raise messages.mismatch(where, noun, value)
        return float(value) if tp is float else value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise messages.mismatch(where, _type_name(tp), value)
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], where: str = "",
                    messages: Messages = CONFIG) -> Any:
    """Instantiate dataclass ``cls`` from a mapping: unknown keys are refused by name (or
    skipped, see :class:`Messages`), required ones must be there, every value is coerced to its
    annotation; a ``ValueError``/``TypeError`` of the dataclass's own checks names ``where``."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            if messages.ignore_unknown:
                continue
            raise messages.unknown(dotted, str(key), names)
        kwargs[key] = coerce(value, hints[key], dotted, messages)
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise messages.fail(f"{where}.{f.name}" if where else f.name, "is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if messages.source is None:
            raise messages.error(f"{where or cls.__name__}: {exc}") from None
        raise messages.fail(where, str(exc)) from None


def to_plain(value: Any) -> Any:
    """Dataclasses, mappings, tuples, paths and NumPy values to plain YAML/JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
