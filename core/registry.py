"""Name → builder registries: every ablation axis is a string looked up here.

A registry is filled by decorators in the module that defines the builders
(``core.layers.attention`` for attention, ``core.encoders`` for encoders, ...).
Looking a name up imports that module first, so a registry is never seen
half-filled, and an unknown name fails with the closest valid one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it and the fix."""


def closest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a ' — did you mean ...?' hint for ``name`` among ``choices`` (empty if none is close)."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


class Registry:
    """A named table of builders, filled by ``@registry.register(name)``."""

    def __init__(self, kind: str, populated_by: str | None = None) -> None:
        self.kind = kind
        self._populated_by = populated_by
        self._entries: dict[str, Any] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator that files ``obj`` under ``name``; ``meta`` is kept beside it (see ``meta``)."""

        def wrap(obj: Any) -> Any:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = (obj, meta)
            return obj

        return wrap

    def _populate(self) -> None:
        if self._populated_by is not None:
            importlib.import_module(self._populated_by)

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        self._populate()
        return list(self._entries)

    def get(self, name: str) -> Any:
        """The builder registered as ``name``; a ConfigError with the closest name otherwise."""
        self._populate()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{closest(name, list(self._entries))} "
                f"(choices: {', '.join(self._entries)})"
            )
        return self._entries[name][0]

    def meta(self, name: str) -> dict[str, Any]:
        """The keyword metadata given at registration of ``name``."""
        self.get(name)
        return dict(self._entries[name][1])

    def __contains__(self, name: object) -> bool:
        self._populate()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ATTENTION = Registry("attention", "core.layers.attention")
NORM = Registry("norm", "core.layers.norm")
MLP = Registry("mlp", "core.layers.mlp")
ENCODERS = Registry("encoder", "core.encoders")
LOSSES = Registry("loss", "core.losses")
PROTOCOLS = Registry("threshold protocol", "core.metrics")
INTENSITY = Registry("intensity normalisation", "core.data.intensity")
