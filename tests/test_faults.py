"""Misbehaving endpoints: bounded calls, and errors that say what really happened."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from orchestra import Orchestra
from orchestra.errors import BadResponse, ConnectionBroke, RateLimited, RequestTimeout
from orchestra.loopback import Reply, chat_handler, error_reply, openai_reply
from orchestra.models import ChatRequest, OpenAICompatible

from helpers import AGGREGATE_MARK, PLANNER_MARK, kind_of, scripted_pool
from loopback_llm import write_pool
from test_cli import cli


def _ask(server, **options) -> Exception | str:  # noqa: ANN001
    model = OpenAICompatible(model="m", base_url=f"{server.url}/v1", **options)
    try:
        return asyncio.run(model.complete_one(ChatRequest.user("hi"))).text
    except Exception as error:  # noqa: BLE001 - the test looks at it
        return error


def test_a_server_that_trickles_is_cut_off_at_the_timeout(loopback) -> None:
    reply = openai_reply("a long answer " * 40)
    reply.drip = 0.5  # 16 bytes every half second: every read is quick, the answer never is
    server = loopback(lambda request: reply)
    error = _ask(server, timeout=1, max_attempts=1)
    assert isinstance(error, RequestTimeout) and "did not finish answering within 1 s" in str(error)
    assert len(server.requests) == 1


def test_the_deadline_bounds_a_call_over_all_its_attempts(loopback) -> None:
    server = loopback(lambda request: Reply(hang=True))
    error = _ask(server, timeout=0.3, max_attempts=10, deadline=1)
    assert isinstance(error, RequestTimeout) and "deadline=1 s per call" in str(error)
    assert 1 <= len(server.requests) < 10  # the deadline stopped the retries, not the attempt count


@pytest.mark.parametrize("retry_after", ["120", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_retry_after_beyond_the_cap_fails_at_once(loopback, retry_after: str) -> None:
    server = loopback(lambda request: error_reply(429, "slow down", retry_after=retry_after))
    error = _ask(server, max_attempts=4)
    assert isinstance(error, RateLimited) and "asked to wait" in str(error) and "Retry-After" in str(error)
    assert len(server.requests) == 1


@pytest.mark.parametrize("fault", [Reply(reset=True), Reply(body={"choices": []}, cut=5)])
def test_a_broken_connection_is_not_an_unreachable_server(loopback, fault: Reply) -> None:
    server = loopback(lambda request: fault)
    error = _ask(server, max_attempts=2)
    assert isinstance(error, ConnectionBroke) and str(error).startswith(f"the connection to {server.url}/v1")
    assert "is the server running" not in str(error) and len(server.requests) == 2


def test_deeply_nested_json_is_a_bad_response(loopback) -> None:
    server = loopback(lambda request: Reply(body="[" * 200_000 + "]" * 200_000))
    error = _ask(server, max_attempts=1)
    assert isinstance(error, BadResponse) and "nested too deeply" in str(error)


def test_a_server_error_storm_while_planning_is_not_a_plan_to_repair(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: error_reply(503, "overloaded")
                                   if PLANNER_MARK in request.prompt else "The answer is 1"))
    pool = write_pool(tmp_path, server.url)  # max_attempts: 2
    done = cli("ask", "Write a short report on tides, then check it", "--pool", str(pool), "--json")
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert "HTTP 503" in error and "repair" not in error
    assert len(server.requests) == 2  # one planner call, tried twice by the HTTP layer, never "repaired"


def test_a_huge_answer_is_capped_before_aggregation() -> None:
    pool, models = scripted_pool(3, expert=lambda name, request: "x" * 300_000 + " The answer is 1")
    orc = Orchestra(pool, store=False, plan=False, max_response_chars=1000, k=2, mode="topk",
                    settings={"keywords": {"samples": 1, "min_count": 1}})
    result = orc.run("What is 1?")
    assert result.status == "done", result.error
    [aggregation] = [r for m in models.values() for r in m.requests if AGGREGATE_MARK in r.prompt_text()]
    assert len(aggregation.prompt_text()) < 10_000 and "cut at max_response_chars=1000" in aggregation.prompt_text()
    assert kind_of(aggregation) == "aggregate"


# --- templates with limits ----------------------------------------------------------------------

BOMBS = {
    "huge string": "{{ ('a' * 10**10) | length }}",
    "huge power": "{{ 9 ** (9 ** 9) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "huge width": "{{ 'a' | center(10000000000) }}",
    "huge format": "{{ '%01000000000d' % 1 }}",
    "huge output": "{% for i in range(100000) %}{{ inputs.question * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("bomb", list(BOMBS), ids=list(BOMBS))
def test_template_bombs_are_checked_without_running_and_refused_in_one_line(loopback, tmp_path: Path,
                                                                            bomb: str) -> None:
    server = loopback(chat_handler(lambda request: "The answer is 1"))
    write_pool(tmp_path, server.url)
    flow = tmp_path / "flow.yaml"
    flow.write_text("pool: pool.yaml\ninputs:\n  question: {type: string, default: 'why?'}\n"
                    f"steps:\n  - id: s\n    agent: alpha-expert\n    prompt: \"{BOMBS[bomb]}\"\n")
    checked = cli("validate", str(flow), timeout=60)
    assert checked.returncode == 0, checked.stderr  # checking never evaluates the expressions
    done = cli("run", str(flow), timeout=60)
    assert done.returncode == 2  # the workflow file must be fixed
    [line] = done.stderr.strip().splitlines()
    assert "cannot render" in line and "template" in line and "Traceback" not in done.stderr
    assert not server.requests  # the step failed before any call
