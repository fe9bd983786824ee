"""``orchestra serve`` with the official openai SDK: a real uvicorn server on 127.0.0.1 over a pool
of loopback experts whose requests are counted at the loopback server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from orchestra import Agent, Pool
from orchestra.budget import Budget
from orchestra.errors import ConfigError, RunHeld
from orchestra.models import FunctionModel
from orchestra.serve import RUN_HEADER, Feed, app, base_url, check_origins, served_models
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, LoopbackServer, Reply
from orchestra.testing.loopback import error_reply, openai_reply, openai_stream_reply

EXPERTS = ("alpha", "beta", "gamma")
PLAN = {"subtasks": [{"id": "facts", "instruction": "Explain why the sky is blue."},
                     {"id": "answer", "instruction": "Give one practical consequence of the sky being blue.",
                      "depends_on": ["facts"]}]}


class Experts:
    """The loopback side: answers by model and prompt, counts requests per (model, purpose), and can
    hold each purpose's requests until a given number have arrived (a batch, seen from the server)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.payloads: list[dict[str, Any]] = []
        self.gates: dict[str, tuple[int, asyncio.Event]] = {}
        self.arrived: Counter[str] = Counter()
        self.fail: set[str] = set()
        self.too_long = False  # every request refused as longer than the model's context (a 400)
        self.release = threading.Event()
        self.hold = False
        self.seen = threading.Event()  # set by a client that has read the first piece of a streamed answer
        self.hold_stream = False
        self.streamed = 0
        self.streams: list[list[str | None]] = []  # scripted streamed answers, in order (see scripted_stream)
        self.bill_prompts = False  # a plain answer bills its prompt's length (4 characters a token), not 10
        self.answer = ["The answer", " is", " 42."]  # the aggregator's answer, in the pieces it streams in

    async def between(self, index: int) -> None:
        """After the first piece of a streamed answer, wait (if asked to) until a client has seen it."""
        self.streamed += 1
        if index == 0 and self.hold_stream:
            for _ in range(1000):
                if self.seen.is_set():
                    return
                await asyncio.sleep(0.01)
            raise TimeoutError("the client never saw the first piece of the answer while it was written")

    @staticmethod
    def purpose(payload: dict[str, Any], prompt: str) -> str:
        if payload["model"] == "planner":
            return "keywords" if "keyword" in prompt.lower() else "plan"
        if "responses from" in prompt.lower() or "synthesi" in prompt.lower():
            return "aggregate"
        return "expert"

    async def handler(self, request: LoopbackRequest) -> Reply:
        payload = request.json()
        model, prompt = payload["model"], request.prompt
        purpose = self.purpose(payload, prompt)
        self.requests[model, purpose] += 1
        self.payloads.append(payload)
        if model in self.fail:
            return error_reply(500, "the expert is down")
        if self.too_long:  # (vLLM's words; llama-cpp-python's and OpenAI's say "maximum context length" too)
            return error_reply(400, "This model's maximum context length is 2048 tokens. However, you requested "
                                    "5243 tokens. Please reduce the length of the messages or completion.")
        if self.hold and purpose == "expert":
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        gate = self.gates.get(purpose)
        if gate is not None:
            self.arrived[purpose] += 1
            size, opened = gate
            if self.arrived[purpose] == size:
                opened.set()
            await asyncio.wait_for(opened.wait(), 30)
        if purpose == "plan":
            return openai_reply(json.dumps(PLAN))
        if purpose == "keywords":
            return openai_reply(json.dumps({"keywords": ["physics"]}))
        if payload.get("response_format"):
            if payload.get("max_tokens") == 3:  # (its JSON cut there)
                return openai_reply('{"answer": 4', finish_reason="length")
            return openai_reply(json.dumps({"answer": 42, "unit": "m"}))
        cut = "length" if payload.get("max_tokens") == 3 else "stop"  # a limit that short cuts the answer
        if payload.get("stream") and self.streams:  # scripted: each stream's pieces, None where it breaks
            return scripted_stream(self.streams.pop(0))
        if payload.get("stream"):  # asked to stream: the answer in three pieces
            return openai_stream_reply(self.answer, between=self.between, finish_reason=cut)
        if cut == "length":
            return openai_reply(f"{model} says" if purpose == "expert" else "The answer is", finish_reason=cut)
        seed = payload.get("seed")
        return openai_reply(f"{model} says 42 (seed {seed})" if purpose == "expert" else "".join(self.answer),
                            prompt_tokens=len(prompt) // 4 if self.bill_prompts else 10)

    def count(self, purpose: str) -> dict[str, int]:
        return {m: n for (m, p), n in self.requests.items() if p == purpose}


def scripted_stream(pieces: list[str | None]) -> Reply:
    """A streamed answer of these pieces; at a None the connection breaks (the stream is cut off)."""
    async def parts() -> Any:
        for piece in pieces:
            if piece is None:
                raise ConnectionResetError("the stream broke")
            delta = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", **delta}).encode() + b"\n\n"
        finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", **finish}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return Reply(parts=parts)


def pool_file(directory: Path, url: str, *, extra: str = "") -> Path:
    models = "".join(f"""
  {name}:
    type: openai
    model: {name}
    base_url: {url}/v1
    api_key_env: null
    max_concurrency: 128""" for name in (*EXPERTS, "planner"))
    path = directory / "serve-pool.yaml"
    path.write_text(f"""name: served
models:{models}
planner: planner
keywords: planner
aggregator: alpha
settings: {{k: 3, mode: symbolic-moe}}
presets:
  vote: {{aggregate: vote}}
  solo: {{k: 1, plan: false}}
agents:
  - {{name: alpha, model: alpha, description: the first expert}}
  - {{name: beta, model: beta}}
  - {{name: gamma, model: gamma}}
{extra}""")
    return path


class Running:
    """A uvicorn server on its own thread and event loop, on a free port of 127.0.0.1."""

    def __init__(self, application: Any, *, grace: float | None = None) -> None:
        self.app = application
        self.server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=grace))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            self.thread.join(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=options.pop("api_key", "unused"),
                             max_retries=options.pop("max_retries", 0), **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def serve(loopback: Callable[..., LoopbackServer], tmp_path: Path) -> Iterator[Callable[..., tuple[Running, Experts]]]:
    """Start the served orchestra over fresh loopback experts; stopped at the end of the test."""
    started: list[Running] = []

    def start(*, extra: str = "", **options: Any) -> tuple[Running, Experts]:
        experts = Experts()
        server = loopback(experts.handler)
        options.setdefault("store", tmp_path / "runs.db")
        grace = options.pop("grace", None)
        running = Running(app(pool_file(tmp_path, server.url, extra=extra), **options), grace=grace)
        started.append(running)
        return running, experts

    yield start
    for running in started:
        running.stop()


def test_a_completion_is_a_run_whose_usage_is_what_the_experts_saw(serve: Any, tmp_path: Path) -> None:
    running, experts = serve()
    client = running.client()
    raw = client.chat.completions.with_raw_response.create(
        model="orchestra", messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "How far does light travel in a nanosecond?"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "stop"
    assert raw.headers[RUN_HEADER] == completion.id
    # one short sentence: the fast path, no plan; three experts and the aggregator, as counted there
    assert experts.count("expert") == {"alpha": 1, "beta": 1, "gamma": 1}
    assert experts.count("aggregate") == {"alpha": 1}
    assert completion.usage is not None
    total = sum(experts.requests.values())
    assert completion.model_extra["orchestra"]["requests"] == total
    assert completion.usage.prompt_tokens > 0 and completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens)
    # the system message reached the experts as context, not as the task
    expert_prompts = [json.dumps(p["messages"]) for p in experts.payloads if p["model"] == "beta"]
    assert "Be brief." in expert_prompts[0]
    [aggregation] = [p for p in experts.payloads if experts.purpose(p, json.dumps(p["messages"])) == "aggregate"]
    assert "Be brief." in json.dumps(aggregation["messages"])  # and the aggregator, who writes the answer
    record = RunStore(tmp_path / "runs.db").run(completion.id)
    assert record.status == "done" and record.task == "How far does light travel in a nanosecond?"
    # `runs` says which model a client asked for (only `show --json`'s config did)
    from test_cli import cli

    [listed] = json.loads(cli("runs", "--store", str(tmp_path / "runs.db"), "--json").stdout)
    assert (listed["served"], listed["item"]) == ("orchestra", None)
    shown = cli("runs", "--store", str(tmp_path / "runs.db"), env={"COLUMNS": "200"}).stdout
    assert "served orchestra · How far does light travel" in shown, shown
    before = sum(experts.requests.values())
    for model in ("orchestra", "beta"):  # (an agent's too: it named the planner, which no agent's run has)
        with pytest.raises(openai.BadRequestError) as long:  # within the body limit, but no prompt could hold it
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 600_000}])
        assert long.value.body == {  # (param and code were null, unlike every other message's 400)
            "message": "the last message (the task) is 600,000 characters; a request's run takes at most 500,000: "
                       "shorten it", "type": "invalid_request_error", "param": "messages",
            "code": "context_length_exceeded"}
    assert sum(experts.requests.values()) == before and len(RunStore(tmp_path / "runs.db").runs()) == 1


