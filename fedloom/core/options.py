"""Options a user writes for a model or an aggregator, checked against the function that takes them,
so a mistake fails before the run with the option's name instead of deep inside torch."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError


class OptionError(ValueError):
    """A model or aggregator that cannot be built as configured; the message names it."""


def check_option_types(kind: str, name: str, factory: Callable, options: dict[str, Any]) -> None:
    """Refuse an option whose value does not fit the type ``factory`` annotates it with."""
    try:
        hints = typing.get_type_hints(factory)
    except (NameError, TypeError):  # annotations that cannot be resolved: nothing to check against
        return
    for key, value in options.items():
        if key not in hints:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            raise OptionError(f"{kind} {name!r}: option {key} = {value!r}: {err.errors()[0]['msg']} "
                              f"(expected {inspect.formatannotation(hints[key])})") from None
