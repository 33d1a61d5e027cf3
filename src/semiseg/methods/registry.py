"""Method names -> method classes, plug-in prefixes -> plug-ins, and building a method by name.

Methods register with :func:`register_method`, plug-ins with :func:`register_plugin`; method
``<prefix>_<host>`` is the plug-in attached to the registered ``host``. The registry holds
what has been imported: :mod:`semiseg.catalog`, the composition root, imports every built-in
method and plug-in, and is where the engine, the tests and the benchmarks look names up.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from semiseg.config import validate_options
from semiseg.errors import ConfigError
from semiseg.methods.base import Method, MethodContext

MethodClass = type[Method]
# (host class, raw method.options, method name) -> the plug-in's parsed options
OptionsParser = Callable[[MethodClass, dict[str, Any], str], Any]
# (host class, context, parsed options) -> the host with the plug-in attached
PluginBuilder = Callable[[MethodClass, MethodContext, Any], Method]


@dataclass(frozen=True)
class Plugin:
    """A registered plug-in: how its ``method.options`` are parsed and how it is built."""

    prefix: str
    parse_options: OptionsParser
    build: PluginBuilder


_METHODS: dict[str, MethodClass] = {}
_PLUGINS: dict[str, Plugin] = {}


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator registering a method under ``name``."""

    def decorator(cls: MethodClass) -> MethodClass:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def register_plugin(prefix: str, parse_options: OptionsParser
                    ) -> Callable[[PluginBuilder], PluginBuilder]:
    """Decorator registering a plug-in builder: method ``<prefix>_<host>`` = the plug-in
    attached to ``host``, built as ``builder(host_cls, context, parse_options(host_cls,
    options, name))``."""

    def decorator(builder: PluginBuilder) -> PluginBuilder:
        _PLUGINS[prefix] = Plugin(prefix, parse_options, builder)
        return builder

    return decorator


def list_methods() -> list[str]:
    """Every registered method and every ``<plug-in>_<host>`` combination."""
    names = list(_METHODS)
    for prefix in _PLUGINS:
        names.extend(f"{prefix}_{host}" for host in _METHODS)
    return sorted(names)


def method_class(name: str) -> MethodClass:
    """The class of registered method ``name``; a :class:`ConfigError` suggests a close name."""
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list_methods(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known: {', '.join(list_methods())}")
    return _METHODS[name]


def resolve_method(name: str) -> tuple[str | None, MethodClass]:
    """Split ``name`` into (plug-in prefix or None, host method class)."""
    for prefix in _PLUGINS:
        host = name[len(prefix) + 1 :]
        if name.startswith(prefix + "_") and host in _METHODS:
            return prefix, _METHODS[host]
    return None, method_class(name)


def is_semi_supervised(name: str) -> bool:
    """Whether method ``name`` (plug-ins included) trains on unlabeled crops."""
    return bool(resolve_method(name)[1].semi_supervised)


def parse_method_options(name: str, options: dict[str, Any]) -> Any:
    """``method.options`` of method ``name`` checked and parsed: the host's ``Options``
    dataclass, or what the plug-in's parser makes of them (errors name the key)."""
    prefix, cls = resolve_method(name)
    if prefix is not None:
        return _PLUGINS[prefix].parse_options(cls, dict(options), name)
    return validate_options(cls.Options, dict(options), "method.options")


def build_method(name: str, context: MethodContext, options: dict[str, Any]) -> Method:
    """Build method ``name`` (a registered method or ``<plugin>_<host>``)."""
    prefix, cls = resolve_method(name)
    parsed = parse_method_options(name, options)
    if prefix is not None:
        return _PLUGINS[prefix].build(cls, context, parsed)
    return cls(context, parsed)
