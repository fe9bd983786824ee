"""Tests that kill mutants of the model adapters (http, structured, openai, anthropic, transport) that
survived the rest of the suite: each pins a behaviour a user would notice if it broke."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from pydantic import BaseModel
from test_models_http import answered_after_waits, ask, openai, run

from orchestra.errors import AuthenticationError, BadResponse, EndpointNotFound, RateLimited, RequestTimeout
from orchestra.models import Anthropic, ChatRequest, OpenAICompatible
from orchestra.models.http import Endpoint
from orchestra.models.structured import (
    StructuredOutputError,
    check_schema,
    extract_json,
    schema_problem,
    with_instructions,
)
from orchestra.models.transport import HttpxTransport
from orchestra.testing import (
    LoopbackRequest,
    Reply,
    allow_model_requests,
    anthropic_reply,
    error_reply,
    openai_reply,
)


def mocked(answer, **options) -> OpenAICompatible:
    """A model whose requests a ``httpx.MockTransport`` answers in the process (headers of any kind)."""
    endpoint = Endpoint("http://models.test/v1", transport=lambda n: HttpxTransport(httpx.MockTransport(answer)))
    return OpenAICompatible(model="m", endpoint=endpoint, **options)


# --- http: retries, waits, deadlines -------------------------------------------------------------


def test_a_409_is_retried_and_the_waits_double_from_half_a_second(loopback) -> None:
    # (409 Conflict is in RETRY_STATUSES; the backoff is 0.5 s, then 1 s, 2 s...)
    answers = iter([error_reply(409, "conflict"), error_reply(502, "bad gateway"), openai_reply("third")])
    server = loopback(lambda req: next(answers))
    result, waits = answered_after_waits(server)
    assert result.text == "third" and len(server.requests) == 3
    assert waits == [0.5, 1.0]


def test_the_deadline_bounds_an_attempt_shorter_than_its_timeout(loopback) -> None:
    # an attempt may take at most what is left of the call's deadline, not the whole per-attempt timeout
    server = loopback(lambda req: Reply(hang=True))
    model = openai(server, timeout=10, deadline=0.3)
    with pytest.raises(RequestTimeout, match=r"had not finished answering when the call's deadline ran out \("
                                             r"deadline=0.3 s per call, counted from its first attempt; 1 attempt, "
                                             r"timeout=10 s per attempt"):
        run(model.complete_one(ask()))
    assert len(server.requests) == 1


def test_a_retry_after_longer_than_orchestra_waits_fails_at_once_saying_so(loopback) -> None:
    server = loopback(lambda req: error_reply(429, "slow down", retry_after="100"))
    with pytest.raises(RateLimited, match=r"asked to wait 100 s before another request \(HTTP 429, Retry-After\), "
                                          r"longer than Orchestra waits \(60 s\)"):
        run(openai(server, max_attempts=2, deadline=5).complete_one(ask()))
    assert len(server.requests) == 1


def test_a_failure_after_several_attempts_counts_them_in_the_plural(loopback) -> None:
    server = loopback(lambda req: error_reply(503, "busy", retry_after="0"))
    with pytest.raises(BadResponse, match=r"failed with HTTP 503 after 2 attempts: busy"):
        run(openai(server, max_attempts=2).complete_one(ask()))


def test_a_key_variable_set_but_empty_is_refused_as_empty_and_nothing_is_sent(loopback, monkeypatch) -> None:
    # (``export KEY=`` sent the request without a key: the server's 401 hid that the variable was empty;
    # then it was said to be "not set", though it was)
    server = loopback(lambda req: openai_reply("never"))
    monkeypatch.setenv("EMPTY_KEY", "")
    with pytest.raises(AuthenticationError, match="environment variable EMPTY_KEY is set but empty"):
        run(openai(server, api_key_env="EMPTY_KEY").complete_one(ask()))
    assert server.requests == []


def test_a_refused_key_is_refused_before_waiting_for_a_rate_limit_slot(loopback, monkeypatch) -> None:
    # a call after a 401 fails at once, unsent: it does not first wait a minute for rpm=1's next slot
    server = loopback(lambda req: error_reply(401, "invalid api key"))
    monkeypatch.setenv("RPM_KEY", "sk-bad")
    model = openai(server, api_key_env="RPM_KEY", rpm=1)

    async def twice() -> list[BaseException]:
        outcomes: list[BaseException] = []
        for _ in range(2):
            try:
                await asyncio.wait_for(model.complete_one(ask()), 10)
            except (AuthenticationError, asyncio.TimeoutError) as failed:
                outcomes.append(failed)
        return outcomes

    outcomes = run(twice())
    assert [type(o) for o in outcomes] == [AuthenticationError, AuthenticationError]
    assert len(server.requests) == 1


# --- http: what an answer holds --------------------------------------------------------------------


def test_a_json_answer_that_is_not_an_object_is_a_bad_response(loopback) -> None:
    server = loopback(lambda req: Reply(body=[{"choices": []}]))
    with pytest.raises(BadResponse, match="answered with JSON that is not an object"):
        run(openai(server, max_attempts=1).complete_one(ask()))


def test_an_answer_with_no_text_cut_by_max_tokens_says_to_raise_it(loopback) -> None:
    # (a reasoning model that thought until max_tokens: the hint is the fix)
    server = loopback(lambda req: openai_reply("", completion_tokens=16, finish_reason="length"))
    with pytest.raises(BadResponse, match=r"answered with no text for gpt-4o-mini \(finish_reason length\); it "
                                          r"reached max_tokens first .*raise max_tokens") as cut:
        run(openai(server).complete_one(ask(max_tokens=16)))
    assert cut.value.usage.completion_tokens == 16  # type: ignore[attr-defined]
    stopped = loopback(lambda req: openai_reply("  ", finish_reason="stop"))
    with pytest.raises(BadResponse, match=r"\(finish_reason stop\)$"):
        run(openai(stopped).complete_one(ask()))


def test_an_event_stream_with_a_charset_is_read_as_one() -> None:
    # ``text/event-stream; charset=utf-8`` (as some proxies send it) is a stream too
    events = (b'data: {"choices": [{"index": 0, "delta": {"content": "Light "}, "finish_reason": null}]}\n\n'
              b'data: {"choices": [{"index": 0, "delta": {"content": "travels."}, "finish_reason": "stop"}]}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n'
              b"data: [DONE]\n\n")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=events)

    seen: list[str] = []
    with allow_model_requests():
        result = run(mocked(answer, max_attempts=1).complete_one(ask(on_text=seen.append)))
    assert result.text == seen[-1] == "Light travels."
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 2)


def test_an_empty_data_line_in_a_stream_is_skipped_not_taken_for_bad_json(loopback) -> None:
    # (a keep-alive ``data:`` with nothing after it is no event)
    async def parts():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
        yield b"data:\n\n"
        yield b'data: {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]}\n\n'
        yield b"data: [DONE]\n\n"

    server = loopback(lambda request: Reply(parts=parts))
    result = run(openai(server, max_attempts=1).complete_one(ask(on_text=lambda text: None)))
    assert result.text == "Hi there"


# --- structured output: finding the JSON, and the schema's keywords ---------------------------------


@pytest.mark.parametrize("text, value", [
    ('```json\n42\n```', 42),  # a fenced value that is no object or array
    ('```\n"yes"\n```', "yes"),
    ("The scores are [3, 1, 2], in order.", [3, 1, 2]),  # an array in prose
    ('I use {curly} words, then the answer: {"a": 1}', {"a": 1}),  # a brace that opens no JSON comes first
])
def test_extract_json_finds_the_value_wherever_the_model_put_it(text: str, value: object) -> None:
    assert extract_json(text) == value


def test_min_length_allows_a_string_of_exactly_that_length() -> None:
    check_schema("ab", {"type": "string", "minLength": 2})
    with pytest.raises(StructuredOutputError, match=r"\$: shorter than 2 characters"):
        check_schema("a", {"type": "string", "minLength": 2})


def test_additional_items_limits_what_follows_a_draft_7_tuple() -> None:
    tuple_only = {"type": "array", "items": [{"type": "integer"}], "additionalItems": False}
    check_schema([1], tuple_only)
    with pytest.raises(StructuredOutputError, match=r"\$\[1\]: no value is allowed here"):
        check_schema([1, "extra"], tuple_only)
    strings_after = {"type": "array", "items": [{"type": "integer"}], "additionalItems": {"type": "string"}}
    check_schema([1, "a", "b"], strings_after)
    with pytest.raises(StructuredOutputError, match=r"\$\[2\]: expected string, got int"):
        check_schema([1, "a", 2], strings_after)


def test_an_empty_type_list_is_a_schema_problem() -> None:
    # (no value has no type: every answer would fail, and be repaired, for ever)
    assert schema_problem({"type": "object", "properties": {"a": {"type": []}}}) == (
        "$.properties.a.type must be one of object, array, string, integer, number, boolean, null (or a list of "
        "them), not []")


def test_json_instructions_go_after_the_last_message_and_the_system_prompt_is_kept() -> None:
    request = ask("Name a city.", system="Be brief.", output="json")
    changed = with_instructions(request)
    assert [m.role for m in changed.messages] == ["system", "user"]
    assert changed.messages[0].content == "Be brief."
    assert changed.messages[1].content == "Name a city.\n\nAnswer with one valid JSON value and nothing else."


def test_a_json_request_with_a_system_prompt_keeps_both_messages_on_the_wire(loopback) -> None:
    server = loopback(lambda req: openai_reply('{"city": "Oslo"}'))
    result = run(openai(server).complete_one(ask("Name a city.", system="Be brief.", output="json")))
    assert result.parsed == {"city": "Oslo"}
    sent = server.requests[0].json()
    assert sent["response_format"] == {"type": "json_object"}  # (no schema: JSON at most, so asked in words too)
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a city.\n\nAnswer with one valid JSON value and "
                                                            "nothing else."}]


# --- openai: the request on the wire -----------------------------------------------------------------


class AnAnswerWhoseModelClassNameIsFarLongerThanTheSixtyFourCharactersOpenAIAllows(BaseModel):
    city: str


def test_json_schema_goes_unenforced_by_strict_mode_under_a_name_of_at_most_64_characters(loopback) -> None:
    # strict mode would refuse the schemas pydantic writes (optional keys, no additionalProperties: false),
    # and OpenAI refuses a name over 64 characters: either would cost the endpoint its json_schema mode
    server = loopback(lambda req: openai_reply('{"city": "Oslo"}'))
    model = AnAnswerWhoseModelClassNameIsFarLongerThanTheSixtyFourCharactersOpenAIAllows
    result = run(openai(server).complete_one(ask("Name a city.", output=model)))
    assert result.parsed == model(city="Oslo")
    sent = server.requests[0].json()["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is False
    assert sent["json_schema"]["name"] == model.__name__[:64]


# The json_schema name was the schema's title (or the pydantic class's name) cut to 64 characters, but
# OpenAI takes only names matching ^[a-zA-Z0-9_-]{1,64}$: a dict schema titled "City facts", or a generic
# pydantic model (``Page[Item]``), was answered 400, which Orchestra took for a refusal of json_schema for
# every model on the endpoint.
def test_the_json_schema_name_is_one_openai_accepts_whatever_the_schema_title(loopback) -> None:
    server = loopback(lambda req: openai_reply('{"city": "Oslo"}'))
    schema = {"title": "City facts", "type": "object", "properties": {"city": {"type": "string"}}}
    run(openai(server).complete_one(ask("Name a city.", output=schema)))
    name = server.requests[0].json()["response_format"]["json_schema"]["name"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name), name


# --- openai: what an answer costs and how it ended ----------------------------------------------------


def test_an_error_sent_with_http_200_carries_the_tokens_it_was_billed(loopback) -> None:
    server = loopback(lambda req: Reply(body={"error": {"message": "the model overloaded mid answer"},
                                             "usage": {"prompt_tokens": 12, "completion_tokens": 7}}))
    with pytest.raises(BadResponse, match="answered with an error for gpt-4o-mini: the model overloaded") as failed:
        run(openai(server, max_attempts=1).complete_one(ask()))
    usage = failed.value.usage  # type: ignore[attr-defined]
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 7)


def test_a_chunk_after_the_finishing_one_does_not_undo_its_finish_reason(loopback) -> None:
    # (a server that sends its usage in a chunk whose choice says finish_reason null, after the one that said "length")
    async def parts():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Light travels"}, "finish_reason": null}]}\n\n'
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'
        yield (b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": null}], '
               b'"usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\n')
        yield b"data: [DONE]\n\n"

    server = loopback(lambda request: Reply(parts=parts))
    result = run(openai(server).complete_one(ask(max_tokens=3, on_text=lambda text: None)))
    assert (result.text, result.finish_reason) == ("Light travels", "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 3)


def test_a_stream_that_said_done_without_a_finish_reason_is_a_whole_answer(loopback) -> None:
    # ``[DONE]`` ends a stream as surely as a finish_reason: the answer is not taken for a cut one and asked again
    async def parts():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Light travels."}}]}\n\n'
        yield b"data: [DONE]\n\n"

    server = loopback(lambda request: Reply(parts=parts))
    result = run(openai(server).complete_one(ask(on_text=lambda text: None)))
    assert (result.text, result.finish_reason) == ("Light travels.", None)
    assert len(server.requests) == 1


def test_a_model_without_a_key_sends_no_authorization_header(loopback) -> None:
    # (not "Bearer None": a gateway in front of a keyless server may refuse a malformed key)
    server = loopback(lambda req: openai_reply("ok"))
    run(OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None).complete_one(ask()))
    assert "authorization" not in server.requests[0].headers


def test_a_message_content_that_is_not_text_is_a_bad_response_not_a_crash(loopback) -> None:
    def parts_list(req: LoopbackRequest) -> Reply:
        reply = openai_reply("x")
        reply.body["choices"][0]["message"]["content"] = [{"type": "text", "text": "Paris"}]
        return reply

    server = loopback(parts_list)
    with pytest.raises(BadResponse, match="returned a message content that is not text for gpt-4o-mini"):
        run(openai(server).complete_one(ask()))


def test_a_finish_reason_that_is_not_a_string_is_read_as_none(loopback) -> None:
    def odd(req: LoopbackRequest) -> Reply:
        reply = openai_reply("Paris")
        reply.body["choices"][0]["finish_reason"] = {"type": "stop"}
        return reply

    server = loopback(odd)
    result = run(openai(server).complete_one(ask()))
    assert (result.text, result.finish_reason) == ("Paris", None)


# --- anthropic -----------------------------------------------------------------------------------------


def anthropic(server, **options) -> Anthropic:
    return Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env=None, **options)


def test_anthropic_caps_the_temperature_at_its_apis_most_and_sends_zero(loopback) -> None:
    # (the Messages API takes 0 to 1: an OpenAI-style 1.5 would be refused with a 400; 0, greedy, is no
    # temperature left out, which the API would take for its default of 1)
    server = loopback(lambda req: anthropic_reply("ok"))
    run(anthropic(server).complete([ask(temperature=1.5), ask(temperature=0.3), ask(temperature=0)]))
    assert sorted(request.json().get("temperature") for request in server.requests) == [0, 0.3, 1.0]


def test_anthropic_sends_stop_words_as_stop_sequences(loopback) -> None:
    server = loopback(lambda req: anthropic_reply("ok", stop_reason="stop_sequence"))
    result = run(anthropic(server).complete_one(ask(stop=["END", "###"])))
    assert server.requests[0].json()["stop_sequences"] == ["END", "###"]
    assert result.finish_reason == "stop"


def test_anthropic_asks_for_json_without_a_schema_in_words_not_with_a_tool(loopback) -> None:
    # a tool needs an input schema: JSON with none is asked for in the prompt
    server = loopback(lambda req: anthropic_reply('{"city": "Rome"}'))
    result = run(anthropic(server).complete_one(ask("Name a city.", output="json")))
    assert result.parsed == {"city": "Rome"}
    sent = server.requests[0].json()
    assert "tools" not in sent and "tool_choice" not in sent
    assert sent["messages"] == [{"role": "user", "content": "Name a city.\n\nAnswer with one valid JSON value and "
                                                            "nothing else."}]


def test_anthropic_joins_an_answers_text_blocks_as_written_and_skips_the_rest(loopback) -> None:
    def blocks(req: LoopbackRequest) -> Reply:
        reply = anthropic_reply("x")
        reply.body["content"] = [{"type": "thinking", "thinking": "The user wants a greeting."},
                                 {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
        return reply

    server = loopback(blocks)
    assert run(anthropic(server).complete_one(ask())).text == "Hello, world."


def test_anthropic_teaches_its_prompt_gauge_what_the_server_billed(loopback) -> None:
    # budgets reserve a prompt by what its server billed for others (here a system prompt of 500 tokens)
    server = loopback(lambda req: anthropic_reply("ok", input_tokens=500))
    model = anthropic(server)
    before = model.prompt_gauge.worst(ask("hi"))
    run(model.complete_one(ask("hi")))
    assert before < 100 and model.prompt_gauge.worst(ask("hi")) >= 500


def test_anthropic_puts_the_schema_in_the_prompt_where_the_server_refuses_a_forced_tool(loopback) -> None:
    # tools without tool_choice let the model answer in prose: a refused tool_choice is no tool at all
    def handle(req: LoopbackRequest) -> Reply:
        if "tool_choice" in req.json():
            return error_reply(400, "tool_choice: forcing a tool is not supported by this proxy")
        return anthropic_reply('{"city": "Rome"}')

    server = loopback(handle)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    result = run(anthropic(server).complete_one(ask("Name a city.", output=schema)))
    assert result.parsed == {"city": "Rome"} and len(server.requests) == 2
    retried = server.requests[1].json()
    assert "tools" not in retried and "tool_choice" not in retried
    assert '"required":["city"]' in retried["messages"][-1]["content"]


def test_anthropic_refuses_a_blank_answer(loopback) -> None:
    server = loopback(lambda req: anthropic_reply(" \n ", stop_reason="max_tokens"))
    with pytest.raises(BadResponse, match=r"answered with no text for claude-sonnet-4-5 \(finish_reason length\)"):
        run(anthropic(server).complete_one(ask()))


def test_anthropic_content_that_is_not_a_list_of_blocks_is_named_so(loopback) -> None:
    def flat(req: LoopbackRequest) -> Reply:
        reply = anthropic_reply("x")
        reply.body["content"] = "Paris"  # (a proxy that wrote it as Chat Completions does)
        return reply

    server = loopback(flat)
    with pytest.raises(BadResponse, match="returned no content blocks for claude-sonnet-4-5"):
        run(anthropic(server).complete_one(ask()))


def test_anthropic_sends_every_system_message_as_one_system_prompt(loopback) -> None:
    server = loopback(lambda req: anthropic_reply("ok"))
    request = ChatRequest(messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "system", "content": "Use SI."},
                                    {"role": "user", "content": "How far does light go in a ns?"}])
    run(anthropic(server).complete_one(request))
    sent = server.requests[0].json()
    assert sent["system"] == "Be brief.\n\nUse SI."
    assert sent["messages"] == [{"role": "user", "content": "How far does light go in a ns?"}]


# --- transport ------------------------------------------------------------------------------------------


def moved(req: LoopbackRequest, body: str) -> Reply:
    if req.path.startswith("/v1/"):  # (a base_url the server has moved: /v1 now answers with a redirect)
        return Reply(status=301, body=body, headers={"Location": "/v2/chat/completions"})
    return openai_reply("from where the redirect led")


def test_a_redirect_is_not_followed(loopback) -> None:
    # a POST followed through a 301 becomes a GET elsewhere: the answer, if any, is not to this request
    server = loopback(lambda req: moved(req, "<html><body>Moved Permanently</body></html>"))
    with pytest.raises(EndpointNotFound, match=r"answered HTTP 301, a redirect to /v2/chat/completions, which "
                                               r"Orchestra does not follow .*; is base_url the API's address"):
        run(OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None).complete_one(ask()))
    assert [request.path for request in server.requests] == ["/v1/chat/completions"]


# An HTTP 3xx was read as a success whose body is not JSON: an empty-bodied redirect was retried as "an
# empty body (not JSON)", as if a proxy had cut an answer, and the error named neither the redirect nor where
# it points (Location).
def test_an_empty_redirect_fails_at_once(loopback) -> None:
    server = loopback(lambda req: moved(req, ""))
    with pytest.raises(EndpointNotFound, match="answered HTTP 301, a redirect to /v2/chat/completions, which "
                                               "Orchestra does not follow"):
        run(OpenAICompatible(model="m", base_url=server.url + "/v1", api_key_env=None,
                             max_attempts=2).complete_one(ask()))
    assert len(server.requests) == 1


def test_proxy_variables_in_the_environment_are_not_used(loopback, monkeypatch) -> None:
    # (a proxy set for the internet would carry requests meant for a server on this machine or network)
    server = loopback(lambda req: openai_reply("direct"))
    proxy = loopback(lambda req: openai_reply("through the proxy"))
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert run(openai(server).complete_one(ask())).text == "direct"
    assert proxy.requests == [] and len(server.requests) == 1
