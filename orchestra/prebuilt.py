"""Pydantic models assembled from values Orchestra's own typed code made, without validation.

On a node's hot path (its request, its trace) validation costs more than the rest of the work, and
checks nothing: the values come from typed fields already checked where they entered (a pool's
YAML, the settings, a plan). Everything that comes from outside is still validated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_set = object.__setattr__
_fields: dict[type[BaseModel], frozenset[str]] = {}


def assemble(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of ``cls`` holding ``values`` (every field, each of its type) as they are.

    A missing or unknown field is a ``TypeError``: what validation would have caught of a change
    to the model that its builder missed."""
    names = _fields.get(cls)
    if names is None:
        names = _fields[cls] = frozenset(cls.model_fields)
    if values.keys() != names:
        raise TypeError(f"{cls.__name__} needs exactly the fields {sorted(names)}; got {sorted(values)}")
    instance = cls.__new__(cls)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", set(values))
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance
