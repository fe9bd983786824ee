"""Reading YAML files with positions, so every error names the file, line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestra.errors import ConfigError

Location = tuple[int, int]
MAX_VALUES = 100_000  # a configuration file never needs more; alias bombs do
T = TypeVar("T", bound=BaseModel)


class YamlDocument:
    """A parsed YAML file: its data plus the (line, column) of every value, by path."""

    def __init__(self, data: Any, marks: dict[tuple[Any, ...], Location], path: str,
                 blocks: set[tuple[Any, ...]] | None = None) -> None:
        self.data = data
        self.marks = marks
        self.path = path
        self.blocks = blocks or set()

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

    def value(self, loc: tuple[Any, ...]) -> Any:
        """The data at ``loc``."""
        value = self.data
        for part in loc:
            value = value[part]
        return value

    def validate(self, model: type[T], loc: tuple[Any, ...] = ()) -> T:
        """Validate the data at ``loc`` into ``model``; the first problem becomes a positioned ``ConfigError``."""
        try:
            return model.model_validate(self.value(loc))
        except ValidationError as error:
            raise self.validation_error(error, loc) from None

    def validation_error(self, error: ValidationError, prefix: tuple[Any, ...] = ()) -> ConfigError:
        """The first problem of a pydantic error, positioned in this file."""
        first = error.errors()[0]
        loc = (*prefix, *first["loc"])
        shown = ".".join(str(part) for part in loc)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = f"missing required field '{loc[-1]}'"
        elif first["type"] == "extra_forbidden":
            message = f"unknown field '{loc[-1]}'"
        elif shown:
            message = f"{shown}: {message}"
        return self.error(message, loc)


def read_yaml(path: str | Path, text: str | None = None) -> YamlDocument:
    """Parse a YAML file (safely: no tags that run code) and record where each value is."""
    shown = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("file not found", path=shown) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read file ({error})", path=shown) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(f"invalid YAML: {error.problem or error.context}", path=shown, line=line,
                          column=column) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}", path=shown) from None
    if node is None:
        return YamlDocument({}, {(): (1, 1)}, shown)
    marks: dict[tuple[Any, ...], Location] = {}
    builder = _Builder(shown, marks)
    data = builder.build(node, ())
    return YamlDocument(data, marks, shown, builder.blocks)


class _Builder:
    def __init__(self, path: str, marks: dict[tuple[Any, ...], Location]) -> None:
        self.path = path
        self.marks = marks
        self.constructor = yaml.SafeLoader("")
        self.blocks: set[tuple[Any, ...]] = set()
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
            self.constructor.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.constructor.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    raise self._error("mapping keys must be plain values", key_node)
                if key in result:
                    raise self._error(f"duplicate key '{key}'", key_node)
                result[key] = self.build(value_node, (*loc, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, index)) for index, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
            self.blocks.add(loc)
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as error:
            raise self._error(f"invalid value: {error.problem}", node) from None

    def _error(self, message: str, node: yaml.Node) -> ConfigError:
        return ConfigError(message, path=self.path, line=node.start_mark.line + 1,
                           column=node.start_mark.column + 1)
