"""Mutation round on the Anthropic backend, feature negotiation, the per-attempt deadlines, engine
resources, tracing, the YAML reader's positions, agents and pools, the number types and the vLLM engine's
options: each test kills a one-line mutant the other tests let through."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel, ValidationError

from orchestra.agents import Agent, Pool
from orchestra.budget import Budget
from orchestra.errors import BadResponse, ConfigError
from orchestra.events import CallRetried, RunDone, RunStarted
from orchestra.models import Anthropic, ChatRequest, FunctionModel, allow_model_requests
from orchestra.models.deadlines import Deadlines
from orchestra.models.negotiation import refused_feature
from orchestra.models.placement import EngineResources
from orchestra.models.pricing import Price
from orchestra.models.vllm import VLLM
from orchestra.resources import orchestra_home
from orchestra.testing import Reply, anthropic_reply
from orchestra.tracing import SpanRecorder
from orchestra.workflow import Workflow
from orchestra.yamlfile import read_yaml


def _anthropic(server) -> Anthropic:
    return Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env=None)


def test_an_anthropic_stop_reason_with_no_chat_completions_name_passes_through_as_it_is(loopback) -> None:
    """``refusal`` has no Chat Completions word: it is the answer's finish reason as the API said it, not
    None (anthropic.py:160, ``.get(reason)`` without the default dropped it)."""
    server = loopback(lambda req: anthropic_reply("I can't help with that.", stop_reason="refusal"))
    result = asyncio.run(_anthropic(server).complete_one(ChatRequest.user("hello")))
    assert result.finish_reason == "refusal"
    ended = loopback(lambda req: anthropic_reply("cut", stop_reason="max_tokens"))
    assert asyncio.run(_anthropic(ended).complete_one(ChatRequest.user("hello"))).finish_reason == "length"


def test_an_anthropic_stream_nobody_asked_for_that_ends_in_an_error_event_fails_with_it_at_once(loopback) -> None:
    """A stream the server sent unasked, ended by an ``error`` event and then held open: the error is the
    call's failure, not a timeout (anthropic.py:189, an ``error`` event not taken as the stream's end kept
    the call waiting for its timeout, to fail as RequestTimeout)."""
    def event(kind: str, body: dict[str, object]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    async def parts() -> AsyncIterator[bytes]:
        yield event("message_start", {"message": {"content": [], "usage": {"input_tokens": 12}}})
        yield event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
        await asyncio.sleep(3600)  # (never: the client stops reading first)

    server = loopback(lambda request: Reply(parts=parts))
    model = Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env=None, timeout=5, max_attempts=1)
    with pytest.raises(BadResponse, match="answered with an error for claude-sonnet-4-5: Overloaded"):
        asyncio.run(model.complete_one(ChatRequest.user("hello")))


class _City(BaseModel):
    city: str
    population: int


def test_an_anthropic_stream_with_text_before_its_tool_call_puts_the_calls_json_in_the_call(loopback) -> None:
    """A stream sent unasked whose answer says a few words and then makes the forced tool call: the
    call's pieces of JSON belong to its own block, the second (anthropic.py:133, the pieces put in the
    first block left the call's input empty and the answer failed its schema)."""
    def event(kind: str, body: dict[str, object]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    events = [event("message_start", {"message": {"content": [], "usage": {"input_tokens": 12}}}),
              event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
              event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Here it is."}}),
              event("content_block_stop", {"index": 0}),
              event("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "t",
                                                                          "name": "respond", "input": {}}}),
              event("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                                  "partial_json": '{"city": "Oslo", "popu'}}),
              event("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                                  "partial_json": 'lation": 700000}'}}),
              event("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
              event("message_stop", {})]

    async def parts() -> AsyncIterator[bytes]:
        for part in events:
            yield part

    server = loopback(lambda request: Reply(parts=parts))
    model = Anthropic(model="claude-sonnet-4-5", base_url=server.url, api_key_env=None, max_attempts=1)
    result = asyncio.run(model.complete_one(ChatRequest.user("Oslo?", output=_City)))
    assert result.parsed == _City(city="Oslo", population=700000)
    assert len(server.requests) == 1  # (no repair asked for)


def test_an_error_naming_two_sent_fields_refuses_the_one_it_names_first() -> None:
    """"'seed' cannot be used together with response_format": the seed is what is refused, not the JSON
    mode the sentence names after it (negotiation.py:82, the first field found in the fields' own order,
    response_format, was dropped instead)."""
    payload = {"response_format": {"type": "json_object"}, "seed": 7}
    error = {"error": {"message": "Unsupported parameter: 'seed' cannot be used together with response_format",
                       "param": None}}
    assert refused_feature(400, error, payload) == "seed"
    assert refused_feature(400, {"error": {"message": "response_format is not supported (no seed either)"}},
                           payload) == "response_format:json_object"


def test_an_error_whose_param_is_a_path_inside_a_sent_field_refuses_that_field() -> None:
    """OpenAI's ``param`` may point inside a field (``response_format.json_schema``) with a message that
    names none: the field is refused (negotiation.py:74, only a ``param`` equal to the field was one)."""
    payload = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}, "seed": 1}
    error = {"error": {"message": "Invalid value.", "param": "response_format.json_schema"}}
    assert refused_feature(400, error, payload) == "response_format:json_schema"
    assert refused_feature(400, {"error": {"message": "Invalid value.", "param": "response_formats"}}, payload) is None


