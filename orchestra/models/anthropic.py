"""Anthropic's Messages API, with the same limits, retries and structured output as the others."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from orchestra.errors import BadResponse, ConnectionBroke
from orchestra.models.base import check_whole, with_settings
from orchestra.models.http import Endpoint, EndpointModel, check_model_id, display_url, no_text
from orchestra.models.negotiation import Capabilities
from orchestra.models.pricing import Price, coerce_price, reported_usage, token_count
from orchestra.models.prompt_gauge import PromptGauge
from orchestra.models.structured import with_instructions
from orchestra.models.types import ChatRequest, ChatResult

ANTHROPIC_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
_TOOL = "respond"


class Anthropic(EndpointModel):
    """Claude through ``POST /v1/messages``.

    Structured output is asked for as a forced tool call whose input schema is the output schema;
    where the server refuses tools, the schema goes into the prompt instead. Then validation with
    one repair attempt, as for every model.

    Args:
        model: the Claude model name.
        base_url: the API root (before ``/v1/messages``).
        api_key_env: the environment variable holding the key.
        max_tokens: the answer limit when a request sets none (the API requires one).
        endpoint, max_concurrency, rpm, timeout, deadline, max_attempts, prices, name: as for
            ``OpenAICompatible``.
    """

    def __init__(self, *, model: str, base_url: str = ANTHROPIC_URL, api_key_env: str | None = "ANTHROPIC_API_KEY",
                 max_tokens: int = 1024, endpoint: Endpoint | None = None, max_concurrency: int | None = None,
                 rpm: float | None = None,
                 timeout: float | None = None, deadline: float | None = None, max_attempts: int | None = None,
                 prices: Price | Mapping[str, float] | tuple[float, float] | None = None,
                 name: str | None = None) -> None:
        check_model_id(model)
        check_whole("max_tokens", max_tokens, 1)  # (a pool file refuses 0; in Python it was sent)
        self.model = model
        self.name = name or model
        self.default_max_tokens = max_tokens
        self.price = coerce_price(prices, model)
        # what its server bills for prompts (budgets reserve by it); the JSON instructions are in the
        # prompt where a schema cannot go as a tool
        self.prompt_gauge = PromptGauge(lambda request: not (
            isinstance(request.output, (dict, type)) and _tools_allowed(self.endpoint.capabilities)))
        self._connect(endpoint, base_url, api_key_env, max_concurrency=max_concurrency, rpm=rpm, timeout=timeout,
                      deadline=deadline, max_attempts=max_attempts, default_url=ANTHROPIC_URL)

    @property
    def identity(self) -> str:
        """Backend, endpoint and model id, and the answer limit of requests that set none where not
        the default (what the response cache and a resume key calls on)."""
        return with_settings(f"anthropic:{self.endpoint.base_url}:{self.model}",
                             {"max_tokens": (self.default_max_tokens, 1024)})

    def __repr__(self) -> str:
        return f"Anthropic(model={self.model!r}, base_url={self.endpoint.base_url!r})"

    @property
    def json_mode(self) -> Literal["tool", "prompt"]:
        """How structured output is asked for on this endpoint now: a forced tool call until the
        server refuses tools, then the schema in the prompt."""
        return "tool" if _tools_allowed(self.endpoint.capabilities) else "prompt"

    async def _generate(self, request: ChatRequest) -> ChatResult:
        body = await self.endpoint.post_negotiated(
            "/v1/messages", lambda capabilities: self._payload(request, capabilities),
            model=self.model, headers=_headers, policy=self.policy, stream=_stream_end, complete=self._whole)
        usage = body.get("usage") if isinstance(body, dict) else None
        billed = token_count(usage.get("input_tokens")) if isinstance(usage, dict) else None
        if billed is not None:
            self.prompt_gauge.billed(request, billed)
        return self._result(body)

    def _payload(self, request: ChatRequest, capabilities: Capabilities) -> dict[str, Any]:
        """The request body, using only the features the server has not refused."""
        mode = None
        if request.wants_json:
            mode = "tool" if request.output_schema is not None and _tools_allowed(capabilities) else "prompt"
        if mode == "prompt":
            request = with_instructions(request)
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": [m.model_dump() for m in request.messages if m.role != "system"],
        }
        if system:
            payload["system"] = system
        if request.temperature is not None:
            payload["temperature"] = min(1.0, request.temperature)
        if request.stop:
            payload["stop_sequences"] = list(request.stop)
        if mode == "tool":
            payload["tools"] = [{"name": _TOOL, "description": "Give the answer in the required structure.",
                                 "input_schema": request.output_schema}]
            payload["tool_choice"] = {"type": "tool", "name": _TOOL}
        return capabilities.strip(payload)

    def _whole(self, body: dict[str, Any]) -> dict[str, Any]:
        """An attempt's answer as one Messages body: a stream sent though none was asked for, assembled."""
        if "events" not in body:
            return body
        message: dict[str, Any] = {"content": [], "usage": {}}
        partial: dict[int, str] = {}  # (a tool call's input, as its pieces of JSON came)
        stopped = False
        for event in body["events"]:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "error":
                said = event.get("error")
                said = said.get("message") if isinstance(said, dict) else said
                raise BadResponse(f"{display_url(self.endpoint.base_url)} answered with an error for {self.model}: "
                                  f"{str(said)[:500]}")
            stopped = stopped or kind == "message_stop"
            if kind == "message_start" and isinstance(event.get("message"), dict):
                message = {**event["message"], "content": [], "usage": dict(event["message"].get("usage") or {})}
            elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
                message["content"].append(dict(event["content_block"]))
            elif kind == "content_block_delta" and message["content"] and isinstance(event.get("delta"), dict):
                block, delta = message["content"][-1], event["delta"]
                if isinstance(delta.get("text"), str):
                    block["text"] = str(block.get("text", "")) + delta["text"]
                elif isinstance(delta.get("partial_json"), str):
                    index = len(message["content"]) - 1
                    partial[index] = partial.get(index, "") + delta["partial_json"]
            elif kind == "message_delta":
                delta = event.get("delta")
                message["stop_reason"] = delta.get("stop_reason") if isinstance(delta, dict) else None
                message["usage"].update(event.get("usage") if isinstance(event.get("usage"), dict) else {})
        for index, text in partial.items():
            try:
                message["content"][index]["input"] = json.loads(text)
            except (ValueError, RecursionError):
                message["content"][index]["input"] = text  # (what the output's check will judge)
        if not stopped:
            raise ConnectionBroke(f"{display_url(self.endpoint.base_url)} ended its stream for {self.model} "
                                  "before the answer was finished (no message_stop)")
        return message

    def _result(self, body: dict[str, Any]) -> ChatResult:
        content = body.get("content")
        if not isinstance(content, list):
            raise BadResponse(f"{display_url(self.endpoint.base_url)} returned no content blocks for {self.model}")
        tool_inputs = [b.get("input") for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
        if tool_inputs:
            text = json.dumps(tool_inputs[0])
        else:
            text = "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
        reported = body.get("usage") or {}
        reason = body.get("stop_reason")
        reason = _FINISH_REASONS.get(reason, reason) if isinstance(reason, str) else None
        usage = reported_usage(self.price, reported.get("input_tokens"), reported.get("output_tokens"), text)
        if not text.strip():
            raise no_text(self.endpoint.base_url, self.model, reason, usage)
        return ChatResult(text=text, model=self.name, finish_reason=reason, usage=usage)


#: the Messages API's stop reasons in Chat Completions' words, which the rest of Orchestra reads
#: (an answer cut at ``max_tokens`` is ``length``); others pass through as they are
_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "stop", "max_tokens": "length"}


def _stream_end() -> Callable[[bytes], bool]:
    """An attempt's handler of an answer's pieces: it tells when a stream the server sent though none
    was asked for is whole, at ``message_stop`` or an error (one held open after it kept the call until
    its timeout)."""
    pending = bytearray()

    def on_chunk(piece: bytes) -> bool:
        pending.extend(piece)
        whole = False
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[:end + 1]
            if line.startswith(b"data:"):
                try:
                    kind = json.loads(line[5:]).get("type")
                except (ValueError, AttributeError, RecursionError):
                    continue  # (something the whole answer's check will judge)
                whole = whole or kind in ("message_stop", "error")
        return whole

    return on_chunk


def _tools_allowed(capabilities: Capabilities) -> bool:
    return capabilities.allows("tools") and capabilities.allows("tool_choice:tool")


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"anthropic-version": API_VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    return headers