def test_streaming_sends_role_content_finish_and_usage_with_one_id(serve: Any) -> None:
    running, _ = serve()

    async def stream() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(
            model="orchestra", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}])]
        await client.close()
        return chunks

    chunks = asyncio.run(stream())
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "The answer is 42."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_an_answer_ends_before_the_first_stop_sequence_in_it_streamed_or_not(serve: Any, tmp_path: Path) -> None:
    """`stop` was accepted and ignored: the text came back with the stop sequence and what follows it, which the
    Chat Completions API never returns. The run itself keeps its whole answer."""
    running, _ = serve()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]

    async def streamed(stop: Any) -> tuple[str, str | None]:
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(model="orchestra", stream=True, stop=stop,
                                                                        messages=question)]
        await client.close()
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                [c.choices[0].finish_reason for c in chunks if c.choices][-1])

    for stop, text in ((["is 4", "answer"], "The "), ("42", "The answer is "), (["."], "The answer is 42"),
                       (["The answer is 42. And more"], "The answer is 42."), (None, "The answer is 42.")):
        whole = running.client().chat.completions.create(model="orchestra", messages=question, stop=stop)
        assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, "stop"), stop
        assert asyncio.run(streamed(stop)) == (text, "stop"), stop
        assert RunStore(tmp_path / "runs.db").run(whole.id).answer == "The answer is 42."
    for bad in ("", ["a", "b", "c", "d", "e"], [""], [1], {"a": 1}):
        with pytest.raises(openai.BadRequestError) as refused:
            running.client().chat.completions.create(model="orchestra", messages=question, stop=bad)
        assert refused.value.body["param"] == "stop" and "up to 4" in refused.value.message


def test_the_aggregators_tokens_reach_the_client_while_it_writes(serve: Any) -> None:
    running, experts = serve()
    experts.hold_stream = True  # the aggregator's answer stops after its first piece until the client has it
    received: list[str] = []
    for chunk in running.client().chat.completions.create(
            model="orchestra", stream=True,
            messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)
            experts.seen.set()
    assert "".join(received) == "The answer is 42." and received[0] == "The answer"
    aggregations = [p for p in experts.payloads if experts.purpose(p, json.dumps(p["messages"])) == "aggregate"]
    assert [p.get("stream") for p in aggregations] == [True] and experts.streamed == 3
    experts_payloads = [p for p in experts.payloads if p["model"] != "planner" and p not in aggregations]
    assert not any(p.get("stream") for p in experts_payloads)  # only the call that writes the answer streams
    direct = list(running.client().chat.completions.create(
        model="gamma", stream=True, messages=[{"role": "user", "content": "How far does light travel?"}]))
    assert "".join(c.choices[0].delta.content or "" for c in direct if c.choices) == "The answer is 42."
    assert experts.payloads[-1]["model"] == "gamma" and experts.payloads[-1]["stream"] is True


def test_an_answer_cut_at_max_tokens_finishes_with_length_and_one_that_ended_with_stop(serve: Any) -> None:
    running, _ = serve()
    client = running.client()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    for model in ("orchestra", "solo", "beta"):  # the aggregator's answer, a lone expert's, an agent's
        cut = client.chat.completions.create(model=model, messages=question, max_tokens=3)
        assert cut.choices[0].finish_reason == "length", model
        assert client.chat.completions.create(model=model, messages=question).choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="orchestra", messages=question, max_tokens=3, stream=True))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "The answer is 42."
    whole = list(client.chat.completions.create(model="orchestra", messages=question, stream=True))
    assert [c.choices[0].finish_reason for c in whole if c.choices][-1] == "stop"
    voted = client.chat.completions.create(model="vote", messages=question, max_tokens=3)  # an expert's own text
    assert voted.choices[0].finish_reason == "length" and voted.choices[0].message.content.endswith(" says")


def test_progress_chunks_are_opt_in_and_the_plan_shows_in_them(serve: Any) -> None:
    running, experts = serve()
    client = running.client()
    task = "Explain why the sky is blue. Then give one practical consequence of it."
    plain = list(client.chat.completions.create(model="orchestra", stream=True,
                                                messages=[{"role": "user", "content": task}]))
    assert all(c.choices for c in plain)  # no progress unless asked for
    chunks = list(client.chat.completions.create(model="orchestra", stream=True, extra_body={"progress": True},
                                                 messages=[{"role": "user", "content": task}]))
    events = [c.model_extra["orchestra"]["event"] for c in chunks if not c.choices]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "plan_ready" and [n["id"] for n in events[0]["nodes"]] == ["facts", "answer"]
    assert kinds.count("node_done") == 2 and "experts_recruited" in kinds
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42."
    assert experts.count("plan") == {"planner": 2}
    experts.fail = set(EXPERTS)  # after the first chunk, a failure is the stream's last event
    with pytest.raises(openai.APIError, match="the run failed"):
        list(client.chat.completions.create(model="orchestra", stream=True, extra_body={"progress": True},
                                            messages=[{"role": "user", "content": task}]))
    raw = httpx.post(running.url + "/v1/chat/completions", timeout=60, json={
        "model": "orchestra", "stream": True, "progress": True, "messages": [{"role": "user", "content": task}]})
    last = [line for line in raw.text.splitlines() if line.startswith("data: ")][-1]
    assert last.startswith('data: {"error":{"message":"the run failed')  # compact, as every other event
    failed = [json.loads(line[6:])["orchestra"]["event"] for line in raw.text.splitlines()
              if line.startswith("data: {") and '"node_failed"' in line]
    assert failed and all("an endpoint" in e["error"] and "127.0.0.1" not in e["error"] for e in failed)


def test_json_schema_answers_with_the_schema_and_sends_it_to_the_answer_writers(serve: Any) -> None:
    running, experts = serve()
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
              "required": ["answer", "unit"]}
    completion = running.client().chat.completions.create(
        model="orchestra", messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "distance", "schema": schema}},
        max_tokens=77, temperature=0.3)
    assert completion.choices[0].message.content == '{"answer":42,"unit":"m"}'  # compact
    writers = [p for p in experts.payloads if p["model"] != "planner"]
    assert len(writers) == 4
    for payload in writers:  # (under the client's name: it went as "response")
        assert payload["response_format"]["json_schema"] == {"name": "distance", "schema": {"title": "distance",
                                                                                            **schema}, "strict": False}
        assert payload["max_tokens"] == 77 and payload["temperature"] == 0.3


def test_messages_longer_than_the_experts_context_are_a_400_not_a_resume(serve: Any) -> None:
    """A 502 advised `orchestra resume`, which sent the same prompts and failed alike."""
    running, experts = serve()
    experts.too_long = True
    with pytest.raises(openai.BadRequestError) as refused:
        running.client().chat.completions.create(
            model="orchestra", messages=[{"role": "user", "content": "Summarize: " + "the fox jumps. " * 400}])
    body = refused.value.body
    assert (body["param"], body["code"]) == ("messages", "context_length_exceeded")
    assert body["message"].startswith("the messages do not fit the experts' context: ")
    assert body["message"].endswith("send shorter messages (a resume would send the same prompts)")
    assert "orchestra resume" not in body["message"]


def test_json_cut_at_the_requests_max_tokens_is_a_400_naming_it_not_a_resume(serve: Any) -> None:
    """A structured answer cut by the request's own max_tokens was a 502 advising `orchestra resume`,
    which sent the same capped calls and failed the same way."""
    running, _ = serve()
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
              "required": ["answer", "unit"]}
    with pytest.raises(openai.BadRequestError) as cut:
        running.client().chat.completions.create(
            model="orchestra", messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "distance", "schema": schema}},
            max_tokens=3)
    body = cut.value.body
    assert body["param"] == "max_tokens" and body["message"].startswith("the answer's JSON needs more than max_tokens=3")
    assert body["message"].endswith("send the request again with a larger max_tokens (a resume would keep this one)")
    assert "orchestra resume" not in body["message"] and "starting at at" not in body["message"]
    with pytest.raises(openai.BadRequestError) as named:  # the error names the parameter the client sent
        running.client().chat.completions.create(
            model="orchestra", messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "distance", "schema": schema}},
            max_completion_tokens=3)
    body = named.value.body
    assert body["param"] == "max_completion_tokens"
    assert body["message"].startswith("the answer's JSON needs more than max_completion_tokens=3")
    assert body["message"].endswith("with a larger max_completion_tokens (a resume would keep this one)")


