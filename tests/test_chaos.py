"""The fault-injection suite: one loopback "chaos" server misbehaves on the expert's requests, the
real command line runs against it, and for each fault we read what the server saw (requests), what
the user saw (one line), the exit code, and that the run resumes without re-sending finished work.
The README's fault table is checked against ``FAULTS``."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import KEYWORDS_MARK
from loopback_llm import write_pool
from test_cli import cli

from orchestra.testing import LoopbackRequest, Reply, chat_handler, openai_reply

README = Path(__file__).resolve().parent.parent / "README.md"
KEY = "sk-chaos-0123456789abcdef"


def ok_body(text: str = "The answer is 42") -> dict:
    return openai_reply(text).body


@dataclass(frozen=True)
class Fault:
    """One misbehaviour: the replies to the expert's requests in order (the last one repeats)."""

    name: str
    replies: tuple[Callable[[], Reply], ...]
    requests: int
    """expert requests the server sees (the pool allows 2 attempts per call)"""
    exit_code: int
    says: str
    """what the one line on stderr (or the answer, for a fault that is survived) contains"""


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


FAULTS = [
    Fault("429 with Retry-After in seconds, then an answer",
          (lambda: Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}),
           lambda: Reply(200, ok_body())),
          2, 0, "The answer is 42"),
    Fault("429 with Retry-After as an HTTP date, then an answer",
          (lambda: Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": _http_date(-5)}),
           lambda: Reply(200, ok_body())), 2, 0, "The answer is 42"),
    Fault("a 429 storm", (lambda: Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),),
          2, 1, "is still rate limiting (HTTP 429) after 2 attempts"),
    Fault("a Retry-After beyond the cap",
          (lambda: Reply(429, {"error": {"message": "later"}}, {"Retry-After": "3600"}),),
          1, 1, "asked to wait 3600 s before another request"),
    Fault("5xx on every attempt", (lambda: Reply(503, {"error": {"message": "overloaded"}}),),
          2, 1, "failed with HTTP 503 after 2 attempts: overloaded"),
    Fault("a reset before the response", (lambda: Reply(reset=True),), 2, 1, "the connection to"),
    Fault("a body cut short", (lambda: Reply(200, ok_body("x" * 400), cut=60),), 2, 1, "the connection to"),
    Fault("a hang", (lambda: Reply(hang=True),), 2, 1, "did not finish answering within 1 s"),
    Fault("a non-JSON 200 (an HTML page)", (lambda: Reply(200, "<html><body>Welcome</body></html>"),),
          1, 1, "a body that is not JSON (text/plain: '<html><body>Welcome</body></html>'); is base_url the API's"),
    Fault("JSON that breaks off at a length that matches, then an answer",  # (a proxy cut it and set the length)
          (lambda: Reply(200, json.dumps(ok_body())[:40]), lambda: Reply(200, ok_body())), 2, 0, "The answer is 42"),
    Fault("an empty 200 on every attempt", (lambda: Reply(200, ""),), 2, 1, "answered HTTP 200 with an empty body"),
    Fault("JSON Lines with HTTP 200 (another API's answer, whole)", (lambda: Reply(200, '{"a": 1}\n{"b": 2}\n'),),
          1, 1, "a body that is not JSON (text/plain: '{\"a\": 1} {\"b\": 2}'); is base_url the API's"),
    Fault("choices: []", (lambda: Reply(200, {"id": "x", "object": "chat.completion", "choices": []}),),
          1, 1, "/v1/chat/completions returned no choices[0].message for alpha"),
    Fault("another API's answer with HTTP 200", (lambda: Reply(200, {"result": "42", "status": "success"}),),
          1, 1, "/v1/chat/completions returned no choices[0].message for alpha (its answer holds result, status: "
                "is base_url an OpenAI-compatible API's, such as http://host:8000/v1?)"),
    Fault("content null (no text)", (lambda: Reply(200, {**ok_body(), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]}),),
          1, 1, "answered with no text for alpha (finish_reason stop)"),  # (it was a run done, answer "")
    Fault("an error sent with HTTP 200", (lambda: Reply(200, {"error": {"message": "model overloaded"}}),),
          1, 1, "answered with an error for alpha: model overloaded"),
    Fault("JSON nested too deeply", (lambda: Reply(200, "[" * 100_000 + "]" * 100_000),),
          1, 1, "answered with JSON nested too deeply to read"),
    Fault("an error body nested too deeply", (lambda: Reply(400, "[" * 100_000 + "]" * 100_000),),
          1, 1, "refused the request for model"),
    Fault("a JSON answer sent as text/plain", (lambda: Reply(200, json.dumps(ok_body())),), 1, 0, "The answer is 42"),
    Fault("a huge answer (2 MB)", (lambda: Reply(200, ok_body("The answer is 42. " + "y" * 2_000_000)),),
          1, 0, "The answer is 42"),
    Fault("401 with the key echoed back", (lambda: Reply(401, {"error": {"message": f"bad key {KEY}"}}),),
          1, 2, "rejected the credentials (HTTP 401); check CHAOS_KEY"),
]


class Chaos:
    """Keywords answered normally; the expert's requests get the fault's replies, in order."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.expert_requests = 0
        self.keyword_requests = 0
        self.healthy = False

    def answer(self, request: LoopbackRequest) -> str | Reply:
        if KEYWORDS_MARK in request.prompt:
            self.keyword_requests += 1
            return json.dumps({"keywords": ["arithmetic"]})
        self.expert_requests += 1
        if self.healthy:
            return "The answer is 42"
        replies = self.fault.replies
        return replies[min(self.expert_requests, len(replies)) - 1]()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_each_fault_costs_known_requests_says_one_line_and_the_run_resumes(loopback, tmp_path: Path,
                                                                           fault: Fault) -> None:
    chaos = Chaos(fault)
    server = loopback(chat_handler(chaos.answer))
    pool = write_pool(tmp_path, server.url, models=("alpha",), api_key_env="CHAOS_KEY")
    pool.write_text(pool.read_text().replace("timeout: 10", "timeout: 1"))
    env = {"CHAOS_KEY": KEY}
    done = cli("ask", "What is 6 x 7?", "--pool", str(pool), "--no-plan", "--k", "1", "--json", env=env)
    assert chaos.expert_requests == fault.requests, done.stderr
    assert done.returncode == fault.exit_code, done.stderr
    assert KEY not in done.stdout + done.stderr  # never echoed, whatever the server sends back
    result = json.loads(done.stdout)
    if fault.exit_code == 0:
        assert result["status"] == "done" and fault.says in result["answer"]
        assert done.stderr.strip() == ""
        return
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and fault.says in line
    # finished work is saved: a resume against a healthy server sends only the expert's call again
    keywords_before = chaos.keyword_requests
    chaos.healthy = True
    resumed = cli("resume", result["run_id"], "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "done"
    assert chaos.keyword_requests == keywords_before  # replayed from the store, not asked again
    assert chaos.expert_requests == fault.requests + 1


def test_the_readme_fault_table_is_this_suite() -> None:
    text = README.read_text()
    table = text[text.index("<!-- chaos table: tests/test_chaos.py -->"):text.index("<!-- end chaos table -->")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| fault", "| ---"))]
    expected = [[f.name, str(f.requests), str(f.exit_code), f"`{f.says}`"] for f in FAULTS]
    assert rows == expected
