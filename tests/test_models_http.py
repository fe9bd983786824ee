"""OpenAICompatible and Anthropic against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from orchestra.errors import (
    AuthenticationError,
    BadResponse,
    ConnectionBroke,
    EndpointUnreachable,
    RateLimited,
    RequestRejected,
    RequestTimeout,
)
from orchestra.models import Anthropic, ChatRequest, OpenAICompatible, allow_model_requests
from orchestra.models import http as http_module
from orchestra.models.base import retry_listener
from orchestra.models.http import Endpoint, parse_retry_after
from orchestra.models.prompt_gauge import text_units
from orchestra.models.transport import HttpxTransport
from orchestra.models.types import estimate_tokens
from orchestra.testing import LoopbackRequest, Reply, anthropic_reply, chat_handler, error_reply, openai_reply
from orchestra.testing.loopback import openai_stream_reply


class Answer(BaseModel):
    city: str
    population: int


def ask(text: str = "hello", **options: object) -> ChatRequest:
    return ChatRequest.user(text, **options)


def run(coro):
    return asyncio.run(coro)


def openai(server, **options) -> OpenAICompatible:
    return OpenAICompatible(model="gpt-4o-mini", base_url=server.url + "/v1", **options)


def anthropic(server, **options) -> Anthropic:
    return Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env=None, **options)


# --- success, usage and cost ---------------------------------------------------------------


def test_openai_success_reports_usage_and_cost(loopback) -> None:
    server = loopback(lambda req: openai_reply("Paris", prompt_tokens=1000, completion_tokens=500))
    model = openai(server, prices=(2.0, 8.0))
    [result] = run(model.complete([ask("capital of France?", temperature=0.2, seed=7)]))
    assert result.text == "Paris"
    assert result.usage.prompt_tokens == 1000 and result.usage.completion_tokens == 500
    assert result.usage.cost_usd == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)
    assert result.finish_reason == "stop" and result.model == "gpt-4o-mini"
    sent = server.requests[0].json()
    assert sent["model"] == "gpt-4o-mini" and sent["temperature"] == 0.2 and sent["seed"] == 7
    assert server.requests[0].path == "/v1/chat/completions"


def test_price_table_applies_by_model_family(loopback) -> None:
    server = loopback(lambda req: openai_reply("x", prompt_tokens=1_000_000, completion_tokens=0))
    model = OpenAICompatible(model="gpt-4o-mini-2024-07-18", base_url=server.url + "/v1")
    [result] = run(model.complete([ask()]))
    assert result.usage.cost_usd == pytest.approx(0.15)


def test_results_come_back_in_request_order(loopback) -> None:
    async def slow_first(req: LoopbackRequest) -> Reply:
        text = req.json()["messages"][-1]["content"]
        await asyncio.sleep(0.05 if text == "0" else 0)
        return openai_reply(text)

    server = loopback(slow_first)
    results = run(openai(server).complete([ask(str(i)) for i in range(5)]))
    assert [r.text for r in results] == ["0", "1", "2", "3", "4"]


def test_api_key_is_sent_from_the_environment(loopback, monkeypatch) -> None:
    server = loopback(lambda req: openai_reply("ok"))
    monkeypatch.setenv("LOOPBACK_KEY", "sk-test-123")
    run(openai(server, api_key_env="LOOPBACK_KEY").complete([ask()]))
    assert server.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_a_key_is_sent_without_the_whitespace_around_it(loopback, monkeypatch) -> None:
    """A key copied from a .env file with its newline failed the run with the HTTP client's error."""
    server = loopback(lambda req: openai_reply("ok"))
    monkeypatch.setenv("LOOPBACK_KEY", " sk-test-123\n")
    run(openai(server, api_key_env="LOOPBACK_KEY").complete([ask()]))
    assert server.requests[0].headers["authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize("value, problem", [
    ("", "environment variable LOOPBACK_KEY is set but empty; put the key in it to use http://127.0.0.1:"),
    ("sk-a\nsk-b", "environment variable LOOPBACK_KEY holds a control character (a newline?); set it to the key "
                   "alone"),
])
def test_a_key_variable_that_holds_no_usable_key_says_what_is_wrong_unsent(loopback, monkeypatch, value: str,
                                                                           problem: str) -> None:
    """An empty one was "not set"; a newline inside was the HTTP client's error naming no variable, exit 1."""
    server = loopback(lambda req: openai_reply("ok"))
    monkeypatch.setenv("LOOPBACK_KEY", value)
    with pytest.raises(AuthenticationError) as refused:
        run(openai(server, api_key_env="LOOPBACK_KEY").complete([ask()]))
    assert str(refused.value).startswith(problem) and "sk-" not in str(refused.value)
    assert refused.value.exit_code == 2 and not server.requests


# --- retries -----------------------------------------------------------------------------------


def answered_after_waits(server) -> tuple[Any, list[float]]:
    """One request's result from ``server`` and the waits before each retry it took."""
    waits: list[float] = []
    token = retry_listener.set(lambda model, attempt, wait, reason: waits.append(wait))
    try:
        [result] = run(openai(server).complete([ask()]))
    finally:
        retry_listener.reset(token)
    return result, waits


def test_429_with_retry_after_is_honoured_then_succeeds(loopback) -> None:
    answers = iter([error_reply(429, "slow down", retry_after="1"), openai_reply("done")])
    server = loopback(lambda req: next(answers))
    result, waits = answered_after_waits(server)
    assert result.text == "done"
    assert len(server.requests) == 2
    assert waits == [1.0]


def test_two_500s_then_success(loopback) -> None:
    answers = iter([error_reply(500), error_reply(502), openai_reply("third time")])
    server = loopback(lambda req: next(answers))
    [result] = run(openai(server).complete([ask()]))
    assert result.text == "third time" and len(server.requests) == 3


def test_429_forever_ends_in_rate_limited(loopback) -> None:
    server = loopback(lambda req: error_reply(429, retry_after="0"))
    with pytest.raises(RateLimited, match="still rate limiting"):
        run(openai(server, max_attempts=3).complete([ask()]))
    assert len(server.requests) == 3


def test_a_retry_after_past_the_deadline_says_the_deadline_stopped_it(loopback) -> None:
    """It said "still rate limiting after 1 attempt; lower max_concurrency", with two attempts left."""
    server = loopback(lambda req: error_reply(429, retry_after="45"))
    with pytest.raises(RateLimited) as stopped:
        run(openai(server, max_attempts=3, deadline=30).complete([ask()]))
    assert str(stopped.value).endswith("(the next attempt, 45 s later as Retry-After asked, would begin past the "
                                       "call's deadline of 30 s: raise deadline on the model to wait for it)")
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [520, 522, 524, 507, 599])
def test_every_5xx_but_not_implemented_is_retried(loopback, status: int) -> None:
    # (a proxy's 522 failed the call at once as "refused the request", though the README said 5xx are retried)
    answers = iter([error_reply(status, "upstream timed out"), openai_reply("second time")])
    server = loopback(lambda req: next(answers))
    [result] = run(openai(server).complete([ask()]))
    assert result.text == "second time" and len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 404, 422, 501, 505])
