"""Reading YAML files with positions, so every error names the file, line and column."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from orchestra.errors import ConfigError
from orchestra.numbers import REREAD_ADVICE, decimal_value

Location = tuple[int, int]
MAX_VALUES = 100_000  # a configuration file never needs more; alias bombs do
T = TypeVar("T", bound=BaseModel)


class YamlDocument:
    """A parsed YAML file: its data plus the (line, column) of every value, by path."""

    def __init__(self, data: Any, marks: dict[tuple[Any, ...], Location], path: str,
                 blocks: set[tuple[Any, ...]] | None = None, text: str = "",
                 keys: dict[tuple[Any, ...], Location] | None = None,
                 plain: dict[tuple[Any, ...], str] | None = None) -> None:
        self.data = data
        self.marks = marks
        self.keys = keys or {}  # where each mapping key is written (``marks``: where its value is)
        self.path = path
        self.blocks = blocks or set()
        self.text = text  # the file's text as read
        self.plain = plain or {}  # unquoted values YAML read as something other than text, as written
        #: refuse whole numbers YAML 1.1 reads otherwise than their digits (off for a run's recorded
        #: text, which may hold what is refused since: such a run still resumes)
        self.check_numbers = True

    def written(self, loc: tuple[Any, ...]) -> str | None:
        """How the value at ``loc`` is written, where it is unquoted and YAML read it as something
        other than text (a boolean, a number, a date): ``no``, ``010``, ``12:30``."""
        return self.plain.get(loc)

    def text_error(self, message: str, loc: tuple[Any, ...], text_line: int = 1) -> ConfigError:
        """An error at line ``text_line`` of the multi-line string value at ``loc``."""
        line, column = self.where(loc) or (None, None)
        if line is not None and (text_line > 1 or loc in self.blocks):
            line, column = line + text_line - 1 + (1 if loc in self.blocks else 0), None
        return ConfigError(message, path=self.path, line=line, column=column)

    def where(self, loc: tuple[Any, ...]) -> Location | None:
        """The position of ``loc``, or of its nearest parent that has one."""
        for end in range(len(loc), -1, -1):
            found = self.marks.get(tuple(loc[:end]))
            if found is not None:
                return found
        return None

    def error(self, message: str, loc: tuple[Any, ...] = ()) -> ConfigError:
        """A ``ConfigError`` pointing at ``loc`` in this file."""
        line, column = self.where(loc) or (None, None)
        return ConfigError(message, path=self.path, line=line, column=column)

    def key_error(self, message: str, loc: tuple[Any, ...]) -> ConfigError:
        """A ``ConfigError`` pointing at the key of ``loc`` (where it is written) in this file."""
        line, column = self.keys.get(loc) or self.where(loc) or (None, None)
        return ConfigError(message, path=self.path, line=line, column=column)

    def value(self, loc: tuple[Any, ...]) -> Any:
        """The data at ``loc``."""
        value = self.data
        for part in loc:
            value = value[part]
        return value

    def validate(self, model: type[T], loc: tuple[Any, ...] = (),
                 checked_apart: Callable[[tuple[Any, ...]], bool] | None = None) -> T:
        """Validate the data at ``loc`` into ``model``; the first problem becomes a positioned ``ConfigError``.
        An unquoted whole number YAML 1.1 reads otherwise than its digits say (``010`` is 8, ``12:30``
        750, ``0x1f`` 31) is refused, but where ``checked_apart`` says its caller checks it itself."""
        for where, written in self.plain.items() if self.check_numbers else ():
            if where[:len(loc)] != loc or (checked_apart is not None and checked_apart(where)):
                continue
            value = self.value(where)
            if type(value) is int and decimal_value(written) != value:  # (`budget: {max_calls: 010}` stopped at 8)
                raise self.error(f"YAML reads {written} as {value}: {REREAD_ADVICE}", where)
        try:
            return model.model_validate(self.value(loc))
        except ValidationError as error:
            raise self.validation_error(error, loc, model) from None

    def _in_data(self, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        """``loc`` as it is in the data (pydantic adds union tags such as ``openai``), and as a person
        reads it: list items named by their ``id`` or ``name`` (``steps.review.recruit.k``, not ``steps.1``)."""
        real: list[Any] = []
        shown: list[str] = []
        value = self.data
        for part in loc:
            if isinstance(value, dict) and part in value:
                value = value[part]
                real.append(part)
                shown.append(str(part))
            elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
                value = value[part]
                real.append(part)
                label = value.get("id", value.get("name")) if isinstance(value, dict) else None
                named = isinstance(label, int) or (isinstance(label, str) and label.strip() != "")
                shown.append(str(label) if named else str(part))  # (an empty name read "agents..name")
            elif isinstance(value, (dict, list)):
                continue  # a tag pydantic adds (the chosen member of a union): not in the file
            else:
                real.append(part)
                shown.append(str(part))
        return tuple(real), ".".join(shown)

    def validation_error(self, error: ValidationError, prefix: tuple[Any, ...] = (),
                         model: type[BaseModel] | None = None) -> ConfigError:
        """The first problem of a pydantic error, positioned in this file; an unknown key first (a
        misspelt one also leaves its field missing), at the key, with the field of ``model`` (the
        one validated) it is closest to."""
        errors = error.errors()
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        full = (*prefix, *first["loc"])
        if first["type"] == "missing" and full:  # the field is not in the file: placed at what should hold it
            loc, shown = self._in_data(full[:-1])
            return self.error(f"{shown + ': ' if shown else ''}missing required field '{full[-1]}'", loc)
        at = (first.get("ctx") or {}).get("at")
        if isinstance(at, tuple):  # a check of the whole that names the value it is about
            return self.error(first["msg"], self._in_data((*full, *at))[0])
        loc, shown = self._in_data(full)
        message = _plain_message(first)
        if first["type"] == "extra_forbidden":
            known = [str(e["loc"][-1]) for e in errors
                     if e["type"] == "missing" and e["loc"][:-1] == first["loc"][:-1]]
            known += _fields_at(model, first["loc"][:-1]) if model is not None else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1) or [
                name for name in (_SAME_MEANING.get(str(loc[-1])),) if name in known]
            line, column = self.keys.get(loc) or self.where(loc) or (None, None)
            return ConfigError(f"unknown field '{loc[-1]}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                               path=self.path, line=line, column=column)
        if shown:
            message = f"{shown}: {message}"
        return self.error(message, loc)


def _plain_message(problem: Mapping[str, Any]) -> str:
    """A pydantic problem in words a file's author uses (an unknown ``type:`` tag, an empty mapping)."""
    context = problem.get("ctx") or {}
    if problem["type"] == "union_tag_invalid":  # ("Input tag 'opneai' found using 'type' does not match...")
        tags = [tag.strip().strip("'") for tag in str(context.get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(context.get("tag")), tags, n=1)
        field = str(context.get("discriminator", "type")).strip("'")
        return (f"unknown {field} {context.get('tag')!r}; choose one of "
                f"{', '.join(tags)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problem["type"] == "too_short" and context.get("actual_length") == 0:  # ("Dictionary should have at least...")
        return "is empty; give at least one"
    return str(problem["msg"]).removeprefix("Value error, ")


#: fields of other formats a file's author may write for one of ours (a plan's `depends_on` is a step's `needs`)
_SAME_MEANING = {"depends_on": "needs", "dependencies": "needs"}

#: a document nested deeper than the parser's recursion goes (no configuration needs that)
_TOO_DEEP = "invalid YAML: nested too deeply to read (lists or mappings hundreds of levels deep{})"
#: the depth at which a too-deep document's nesting is pointed at
_DEEP = 100
_OPENERS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
            yaml.FlowSequenceStartToken)
_CLOSERS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _too_deep(text: str, shown: str) -> ConfigError:
    """The error for a document nested deeper than the parser goes, at the list or mapping that
    opens its ``_DEEP``-th level (the scanner, unlike the parser, does not recurse)."""
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, _OPENERS):
                depth += 1
                if depth == _DEEP:
                    mark = token.start_mark
                    return ConfigError(_TOO_DEEP.format(", from here"), path=shown, line=mark.line + 1,
                                       column=mark.column + 1)
            elif isinstance(token, _CLOSERS):
                depth -= 1
    except yaml.YAMLError:
        pass
    return ConfigError(_TOO_DEEP.format(""), path=shown)


