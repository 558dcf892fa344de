"""One small registry: names listed with their objects, or with "module:attribute" paths.

A technique joins by being listed in its package's table; a path is imported on first use,
so listing an implementation that lives in another package (the ring attention in
``sciscale_jax.parallel``) creates no import at load time and no import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class Registry:
    """``registry[name]`` -> the listed object; an unknown name gets a ValueError listing the known."""

    def __init__(self, kind: str, entries: dict[str, Any], convert: Callable[[Any], Any] | None = None):
        self.kind, self._entries, self._convert = kind, dict(entries), convert

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __getitem__(self, name: str):
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str) and ":" in entry:
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            if self._convert is not None:
                entry = self._convert(entry)
            self._entries[name] = entry
        return entry

    def register(self, name: str, entry: Any) -> None:
        """Add (or replace) an entry at run time, e.g. a user's own implementation."""
        self._entries[name] = self._convert(entry) if self._convert is not None and not isinstance(entry, str) else entry