def test_a_408_that_mentions_a_sent_field_is_a_timeout_not_a_refusal() -> None:
    """408 Request Timeout is about time, whatever its text names: the request's JSON mode is not dropped
    for the rest of the run (negotiation.py:34, 408 left out of the statuses about something else)."""
    payload = {"response_format": {"type": "json_object"}, "stop": ["###"]}
    assert refused_feature(408, {"error": {"message": "request timed out; response_format ignored"}}, payload) is None
    assert refused_feature(400, {"error": {"message": "response_format is not supported"}},
                           payload) == "response_format:json_object"


def test_a_cancellation_from_elsewhere_while_a_timed_out_request_cleans_up_stays_a_cancellation() -> None:
    """The limit ran out and, while the request was still cleaning up, its run was cancelled too: the
    cancellation goes on as one, not as a timeout a retry would answer (deadlines.py:194, without
    ``task.uncancel() == 0`` the outside cancellation became TimeoutError)."""
    async def main() -> list[object]:
        deadlines = Deadlines()
        cleaning = asyncio.Event()

        async def request() -> str:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cleaning.set()
                await asyncio.Event().wait()  # (closing its connection, say)
            return "never"

        task = asyncio.ensure_future(deadlines.within(0.01, request()))
        await cleaning.wait()
        task.cancel()
        return list(await asyncio.gather(task, return_exceptions=True))

    [outcome] = asyncio.run(main())
    assert type(outcome) is asyncio.CancelledError


def test_a_timer_a_little_late_is_no_stall_and_moves_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a timer ``STALL_S`` or more late is a stall of the loop (deadlines.py:214, any lateness, as
    every timer runs a little late, gave every request ``STALL_S`` more than its limit)."""
    from orchestra.models import deadlines as module

    monkeypatch.setattr(module, "STALL_S", 60.0)  # (a stall the test never makes: no limit may move)

    async def main() -> object:
        deadlines = Deadlines()
        waiting = asyncio.ensure_future(deadlines.within(0.05, asyncio.Event().wait()))
        await asyncio.wait({waiting}, timeout=10)
        cut = waiting.exception() if waiting.done() else "still waiting"
        waiting.cancel()
        return cut

    assert isinstance(asyncio.run(main()), asyncio.TimeoutError)


def test_an_answer_that_came_during_a_stall_past_the_limit_is_read_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop stalled (a blocking call on its thread) past a request's limit while its answer arrived:
    the request is given ``STALL_S`` more and reads it (deadlines.py:222, the limit moved by the stall alone
    fell due at once and the answer, come and paid for, was cut off)."""
    from orchestra.models import deadlines as module

    monkeypatch.setattr(module, "STALL_S", 0.05)

    async def main() -> object:
        deadlines = Deadlines()
        answered = asyncio.Event()

        async def request() -> str:
            await answered.wait()
            return "answered"

        waiting = asyncio.ensure_future(deadlines.within(0.1, request()))
        await asyncio.sleep(0)  # (the request is sent, its limit set)
        time.sleep(0.3)  # the loop runs nothing meanwhile (a store's write waiting on a lock) ...
        asyncio.get_running_loop().call_soon(answered.set)  # ... and the answer came in the while
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    assert asyncio.run(main()) == "answered"