def test_client_errors_are_never_retried(loopback, status: int) -> None:
    server = loopback(lambda req: error_reply(status, "model 'nope' does not exist"))
    with pytest.raises(RequestRejected, match="does not exist"):
        run(openai(server).complete([ask()]))
    assert len(server.requests) == 1


def test_litellms_400_for_a_model_it_does_not_serve_ends_the_run_as_a_404_would(loopback) -> None:
    """LiteLLM answers an unknown model id with a 400: every call was sent (7), and the run ended 1."""
    from orchestra import Agent, Orchestra, Pool
    from orchestra.errors import EndpointNotFound

    server = loopback(lambda req: error_reply(400, "litellm.BadRequestError: Invalid model name passed in model=smolx. "
                                                   "Call `/v1/models` to view available models for your key."))
    model = OpenAICompatible(model="smolx", base_url=server.url + "/v1", api_key_env=None)
    with pytest.raises(EndpointNotFound, match=r"does not serve model smolx \(HTTP 400\): .*; check the model's id$"):
        run(model.complete([ask()]))
    pool = Pool(agents=[Agent(name="a", model=model), Agent(name="b", model=model)])
    sent = len(server.requests)
    result = Orchestra(pool, store=False, plan=False, k=2, mode="global").run("What is 2 + 2?")
    assert (result.status, result.exit_code, result.user_error) == ("failed", 2, True)
    assert len(server.requests) - sent == 1  # (the other call waited for that answer, and was not sent)


def test_an_anthropic_base_url_with_v1_is_told_to_give_the_root(loopback) -> None:
    """Anthropic's path is /v1/messages: a base_url written as for OpenAI, ending in /v1, was a 404 that
    advised adding /v1."""
    from orchestra.errors import EndpointNotFound

    server = loopback(lambda req: error_reply(404, "Not Found"))
    with pytest.raises(EndpointNotFound) as caught:
        run(Anthropic(model="claude", base_url=server.url + "/v1", api_key_env=None).complete([ask()]))
    assert server.requests[0].path == "/v1/v1/messages"
    assert str(caught.value).endswith("base_url ends in /v1 and the API's path begins with it again: give the API's "
                                      "root (Anthropic's is https://api.anthropic.com)")


def test_a_404_names_base_url_and_ends_its_run_as_a_users_error(loopback) -> None:
    """A base_url without its /v1: every request a 404 (96 in one evaluation), exit 1, no word of the URL."""
    from orchestra import Agent, Orchestra, Pool
    from orchestra.errors import EndpointNotFound

    server = loopback(lambda req: error_reply(404, "Not Found"))
    model = OpenAICompatible(model="m", base_url=server.url, api_key_env=None)  # (no /v1)
    with pytest.raises(EndpointNotFound) as caught:
        run(model.complete([ask()]))
    assert str(caught.value).startswith(f"{server.url}/chat/completions answered HTTP 404 (not found) for model m")
    assert str(caught.value).endswith("check base_url (an OpenAI-compatible API's usually ends in /v1) and "
                                      "the model's id")
    pool = Pool(agents=[Agent(name="a", model=model), Agent(name="b", model=model)])
    result = Orchestra(pool, store=False, plan=False, k=2, mode="global").run("What is 2 + 2?")
    assert (result.status, result.exit_code, result.user_error) == ("failed", 2, True)
    # the run's own event loop learns it anew: its first call is sent, the other (waiting for that probe) is not
    assert "check base_url" in (result.error or "") and len(server.requests) == 1 + 1


def test_a_model_an_endpoint_has_no_api_for_fails_again_unsent_for_a_while(loopback, monkeypatch) -> None:
    """An evaluation of 60 items against a base_url without its /v1 sent all 300 of their requests into 404s
    (a refused key sent one): the 404 is remembered per model for ``NOT_FOUND_SECONDS``, as a redirect is."""
    from orchestra.errors import EndpointNotFound

    def handle(req: LoopbackRequest) -> Reply:
        if req.json()["model"] == "moved":
            return Reply(status=302, body="", headers={"Location": "https://elsewhere.test/v1/chat/completions"})
        return error_reply(404, "Not Found") if req.json()["model"] == "gone" else openai_reply("here")

    server = loopback(handle)
    endpoint = Endpoint(server.url + "/v1")

    def model(name: str) -> OpenAICompatible:
        return OpenAICompatible(model=name, endpoint=endpoint, api_key_env=None)

    async def main() -> list[object]:
        first = await asyncio.gather(model("gone").complete_one(ask()), model("moved").complete_one(ask()),
                                     return_exceptions=True)
        again = await asyncio.gather(*(m.complete_one(ask()) for m in (model("gone"), model("moved"))),
                                     return_exceptions=True)
        fine = await model("served").complete_one(ask())
        monkeypatch.setattr(http_module, "NOT_FOUND_SECONDS", 0.0)  # (the time it is remembered has passed)
        later = await asyncio.gather(model("gone").complete_one(ask()), return_exceptions=True)
        return [*first, *again, fine, *later]

    gone, moved, gone_again, moved_again, fine, gone_later = run(main())
    assert all(isinstance(e, EndpointNotFound) for e in (gone, moved, gone_again, moved_again, gone_later))
    assert "a redirect to https://elsewhere.test/v1/chat/completions" in str(moved_again)
    assert getattr(fine, "text", None) == "here"
    assert [r.json()["model"] for r in server.requests] == ["gone", "moved", "served", "gone"]


def test_a_fastapi_servers_error_detail_is_shown_in_its_own_words(loopback) -> None:
    """llama-cpp-python's and vLLM's servers (FastAPI) say {"detail": "Not Found"}: it read as a dict."""
    server = loopback(lambda req: Reply(status=404, body={"detail": "Not Found"}))
    with pytest.raises(RequestRejected, match=r"for model gpt-4o-mini: Not Found; check base_url"):
        run(openai(server).complete([ask()]))


def test_401_fails_at_once_naming_the_variable_not_the_key(loopback, monkeypatch) -> None:
    server = loopback(lambda req: error_reply(401, "invalid api key"))
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-secret-value")
    with pytest.raises(AuthenticationError) as caught:
        run(openai(server, api_key_env="MY_PROVIDER_KEY").complete([ask()]))
    message = str(caught.value)
    assert "MY_PROVIDER_KEY" in message and "sk-secret-value" not in message
    assert "\n" not in message
    assert len(server.requests) == 1


