"""The OpenAI Chat Completions wire format, as ``orchestra serve`` speaks it.

Requests are read into a ``Completion`` (the task, its context, the answer's format and the
per-request settings); results and failures are written as OpenAI's response, chunk and error
bodies. No web framework here: ``orchestra.serve`` does the HTTP.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestra.models.structured import schema_problem
from orchestra.money import dollars
from orchestra.result import RunResult

#: OpenAI parameters accepted and ignored: they shape sampling or bookkeeping Orchestra does not expose
IGNORED = frozenset({"top_p", "user", "presence_penalty", "frequency_penalty", "logit_bias", "metadata",
                     "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
                     "prompt_cache_key", "safety_identifier", "verbosity"})

#: Orchestra's own per-request settings, sent as extra body fields (``extra_body`` in the openai SDK)
SETTINGS = {"k": int, "mode": str, "aggregate": str, "plan": bool, "seed": int}

#: the most stop sequences a request may give (as OpenAI allows)
MAX_STOPS = 4

#: the most characters of earlier turns kept as context (the most recent ones)
CONTEXT_CHARS = 16_000

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class WireError(Exception):
    """A request the server refuses: the HTTP status, OpenAI's error type and code, one clear message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _ERROR_TYPES.get(status, "api_error")
        #: of a request whose run made calls: what they spent (``usage``) and the run's facts (``orchestra``)
        self.spent: dict[str, Any] = {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape, with what the request's run spent beside it (clients ignore it)."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code},
                **self.spent}

    def of_run(self, result: RunResult) -> WireError:
        """This error, saying what ``result``'s calls spent (a client is billed for them all the same)."""
        self.spent = {"usage": usage(result), "orchestra": extension(result)}
        return self


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "insufficient_quota",
                502: "api_error", 503: "api_error"}


def bad_request(message: str, param: str | None = None) -> WireError:
    """A 400 naming the parameter to fix."""
    return WireError(400, message, param=param, code="invalid_value" if param else None)


