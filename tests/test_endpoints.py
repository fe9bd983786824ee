"""Endpoints: explicit, with limits fixed when made, enforced at a real server on 127.0.0.1, and closed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from orchestra.agents import Pool
from orchestra.errors import ConfigError, EndpointUnreachable, ModelError
from orchestra.models import Anthropic, ChatRequest, OpenAICompatible
from orchestra.models.http import Endpoint
from orchestra.models.transport import AiohttpTransport, HttpxTransport
from orchestra.testing import LoopbackRequest, Reply, allow_model_requests, chat_handler, openai_reply


def asks(count: int) -> list[ChatRequest]:
    return [ChatRequest.user(str(i)) for i in range(count)]


class PerModel:
    """A handler that answers after ``delay`` and records the peak in flight per model name."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def __call__(self, request: LoopbackRequest) -> Reply:
        model = request.json()["model"]
        self.in_flight[model] += 1
        self.peak[model] = max(self.peak[model], self.in_flight[model])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight[model] -= 1
        return openai_reply("ok")


async def clients_of(endpoint: Endpoint) -> list[aiohttp.ClientSession]:
    """The connection pool the endpoint uses in the running loop (none before its first request)."""
    transport = (await endpoint._state()).transport
    assert isinstance(transport, AiohttpTransport)
    return [transport._session] if transport._session is not None else []


# --- limits ------------------------------------------------------------------------------------