def test_a_refused_key_is_refused_again_unsent_until_it_changes_or_time_passes(loopback, monkeypatch) -> None:
    """Calls queued behind a 401 (by a budget or the concurrency limit) each sent the refused key again."""
    def handle(request: LoopbackRequest) -> Reply:
        good = {k.lower(): v for k, v in request.headers.items()}.get("authorization") == "Bearer sk-good"
        return openai_reply("fine") if good else error_reply(401, "invalid api key")

    server = loopback(handle)
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-bad")
    model = openai(server, api_key_env="MY_PROVIDER_KEY")

    async def calls() -> list[str]:
        outcomes = []
        for key in ("sk-bad", "sk-bad", "sk-good", "sk-bad"):
            os.environ["MY_PROVIDER_KEY"] = key
            try:
                outcomes.append((await model.complete_one(ask())).text)
            except AuthenticationError as refused:
                outcomes.append(f"refused: {refused}")
        return outcomes

    outcomes = run(calls())
    assert outcomes[0] == outcomes[1] == outcomes[3] and "check MY_PROVIDER_KEY" in outcomes[1]
    assert outcomes[2] == "fine" and outcomes[3].startswith("refused")
    assert len(server.requests) == 3  # the second, with the key just refused, was never sent
    monkeypatch.setattr(http_module, "REFUSED_KEY_SECONDS", 0.0)  # (a long-lived process tries it again later)
    server.requests.clear()
    run(calls())
    assert len(server.requests) == 4


@pytest.mark.parametrize(("status", "sent"), [(401, 1), (403, 2)])
def test_calls_queued_behind_a_401_fail_unsent_and_a_403_is_not_taken_for_the_key(loopback, monkeypatch,
                                                                                 status: int, sent: int) -> None:
    """Two calls at max_concurrency 1: the second waited for the first's slot, then sent the key the
    server had just refused. A 403 may be about one request or model (moderation, a model the key may
    not use), so it is not remembered for the key."""
    server = loopback(lambda req: error_reply(status, "no"))
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-bad")
    model = openai(server, api_key_env="MY_PROVIDER_KEY", max_concurrency=1)

    async def both() -> list[Exception | object]:
        return await asyncio.gather(*(model.complete_one(ask()) for _ in range(2)), return_exceptions=True)

    outcomes = run(both())
    assert all(isinstance(outcome, AuthenticationError) for outcome in outcomes)
    assert len(server.requests) == sent


def test_a_request_a_busy_server_never_accepted_is_not_counted(loopback) -> None:
    """A server whose accept queue is full (a loaded server that accepts slowly): a request still
    waiting for its connection at the time limit, or at a Ctrl-C, was counted as sent (and, cut off,
    recorded as a request the server never saw)."""
    import socket

    from orchestra.models.base import cancel_listener

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: one connection fills the queue, later ones wait for ever
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
    model = OpenAICompatible(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, timeout=0.5,
                             max_attempts=1)
    try:  # (the loopback fixture allows model requests)
        with pytest.raises(EndpointUnreachable, match=r"no connection within 0.5 s") as failed:
            run(model.complete_one(ask()))
        assert failed.value.usage.requests == 0  # type: ignore[attr-defined]
        # cut by the call's deadline, not the attempt's timeout: a time limit, not a server that is not running
        # (it read "no connection within 0.000999088 s; is the server running?" and failed as unreachable)
        hurried = OpenAICompatible(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, timeout=30,
                                   deadline=0.5, max_attempts=1)
        with pytest.raises(RequestTimeout, match=r"had not accepted the connection when the call's deadline ran out "
                                                 r"\(deadline=0.5 s per call") as hurried_out:
            run(hurried.complete_one(ask()))
        assert hurried_out.value.usage.requests == 0  # type: ignore[attr-defined]
        cut: list[object] = []

        async def cancelled() -> None:
            cancel_listener.set(lambda request, usage: cut.append(usage))
            call = asyncio.ensure_future(model.complete_one(ask()))
            await asyncio.sleep(0.2)  # (still connecting: the queue stays full)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call

        run(cancelled())
        assert cut == []  # no request was in flight to count
    finally:
        for sock in (listener, *fillers):
            sock.close()


def test_missing_key_variable_is_one_clear_line(loopback, monkeypatch) -> None:
    server = loopback(lambda req: openai_reply("never"))
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="environment variable ABSENT_KEY is not set"):
        run(openai(server, api_key_env="ABSENT_KEY").complete([ask()]))
    assert server.requests == []


def test_hung_server_hits_the_timeout(loopback) -> None:
    server = loopback(lambda req: Reply(hang=True))
    with pytest.raises(RequestTimeout, match="did not finish answering within 0.2 s"):
        run(openai(server, timeout=0.2, max_attempts=2).complete([ask()]))
    assert len(server.requests) == 2


def test_unreachable_endpoint_names_the_url() -> None:
    from orchestra.models.base import allow_model_requests

    with allow_model_requests():
        model = OpenAICompatible(model="m", base_url="http://127.0.0.1:9/v1", max_attempts=2)
        with pytest.raises(EndpointUnreachable, match=r"cannot reach http://127.0.0.1:9/v1/chat/completions") as down:
            run(model.complete([ask()]))
    # two attempts, neither connected: no request reached a server, so none is reported (as the server logs)
    assert down.value.usage.requests == 0  # type: ignore[attr-defined]


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- concurrency -------------------------------------------------------------------------------


def test_rpm_spaces_request_starts(loopback) -> None:
    async def handler(req: LoopbackRequest) -> Reply:
        if len(server.requests) == 1:  # hold the first request until a second one arrives (up to 1 s)
            for _ in range(100):
                if len(server.requests) > 1:
                    break
                await asyncio.sleep(0.01)
        return openai_reply("ok")

    server = loopback(handler)
    model = openai(server, rpm=1)  # one start a minute: the second request may not start yet

    async def first_answer() -> tuple[str, int]:
        stream = model.complete_each([ask("one"), ask("two"), ask("three")])
        async for _, outcome in stream:
            started = len(server.requests)
            await stream.aclose()  # the others are still waiting for their slot: cancelled
            return outcome.text, started
        raise AssertionError("no answer")

    assert run(first_answer()) == ("ok", 1)  # without the limit the server holds the first until the others arrive


# --- structured output -------------------------------------------------------------------------