def read_yaml(path: str | Path, text: str | None = None) -> YamlDocument:
    """Parse a YAML file (safely: no tags that run code) and record where each value is."""
    shown = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("file not found", path=shown) from None
        except UnicodeDecodeError as error:
            raw = error.object[: error.start]
            line, column = raw.count(b"\n") + 1, error.start - (raw.rfind(b"\n") + 1) + 1
            raise ConfigError(f"not a UTF-8 text file (byte 0x{error.object[error.start]:02x}); save it as UTF-8 text",
                              path=shown, line=line, column=column) from None
        except OSError as error:
            raise ConfigError(f"cannot read file ({error.strerror or error})", path=shown) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark, problem = error.problem_mark or error.context_mark, error.problem or error.context
        unclosed = "end of stream" in (error.problem or "") or (error.problem or "").endswith("'<stream end>'")
        if error.context_mark and error.context and unclosed:
            # an unclosed quote or bracket: the end of the file is where it was noticed, not where it is
            thing = error.context.removeprefix("while scanning ").removeprefix("while parsing ")
            mark, problem = error.context_mark, f"{thing} that starts here is never closed ({error.problem})"
        raise ConfigError(f"invalid YAML: {problem}", path=shown,
                          line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    except yaml.reader.ReaderError as error:  # a control character such as NUL: not a text file
        before = text[: error.position]
        code = error.character if isinstance(error.character, int) else ord(error.character)
        raise ConfigError(f"invalid YAML: character U+{code:04X} is not allowed in a YAML file", path=shown,
                          line=before.count("\n") + 1, column=error.position - (before.rfind("\n") + 1) + 1) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}", path=shown) from None
    except RecursionError:
        raise _too_deep(text, shown) from None
    if node is None:
        return YamlDocument({}, {(): (1, 1)}, shown, text=text)
    marks: dict[tuple[Any, ...], Location] = {}
    builder = _Builder(shown, marks)
    try:
        data = builder.build(node, ())
    except RecursionError:
        raise _too_deep(text, shown) from None
    return YamlDocument(data, marks, shown, builder.blocks, text=text, keys=builder.keys, plain=builder.plain)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the pydantic model found at ``loc`` inside ``model`` (list indexes and
    mapping keys stepped over, a union's member taken by the tag pydantic names it by), or none
    where no model is found."""
    current = _alternatives(model)
    for part in loc:
        models = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
        if models:  # the part is a field, or the tag of the union member it holds
            tagged = [m for m in models if part in _tags(m)]
            current = tagged or [alternative for m in models if str(part) in m.model_fields
                                 for alternative in _alternatives(m.model_fields[str(part)].annotation)]
        else:  # a list index or a mapping key: what the container holds
            current = [alternative for c in current for alternative in _alternatives(_held(c))]
        if not current:
            return []
    found = [c for c in current if isinstance(c, type) and issubclass(c, BaseModel)]
    return list(found[0].model_fields) if found else []


def _alternatives(annotation: Any) -> list[Any]:
    """What a value of ``annotation`` may be: a union's members, with ``Annotated`` and None left out."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [alternative for member in get_args(annotation) if member is not type(None)
                for alternative in _alternatives(member)]
    return [annotation] if annotation is not None else []


