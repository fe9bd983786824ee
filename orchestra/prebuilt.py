"""Pydantic models assembled from values Orchestra's own typed code made, without validation.

On a node's hot path (its request, its trace) validation costs more than the rest of the work, and
checks nothing: the values come from typed fields already checked where they entered (a pool's
YAML, the settings, a plan). Everything that comes from outside is still validated. Tests hold
each assembled model equal to its validated twin (``tests/test_prebuilt.py``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_set = object.__setattr__
_new = object.__new__
#: every field's name, per model: the fields an assembled instance was given (all of them)
_all_fields: dict[type[BaseModel], frozenset[str]] = {}


def assemble(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of ``cls`` holding ``values`` (every field, each of its type) as they are."""
    fields = _all_fields.get(cls)
    if fields is None:
        fields = _all_fields[cls] = frozenset(cls.model_fields)
    instance: M = _new(cls)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", set(fields))  # its own: pydantic adds to it in place
    _set(instance, "__pydantic_extra__", None)
    _set(instance, "__pydantic_private__", None)
    return instance