@dataclass
class Completion:
    """A chat completion request, read.

    Attributes:
        model: the model id asked for.
        task: the last user message.
        context: the earlier turns and system messages, as text for the planner and experts.
        stream: answer as server-sent events.
        include_usage: with ``stream``, a usage chunk before ``[DONE]``.
        progress: with ``stream``, the plan's progress as extra chunks (Orchestra's extension).
        output: the answer's format: "text", "json" or a JSON schema.
        max_tokens, temperature: for the calls that write the answer.
        max_tokens_name: the parameter that gave ``max_tokens`` (``max_completion_tokens`` or
            ``max_tokens``), named in errors about it.
        settings: per-request settings (``k``, ``mode``, ``aggregate``, ``plan``, ``seed``).
        stop: sequences the answer ends before (the first of them in it, and what follows, left out).
    """

    model: str
    task: str
    context: str = ""
    stream: bool = False
    include_usage: bool = False
    progress: bool = False
    output: str | dict[str, Any] = "text"
    max_tokens: int | None = None
    max_tokens_name: str = "max_tokens"
    temperature: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    #: when the request was read (Unix seconds): the answer's ``created``, as OpenAI gives it (it was the
    #: time the answer was written, a long run's minutes later)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_completion(body: Any) -> Completion:
    """Read a request body; ``WireError`` (400) names the first thing to fix."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    known = {"model", "messages", "stream", "stream_options", "response_format", "max_tokens",
             "max_completion_tokens", "temperature", "n", "tools", "tool_choice", "functions", "function_call",
             "logprobs", "top_logprobs", "modalities", "audio", "prediction", "web_search_options", "progress",
             "stop", *SETTINGS}
    unknown = sorted(set(body) - known - IGNORED)
    if unknown:
        raise bad_request(f"unknown parameter {unknown[0]!r}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must name a model; GET /v1/models lists them", "model")
    task, context = _conversation(body.get("messages"))
    for name, value in body.items():
        if name == "messages":  # checked one by one above, naming the one to fix (their other fields are unused)
            continue
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"'{name}' holds text that is not valid Unicode (a lone surrogate); send UTF-8 text",
                              name) from None
        except (TypeError, ValueError):
            pass  # (JSON from the wire is always encodable otherwise)
    _refuse_unsupported(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if options is not None and not stream:  # (as OpenAI answers it)
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    unknown = sorted(set(options or ()) - STREAM_OPTIONS)  # (a typo, inclde_usage, lost the usage chunk unsaid)
    if unknown:
        raise bad_request(f"unknown parameter 'stream_options.{unknown[0]}'", f"stream_options.{unknown[0]}")
    if _flag(body, "progress") and not stream:
        raise bad_request("'progress' sends the plan's progress as stream chunks: it needs 'stream' true",
                          "progress")
    max_tokens, max_tokens_name = _max_tokens(body)
    return Completion(
        model=model, task=task, context=context, stream=stream,
        include_usage=_flag(options or {}, "include_usage", "stream_options.include_usage"),
        progress=_flag(body, "progress"),
        output=_output(body.get("response_format")), max_tokens=max_tokens, max_tokens_name=max_tokens_name,
        stop=_stop(body.get("stop")),
        temperature=_number(body, "temperature", 0.0, 2.0), settings=_settings(body))


def _conversation(messages: Any) -> tuple[str, str]:
    """The task (the last message, the user's) and the earlier turns as context."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        text = _text(message.get("content"), f"{where}.content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate (a "\ud800" escape): no endpoint takes it
            raise bad_request(f"{where}.content is not valid Unicode: character {error.start + 1} is a lone "
                              "surrogate; send UTF-8 text", f"{where}.content") from None
        turns.append((role, text))
    role, task = turns[-1]
    if role != "user":
        raise bad_request(f"the last message must be the user's, with the task as its text (it is the {role}'s)",
                          "messages")
    if not task.strip():
        raise bad_request(f"messages[{len(turns) - 1}].content is empty: the last user message is the task",
                          f"messages[{len(turns) - 1}].content")
    return task, _context([(_SPEAKERS[r], text) for r, text in turns[:-1] if text.strip()])


def _context(turns: list[tuple[str, str]]) -> str:
    """The earlier turns (speaker, text) as context of at most ``CONTEXT_CHARS``: the system messages
    first (their beginning, should they be longer), then the most recent turns whole, in order, and
    the end of the turn before them, marked as cut (``User: …``)."""
    system = "\n".join(f"{speaker}: {text}" for speaker, text in turns if speaker == "System")
    if len(system) > CONTEXT_CHARS:
        return system[:CONTEXT_CHARS - 1] + "…"
    room = CONTEXT_CHARS - len(system) - bool(system)  # (a newline after the system messages)
    kept: list[str] = []
    for speaker, text in reversed([turn for turn in turns if turn[0] != "System"]):
        line = f"{speaker}: {text}"
        if len(line) + bool(kept) > room:
            head = f"{speaker}: …"
            left = room - bool(kept) - len(head)
            if left > 0:
                kept.append(head + text[-left:])
            break
        kept.append(line)
        room -= len(line) + (len(kept) > 1)
    return "\n".join([*([system] if system else []), *reversed(kept)])


_SPEAKERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
             "tool": "Tool", "function": "Tool"}


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts", where)
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{index}] is a text part without its text (a string under 'text')",
                              f"{where}[{index}].text")
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}[{index}] is {kind!r}: only text content is supported", f"{where}[{index}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _stop(value: Any) -> tuple[str, ...]:
    """``stop``: a sequence or a list of up to 4 (null: none)."""
    stops = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or not all(
            isinstance(stop, str) and stop for stop in stops):
        raise bad_request(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return tuple(stops)


def stopped(text: str, stop: Sequence[str]) -> str | None:
    """``text`` before the first of the ``stop`` sequences in it; None where none is."""
    found = [at for at in (text.find(sequence) for sequence in stop) if at >= 0]
    return text[:min(found)] if found else None


#: the keys of ``stream_options`` taken: OpenAI's usage chunk and obfuscation padding (which the
#: stream has not: a loopback client reads no side channel), and vLLM's ``continuous_usage_stats``
#: (clients written for vLLM send it; the usage comes once, in the usage chunk)
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation", "continuous_usage_stats"})


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("tools") or body.get("functions"):
        name = "tools" if body.get("tools") else "functions"
        raise bad_request("tool calling is not supported: an orchestra answers in text or JSON", name)
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # (null: the default, as OpenAI takes it)
        raise bad_request("'n' must be 1: one orchestrated answer per request", "n")
    if body.get("logprobs"):
        raise bad_request("'logprobs' is not supported: an answer merges several models", "logprobs")
    if body.get("top_logprobs") is not None:  # (OpenAI refuses it without logprobs, which is refused here)
        raise bad_request("'top_logprobs' needs logprobs, which is not supported: an answer merges several models",
                          "top_logprobs")
    for name in ("tool_choice", "function_call"):  # (a client forcing a tool call got text instead)
        if body.get(name) not in (None, "none", "auto"):
            raise bad_request(f"'{name}' asks for a tool call, but tool calling is not supported: an orchestra "
                              "answers in text or JSON", name)
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise bad_request("only the 'text' modality is supported", "modalities")
    if body.get("audio") is not None:
        raise bad_request("audio output is not supported: only the 'text' modality is", "audio")
    if body.get("prediction") is not None:
        raise bad_request("'prediction' (predicted outputs) is not supported: an orchestra's answer is written anew "
                          "by its experts", "prediction")
    if body.get("web_search_options") is not None:
        raise bad_request("'web_search_options' is not supported: an orchestra's experts do not search the web",
                          "web_search_options")


def _flag(body: Mapping[str, Any], name: str, where: str | None = None) -> bool:
    """A true/false field (absent or null: false); ``where``: its path, when nested."""
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{where or name}' must be true or false", where or name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name!r} must be a number from {low:g} to {high:g}", name)
    return float(value)


def _max_tokens(body: Mapping[str, Any]) -> tuple[int | None, str]:
    """The answer's token limit and the name of the parameter that gave it."""
    given = [body.get(name) for name in ("max_tokens", "max_completion_tokens")]
    if None not in given and given[0] != given[1]:  # which one would win is a guess
        raise bad_request(f"'max_tokens' ({given[0]!r}) and 'max_completion_tokens' ({given[1]!r}) disagree; "
                          "give one", "max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None, name
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name!r} must be a positive integer", name)
    return value, name


def _output(response_format: Any) -> str | dict[str, Any]:
    """``response_format`` as a request output: text, any JSON object, or a JSON schema."""
    if response_format is None:
        return "text"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return "text"
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format.json_schema.schema")
        problem = schema_problem(schema)
        if problem:
            raise bad_request(f"response_format.json_schema.schema: {problem}", "response_format.json_schema.schema")
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name and "title" not in schema:  # (the experts' servers get it as its name)
            return {"title": name, **schema}
        return schema
    raise bad_request("response_format.type must be text, json_object or json_schema", "response_format")


def _settings(body: Mapping[str, Any]) -> dict[str, Any]:
    """Orchestra's per-request settings, type-checked here (values are checked by ``Settings``)."""
    settings = {}
    for name, kind in SETTINGS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise bad_request(f"{name!r} must be {_KINDS[kind]}", name)
        settings[name] = value
    return settings


_KINDS = {bool: "true or false", int: "an integer", str: "a string"}


# --- responses ---------------------------------------------------------------------------------


_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s;,()'\"]+", re.IGNORECASE)


def for_clients(text: str) -> str:
    """An error's text as the server's clients get it: endpoints' addresses left out (the model
    list never shows them; ``orchestra show RUN`` on the server has them)."""
    return _ADDRESS.sub("an endpoint", text)


def usage(result: RunResult) -> dict[str, int]:
    """OpenAI's usage: every call of the run together."""
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(result: RunResult) -> dict[str, Any]:
    """Orchestra's facts about the run, beside OpenAI's fields (clients ignore them)."""
    return {"run_id": result.run_id, "status": result.status, "calls": result.usage.calls,
            "requests": result.usage.requests, "cost_usd": dollars(result.usage.cost_usd),
            "nodes": [{"id": n.id, "experts": list(n.experts) or [e.agent for e in n.expert_outputs],
                       "aggregator": n.aggregator,
                       "status": n.status} for n in result.plan.nodes],
            **({"error": for_clients(result.error)} if result.error else {})}


def finish_reason(result: RunResult) -> str:
    """``length`` when the answer stopped at a token limit (``max_tokens``), else ``stop``."""
    return "length" if result.answer_cut else "stop"


def completion_body(result: RunResult, model: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` for a finished run; its ``id`` is the run id."""
    return {"id": result.run_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer or "",
                                                 "refusal": None},
                         "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result), "system_fingerprint": None, "orchestra": extension(result)}


@dataclass
class ChunkWriter:
    """Server-sent ``chat.completion.chunk`` events of one response: the same id and created on each."""

    run_id: str
    model: str
    created: int
    include_usage: bool = False

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> bytes:
        """One chunk (``delta`` None: a chunk without choices, as the usage and progress chunks are)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                             "logprobs": None}]
        body: dict[str, Any] = {"id": self.run_id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)

    def role(self) -> bytes:
        """The first chunk: the assistant's role."""
        return self.chunk({"role": "assistant", "content": ""})

    def content(self, text: str) -> Iterator[bytes]:
        """Content deltas for ``text``, a few words each."""
        for piece in pieces(text):
            yield self.chunk({"content": piece})

    def end(self, result: RunResult) -> Iterator[bytes]:
        """The finish chunk, the usage chunk when asked for, and ``[DONE]``."""
        yield self.chunk({}, finish_reason(result), orchestra=extension(result))
        if self.include_usage:
            yield self.chunk(None, usage=usage(result))
        yield DONE

    def progress(self, event: dict[str, Any]) -> bytes:
        """A progress chunk: no choices, the event under ``orchestra`` (plain clients skip it)."""
        return self.chunk(None, orchestra={"event": event})


def pieces(text: str, words: int = 4) -> Iterator[str]:
    """``text`` in pieces of a few words, whitespace kept, so joining them gives ``text`` back."""
    start, seen = 0, 0
    for index, char in enumerate(text):
        if char.isspace() and index and not text[index - 1].isspace():
            seen += 1
            if seen == words:
                yield text[start:index]
                start, seen = index, 0
    if start < len(text):
        yield text[start:]


def sse(body: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``body`` as JSON."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
