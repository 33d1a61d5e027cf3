"""Named presets (intensity windows, resampling profiles, missing-class rules): one lookup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from semiseg.errors import ConfigError

T = TypeVar("T")


def lookup(table: Mapping[str, T], key: str | T, kind: type[T], what: str) -> T:
    """``key`` itself when it is a ``kind`` already, else ``table[key]``; an unknown name is a
    :class:`ConfigError` listing the known ones (``what`` names the kind of preset)."""
    if isinstance(key, kind):
        return key
    try:
        return table[key]  # type: ignore[index]
    except KeyError:
        raise ConfigError(f"unknown {what} {key!r}; known: {', '.join(table)}") from None