def test_an_empty_json_schema_asks_for_any_json_not_for_text(serve: Any) -> None:
    running, experts = serve()
    answered = running.client().chat.completions.create(
        model="orchestra", messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "anything", "schema": {}}})
    assert json.loads(answered.choices[0].message.content or "") == {"answer": 42, "unit": "m"}
    assert experts.payloads[-1]["response_format"]  # the aggregator was asked for JSON


def test_models_presets_and_agents(serve: Any) -> None:
    running, experts = serve()
    client = running.client()
    ids = [m.id for m in client.models.list()]
    assert ids == ["orchestra", "vote", "solo", "alpha", "beta", "gamma"]
    assert client.models.retrieve("vote").model_extra["orchestra"]["settings"] == {"aggregate": "vote"}
    listing = httpx.get(running.url + "/v1/models").text
    assert "127.0.0.1:" not in listing and "base_url" not in listing  # nothing about the endpoints
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    client.chat.completions.create(model="beta", messages=question, extra_body={"seed": 3})
    assert dict(experts.requests) == {("beta", "expert"): 1}  # the agent alone: no keywords, no aggregator
    with pytest.raises(openai.BadRequestError) as team:  # (accepted, and silently changed nothing)
        client.chat.completions.create(model="beta", messages=question, extra_body={"k": 5})
    assert team.value.body["param"] == "k" and team.value.body["message"] == (
        "'k' does not apply to the model 'beta': that agent answers alone, in one call; ask the model 'orchestra' "
        "(or a preset) for a team")
    assert dict(experts.requests) == {("beta", "expert"): 1}  # refused before any call
    experts.requests.clear()
    voted = client.chat.completions.create(model="vote", messages=question)
    assert experts.count("aggregate") == {} and sum(experts.count("expert").values()) == 3
    assert " says 42 (seed " in (voted.choices[0].message.content or "")  # an expert's own answer won
    experts.requests.clear()
    client.chat.completions.create(model="orchestra", messages=question, extra_body={"k": 1})
    assert sum(experts.count("expert").values()) == 1 and experts.count("aggregate") == {}
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.status_code == 404


def test_each_error_status_is_openais_shape_with_one_clear_message(serve: Any, tmp_path: Path) -> None:
    running, experts = serve(max_request_bytes=4096)
    client = running.client()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    bad = {
        "last message": dict(messages=[*question, {"role": "assistant", "content": "hi"}]),
        "empty task": dict(messages=[*question, {"role": "user", "content": "  "}]),
        "n": dict(messages=question, n=2),
        "n true": dict(messages=question, n=True),
        "unknown": dict(messages=question, extra_body={"kk": 3}),
        "k type": dict(messages=question, extra_body={"k": "three"}),
        "mode": dict(messages=question, extra_body={"mode": "psychic"}),
        "k cap": dict(messages=question, extra_body={"k": 17}),
        "image": dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "schema": dict(messages=question, response_format={"type": "json_schema", "json_schema": {
            "name": "d", "schema": {"type": "object", "properties": {"m": {"type": "float"}}}}}),
        "two limits": dict(messages=question, max_tokens=10, max_completion_tokens=20),
        "usage flag": dict(messages=question, stream=True, stream_options={"include_usage": "false"}),
    }
    messages = {}
    for name, arguments in bad.items():
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="orchestra", **arguments)
        assert error.value.status_code == 400
        messages[name] = error.value.body["message"]
        assert "\n" not in messages[name]
    assert "last message must be the user's, with the task as its text (it is the assistant's)" in messages[
        "last message"]
    assert messages["empty task"] == "messages[1].content is empty: the last user message is the task"
    assert "'kk'" in messages["unknown"] and "'k'" in messages["k type"] and "psychic" in messages["mode"]
    assert "only text content" in messages["image"] and "'k' must be at most 16" in messages["k cap"]
    assert "'k' must be an integer" in messages["k type"]
    assert messages["two limits"] == "'max_tokens' (10) and 'max_completion_tokens' (20) disagree; give one"
    assert messages["usage flag"] == "'stream_options.include_usage' must be true or false"  # ("false" read as true)
    with pytest.raises(openai.BadRequestError) as zero:  # a setting's value out of range names it as param
        client.chat.completions.create(model="orchestra", messages=question, extra_body={"k": 0})
    assert zero.value.body["param"] == "k" and "k: Input should be greater than or equal to 1" in zero.value.message
    assert "$.properties.m.type must be one of object" in messages["schema"] and "'float'" in messages["schema"]
    deep = httpx.post(running.url + "/v1/chat/completions", content=b"[" * 2000 + b"]" * 2000)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)):
        routed = httpx.request(method, running.url + path)
        assert routed.status_code == status and "POST /v1/chat/completions" in routed.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-5", messages=question)
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "x" * 5000}])
    assert large.value.status_code == 413
    not_json = httpx.post(running.url + "/v1/chat/completions", content=b"{nope")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    lone = httpx.post(running.url + "/v1/chat/completions",  # JSON's escape of half a character: not Unicode
                      content=b'{"model": "orchestra", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}')
    assert lone.status_code == 400 and lone.json()["error"] == {
        "message": "messages[0].content is not valid Unicode: character 4 is a lone surrogate; send UTF-8 text",
        "type": "invalid_request_error", "param": "messages[0].content", "code": "invalid_value"}
    schema = httpx.post(running.url + "/v1/chat/completions", content=(
        b'{"model": "orchestra", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
        b'"json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a\\ud800": {}}}}}}'))
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "response_format"
    assert "'response_format' holds text that is not valid Unicode" in schema.json()["error"]["message"]
    assert sum(experts.requests.values()) == 0  # nothing bad reached an expert
    default_n = httpx.post(running.url + "/v1/chat/completions", timeout=60,
                           json={"model": "orchestra", "messages": question, "n": None})
    assert default_n.status_code == 200 and len(default_n.json()["choices"]) == 1  # null: OpenAI's default, 1
    experts.fail = set(EXPERTS)
    sent = sum(experts.requests.values())
    with pytest.raises(openai.APIStatusError) as upstream:  # (an SDK that retries a 502 twice, as by default)
        running.client(max_retries=2).chat.completions.create(model="orchestra", messages=question)
    assert upstream.value.status_code == 502 and "the run failed" in upstream.value.message
    run_id = upstream.value.response.headers[RUN_HEADER]
    assert RunStore(tmp_path / "runs.db").run(run_id).status == "failed"
    # the run is saved: the SDK is told not to retry, which would start (and pay for) a new run each time
    assert upstream.value.response.headers["x-should-retry"] == "false"
    assert len([r for r in RunStore(tmp_path / "runs.db").runs() if r.status == "failed"]) == 1
    assert sum(experts.requests.values()) - sent == RunStore(tmp_path / "runs.db").run_totals(run_id)["requests"]