def test_json_schema_output_parsed_into_pydantic(loopback) -> None:
    server = loopback(lambda req: openai_reply('{"city": "Paris", "population": 2100000}'))
    [result] = run(openai(server).complete([ask("facts", output=Answer)]))
    assert result.parsed == Answer(city="Paris", population=2100000)
    response_format = server.requests[0].json()["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["schema"]["required"] == ["city", "population"]


def test_malformed_json_is_repaired_once(loopback) -> None:
    answers = iter([openai_reply('{"city": "Paris", population: }'),
                    openai_reply('{"city": "Paris", "population": 1}')])
    server = loopback(lambda req: next(answers))
    [result] = run(openai(server).complete([ask("facts", output=Answer)]))
    assert result.parsed.population == 1
    repair = server.requests[1].json()["messages"]
    assert repair[-2]["role"] == "assistant" and "not valid" in repair[-1]["content"]
    assert result.usage.prompt_tokens == 20  # both attempts counted


def test_unrepairable_json_is_a_clear_error(loopback) -> None:
    server = loopback(lambda req: openai_reply('{"city": 3}'))
    with pytest.raises(BadResponse, match="invalid JSON for Answer even after one repair attempt"):
        run(openai(server).complete([ask("facts", output=Answer)]))
    assert len(server.requests) == 2


def test_json_cut_by_max_tokens_is_not_repaired_under_the_same_limit(loopback) -> None:
    """An answer that was all JSON until max_tokens cut it: a repair (a longer prompt, the same
    limit) was sent, cut again and paid for, and the error hid why."""
    server = loopback(lambda req: openai_reply('{"city": "Malm', completion_tokens=8, finish_reason="length"))
    with pytest.raises(BadResponse, match=r"invalid JSON for Answer: .*; the answer reached max_tokens=8 before it "
                                          r"was complete: raise max_tokens") as failed:
        run(openai(server).complete([ask("facts", output=Answer, max_tokens=8)]))
    assert len(server.requests) == 1 and failed.value.usage.completion_tokens == 8  # (billed all the same)
    for cut in ('\n  {"city": "Malm', '```json\n{"city": "Malm'):  # after blanks, or in a fence: cut JSON as well
        fenced = loopback(lambda req, cut=cut: openai_reply(cut, completion_tokens=8, finish_reason="length"))
        with pytest.raises(BadResponse, match="raise max_tokens"):
            run(openai(fenced).complete([ask("facts", output=Answer, max_tokens=8)]))
        assert len(fenced.requests) == 1
    # words before the JSON: the repair, asking for the JSON alone, may fit
    answers = iter([openai_reply('Sure! Here is the JSON: {"city": "Par', finish_reason="length"),
                    openai_reply('{"city": "Paris", "population": 1}')])
    chatty = loopback(lambda req: next(answers))
    [result] = run(openai(chatty).complete([ask("facts", output=Answer, max_tokens=8)]))
    assert result.parsed.population == 1 and len(chatty.requests) == 2
    # whole JSON that breaks the schema, then words the limit cut: repaired, as any invalid answer
    answers = iter([openai_reply('{"city": "Paris", "population": "about two million"}\n\nNote: the',
                                 finish_reason="length"), openai_reply('{"city": "Paris", "population": 2100000}')])
    wordy = loopback(lambda req: next(answers))
    [result] = run(openai(wordy).complete([ask("facts", output=Answer, max_tokens=30)]))
    assert result.parsed.population == 2100000 and len(wordy.requests) == 2


def test_dict_schema_is_validated(loopback) -> None:
    schema = {"type": "object", "properties": {"keywords": {"type": "array", "items": {"type": "string"}}},
              "required": ["keywords"]}
    server = loopback(lambda req: openai_reply('{"keywords": ["algebra", "geometry"]}'))
    [result] = run(openai(server).complete([ask("skills?", output=schema)]))
    assert result.parsed == {"keywords": ["algebra", "geometry"]}


# --- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_success_with_system_prompt_usage_and_cost(loopback, monkeypatch) -> None:
    server = loopback(lambda req: anthropic_reply("Bonjour", input_tokens=2000, output_tokens=100))
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "sk-ant-xyz")
    model = Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env="ANTHROPIC_TEST_KEY")
    [result] = run(model.complete([ask("say hi", system="Answer in French.")]))
    assert result.text == "Bonjour"
    assert result.usage.cost_usd == pytest.approx((2000 * 3 + 100 * 15) / 1e6)
    sent = server.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-xyz" and sent.headers["anthropic-version"]
    body = sent.json()
    assert body["system"] == "Answer in French." and body["messages"] == [{"role": "user", "content": "say hi"}]
    assert body["max_tokens"] == 1024


def test_anthropic_retries_429_then_500(loopback) -> None:
    answers = iter([error_reply(429, retry_after="0"), error_reply(529), anthropic_reply("ok")])
    server = loopback(lambda req: next(answers))
    [result] = run(anthropic(server).complete([ask()]))
    assert result.text == "ok" and len(server.requests) == 3


