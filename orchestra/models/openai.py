"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, vLLM, SGLang, Ollama, llama.cpp server..."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from orchestra.errors import BadResponse, ConnectionBroke
from orchestra.models.http import Endpoint, EndpointModel, check_model_id, display_url, no_text
from orchestra.models.metering import charge
from orchestra.models.negotiation import Capabilities
from orchestra.models.pricing import Price, coerce_price, reported_usage, token_count
from orchestra.models.prompt_gauge import PromptGauge
from orchestra.models.structured import with_instructions
from orchestra.models.types import ChatRequest, ChatResult, Usage, estimate_tokens, whole_text
from orchestra.prebuilt import assemble

OPENAI_URL = "https://api.openai.com/v1"
JsonMode = Literal["json_schema", "json_object+schema", "json_object", "prompt"]
#: Strongest first. ``json_object+schema`` is ``json_object`` with the schema beside it, which
#: llama-cpp-python's server turns into a grammar; servers that ignore the extra key still get JSON.
JSON_MODES: tuple[JsonMode, ...] = ("json_schema", "json_object+schema", "json_object", "prompt")


def json_mode(capabilities: Capabilities, *, schema: bool) -> JsonMode:
    """The strongest structured-output mode the server has not refused (the first two need a schema)."""
    for mode in JSON_MODES[0 if schema else 2:]:
        if mode == "prompt" or capabilities.allows(f"response_format:{mode}"):
            return mode
    raise AssertionError("unreachable")  # pragma: no cover - "prompt" is always allowed