def test_a_number_too_long_to_read_or_a_schema_too_deep_is_a_400_not_a_500(serve: Any) -> None:
    running, experts = serve()
    client = running.client()
    question = [{"role": "user", "content": "What is 1 + 0?"}]
    long = httpx.post(running.url + "/v1/chat/completions", content=b'{"model": "orchestra", "seed": ' + b"9" * 5000
                      + b"}")  # (Python's limit on reading an integer: a 500 in text/plain)
    assert long.status_code == 400
    assert long.json()["error"]["message"] == "the request body holds a number too long to read (over 4,300 digits)"
    schema: dict = {"type": "string"}
    for _ in range(127):  # (the run's record could not hold it: a 500, retried twice by the SDK)
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(openai.BadRequestError) as nested:
        client.chat.completions.create(model="orchestra", messages=question, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "nests objects and lists more than 64 levels deep" in nested.value.message
    assert sum(experts.requests.values()) == 0


def test_endpoints_that_cannot_be_reached_are_a_503(loopback: Any, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = Running(app(pool_file(tmp_path, f"http://127.0.0.1:{port}"), store=tmp_path / "down.db"))
    try:
        with pytest.raises(openai.InternalServerError) as error:
            down.client().chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi there?"}])
        assert error.value.status_code == 503 and "endpoints cannot be used" in error.value.message
        assert f"orchestra resume {error.value.response.headers[RUN_HEADER]}" in error.value.message
        # the clients are not told where the endpoints are (the model list never shows them); the store is
        assert "cannot reach an endpoint" in error.value.message and f":{port}" not in error.value.message
        assert f":{port}" not in error.value.response.text  # (the run's error beside it, under orchestra, had it)
        assert "cannot reach an endpoint" in error.value.response.json()["orchestra"]["error"]
        stored = RunStore(tmp_path / "down.db").run(error.value.response.headers[RUN_HEADER])
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in (stored.error or "")
        # the failed node names the expert it recruited, as `orchestra show` does (it listed only experts
        # that had left an output: [])
        [node] = error.value.response.json()["orchestra"]["nodes"]
        assert (node["status"], node["experts"]) == ("failed", ["beta"])
        assert RunStore(tmp_path / "down.db").nodes(stored.id)[0]["experts"] == ["beta"]
    finally:
        down.stop()


def test_an_agent_models_run_resumes_with_that_agent_alone(serve: Any, tmp_path: Path) -> None:
    running, experts = serve()
    experts.fail = {"beta"}
    with pytest.raises(openai.InternalServerError) as failed:
        running.client().chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi there?"}])
    run_id = failed.value.response.headers[RUN_HEADER]
    experts.fail = set()
    experts.requests.clear()
    from orchestra.core import Orchestra

    store = RunStore(tmp_path / "runs.db")
    resumed = Orchestra.resuming(run_id, store=store).resume(run_id)
    assert resumed.status == "done" and dict(experts.requests) == {("beta", "expert"): 1}  # no keywords, no draw


def test_a_preset_that_changes_the_servers_own_settings_is_refused_at_start(loopback: Any, tmp_path: Path) -> None:
    from orchestra.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        app(pool_file(tmp_path, "http://127.0.0.1:9"), store=False, presets={"big": {"max_resident_models": 4}})
    assert str(refused.value) == ("preset 'big': max_resident_models belongs to the server, whose one executor "
                                  "serves every request: set it in the pool's settings or with --set, not in a preset")


def test_bearer_token_from_the_environment_is_checked(serve: Any) -> None:
    running, experts = serve(api_key="s3cret")
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    with pytest.raises(openai.AuthenticationError) as error:
        running.client(api_key="wrong").chat.completions.create(model="orchestra", messages=question)
    assert error.value.status_code == 401 and error.value.body["message"] == "incorrect API key"
    missing = httpx.post(running.url + "/v1/chat/completions", json={"model": "orchestra", "messages": question})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key" and "missing bearer" in missing.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        running.client(api_key="wrong").models.list()
    assert sum(experts.requests.values()) == 0
    assert running.client(api_key="s3cret").chat.completions.create(model="orchestra", messages=question).choices
    assert httpx.get(running.url + "/health").json()["status"] == "ok"  # health needs no key


def test_browser_pages_from_the_origins_given_may_call_the_server_and_others_not(serve: Any) -> None:
    """A page's preflight asks with the headers the openai JavaScript SDK sends; the answer and the
    401 of a request without its key both carry the origin, so the page can read them."""
    running, experts = serve(api_key="s3cret", cors_origins=["HTTP://LocalHost:3000", "https://app.example.com"])
    url = running.url + "/v1/chat/completions"
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type, x-stainless-os"}
    allowed = httpx.options(url, headers={"origin": "http://localhost:3000", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "x-stainless-os" in allowed.headers["access-control-allow-headers"]
    other = httpx.options(url, headers={"origin": "http://evil.example", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    question = {"model": "orchestra", "messages": [{"role": "user", "content": "How far does light go in 1 ns?"}]}
    page = {"origin": "https://app.example.com"}
    refused = httpx.post(url, json=question, headers=page)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example.com"
    answered = httpx.post(url, json=question, headers={**page, "authorization": "Bearer s3cret"})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.example.com"
    assert answered.headers["access-control-expose-headers"].lower() == RUN_HEADER
    assert answered.headers[RUN_HEADER]
    assert "access-control-allow-origin" not in httpx.get(running.url + "/health",
                                                         headers={"origin": "http://evil.example"}).headers
    assert sum(experts.requests.values()) > 0


def test_without_cors_origins_no_page_is_let_in_and_bad_origins_are_refused_naming_the_fix(serve: Any) -> None:
    running, _ = serve()
    preflight = httpx.options(running.url + "/v1/chat/completions", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    assert check_origins(["*", "http://[::1]:8080", "HTTPS://Example.COM"]) == [
        "*", "http://[::1]:8080", "https://example.com"]
    with pytest.raises(ConfigError) as error:
        check_origins(["http://localhost:3000/"], "--cors-origin")
    assert str(error.value) == ("--cors-origin 'http://localhost:3000/': an origin is scheme://host[:port] with "
                                "nothing after it, as a browser sends it (here: http://localhost:3000); or * for any")
    for wrong in ("localhost:3000", "https://app.example.com/chat", "ftp://example.com", "http://a b"):
        with pytest.raises(ConfigError, match="an origin is scheme://host"):
            check_origins([wrong])


def test_the_servers_budget_is_shared_by_every_request_and_then_a_429(serve: Any) -> None:
    running, experts = serve(budget=Budget(max_calls=12, max_cost_usd=None, max_tokens=None))
    client = running.client()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    first = client.chat.completions.create(model="orchestra", messages=question)
    assert first.model_extra["orchestra"]["calls"] == 9  # 5 keyword samples, 3 experts, the aggregator
    for _ in range(2):  # a request takes 9 calls; 3 are left: refused before any call, with no run to resume
        with pytest.raises(openai.RateLimitError) as second:
            client.chat.completions.create(model="orchestra", messages=question)
        assert second.value.status_code == 429 and second.value.message.endswith(
            " - the server's budget max_calls=12 has no room for another run (9 calls so far, and a run takes up to 9 calls, "
            "so it was not started)")
        assert RUN_HEADER not in second.value.response.headers
        assert second.value.response.headers["x-should-retry"] == "false"
    assert sum(experts.requests.values()) == 9


async def burst(running: Running, size: int, question: str = "What is fact number {i} about light?") -> list[Any]:
    """``size`` questions sent at once; each one's completion, or the error it got."""
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    outcomes = await asyncio.gather(*(client.chat.completions.create(
        model="orchestra", messages=[{"role": "user", "content": question.format(i=i)}])
        for i in range(size)), return_exceptions=True)
    await client.close()
    return outcomes


def test_a_servers_budget_spent_to_its_limit_refuses_a_request_at_once(serve: Any, tmp_path: Path) -> None:
    running, experts = serve(budget=Budget(max_calls=9, max_cost_usd=None, max_tokens=None))
    client = running.client()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    assert client.chat.completions.create(model="orchestra", messages=question).model_extra["orchestra"]["calls"] == 9
    with pytest.raises(openai.RateLimitError) as spent:
        client.chat.completions.create(model="orchestra", messages=question)
    # refused as spent, before the admission is asked (it would say "no room for another run")
    assert spent.value.message.endswith(" - the server's budget max_calls=9 is spent (9 calls made)")
    health = httpx.get(running.url + "/health")  # (it said "ok": a load balancer kept sending it requests)
    assert (health.status_code, health.json()) == (503, {"status": "budget spent", "runs_in_flight": 0,
                                                         "requests_waiting": 0})
    assert sum(experts.requests.values()) == 9 and len(RunStore(tmp_path / "runs.db").runs()) == 1


def test_a_run_cut_short_does_not_teach_the_server_what_a_run_takes(serve: Any, tmp_path: Path) -> None:
    """A request cut off by its own budget after 6 calls was taken for what a run takes: the next
    burst was let in two at a time under a budget with room for one, and one was cut mid-way."""
    running, experts = serve(budget=Budget(max_calls=20, max_cost_usd=None, max_tokens=None),
                             presets={"tight": {"budget": {"max_calls": 6}}})
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    with pytest.raises(openai.RateLimitError, match="budget max_calls=6 reached"):
        running.client().chat.completions.create(model="tight", messages=question)

    outcomes = asyncio.run(burst(running, 4))
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(answered) == 1 and all("it was not started" in o.message for o in outcomes if o not in answered)
    assert sum(experts.requests.values()) == 6 + 9  # the cut run's, then one whole run; none cut mid-way


def test_a_burst_under_the_servers_budget_gets_the_answers_it_can_pay_for(serve: Any, tmp_path: Path) -> None:
    """Started at once, 6 requests' keyword samples spent a budget of 2 answers and none was
    answered; admitted while the budget can be expected to finish them, 2 are answered and the
    rest refused before any call."""
    running, experts = serve(budget=Budget(max_calls=20, max_cost_usd=None, max_tokens=None))

    outcomes = asyncio.run(burst(running, 6))
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(answered) == 2 and len(refused) == 4  # the first alone, then one more beside nothing: 18 of 20
    assert all(a.choices[0].message.content == "The answer is 42." for a in answered)
    assert all("it was not started" in r.message for r in refused)
    assert sum(experts.requests.values()) == 18  # counted where they arrive: none for a refused request
    assert len(RunStore(tmp_path / "runs.db").runs()) == 2  # and no run recorded for them


def test_what_an_agents_request_takes_is_no_measure_of_a_teams(serve: Any, tmp_path: Path) -> None:
    """After one request to an agent (one call), the server took a team's run to cost that much too: a burst
    of team requests was let in at once, their keyword samples spent the budget, and none was answered; the
    other way, an agent's request was refused as if it took a team's 9 calls."""
    running, experts = serve(budget=Budget(max_calls=20, max_cost_usd=None, max_tokens=None))
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    assert running.client().chat.completions.create(model="alpha", messages=question).usage.total_tokens > 0

    outcomes = asyncio.run(burst(running, 6))
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(answered) == 2 and len(refused) == 4  # the first team alone, then one beside nothing: 1 + 18 of 20
    assert all("a run takes up to 9 calls, so it was not started" in r.message for r in refused)
    assert sum(experts.requests.values()) == 19
    # one call is left, and an agent's request takes one
    assert running.client().chat.completions.create(model="beta", messages=question).choices[0].message.content
    assert sum(experts.requests.values()) == 20


def test_a_short_requests_run_is_no_measure_of_a_long_ones(serve: Any, tmp_path: Path) -> None:
    """After one request saying "hi", the server took a run of a 1,600-character request to cost that
    much too: a burst of those under its token budget started at once, and their runs were cut off
    having spent it, with no answer. A run of a longer request goes alone until one is measured."""
    running, experts = serve(budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=8_000))
    experts.bill_prompts = True  # ("hi" takes 348 tokens, a long request 2,050)
    assert running.client().chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "hi"}])
    long = "Summarise this, item {i}: " + "lorem ipsum dolor sit amet " * 60
    outcomes = asyncio.run(burst(running, 6, long))
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError) and "it was not started" in o.message]
    assert len(answered) + len(refused) == 6 and len(answered) >= 2, outcomes  # none cut off having spent
    runs = RunStore(tmp_path / "runs.db").runs()
    assert sorted(run.status for run in runs) == ["done"] * (len(answered) + 1)


@pytest.mark.parametrize("limit", [{"max_calls": 1000}, {"max_tokens": 1_000_000}])
def test_longer_requests_than_any_measured_run_side_by_side_when_the_budget_has_room(serve: Any, limit: dict) -> None:
    """Each request longer than every one measured was a kind never seen, so it ran alone and the
    rest waited: four at once took four times as long, under a budget of 1,000 calls too, where a
    request's length changes nothing. Now its cost is expected from the measured runs (more tokens
    in each call) and, under a budget of calls alone, its length is no measure at all."""
    running, experts = serve(budget=Budget(**{"max_calls": None, "max_tokens": None, "max_cost_usd": None, **limit}))
    experts.bill_prompts = True
    assert running.client().chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "hi"}])
    experts.gates["expert"] = (12, asyncio.Event())  # the experts answer once all four runs' 12 have arrived
    outcomes = asyncio.run(burst(running, 4, "Summarise this, item {i}: " + "lorem ipsum dolor sit amet " * 60))
    assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
    assert sum(experts.count("expert").values()) == 3 + 12


