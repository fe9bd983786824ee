"""The values that cross the model boundary: requests, results and token usage."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestra.prebuilt import assemble

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


@lru_cache(maxsize=256)
def _system_message(content: str) -> Message:
    """A system message, one object per persona (messages are frozen): an agent's every request has it."""
    return Message(role="system", content=content)


OutputFormat = Any  # "text" | "json" | JSON-schema dict | pydantic model class


class ChatRequest(BaseModel):
    """A chat completion request, independent of any provider.

    ``output`` is ``"text"``, ``"json"`` (any JSON value), a JSON-schema ``dict``, or a pydantic
    model class; structured outputs come back parsed in ``ChatResult.parsed``. ``on_text``, when
    set, is given the answer's text so far each time more of it arrives, by a backend that can
    stream (the others do not call it; a server that answers whole gives it the whole text once);
    it changes nothing else about the request.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    messages: tuple[Message, ...]
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)  # (llama.cpp reads 0 or less as "no limit")
    seed: int | None = None
    stop: tuple[str, ...] = ()
    output: OutputFormat = "text"
    on_text: Callable[[str], None] | None = Field(default=None, exclude=True, repr=False)

    @field_validator("messages", mode="before")
    @classmethod
    def _coerce_messages(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError("messages must be a list of {'role', 'content'} items")
        return tuple(Message.model_validate(m) if isinstance(m, dict) else m for m in value)

    @field_validator("stop", mode="before")
    @classmethod
    def _coerce_stop(cls, value: Any) -> Any:
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: Any) -> Any:
        if value in ("text", "json") or isinstance(value, dict):
            return value
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
        raise ValueError("output must be 'text', 'json', a JSON-schema dict or a pydantic model class")

    @classmethod
    def user(cls, prompt: str, *, system: str | None = None, **options: Any) -> ChatRequest:
        """Build a request from one user prompt and an optional system prompt."""
        messages = [_system_message(system)] if system else []
        messages.append(Message(role="user", content=prompt))
        return cls(messages=tuple(messages), **options)

    @classmethod
    def checked(cls, prompt: str, *, system: str | None, temperature: float | None, max_tokens: int | None,
                seed: int | None, output: OutputFormat, on_text: Callable[[str], None] | None) -> ChatRequest:
        """``user(...)`` for parts the caller has checked already (an agent's request on every node):
        the text and the sampling values are taken as they are, only ``output`` is checked here.
        Built without pydantic's validation, which took two thirds of a node's request time."""
        user = assemble(Message, {"role": "user", "content": prompt})
        messages = (_system_message(system), user) if system else (user,)
        return assemble(cls, {"messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                              "seed": seed, "stop": (),
                              "output": output if output == "text" else cls._check_output(output), "on_text": on_text})

    @property
    def wants_json(self) -> bool:
        """Whether the caller asked for a structured (JSON) answer."""
        return self.output != "text"

    @property
    def output_model(self) -> type[BaseModel] | None:
        """The pydantic class the answer is validated into, if one was given."""
        return self.output if isinstance(self.output, type) else None

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow, if any."""
        if isinstance(self.output, dict):
            return self.output
        if self.output_model is not None:
            return self.output_model.model_json_schema()
        return None

    @property
    def schema_name(self) -> str:
        """A short name for the schema, as providers want one."""
        if self.output_model is not None:
            return self.output_model.__name__
        if isinstance(self.output, dict):
            return str(self.output.get("title") or "response")
        return "response"

    def prompt_text(self) -> str:
        """All message contents joined, for matching and rough token counts."""
        return "\n".join(m.content for m in self.messages)

    def canonical(self) -> dict[str, Any]:
        """A JSON-ready form with every field that changes the answer (the cache and store key)."""
        output: Any = self.output
        if self.output_model is not None:
            output = {"model": self.output_model.__name__, "schema": self.output_schema}
        return {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],  # (a message's fields)
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop),
            "output": output,
        }

    def key(self, model: str) -> str:
        """A stable hash of this request sent to ``model``."""
        return self.keyed(model)[0]

    def keyed(self, model: str) -> tuple[str, str]:
        """``key(model)`` and the JSON it hashes (the canonical form with ``model``, keys sorted):
        what the run store records, so a call is encoded once.

        The JSON is ``json.dumps(..., sort_keys=True, ensure_ascii=False)`` of that form, written
        field by field (every call of a run with a store pays for it; the general encoder sorting
        a dict took three times as long). Keys stay what earlier versions recorded."""
        messages, output = self.messages, self.output
        known = _seedless.get(id(messages))
        if (known is not None and known[0] is messages and known[1] == model and known[2] is output
                and _same(known[3], self.max_tokens) and known[4] == self.stop and _same(known[5], self.temperature)
                and (not isinstance(output, dict) or _schema_json(output) is known[6])):
            head, tail = known[7], known[8]
        else:
            if isinstance(output, str):
                output_json = _string(output)
            elif isinstance(output, dict):
                output_json = _schema_json(output)
            else:
                output_json = _key_json(self.canonical()["output"])  # a pydantic class: its name and schema
            written = ", ".join([f'{{"content": {_text(m.content)}, "role": {_ROLES.get(m.role) or _string(m.role)}}}'
                                 for m in messages])
            head = (f'{{"max_tokens": {_scalar(self.max_tokens)}, "messages": [{written}], "model": {_string(model)}, '
                    f'"output": {output_json}, "seed": ')
            tail = f', "stop": [{", ".join(map(_string, self.stop))}], "temperature": {_scalar(self.temperature)}}}'
            if len(_seedless) >= 256:
                _seedless.clear()
            _seedless[id(messages)] = (messages, model, output, self.max_tokens, self.stop, self.temperature,
                                       output_json, head, tail)
        blob = f"{head}{_scalar(self.seed)}{tail}"
        return hashlib.sha256(blob.encode()).hexdigest(), blob