def test_one_endpoint_caps_in_flight_at_its_limit_over_every_model_whatever_the_order_or_loop(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok", delay=0.05))
    shared = Endpoint(server.url + "/v1", max_concurrency=4)
    first = OpenAICompatible(model="a", endpoint=shared)
    asyncio.run(first.complete(asks(12)))  # the first loop's connections and semaphore exist before "b" is made
    assert server.peak_in_flight == 4
    second = OpenAICompatible(model="b", endpoint=shared, timeout=5)

    async def both() -> None:
        await asyncio.gather(first.complete(asks(20)), second.complete(asks(20)))

    for _ in range(2):  # each new event loop gets fresh connections under the same limit
        server.peak_in_flight = 0
        asyncio.run(both())
        assert server.peak_in_flight == 4
    assert len(server.requests) == 12 + 2 * 40
    assert (first.policy.timeout, second.policy.timeout) == (120.0, 5)  # attempts stay each model's own


def test_a_model_made_later_with_a_tighter_limit_has_it_enforced(loopback) -> None:
    counts = PerModel()
    server = loopback(counts)
    wide = OpenAICompatible(model="wide", base_url=server.url + "/v1", max_concurrency=9)  # 2 pools: 5 + 4

    async def use() -> None:
        await wide.complete(asks(16))  # the wide model's state is built first
        narrow = OpenAICompatible(model="narrow", base_url=server.url + "/v1", max_concurrency=4)
        await asyncio.gather(wide.complete(asks(24)), narrow.complete(asks(24)))
        await narrow.complete(asks(12))

    asyncio.run(use())
    assert (counts.peak["wide"], counts.peak["narrow"]) == (9, 4)  # each model its own endpoint and limit


def test_limits_are_fixed_when_the_endpoint_is_made(loopback) -> None:
    shared = Endpoint("http://127.0.0.1:9/v1", max_concurrency=4, rpm=60)
    with pytest.raises(AttributeError):
        shared.max_concurrency = 8  # type: ignore[misc]
    with pytest.raises(ConfigError, match="limits of the shared endpoint"):
        OpenAICompatible(model="greedy", endpoint=shared, max_concurrency=8)
    with pytest.raises(ConfigError, match="max_concurrency must be a whole number >= 1"):
        Endpoint("http://127.0.0.1:9/v1", max_concurrency=0)
    assert (shared.max_concurrency, shared.rpm) == (4, 60)


def test_a_base_url_other_than_the_shared_endpoint_s_is_refused_not_dropped() -> None:
    """The model sends to its endpoint's URL: a base_url beside it was dropped without a word."""
    from orchestra.models import Anthropic

    shared = Endpoint("http://127.0.0.1:9/v1", max_concurrency=4)
    with pytest.raises(ConfigError, match=r"base_url 'http://127.0.0.1:8/v1' is not the URL of the shared endpoint"):
        OpenAICompatible(model="m", endpoint=shared, base_url="http://127.0.0.1:8/v1")
    with pytest.raises(ConfigError, match="is not the URL of the shared endpoint"):
        Anthropic(model="claude", endpoint=shared, base_url="http://127.0.0.1:8/v1")
    for same in ({}, {"base_url": "http://127.0.0.1:9/v1/"}, {"base_url": "HTTP://127.0.0.1:9/v1"}):  # its own
        assert OpenAICompatible(model="m", endpoint=shared, **same).endpoint is shared
    assert Anthropic(model="claude", endpoint=shared).endpoint is shared


@pytest.mark.parametrize("limits", [{"rpm": float("nan")}, {"rpm": float("inf")}, {"rpm": "60"}, {"rpm": True},
                                    {"max_concurrency": 2.5}, {"max_concurrency": True}, {"max_concurrency": "4"}])
def test_limits_a_pool_file_refuses_are_refused_in_python_at_construction(limits: dict[str, Any]) -> None:
    """As the pool file's checks do: nan meant no limit, 2.5 a TypeError at the first batch, "60" a
    TypeError naming no setting."""
    with pytest.raises(ConfigError, match=r"127.0.0.1:9/v1: (rpm must be a finite number > 0|max_concurrency must "
                                          r"be a whole number >= 1)"):
        OpenAICompatible(model="m", base_url="http://127.0.0.1:9/v1", **limits)


@pytest.mark.parametrize("options, problem", [
    # timeout=0 failed every call blaming a 300 s deadline that had not run out; max_attempts=0 meant one
    ({"timeout": 0}, "timeout must be a number of seconds above 0, not int 0"),
    ({"deadline": -5}, "deadline must be a number of seconds above 0, not int -5"),
    ({"timeout": "10"}, "timeout must be a number of seconds above 0, not str '10'"),
    ({"max_attempts": 0}, "max_attempts must be a whole number of at least 1, not int 0"),
    # Python's own errors at the model's making (AttributeError, TypeError), or prices silently cut to two
    ({"model": None}, "model must be the model name its server expects (text), not NoneType None"),
    ({"base_url": 5}, "base_url must be text such as http://localhost:8000/v1, not int 5"),
    ({"api_key_env": 123}, "api_key_env must be the name of an environment variable (text such as MY_KEY) or None, "
                           "not int"),
    ({"prices": 1}, "prices must be (input, output) in USD per million tokens, {'input': ..., 'output': ...} or a "
                    "Price, not int 1"),
    ({"prices": (1, 2, 3)}, "prices must be (input, output) in USD per million tokens, {'input': ..., 'output': "
                            "...} or a Price, not tuple (1, 2, 3)"),
    ({"prices": (-1, 2)}, "prices: input: Input should be greater than or equal to 0"),
])
def test_a_models_settings_that_cannot_hold_are_refused_when_it_is_made(options: dict, problem: str) -> None:
    """In Python, as in a pool file: values a pool file refuses were taken, and failed at the first call."""
    with pytest.raises(ConfigError) as refused:
        OpenAICompatible(**{"model": "m", "base_url": "http://127.0.0.1:9/v1", **options})
    assert str(refused.value) == problem
    assert OpenAICompatible(model="m", base_url="http://127.0.0.1:9/v1", prices=[1, 2], timeout=1.5).price.output == 2


KEY_NOT_NAME = ("api_key_env must be the NAME of an environment variable (e.g. MY_KEY: letters, digits and _), not "
                "the key itself")


@pytest.mark.parametrize("make", [
    lambda key: OpenAICompatible(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=key),
    lambda key: Anthropic(model="m", base_url="http://127.0.0.1:9", api_key_env=key),
    lambda key: Endpoint("http://127.0.0.1:9/v1", api_key_env=key),
])
def test_a_key_given_as_api_key_env_is_refused_without_repeating_it(make) -> None:
    """The key in place of its variable's name was echoed in the run's error and written to the store."""
    with pytest.raises(ConfigError) as refused:
        make("sk-SECRETKEY-12345")
    assert str(refused.value) == KEY_NOT_NAME
    make("_MY_KEY_2")  # a name is taken
    make("")  # no key, as None


def test_a_pool_file_refuses_a_key_given_as_api_key_env_without_repeating_it(tmp_path: Path) -> None:
    for kind in ("openai", "anthropic"):
        (tmp_path / "pool.yaml").write_text(
            f"models:\n  m: {{type: {kind}, model: x, base_url: 'http://127.0.0.1:9/v1', "
            "api_key_env: sk-SECRETKEY-12345}\nagents:\n  - {name: a, model: m}\n")
        with pytest.raises(ConfigError) as refused:
            Pool.load(tmp_path / "pool.yaml")
        assert "sk-SECRETKEY" not in str(refused.value)
        assert str(refused.value).endswith(f"models.m.api_key_env: {KEY_NOT_NAME}")


@pytest.mark.parametrize("max_tokens", [0, -1, 2.5, True])
def test_anthropic_refuses_an_answer_limit_a_pool_file_refuses(max_tokens: object) -> None:
    """max_tokens=0 was taken in Python and sent (a pool file refuses it)."""
    with pytest.raises(ConfigError) as refused:
        Anthropic(model="m", base_url="http://127.0.0.1:9", api_key_env=None, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert str(refused.value) == (f"max_tokens must be a whole number of at least 1, not {type(max_tokens).__name__} "
                                  f"{max_tokens!r}")


def test_rpm_holds_across_event_loops(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok"))
    model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", rpm=120))  # one start per 0.5 s
    asyncio.run(model.complete(asks(1)))
    started = time.monotonic()
    asyncio.run(model.complete(asks(1)))  # a new loop may not start the next request sooner
    assert time.monotonic() - started >= 0.4


# --- pool files --------------------------------------------------------------------------------


def test_a_pool_files_unknown_model_type_and_empty_models_read_in_the_files_words(tmp_path: Path) -> None:
    """They read "Input tag 'opneai' found using 'type' does not match any of the expected tags: ..." and
    "Dictionary should have at least 1 item after validation, not 0"."""
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n  m: {type: opneai, model: x, base_url: 'http://127.0.0.1:9/v1'}\n"
                    "agents:\n  - {name: a, model: m}\n")
    with pytest.raises(ConfigError) as refused:
        Pool.load(path)
    assert str(refused.value) == (f"{path}:2:6: models.m: unknown type 'opneai'; choose one of openai, anthropic, "
                                  "llamacpp, vllm (did you mean 'openai'?)")
    path.write_text("models: {}\nagents:\n  - {name: a, model: m}\n")
    with pytest.raises(ConfigError) as refused:
        Pool.load(path)
    assert str(refused.value) == f"{path}:1:9: models: is empty; give at least one"


def test_a_pool_file_gives_models_of_one_server_one_endpoint_with_the_smallest_limits(loopback,
                                                                                      tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda req: "ok", delay=0.05))
    url = server.url + "/v1"
    (tmp_path / "pool.yaml").write_text(
        f"models:\n  wide: {{type: openai, model: w, base_url: '{url}', max_concurrency: 8, timeout: 30}}\n"
        f"  narrow: {{type: openai, model: n, base_url: '{url}/', max_concurrency: 4, rpm: 6000}}\n"
        f"  keyed: {{type: openai, model: k, base_url: '{url}', api_key_env: OTHER_KEY}}\n"
        "agents:\n  - {name: a, model: wide}\n  - {name: b, model: narrow}\n  - {name: c, model: keyed}\n")
    pool = Pool.load(tmp_path / "pool.yaml")
    wide, narrow, keyed = (pool[name].model for name in ("a", "b", "c"))
    assert wide.endpoint is narrow.endpoint is not keyed.endpoint  # one per server and key variable
    assert (wide.endpoint.max_concurrency, wide.endpoint.rpm) == (4, 6000)
    assert (keyed.endpoint.max_concurrency, keyed.endpoint.rpm) == (16, None)  # its own server: the defaults
    assert (wide.policy.timeout, narrow.policy.timeout) == (30, 120.0)  # each model keeps its own

    async def both() -> None:
        await asyncio.gather(wide.complete(asks(20)), narrow.complete(asks(20)))

    for _ in range(2):
        server.peak_in_flight = 0
        asyncio.run(both())
        assert server.peak_in_flight == 4


def test_pool_aclose_closes_each_endpoint_once(loopback, tmp_path: Path, monkeypatch) -> None:
    server = loopback(chat_handler(lambda req: "ok"))
    url = server.url + "/v1"
    (tmp_path / "pool.yaml").write_text(
        f"models:\n  one: {{type: openai, model: o, base_url: '{url}'}}\n"
        f"  two: {{type: openai, model: t, base_url: '{url}'}}\n"
        f"  other: {{type: openai, model: x, base_url: '{url}', api_key_env: OTHER_KEY}}\n"
        "agents:\n  - {name: a, model: one}\n  - {name: b, model: two}\n  - {name: c, model: other}\n")
    pool = Pool.load(tmp_path / "pool.yaml")
    closes: Counter[int] = Counter()
    real_aclose = Endpoint.aclose

    async def counted(self: Endpoint) -> None:
        closes[id(self)] += 1
        await real_aclose(self)

    monkeypatch.setattr(Endpoint, "aclose", counted)

    async def use() -> list[aiohttp.ClientSession]:
        await pool["a"].model.complete(asks(1))
        clients = [c for name in ("a", "c") for c in await clients_of(pool[name].model.endpoint)]
        await pool.aclose()
        return clients

    clients = asyncio.run(use())
    assert len(clients) == 1 and all(client.closed for client in clients)  # "c" never opened any
    assert sorted(closes.values()) == [1, 1] and id(pool["a"].model.endpoint) in closes


# --- closing -----------------------------------------------------------------------------------


def test_closing_an_endpoint_closes_its_connections_and_a_later_request_reopens(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok"))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1")

    async def use() -> tuple[bool, str]:
        await model.complete(asks(1))
        clients = await clients_of(model.endpoint)
        await model.aclose()
        closed = len(clients) == 1 and all(client.closed for client in clients)
        [again] = await model.complete(asks(1))
        return closed, again.text

    assert asyncio.run(use()) == (True, "ok")


def test_connections_close_when_their_event_loop_ends(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok"))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1")
    seen: list[aiohttp.ClientSession] = []

    async def use() -> None:
        await model.complete(asks(3))
        seen.extend(await clients_of(model.endpoint))

    asyncio.run(use())  # no aclose: asyncio.run's shutdown closes them
    assert seen and all(client.closed for client in seen)
    asyncio.run(use())  # the next loop opens its own
    assert len(seen) == 2 and seen[0] is not seen[1] and all(client.closed for client in seen)


def test_async_with_closes_models_and_endpoints(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok"))

    async def use() -> list[aiohttp.ClientSession]:
        async with Endpoint(server.url + "/v1", max_concurrency=2) as shared:
            async with OpenAICompatible(model="m", endpoint=shared) as model:
                await model.complete(asks(2))
                inner = await clients_of(shared)
            assert all(client.closed for client in inner)
            await model.complete(asks(1))
            return inner + await clients_of(shared)

    clients = asyncio.run(use())
    assert len(clients) == 2 and all(client.closed for client in clients)


# --- transports ----------------------------------------------------------------------------------


def test_any_httpx_transport_plugs_in_and_its_failures_read_as_the_default_transports_do() -> None:
    seen: list[tuple[str, bytes]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.content))
        if b'"down"' in request.content:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=openai_reply("from httpx").body)

    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
    model = OpenAICompatible(model="m", endpoint=endpoint)
    down = OpenAICompatible(model="down", endpoint=endpoint, max_attempts=1)
    with allow_model_requests():  # the requests never leave the process: the mock transport answers
        [result] = asyncio.run(model.complete([ChatRequest.user("hi")]))
        with pytest.raises(EndpointUnreachable, match="models.test"):
            asyncio.run(down.complete([ChatRequest.user("hi")]))
    assert result.text == "from httpx"
    assert seen[0][0] == "http://models.test/v1/chat/completions" and b'"model":"m"' in seen[0][1]