def test_a_request_too_big_for_the_servers_token_budget_leaves_the_rest_for_others(serve: Any) -> None:
    running, experts = serve(budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=20_000))
    client = running.client()
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    with pytest.raises(openai.BadRequestError) as big:  # it could never fit: a 400, not a 429 to retry
        client.chat.completions.create(model="orchestra", messages=question, max_tokens=100_000)
    assert big.value.message.count("(--total-max-tokens=20000)") == 1 and "up to 100000 of answer" in big.value.message
    assert big.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "word " * 30_000}])
    assert "of messages" in long.value.message and long.value.body["param"] == "messages"
    assert sum(experts.requests.values()) == 0  # refused before any call
    with pytest.raises(openai.RateLimitError) as over:  # fits the budget, not what is left of it
        client.chat.completions.create(model="orchestra", messages=question, max_tokens=19_900)
    assert "the next call may take" in over.value.message and over.value.response.headers["x-should-retry"] == "false"
    for _ in range(2):  # what is left still serves requests that fit
        assert client.chat.completions.create(model="orchestra", messages=question).choices[0].finish_reason == "stop"


def test_each_requests_own_budget_comes_from_the_settings(serve: Any, tmp_path: Path) -> None:
    running, experts = serve(settings={"budget": {"max_calls": 6}})
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    for _ in range(2):  # each request has its own 6 calls: the second fails the same way, not earlier
        with pytest.raises(openai.RateLimitError, match="budget max_calls=6 reached") as error:
            running.client().chat.completions.create(model="orchestra", messages=question)
        run_id = error.value.response.headers[RUN_HEADER]
        # its own budget comes along on resume: the advice says to raise it there (a plain resume stopped again)
        assert error.value.message.endswith(
            f"; run {run_id} is saved and keeps its budget: `orchestra resume {run_id} --max-calls N`, N above it, "
            "goes on with it (each request's run has the server's --max-calls (budget.max_calls in its settings))")
        assert RunStore(tmp_path / "runs.db").run(run_id).status == "budget_exceeded"
        spent = error.value.response.json()  # its calls are billed all the same: the error says what they spent
        assert spent["orchestra"]["calls"] == 6 and spent["orchestra"]["status"] == "budget_exceeded"
        assert spent["usage"]["total_tokens"] == spent["usage"]["prompt_tokens"] + spent["usage"]["completion_tokens"] > 0
    assert sum(experts.requests.values()) == 12
    # the advice, followed: the run finishes, sending only what it had not sent
    done = subprocess.run([sys.executable, "-m", "orchestra", "resume", run_id, "--max-calls", "20", "--store",
                           str(tmp_path / "runs.db")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    assert done.returncode == 0, done.stderr
    assert RunStore(tmp_path / "runs.db").run(run_id).status == "done" and sum(experts.requests.values()) > 12


@pytest.mark.parametrize("settings, sent", [({}, 1024), ({"budget": {"cap_answers": False}}, None)])
def test_the_servers_token_or_cost_limit_caps_answers_unless_the_server_says_not(serve: Any, settings: dict,
                                                                                sent: int | None) -> None:
    """`--set budget.cap_answers=false` was overruled by the server's --total-max-cost: answers stayed capped."""
    running, experts = serve(budget=Budget(max_calls=None, max_cost_usd=5, max_tokens=None), settings=settings)
    running.client().chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "Why?"}])
    limits = [p.get("max_tokens") for p in experts.payloads if experts.purpose(p, json.dumps(p["messages"])) == "expert"]
    assert limits == [sent] * 3