#: ``json.dumps(..., sort_keys=True, ensure_ascii=False)`` without making an encoder per call
_key_json = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode
#: a string as that encoder writes it
_string: Callable[[str], str] = json.encoder.encode_basestring


#: a request's key JSON before and after its seed, by its messages' identity: the messages themselves
#: (so their id is not reused), the other fields the JSON was written from, then the two parts. The
#: samples of one prompt (keyword extraction asks five times, seeds apart) share their messages, so
#: their JSON is written once.
_seedless: dict[int, tuple[Any, ...]] = {}


def _same(known: Any, value: Any) -> bool:
    """Equal and of one type (1 and 1.0 are equal, but JSON writes them apart)."""
    return known is value or (type(known) is type(value) and known == value)


#: the roles as ``_string`` writes them
_ROLES = {role: _string(role) for role in ("system", "user", "assistant")}

#: message texts as ``_string`` writes them, by the string's identity: the string itself (so its id is
#: not reused) and its JSON. A stage's requests share texts (a persona, a question asked of k experts,
#: the prompt of every keyword sample), so most are escaped once.
_texts: dict[int, tuple[str, str]] = {}


def _text(text: str) -> str:
    """A message text as ``_string`` writes it; each string is escaped once while it is in use."""
    known = _texts.get(id(text))
    if known is not None and known[0] is text:
        return known[1]
    written = _string(text)
    if len(_texts) >= 256:
        _texts.clear()
    _texts[id(text)] = (text, written)
    return written


def _scalar(value: Any) -> str:
    """A number or null as ``_key_json`` writes it."""
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return _key_json(value)


#: JSON schemas as ``_key_json`` writes them, by the dict's identity: the dict itself (so its id is
#: not reused), an equal copy (a schema changed in place is written again) and the JSON
_schemas: dict[int, tuple[dict[str, Any], dict[str, Any], str]] = {}


def _schema_json(schema: dict[str, Any]) -> str:
    """A request's JSON schema with nested keys sorted; the requests of a stage share one schema."""
    known = _schemas.get(id(schema))
    if known is not None and known[0] is schema and known[1] == schema:
        return known[2]
    text = _key_json(schema)
    if len(_schemas) >= 256:
        _schemas.clear()
    _schemas[id(schema)] = (schema, json.loads(text), text)
    return text


class Usage(BaseModel):
    """Requests sent, tokens spent and their price. Adding two gives their sum.

    ``requests`` counts every HTTP request and engine generation behind a call: retries,
    structured-output repairs and format fallbacks included.
    """

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(  # validated: pydantic-core does it faster than model_construct skips it
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            requests=self.requests + other.requests,
        )

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class ChatResult(BaseModel):
    """One completion: its text, the parsed value for structured requests, usage and timing."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    parsed: Any = None
    usage: Usage = Field(default_factory=Usage)
    model: str = ""
    finish_reason: str | None = None
    """Why generation stopped, in Chat Completions' words whatever the backend: ``stop``, or
    ``length`` when ``max_tokens`` cut the text."""
    latency_s: float = 0.0

    @field_validator("text")
    @classmethod
    def _whole_characters(cls, text: str) -> str:
        return whole_text(text)


def whole_text(text: str) -> str:
    """``text`` in whole characters: lone surrogates (JSON's ``"\\ud83d"``, or a pair split across two
    streamed chunks) made whole, a pair split apart joined, a lone half U+FFFD. (Such text could be
    neither stored nor sent on: the paid call failed unrecorded, and its run with it.)"""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def whole_values(value: Any) -> Any:
    """A JSON value with its strings (keys too) in whole characters (see ``whole_text``)."""
    if isinstance(value, str):
        return whole_text(value)
    if isinstance(value, list):
        return [whole_values(item) for item in value]
    if isinstance(value, dict):
        return {whole_text(key) if isinstance(key, str) else key: whole_values(item) for key, item in value.items()}
    return value


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for servers that report no usage."""
    return max(1, len(text) // 4)