def test_a_short_limit_behind_a_long_one_is_still_kept() -> None:
    """Requests with a short limit and one with a long limit in flight: after the first short one times
    out, the timer is set for the next short one, the earliest of all the queues' heads (deadlines.py:232,
    the last queue's head alone set it for the long limit, and the second short request waited 30 s)."""
    async def main() -> object:
        deadlines = Deadlines()
        first = asyncio.ensure_future(deadlines.within(0.05, asyncio.Event().wait()))
        await asyncio.sleep(0)
        long = asyncio.ensure_future(deadlines.within(30, asyncio.Event().wait()))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(deadlines.within(0.05, asyncio.Event().wait()))
        await asyncio.wait({first, second}, timeout=10)
        outcomes = [task.exception() if task.done() else "still waiting" for task in (first, second)]
        for task in (first, long, second):
            task.cancel()
        await asyncio.gather(first, long, second, return_exceptions=True)
        return outcomes

    assert [type(outcome) for outcome in asyncio.run(main())] == [asyncio.TimeoutError] * 2


class _RecordingLLM:
    """Stands in for ``vllm.LLM`` (no GPU here): records the engine's options and each request's sampling
    options, and answers every conversation with its last message."""

    made: list[_RecordingLLM] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.params: list[dict[str, Any]] = []
        _RecordingLLM.made.append(self)

    def chat(self, conversations: list[list[dict[str, str]]], params: list[dict[str, Any]],
             use_tqdm: bool = False) -> list[Any]:
        self.params.extend(params)
        return [SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(
            text=f"echo: {conversation[-1]['content']}", token_ids=[1], finish_reason="stop")])
            for conversation in conversations]


def test_a_vllm_request_at_temperature_zero_and_seed_zero_is_sent_greedy_with_its_seed() -> None:
    """Temperature 0 is greedy decoding, not the engine's default of 0.2 (vllm.py:192, ``temperature or
    0.2``); seed 0 is a seed (vllm.py:193, ``if request.seed:``); a request's max_tokens replaces the engine's
    default (vllm.py:191)."""
    model = VLLM("some/model", engine_factory=_RecordingLLM,
                 sampling_factory=lambda options, schema: {**options, "schema": schema})
    requests = [ChatRequest.user("greedy", temperature=0, seed=0, max_tokens=64), ChatRequest.user("default")]
    with allow_model_requests():
        results = asyncio.run(model.complete(requests))
    assert [result.text for result in results] == ["echo: greedy", "echo: default"]
    sent = _RecordingLLM.made[-1].params
    assert sent[0] == {"max_tokens": 64, "temperature": 0, "seed": 0, "schema": None}
    assert sent[1] == {"max_tokens": 1024, "temperature": 0.2, "schema": None}


def test_a_pool_files_agent_at_temperature_zero_keeps_it_over_the_defaults(tmp_path) -> None:
    """An agent's ``temperature: 0`` (greedy) is its own, not the defaults' 0.7 (agents.py:336,
    ``agent.temperature or defaults.temperature`` replaced it); its own max_tokens and persona are kept
    over the defaults' too, and an agent that sets none gets the defaults'."""
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        "models:\n"
        "  fast: {type: openai, model: gpt-4o-mini, base_url: 'http://127.0.0.1:47101/v1', api_key_env: null}\n"
        "defaults: {model: fast, temperature: 0.7, max_tokens: 800, persona: You are careful.}\n"
        "agents:\n"
        "  - {name: greedy, temperature: 0, max_tokens: 50, persona: You are terse.}\n"
        "  - {name: plain}\n", encoding="utf-8")
    pool = Pool.load(pool_file)
    greedy, plain = pool["greedy"], pool["plain"]
    assert (greedy.temperature, greedy.max_tokens, greedy.persona) == (0.0, 50, "You are terse.")
    assert (plain.temperature, plain.max_tokens, plain.persona) == (0.7, 800, "You are careful.")
    sent = greedy.request("What is 2 + 2?")
    assert (sent.temperature, sent.max_tokens) == (0.0, 50)


