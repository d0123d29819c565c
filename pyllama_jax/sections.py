"""Job-config sections made from the dataclasses they configure, so each field has one default.

`config_section(SamplingConfig)` is an ml_collections section holding every field at its default
(locked: a misspelt field is an error, not a new field); `from_section(SamplingConfig, c.sampling)`
builds the dataclass back from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

import ml_collections

T = TypeVar("T")


def defaults(*types: type) -> dict[str, Any]:
    """Field name -> default over the dataclasses `types`; a field two of them share must share its default."""
    values: dict[str, Any] = {}
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise TypeError(f"{cls.__name__}.{f.name} has no default, so it cannot be a config field")
            if f.name in values and values[f.name] != default:
                raise TypeError(f"{cls.__name__}.{f.name} defaults to {default!r}, but another dataclass of "
                                f"the section gives {values[f.name]!r}")
            values[f.name] = default
    return values


def config_section(*types: type, **overrides: Any) -> ml_collections.ConfigDict:
    """A locked section with every field of the dataclasses `types` at its default, then `overrides`."""
    values = defaults(*types)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        names = ", ".join(t.__name__ for t in types)
        raise KeyError(f"{unknown[0]!r} is not a field of {names}; expected one of {sorted(values)}")
    section = ml_collections.ConfigDict({**values, **overrides})
    section.lock()
    return section


def from_section(cls: type[T], section: Mapping[str, Any]) -> T:
    """A `cls` from the section's values of its fields (lists back to tuples where the default is one)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in section:
            raise KeyError(f"the config section for {cls.__name__} has no field {f.name!r}")
        value = section[f.name]
        values[f.name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    return cls(**values)
