"""A registry of networks: ``create_model(name, num_classes, **options)``.

Adding a network is one decorator on its factory::

    @register_model("vnet")
    def vnet(num_classes: int, in_channels: int = 1, n_filters: int = 16, ...) -> nn.Module:
        ...

Options are checked against the factory's signature, so a mistyped option is an error that
names it rather than a silent default.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from semiseg.errors import ConfigError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory`` under ``name`` (decorator)."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_factory(name: str) -> ModelFactory:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def check_model_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse an option the network registered as ``name`` does not take (one line, with a hint)."""
    factory = get_model_factory(name)
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        known = [p for p in params if p != "num_classes"]
        for key in options:
            if key not in params:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
                raise ConfigError(f"model {name!r} has no option {key!r}{hint}")


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build the network registered as ``name`` with ``num_classes`` output channels."""
    check_model_options(name, options)
    return get_model_factory(name)(num_classes=num_classes, **options)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
