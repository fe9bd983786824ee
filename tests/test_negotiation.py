"""Optional request features a server refuses: recognised from its error, dropped, remembered per endpoint."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from orchestra.errors import FeatureRefused, RequestRejected
from orchestra.models import Anthropic, ChatRequest, OpenAICompatible
from orchestra.models.base import downgrade_listener
from orchestra.models.http import Endpoint
from orchestra.models.negotiation import feature_of, refused_feature
from orchestra.testing import LoopbackRequest, Reply, anthropic_reply, error_reply, openai_reply

# llama-cpp-python 0.3's server, verbatim, for response_format: {"type": "json_schema", ...}
LLAMA_CPP_500 = {"error": {"message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                           "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
                           "'input': 'json_schema'}\n\n  File \"llama_cpp/server/app.py\", line 376",
                           "type": "internal_server_error", "param": None, "code": None}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}


class Answer(BaseModel):
    city: str


def kind(req: LoopbackRequest) -> str:
    """The structured-output feature a request used (``plain`` for none)."""
    body = req.json()
    return feature_of("response_format", body["response_format"]) if "response_format" in body else "plain"


def refuses_json_schema_like_llama_cpp(req: LoopbackRequest) -> Reply:
    if kind(req) == "response_format:json_schema":
        return Reply(status=500, body=LLAMA_CPP_500)
    return openai_reply('{"city": "Oslo"}')


def run(coro):
    return asyncio.run(coro)


# --- recognising a refusal ---------------------------------------------------------------------


@pytest.mark.parametrize(("status", "error", "payload", "feature"), [
    (500, LLAMA_CPP_500, {"response_format": SCHEMA_FORMAT}, "response_format:json_schema"),
    (500, "1 validation error: response_format.json_schema: extra fields not permitted",  # a location as a path
     {"response_format": SCHEMA_FORMAT, "seed": 1}, "response_format:json_schema"),
    (500, "body -> seed\n  field not allowed", {"seed": 1}, "seed"),
    (400, {"error": {"message": "Unrecognized request argument supplied: seed", "param": None}},
     {"seed": 1, "stop": ["x"]}, "seed"),
    (400, {"error": {"message": "Unsupported parameter.", "param": "stop"}}, {"seed": 1, "stop": ["x"]}, "stop"),
    (422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "bad"}]},
     {"response_format": {"type": "json_object", "schema": {}}}, "response_format:json_object+schema"),
    (400, "tool_choice is not supported by this model", {"tools": [], "tool_choice": {"type": "tool"}},
     "tool_choice:tool"),
])
def test_a_refusal_names_the_feature_it_refuses(status, error, payload, feature) -> None:
    assert refused_feature(status, error, payload) == feature


@pytest.mark.parametrize(("status", "error", "payload"), [
    (400, {"error": {"message": "This model's maximum context length is 4096 tokens"}}, {"seed": 1}),
    (500, "worker crashed while handling stop tokens", {"stop": ["x"]}),  # a 5xx must place the field
    (500, "worker crashed: seed. Restarting", {"seed": 1}),  # (a sentence's full stop is no path)
    (500, "crashed in engine.seed.py", {"seed": 1}),
    (500, 'Traceback: File "/srv/app/stop.py", line 3', {"stop": ["x"]}),  # a file, not a path into the body
    (500, "CUDA out of memory in tools.py, line 9", {"tools": [], "stop": ["x"]}),
    (404, {"error": {"message": "model 'x' not found; response_format ignored"}}, {"response_format": SCHEMA_FORMAT}),
    (401, {"error": {"message": "bad key for seed"}}, {"seed": 1}),
    (400, {"error": {"message": "seed must be an integer"}}, {"stop": ["x"]}),  # names a field not sent
    (400, {"error": {"message": "streaming seeds unsupported"}}, {"seed": 1}),  # a longer word is not the field
])
def test_other_errors_are_not_refusals(status, error, payload) -> None:
    assert refused_feature(status, error, payload) is None


# --- negotiating with a server -----------------------------------------------------------------


def test_a_json_schema_refusal_costs_one_request_for_every_model_on_the_endpoint(loopback) -> None:
    server = loopback(refuses_json_schema_like_llama_cpp)
    endpoint = Endpoint(server.url + "/v1", max_concurrency=8)
    first = OpenAICompatible(model="a", endpoint=endpoint)
    second = OpenAICompatible(model="b", endpoint=endpoint)
    seen: list[tuple[str, str]] = []
    token = downgrade_listener.set(lambda model, feature, reason: seen.append((model, feature)))
    try:
        results = run(first.complete([ChatRequest.user(f"q{i}", output=Answer) for i in range(8)]))
        results += run(second.complete([ChatRequest.user("again", output=Answer)]))
    finally:
        downgrade_listener.reset(token)
    assert [r.parsed.city for r in results] == ["Oslo"] * 9
    kinds = [kind(req) for req in server.requests]
    assert kinds == ["response_format:json_schema"] + ["response_format:json_object+schema"] * 9  # never retried
    assert seen == [("a", "response_format:json_schema")]
    assert first.json_mode == second.json_mode == "json_object+schema"
    body = server.requests[1].json()
    assert body["response_format"]["schema"]["properties"]["city"]["type"] == "string"
    assert "JSON" in body["messages"][-1]["content"]  # the schema is in the prompt too, for servers that ignore it


def test_every_mode_refused_ends_with_the_schema_in_the_prompt(loopback) -> None:
    def handler(req: LoopbackRequest) -> Reply:
        if "response_format" in req.json():
            return error_reply(400, f"response_format {req.json()['response_format']['type']} is not supported")
        return openai_reply('```json\n{"city": "Oslo"}\n```')

    server = loopback(handler)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1")
    [result] = run(model.complete([ChatRequest.user("facts", output=Answer)]))
    assert result.parsed.city == "Oslo"
    assert [kind(r) for r in server.requests] == ["response_format:json_schema", "response_format:json_object+schema",
                                                  "response_format:json_object", "plain"]
    assert "JSON schema" in server.requests[-1].json()["messages"][-1]["content"]
    run(model.complete([ChatRequest.user("again", output=Answer)]))
    assert [kind(r) for r in server.requests[4:]] == ["plain"]  # the working mode is remembered
    assert result.usage.requests == 4  # the refusals are requests of this call


def test_a_refused_seed_is_dropped_once_and_the_rest_kept(loopback) -> None:
    def handler(req: LoopbackRequest) -> Reply:
        if "seed" in req.json():
            return error_reply(400, "Unrecognized request argument supplied: seed")
        return openai_reply("fine")

    server = loopback(handler)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", max_concurrency=4)
    results = run(model.complete([ChatRequest.user(str(i), seed=i, temperature=0.1, stop=("END",)) for i in range(6)]))
    assert [r.text for r in results] == ["fine"] * 6
    bodies = [r.json() for r in server.requests]
    assert ["seed" in b for b in bodies] == [True] + [False] * 6
    assert all(b["stop"] == ["END"] and b["temperature"] == 0.1 for b in bodies)


def test_a_request_refused_for_another_reason_is_not_resent(loopback) -> None:
    server = loopback(lambda req: error_reply(400, "This model's maximum context length is 4096 tokens"))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1")
    with pytest.raises(RequestRejected, match="maximum context length") as raised:
        run(model.complete([ChatRequest.user("long", output=Answer, seed=1)]))
    assert not isinstance(raised.value, FeatureRefused)
    assert len(server.requests) == 1 and model.json_mode == "json_schema"


def test_a_refused_field_in_extra_body_is_dropped_too(loopback) -> None:
    server = loopback(lambda req: error_reply(400, "seed is not supported") if "seed" in req.json()
                      else openai_reply("ok"))
    model = OpenAICompatible(model="m", base_url=server.url + "/v1", extra_body={"seed": 3, "top_k": 5})
    [result] = run(model.complete([ChatRequest.user("x")]))
    assert result.text == "ok"
    assert [("seed" in r.json(), r.json()["top_k"]) for r in server.requests] == [(True, 5), (False, 5)]


def test_a_request_that_keeps_a_refused_feature_is_an_error_not_a_loop(loopback) -> None:
    from orchestra.models.http import CallPolicy
    from orchestra.models.openai import bearer_headers

    server = loopback(lambda req: error_reply(400, "seed is not supported"))
    endpoint = Endpoint(server.url + "/v1")
    with pytest.raises(FeatureRefused, match="does not accept seed"):
        run(endpoint.post_negotiated("/chat/completions", lambda capabilities: {"model": "m", "seed": 1}, model="m",
                                     headers=bearer_headers, policy=CallPolicy.of()))
    assert len(server.requests) == 2  # refused, then sent again regardless: stop there


def test_a_feature_a_gateway_later_refuses_is_dropped_then(loopback) -> None:
    refusing = {"now": False}

    def handler(req: LoopbackRequest) -> Reply:
        if refusing["now"] and "stop" in req.json():
            return error_reply(400, "stop is not supported by this upstream model")
        return openai_reply("ok")

    server = loopback(handler)
    model = OpenAICompatible(model="m", base_url=server.url + "/v1")
    run(model.complete([ChatRequest.user("a", stop=("X",))]))
    refusing["now"] = True
    [result] = run(model.complete([ChatRequest.user("b", stop=("X",))]))
    assert result.text == "ok"
    assert ["stop" in r.json() for r in server.requests] == [True, True, False]


def test_anthropic_without_tools_puts_the_schema_in_the_prompt_once(loopback) -> None:
    def handler(req: LoopbackRequest) -> Reply:
        if "tools" in req.json():
            return error_reply(400, "tools: this deployment does not support tool use")
        return anthropic_reply('{"city": "Rome"}')

    server = loopback(handler)
    model = Anthropic(model="c", base_url=server.url, api_key_env=None, max_concurrency=4)
    results = run(model.complete([ChatRequest.user(str(i), output=Answer) for i in range(4)]))
    assert [r.parsed.city for r in results] == ["Rome"] * 4
    assert ["tools" in r.json() for r in server.requests] == [True, False, False, False, False]
    assert model.json_mode == "prompt"


def test_a_resumed_run_sends_its_first_wave_at_once_not_behind_a_probe(loopback, tmp_path, monkeypatch) -> None:
    """A resume in a fresh process learns from the run's recorded answers what the endpoint took:
    its first wave (two experts) went out one request alone (a probe of ``seed``), the other once that
    was answered. The server holds every expert answer until both are in; a wave that never gets
    there is released by the fallback, which fails the test."""
    from loopback_llm import ScriptedLLM, write_pool

    from orchestra import Orchestra, Pool
    from orchestra.models import http
    from orchestra.store import RunStore

    monkeypatch.setattr(http, "PROBE_WAIT_SECONDS", 60.0)  # (held back, a waiter would miss the fallback)
    scripted = ScriptedLLM()
    inner = scripted.handler()
    phase = {"resumed": False, "fallback": False}
    experts: list[str] = []
    both_in: asyncio.Event | None = None

    async def handler(request: LoopbackRequest) -> Reply:
        nonlocal both_in
        if "Your assignment:" in request.prompt:
            if not phase["resumed"]:
                return Reply(hang=True)  # the first run is stopped with its experts in flight
            both_in = both_in or asyncio.Event()
            experts.append(request.prompt)
            if len(experts) == 2:
                both_in.set()
            try:
                await asyncio.wait_for(both_in.wait(), 5)  # (within the pool's 10 s timeout)
            except asyncio.TimeoutError:
                phase["fallback"] = True
        return await inner(request)

    server = loopback(handler)
    pool_file = write_pool(tmp_path, server.url)

    async def stopped() -> None:
        orc = Orchestra(Pool.load(pool_file), store=RunStore(tmp_path / "runs.db"), plan=False, k=2)
        task = asyncio.ensure_future(orc.arun("Write a short report", run_id="r1"))
        while sum("Your assignment:" in r.prompt for r in server.requests) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await orc.aclose()

    async def resumed() -> str:
        orc = Orchestra(Pool.load(pool_file), store=RunStore(tmp_path / "runs.db"))  # fresh endpoints
        try:
            return (await orc.aresume("r1")).answer
        finally:
            await orc.aclose()

    asyncio.run(stopped())
    phase["resumed"] = True
    answer = asyncio.run(resumed())
    assert "The answer is 42" in answer
    assert len(experts) == 2 and not phase["fallback"]  # the wave's two requests were in flight together
