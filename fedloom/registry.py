"""One registry shape for every named component: a factory and a one-line description.

``Registry.build(name, options)`` checks the options against the factory's
signature (``check_options``) and calls it; a name written ``package.module:attr``
is a user's factory, imported from the user's own config (never from the wire).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from typing import Any, Callable, NamedTuple

from pydantic import TypeAdapter, ValidationError


class OptionError(ValueError):
    """A part that cannot be built as configured; the message names it and the option."""


def check_options(kind: str, name: str, parameters: dict[str, inspect.Parameter], given: dict[str, Any]) -> None:
    """Refuse options that ``kind`` ``name`` does not take, or required ones left out, naming what it takes."""
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = {k: p for k, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    stray = set() if takes_any else set(given) - set(named)
    missing = {k for k, p in named.items() if p.default is p.empty} - set(given)
    if stray or missing:
        problem = f"takes no option {', '.join(sorted(stray))}" if stray else f"needs option {', '.join(sorted(missing))}"
        raise OptionError(f"{kind} {name!r} {problem} (its options: {', '.join(sorted(named)) or 'none'})")


def check_option_types(kind: str, name: str, factory: Callable[..., Any], given: dict[str, Any]) -> None:
    """Refuse an option whose value does not fit the type the factory annotates it with, so a mistake
    fails before the run with the option's name instead of deep inside torch."""
    try:
        hints = typing.get_type_hints(factory)
    except (NameError, TypeError):  # annotations that cannot be resolved: nothing to check against
        return
    for key, value in given.items():
        if key not in hints:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            raise OptionError(f"{kind} {name!r}: option {key} = {value!r}: {err.errors()[0]['msg']} "
                              f"(expected {inspect.formatannotation(hints[key])})") from None


def import_object(kind: str, path: str) -> Any:
    """The object a user names as ``package.module:attr``, found in the current directory too (the
    ``fedloom`` command's own path does not hold it)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise OptionError(f"{kind} {path!r}: a user {kind} is written 'package.module:name'")
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.append(here)  # after everything installed: a local file never shadows a library
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # the user's module may fail in any way while importing
        raise OptionError(f"{kind} {path!r} could not be imported: {type(err).__name__}: {err}") from None
    finally:
        if added:
            sys.path.remove(here)


class Entry(NamedTuple):
    """A registered part: its factory and the one-line description ``fedloom list`` shows."""

    factory: Callable[..., Any]
    description: str


class Registry(dict):
    """name -> Entry(factory, description). ``fixed`` names the factory parameters fedloom
    supplies itself (a model's input_shape and n_classes), which are not user options."""

    def __init__(self, kind: str, entries: dict[str, tuple[Callable[..., Any], str]] | None = None,
                 fixed: tuple[str, ...] = ()):
        super().__init__({name: Entry(*entry) for name, entry in (entries or {}).items()})
        self.kind, self.fixed = kind, fixed

    def add(self, name: str, description: str):
        """Decorator registering ``factory`` under ``name``."""

        def register(factory: Callable[..., Any]) -> Callable[..., Any]:
            self[name] = Entry(factory, description)
            return factory

        return register

    def factory(self, name: str) -> Callable[..., Any]:
        """The registered factory, or a user's named 'package.module:attr' (from the user's own config)."""
        if name in self:
            return self[name].factory
        if ":" in name:
            return import_object(self.kind, name)
        raise OptionError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}"
                         + (f", or a user {self.kind} as 'package.module:name'" if self.kind in USER_KINDS else ""))

    def check(self, name: str, options: dict[str, Any]) -> None:
        """Refuse an unknown name, and options the factory does not take or needs (``check_options``)."""
        if ":" in name and self.kind not in USER_KINDS:
            raise OptionError(f"{self.kind} {name!r}: {self.kind}s come from fedloom's registry "
                             f"({', '.join(sorted(self))})")
        factory = self.factory(name)
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            raise OptionError(f"{self.kind} {name!r}: its parameters cannot be read (a built-in "
                              f"{type(factory).__name__}?); it must be a Python class or function") from None
        check_options(self.kind, name, {k: p for k, p in parameters.items() if k not in self.fixed}, options)
        check_option_types(self.kind, name, factory, options)

    def build(self, name: str, options: dict[str, Any], *args: Any, **supplied: Any) -> Any:
        """``factory(*args, **supplied, **options)`` after checking the options; ``supplied`` are
        the fixed parameters the factory names (others are left out)."""
        self.check(name, options)
        factory = self.factory(name)
        accepted = inspect.signature(factory).parameters
        try:
            return factory(*args, **{k: v for k, v in supplied.items() if k in accepted}, **options)
        except OptionError:
            raise
        except ValueError as err:  # the factory's own check of its options' values
            raise OptionError(f"{self.kind} {name!r}: {err}") from None
        except Exception as err:
            if name in self and self.kind not in USER_KINDS:
                raise  # fedloom's own factory: a bug, keep the traceback
            raise OptionError(f"{self.kind} {name!r} failed while being built: {type(err).__name__}: {err}") from None

    def describe(self) -> dict[str, str]:
        """Each name's one-line description."""
        return {name: entry.description for name, entry in self.items()}


USER_KINDS = {"model", "transform", "task"}  # components a user may name by import path in their own config