def test_requests_that_waited_for_a_probe_the_endpoint_refused_or_missed_fail_or_try_themselves() -> None:
    from orchestra.errors import AuthenticationError

    def run(first: httpx.Response | Exception) -> tuple[list[object], int]:
        sent: list[bytes] = []

        async def answer(request: httpx.Request) -> httpx.Response:
            sent.append(request.content)
            if len(sent) == 1:  # the first request probes whether the server takes json_schema
                for _ in range(20):  # the loop's other turns: the other requests queue behind the probe
                    await asyncio.sleep(0)
                if isinstance(first, Exception):
                    raise first
                return first
            return httpx.Response(200, json=openai_reply('{"a": 1}').body)

        endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
        model = OpenAICompatible(model="m", endpoint=endpoint, max_attempts=1)
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        requests = [ChatRequest.user(f"q{i}", output=schema) for i in range(3)]

        async def each() -> list[object]:
            return [outcome async for _, outcome in model.complete_each(requests)]

        with allow_model_requests():
            return asyncio.run(each()), len(sent)

    refused, sent = run(httpx.Response(401, json={"error": {"message": "bad key"}}))
    assert sent == 1 and all(isinstance(o, AuthenticationError) for o in refused)  # the key is refused alike
    missed, sent = run(httpx.ConnectError("connection refused"))
    assert sent == 3  # unreachable once: the others tried themselves (it may be back) and were answered
    assert sum(isinstance(o, EndpointUnreachable) for o in missed) == 1
    assert [o.parsed for o in missed if not isinstance(o, Exception)] == [{"a": 1}, {"a": 1}]