def test_a_streamed_runs_error_event_says_what_its_calls_spent(serve: Any) -> None:
    running, experts = serve(settings={"budget": {"max_calls": 6}})
    with httpx.stream("POST", running.url + "/v1/chat/completions", timeout=60, json={
            "model": "orchestra", "stream": True, "progress": True,
            "messages": [{"role": "user", "content": "Why?"}]}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    last = events[-1]
    assert last["error"]["code"] == "insufficient_quota" and last["orchestra"]["calls"] == 6
    assert last["usage"]["total_tokens"] > 0 and sum(experts.requests.values()) == 6


def test_a_budget_a_preset_sets_is_named_as_the_presets(serve: Any) -> None:
    """The server's own --max-calls did not set it: the advice names the preset."""
    running, _ = serve(presets={"fast": {"budget": {"max_calls": 2}}})
    with pytest.raises(openai.RateLimitError, match="budget max_calls=2 reached") as error:
        running.client().chat.completions.create(model="fast", messages=[{"role": "user", "content": "Hi there?"}])
    assert error.value.message.endswith("goes on with it (model 'fast' is a preset that sets budget.max_calls)")


def test_without_a_store_no_error_says_the_run_is_saved(serve: Any) -> None:
    running, _ = serve(store=False, settings={"budget": {"max_calls": 3}})
    with pytest.raises(openai.RateLimitError) as error:
        running.client().chat.completions.create(model="orchestra", messages=[{"role": "user", "content": "Why?"}])
    run_id = error.value.response.headers[RUN_HEADER]
    assert error.value.message.endswith(f"budget.max_calls in its settings); run {run_id} was not saved (the server "
                                        "runs with --no-store)")
    assert "resume" not in error.value.message


def test_the_banner_url_brackets_an_ipv6_address() -> None:
    assert base_url("::1", 8000) == "http://[::1]:8000/v1"
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/v1"


def test_a_request_its_own_budget_could_never_hold_is_a_400_before_any_call(serve: Any) -> None:
    running, experts = serve(settings={"budget": {"max_tokens": 5_000}})
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    with pytest.raises(openai.BadRequestError) as big:  # a resume could never finish it: not a 429
        running.client().chat.completions.create(model="orchestra", messages=question, max_tokens=6_000)
    assert "than a request's own budget allows (budget.max_tokens=5000)" in big.value.message
    assert "up to 6000 of answer" in big.value.message and big.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as named:
        running.client().chat.completions.create(model="orchestra", messages=question, max_completion_tokens=6_000)
    assert named.value.body["param"] == "max_completion_tokens" and "a smaller max_completion_tokens" in named.value.message
    assert sum(experts.requests.values()) == 0


def test_concurrent_requests_reach_each_model_together_and_route_alone(serve: Any) -> None:
    running, experts = serve()
    questions = [f"What is fact number {i} about light?" for i in range(32)]

    async def ask_all(extra: dict[str, Any]) -> list[Any]:
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answers = await asyncio.gather(*(client.chat.completions.create(
            model="orchestra", messages=[{"role": "user", "content": q}], extra_body=extra) for q in questions))
        await client.close()
        return answers

    # every expert request is held until all 96 (32 requests x k=3) have arrived, and every
    # aggregation until all 32 have: the loopback would time out if one request's calls waited
    # for another request to finish
    experts.gates = {"expert": (96, asyncio.Event()), "aggregate": (32, asyncio.Event())}
    answers = asyncio.run(ask_all({}))
    assert all(a.choices[0].message.content == "The answer is 42." for a in answers)
    assert sum(experts.count("expert").values()) == 96 and experts.count("aggregate") == {"alpha": 32}
    # routing is per request: with k=2 of 3, each question gets the experts it gets alone
    experts.gates = {}
    alone = running.client().chat.completions.create(
        model="orchestra", messages=[{"role": "user", "content": questions[5]}], extra_body={"k": 2, "seed": 9})
    together = asyncio.run(ask_all({"k": 2, "seed": 9}))
    assert together[5].model_extra["orchestra"]["nodes"] == alone.model_extra["orchestra"]["nodes"]


def test_stopping_the_server_cancels_runs_in_flight_and_they_stay_resumable(serve: Any, tmp_path: Path) -> None:
    running, experts = serve(grace=0.2)
    experts.hold = True
    outcome: list[BaseException | Any] = []

    def ask() -> None:
        try:
            outcome.append(running.client(timeout=30).chat.completions.create(
                model="orchestra", messages=[{"role": "user", "content": "How far does light travel in a nanosecond?"}]))
        except BaseException as error:  # the connection is closed under it
            outcome.append(error)

    caller = threading.Thread(target=ask)
    caller.start()
    while sum(experts.count("expert").values()) < 3:
        caller.join(0.01)
    running.stop()
    caller.join(30)
    store = RunStore(tmp_path / "runs.db")
    [record] = store.runs()
    assert record.status == "cancelled"
    experts.release.set()
    from orchestra.core import Orchestra

    resumed = Orchestra.resuming(record.id, store=store).resume(record.id)
    assert resumed.status == "done" and resumed.answer == "The answer is 42."


class ServeProcess:
    """``orchestra serve`` as a real subprocess on port 0; the address is read from its first line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "orchestra", "serve", "--port", "0", *args],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()
        self.url = self.banner.split(" ")[2].removesuffix("/v1") if self.banner.startswith("orchestra serve") else ""

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


def test_the_command_serves_with_a_key_from_the_environment_and_stops_cleanly(
        loopback: Any, tmp_path: Path) -> None:
    experts = Experts()
    server = loopback(experts.handler)
    pool = pool_file(tmp_path, server.url)
    presets = tmp_path / "presets.yaml"
    presets.write_text("five: {k: 5}\n")
    served = ServeProcess("--pool", str(pool), "--store", str(tmp_path / "runs.db"), "--presets", str(presets),
                          "--api-key-env", "ORCH_TEST_KEY", env={"ORCH_TEST_KEY": "k-123"})
    try:
        assert served.banner.startswith("orchestra serve: http://127.0.0.1:"), served.banner
        assert "models: orchestra, vote, solo, five, alpha, beta, gamma" in served.banner
        assert "k-123" not in served.banner
        headers = {"Authorization": "Bearer k-123"}
        body = {"model": "five", "messages": [{"role": "user", "content": "How far does light travel in a nanosecond?"}]}
        answer = httpx.post(served.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "The answer is 42."
        assert sum(experts.count("expert").values()) == 5
        assert httpx.post(served.url + "/v1/chat/completions", json=body).status_code == 401
    finally:
        code, err = served.stop(signal.SIGTERM)
    assert code == 0 and err == "orchestra serve: stopping; no run in flight\n", err  # (a SIGTERM said nothing)
    assert "k-123" not in err and "k-123" not in (tmp_path / "runs.db").read_bytes().decode("latin-1")
    listed = subprocess.run([sys.executable, "-m", "orchestra", "runs", "--store", str(tmp_path / "runs.db")],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "How far does light travel in a nanosecond?" in listed.stdout and " done " in listed.stdout


def held_request(loopback: Any, tmp_path: Path, *options: str) -> tuple[ServeProcess, Experts, threading.Thread,
                                                                         list[httpx.Response]]:
    """The command serving a pool whose experts never answer, and a client waiting on one request
    whose expert calls have all arrived."""
    experts = Experts()
    experts.hold = True
    server = loopback(experts.handler)
    served = ServeProcess("--pool", str(pool_file(tmp_path, server.url)), "--store", str(tmp_path / "runs.db"),
                          *options)
    answers: list[httpx.Response] = []
    body = {"model": "orchestra", "messages": [{"role": "user", "content": "How far does light travel?"}]}
    caller = threading.Thread(target=lambda: answers.append(
        httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)))
    caller.start()
    while sum(experts.count("expert").values()) < 3:
        caller.join(0.01)
    return served, experts, caller, answers


def test_a_second_signal_cancels_the_runs_in_flight_and_their_clients_are_told(loopback: Any, tmp_path: Path) -> None:
    served, experts, caller, answers = held_request(loopback, tmp_path)
    served.process.send_signal(signal.SIGINT)  # drains: the run is still waiting for its experts
    while True:  # signals are not queued: the second one only once the first has closed the listener
        try:
            httpx.get(served.url + "/health", timeout=5)
        except httpx.TransportError:
            break
        caller.join(0.01)
    served.process.send_signal(signal.SIGINT)
    caller.join(60)
    code, err = served.stop()
    assert code == 0 and "Traceback" not in err, err
    [answer] = answers
    run_id = answer.headers[RUN_HEADER]
    assert answer.status_code == 503 and f"cancelled run {run_id}" in answer.json()["error"]["message"]
    stopped = RunStore(tmp_path / "runs.db").run(run_id)
    assert (stopped.status, stopped.error) == ("cancelled", "cancelled: the server is shutting down")
    # what its calls spent (its keyword samples answered, its experts' requests cut off) is said beside the error
    spent = answer.json()  # (all 8 requests: the 3 experts' cut off in flight were left out)
    recorded = RunStore(tmp_path / "runs.db").result(run_id).usage.requests
    assert spent["orchestra"]["status"] == "cancelled" and spent["orchestra"]["requests"] == recorded == 8
    assert spent["usage"]["prompt_tokens"] > 0
    experts.release.set()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP])  # (a closed terminal: it died with no grace)
def test_runs_still_going_when_the_grace_ends_are_cancelled_and_their_clients_told(
        loopback: Any, tmp_path: Path, stop: signal.Signals) -> None:
    served, experts, caller, answers = held_request(loopback, tmp_path, "--grace", "0.5")  # (a whole number was asked)
    code, err = served.stop(stop)
    caller.join(60)
    experts.release.set()
    assert code == 0 and "Traceback" not in err and "1 run(s) in flight get 0.5 s to finish" in err, err
    assert "Unclosed" not in err, err  # (the calls went on after the connections closed, and reopened them)
    [answer] = answers
    assert answer.status_code == 503 and "cancelled run" in answer.json()["error"]["message"]
    cut_off = answer.headers[RUN_HEADER]  # the operator is told which runs were cut off, as their clients are
    assert f"orchestra serve: cancelled 1 run still in flight, each resumable (`orchestra resume {cut_off} " in err
    assert err.rstrip().endswith(f"): {cut_off}"), err
    calls = RunStore(tmp_path / "runs.db").calls(answer.headers[RUN_HEADER])
    cut = [c for c in calls if c["purpose"] == "expert"]
    assert len(cut) == 3 and all("cancelled while its request was in flight" in c["error"] for c in cut)


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "orchestra", "serve", "--port", str(port), "--no-store"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_the_command_refuses_a_missing_key_variable_and_a_clashing_preset(tmp_path: Path) -> None:
    missing = ServeProcess("--api-key-env", "ORCH_UNSET_VARIABLE")
    code, err = missing.stop()
    assert code == 2 and err.strip() == ("error: --api-key-env ORCH_UNSET_VARIABLE: that environment variable is not "
                                         "set; set it to the key clients must send")
    empty = ServeProcess("--api-key-env", "ORCH_EMPTY_VARIABLE", env={"ORCH_EMPTY_VARIABLE": " "})
    code, err = empty.stop()
    assert code == 2 and err.strip() == ("error: --api-key-env ORCH_EMPTY_VARIABLE: that environment variable is "
                                         "empty; set it to the key clients must send")
    pasted = ServeProcess("--api-key-env", "sk-proj-Secret123")  # (the key itself: it was repeated in the error)
    code, err = pasted.stop()
    assert code == 2 and "Secret123" not in err and err.strip() == (
        "error: --api-key-env: must be the NAME of an environment variable (e.g. MY_KEY: letters, digits and _), "
        "not the key itself")
    named_like = ServeProcess("--api-key-env", "ghp_Secret123abc")  # (a key that could be a variable's name)
    code, err = named_like.stop()
    assert code == 2 and "Secret123" not in err and err.strip() == (
        "error: --api-key-env: the environment variable it names (not repeated here: it may be a key given by "
        "mistake) is not set; set it to the key clients must send")
    presets = tmp_path / "presets.yaml"
    presets.write_text("orchestra: {k: 2}\n")
    clash = ServeProcess("--presets", str(presets), "--no-store")
    code, err = clash.stop()
    assert code == 2 and "preset 'orchestra' has the name of the orchestra" in err


def test_an_agent_named_like_the_team_is_refused() -> None:
    """An agent named ``orchestra`` hid the team: /v1/models listed one 'orchestra', and a request for
    a team of 2 was refused as that agent's."""
    pool = Pool(agents=[Agent(name="orchestra", model=FunctionModel(lambda request: "hi", name="m"))])
    with pytest.raises(ConfigError, match="^agent 'orchestra' has the name serve gives the team; rename the agent"):
        served_models(pool, {})


@pytest.mark.parametrize("store", [True, False])
def test_a_stream_whose_retry_wrote_another_answer_ends_in_an_error_with_the_answer(serve: Any, tmp_path: Path,
                                                                                   store: bool) -> None:
    """The answer's call broke off mid-stream and its retry wrote otherwise: the text the client got
    is not the answer's beginning, and a stream cannot take it back. It ended with finish_reason
    "stop", the client none the wiser; it ends in an error event carrying the whole answer."""
    running, experts = serve(**({} if store else {"store": False}))
    experts.streams = [["The answer is ", "41, ", None], ["Another ", "answer: 42."]]
    chunks = running.client().chat.completions.create(
        model="orchestra", stream=True, messages=[{"role": "user", "content": "How far does light travel?"}])
    got: list[str] = []
    with pytest.raises(openai.APIError) as error:
        for chunk in chunks:
            got += [choice.delta.content or "" for choice in chunk.choices]
    assert "".join(got) == "The answer is 41,"  # (relayed as it came, before the break)
    assert error.value.body["answer"] == "Another answer: 42."  # type: ignore[index]
    assert "its retry wrote another answer, so the text streamed is not the answer" in error.value.message
    assert ("orchestra show" in error.value.message) is store
    assert experts.count("aggregate") == {"alpha": 2} and experts.streams == []


def test_a_stream_whose_aggregator_failed_mid_answer_says_a_vote_answered(serve: Any) -> None:
    """The aggregator broke off on every attempt and the experts' vote answered: the error said a
    retry had written another answer."""
    running, experts = serve()
    experts.streams = [["The answer is ", "41, ", None]] * 6  # (more than its attempts)
    chunks = running.client().chat.completions.create(
        model="orchestra", stream=True, extra_body={"progress": True},
        messages=[{"role": "user", "content": "How far does light travel?"}])
    events: list[str] = []
    with pytest.raises(openai.APIError) as error:
        for chunk in chunks:
            if not chunk.choices:
                events.append(chunk.model_extra["orchestra"]["event"]["kind"])
    assert "the aggregator writing the answer failed mid-stream and a vote of the experts answered instead" in (
        error.value.message)
    assert "says 42" in error.value.body["answer"]  # type: ignore[index]  # (an expert's answer, voted for)
    assert "aggregation_fell_back" in events


def test_a_stream_whose_retry_writes_the_same_text_goes_on_after_it(serve: Any) -> None:
    """A seeded retry writes the text the broken stream had sent again: it started from its first
    word, a beginning of what was sent, and that ended the stream in "answer_rewritten" (on
    llama.cpp's server, every stream broken mid-answer)."""
    running, experts = serve()
    experts.streams = [["The answer is ", "41, ", None], ["The answer ", "is 41, ", "give or take."]]
    chunks = running.client().chat.completions.create(
        model="orchestra", stream=True, messages=[{"role": "user", "content": "How far does light travel?"}])
    got = [choice.delta.content or "" for chunk in chunks for choice in chunk.choices]
    assert "".join(got) == "The answer is 41, give or take."
    assert experts.count("aggregate") == {"alpha": 2} and experts.streams == []


def test_a_model_that_ends_its_reasoning_with_a_bare_think_tag_streams_its_answer_once_known(serve: Any) -> None:
    """An R1 distill whose chat template opens the ``<think>`` writes its reasoning, a bare ``</think>``,
    then the answer: streamed, the reasoning went out as text and the stream ended in a false
    `answer_rewritten` ("its retry wrote another answer", with no retry). The first such stream says
    what happened, and that model's later streams wait for the ``</think>``: the answer alone."""
    running, experts = serve()
    reasoning = ["Okay, the user asks about the sky.", "\n</think>\n\n", "The sky is blue."]
    experts.answer, experts.hold_stream = reasoning, True  # (the tag comes once the client has the first piece)
    question = [{"role": "user", "content": "Why is the sky blue?"}]

    def streamed() -> list[str]:
        received: list[str] = []
        for chunk in running.client().chat.completions.create(model="orchestra", stream=True, messages=question):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                experts.seen.set()
        return received

    with pytest.raises(openai.APIError) as error:
        streamed()
    assert error.value.body["answer"] == "The sky is blue."  # type: ignore[index]
    assert "ended its reasoning with a </think> after that reasoning had streamed" in error.value.message
    assert "retry" not in error.value.message
    experts.seen.set()  # (nothing is relayed before the tag now: the upstream need not wait for a reader)
    assert "".join(streamed()) == "The sky is blue."
    whole = running.client().chat.completions.create(model="orchestra", messages=question)
    assert whole.choices[0].message.content == "The sky is blue."
    assert experts.count("aggregate") == {"alpha": 3}  # (one call each: no retry)
    experts.answer, experts.hold_stream = ["The sky", " is blue."], False  # its answers stop reasoning so
    assert "".join(streamed()) == "The sky is blue."  # (held to its end: a </think> might still have come)
    experts.hold_stream = True  # (its first piece goes out before the rest comes: streamed as it is written again)
    experts.seen.clear()
    assert "".join(streamed()) == "The sky is blue."


def test_the_feed_relays_only_what_the_stored_answer_will_begin_with() -> None:
    async def relay(updates: list[str], answer: str) -> tuple[list[str], str]:
        feed = Feed(progress=False)
        for so_far in updates:
            feed.text(so_far)
        sent = []
        while not feed.items.empty():
            sent.append(feed.items.get_nowait()[1])
        return sent, "(rewritten)" if feed.rewritten(answer) else feed.rest(answer)

    thinking = ["<thi", "<think>hmm", "<think>hmm</think>\n", "<think>hmm</think>\nThe ", "<think>hmm</think>\nThe sky"]
    assert asyncio.run(relay(thinking, "The sky is blue.")) == (["The", " sky"], " is blue.")
    retried = ["The sky", "The sky is", "A different", "A different start"]  # a retry wrote otherwise
    assert asyncio.run(relay(retried, "A different start.")) == (["The sky", " is"], "(rewritten)")
    # a retry that writes the same text again: its beginning is waited on, then relaying goes on
    again = ["The sky", "The sky is", "The", "The sky", "The sky is", "The sky is blue"]
    assert asyncio.run(relay(again, "The sky is blue.")) == (["The sky", " is", " blue"], ".")
    shorter = ["The sky", "The sky is", "The"]  # a retry that wrote a shorter answer than was sent
    assert asyncio.run(relay(shorter, "The end.")) == (["The sky", " is"], "(rewritten)")
    assert asyncio.run(relay(["  Hello ", "  Hello world  "], "Hello world")) == (["Hello", " world"], "")
    bare = ["Okay, so", "Okay, so.</think>", "Okay, so.</think>Blue."]  # reasoning the prompt's <think> opened
    assert asyncio.run(relay(bare, "Blue.")) == (["Okay, so"], "(rewritten)")


def test_the_feed_holds_back_what_may_begin_a_stop_sequence_and_relays_nothing_past_one() -> None:
    async def relay(updates: list[str], stop: tuple[str, ...]) -> list[str]:
        feed = Feed(progress=False, stop=stop)
        for so_far in updates:
            feed.text(so_far)
        return [feed.items.get_nowait()[1] for _ in range(feed.items.qsize())]

    growing = ["The answer i", "The answer is 4", "The answer is 42.", "The answer is 42. More"]
    assert asyncio.run(relay(growing, ("is 4",))) == ["The answe", "r "]  # (the last 3 characters held back)
    assert asyncio.run(relay(growing, ("42. M", "x"))) == ["The answ", "er ", "is", " "]  # (4 held back)
    assert asyncio.run(relay(["Hi", "Hi there"], ("Hi",))) == []  # a stop at the start: nothing to relay
    assert asyncio.run(relay(["ab"], ("abcdef",))) == []  # shorter than what is held back


def test_a_schema_s_refs_and_bounds_are_checked_before_an_answer_goes_out(serve: Any) -> None:
    """The schema an SDK writes for a pydantic class keeps its parts in ``$defs``: the answer is
    checked through them (every expert's 42 breaks ``maximum: 10``), so no answer goes out unchecked."""
    running, experts = serve()
    schema = {"type": "object", "required": ["answer", "unit"],
              "properties": {"answer": {"$ref": "#/$defs/Small"}, "unit": {"anyOf": [{"type": "string"},
                                                                                    {"type": "null"}]}},
              "$defs": {"Small": {"type": "integer", "maximum": 10}}}
    question = [{"role": "user", "content": "How far does light travel in a nanosecond?"}]
    with pytest.raises(openai.APIStatusError) as failed:
        running.client().chat.completions.create(
            model="orchestra", messages=question,
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
    assert "$.answer: above the maximum 10" in failed.value.body["message"]
    schema["$defs"]["Small"]["maximum"] = 100  # type: ignore[index]
    answered = running.client().chat.completions.create(
        model="orchestra", messages=question,
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
    assert answered.choices[0].message.content == '{"answer":42,"unit":"m"}'
    # the endpoint gets it whole (titled by the client's name)
    assert experts.payloads[-1]["response_format"]["json_schema"]["schema"] == {"title": "d", **schema}


def test_a_client_that_disconnects_cancels_its_run(serve: Any, tmp_path: Path) -> None:
    running, experts = serve()
    experts.hold = True  # the experts do not answer until released
    body = json.dumps({"model": "orchestra", "messages": [{"role": "user", "content": "How far does light go?"}]})
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        while sum(experts.count("expert").values()) < 3:  # the run is waiting for its experts
            threading.Event().wait(0.01)
    store = RunStore(tmp_path / "runs.db")  # the client has gone: its run ends, recorded as cancelled
    for _ in range(3000):
        if (runs := store.runs()) and runs[0].status != "running":
            break
        threading.Event().wait(0.01)
    # its experts' requests are still in flight at the endpoint: a resume elsewhere would send them again (paid
    # twice: the run's lease was given up at once), so it is refused until they end
    with pytest.raises(RunHeld, match="whose requests for it are still in flight; resume it once they end"):
        store.check_free([runs[0].id])
    experts.release.set()
    assert runs[0].status == "cancelled"
    # (it read "cancelled by the user", the Ctrl-C words, as if the operator had stopped it)
    assert runs[0].error == "cancelled: the client disconnected"
    assert {node["error"] for node in store.nodes(runs[0].id)} == {"cancelled: the client disconnected"}
    assert httpx.get(running.url + "/health").json()["runs_in_flight"] == 0
    for _ in range(3000):  # their answers came: recorded for the resume, and the run is free
        try:
            store.check_free([runs[0].id])
            break
        except RunHeld:
            threading.Event().wait(0.01)
    store.check_free([runs[0].id])
    answered = [c for c in store.calls(runs[0].id) if c["purpose"] == "expert" and c["status"] == "ok"]
    assert len(answered) == 3


def test_a_client_that_leaves_while_its_request_waits_for_the_budget_gets_no_run(serve: Any, tmp_path: Path) -> None:
    """Under a server budget the second request waits while the first runs alone; its client leaving
    then must not start a run once the first ends (nobody would read it, and it would be paid)."""
    running, experts = serve(budget=Budget(max_calls=40, max_cost_usd=None, max_tokens=None))
    experts.hold = True  # the first run waits for its experts until released
    first = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    answers: list[Any] = []
    asker = threading.Thread(target=lambda: answers.append(first.chat.completions.create(
        model="orchestra", messages=[{"role": "user", "content": "How far does light go?"}])))
    asker.start()
    while sum(experts.count("expert").values()) < 3:  # the first run is waiting for its experts
        threading.Event().wait(0.01)

    def health() -> dict[str, Any]:
        return httpx.get(running.url + "/health").json()  # type: ignore[no-any-return]

    body = json.dumps({"model": "orchestra", "messages": [{"role": "user", "content": "How far does sound go?"}]})
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(3000):
            if health()["requests_waiting"] == 1:
                break
            threading.Event().wait(0.01)
        assert health() == {"status": "ok", "runs_in_flight": 1, "requests_waiting": 1}
    for _ in range(3000):  # its client has gone: it stops waiting
        if health()["requests_waiting"] == 0:
            break
        threading.Event().wait(0.01)
    before = sum(experts.requests.values())
    experts.release.set()
    asker.join(60)
    assert answers and answers[0].choices[0].message.content == "The answer is 42."
    assert health() == {"status": "ok", "runs_in_flight": 0, "requests_waiting": 0}
    assert sum(experts.requests.values()) == before + 1  # the first run's aggregation, and nothing else
    assert [run.task for run in RunStore(tmp_path / "runs.db").runs()] == ["How far does light go?"]


@pytest.mark.parametrize("flag", ["--grace", "--total-max-cost"])
def test_a_number_flag_that_is_not_finite_is_refused_in_one_line(flag: str) -> None:
    # (click's float range takes nan: --grace nan was a ValueError traceback, --total-max-cost nan pydantic's lines)
    done = subprocess.run([sys.executable, "-m", "orchestra", "serve", flag, "nan", "--no-store"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        2, f"error: Invalid value for '{flag}': 'nan' is not a finite number (see python -m orchestra serve --help)\n")


def test_a_request_waiting_for_the_servers_budget_when_it_stops_gets_a_503_and_no_run(
        loopback: Any, tmp_path: Path) -> None:
    """At the first SIGTERM, requests still waiting for the server's budget to admit their runs were
    admitted during the grace: each started a paid run, cancelled at the grace's end."""
    served, experts, caller, answers = held_request(loopback, tmp_path, "--total-max-calls", "100")
    body = {"model": "orchestra", "messages": [{"role": "user", "content": "How far does sound travel?"}]}
    waiting: list[httpx.Response] = []
    second = threading.Thread(target=lambda: waiting.append(
        httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)))
    second.start()
    while httpx.get(served.url + "/health", timeout=5).json()["requests_waiting"] < 1:
        second.join(0.01)
    sent = sum(experts.requests.values())
    served.process.send_signal(signal.SIGTERM)  # drains: the first run goes on, the waiting request is refused
    second.join(60)
    [refused] = waiting
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert sum(experts.requests.values()) == sent
    experts.release.set()
    caller.join(60)
    code, err = served.stop()
    assert code == 0 and "Traceback" not in err, err
    [answer] = answers
    assert answer.status_code == 200
    assert [run.task for run in RunStore(tmp_path / "runs.db").runs()] == ["How far does light travel?"]


def test_an_unknown_stream_option_is_refused_like_any_unknown_parameter(serve: Any) -> None:
    """`stream_options: {"inclde_usage": true}` (a typo) was accepted and ignored: the stream came
    without its usage chunk, while an unknown top-level parameter is a 400 naming it."""
    running, experts = serve()
    with pytest.raises(openai.BadRequestError) as refused:
        list(running.client().chat.completions.create(
            model="beta", stream=True, stream_options={"inclde_usage": True},  # type: ignore[typeddict-unknown-key]
            messages=[{"role": "user", "content": "Hi there?"}]))
    assert "unknown parameter 'stream_options.inclde_usage'" in refused.value.message
    assert sum(experts.requests.values()) == 0
    chunks = list(running.client().chat.completions.create(  # (OpenAI's other key is taken)
        model="beta", stream=True, stream_options={"include_usage": True, "include_obfuscation": False,
                                                   "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        messages=[{"role": "user", "content": "Hi there?"}]))
    assert chunks[-1].usage is not None and sum(experts.requests.values()) > 0


def test_created_is_when_the_request_was_read(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``created`` was the time the answer was written (a run of the embedded model: 44 s after the
    request); OpenAI's is when the completion began, which clients read as the request's time."""
    import types

    import orchestra.openai_wire

    running, _ = serve()
    monkeypatch.setattr(orchestra.openai_wire, "time", types.SimpleNamespace(time=lambda: 1_000.5))  # read then
    answer = running.client().chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi?"}])
    chunks = list(running.client().chat.completions.create(model="beta", stream=True,
                                                           messages=[{"role": "user", "content": "Hi?"}]))
    assert answer.created == 1_000 and {chunk.created for chunk in chunks} == {1_000}


def test_a_cors_origin_no_browser_sends_is_refused_before_the_pool_loads(tmp_path: Path) -> None:
    broken = tmp_path / "pools" / "pool.yaml"  # (were the pool read first, its YAML would be the error)
    broken.parent.mkdir()
    broken.write_text("name: [unclosed")
    done = subprocess.run([sys.executable, "-m", "orchestra", "serve", "--pool", str(broken), "--cors-origin", "*",
                           "--cors-origin", "http://localhost:3000/", "--no-store"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "error: --cors-origin 'http://localhost:3000/': an origin is "
                                                 "scheme://host[:port] with nothing after it, as a browser sends it "
                                                 "(here: http://localhost:3000); or * for any\n")
