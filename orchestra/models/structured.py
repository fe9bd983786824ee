"""Structured (JSON) output: extracting JSON from model text, validating it, and asking for a repair."""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError

from orchestra.models.types import ChatRequest, Message, whole_values


class StructuredOutputError(ValueError):
    """The model's text is not valid JSON for the requested output; the message says why."""


def _no_constant(name: str) -> Any:
    raise StructuredOutputError(f"{name} is not JSON (write a number, or null)")


def _finite(written: str) -> float:
    """A JSON number with a fraction or exponent; one too large for a float (``1e999``, which would
    be ``inf``, and go out again as ``Infinity``) is refused."""
    value = float(written)
    if math.isinf(value):
        raise StructuredOutputError(f"{written} is too large a number (write a smaller one, or a string)")
    return value


def extract_json(text: str) -> Any:
    """Parse the JSON value in ``text``: the whole text, a fenced block, or the first balanced object.
    ``NaN`` and ``Infinity``, which Python's ``json`` reads, are not JSON (a client's parser refuses them)."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    try:
        return json.loads(stripped, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise StructuredOutputError("JSON nested too deeply to read") from None
    except json.JSONDecodeError as first_error:
        decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)
        for start, char in enumerate(stripped):
            if char in "{[":
                try:
                    return decoder.raw_decode(stripped[start:])[0]
                except json.JSONDecodeError:
                    continue
                except RecursionError:
                    raise StructuredOutputError("JSON nested too deeply to read") from None
        # ("Unterminated string starting at" ends in "at" already)
        raise StructuredOutputError(f"not valid JSON ({first_error.msg.removesuffix(' at')} at char "
                                    f"{first_error.pos})") from None


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains",
           "maxContains")
#: keywords whose value is one schema
_SUBSCHEMA = ("additionalProperties", "not", "if", "then", "else", "contains", "propertyNames", "additionalItems")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COMBINERS = ("anyOf", "oneOf", "allOf")
#: a chain of references that descends into nothing (``{"$ref": "#"}`` at the top) stops here
_MAX_REFS = 32
#: the deepest a schema's objects and lists may nest (real schemas nest a few levels)
MAX_SCHEMA_DEPTH = 64


class _Circular(StructuredOutputError):
    """A schema whose references go round in a circle: no value can be checked against it."""


def _resolve(reference: Any, root: dict[str, Any]) -> Any:
    """The subschema a local ``$ref`` (``#``, ``#/$defs/Name``...) points at; None if it points nowhere."""
    if not isinstance(reference, str) or not reference.startswith("#"):
        return None
    target: Any = root
    for part in filter(None, unquote(reference[1:]).split("/")):  # (a URI fragment: %20 is a space)
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target


def _depth(value: Any) -> int:
    """How deeply JSON objects and lists nest in ``value`` (0 for a plain value)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            level += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def class_in_place_of_schema(value: object) -> str | None:
    """What to give instead of a pydantic class where a run takes a JSON schema (its record is JSON, so
    the class cannot go with it: it was "Input should be a valid string"); None for anything else."""
    if not (isinstance(value, type) and issubclass(value, BaseModel)):
        return None
    name = value.__name__
    return (f"give a JSON schema, not the class {name}: pass {name}.model_json_schema(), and read the answer with "
            f"{name}.model_validate_json(...)")


def schema_problem(schema: Any, path: str = "$", root: dict[str, Any] | None = None) -> str | None:
    """What makes ``schema`` unusable by ``check_schema``, in one line naming where (None: it is usable).

    Checks the keywords ``check_schema`` reads, at every level: ``{"type": "objekt"}``, a
    ``required`` that is not a list of names or a ``$ref`` that points nowhere in the schema is
    refused before any model is asked.
    """
    if not isinstance(schema, dict):
        return f"{path} must be a JSON schema object, not {type(schema).__name__}"
    if root is None and _depth(schema) > MAX_SCHEMA_DEPTH:  # (a run's record could not hold it: a 500 in serve)
        return f"{path} nests objects and lists more than {MAX_SCHEMA_DEPTH} levels deep"
    root = schema if root is None else root
    kind = schema.get("type")
    if kind is not None:
        names = kind if isinstance(kind, list) else [kind]
        unknown = [n for n in names if not isinstance(n, str) or n not in _TYPES]
        if unknown or not names:
            return f"{path}.type must be one of {', '.join(_TYPES)} (or a list of them), not {kind!r}"
    if "enum" in schema and not isinstance(schema["enum"], list):
        return f"{path}.enum must be a list"
    if kind is not None:  # (a value its own type refuses can never be the answer: paid repairs, then a failure)
        names = kind if isinstance(kind, list) else [kind]
        for where, value in [*((f"{path}.enum", value) for value in schema.get("enum", [])),
                             *([(f"{path}.const", schema["const"])] if "const" in schema else [])]:
            if not _of_type(value, names):
                quote = (" (unquoted in YAML, the words yes, no, on, off, true and false are booleans: quote it)"
                         if isinstance(value, bool) and "string" in names else "")
                return f"{where} has {value!r}, which is not of type {'/'.join(names)}{quote}"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"{path}.required must be a list of property names"
    for count in _COUNTS:
        value = schema.get(count, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{path}.{count} must be a whole number, 0 or more"
    for bound in _BOUNDS:
        value = schema.get(bound, 0)
        if (isinstance(value, bool) and "exclusive" not in bound) or not isinstance(value, (int, float)):
            return f"{path}.{bound} must be a number" + (" (or, as in draft 4, true or false)" if "exclusive" in bound
                                                         else "")
    step = schema.get("multipleOf", 1)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        return f"{path}.multipleOf must be a number above 0"
    if "$ref" in schema and not isinstance(_resolve(schema["$ref"], root), (dict, bool)):
        return f"{path}.$ref must point inside the schema (#/$defs/Name), not {schema['$ref']!r}"
    if _round_in_a_circle(schema, root):
        return f"{path} leads round in a circle through $ref (checked against the same value again): no value " \
               "could be checked"
    if not isinstance(schema.get("additionalProperties", True), (bool, dict)):
        return f"{path}.additionalProperties must be true, false or a schema"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{path}.properties must be an object of schemas"
    subschemas = [(f"{path}.properties.{name}", item) for name, item in properties.items()]
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 7's tuple: a schema per position
        subschemas += [(f"{path}.items[{index}]", item) for index, item in enumerate(items)]
    else:
        subschemas.append((f"{path}.items", items))
    for keyword in ("prefixItems", *_COMBINERS):
        listed = schema.get(keyword, [True])
        if not isinstance(listed, list) or not listed:
            return f"{path}.{keyword} must be a non-empty list of schemas"
        subschemas += [(f"{path}.{keyword}[{index}]", item) for index, item in enumerate(listed)]
    for keyword in ("$defs", "definitions"):
        defined = schema.get(keyword, {})
        if not isinstance(defined, dict):
            return f"{path}.{keyword} must be an object of schemas"
        subschemas += [(f"{path}.{keyword}.{name}", item) for name, item in defined.items()]
    subschemas += [(f"{path}.{keyword}", schema[keyword]) for keyword in _SUBSCHEMA
                   if isinstance(schema.get(keyword), dict)]
    for keyword in ("if", "then", "else", "contains", "propertyNames", "additionalItems"):
        if not isinstance(schema.get(keyword, True), (bool, dict)):
            return f"{path}.{keyword} must be a schema (or true or false)"
    for keyword in ("dependentRequired", "dependentSchemas", "dependencies"):
        depends = schema.get(keyword, {})
        if not isinstance(depends, dict):
            return f"{path}.{keyword} must be an object keyed by property name"
        for name, need in depends.items():
            named = isinstance(need, list) and all(isinstance(n, str) for n in need)
            if keyword == "dependentRequired" and not named:
                return f"{path}.{keyword}.{name} must be a list of property names"
            if keyword == "dependentSchemas" and not isinstance(need, (bool, dict)):
                return f"{path}.{keyword}.{name} must be a schema"
            if keyword == "dependencies" and not named and not isinstance(need, (bool, dict)):
                return f"{path}.{keyword}.{name} must be a list of property names or a schema"
            if isinstance(need, dict):
                subschemas.append((f"{path}.{keyword}.{name}", need))
    for where, item in subschemas:
        problem = None if isinstance(item, bool) else schema_problem(item, where, root)  # true/false: anything/nothing
        if problem:
            return problem
    return None


#: keywords whose schemas are checked against the same value as the schema holding them
_SAME_VALUE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")


def _round_in_a_circle(schema: dict[str, Any], root: dict[str, Any]) -> bool:
    """Whether checking a value against ``schema`` comes back to a schema it is being checked
    against, without looking into the value (``$ref``s and ``allOf``/``anyOf``/``oneOf``/``not``/
    ``if`` branches, which apply to the same value): no value could ever be checked."""
    on_path: set[int] = set()
    done: set[int] = set()

    def visit(node: Any) -> bool:
        if not isinstance(node, dict) or id(node) in done:
            return False
        if id(node) in on_path:
            return True
        on_path.add(id(node))
        following = [_resolve(node["$ref"], root)] if "$ref" in node else []
        for keyword in _SAME_VALUE:
            branch = node.get(keyword)
            following += branch if isinstance(branch, list) else [branch]
        if any(visit(item) for item in following):
            return True
        on_path.discard(id(node))
        done.add(id(node))
        return False

    return visit(schema)


def check_schema(value: Any, schema: dict[str, Any] | bool, path: str = "$") -> None:
    """Validate ``value`` against the common JSON-schema keywords; raise ``StructuredOutputError``.

    Covers type, enum, const, required, properties, additionalProperties (false or a schema),
    propertyNames, dependentRequired, dependentSchemas (and draft 7's dependencies), items (a
    schema, or draft 7's list with additionalItems), prefixItems, contains (minContains,
    maxContains), minItems, maxItems, uniqueItems, minLength, maxLength, minProperties,
    maxProperties, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, anyOf, oneOf,
    allOf, not, if/then/else and local ``$ref`` (``#/$defs/...``, percent-encoded or not): enough
    for the schemas clients and pydantic write. ``pattern`` and ``format`` are left to the endpoint (a
    pattern can take for ever to match). Pydantic model classes are validated by pydantic instead.
    """
    _check(value, schema, path, schema if isinstance(schema, dict) else {}, 0)


def _fits(value: Any, schema: Any, path: str, root: dict[str, Any], refs: int) -> StructuredOutputError | None:
    """Why ``value`` does not fit ``schema`` (None: it fits)."""
    try:
        _check(value, schema, path, root, refs)
    except _Circular:
        raise
    except StructuredOutputError as error:
        return error
    return None


def _of_type(value: Any, names: list[str]) -> bool:
    """Whether ``value`` is of one of the JSON types ``names`` (a bool is no number; 1.0 is an integer)."""
    return any(isinstance(value, _TYPES.get(n, object)) and not (n in ("integer", "number")
               and isinstance(value, bool)) for n in names) or (
        "integer" in names and isinstance(value, float) and value.is_integer())


def _check(value: Any, schema: Any, path: str, root: dict[str, Any], refs: int) -> None:
    if schema is True or schema == {}:
        return
    if schema is False:
        raise StructuredOutputError(f"{path}: no value is allowed here")
    if not isinstance(schema, dict):  # (schemas given in Python are not checked by schema_problem)
        raise StructuredOutputError(f"{path}: the schema here is a {type(schema).__name__}, not a schema object")
    if "$ref" in schema:
        target = _resolve(schema["$ref"], root)
        if not isinstance(target, (dict, bool)):
            raise StructuredOutputError(f"{path}: $ref {schema['$ref']!r} points nowhere in the schema")
        if refs >= _MAX_REFS:
            raise _Circular(f"{path}: $ref {schema['$ref']!r} leads round in a circle")
        _check(value, target, path, root, refs + 1)
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not _of_type(value, names):
            raise StructuredOutputError(f"{path}: expected {'/'.join(names)}, got {type(value).__name__}")
    if "enum" in schema and not any(_same(value, allowed) for allowed in schema["enum"]):
        raise StructuredOutputError(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and not _same(value, schema["const"]):
        raise StructuredOutputError(f"{path}: must be {schema['const']!r}")
    _check_combined(value, schema, path, root, refs)
    if isinstance(value, dict):
        _check_object(value, schema, path, root)
    elif isinstance(value, list):
        _check_array(value, schema, path, root)
    elif isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise StructuredOutputError(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise StructuredOutputError(f"{path}: longer than {schema['maxLength']} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, schema, path)


def _check_combined(value: Any, schema: dict[str, Any], path: str, root: dict[str, Any], refs: int) -> None:
    for part in schema.get("allOf", ()):
        _check(value, part, path, root, refs)
    if "anyOf" in schema:
        errors = [_fits(value, part, path, root, refs) for part in schema["anyOf"]]
        if all(errors):
            raise StructuredOutputError(f"{path}: fits none of anyOf (first: {errors[0]})")
    if "oneOf" in schema:
        errors = [_fits(value, part, path, root, refs) for part in schema["oneOf"]]
        fitting = errors.count(None)
        if fitting != 1:
            raise StructuredOutputError(f"{path}: fits {fitting} of oneOf, not exactly one"
                                        + (f" (first: {errors[0]})" if not fitting else ""))
    if "not" in schema and _fits(value, schema["not"], path, root, refs) is None:
        raise StructuredOutputError(f"{path}: must not fit the schema under not")
    if "if" in schema:
        branch = "then" if _fits(value, schema["if"], path, root, refs) is None else "else"
        if branch in schema:
            error = _fits(value, schema[branch], path, root, refs)
            if error is not None:
                raise StructuredOutputError(f"{error} (under {branch}, as {path} "
                                            f"{'fits' if branch == 'then' else 'does not fit'} if)")


def _check_object(value: dict[str, Any], schema: dict[str, Any], path: str, root: dict[str, Any]) -> None:
    for key in schema.get("required", []):
        if key not in value:
            raise StructuredOutputError(f"{path}: missing required key {key!r}")
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        raise StructuredOutputError(f"{path}: needs at least {schema['minProperties']} keys")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise StructuredOutputError(f"{path}: allows at most {schema['maxProperties']} keys")
    depends = {**schema.get("dependencies", {}), **schema.get("dependentRequired", {}),
               **schema.get("dependentSchemas", {})}
    for key, need in depends.items():
        if key not in value:
            continue
        if isinstance(need, list):
            missing = [name for name in need if name not in value]
            if missing:
                raise StructuredOutputError(f"{path}: key {key!r} needs key {missing[0]!r} too")
        else:
            _check(value, need, path, root, 0)
    if "propertyNames" in schema:
        for key in value:
            error = _fits(key, schema["propertyNames"], f"{path}.{key}", root, 0)
            if error is not None:
                raise StructuredOutputError(f"{path}: the key name {key!r} does not fit propertyNames ({error})")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], f"{path}.{key}", root, 0)
        elif "patternProperties" in schema:  # (key patterns are not matched here: see check_schema)
            continue
        elif extra is False:
            raise StructuredOutputError(f"{path}: unexpected key {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, f"{path}.{key}", root, 0)


def _check_array(value: list[Any], schema: dict[str, Any], path: str, root: dict[str, Any]) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        raise StructuredOutputError(f"{path}: needs at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise StructuredOutputError(f"{path}: allows at most {schema['maxItems']} items")
    if schema.get("uniqueItems") is True:
        seen: set[str] = set()
        for index, item in enumerate(value):
            text = json.dumps(_whole_numbers(item), sort_keys=True)  # (true and 1 stay apart, as _same has them)
            if text in seen:
                raise StructuredOutputError(f"{path}[{index}]: repeats an earlier item (uniqueItems)")
            seen.add(text)
    if "contains" in schema:
        fitting = sum(_fits(item, schema["contains"], f"{path}[{index}]", root, 0) is None
                      for index, item in enumerate(value))
        least, most = schema.get("minContains", 1), schema.get("maxContains")
        if fitting < least:
            raise StructuredOutputError(f"{path}: {fitting} items fit contains, at least {least} must")
        if most is not None and fitting > most:
            raise StructuredOutputError(f"{path}: {fitting} items fit contains, at most {most} may")
    items = schema.get("items", True)
    positional = schema.get("prefixItems", items if isinstance(items, list) else [])
    rest = items if not isinstance(items, list) else schema.get("additionalItems", True)
    for index, item in enumerate(value):
        _check(item, positional[index] if index < len(positional) else rest, f"{path}[{index}]", root, 0)


def _same(value: Any, other: Any) -> bool:
    """Equal as JSON values: ``true`` is not ``1`` (Python's ``True == 1``), ``1`` is ``1.0``, and
    arrays and objects are compared item by item so."""
    if isinstance(value, bool) or isinstance(other, bool):
        return type(value) is type(other) and value == other
    if isinstance(value, list) and isinstance(other, list):
        return len(value) == len(other) and all(map(_same, value, other))
    if isinstance(value, dict) and isinstance(other, dict):
        return value.keys() == other.keys() and all(_same(value[key], other[key]) for key in value)
    if isinstance(value, (list, dict)) or isinstance(other, (list, dict)):
        return False
    return bool(value == other)


def _whole_numbers(value: Any) -> Any:
    """``value`` with each float that is a whole number as an int: ``1.0`` and ``1`` are one JSON value."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    return value


def _check_number(value: float, schema: dict[str, Any], path: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise StructuredOutputError(f"{path}: below the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise StructuredOutputError(f"{path}: above the maximum {schema['maximum']}")
    low, high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if low is True:  # draft 4: a flag on minimum
        low = schema.get("minimum")
    if high is True:
        high = schema.get("maximum")
    if low is not None and low is not False and value <= low:
        raise StructuredOutputError(f"{path}: must be above {low}")
    if high is not None and high is not False and value >= high:
        raise StructuredOutputError(f"{path}: must be below {high}")
    step = schema.get("multipleOf")
    if step is not None and not _multiple(value, step):
        raise StructuredOutputError(f"{path}: not a multiple of {step}")


def _multiple(value: float, step: float) -> bool:
    """Whether ``value`` is a whole multiple of ``step``, as the numbers are written: 0.3 of 0.1 too,
    despite binary floats, and 3000000001 not of 2 however large (a tolerance relative to the quotient
    let every value past 5e8 through)."""
    if isinstance(value, int) and isinstance(step, int):
        return value % step == 0
    if any(isinstance(n, float) and not math.isfinite(n) for n in (value, step)):
        return False
    written, unit = (Decimal(n) if isinstance(n, int) else Decimal(repr(n)) for n in (value, step))
    with localcontext() as exact:  # (digits enough for the whole quotient: a float's range needs ~650)
        exact.prec = min(max(28, written.adjusted() - unit.adjusted() + 30), 5000)
        try:
            return written % unit == 0
        except InvalidOperation:  # (an integer of thousands of digits beside a fractional step: not told)
            return False


def parse_output(text: str, request: ChatRequest) -> Any:
    """The parsed, validated value of ``text`` for ``request``'s output format (its strings in whole
    characters: JSON's ``"\\ud83d"`` made a lone surrogate, and the run's record could not be written)."""
    value = whole_values(extract_json(text))
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