def test_requests_are_not_sent_one_after_another_while_an_endpoint_fails_its_probes() -> None:
    # (a server that answers 5xx, 429 or too slowly when a process starts got its calls one at a time:
    # each waiter of a failed probe became the next probe)
    in_flight, most, sent, mode = [0], [0], [0], ["500"]

    async def answer(request: httpx.Request) -> httpx.Response:
        sent[0] += 1
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        for _ in range(20):  # the loop's other turns: requests sent at once arrive meanwhile
            await asyncio.sleep(0)
        in_flight[0] -= 1
        if mode[0] == "ok" or (mode[0] == "reject first" and sent[0] > 1):
            return httpx.Response(200, json=openai_reply('{"a": 1}').body)
        if mode[0] == "reject first":  # about this request alone, not the endpoint
            return httpx.Response(400, json={"error": {"message": "the prompt is too long for the model"}})
        return httpx.Response(500, json={"error": {"message": "overloaded"}})

    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
    model = OpenAICompatible(model="m", endpoint=endpoint, max_attempts=1)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    structured = [ChatRequest.user(f"q{i}", output=schema) for i in range(4)]

    async def batch(requests: list[ChatRequest], how: str) -> tuple[int, int]:
        mode[0], most[0], sent[0] = how, 0, 0
        [_ async for _ in model.complete_each(requests)]
        return sent[0], most[0]

    async def rounds() -> list[tuple[int, int]]:
        return [await batch(structured, "500"), await batch(structured, "500"),
                await batch([ChatRequest.user("plain")], "ok"), await batch(structured, "500")]

    with allow_model_requests():
        failing, still, _, after = asyncio.run(rounds())
    assert failing == (4, 3)  # the probe alone, then the three that waited for it at once
    assert still == (4, 4)  # still failing, nothing answered since: nobody waits for a probe
    assert after == (4, 3)  # it answered since: the structured requests wait for their probe again

    async def rejected() -> tuple[tuple[int, int], list[object]]:
        fresh = OpenAICompatible(model="m", endpoint=Endpoint(
            "http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer))), max_attempts=1)
        mode[0], most[0], sent[0] = "reject first", 0, 0
        outcomes = [outcome async for _, outcome in fresh.complete_each(structured)]
        return (sent[0], most[0]), outcomes

    with allow_model_requests():
        counted, outcomes = asyncio.run(rejected())
    # a probe rejected for itself says nothing of the endpoint: the next request probes, alone, and
    # once it is answered the rest go together
    assert counted == (4, 2) and sum(isinstance(o, ModelError) for o in outcomes) == 1


def test_a_failure_says_how_many_attempts_were_made_when_the_deadline_stopped_them() -> None:
    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(
        lambda request: httpx.Response(503, json={"error": {"message": "busy"}}))))
    # the first retry would wait 0.5 s, past the whole call's 0.3 s: one attempt of the four allowed
    model = OpenAICompatible(model="m", endpoint=endpoint, max_attempts=4, deadline=0.3)
    with allow_model_requests(), pytest.raises(ModelError, match=r"HTTP 503 after 1 attempt: busy"):
        asyncio.run(model.complete([ChatRequest.user("hi")]))