class OpenAICompatible(EndpointModel):
    """Chat Completions over one shared ``httpx.AsyncClient`` per endpoint.

    Args:
        model: the model name the server expects.
        base_url: the API root, ending before ``/chat/completions``.
        api_key_env: the environment variable holding the key; ``None`` sends no key. It defaults
            to ``OPENAI_API_KEY`` for api.openai.com and to no key elsewhere.
        endpoint: the server, shared with other models on it (its limits are theirs too); without
            one, the model gets an endpoint of its own for ``base_url`` and ``api_key_env``.
        max_concurrency: requests in flight at once, for a model without a shared ``endpoint``.
        rpm: requests started per minute, for a model without a shared ``endpoint``.
        timeout: seconds one attempt may take (the whole answer, not each read).
        deadline: seconds one call may take, every attempt and retry wait included (default 300).
        max_attempts: attempts per request, retries included.
        prices: USD per million tokens, overriding the built-in table.
        name: how Orchestra shows this model; defaults to ``model``.
        extra_body: extra fields sent with every request.
    """

    def __init__(self, *, model: str, base_url: str = OPENAI_URL, api_key_env: str | Literal["auto"] | None = "auto",
                 endpoint: Endpoint | None = None, max_concurrency: int | None = None, rpm: float | None = None,
                 timeout: float | None = None,
                 deadline: float | None = None,
                 max_attempts: int | None = None,
                 prices: Price | Mapping[str, float] | tuple[float, float] | None = None,
                 name: str | None = None, extra_body: Mapping[str, Any] | None = None) -> None:
        check_model_id(model)
        if api_key_env == "auto":  # (a base_url that is not text is refused by its endpoint, below)
            api_key_env = "OPENAI_API_KEY" if (endpoint.base_url if endpoint else str(base_url).rstrip("/")) \
                == OPENAI_URL else None
        self.model = model
        self.name = name or model
        self.price = coerce_price(prices, model)
        self.extra_body = dict(extra_body or {})
        # what its server bills for prompts (budgets reserve by it); the JSON instructions are in the
        # prompt where the server has refused json_schema
        self.prompt_gauge = PromptGauge(lambda request: json_mode(
            self.endpoint.capabilities, schema=isinstance(request.output, (dict, type))) != "json_schema")
        self._connect(endpoint, base_url, api_key_env, max_concurrency=max_concurrency, rpm=rpm, timeout=timeout,
                      deadline=deadline, max_attempts=max_attempts, default_url=OPENAI_URL)

    @property
    def identity(self) -> str:
        """Backend, endpoint and model id (what the response cache is keyed on)."""
        return f"openai:{self.endpoint.base_url}:{self.model}"

    def __repr__(self) -> str:
        return f"OpenAICompatible(model={self.model!r}, base_url={self.endpoint.base_url!r})"

    @property
    def json_mode(self) -> JsonMode:
        """How structured output is asked for on this endpoint now: the first of ``JSON_MODES`` the
        server has not refused."""
        return json_mode(self.endpoint.capabilities, schema=True)

    async def _generate(self, request: ChatRequest) -> ChatResult:
        on_text = request.on_text if not request.wants_json else None  # JSON is only useful whole
        streamed: list[bool] = []  # (whether the answer came as a stream: a server may ignore ``stream``)

        attempts = _StreamedAttempts(self, request, on_text) if on_text is not None else None

        def complete(body: dict[str, Any]) -> dict[str, Any]:
            """An attempt's answer as one body; a stream the server ended before its end is retried."""
            if attempts is not None:
                attempts.ended()
            if "events" in body:
                streamed.append(True)
                body = assembled(body["events"])
            usage = body.get("usage")
            usage = dict(usage) if isinstance(usage, dict) else {}
            billed = token_count(usage.get("prompt_tokens"))  # (a count that is not one, -5 or "many": none)
            if billed is None:  # a server that counts none (llama-cpp-python's streams, some proxies): an estimate
                usage["prompt_tokens"] = self.prompt_gauge.estimate(request)
            else:
                usage["prompt_tokens"] = billed
                self.prompt_gauge.billed(request, billed)
            written = token_count(usage.get("completion_tokens"))
            usage["completion_tokens"] = _completion_estimate(body, request.max_tokens) if written is None else written
            body["usage"] = usage
            if body.get("cut"):
                failure = ConnectionBroke(f"{display_url(self.endpoint.base_url)} ended its stream for {self.model} "
                                          "before the answer was finished (no finish_reason, no [DONE])")
                failure.usage = self._result(body).usage  # (billed all the same)
                raise failure
            return body

        try:
            body = await self.endpoint.post_negotiated(
                "/chat/completions",
                lambda capabilities: self._payload(request, capabilities, stream=on_text is not None),
                model=self.model, headers=bearer_headers, policy=self.policy,
                stream=attempts.begin if attempts is not None else _stream_end, complete=complete)
        except ConnectionBroke as broke:
            cut = attempts.broke() if attempts is not None else None
            if cut is not None and getattr(broke, "usage", None) is None:
                broke.usage = cut
            raise
        result = self._result(body)
        if on_text is not None and not streamed:  # a server that ignored ``stream``: the whole text, at once
            on_text(result.text)
        return result

    def _payload(self, request: ChatRequest, capabilities: Capabilities, *, stream: bool = False) -> dict[str, Any]:
        """The request body, using only the features the server has not refused."""
        mode = json_mode(capabilities, schema=request.output_schema is not None) if request.wants_json else None
        if mode not in (None, "json_schema"):  # the others promise JSON at most, not this schema
            request = with_instructions(request)
        payload: dict[str, Any] = {"model": self.model,
                                   "messages": [m.model_dump() for m in request.messages],
                                   **self.extra_body}
        for key in ("temperature", "max_tokens", "seed"):
            value = getattr(request, key)
            if value is not None:
                payload[key] = value
        if request.stop:
            payload["stop"] = list(request.stop)
        if mode == "json_schema":
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": _schema_name(request.schema_name), "schema": request.output_schema, "strict": False}}
        elif mode == "json_object+schema":
            payload["response_format"] = {"type": "json_object", "schema": request.output_schema}
        elif mode == "json_object":
            payload["response_format"] = {"type": "json_object"}
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return capabilities.strip(payload)

    def _result(self, body: dict[str, Any]) -> ChatResult:
        usage = body.get("usage")
        reported: dict[str, Any] = usage if isinstance(usage, dict) else {}
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            url = display_url(f"{self.endpoint.base_url}/chat/completions")  # (as the other errors name it)
            said = body.get("error")  # an error sent with HTTP 200 (some proxies and servers do)
            said = said.get("message") if isinstance(said, dict) else said
            held = ", ".join(str(key) for key in list(body)[:6] if key != "usage")  # (usage: filled in here)
            shape = "" if "choices" in body else (  # (another API's answer: it named nothing to fix)
                f" (its answer holds {held or 'nothing'}: is base_url an OpenAI-compatible API's, such as "
                "http://host:8000/v1?)")
            failure = BadResponse(f"{url} answered with an error for {self.model}: {str(said)[:500]}" if said
                                  else f"{url} returned no choices[0].message for {self.model}{shape}")
            failure.usage = reported_usage(self.price, reported.get("prompt_tokens"),  # billed all the same
                                           reported.get("completion_tokens") or 0, "")
            raise failure from None
        if not isinstance(text, str):
            raise BadResponse(f"{display_url(self.endpoint.base_url)} returned a message content that is not text "
                              f"for {self.model}")
        reason = choice.get("finish_reason")
        reason = reason if isinstance(reason, str) else None
        usage = reported_usage(self.price, reported.get("prompt_tokens"), reported.get("completion_tokens"), text)
        if not text.strip():
            raise no_text(self.endpoint.base_url, self.model, reason, usage)
        return assemble(ChatResult, {  # (each field checked above: validating them again took 2.5 µs a request)
            "text": whole_text(text), "parsed": None, "usage": usage, "model": self.name, "finish_reason": reason,
            "latency_s": 0.0})


def _completion_estimate(body: dict[str, Any], max_tokens: int | None) -> int:
    """The completion tokens of an answer whose server did not count them: its text at 4 characters
    a token, never above ``max_tokens``, and ``max_tokens`` itself where that limit ended it."""
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
        reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return 0
    if max_tokens is not None and reason == "length":
        return max_tokens
    return _written_tokens(text if isinstance(text, str) else "", max_tokens)


