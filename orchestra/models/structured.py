"""Structured (JSON) output: extracting JSON from model text, validating it, and asking for a repair."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from orchestra.models.types import ChatRequest, Message


class StructuredOutputError(ValueError):
    """The model's text is not valid JSON for the requested output; the message says why."""


def extract_json(text: str) -> Any:
    """Parse the JSON value in ``text``: the whole text, a fenced block, or the first balanced object."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    try:
        return json.loads(stripped)
    except RecursionError:
        raise StructuredOutputError("JSON nested too deeply to read") from None
    except json.JSONDecodeError as first_error:
        decoder = json.JSONDecoder()
        for start, char in enumerate(stripped):
            if char in "{[":
                try:
                    return decoder.raw_decode(stripped[start:])[0]
                except json.JSONDecodeError:
                    continue
                except RecursionError:
                    raise StructuredOutputError("JSON nested too deeply to read") from None
        raise StructuredOutputError(f"not valid JSON ({first_error.msg} at char {first_error.pos})") from None


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")


def schema_problem(schema: Any, path: str = "$") -> str | None:
    """What makes ``schema`` unusable by ``check_schema``, in one line naming where (None: it is usable).

    Checks the keywords ``check_schema`` reads, at every level: ``{"type": "objekt"}`` or a
    ``required`` that is not a list of names is refused before any model is asked.
    """
    if not isinstance(schema, dict):
        return f"{path} must be a JSON schema object, not {type(schema).__name__}"
    kind = schema.get("type")
    if kind is not None:
        names = kind if isinstance(kind, list) else [kind]
        unknown = [n for n in names if not isinstance(n, str) or n not in _TYPES]
        if unknown or not names:
            return f"{path}.type must be one of {', '.join(_TYPES)} (or a list of them), not {kind!r}"
    if "enum" in schema and not isinstance(schema["enum"], list):
        return f"{path}.enum must be a list"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"{path}.required must be a list of property names"
    for count in _COUNTS:
        value = schema.get(count, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{path}.{count} must be a whole number, 0 or more"
    if not isinstance(schema.get("additionalProperties", True), (bool, dict)):
        return f"{path}.additionalProperties must be true, false or a schema"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{path}.properties must be an object of schemas"
    items = schema.get("items", True)
    subschemas = [(f"{path}.properties.{name}", item) for name, item in properties.items()]
    if isinstance(items, list):  # draft 7's tuple: a schema per position
        subschemas += [(f"{path}.items[{index}]", item) for index, item in enumerate(items)]
    else:
        subschemas.append((f"{path}.items", items))
    for where, item in subschemas:
        problem = None if isinstance(item, bool) else schema_problem(item, where)  # true/false: anything/nothing
        if problem:
            return problem
    return None


def check_schema(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """Validate ``value`` against the common JSON-schema keywords; raise ``StructuredOutputError``.

    Covers type, enum, const, required, properties, additionalProperties: false, items, minItems,
    maxItems, minLength and maxLength: enough for plain schemas handed in as dicts. Pydantic model
    classes are validated by pydantic instead.
    """
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        ok = any(isinstance(value, _TYPES.get(n, object)) and not (n in ("integer", "number")
                 and isinstance(value, bool)) for n in names) or (
            "integer" in names and isinstance(value, float) and value.is_integer())  # 1.0 is an integer
        if not ok:
            raise StructuredOutputError(f"{path}: expected {'/'.join(names)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise StructuredOutputError(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        raise StructuredOutputError(f"{path}: must be {schema['const']!r}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise StructuredOutputError(f"{path}: missing required key {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                check_schema(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise StructuredOutputError(f"{path}: unexpected key {key!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise StructuredOutputError(f"{path}: needs at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise StructuredOutputError(f"{path}: allows at most {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                check_schema(item, schema["items"], f"{path}[{index}]")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise StructuredOutputError(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise StructuredOutputError(f"{path}: longer than {schema['maxLength']} characters")


def parse_output(text: str, request: ChatRequest) -> Any:
    """The parsed, validated value of ``text`` for ``request``'s output format."""
    value = extract_json(text)
    model = request.output_model
    if model is not None:
        try:
            return model.model_validate(value)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "$"
            raise StructuredOutputError(f"{where}: {first['msg']}") from None
    schema = request.output_schema
    if schema is not None:
        check_schema(value, schema)
    return value


def json_instructions(request: ChatRequest) -> str:
    """The prompt text that asks for JSON when the provider cannot enforce it."""
    schema = request.output_schema
    if schema is None:
        return "Answer with one valid JSON value and nothing else."
    return ("Answer with one JSON object that follows this JSON schema, and nothing else "
            f"(no prose, no code fences):\n{json.dumps(schema, separators=(',', ':'))}")


def with_instructions(request: ChatRequest) -> ChatRequest:
    """``request`` with the JSON instructions appended to its last user message."""
    messages = list(request.messages)
    last = messages[-1]
    messages[-1] = Message(role=last.role, content=f"{last.content}\n\n{json_instructions(request)}")
    return request.model_copy(update={"messages": tuple(messages)})


def follow_up(request: ChatRequest, answer: str, feedback: str) -> ChatRequest:
    """``request`` continued: the model's answer, then the user's feedback on it."""
    messages = (*request.messages, Message(role="assistant", content=answer), Message(role="user", content=feedback))
    return request.model_copy(update={"messages": messages})


def repair_request(request: ChatRequest, bad_text: str, error: StructuredOutputError) -> ChatRequest:
    """A follow-up request that shows the model its invalid answer and the error, asking for a fix."""
    return follow_up(request, bad_text, f"That answer is not valid: {error}. Reply again with only the corrected "
                                        f"JSON. {json_instructions(request)}")