def _held(container: Any) -> Any:
    """What a list holds, or a mapping's values (None for anything else)."""
    arguments = get_args(container)
    if not arguments:
        return None
    origin = get_origin(container)
    return arguments[-1] if isinstance(origin, type) and issubclass(origin, Mapping) else arguments[0]


def _tags(model: type[BaseModel]) -> tuple[Any, ...]:
    """The values of a model's ``type`` field when it is a ``Literal`` (its tag in a union)."""
    field = model.model_fields.get("type")
    return get_args(field.annotation) if field is not None and get_origin(field.annotation) is Literal else ()


class _Builder:
    def __init__(self, path: str, marks: dict[tuple[Any, ...], Location]) -> None:
        self.path = path
        self.marks = marks
        self.constructor = yaml.SafeLoader("")
        self.blocks: set[tuple[Any, ...]] = set()
        self.keys: dict[tuple[Any, ...], Location] = {}
        self.plain: dict[tuple[Any, ...], str] = {}
        self.values = 0
        self.building: set[int] = set()

    def build(self, node: yaml.Node, loc: tuple[Any, ...]) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise self._error(f"more than {MAX_VALUES:,} values (aliases expanding too far?)", node)
        if id(node) in self.building:
            raise self._error("an alias refers to a value that contains it", node)
        self.building.add(id(node))
        try:
            return self._build(node, loc)
        finally:
            self.building.discard(id(node))

    def _build(self, node: yaml.Node, loc: tuple[Any, ...]) -> Any:
        self.marks[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            written = sum(key.tag != "tag:yaml.org,2002:merge" for key, _ in node.value)
            self.constructor.flatten_mapping(node)  # (the keys merged in with ``<<: *anchor`` come first)
            merged = len(node.value) - written
            result: dict[Any, Any] = {}
            explicit: set[Any] = set()
            for position, (key_node, value_node) in enumerate(node.value):
                key = self.constructor.construct_object(key_node, deep=True)
                if isinstance(key, bool) and key_node.style is None:  # YAML 1.1 reads no, on, yes... as booleans:
                    key = key_node.value  # a key in these files is a name, the word as written (an input named no)
                if not isinstance(key, (str, int, float, bool)):
                    raise self._error("mapping keys must be plain values", key_node)
                if key in explicit:  # (a key written here overrides a merged one, as in every YAML reader)
                    raise self._error(f"duplicate key '{key}'", key_node)
                if position >= merged:
                    explicit.add(key)
                where = (*loc, key)
                self.keys[where] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                result[key] = self.build(value_node, where)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, index)) for index, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
            self.blocks.add(loc)
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as error:
            raise self._error(f"invalid value: {error.problem}", node) from None
        if isinstance(node, yaml.ScalarNode) and node.style is None and value is not None \
                and not isinstance(value, str):
            self.plain[loc] = node.value
        return value

    def _error(self, message: str, node: yaml.Node) -> ConfigError:
        return ConfigError(message, path=self.path, line=node.start_mark.line + 1,
                           column=node.start_mark.column + 1)