def test_anthropic_401_names_the_variable(loopback, monkeypatch) -> None:
    server = loopback(lambda req: error_reply(401, "invalid x-api-key"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret")
    model = Anthropic(model="claude-haiku-4-5", base_url=server.url)
    with pytest.raises(AuthenticationError, match="ANTHROPIC_API_KEY") as caught:
        run(model.complete([ask()]))
    assert "sk-ant-secret" not in str(caught.value) and len(server.requests) == 1


def test_anthropic_structured_output_uses_a_forced_tool(loopback) -> None:
    server = loopback(lambda req: anthropic_reply(tool_input={"city": "Rome", "population": 2800000}))
    [result] = run(anthropic(server).complete([ask("facts", output=Answer)]))
    assert result.parsed == Answer(city="Rome", population=2800000)
    body = server.requests[0].json()
    assert body["tool_choice"] == {"type": "tool", "name": "respond"}
    assert body["tools"][0]["input_schema"]["properties"]["city"]["type"] == "string"


def test_the_chat_handler_says_an_anthropic_tool_call_needs_json(loopback) -> None:
    """It failed with "handler failed: Expecting value: line 1 column 1 (char 0)"."""
    server = loopback(chat_handler(lambda req: "hello there"))
    with pytest.raises(BadResponse, match="return the JSON of the tool's input"):
        run(anthropic(server, max_attempts=1).complete([ask("facts", output=Answer)]))


def test_the_chat_handler_lists_its_model_as_an_openai_server_does(loopback) -> None:
    """`GET /v1/models` got a chat completion back: a client listing the server's models read nonsense."""
    import openai as sdk

    server = loopback(chat_handler(lambda req: "hello there"))
    client = sdk.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["loopback"]
    assert run(openai(server).complete([ask("hi")]))[0].text == "hello there"


def test_anthropic_malformed_json_repaired(loopback) -> None:
    answers = iter([anthropic_reply("not json at all"), anthropic_reply('{"city": "Rome", "population": 3}')])

    def handler(req: LoopbackRequest) -> Reply:
        if req.json().get("tools"):
            return error_reply(400, "tools not supported here")
        return next(answers)

    server = loopback(handler)
    [result] = run(anthropic(server).complete([ask("facts", output=Answer)]))
    assert result.parsed.population == 3


def test_the_loopback_cuts_an_answer_at_max_tokens_as_a_real_server_does(loopback) -> None:
    server = loopback(chat_handler(lambda req: "light travels about thirty centimetres " * 10))
    for model in (openai(server), anthropic(server)):
        short, full = run(model.complete([ask("how far?", max_tokens=5), ask("how far?", max_tokens=500)]))
        assert (short.text, short.finish_reason) == ("light travels about ", "length")
        assert full.text.count("thirty") == 10 and full.finish_reason == "stop"
    sent = server.requests[0].json()
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 5


def test_anthropic_hang_times_out_and_max_concurrency_holds(loopback) -> None:
    server = loopback(chat_handler(lambda req: "ok", delay=0.02))
    run(anthropic(server, max_concurrency=2).complete([ask(str(i)) for i in range(10)]))
    assert server.peak_in_flight <= 2
    hung = loopback(lambda req: Reply(hang=True))
    with pytest.raises(RequestTimeout):
        run(Anthropic(model="c", base_url=hung.url, api_key_env=None, timeout=0.1,
                      max_attempts=1).complete([ask()]))


def test_complete_each_reports_failures_per_request(loopback) -> None:
    def handler(req: LoopbackRequest) -> Reply:
        text = req.json()["messages"][-1]["content"]
        return error_reply(400, "bad one") if text == "bad" else openai_reply(text.upper())

    server = loopback(handler)

    async def collect() -> dict[int, object]:
        return {i: r async for i, r in openai(server).complete_each([ask("a"), ask("bad"), ask("c")])}

    outcomes = run(collect())
    assert outcomes[0].text == "A" and outcomes[2].text == "C"
    assert isinstance(outcomes[1], RequestRejected)


def test_retry_listener_sees_attempts(loopback) -> None:
    answers = iter([error_reply(503, retry_after="0"), openai_reply("ok")])
    server = loopback(lambda req: next(answers))
    seen: list[tuple[str, int]] = []
    token = retry_listener.set(lambda model, attempt, wait, reason: seen.append((model, attempt)))
    try:
        run(openai(server).complete([ask()]))
    finally:
        retry_listener.reset(token)
    assert seen == [("gpt-4o-mini", 1)]
    assert json.loads(server.requests[0].body)["messages"][0]["content"] == "hello"


def test_a_key_echoed_by_a_gateway_is_redacted(loopback, monkeypatch) -> None:
    monkeypatch.setenv("ECHO_KEY", "sk-echoed-secret-123")
    server = loopback(lambda req: error_reply(400, f"bad key format: {req.headers['authorization']}"))
    with pytest.raises(RequestRejected) as caught:
        run(openai(server, api_key_env="ECHO_KEY").complete([ask()]))
    assert "sk-echoed-secret-123" not in str(caught.value) and "[redacted]" in str(caught.value)


def test_a_long_error_message_is_cut_with_an_ellipsis_and_a_short_one_whole(loopback) -> None:
    """A server's long error was cut at 200 characters mid-word (inside a quoted string) with nothing to
    say more had been left out."""
    server = loopback(lambda req: error_reply(400, "expected 'text' or 'json' " + "x" * 300))
    with pytest.raises(RequestRejected) as long:
        run(openai(server, max_attempts=1).complete([ask()]))
    said = str(long.value).split("(HTTP 400): ", 1)[1]
    assert said.startswith("expected 'text' or 'json' xx") and said.endswith("x…") and len(said) == 200, said
    short = loopback(lambda req: error_reply(400, "bad one"))
    with pytest.raises(RequestRejected) as brief:
        run(openai(short, max_attempts=1).complete([ask()]))
    assert "bad one" in str(brief.value) and "…" not in str(brief.value)


def test_credentials_in_a_url_never_reach_messages() -> None:
    from orchestra.models.http import display_url

    assert display_url("https://user:pw@host:8443/v1/chat?key=abc") == "https://host:8443/v1/chat"


# --- streaming the answer as it is written ---------------------------------------------------------


def test_a_request_with_on_text_streams_and_gives_the_text_so_far_then_the_same_result(loopback) -> None:
    seen: list[str] = []
    payloads: list[dict] = []

    async def client_has(index: int) -> None:  # the next piece only once the client has this one
        for _ in range(1000):
            if len(seen) > index:
                return
            await asyncio.sleep(0.005)

    def handle(request: LoopbackRequest) -> Reply:
        payloads.append(request.json())
        if request.json().get("response_format"):
            return openai_reply('{"a": 1}')
        if request.json().get("stream"):
            return openai_stream_reply(["Light ", "travels ", "30 cm."], prompt_tokens=17, between=client_has)
        return openai_reply("Light travels 30 cm.", prompt_tokens=17, completion_tokens=6)

    server = loopback(handle)
    model = openai(server)
    streamed = run(model.complete_one(ask(on_text=seen.append)))
    plain = run(model.complete_one(ask()))
    assert seen == ["Light ", "Light travels ", "Light travels 30 cm."]
    assert streamed.text == plain.text == "Light travels 30 cm." and streamed.finish_reason == "stop"
    assert streamed.usage.prompt_tokens == 17 and streamed.usage.requests == 1
    assert payloads[0]["stream"] is True and payloads[0]["stream_options"] == {"include_usage": True}
    assert "stream" not in payloads[1]
    structured = run(model.complete_one(ask(on_text=seen.append, output="json")))  # JSON is only useful whole
    assert structured.parsed == {"a": 1} and "stream" not in payloads[2]


def test_a_streamed_answer_holding_a_line_separator_is_read_whole(loopback) -> None:
    """U+2028 is a line end to ``str.splitlines`` but plain text to JSON and to server-sent events:
    an answer holding one was cut in two and failed as "not JSON"."""
    server = loopback(lambda request: openai_stream_reply(["First line\u2028", "second\u2029 line."]))
    seen: list[str] = []
    result = run(openai(server).complete_one(ask(on_text=seen.append)))
    assert result.text == seen[-1] == "First line\u2028second\u2029 line."


@pytest.mark.parametrize("ending, says", [
    ([b'data: {"error": {"message": "upstream died"}}\n\n'], "answered with an error for m: upstream died"),
    ([b'data: {"object": "error", "message": "upstream exploded"}\n\n', b"data: [DONE]\n\n"],
     "answered with an error for m: upstream exploded"),  # (vLLM's older shape)
    ([b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}\n\n', b"data: [DONE]\n\n"],
     "answered with an error for m: the server aborted the answer part way"),
])
def test_a_stream_that_breaks_off_is_a_failed_call_not_an_answer(loopback, ending: list[bytes], says: str) -> None:
    """Its text so far was taken for the whole answer (a run 'done', and serve's finish_reason 'stop')."""
    async def parts():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "The answer"}, "finish_reason": null}]}\n\n'
        for part in ending:
            yield part

    server = loopback(lambda request: Reply(parts=parts))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None, max_attempts=1)
    with pytest.raises(BadResponse, match=re.escape(says)):
        run(model.complete_one(ask(on_text=lambda text: None)))
    assert len(server.requests) == 1