def test_requests_wait_for_a_probe_only_briefly_a_long_first_answer_does_not_hold_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal comes as the server reads the request: a probe still unanswered after
    ``PROBE_WAIT_SECONDS`` is being answered, so the others go ahead (a long first answer held every
    other request to the endpoint until it ended)."""
    import orchestra.models.http as http

    monkeypatch.setattr(http, "PROBE_WAIT_SECONDS", 0.05)
    others = asyncio.Event()
    sent: list[bytes] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if len(sent) == 1:  # the probe: answered only once the others have arrived
            await asyncio.wait_for(others.wait(), 10)
        elif len(sent) == 3:
            others.set()
        return httpx.Response(200, json=openai_reply('{"a": 1}').body)

    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
    model = OpenAICompatible(model="m", endpoint=endpoint, max_attempts=1)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with allow_model_requests():
        results = asyncio.run(model.complete([ChatRequest.user(f"q{i}", output=schema) for i in range(3)]))
    assert [r.parsed for r in results] == [{"a": 1}] * 3  # (held for ever, the probe would time out instead)
    assert all(b'"json_schema"' in body for body in sent)  # each carried the feature the probe was trying


def test_requests_that_went_ahead_beside_a_slow_probe_that_is_refused_are_told_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal slower than ``PROBE_WAIT_SECONDS`` costs one request per waiter that went ahead,
    each then sent without the feature; the downgrade is announced once, not once per waiter."""
    import orchestra.models.http as http
    from orchestra.models.base import downgrade_listener

    monkeypatch.setattr(http, "PROBE_WAIT_SECONDS", 0.05)
    arrived = asyncio.Event()
    sent: list[bytes] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if b'"json_schema"' in request.content:
            if len(sent) == 3:
                arrived.set()
            await asyncio.wait_for(arrived.wait(), 10)  # refused once all three carried it
            return httpx.Response(400, json={"error": {"message": "response_format json_schema is not supported",
                                                       "param": "response_format"}})
        return httpx.Response(200, json=openai_reply('{"a": 1}').body)

    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
    model = OpenAICompatible(model="m", endpoint=endpoint, max_attempts=1)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    told: list[str] = []
    token = downgrade_listener.set(lambda model, feature, reason: told.append(feature))
    try:
        with allow_model_requests():
            results = asyncio.run(model.complete([ChatRequest.user(f"q{i}", output=schema) for i in range(3)]))
    finally:
        downgrade_listener.reset(token)
    assert [r.parsed for r in results] == [{"a": 1}] * 3
    assert len(sent) == 6 and told == ["response_format:json_schema"]