def _written_tokens(text: str, max_tokens: int | None) -> int:
    """``text``'s tokens at 4 characters a token, never above ``max_tokens``."""
    estimate = estimate_tokens(text) if text else 0
    return min(estimate, max_tokens) if max_tokens is not None else estimate


class _StreamedAttempts:
    """The streamed attempts of one call. One whose connection broke after it had written some text
    (its body never reached ``complete``) was billed by the server all the same: its prompt and that
    text, estimated, are charged when the next attempt begins (or set on the error when none does)."""

    def __init__(self, model: OpenAICompatible, request: ChatRequest, on_text: Callable[[str], None]) -> None:
        self.model, self.request, self.on_text = model, request, on_text
        self.text, self.open = "", False

    def begin(self) -> Callable[[bytes], bool]:
        """The next attempt's handler of the body's pieces."""
        cut = self.broke()
        if cut is not None:
            charge(cut)
        self.text, self.open = "", True
        return text_relay(self._seen)

    def _seen(self, so_far: str) -> None:
        self.text = so_far
        self.on_text(so_far)

    def ended(self) -> None:
        """The attempt's body came whole (or as far as the server sent it): it counts as it says."""
        self.open = False

    def broke(self) -> Usage | None:
        """What the attempt in progress, if it broke after writing text, cost (once)."""
        if not self.open or not self.text:
            self.open = False
            return None
        self.open = False
        return self.model.price.usage(self.model.prompt_gauge.estimate(self.request),
                                      _written_tokens(self.text, self.request.max_tokens))


def text_relay(on_text: Callable[[str], None]) -> Callable[[bytes], bool]:
    """One attempt's handler of a streamed answer's bytes: each ``chat.completion.chunk``'s content
    is added to the text so far, which ``on_text`` is given (a retry starts a new text). It returns
    True once the answer is whole: ``[DONE]``, or the usage chunk after a ``finish_reason`` (a server
    that then held the stream open kept the call until its timeout, and the retry was paid again)."""
    pending = bytearray()
    text: list[str] = []
    finished = [False]

    def on_chunk(piece: bytes) -> bool:
        pending.extend(piece)
        grew = whole = False
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[:end + 1]
            if line == b"data: [DONE]":
                whole = True
            if not line.startswith(b"data:") or whole:
                continue
            try:
                chunk = json.loads(line[5:])
                choice = chunk["choices"][0] if chunk.get("choices") else None
                if choice is None:  # the usage chunk
                    whole = finished[0] and isinstance(chunk.get("usage"), dict)
                    continue
                finished[0] = finished[0] or bool(choice.get("finish_reason"))
                delta = choice["delta"].get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                continue  # something the whole answer's check will judge
            if isinstance(delta, str) and delta:
                text.append(delta)
                grew = True
        if grew:
            so_far = "".join(text)
            if "\ud800" <= so_far[-1] <= "\udbff":  # half a pair: its other half may be in the next chunk
                so_far = so_far[:-1]
            on_text(whole_text(so_far))  # (as the answer will be: a stream that differed ended in an error)
        return whole

    return on_chunk


def _stream_end() -> Callable[[bytes], bool]:
    """An attempt's handler of an answer that did not ask to stream: it tells when a stream the server
    sent all the same is whole (one held open after ``[DONE]`` kept the call until its timeout)."""
    return text_relay(lambda text: None)


def assembled(events: list[Any]) -> dict[str, Any]:
    """A streamed answer's ``chat.completion.chunk`` events as one ``chat.completion`` body; an
    error event makes it an error body (whatever text came before it), and a stream that ended with
    neither a ``finish_reason`` nor ``[DONE]`` is marked ``cut`` (its text is not the whole answer)."""
    content: list[str] = []
    reason, usage, error = None, None, None
    for event in events:
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
        if event.get("error"):
            error = event["error"]
        elif event.get("object") == "error":  # (vLLM's older shape: the message at the top)
            error = event.get("message") or "an error event"
        for choice in event.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                content.append(delta["content"])
            reason = choice.get("finish_reason") or reason if isinstance(choice, dict) else reason
    if reason == "abort":  # (vLLM: the server gave the request up part way)
        error = error or "the server aborted the answer part way (finish_reason abort)"
    if error is not None:
        return {"error": error, "usage": usage}
    if not content and reason is None:  # no choice at all: nothing
        return {"usage": usage} if usage else {}
    body = {"choices": [{"message": {"content": "".join(content)}, "finish_reason": reason}], "usage": usage}
    return {**body, "cut": True} if reason is None and "[DONE]" not in events else body


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """The OpenAI-style ``Authorization: Bearer`` header (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _schema_name(name: str) -> str:
    """A json_schema name OpenAI takes (``[a-zA-Z0-9_-]{1,64}``): a title with a space, "City facts", or
    a generic class, ``Page[Item]``, was a 400, read as a refusal of json_schema for the whole endpoint."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "response"