def test_a_stream_the_server_ends_early_is_retried_as_a_broken_connection(loopback) -> None:
    """A stream closed cleanly before its end (a proxy's idle timeout, a worker restarting) was
    a failed call at once, while the same cut with a reset connection was retried."""
    seen: list[str] = []

    async def cut():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "The ans"}, "finish_reason": null}]}\n\n'

    def handle(request: LoopbackRequest) -> Reply:
        if len(server.requests) == 1:
            return Reply(parts=cut)
        return openai_stream_reply(["The answer ", "is 4."])

    server = loopback(handle)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None, max_attempts=2)
    result = run(model.complete_one(ask(on_text=seen.append)))
    assert result.text == seen[-1] == "The answer is 4." and seen[0] == "The ans"
    assert len(server.requests) == 2 and result.usage.requests == 2
    # the cut attempt was billed too (its prompt estimated: the stream said no usage)
    assert result.usage.prompt_tokens == text_units("hello") + 10
    assert result.usage.completion_tokens == estimate_tokens("The ans") + estimate_tokens("The answer is 4.")
    last = OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None, max_attempts=1)
    server.requests.clear()
    with pytest.raises(ConnectionBroke, match=re.escape(
            "ended its stream for m before the answer was finished (no finish_reason, no [DONE])")) as failed:
        run(last.complete_one(ask(on_text=seen.append)))
    assert len(server.requests) == 1 and failed.value.usage.prompt_tokens > 0  # (billed all the same)


def test_a_server_that_ignores_stream_still_gives_on_text_the_whole_text(loopback) -> None:
    server = loopback(lambda request: openai_reply("Light travels 30 cm."))  # (as orchestra.testing's does)
    seen: list[str] = []
    result = run(openai(server).complete_one(ask(on_text=seen.append)))
    assert server.requests[0].json()["stream"] is True
    assert seen == [result.text] == ["Light travels 30 cm."]  # (it was never called)


def test_an_answer_without_usage_has_its_prompt_tokens_estimated_as_a_streamed_one(loopback) -> None:
    """A server that counts nothing: the prompt was 0 tokens when not streamed (budgets undercounted)
    and estimated when streamed; both estimate it now, and completion tokens too."""
    def bare(request: LoopbackRequest) -> Reply:
        reply = openai_reply("Light travels 30 cm.")
        del reply.body["usage"]
        return reply

    server = loopback(bare)
    result = run(openai(server).complete_one(ask("a question of some length")))
    assert result.usage.prompt_tokens == text_units("a question of some length") > 0
    assert result.usage.completion_tokens == estimate_tokens("Light travels 30 cm.")


def test_a_stream_cut_short_is_retried_and_the_text_starts_again(loopback) -> None:
    seen: list[str] = []
    attempts: list[int] = []

    def handle(request: LoopbackRequest) -> Reply:
        attempts.append(1)
        if len(attempts) == 1:
            return Reply(status=503, body={"error": {"message": "warming up"}})
        return openai_stream_reply(["Second ", "try."], usage=False)

    server = loopback(handle)
    result = run(openai(server).complete_one(ask("a question of some length", on_text=seen.append)))
    assert result.text == "Second try." and seen[-1] == "Second try." and len(attempts) == 2
    assert result.usage.prompt_tokens > 0  # no usage in the stream: the prompt is estimated, not zero


