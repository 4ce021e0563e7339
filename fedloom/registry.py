"""One registry shape for every named component: a factory and a one-line description.

``Registry.build(name, options)`` checks the options against the factory's
signature (``check_options``) and calls it; a name written ``package.module:attr``
is a user's factory, imported from the user's own config (never from the wire).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable


def check_options(kind: str, name: str, parameters: dict[str, inspect.Parameter], given: dict[str, Any]) -> None:
    """Refuse options that ``kind`` ``name`` does not take, or required ones left out, naming what it takes."""
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = {k: p for k, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    stray = set() if takes_any else set(given) - set(named)
    missing = {k for k, p in named.items() if p.default is p.empty} - set(given)
    if stray or missing:
        problem = f"takes no option {', '.join(sorted(stray))}" if stray else f"needs option {', '.join(sorted(missing))}"
        raise ValueError(f"{kind} {name!r} {problem} (its options: {', '.join(sorted(named)) or 'none'})")


def import_object(kind: str, path: str) -> Any:
    """The object a user names as ``package.module:attr``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{kind} {path!r}: a user {kind} is written 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} {path!r} could not be imported: {err}") from err


@dataclass(frozen=True)
class Entry:
    factory: Callable[..., Any]
    description: str


@dataclass
class Registry:
    kind: str  # what the entries are, for messages: "transform", "aggregator", ...
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, name: str, description: str):
        """Decorator registering ``factory`` under ``name``."""

        def register(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.entries[name] = Entry(factory, description)
            return factory

        return register

    def factory(self, name: str) -> Callable[..., Any]:
        if name in self.entries:
            return self.entries[name].factory
        if ":" in name:
            return import_object(self.kind, name)
        raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.entries))}, "
                         f"or a user {self.kind} as 'package.module:name'")

    def check(self, name: str, options: dict[str, Any]) -> None:
        check_options(self.kind, name, dict(inspect.signature(self.factory(name)).parameters), options)

    def build(self, name: str, options: dict[str, Any]) -> Any:
        self.check(name, options)
        return self.factory(name)(**options)

    def describe(self) -> dict[str, str]:
        return {name: entry.description for name, entry in self.entries.items()}