def _recorder() -> tuple[SpanRecorder, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SpanRecorder(provider.get_tracer("test")), exporter


def test_a_run_span_keeps_its_tasks_first_500_characters_and_an_unfinished_run_is_an_error() -> None:
    """A run span keeps its task's first 500 characters (tracing.py:62, 50 cut a task to its first words);
    every run that did not end ``done`` is an error span that says why (tracing.py:128)."""
    recorder, exporter = _recorder()
    for run_id, status in (("r1", "budget_exceeded"), ("r2", "partial"), ("r3", "done")):
        recorder.listen(RunStarted(run_id=run_id, task="x" * 600))
        recorder.listen(RunDone(run_id=run_id, status=status, answer=None, error=None, elapsed_s=0.1))
    spans = {span.attributes["orchestra.run_id"]: span for span in exporter.get_finished_spans()}
    assert [spans[r].status.status_code.name for r in ("r1", "r2", "r3")] == ["ERROR", "ERROR", "UNSET"]
    assert spans["r1"].status.description == "budget_exceeded"
    assert len(spans["r1"].attributes["orchestra.task"]) == 500


def test_a_retry_is_an_event_of_the_run_span_with_its_numbers() -> None:
    """A retry's attempt and wait are numbers: they are the event's attributes with its text
    (tracing.py:110, only text attributes were kept, the attempt and the wait dropped)."""
    recorder, exporter = _recorder()
    recorder.listen(RunStarted(run_id="r", task="t"))
    recorder.listen(CallRetried(model="gpt", attempt=2, wait_s=0.5, reason="HTTP 503"))
    recorder.listen(RunDone(run_id="r", status="done", answer="a", error=None, elapsed_s=0.1))
    [span] = exporter.get_finished_spans()
    [event] = span.events
    assert event.name == "call_retried"
    attributes = dict(event.attributes)
    assert {name: attributes.get(name) for name in ("model", "attempt", "wait_s", "reason")} == {
        "model": "gpt", "attempt": 2, "wait_s": 0.5, "reason": "HTTP 503"}


def test_an_engines_memory_reserved_is_above_zero() -> None:
    """``memory_gb: 0`` is refused, not a reservation of nothing (placement.py:40, ``ge=0`` took it)."""
    with pytest.raises(ValidationError, match="greater than 0"):
        EngineResources(memory_gb=0)
    assert EngineResources(memory_gb=0.5).actor_options()["memory"] == 2**29  # (GiB: placement.py:84)


def test_a_negative_custom_resource_is_refused() -> None:
    """A custom resource of -0.5 is refused like any amount under 0 (placement.py:49, ``< -1`` let it by)."""
    with pytest.raises(ValidationError, match="custom resources are amounts of at least 0"):
        EngineResources(custom={"accelerator_a100": -0.5})
    assert EngineResources(custom={"accelerator_a100": 0.5}).demand() == {"CPU": 1.0, "accelerator_a100": 0.5}


def test_a_vllm_engines_own_options_win_over_its_defaults_and_its_ray_actor_asks_for_its_gpus() -> None:
    """``engine_options`` are vllm.LLM's arguments as given: ``gpu_memory_utilization`` there replaces the
    default 0.9 (vllm.py:113, the defaults written after them won), ``max_model_len`` there is not replaced by
    None (vllm.py:114); a model sharded over two GPUs asks the cluster for two (vllm.py:80)."""
    model = VLLM("some/model", tensor_parallel_size=2, engine_factory=_RecordingLLM,
                 engine_options={"gpu_memory_utilization": 0.5, "max_model_len": 4096, "enforce_eager": True})
    with allow_model_requests():
        asyncio.run(model.load())
    assert _RecordingLLM.made[-1].options == {"model": "some/model", "tensor_parallel_size": 2,
                                              "gpu_memory_utilization": 0.5, "max_model_len": 4096,
                                              "enforce_eager": True}
    assert model.resources.demand() == {"CPU": 1.0, "GPU": 2}


def test_a_whole_number_given_as_text_with_a_sign_is_read_as_one() -> None:
    """``"+200"`` (a quoted value, a JSON string) is the number 200 and ``"-5"`` is refused for being under 1,
    not as text YAML did not read as a number with "write -5" (numbers.py:180, the sign not stripped before
    the digits were checked)."""
    assert Budget.model_validate({"max_calls": "+200"}).max_calls == 200
    with pytest.raises(ValidationError, match="greater than or equal to 1") as refused:
        Budget.model_validate({"max_calls": "-5"})
    assert "write" not in str(refused.value)


def test_an_anthropic_prompt_counts_the_json_instructions_only_where_the_schema_is_no_tool() -> None:
    """What a budget reserves for an Anthropic prompt: a schema sent as a forced tool adds nothing to the
    prompt; once the server refused tools the JSON instructions are in it and counted (anthropic.py:53,
    the test read the other way round reserved for instructions never sent and not for those sent)."""
    model = Anthropic(model="claude-sonnet-4-5", base_url="http://127.0.0.1:47102", api_key_env=None)
    plain = ChatRequest.user("Name a city and its population.")
    structured = ChatRequest.user("Name a city and its population.", output=_City)
    assert model.prompt_gauge.worst(structured) == model.prompt_gauge.worst(plain)
    model.endpoint.capabilities.refuse("tools", "tools are not supported")
    assert model.prompt_gauge.worst(structured) > model.prompt_gauge.worst(plain) + 20


def test_a_key_written_beside_a_merge_overrides_the_merged_one(tmp_path) -> None:
    """``<<: *base`` then ``temperature: 0.1``: the key written overrides the merged one, as in every YAML
    reader (yamlfile.py:304, every merged key counted as written made it a duplicate key)."""
    path = tmp_path / "pool.yaml"
    path.write_text(
        "models:\n"
        "  fast: {type: openai, model: gpt-4o-mini, base_url: 'http://127.0.0.1:47103/v1', api_key_env: null}\n"
        "base: &base {model: fast, temperature: 0.7}\n"
        "agents:\n"
        "  - {<<: *base, name: cool, temperature: 0.1}\n", encoding="utf-8")
    document = read_yaml(path)
    assert document.data["agents"][0] == {"model": "fast", "temperature": 0.1, "name": "cool"}


def test_an_unknown_key_is_pointed_at_where_the_key_is_written(tmp_path) -> None:
    """A misspelt key is placed at the key itself, not at its value (yamlfile.py:121)."""
    path = tmp_path / "pool.yaml"
    path.write_text(
        "models:\n"
        "  fast: {type: openai, model: gpt-4o-mini, base_url: 'http://127.0.0.1:47103/v1', api_key_env: null}\n"
        "agents:\n"
        "  - name: a\n"
        "    model: fast\n"
        "    temprature:\n"
        "      0.2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        Pool.load(path)
    assert (refused.value.line, refused.value.column) == (6, 5)
    assert "unknown field 'temprature' (did you mean 'temperature'?)" in str(refused.value)


def test_a_byte_that_is_not_utf8_is_placed_at_its_column(tmp_path) -> None:
    """``name: caf\\xe9`` (Latin-1): the bad byte follows nine characters of its line, column 10 (yamlfile.py:184,
    the column counted from 0)."""
    path = tmp_path / "pool.yaml"
    path.write_bytes(b"models: {}\nname: caf\xe9\n")
    with pytest.raises(ConfigError) as refused:
        read_yaml(path)
    assert (refused.value.line, refused.value.column) == (2, 10)


def test_an_agent_takes_a_temperature_up_to_two_and_an_answer_limit_of_at_least_one() -> None:
    """Temperatures run from 0 to 2 (the OpenAI API's range): 1.5 is taken, 2.5 refused (agents.py:77, an
    upper end of 1 refused the 1.5 a pool file takes)."""
    model = FunctionModel(lambda request: "ok", name="m")
    assert Agent(name="warm", model=model, temperature=1.5).temperature == 1.5
    with pytest.raises(ConfigError, match="temperature must be a number from 0 to 2, not 2.5"):
        Agent(name="hot", model=model, temperature=2.5)
    # and an answer limit is at least 1 token (agents.py:80, ``< 0`` took max_tokens=0, which its requests read
    # as none set)
    with pytest.raises(ConfigError, match="max_tokens must be a whole number of at least 1, not 0"):
        Agent(name="mute", model=model, max_tokens=0)


def test_a_requests_own_answer_limit_replaces_the_agents() -> None:
    """``agent.request(..., max_tokens=50)`` asks for 50 tokens, not the agent's 800 (agents.py:88)."""
    agent = Agent(name="a", model=FunctionModel(lambda request: "ok", name="m"), max_tokens=800)
    assert agent.request("hi", max_tokens=50).max_tokens == 50
    assert agent.request("hi").max_tokens == 800


def test_a_model_priced_for_its_answers_alone_is_priced() -> None:
    """A price of 0 per prompt token and 2 per answer token is a price (agents.py:141, only an input price
    counted: the pool was said to cost nothing)."""
    model = FunctionModel(lambda request: "ok", name="m")
    model.price = Price(input=0.0, output=2.0)
    assert Pool(agents=[Agent(name="a", model=model)]).priced()


def test_a_model_of_ones_own_without_a_price_is_not_listed_as_unpriced_twice() -> None:
    """A model with no ``price`` attribute is named once, as one whose reported cost is counted
    (agents.py:241, it was named among the table's unpriced models too)."""
    class Own(FunctionModel):
        def __getattribute__(self, name: str) -> object:
            if name == "price":
                raise AttributeError(name)
            return super().__getattribute__(name)

    own = Own(lambda request: "ok", name="own")
    warning = Pool(agents=[Agent(name="a", model=own)]).unpriced()
    assert warning is not None and warning.startswith("the cost budget cannot hold back calls to own"), warning
    assert "counts no dollars" not in warning


def test_an_empty_orchestra_home_is_the_default_folder_not_the_current_one(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path) -> None:
    """``ORCHESTRA_HOME=`` (set but empty, as a shell leaves an unset variable it exports) is
    ``~/.orchestra``, not ``Path("")``, the current folder, where stores were written (resources.py:38)."""
    monkeypatch.setenv("ORCHESTRA_HOME", "")
    assert orchestra_home() == Path.home() / ".orchestra"
    monkeypatch.setenv("ORCHESTRA_HOME", str(tmp_path))
    assert orchestra_home() == tmp_path


def test_a_mistake_on_the_first_line_of_a_block_prompt_is_placed_on_that_line(tmp_path) -> None:
    """A ``prompt: |`` whose first line uses an undeclared input: the error names the line the text is on,
    the one after ``prompt: |`` (yamlfile.py:44, the block's first line was placed at the ``|``)."""
    path = tmp_path / "wf.yaml"
    path.write_text(
        "pool:\n"
        "  models:\n"
        "    m: {type: openai, model: x, base_url: 'http://127.0.0.1:47104/v1', api_key_env: null}\n"
        "  agents:\n"
        "    - {name: writer, model: m}\n"
        "inputs:\n"
        "  topic: {type: string, required: true}\n"
        "steps:\n"
        "  - id: draft\n"
        "    agent: writer\n"
        "    prompt: |\n"
        "      Write on {{ inputs.subject }}.\n"
        "      Keep it short.\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        Workflow.load(path)
    assert str(refused.value).endswith("wf.yaml:12: step 'draft' uses undeclared input 'subject'; declare it under "
                                       "inputs:"), str(refused.value)


def test_a_pool_without_prices_keeps_the_fingerprint_its_stored_runs_were_matched_by(tmp_path: Path) -> None:
    """Prices joined the fingerprint only where a model has one: with them always in it (an empty
    table), every pool without prices got a new fingerprint, and `eval --resume` found none of the
    evaluations stored before."""
    path = tmp_path / "fp.yaml"
    path.write_text("name: fp\nmodels:\n  m: {type: openai, model: local-x, base_url: \"http://127.0.0.1:9/v1\", "
                    "api_key_env: null}\nagents:\n  - {name: a, model: m, persona: \"You are a.\", skills: [math]}\n")
    assert Pool.load(path).fingerprint() == "4d34f85c3cba00e2"


def test_an_agent_recruited_on_its_declared_skills_is_not_warned_of_as_unprofiled() -> None:
    """Among profiled agents, only one with neither a profile nor declared skills is recruited on a
    uniform prior; one with declared skills is recruited on them (as documented), and was warned of."""
    from orchestra.profile import Provenance, SkillProfile

    model = FunctionModel(lambda request: "x", name="m")
    measured = SkillProfile(agent="a", skills={"math": 2}, accuracy=0.5,
                            provenance=Provenance(dataset="v.jsonl", dataset_sha256="0" * 64, items=4, model="m"))
    pool = Pool(agents=[Agent(name="a", model=model), Agent(name="b", model=model, skills=["history"]),
                        Agent(name="c", model=model)], profiles={"a": measured})
    unprofiled = [line for line in pool.profile_warnings() if "no measured profile" in line]
    assert unprofiled == ["c has no measured profile: recruited on a uniform prior until orchestra profile measures it"]