def test_a_stream_whose_connection_broke_mid_answer_is_counted_as_billed(loopback) -> None:
    """The server generated (and billed) the text a broken stream had sent: that attempt counted 0
    tokens (only its request), so a retried answer's tokens were half what the server billed."""
    def broken(pieces: list[str]) -> Reply:
        good = openai_stream_reply(pieces, usage=False)

        async def parts() -> AsyncIterator[bytes]:
            assert good.parts is not None
            async for part in good.parts():
                if b"finish_reason\": \"stop" in part:
                    raise ConnectionResetError("the stream broke")
                yield part
        return Reply(parts=parts)

    answers = iter([broken(["The answer ", "is four"]), openai_stream_reply(["The answer is 4."], prompt_tokens=30)])
    server = loopback(lambda request: next(answers))
    result = run(openai(server).complete_one(ask("What is 2 + 2?", max_tokens=50, on_text=lambda text: None)))
    assert result.text == "The answer is 4." and result.usage.requests == 2
    cut = text_units("What is 2 + 2?"), estimate_tokens("The answer is four")  # (nothing billed before it)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        cut[0] + 30, cut[1] + estimate_tokens("The answer is 4."))
    last = loopback(lambda request: broken(["The answer ", "is four"]))
    with pytest.raises(ConnectionBroke) as failed:  # no attempt left: the error carries what it cost
        run(openai(last, max_attempts=1).complete_one(ask("What is 2 + 2?", on_text=lambda text: None)))
    assert (failed.value.usage.prompt_tokens, failed.value.usage.completion_tokens) == cut


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_token_counts_that_are_not_counts_are_estimated_not_taken(loopback, backend: str) -> None:
    # (a proxy's "prompt_tokens": -5 lowered the run's totals and budget; "7" as text was taken, 7.0 too)
    def reply(prompt: object, completion: object) -> Reply:
        if backend == "openai":
            answer = openai_reply("The answer is four.")
            assert answer.body is not None
            answer.body["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion}
            return answer
        answer = anthropic_reply("The answer is four.")
        assert answer.body is not None
        answer.body["usage"] = {"input_tokens": prompt, "output_tokens": completion}
        return answer

    # (and 2**63 - 1, or 1e30, overflowed the store's sums: no run of the store could be listed)
    replies = iter([reply(-5, "7"), reply("12", 3.0), reply(True, "many"), reply(2 ** 63 - 1, 1e30)])
    server = loopback(lambda request: next(replies))
    model = openai(server) if backend == "openai" else anthropic(server)
    counted = [run(model.complete_one(ask("What is 2 + 2?"))).usage for _ in range(4)]
    written = estimate_tokens("The answer is four.")
    assert [(0 <= u.prompt_tokens < 1000, u.completion_tokens) for u in counted] == [
        (True, 7), (True, 3), (True, written), (True, written)]
    assert counted[1].prompt_tokens == 12


def test_a_short_answer_cut_by_max_tokens_without_usage_counts_max_tokens(loopback) -> None:
    # (a 48-character answer is 12 tokens at 4 a token: the test below could not tell them apart)
    server = loopback(lambda request: openai_stream_reply(["Cut"], usage=False, finish_reason="length"))
    result = run(openai(server).complete_one(ask("a question", max_tokens=12, on_text=lambda text: None)))
    assert result.usage.completion_tokens == 12


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_stream_whose_server_holds_it_open_after_its_usage_is_whole(loopback, transport: str) -> None:
    """A server that sent the finish and usage chunks but neither [DONE] nor the end kept the call
    until its timeout, and the retry was paid again."""
    def held_open() -> Reply:
        whole = openai_stream_reply(["The answer", " is 4."], prompt_tokens=30)

        async def parts() -> AsyncIterator[bytes]:
            assert whole.parts is not None
            async for part in whole.parts():
                if b"[DONE]" in part:
                    await asyncio.sleep(3600)  # (never: the client stops reading first)
                yield part
        return Reply(parts=parts)

    server = loopback(lambda request: held_open())
    options = {} if transport == "aiohttp" else {"transport": lambda n: HttpxTransport(httpx.AsyncHTTPTransport())}
    model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", **options), timeout=30)
    started = time.monotonic()
    result = run(model.complete_one(ask("What is 2 + 2?", on_text=lambda text: None)))
    assert (result.text, result.finish_reason, result.usage.requests) == ("The answer is 4.", "stop", 1)
    assert len(server.requests) == 1 and time.monotonic() - started < 20


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_stream_nobody_asked_for_that_its_server_holds_open_is_read_whole_at_its_end(loopback,
                                                                                      transport: str) -> None:
    """A server that streams a request that did not ask (no ``stream``), then holds the stream open
    after ``[DONE]``: the call waited for its whole timeout, then failed; it is the streamed answer."""
    def held_open() -> Reply:
        whole = openai_stream_reply(["The answer", " is 4."], prompt_tokens=30)

        async def parts() -> AsyncIterator[bytes]:
            assert whole.parts is not None
            async for part in whole.parts():
                yield part
            await asyncio.sleep(3600)  # (never: the client stops reading first)
        return Reply(parts=parts)

    server = loopback(lambda request: held_open())
    options = {} if transport == "aiohttp" else {"transport": lambda n: HttpxTransport(httpx.AsyncHTTPTransport())}
    model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", **options), timeout=30, max_attempts=1)
    started = time.monotonic()
    result = run(model.complete_one(ask("What is 2 + 2?")))
    assert "stream" not in server.requests[0].json()
    assert (result.text, result.finish_reason, result.usage.prompt_tokens, result.usage.requests) == (
        "The answer is 4.", "stop", 30, 1)
    assert time.monotonic() - started < 20


def transport_options(transport: str) -> dict[str, Any]:
    """An endpoint's options for sending over ``transport`` (aiohttp is the default)."""
    return {} if transport == "aiohttp" else {"transport": lambda n: HttpxTransport(httpx.AsyncHTTPTransport())}


def anthropic_events(text: str, *, input_tokens: int = 10) -> bytes:
    """A Messages answer as the API streams it, ``message_start`` to ``message_stop``."""
    def event(kind: str, body: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    return b"".join([
        event("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                            "model": "c", "stop_reason": None,
                                            "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {}),
        *[event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
          for piece in (text[:5], text[5:])],
        event("content_block_stop", {"index": 0}),
        event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": 7}}),
        event("message_stop", {})])


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_an_anthropic_stream_nobody_asked_for_that_its_server_holds_open_is_the_answer(loopback,
                                                                                       transport: str) -> None:
    """A server that streams a Messages request that did not ask, then holds the stream open after
    ``message_stop``: the call waited for its whole timeout, then failed; it is the streamed answer."""
    async def parts() -> AsyncIterator[bytes]:
        yield anthropic_events("The answer is 4.", input_tokens=30)
        await asyncio.sleep(3600)  # (never: the client stops reading first)

    server = loopback(lambda request: Reply(parts=parts))
    model = Anthropic(model="c", endpoint=Endpoint(server.url, **transport_options(transport)), timeout=30,
                      max_attempts=1)
    started = time.monotonic()
    result = run(model.complete_one(ask("What is 2 + 2?")))
    assert "stream" not in server.requests[0].json()
    assert (result.text, result.finish_reason, result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.requests) == ("The answer is 4.", "stop", 30, 7, 1)
    assert time.monotonic() - started < 20


def test_an_anthropic_stream_nobody_asked_for_is_a_tool_call_an_error_or_cut_as_it_says(loopback) -> None:
    def event(kind: str, body: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    def streamed(*events: bytes) -> Reply:
        async def parts() -> AsyncIterator[bytes]:
            for part in events:
                yield part
        return Reply(parts=parts)

    tool = [event("message_start", {"message": {"content": [], "usage": {"input_tokens": 12}}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "t",
                                                                        "name": "respond", "input": {}}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                "partial_json": '{"city": "Oslo", "popu'}}),
            event("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                "partial_json": 'lation": 700000}'}}),
            event("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            event("message_stop", {})]
    server = loopback(lambda request: streamed(*tool))
    result = run(anthropic(server).complete_one(ask("Oslo?", output=Answer)))
    assert result.parsed == Answer(city="Oslo", population=700000) and result.usage.prompt_tokens == 12

    server = loopback(lambda request: streamed(tool[0], event("error", {"error": {"type": "overloaded_error",
                                                                                  "message": "Overloaded"}})))
    with pytest.raises(BadResponse, match="answered with an error for claude-sonnet-4-5: Overloaded"):
        run(anthropic(server, max_attempts=1).complete_one(ask()))
    server = loopback(lambda request: streamed(*tool[:3]))
    with pytest.raises(ConnectionBroke, match="before the answer was finished"):
        run(anthropic(server, max_attempts=2).complete_one(ask()))
    assert len(server.requests) == 2


class RawServer:
    """A server on 127.0.0.1 that answers each request with ``answer``'s bytes as they are, unchecked,
    and then sends nothing more unless the client asks again on that connection."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # (closed)
                return
            self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        received = b""
        with contextlib.suppress(OSError):
            while data := connection.recv(65536):
                received += data
                while b"\r\n\r\n" in received:
                    head, _, rest = received.partition(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                    if len(rest) < length:
                        break
                    received = rest[length:]
                    self.requests += 1
                    connection.sendall(self.answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.connections:
            connection.close()


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[RawServer]:
    """A ``RawServer`` for the test's length; real model requests are allowed while it runs."""
    server = RawServer(answer)
    try:
        with allow_model_requests():
            yield server
    finally:
        server.close()


def chunked(content_type: str, *chunks: bytes) -> bytes:
    """An HTTP/1.1 answer's head and ``chunks`` in chunked transfer encoding (an empty one ends the body)."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    return head + b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for chunk in chunks)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_whole_json_answer_whose_chunked_body_the_server_never_ends_is_the_answer(transport: str) -> None:
    """A chat.completion sent whole in a chunked body whose last (empty) chunk never came: the call
    waited for its whole timeout, then failed. Nothing sent after a whole JSON object can belong to it."""
    body = json.dumps(openai_reply("The answer is 4.", prompt_tokens=30).body).encode()
    with raw_server(chunked("application/json", body[:40], body[40:])) as server:
        model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", **transport_options(transport)),
                                 timeout=30, max_attempts=1)
        started = time.monotonic()
        result = run(model.complete_one(ask("What is 2 + 2?")))
        assert (result.text, result.usage.prompt_tokens, server.requests) == ("The answer is 4.", 30, 1)
        assert time.monotonic() - started < 20


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_chunked_json_answer_that_ends_keeps_its_connection_for_the_next(transport: str) -> None:
    body = json.dumps(openai_reply("The answer is 4.").body).encode()
    with raw_server(chunked("application/json", body, b"")) as server:
        model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", **transport_options(transport)),
                                 timeout=30, max_attempts=1)

        async def twice() -> list[str]:
            return [(await model.complete_one(ask())).text for _ in range(2)]

        assert run(twice()) == ["The answer is 4."] * 2
        assert (server.requests, len(server.connections)) == (2, 1)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_an_answer_shorter_than_its_content_length_times_out_saying_how_much_came(transport: str) -> None:
    """The server promised more bytes than it sent: waiting is right, but the timeout said only that
    the server did not finish answering."""
    body = json.dumps(openai_reply("The answer is 4.").body).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n"
    with raw_server(head.encode() + body) as server:
        model = OpenAICompatible(model="m", endpoint=Endpoint(server.url + "/v1", **transport_options(transport)),
                                 timeout=1, max_attempts=1)
        with pytest.raises(RequestTimeout, match=rf"sent only {len(body)} of the {len(body) + 100} bytes its "
                                                 r"answer's Content-Length promised within 1 s \(timeout=1 s"):
            run(model.complete_one(ask()))


def test_a_stream_that_broke_before_any_text_is_a_request_and_no_tokens(loopback) -> None:
    def broken() -> Reply:  # the role chunk, then the connection goes
        good = openai_stream_reply(["The answer"], usage=False)

        async def parts() -> AsyncIterator[bytes]:
            assert good.parts is not None
            async for part in good.parts():
                yield part
                raise ConnectionResetError("the stream broke")
        return Reply(parts=parts)

    answers = iter([broken(), openai_stream_reply(["The answer is 4."], prompt_tokens=30)])
    server = loopback(lambda request: next(answers))
    result = run(openai(server).complete_one(ask("What is 2 + 2?", on_text=lambda text: None)))
    assert (result.text, result.usage.requests, result.usage.prompt_tokens) == ("The answer is 4.", 2, 30)


def test_a_stream_without_usage_is_counted_at_the_rates_its_server_billed(loopback) -> None:
    """llama-cpp-python's streams carry no usage: the prompt was counted at 4 characters a token
    (half what the server bills with its template) and the answer likewise, 16 tokens where
    max_tokens=12 had cut it. The prompt is now counted as the server billed this model's other
    prompts (a fixed part, its template, and a rate), and an answer cut by max_tokens is that many."""
    def handle(request: LoopbackRequest) -> Reply:
        billed = len(request.prompt) // 2 + 20  # a dense tokenizer and a chat template
        payload = request.json() or {}
        if payload.get("stream"):  # cut by max_tokens=12; at 5 said to have stopped on its own
            return openai_stream_reply(["A rather long answer that ", "the limit cut off here"], usage=False,
                                       finish_reason="length" if payload["max_tokens"] == 12 else "stop")
        return openai_reply("Plain.", prompt_tokens=billed)

    server = loopback(handle)
    model = openai(server)
    before = run(model.complete_one(ask("x" * 400, max_tokens=12, on_text=lambda text: None)))
    assert (before.usage.prompt_tokens, before.usage.completion_tokens) == (100, 12)  # nothing billed yet: units
    run(model.complete_one(ask("y" * 400)))  # billed 220: 100 units
    run(model.complete_one(ask("w" * 800)))  # billed 420: 200 units (so 20 of template, 2 a unit)
    streamed = run(model.complete_one(ask("z" * 1200, max_tokens=12, on_text=lambda text: None)))
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens) == (620, 12)  # as it would be billed
    short = run(model.complete_one(ask("hi", max_tokens=12, on_text=lambda text: None)))
    assert short.usage.prompt_tokens == 22  # (its template, not 4 tokens at the overall rate)
    stopped = run(model.complete_one(ask("z" * 800, max_tokens=5, on_text=lambda text: None)))
    assert stopped.usage.completion_tokens == 5  # (its 48 characters, 12 tokens at 4 a token, cannot be)


def test_a_prompt_is_reserved_at_the_highest_rate_and_template_its_server_billed() -> None:
    from orchestra.models.prompt_gauge import TEMPLATE_TOKENS, PromptGauge

    assert (text_units("word " * 20), text_units("1234, 5678"), text_units("光合作用")) == (25, 10, 12)
    gauge = PromptGauge()
    request = ask("x" * 400)  # 100 units
    assert gauge.worst(request) == 100 + TEMPLATE_TOKENS  # nothing billed: a token a unit, and a template
    gauge.billed(request, 80)  # under that: nothing changes
    assert gauge.worst(request) == 100 + TEMPLATE_TOKENS
    gauge.billed(ask("y" * 600), 332)  # (332 - 32) / 150: two tokens a unit
    assert gauge.worst(request) == 200 + TEMPLATE_TOKENS and gauge.worst(ask("z" * 1000)) == 500 + TEMPLATE_TOKENS
    gauge.billed(ask("hi"), 300)  # a short prompt's big bill is its template, not a rate of 268 a unit
    assert gauge.worst(request) == 200 + 298
    structured = ask("x" * 400, output={"type": "object"})  # the JSON instructions may be appended: counted
    assert gauge.worst(structured) > gauge.worst(request) + 10
    enforced = PromptGauge(instructions=lambda request: False)  # a server that takes the schema as such
    assert enforced.worst(structured) == enforced.worst(request)


def test_a_streamed_event_nested_too_deeply_is_a_bad_response_not_a_crash(loopback) -> None:
    """A stream with an event too deep to decode: the call fails with the whole answer's one-line
    error (the text seen so far is kept from the events that could be read)."""
    seen: list[str] = []
    good = openai_stream_reply(["Light "], usage=False)

    async def parts() -> AsyncIterator[bytes]:
        assert good.parts is not None
        async for part in good.parts():
            if b"[DONE]" in part:
                yield b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"
            yield part

    server = loopback(lambda request: Reply(parts=parts))
    with pytest.raises(BadResponse, match="nested too deeply"):
        run(openai(server).complete_one(ask(on_text=seen.append)))
    assert seen == ["Light "]


def test_a_stream_cut_inside_its_last_event_is_retried_and_a_whole_bad_one_is_not() -> None:
    """A stream cut inside an event (a proxy's cut) failed at once; whole bodies that are not JSON (JSON Lines,
    `[ERROR] ...`) were retried as JSON that broke off (found by a review)."""
    from orchestra.models.http import _not_json, _Retryable
    from orchestra.models.transport import Answer

    def outcome(body: bytes, kind: str = "text/event-stream") -> object:
        return _not_json(Answer(200, {"content-type": kind}, body), "http://x/v1/chat/completions", 200)

    assert isinstance(outcome(b'data: {"id": "a"}\n\ndata: {"id": "b", "cho'), _Retryable)
    assert not isinstance(outcome(b"data: not json\n\n"), _Retryable)
    for whole in (b'{"a": 1}\n{"b": 2}\n', b"[ERROR] upstream failed"):
        assert not isinstance(outcome(whole, "application/json"), _Retryable)
    for cut in (b'{"id": "x", "choices": [{"mess', b'{"a": 1,', b""):
        assert isinstance(outcome(cut, "application/json"), _Retryable)
