"""Model doubles: models whose answers are scripted, so tests and examples run without any LLM."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from orchestra.errors import BadResponse, ConfigError
from orchestra.models.base import ModelBase, Outcome
from orchestra.models.placement import EngineResources
from orchestra.models.pricing import Price, coerce_price
from orchestra.models.types import ChatRequest, ChatResult, estimate_tokens

ScriptedReply = str | dict | list | ChatResult | Exception
"""A scripted answer: text, a JSON value (sent as its JSON text), a full result, or an error to raise."""


class DoubleBase(ModelBase):
    """Records every request; optionally behaves as a heavy engine with counted loads (and, with
    ``resources``, asks a Ray cluster for them when the executor runs engines as actors)."""

    is_test_double = True

    def __init__(self, *, name: str, heavy: bool = False, load_seconds: float = 0.0, memory_bytes: int = 0,
                 prices: Price | Mapping[str, float] | tuple[float, float] | None = None,
                 resources: EngineResources | None = None, on_load: Callable[[], None] | None = None) -> None:
        if not isinstance(name, str) or not name.strip():  # (name=5 was an AttributeError of the price table)
            raise ConfigError(f"name must be text that is not empty (how Orchestra shows the model), not "
                              f"{type(name).__name__} {name!r:.40}")
        self.name = name
        self.on_load = on_load  #: called as each load begins (a test's way to fail or crash a load)
        self.heavy = heavy
        self.resources = resources
        self.load_seconds = load_seconds
        self.memory_bytes = memory_bytes
        self.price = coerce_price(prices, name)
        self.requests: list[ChatRequest] = []
        self.batches: list[int] = []
        self.loads = 0
        self.unloads = 0
        self._loaded = False

    @property
    def loaded(self) -> bool:
        """Whether the simulated weights are in memory (always true for a light double)."""
        return self._loaded or not self.heavy

    async def load(self) -> float:
        """Simulate loading: count it and sleep ``load_seconds``."""
        started = time.perf_counter()
        if self.on_load is not None:
            self.on_load()
        if self.load_seconds:
            await asyncio.sleep(self.load_seconds)
        self.loads += 1
        self._loaded = True
        return time.perf_counter() - started

    async def unload(self) -> None:
        """Simulate freeing the weights."""
        self.unloads += 1
        self._loaded = False

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """As the base, but a heavy double refuses to generate while unloaded."""
        if self.heavy and not self._loaded:
            raise RuntimeError(f"{self.name} asked to generate while not loaded")
        self.batches.append(len(requests))
        async for outcome in super().complete_each(requests):
            yield outcome

    def _result(self, request: ChatRequest, reply: ScriptedReply) -> ChatResult:
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, ChatResult):
            return reply
        if reply is None:  # (json.dumps made it the answer "null")
            raise BadResponse(f"{self.name} replied None: a reply is text, a dict or list (sent as JSON), a "
                              "ChatResult or an exception (does the function return its reply?)")
        text = reply if isinstance(reply, str) else json.dumps(reply)
        usage = self.price.usage(estimate_tokens(request.prompt_text()), estimate_tokens(text))
        if not text.strip():  # as an endpoint's answer with no text fails its call (a run was done with "")
            error = BadResponse(f"{self.name} replied with no text ({text!r}): as an endpoint's empty answer, it "
                                "fails the call")
            error.usage = usage
            raise error
        return ChatResult(text=text, usage=usage, model=self.name, finish_reason="stop")


class ScriptedModel(DoubleBase):
    """Answers from a script.

    Args:
        replies: a list (answered in order) or a mapping from a prompt pattern to its reply; a
            pattern is a substring of the prompt, or a regular expression when it starts with ``re:``.
        default: the reply when the list is used up or no pattern matches; without one that is an error.
        name, heavy, load_seconds, memory_bytes, prices, resources: as for every double.
    """

    def __init__(self, replies: Sequence[ScriptedReply] | Mapping[str, ScriptedReply] = (), *,
                 default: ScriptedReply | None = None, name: str = "scripted", heavy: bool = False,
                 load_seconds: float = 0.0, memory_bytes: int = 0,
                 prices: Price | Mapping[str, float] | tuple[float, float] | None = None,
                 resources: EngineResources | None = None) -> None:
        super().__init__(name=name, heavy=heavy, load_seconds=load_seconds, memory_bytes=memory_bytes,
                         prices=prices, resources=resources)
        self.by_pattern = dict(replies) if isinstance(replies, Mapping) else None
        self.queue = [] if isinstance(replies, Mapping) else list(replies)
        self.default = default

    async def _generate(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        return self._result(request, self._pick(request))

    def _pick(self, request: ChatRequest) -> ScriptedReply:
        if self.by_pattern is not None:
            prompt = request.prompt_text()
            for pattern, reply in self.by_pattern.items():
                if (re.search(pattern[3:], prompt) if pattern.startswith("re:") else pattern in prompt):
                    return reply
        elif self.queue:
            return self.queue.pop(0)
        if self.default is not None:
            return self.default
        raise BadResponse(f"ScriptedModel {self.name!r} has no reply left for request "
                          f"#{len(self.requests)}: {request.prompt_text()[:80]!r}")


ReplyFunction = Callable[[ChatRequest], ScriptedReply | Awaitable[ScriptedReply]]


class FunctionModel(DoubleBase):
    """Answers by calling ``fn(request)``, which returns a reply or an awaitable of one.

    A batch's calls run concurrently, so an ``async`` function that awaits shows real overlap.
    """

    def __init__(self, fn: ReplyFunction, *, name: str = "function", heavy: bool = False,
                 load_seconds: float = 0.0, memory_bytes: int = 0,
                 prices: Price | Mapping[str, float] | tuple[float, float] | None = None,
                 resources: EngineResources | None = None, on_load: Callable[[], None] | None = None) -> None:
        if not callable(fn):  # (it was "'str' object is not callable" at the first call)
            raise ConfigError(f"FunctionModel takes a function of a request, fn(request) -> reply, not "
                              f"{type(fn).__name__} {fn!r:.40}")
        super().__init__(name=name, heavy=heavy, load_seconds=load_seconds, memory_bytes=memory_bytes,
                         prices=prices, resources=resources, on_load=on_load)
        self.fn = fn

    async def _generate(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        reply: Any = self.fn(request)
        if inspect.isawaitable(reply):
            reply = await reply
        return self._result(request, reply)
