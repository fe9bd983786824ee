"""Unit tests of orchestra.serve's request checks and error answers (no uvicorn: Starlette's TestClient)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import scripted_pool
from starlette.requests import Request
from starlette.testclient import TestClient

from orchestra.budget import Budget
from orchestra.errors import ConfigError
from orchestra.openai_wire import Completion, WireError
from orchestra.result import RunResult
from orchestra.serve import ServedModel, Server, _error, _failure, app, served_models
from orchestra.settings import Settings

#: a request as `_failure` reads it (no token limit)
ASKED = Completion(model="orchestra", task="t")


def request(body: bytes, *, declared: bool = True) -> Request:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}
    headers = [(b"content-length", str(len(body)).encode())] if declared else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_of_exactly_the_largest_size_is_read_and_one_byte_more_is_a_413(declared: bool) -> None:
    body = b'{"model": "orchestra"}'
    server = SimpleNamespace(max_request_bytes=len(body))
    assert asyncio.run(Server._body(server, request(body, declared=declared))) == {"model": "orchestra"}
    server.max_request_bytes = len(body) - 1
    with pytest.raises(WireError) as error:
        asyncio.run(Server._body(server, request(body, declared=declared)))
    assert error.value.status == 413


def test_the_bearer_scheme_is_read_in_any_case() -> None:
    pool, _ = scripted_pool(2)
    with TestClient(app(pool, store=False, api_key="sesame")) as client:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert client.get("/v1/models", headers={"authorization": f"{scheme} sesame"}).status_code == 200
        assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401


def test_an_error_naming_a_run_tells_sdks_not_to_retry() -> None:
    assert _error(WireError(502, "the run failed"), "run-1").headers["x-should-retry"] == "false"
    assert "x-should-retry" not in _error(WireError(400, "bad")).headers


def test_a_partial_run_without_an_answer_is_an_error() -> None:
    served = ServedModel("orchestra", "orchestra", Settings())
    partial = RunResult(run_id="r", task="t", status="partial", answer=None, error="a step failed")
    failure = _failure(partial, True, served, ASKED)
    assert failure is not None and failure.status == 502
    assert _failure(partial.model_copy(update={"answer": "half of it"}), True, served, ASKED) is None


def test_a_preset_named_orchestra_is_refused() -> None:
    pool, _ = scripted_pool(2)
    with pytest.raises(ConfigError, match="name of the orchestra"):
        served_models(pool, {"orchestra": {"k": 1}})


def test_a_server_budget_with_any_one_limit_admits_runs_by_it() -> None:
    pool, _ = scripted_pool(2)
    server = app(pool, store=False, budget=Budget(max_calls=50, max_cost_usd=None, max_tokens=None)).state.server
    assert server.admission is not None
    unlimited = app(pool, store=False, budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None)).state.server
    assert unlimited.admission is None


def test_k_at_its_cap_is_served_and_one_above_is_a_400() -> None:
    pool, _ = scripted_pool(2)
    ask = {"model": "orchestra", "messages": [{"role": "user", "content": "What is 1 + 0?"}]}
    with TestClient(app(pool, store=False)) as client:
        assert client.post("/v1/chat/completions", json={**ask, "k": 16}).status_code == 200
        over = client.post("/v1/chat/completions", json={**ask, "k": 17})
        assert over.status_code == 400 and over.json()["error"]["param"] == "k"


def test_a_served_run_s_advice_names_the_store_the_server_was_given(tmp_path: Path) -> None:
    """`orchestra serve --store F` answered "`orchestra resume R` finishes it", which looked in the default store."""
    from orchestra import hints

    served = ServedModel("orchestra", "orchestra", Settings())
    failed = RunResult(run_id="r1", task="t", status="failed", error="boom")
    hints.advise_store(tmp_path / "served.db")
    try:
        failure = _failure(failed, True, served, ASKED)
        assert failure is not None and failure.message.endswith(
            f"run r1 is saved: `orchestra resume r1 --store {tmp_path / 'served.db'}` finishes it")
    finally:
        hints.advise_store(None)
    failure = _failure(failed, True, served, ASKED)
    assert failure is not None and failure.message.endswith("run r1 is saved: `orchestra resume r1` finishes it")


@pytest.mark.parametrize("name", ["", "two words", "tab\there"])
def test_a_preset_no_client_could_name_is_refused(name: str) -> None:
    pool, _ = scripted_pool(2)
    with pytest.raises(ConfigError, match="is no model id a client can send"):
        served_models(pool, {name: {"k": 1}})
    assert "fast" in served_models(pool, {"fast": {"k": 1}})


def test_a_stream_whose_final_synthesis_failed_says_the_answer_is_the_steps_outputs() -> None:
    from orchestra.events import UNSYNTHESIZED
    from orchestra.serve import Feed, _diverged

    result = RunResult(run_id="r", task="t", status="partial", answer="## a\n\nA\n\n## b\n\nB",
                       error=f"final aggregation: boom ({UNSYNTHESIZED})")
    retried, reasoned = Feed(progress=False), Feed(progress=False)
    retried.retried = reasoned.reasoned = True
    body = _diverged(result, False, retried)["error"]
    assert body["message"].startswith(f"the final synthesis failed mid-stream and {UNSYNTHESIZED}, so the text")
    assert body["answer"] == result.answer
    done = result.model_copy(update={"error": None, "status": "done"})
    assert _diverged(done, False, retried)["error"]["message"].startswith("the call writing the answer broke off mid")
    assert "ended its reasoning with a </think>" in _diverged(done, False, reasoned)["error"]["message"]
    assert "retry" not in _diverged(done, False, Feed(progress=False))["error"]["message"]  # (none happened)


def test_a_405_names_the_allowed_method_and_a_trailing_slash_is_the_same_path() -> None:
    pool, _ = scripted_pool(2)
    with TestClient(app(pool, store=False), follow_redirects=False) as client:
        wrong = client.get("/v1/chat/completions")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")  # (HTTP requires Allow on a 405)
        assert "GET" in client.post("/v1/models").headers["allow"]
        listed = client.get("/v1/models/")  # (it asked for the model '': a 404)
        assert listed.status_code == 200 and listed.json() == client.get("/v1/models").json()
        asked = client.post("/v1/chat/completions/", json={"model": "orchestra", "messages": [
            {"role": "user", "content": "What is 1 + 0?"}]})  # (a 307 to a URL made from the Host header)
        assert asked.status_code == 200 and asked.json()["object"] == "chat.completion"
        assert client.get("/health/").status_code == 200
        assert client.get("/v1/models/orchestra").json()["id"] == "orchestra"
        assert client.get("/v1/models/orchestra/").json()["id"] == "orchestra"  # (the model 'orchestra/': a 404)
